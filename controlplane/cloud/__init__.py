"""Short-lived cloud credentials (AWS, Google Cloud) the control plane obtains for backends and keeps fresh for
Envoy: the job never sees them."""
