"""Top-k ROIs: the k voxels of largest t, and the candidate voxels' values over the past
volumes (to recompute an ROI's means when its voxels change; see
:mod:`rtsc.pipeline.roi.stage`)."""

from __future__ import annotations

import numpy as np


def top_k_positions(t: np.ndarray, k: int) -> np.ndarray | None:
    """Positions of the ``k`` largest finite values of ``t`` (all finite ones if fewer),
    sorted; None when none is finite."""
    finite = np.isfinite(t)
    n_finite = int(np.count_nonzero(finite))
    if n_finite == 0:
        return None
    k = min(int(k), n_finite)
    score = np.where(finite, -t, np.inf)
    chosen = np.argpartition(score, k - 1)[:k] if k < t.size else np.arange(t.size)
    return np.sort(chosen)


class CandidateHistory:
    """Candidate voxels' values, one float32 row per volume, in blocks that are never
    copied when the history grows.

    A block holds the rows the run is expected to need (``rows``: the freeze or the
    design's length). ``np.empty`` only reserves address space, so the memory is
    touched row by row as volumes arrive; allocating many small blocks instead cost
    2-3 ms stalls at each new block on the test VM (whole-brain candidates at
    64 x 64 x 36), one large block none.
    """

    def __init__(self, width: int, rows: int) -> None:
        self.width = width
        self.rows = int(min(max(rows, 1), 4096))
        self.blocks: list[np.ndarray] = []
        self.x: list[float] = []

    def append(self, x: float, values: np.ndarray) -> None:
        row = len(self.x) % self.rows
        if row == 0:
            self.blocks.append(np.empty((self.rows, self.width), dtype=np.float32))
        self.blocks[-1][row] = values
        self.x.append(x)

    def sums(self, columns: np.ndarray) -> np.ndarray:
        """(n,) float64, each row's sum over ``columns`` (float64 accumulation)."""
        n = len(self.x)
        if columns.size == 0:
            return np.zeros(n)
        return np.concatenate([
            np.sum(block[:min(self.rows, n - b * self.rows)][:, columns], axis=1,
                   dtype=np.float64) for b, block in enumerate(self.blocks)])
