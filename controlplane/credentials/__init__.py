"""Job-scoped credentials: token exchange, signing keys, revocation."""
