"""Cloud credentials the control plane obtains for backends (Google Cloud, AWS) and keeps fresh for Envoy."""
