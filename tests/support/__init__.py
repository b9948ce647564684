"""Test infrastructure: real registry processes, a raw OCI pusher, a fault proxy, a token issuer."""
