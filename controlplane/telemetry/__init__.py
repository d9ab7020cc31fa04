"""Metrics and logs every layer reports to: a leaf that imports nothing of the control plane but itself."""
