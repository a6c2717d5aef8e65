"""What the gateway tells its operator: Prometheus metrics, logs, the live feed of cascades.

The bottom layer: it imports nothing of the gateway's."""
