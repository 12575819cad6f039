"""Engine replicas on Ray Serve behind the same OpenAI API server.

Importing this package imports Ray (the optional ``ray`` extra); nothing else in gfdit
does, so a server without ``--ray`` never loads it. ``deployment`` builds the Serve
application (one ``EngineReplica`` per replica, its placement group, scaling),
``replica`` is what runs in each replica, ``client`` is the front end's engine client.
"""

import os

# Serve's latency mode: the router runs on the caller's event loop and a replica's methods
# on the replica's own loop, instead of a hop to another thread each way. Serve reads it
# when ray.serve is first imported, so it is set before any import below; the replicas get
# it through their runtime environment (deployment.py). The engine never blocks its loop,
# which is what running on the replica's loop asks of it.
SERVE_LATENCY_MODE = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
os.environ.setdefault(SERVE_LATENCY_MODE, "1")

from entrypoints.ray_serve.client import RayEngineClient  # noqa: E402
from entrypoints.ray_serve.deployment import ReplicaOptions  # noqa: E402

__all__ = ["RayEngineClient", "ReplicaOptions"]
