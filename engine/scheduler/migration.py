"""Where a request's state must move when a task runs it on a group that lacks it.

A request's state (latents, embeddings, scheduler) lives in full on every rank of its
``location`` (a denoise step ends with the full latents on every member of its group).
Running it on another group copies the state, peer to peer, from one holder to the group
members without it; holders left outside the new group drop their copy.
"""

from __future__ import annotations

from collections.abc import Collection

from engine.messages import Migration
from engine.request import Request


def plan_migration(request: Request, group: tuple[int, ...], available: Collection[int]
                   ) -> tuple[Migration | None, list[int]]:
    """The copy needed to run ``request`` on ``group``, and the holders to free.

    The source is a holder inside the group when there is one (no extra rank is
    involved), else the first ``available`` holder, which then joins the task as a
    sender and drops its copy after sending. Raises ValueError if no holder can send.
    """
    holders = request.location or ()
    missing = tuple(rank for rank in group if rank not in holders)
    inside = [rank for rank in holders if rank in group]
    if not missing:
        return None, [rank for rank in holders if rank not in group]
    if inside:
        src = inside[0]
    else:
        senders = [rank for rank in holders if rank in available]
        if not senders:
            raise ValueError(f"no holder of {request.request_id} in {holders} can send its state")
        src = senders[0]
    # Holders outside the group, other than the sender (which drops its own copy), are freed.
    frees = [rank for rank in holders if rank not in group and rank != src]
    return Migration(request.request_id, src, missing), frees
