"""How a Router reaches Engine replicas.

- `client.py`     `EngineClient`: admission, a bounded queue, and the replica choice (its own `RoutingPolicy`)
- `policy.py`     `RoutingPolicy`: session affinity on a consistent-hash ring, prefix prediction, power of two
- `channel.py`    the direct token stream (server end in the Engine replica, client end in the Router)
- `wire.py`       the channel's frames and `WIRE_VERSION`
- `handle.py`     Serve's handle path, with Ray's errors turned into ours
- `membership.py` which replicas Serve runs, per process, as its request router last heard
- `serve_router.py` Serve's `RequestRouter` for the Engine deployment, which publishes that membership
"""
