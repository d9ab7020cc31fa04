"""Short-lived cloud credentials the control plane obtains for itself and hands to Envoy (issue 16)."""
