"""Errors every engine client raises alike (in process or over Ray replicas)."""


class EngineDeadError(RuntimeError):
    """The engine cannot serve (not started, shut down, or its workers are gone)."""
