"""Running the gateway: assembling it from a config, serving it, reloading it, and the
supervisor of its worker processes. The top layer."""
