"""ASGI plumbing and the HTTP server (hypercorn's trio worker) under every ASGI app Cascade
runs: the gateway and the mock upstreams."""
