"""The face: the ASGI app and its endpoints, and the HTTP server under it."""
