"""Contrast t and effects on a subset of the GLM's voxels, without a whole-brain fit.

The ROI stage (:mod:`rtsc.pipeline.roi.stage`) selects top-k voxels by a contrast's t
on its candidate voxels only, and the contrast feedback averages the effect over an
ROI's voxels. Both give :func:`~rtsc.pipeline.glm.recursive.glm_fit`'s values (to
rounding), through one p x p triangular solve when the GLM has full rank by glm_fit's
rank rule (:func:`~rtsc.pipeline.glm.recursive.lstsq_rank`), through glm_fit itself
otherwise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.linalg

from rtsc.pipeline.glm.recursive import GlmState, glm_fit, lstsq_rank


def _sub_state(state: GlmState, positions: np.ndarray | None) -> GlmState:
    """The GLM of a subset of its voxels (voxels are independent given the shared R)."""
    if positions is None:
        return state
    return dataclasses.replace(state, index=state.index[positions], z=state.z[:, positions],
                               rss=state.rss[positions], offset=state.offset[positions],
                               valid=None if state.valid is None else state.valid[positions])


def _full_rank_weights(state: GlmState, weights: np.ndarray) -> np.ndarray | None:
    """``u = R^-T c`` when the GLM has full rank by :func:`glm_fit`'s rule, else None.

    With full rank (:func:`lstsq_rank` of R is p: glm_fit's rule, numpy.linalg.lstsq's)
    and a constant column,
    glm_fit's effect is ``u'z + c_const * offset`` per voxel and its variance factor
    ``|u|**2``: one p x p solve instead of glm_fit's pseudo-inverse and estimability
    checks (~0.25 ms of small-array overhead). Anything else goes through glm_fit.
    """
    r = state.r
    p = r.shape[0]
    if state.constant is None or state.n <= p:
        return None
    if lstsq_rank(np.linalg.svd(r, compute_uv=False), state.n, p) < p:
        return None
    # Back substitution (componentwise backward error, as glm_fit's inverse), not LU.
    return scipy.linalg.solve_triangular(r, weights, trans="T", check_finite=False)


def contrast_t(state: GlmState, weights: np.ndarray,
               positions: np.ndarray | None = None) -> np.ndarray:
    """t of one contrast on some of the GLM's voxels, as :func:`glm_fit` gives it (to
    rounding: both are within about cond(R) * eps of lstsq).

    Parameters
    ----------
    state : GlmState
    weights : (p,) float64
    positions : (V',) int, positions in ``state.index``; None: all voxels

    Returns
    -------
    t : (V',) float64, NaN where undefined
    """
    u = _full_rank_weights(state, weights)
    if u is None:
        return glm_fit(_sub_state(state, positions), weights[None, :], with_beta=False).t[0]
    sub = _sub_state(state, positions)
    assert state.constant is not None
    effect = u @ sub.z + weights[state.constant] * sub.offset.astype(np.float64)
    variance = (u @ u) * sub.rss / (state.n - state.p)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = effect / np.sqrt(variance)
    t[~(variance > 0)] = np.nan
    if sub.valid is not None:  # voxels that left the acquired grid
        t[~sub.valid] = np.nan
    return t


def mean_effect(state: GlmState, weights: np.ndarray, positions: np.ndarray) -> float:
    """Mean over some voxels of a contrast's effect ``c'beta`` (intensity units).

    The effect is linear in each voxel's ``z = Q'(y - offset)`` and offset, so it is
    computed once, on their means (p x k work, no whole-brain fit). NaN when the
    contrast is not estimable yet, or when no voxel is left in the run's validity mask
    (those that left are not averaged).
    """
    if state.valid is not None:
        positions = positions[state.valid[positions]]
        if positions.size == 0:
            return math.nan
    z = state.z[:, positions].mean(axis=1)
    offset = float(np.mean(state.offset[positions], dtype=np.float64))
    u = _full_rank_weights(state, weights)
    if u is not None:
        assert state.constant is not None
        return float(u @ z + weights[state.constant] * offset)
    one = dataclasses.replace(state, index=np.zeros(1, np.int64), z=z[:, None],
                              rss=np.zeros(1), offset=np.array([offset]), valid=None)
    return float(glm_fit(one, weights[None, :], with_beta=False).effect[0, 0])
