"""The HTTP API (twisted.web)."""
