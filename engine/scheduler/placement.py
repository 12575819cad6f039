"""Which free ranks form a group: the request's own holders first, then aligned blocks.

A rank that already holds a request's state joins its group without a migration, so
holders come first (sticky placement). Beyond that, groups prefer aligned blocks
((0, 1), (2, 3) for degree 2): on real machines neighbouring devices share the fastest
links, and keeping narrow work on partly busy blocks leaves whole blocks free for the
next wide group.

Slow ranks (a device shared with a foreign job: telemetry marks it interfered or derates
its speed) come last. A group runs at its slowest member, so for a multi-rank group
avoiding them outranks stickiness: the group keeps a holder that is not slow when there
is one (the state then migrates from it), and with ``may_move`` it may leave every
holder out (a free holder sends the state, then drops it). A single rank stays with its
holder unless ``may_move``: only that request is slowed, and moving has its own cost.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def pick_group(free: Collection[int], degree: int, holders: Sequence[int] | None = None,
               num_workers: int | None = None, slow: Collection[int] = (), *,
               may_move: bool = False) -> tuple[int, ...] | None:
    """``degree`` ranks out of ``free`` (ascending), or None if there are too few.

    Unless ``may_move``, a group of degree > 1 contains a free holder when there is one.
    """
    free = sorted(free)
    if len(free) < degree:
        return None
    holders = tuple(holders or ())
    size = num_workers if num_workers is not None else (max(free) + 1)
    free_set = set(free)

    def block_free(rank: int, width: int) -> int:
        start = rank - rank % width
        return sum(1 for r in range(start, min(start + width, size)) if r in free_set)

    if degree == 1:
        # Holder, then not slow, then on the most occupied block (keeps free blocks whole);
        # moving, not slow comes first.
        width = 2 if size > 1 else 1
        if may_move:
            return (min(free, key=lambda r: (r in slow, r not in holders, block_free(r, width), r)),)
        return (min(free, key=lambda r: (r not in holders, r in slow, block_free(r, width), r)),)
    free_holders = [r for r in holders if r in free_set]
    need_holder = bool(free_holders) and not may_move
    candidates = []
    for start in range(0, size - degree + 1, degree):
        block = tuple(range(start, start + degree))
        if free_set.issuperset(block) and (not need_holder or not set(block).isdisjoint(holders)):
            candidates.append(block)
    # Not aligned: a holder (a fast one first) when one is needed, then the fast ranks,
    # holders before others, nearest the anchor.
    anchor = min(free_holders, key=lambda r: r in slow) if free_holders else free[0]
    chosen = [anchor] if need_holder else []
    ranked = sorted((r for r in free if r not in chosen),
                    key=lambda r: (r in slow, r not in holders, abs(r - anchor), r))
    candidates.append(tuple(sorted(chosen + ranked[:degree - len(chosen)])))

    def score(group: tuple[int, ...]) -> tuple[int, int, bool, int]:
        aligned = group[0] % degree == 0 and group == tuple(range(group[0], group[0] + degree))
        return (sum(r in slow for r in group), -len(set(group) & set(holders)), not aligned, group[0])

    return min(candidates, key=score)
