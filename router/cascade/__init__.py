"""The cascade: one request's walk over its targets (dispatcher) and the retry policy."""
