"""Which free ranks form a group: the request's own holders first, then aligned blocks.

A rank that already holds a request's state joins its group without a migration, so
holders come first (sticky placement). Beyond that, groups prefer aligned blocks
((0, 1), (2, 3) for degree 2): on real machines neighbouring devices share the fastest
links, and keeping narrow work on partly busy blocks leaves whole blocks free for the
next wide group.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def pick_group(free: Collection[int], degree: int, holders: Sequence[int] | None = None,
               num_workers: int | None = None, slow: Collection[int] = ()) -> tuple[int, ...] | None:
    """``degree`` ranks out of ``free`` (ascending), or None if there are too few.

    Ranks in ``slow`` (a device shared with a foreign job, say) are taken last.
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
        # Holder, then not slow, then on the most occupied block (keeps free blocks whole).
        width = 2 if size > 1 else 1
        return (min(free, key=lambda r: (r not in holders, r in slow, block_free(r, width), r)),)
    candidates = []
    for start in range(0, size - degree + 1, degree):
        block = tuple(range(start, start + degree))
        if free_set.issuperset(block):
            candidates.append(block)
    # Not aligned: holders, then the fast ranks, nearest the first holder (or lowest).
    anchor = holders[0] if holders else free[0]
    ranked = sorted(free, key=lambda r: (r not in holders, r in slow, abs(r - anchor), r))
    candidates.append(tuple(sorted(ranked[:degree])))

    def score(group: tuple[int, ...]) -> tuple[int, int, bool, int]:
        aligned = group[0] % degree == 0 and group == tuple(range(group[0], group[0] + degree))
        return (-len(set(group) & set(holders)), sum(r in slow for r in group), not aligned, group[0])

    return min(candidates, key=score)
