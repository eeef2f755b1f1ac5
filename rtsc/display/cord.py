"""The dashboard panels of spinal cord mode.

- **Slice motion**: a slice x volume image of the per-slice translation along A-P
  (``slice_trans_y``, mm, diverging colours; the R-L component is in the note), in the
  place of the rotation panel (rotations are not estimated in this mode).
- **Cord tSNR profile**: ``slice_tsnr`` of the newest volume against the slice index
  (cord mask), with the cord signal per slice scaled to the same axis, in the place of
  the tSNR mosaic.
"""

from __future__ import annotations

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes

from rtsc.display.state import DisplayState


class CordPanels:
    """Artists of the two cord panels, created once per layout.

    Parameters
    ----------
    ax_motion : Axes, the slice x volume image (shares x with the time series)
    ax_profile : Axes, the tSNR profile
    animated : bool, for blitting
    """

    def __init__(self, ax_motion: Axes, ax_profile: Axes, animated: bool) -> None:
        self.ax_motion = ax_motion
        self.ax_profile = ax_profile
        ax_motion.set_ylabel("slice A-P shift\n(mm, slice)", fontsize=8)
        self.image = ax_motion.imshow(np.full((2, 2), np.nan), aspect="auto", cmap="RdBu_r",
                                      vmin=-1.0, vmax=1.0, origin="lower",
                                      interpolation="nearest", animated=animated)
        self.motion_note = ax_motion.text(0.005, 0.92, "", transform=ax_motion.transAxes,
                                          fontsize=7, va="top", animated=animated)
        ax_profile.set_title("cord tSNR per slice", fontsize=9)
        ax_profile.set_xlabel("tSNR (cord mask)", fontsize=8)
        ax_profile.set_ylabel("slice", fontsize=8)
        ax_profile.tick_params(labelsize=7)
        ax_profile.grid(True, alpha=0.3)
        self.profile = ax_profile.plot([], [], color="tab:green", marker="o", ms=3, lw=1.2,
                                       animated=animated)[0]
        self.signal = ax_profile.plot([], [], color="0.5", lw=1.0, ls="--",
                                      animated=animated)[0]
        self.profile_note = ax_profile.text(0.02, 0.99, "", transform=ax_profile.transAxes,
                                            fontsize=7, va="top", animated=animated)

    def artists(self) -> list[tuple[Axes, list[Artist]]]:
        """(axes, artists) for the dashboard's panel table."""
        return [(self.ax_motion, [self.image, self.motion_note]),
                (self.ax_profile, [self.profile, self.signal, self.profile_note])]

    def motion_image(self, state: DisplayState, xmax: int) -> np.ndarray | None:
        """(nz, xmax) A-P shift per slice (rows) and volume index (columns), NaN where
        none; None without per-slice translations."""
        trans = state.slice_trans
        if trans is None or not state.n:
            return None
        image = np.full((trans.shape[1], xmax), np.nan)
        keep = state.indices < xmax
        image[:, state.indices[keep]] = trans[keep, :, 1].T
        return image

    def update(self, state: DisplayState, xmax: int) -> bool:
        """Set the artists' data; True when an axis range changed (full redraw)."""
        changed = False
        image = self.motion_image(state, xmax)
        if image is None:
            self.image.set_data(np.full((2, 2), np.nan))
            self.motion_note.set_text("no per-slice translations yet" if state.n else "")
        else:
            nz = image.shape[0]
            self.image.set_data(image)
            extent = (-0.5, xmax - 0.5, -0.5, nz - 0.5)
            if tuple(self.image.get_extent()) != extent:
                self.image.set_extent(extent)
                self.ax_motion.set_ylim(-0.5, nz - 0.5)
                changed = True
            finite = np.abs(image[np.isfinite(image)])
            scale = max(float(finite.max()) if finite.size else 0.0, 0.25)
            self.image.set_clim(-scale, scale)
            trans = state.slice_trans
            last = trans[-1] if trans is not None else np.full((1, 2), np.nan)
            self.motion_note.set_text(
                f"colour: A-P shift, +-{scale:.2f} mm; newest: max |A-P| "
                f"{np.nanmax(np.abs(last[:, 1])):.2f} mm, max |R-L| "
                f"{np.nanmax(np.abs(last[:, 0])):.2f} mm" if np.isfinite(last).any()
                else f"colour: A-P shift, +-{scale:.2f} mm")
        tsnr = state.slice_profile("slice_tsnr")
        if tsnr is None or not np.isfinite(tsnr).any():
            self.profile.set_data([], [])
            self.signal.set_data([], [])
            self.profile_note.set_text("cord tSNR n/a" if state.n else "")
            return changed
        slices = np.arange(tsnr.size)
        self.profile.set_data(tsnr, slices)
        top = float(np.nanmax(tsnr))
        signal = state.slice_profile("slice_signal")
        if signal is not None and signal.size == tsnr.size and np.isfinite(signal).any():
            self.signal.set_data(signal / np.nanmax(signal) * top, slices)
        low, high = self.ax_profile.get_xlim()
        if top > high or high > 4 * top or tuple(self.ax_profile.get_ylim()) != (
                -0.5, tsnr.size - 0.5):
            self.ax_profile.set_xlim(0.0, 1.25 * top)
            self.ax_profile.set_ylim(-0.5, tsnr.size - 0.5)
            changed = True
        worst = int(np.nanargmin(tsnr))
        self.profile_note.set_text(f"median {np.nanmedian(tsnr):.1f}, lowest slice {worst} "
                                   f"({tsnr[worst]:.1f}); dashed: cord signal (scaled)")
        return changed
