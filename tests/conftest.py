"""Test-wide setup: the suite's upstreams are on 127.0.0.1, so a proxy set in the environment
of whoever runs the tests (HTTP_PROXY on a corporate laptop) must not carry them. Tests of the
proxy support set the variables they need themselves. The `redis` fixture (a redis-server of the
test's own) comes from tests/redis_server.py."""

from __future__ import annotations

import os

pytest_plugins = ["tests.redis_server"]  # the `redis` fixture

for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.lower(), None)
