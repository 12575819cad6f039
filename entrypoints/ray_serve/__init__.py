"""Engine replicas on Ray Serve behind the same OpenAI API server.

Importing this package imports Ray (the optional ``ray`` extra); nothing else in gfdit
does, so a server without ``--ray`` never loads it. ``deployment`` builds the Serve
application (one ``EngineReplica`` per replica, its placement group, scaling),
``replica`` is what runs in each replica, ``client`` is the front end's engine client.
"""

from entrypoints.ray_serve.client import RayEngineClient
from entrypoints.ray_serve.deployment import ReplicaOptions

__all__ = ["RayEngineClient", "ReplicaOptions"]
