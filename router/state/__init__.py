"""Provider state shared across workers and replicas (`state.backend: redis`)."""
