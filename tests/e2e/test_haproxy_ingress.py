"""The suite's shared app (tests/e2e/serve_config.tiny.yaml, serve_config.yaml's ingress settings) is served by
HAProxy, which forwards HTTP straight to the Router replica's own server: every e2e test on the shared app goes
through it. Serve's own proxy, one setting away, has tests of its own (test_ingress.py), on an app of their own,
so that they run beside the shared app's modules."""

from __future__ import annotations

import httpx
import psutil
import pytest

from tests.e2e.conftest import AUTH, MODEL, ServeApp
from tests.e2e.processes import listeners, named, session_of_haproxy_on

pytestmark = pytest.mark.e2e

# Serve's direct-ingress HTTP port range (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT to _MAX_HTTP_PORT).
REPLICA_PORTS = range(30000, 31000)


def test_the_shared_app_is_served_by_haproxy_bound_to_loopback(serve_app: ServeApp) -> None:
    # What listens on the app's port is HAProxy, on 127.0.0.1 only (the config's http_options.host).
    hosts = {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == 8000
    }
    assert hosts == {"127.0.0.1"}
    session = session_of_haproxy_on(8000)
    # The Router replica HAProxy forwards to has a port of its own, bound to the same host.
    routers = named(session, "ServeReplica:shepherd:Router")
    assert len(routers) == 1
    replica_ports = [(ip, port) for ip, port in listeners(routers[0].pid) if port in REPLICA_PORTS]
    assert replica_ports and all(ip == "127.0.0.1" for ip, _ in replica_ports), replica_ports
    reply = httpx.get(f"{serve_app.base_url}/v1/models", headers=AUTH)
    assert reply.json()["data"][0]["id"] == MODEL
