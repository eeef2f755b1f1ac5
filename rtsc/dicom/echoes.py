"""Multi-echo BOLD: combine the echoes of each volume into one more series.

Each echo is assembled and processed as its own series (per-echo outputs). With
``multi_echo.combine: t2star`` the echoes of volume t are also combined into a series of
their own, the T2*-weighted sum of Posse et al. (1999):

    S(x) = sum_n w_n(x) S_n(x),   w_n(x) = TE_n exp(-TE_n / T2*(x)) / sum_m (same),

with T2*(x) from a log-linear least-squares fit of log(mean S_n(x)) against TE_n over the
first ``t2star_volumes`` volumes (weights are then frozen, so the combination is a fixed
linear map of the echoes, as in real-time multi-echo work). ``combine: first`` adds no
series: echo 1 is the one to watch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from rtsc.volume import Volume, series_id

T2STAR_MIN_S, T2STAR_MAX_S = 0.001, 0.5
_MAX_LAG = 3  # volumes an incomplete set of echoes is kept waiting


def t2star_fit(means: np.ndarray, te_s: np.ndarray) -> np.ndarray:
    """Voxelwise T2* (s) from echo means by log-linear least squares.

    Parameters
    ----------
    means : (n_echoes, ...) float, mean signal per echo (values <= 0 are clipped)
    te_s : (n_echoes,) echo times, s

    Returns
    -------
    (...) float64 T2* in s, clipped to [0.001, 0.5]; 0.5 where the signal does not decay.
    """
    te = np.asarray(te_s, dtype=np.float64)
    y = np.log(np.maximum(means.reshape(len(te), -1), 1e-6))
    tc = te - te.mean()
    slope = tc @ (y - y.mean(axis=0)) / (tc @ tc)  # -1 / T2*
    with np.errstate(divide="ignore"):
        t2s = np.where(slope < 0, -1.0 / slope, T2STAR_MAX_S)
    return np.clip(t2s, T2STAR_MIN_S, T2STAR_MAX_S).reshape(means.shape[1:])


def t2star_weights(t2s: np.ndarray, te_s: np.ndarray) -> np.ndarray:
    """Normalised weights (n_echoes, ...) float32: TE_n exp(-TE_n / T2*), summing to 1."""
    te = np.asarray(te_s, dtype=np.float64).reshape((-1,) + (1,) * t2s.ndim)
    w = te * np.exp(-te / t2s[None])
    return (w / w.sum(axis=0, keepdims=True)).astype(np.float32)


@dataclass
class _Group:
    """The echoes of one multi-echo series."""

    te_s: dict[int, float] = field(default_factory=dict)  # echo -> TE
    pending: dict[int, dict[int, Volume]] = field(default_factory=dict)  # index -> echo -> vol
    sums: np.ndarray | None = None  # (n_echoes, nx, ny, nz) for the T2* fit
    n_fit: int = 0
    weights: np.ndarray | None = None


class EchoCombiner:
    """Collects the echoes of each volume and emits their T2*-weighted combination.

    Parameters
    ----------
    n_echoes : int
        Echoes per volume (the combination waits for all of them).
    t2star_volumes : int
        Volumes whose echo means fit T2*; the weights are frozen afterwards.
    """

    def __init__(self, n_echoes: int, t2star_volumes: int) -> None:
        self.n_echoes = n_echoes
        self.t2star_volumes = t2star_volumes
        self._groups: dict[str, _Group] = {}

    def add(self, volume: Volume) -> list[Volume]:
        """Take one echo's volume; return the combined volume once all echoes are in."""
        info = volume.info
        if info.echo is None or info.echo_time_s is None or info.echo_group is None:
            return []
        group_key = info.echo_group
        group = self._groups.setdefault(group_key, _Group())
        group.te_s[info.echo] = info.echo_time_s
        echoes = group.pending.setdefault(volume.index, {})
        echoes[info.echo] = volume
        # The echoes of a volume arrive together: a volume still short of echoes several
        # volumes later never gets them (or the series has one echo); do not hoard it.
        for stale in [i for i in group.pending if i < volume.index - _MAX_LAG]:
            del group.pending[stale]
        if len(echoes) < self.n_echoes:
            return []
        del group.pending[volume.index]
        order = sorted(echoes)
        stack = np.stack([echoes[e].data for e in order])  # (n_echoes, nx, ny, nz)
        te = np.array([group.te_s[e] for e in order])
        if group.weights is None or group.n_fit < self.t2star_volumes:
            group.sums = stack.astype(np.float64) if group.sums is None else group.sums + stack
            group.n_fit += 1
            group.weights = t2star_weights(t2star_fit(group.sums / group.n_fit, te), te)
        combined = np.asfortranarray((group.weights * stack).sum(axis=0, dtype=np.float32))
        first = echoes[order[0]]
        combined_info = replace(first.info, series=series_id(f"{group_key}/t2star"), echo=None,
                                echo_time_s=None, echo_group=None, description=f"{first.info.description}_t2s")
        return [replace(first, data=combined, info=combined_info,
                        t_received=max(v.t_received for v in echoes.values()),
                        stored_dtype=np.dtype(np.float32))]
