"""Index sets as ranges: how missing volumes and slices are reported.

A header can claim a run of millions of volumes, or number an image three million; the
indices missing before it are then millions too. Alerts and messages carry them as a
count and ``[first, last]`` ranges (at most :data:`MAX_RANGES`), never as a list of every
index, so their size does not depend on what a header claims.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Ranges a message or summary lists; later ones are left out (the count stays exact).
MAX_RANGES = 100


def index_ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted ``[first, last]`` runs (inclusive) of distinct integers.

    >>> index_ranges([9, 3, 7, 8])
    [[3, 3], [7, 9]]
    """
    runs: list[list[int]] = []
    for value in sorted(set(int(i) for i in indices)):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return runs


def missing_ranges(present: Iterable[int], stop: int,
                   limit: int = MAX_RANGES) -> tuple[int, list[list[int]]]:
    """What ``range(stop)`` lacks of ``present``: (count, first ``limit`` ranges).

    Costs the size of ``present``, not ``stop``: a claimed run of 2**31 volumes is one
    range.

    >>> missing_ranges([0, 1, 4], 8)
    (5, [[2, 3], [5, 7]])
    """
    count, ranges, expected = 0, [], 0
    for value in sorted(set(int(i) for i in present if 0 <= i < stop)) + [stop]:
        if value > expected:
            count += value - expected
            if len(ranges) < limit:
                ranges.append([expected, value - 1])
        expected = value + 1
    return count, ranges


def ranges_text(ranges: list[list[int]], count: int | None = None, limit: int = 8) -> str:
    """``3, 7-9 and 2 more ranges`` (``count``: the number of indices the ranges stand
    for, when some ranges were already left out; said as ``(12 in all)``)."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    text = ", ".join(parts) if parts else "none"
    if len(ranges) > limit:
        text += f" and {len(ranges) - limit} more range{'s' if len(ranges) - limit > 1 else ''}"
    listed = sum(b - a + 1 for a, b in ranges)
    if count is not None and count != listed or len(ranges) > limit:
        text += f" ({count if count is not None else listed} in all)"
    return text
