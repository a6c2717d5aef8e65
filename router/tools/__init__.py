"""Tools beside the gateway: the mock upstream and the load generator."""
