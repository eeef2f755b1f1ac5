"""The dashboard view: a matplotlib figure whose artists are created once and updated.

:class:`Dashboard` draws a :class:`~rtsc.display.state.DisplayState` onto a figure it is
given (a pyplot window for the live display, a plain Agg figure headless and in tests).
Artists are created once per series; :meth:`Dashboard.update` sets their data. With
``blit=True`` the dynamic artists are animated: only the axes whose panel changed are
restored from their saved background, redrawn and blitted; a full redraw happens only
when a series starts or an axis range has to grow (ranges only grow within a series,
by at least half, so that stays rare).

Panels: status line; translations (mm) and rotations (degrees); FD with its thresholds,
spike markers (``spike``/``outlier`` flags, slice spikes) and alert markers; DVARS
(standardised) and global signal; the carpet plot of the sampled in-mask voxels
(z-scored per voxel over the volumes so far); the ROI time course (percent signal
change) with the design's task columns under it; the tSNR map and the activation
(first ``t:`` map, |t| above ``t_threshold``) over the mean image as slice mosaics with
the ROI outlined; usable-frame counters and the progress bar to the clean-data
criterion.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from rtsc.display.cord import CordPanels
from rtsc.output.slice_mosaic import mosaic, mosaic_slices, outline
from rtsc.display.state import DisplayState

MOTION_COLOURS = ("tab:red", "tab:green", "tab:blue")
ALERT_COLOURS = {"info": "tab:blue", "warning": "orange", "critical": "red"}
THRESHOLD_COLOURS = ("tab:green", "orange", "tab:red", "purple")

#: Most carpet rows drawn (sampled voxels beyond are thinned evenly).
CARPET_ROWS = 256

#: Smallest y ranges, so that noise does not fill a panel: (low, high) at least.
MIN_RANGE = {"trans": (-0.5, 0.5), "rot": (-0.5, 0.5), "fd": (0.0, 0.5), "dvars": (0.0, 1.5),
             "gs": None, "roi": (-1.0, 1.0)}


def _finite_range(*arrays: np.ndarray) -> tuple[float, float] | None:
    values = [a[np.isfinite(a)] for a in arrays if a.size]
    values = [v for v in values if v.size]
    if not values:
        return None
    both = np.concatenate(values)
    return float(both.min()), float(both.max())


class Dashboard:
    """The live dashboard on ``figure``.

    Parameters
    ----------
    figure : matplotlib Figure with a canvas (pyplot's, or ``FigureCanvasAgg(Figure())``)
    blit : bool, redraw only the changed panels (interactive use and the benchmark)
    t_threshold : float, |t| shown in the activation panel
    n_slices : int, slices per mosaic
    """

    def __init__(self, figure: Figure, blit: bool = True, t_threshold: float = 3.1,
                 n_slices: int = 12) -> None:
        self.figure = figure
        self.blit = blit
        self.t_threshold = t_threshold
        self.n_slices = n_slices
        self._generation = -1
        self._backgrounds: dict[Axes, Any] | None = None
        self._needs_full = True
        self._mosaic_shape: tuple[int, ...] | None = None
        self._xmax = 100
        self._mode = "brain"
        self.cord: CordPanels | None = None
        self._build()

    # -- layout, once --

    def _build(self) -> None:
        fig = self.figure
        fig.clear()
        fig.set_facecolor("white")
        grid = fig.add_gridspec(9, 3, height_ratios=[0.35, 1, 1, 1, 0.8, 0.8, 2, 1, 0.45],
                                width_ratios=[1, 1, 0.95], left=0.05, right=0.99, top=0.985,
                                bottom=0.04, hspace=0.5, wspace=0.18)
        self.ax_status = fig.add_subplot(grid[0, :])
        self.ax_status.set_axis_off()
        self.ax_trans = fig.add_subplot(grid[1, :2])
        ts = dict(sharex=self.ax_trans)
        self.ax_rot = fig.add_subplot(grid[2, :2], **ts)
        self.ax_fd = fig.add_subplot(grid[3, :2], **ts)
        self.ax_dvars = fig.add_subplot(grid[4, :2], **ts)
        self.ax_gs = fig.add_subplot(grid[5, :2], **ts)
        self.ax_carpet = fig.add_subplot(grid[6, :2], **ts)
        self.ax_roi = fig.add_subplot(grid[7, :2], **ts)
        self.ax_design = fig.add_subplot(grid[8, :2], **ts)
        cord = self._mode == "spinal_cord"
        if cord:  # spinal cord mode: the tSNR mosaic above the cord tSNR profile
            right = grid[1:4, 2].subgridspec(2, 1, hspace=0.45, height_ratios=[1, 1.3])
            self.ax_tsnr = fig.add_subplot(right[0])
            ax_profile = fig.add_subplot(right[1])
        else:
            self.ax_tsnr = fig.add_subplot(grid[1:4, 2])
        self.ax_act = fig.add_subplot(grid[4:7, 2])
        self.ax_usable = fig.add_subplot(grid[7:9, 2])
        self.ax_usable.set_axis_off()
        for ax, label in ((self.ax_trans, "translation (mm)"), (self.ax_rot, "rotation (deg)"),
                          (self.ax_fd, "FD (mm)"), (self.ax_dvars, "std DVARS"),
                          (self.ax_gs, "global signal"), (self.ax_carpet, "carpet (z)"),
                          (self.ax_roi, "ROI (% signal)"), (self.ax_design, "design")):
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            if ax is not self.ax_design:
                ax.tick_params(labelbottom=False)
        self.ax_design.set_xlabel("volume", fontsize=8)
        if cord:
            self.ax_trans.set_ylabel("mean slice\nshift (mm)", fontsize=8)
        self.ax_carpet.grid(False)
        for ax in (self.ax_tsnr, self.ax_act):
            ax.set_xticks([])
            ax.set_yticks([])
        self.ax_tsnr.set_title("tSNR", fontsize=9)
        self.ax_act.set_title("activation (|t|) over the mean, ROI outlined", fontsize=9)

        animated = self.blit
        a: dict[str, Artist] = {}
        self.status = self.ax_status.text(0.0, 0.5, "", fontsize=11, family="monospace",
                                          va="center", ha="left", animated=animated,
                                          transform=self.ax_status.transAxes)
        self.trans_lines = [self.ax_trans.plot([], [], color=c, lw=1.2, label=n,
                                               animated=animated)[0]
                            for c, n in zip(MOTION_COLOURS, ("x", "y", "z"))]
        self.rot_lines = [self.ax_rot.plot([], [], color=c, lw=1.2, label=n,
                                           animated=animated)[0]
                          for c, n in zip(MOTION_COLOURS, ("x", "y", "z"))]
        self.ax_trans.legend(loc="upper left", fontsize=7, ncol=3, frameon=False)
        self.fd_line = self.ax_fd.plot([], [], color="black", lw=1.2, animated=animated)[0]
        self.fd_thresholds = [self.ax_fd.axhline(np.nan, color=c, lw=0.8, ls="--",
                                                 animated=animated)
                              for c in THRESHOLD_COLOURS]
        tx = self.ax_fd.get_xaxis_transform()
        self.spike_markers = self.ax_fd.plot([], [], ls="none", marker="v", color="red", ms=6,
                                             transform=tx, animated=animated)[0]
        self.alert_markers = {level: self.ax_fd.plot([], [], ls="none", marker="|", ms=14,
                                                     mew=2, color=c, transform=tx,
                                                     animated=animated)[0]
                              for level, c in ALERT_COLOURS.items()}
        self.dvars_line = self.ax_dvars.plot([], [], color="tab:purple", lw=1.2,
                                             animated=animated)[0]
        self.dvars_spikes = self.ax_dvars.plot([], [], ls="none", marker="v", color="red", ms=5,
                                               transform=self.ax_dvars.get_xaxis_transform(),
                                               animated=animated)[0]
        self.gs_line = self.ax_gs.plot([], [], color="tab:brown", lw=1.2, animated=animated)[0]
        self.carpet = self.ax_carpet.imshow(np.full((2, 2), np.nan, np.float32), aspect="auto",
                                            cmap="gray", vmin=-3, vmax=3,
                                            interpolation="nearest", animated=animated)
        self.carpet_note = self.ax_carpet.text(0.5, 0.5, "", transform=self.ax_carpet.transAxes,
                                               ha="center", va="center", fontsize=9,
                                               color="gray", animated=animated)
        self.roi_line = self.ax_roi.plot([], [], color="tab:blue", lw=1.4,
                                         animated=animated)[0]
        self.roi_note = self.ax_roi.text(0.005, 0.9, "", transform=self.ax_roi.transAxes,
                                         fontsize=8, va="top", animated=animated)
        self.tsnr_image = self.ax_tsnr.imshow(np.full((2, 2), np.nan, np.float32),
                                              cmap="viridis", interpolation="nearest",
                                              animated=animated)
        self.mean_image = self.ax_act.imshow(np.full((2, 2), np.nan, np.float32), cmap="gray",
                                             interpolation="nearest", animated=animated)
        self.t_image = self.ax_act.imshow(np.ma.masked_all((2, 2)), cmap="hot",
                                          interpolation="nearest", animated=animated)
        self.roi_image = self.ax_act.imshow(np.zeros((2, 2, 4), np.float32),
                                            interpolation="nearest", animated=animated)
        box = dict(boxstyle="square,pad=0.2", fc="black", alpha=0.6, lw=0)
        self.tsnr_note = self.ax_tsnr.text(0.01, 0.99, "", transform=self.ax_tsnr.transAxes,
                                           color="white", fontsize=8, va="top", bbox=box,
                                           animated=animated)
        self.act_note = self.ax_act.text(0.01, 0.99, "", transform=self.ax_act.transAxes,
                                         color="white", fontsize=8, va="top", bbox=box,
                                         animated=animated)
        self.usable_text = self.ax_usable.text(0.0, 0.98, "", fontsize=9, va="top",
                                               family="monospace", animated=animated,
                                               transform=self.ax_usable.transAxes)
        self.ax_usable.add_patch(Rectangle((0.0, 0.05), 1.0, 0.14, fc="0.9", ec="0.4",
                                           transform=self.ax_usable.transAxes))
        self.progress = Rectangle((0.0, 0.05), 0.0, 0.14, fc="tab:green", ec="none",
                                  transform=self.ax_usable.transAxes, animated=animated)
        self.ax_usable.add_patch(self.progress)
        self.progress_text = self.ax_usable.text(0.5, 0.12, "", fontsize=8, ha="center",
                                                 va="center", animated=animated,
                                                 transform=self.ax_usable.transAxes)
        self.design_lines: list[Line2D] = []
        self.cord = None
        if cord:  # the slice x volume A-P shift image replaces the rotations
            for line in self.rot_lines:
                line.set_visible(False)
            self.cord = CordPanels(self.ax_rot, ax_profile, animated)
        del a
        self._panel_artists: dict[str, list[tuple[Axes, list[Artist]]]] = {
            "status": [(self.ax_status, [self.status])],
            "motion": [(self.ax_trans, list(self.trans_lines)),
                       (self.ax_rot, list(self.rot_lines))],
            "fd": [(self.ax_fd, [self.fd_line, *self.fd_thresholds, self.spike_markers,
                                 *self.alert_markers.values()])],
            "dvars": [(self.ax_dvars, [self.dvars_line, self.dvars_spikes]),
                      (self.ax_gs, [self.gs_line])],
            "carpet": [(self.ax_carpet, [self.carpet, self.carpet_note])],
            "roi": [(self.ax_roi, [self.roi_line, self.roi_note])],
            "maps": [(self.ax_tsnr, [self.tsnr_image, self.tsnr_note]),
                     (self.ax_act, [self.mean_image, self.t_image, self.roi_image,
                                    self.act_note])],
            "usable": [(self.ax_usable, [self.usable_text, self.progress, self.progress_text])],
        }
        if self.cord is not None:
            self._panel_artists["cord"] = self.cord.artists()
            self._panel_artists["motion"] = [(self.ax_trans, list(self.trans_lines))]

    # -- per series --

    def _start_series(self, state: DisplayState) -> None:
        """New series (or waiting): clear the data, set the x range, draw the design."""
        if state.mode != self._mode:  # the layout depends on the mode
            self._mode = state.mode
            self._build()
            self._backgrounds = None
        self._xmax = max(state.n_expected or 100, 10)
        self.ax_trans.set_xlim(-0.5, self._xmax - 0.5)
        for key, ax in (("trans", self.ax_trans), ("rot", self.ax_rot), ("fd", self.ax_fd),
                        ("dvars", self.ax_dvars), ("roi", self.ax_roi)):
            ax.set_ylim(*(MIN_RANGE[key] or (0, 1)))
        self.ax_gs.set_ylim(0, 1)
        self.ax_design.set_ylim(-0.2, 1.2)
        for line in self.design_lines:
            line.remove()
        self.design_lines = []
        design = state.design
        if design:
            for name, column in zip(design["names"], design["columns"]):
                values = np.asarray(column, dtype=np.float64)
                self.design_lines.append(self.ax_design.plot(np.arange(values.size), values,
                                                             lw=1.2, label=name)[0])
            top = max(1.0, max(float(np.nanmax(np.asarray(c, float))) for c in design["columns"]))
            self.ax_design.set_ylim(-0.2 * top, 1.2 * top)
            self.ax_design.legend(loc="upper right", fontsize=7, frameon=False,
                                  ncol=len(self.design_lines))
        elif self.ax_design.get_legend() is not None:
            self.ax_design.get_legend().remove()
        shape = state.start.get("shape")
        self._mosaic_shape = None
        for image in (self.tsnr_image, self.mean_image, self.t_image):
            image.set_data(np.full((2, 2), np.nan, np.float32))
        self.roi_image.set_data(np.zeros((2, 2, 4), np.float32))
        if shape and len(shape) == 3:
            self._set_mosaic_shape(tuple(int(s) for s in shape))
        self._generation = state.generation
        self._needs_full = True

    def _set_mosaic_shape(self, shape: tuple[int, ...]) -> None:
        self._mosaic_shape = shape
        self._slices = mosaic_slices(shape[2], self.n_slices)
        blank = mosaic(np.zeros(shape, np.float32), self._slices)
        extent = (-0.5, blank.shape[1] - 0.5, blank.shape[0] - 0.5, -0.5)
        for image in (self.tsnr_image, self.mean_image, self.t_image, self.roi_image):
            image.set_extent(extent)
        for ax in (self.ax_tsnr, self.ax_act):
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
        self._needs_full = True

    # -- limits: grow only --

    def _grow_y(self, ax: Axes, key: str, *arrays: np.ndarray) -> None:
        found = _finite_range(*arrays)
        if found is None:
            return
        low, high = found
        floor = MIN_RANGE.get(key)
        if floor is not None:
            low, high = min(low, floor[0]), max(high, floor[1])
        cur_low, cur_high = ax.get_ylim()
        if low >= cur_low and high <= cur_high and not (key == "gs" and cur_high == 1
                                                         and cur_low == 0):
            return
        span = max(high - low, 1e-6)
        if key == "gs" and cur_high == 1 and cur_low == 0:  # first values: fit them
            ax.set_ylim(low - 0.5 * span - 1e-3 * abs(low), high + 0.5 * span + 1e-3 * abs(high))
        elif key in ("fd", "dvars"):  # non-negative: keep 0 at the bottom
            ax.set_ylim(0.0, max(cur_high, high + 0.25 * span))
        else:
            ax.set_ylim(min(cur_low, low - 0.25 * span), max(cur_high, high + 0.25 * span))
        self._needs_full = True

    def _grow_x(self, state: DisplayState) -> None:
        if state.n and int(state.indices.max()) >= self._xmax:
            self._xmax = int(2 * (int(state.indices.max()) + 1))
            self.ax_trans.set_xlim(-0.5, self._xmax - 0.5)
            self._needs_full = True

    # -- panels --

    def _update_motion(self, state: DisplayState) -> None:
        x = state.indices
        motion = state.motion
        trans = state.slice_trans if self.cord is not None else None
        if trans is not None:  # spinal cord mode: the mean over slices of Tx and Ty
            motion = np.full((state.n, 6), np.nan)
            counts = np.isfinite(trans).sum(axis=1)
            sums = np.nansum(trans, axis=1)
            motion[:, :2] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        for j, line in enumerate(self.trans_lines):
            line.set_data(x, motion[:, j])
        rot = np.degrees(motion[:, 3:])
        for j, line in enumerate(self.rot_lines):
            line.set_data(x, rot[:, j])
        self._grow_y(self.ax_trans, "trans", motion[:, :3])
        self._grow_y(self.ax_rot, "rot", rot)

    def _update_fd(self, state: DisplayState) -> None:
        x = state.indices
        fd = state.scalar("framewise_displacement")
        self.fd_line.set_data(x, fd)
        thresholds = [float(t) for t in state.fd_thresholds]
        for j, line in enumerate(self.fd_thresholds):
            y = thresholds[j] if j < len(thresholds) else np.nan
            line.set_ydata([y, y])
        spikes = state.spike_indices()
        self.spike_markers.set_data(spikes, np.full(spikes.size, 0.93))
        self.dvars_spikes.set_data(spikes, np.full(spikes.size, 0.9))
        alerts = state.alert_indices()
        for level, line in self.alert_markers.items():
            xs = [i for i, lv in alerts if lv == level]
            line.set_data(xs, [0.5] * len(xs))
        self._grow_y(self.ax_fd, "fd", fd, np.asarray(thresholds[:3]) * 1.2)

    def _update_dvars(self, state: DisplayState) -> None:
        x = state.indices
        dvars = state.scalar("std_dvars")
        gs = state.scalar("global_signal")
        self.dvars_line.set_data(x, dvars)
        self.gs_line.set_data(x, gs)
        self._grow_y(self.ax_dvars, "dvars", dvars)
        self._grow_y(self.ax_gs, "gs", gs)

    def _update_carpet(self, state: DisplayState) -> None:
        image = state.carpet_image()
        if image is None:
            self.carpet.set_data(np.full((2, 2), np.nan, np.float32))
            self.carpet.set_extent((-0.5, self._xmax - 0.5, 1.5, -0.5))
            self.carpet_note.set_text("n/a (no carpet samples in the messages)"
                                      if state.n else "")
            return
        self.carpet_note.set_text("")
        # At most CARPET_ROWS rows are drawn (every step-th sampled voxel): the panel is
        # about 110 pixels tall, so more rows would only cost resampling time.
        image = image[::self.carpet_step(image.shape[0])]
        k = image.shape[0]
        # Columns by volume index (a missing volume leaves a blank column).
        full = np.full((k, self._xmax), np.nan, np.float32)
        full[:, state.indices] = image
        self.carpet.set_data(full)
        extent = (-0.5, self._xmax - 0.5, k - 0.5, -0.5)
        if tuple(self.carpet.get_extent()) != extent:
            self.carpet.set_extent(extent)
            self.ax_carpet.set_ylim(k - 0.5, -0.5)
            self._needs_full = True

    @staticmethod
    def carpet_step(k: int) -> int:
        """Row step of the drawn carpet for ``k`` sampled voxels."""
        return max(1, -(-k // CARPET_ROWS))

    def _update_roi(self, state: DisplayState) -> None:
        name = state.roi_name()
        if name is None:
            self.roi_line.set_data([], [])
            self.roi_note.set_text("n/a (no ROI configured)" if state.n else "")
            return
        values = state.roi[name]
        self.roi_line.set_data(state.indices, values)
        fb = state.scalar("feedback")
        last = fb[np.isfinite(fb)]
        activation = state.activation_text()
        self.roi_note.set_text(f"ROI {name}" + (f"   feedback {last[-1]:+.2f}" if last.size else "")
                               + (f"   {activation}" if activation else ""))
        self._grow_y(self.ax_roi, "roi", values)

    def _update_maps(self, state: DisplayState) -> None:
        shape = None
        for entry in state.maps.values():
            shape = entry.data.shape
            break
        if shape is None:
            self.tsnr_note.set_text("tSNR n/a")
            self.act_note.set_text("no maps yet")
            return
        if self._mosaic_shape != tuple(shape):
            self._set_mosaic_shape(tuple(shape))
        slices = self._slices
        tsnr = state.maps.get("tsnr")
        if tsnr is not None:
            m = mosaic(tsnr.data, slices)
            finite = m[np.isfinite(m) & (m > 0)]
            vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
            self.tsnr_image.set_data(m)
            self.tsnr_image.set_clim(0, max(vmax, 1e-6))
            median = state.last.get("tsnr")
            self.tsnr_note.set_text(f"tSNR (vol {tsnr.index}), scale 0-{vmax:.0f}"
                                    + (f", median {float(median):.1f}" if median is not None
                                       else ""))
        else:
            self.tsnr_image.set_data(np.full((2, 2), np.nan, np.float32))
            self.tsnr_note.set_text("tSNR n/a (no tsnr map)")
        mean = state.maps.get("mean")
        if mean is not None:
            m = mosaic(mean.data, slices)
            finite = m[np.isfinite(m)]
            self.mean_image.set_data(m)
            if finite.size:
                self.mean_image.set_clim(float(np.percentile(finite, 1)),
                                         float(np.percentile(finite, 99.5)))
        name = state.activation_name()
        notes = []
        if name is not None:
            t = mosaic(state.maps[name].data, slices)
            shown = np.ma.masked_where(~(np.abs(np.nan_to_num(t)) >= self.t_threshold), np.abs(t))
            self.t_image.set_data(shown)
            peak = float(np.nanmax(np.abs(t))) if np.isfinite(t).any() else self.t_threshold
            self.t_image.set_clim(self.t_threshold, max(peak, self.t_threshold + 1))
            notes.append(f"{name} (vol {state.maps[name].index}), |t| >= {self.t_threshold:g}, "
                         f"peak {peak:.1f}")
        else:
            self.t_image.set_data(np.ma.masked_all((2, 2)))
            notes.append("activation n/a (no t map)")
        roi_maps = sorted(n for n in state.maps if n.startswith("roi:"))
        rgba = np.zeros((*mosaic(np.zeros(self._mosaic_shape or shape, np.float32),
                                 slices).shape, 4), np.float32)
        if roi_maps:
            edge = outline(mosaic(state.maps[roi_maps[0]].data, slices, fill=0) > 0.5)
            rgba[edge] = (0.0, 1.0, 1.0, 1.0)
            fit = state.mni_registration
            notes.append(f"outline: {roi_maps[0]}" + ("" if fit is None else
                         f" (MNI fit: template explains {float(fit['eta2']):.2f})"))
        self.roi_image.set_data(rgba)
        self.act_note.set_text("\n".join(notes))

    def _update_cord(self, state: DisplayState) -> None:
        if self.cord is not None and self.cord.update(state, self._xmax):
            self._needs_full = True

    def _update_usable(self, state: DisplayState) -> None:
        lines = state.usable_lines() or ["usable frames n/a"]
        norm = state.site_norm_line()
        self.usable_text.set_text("usable frames\n" + "\n".join(lines + ([norm] if norm else [])))
        crit = state.criterion()
        if crit is None:
            self.progress.set_width(0.0)
            self.progress_text.set_text("clean-data criterion n/a")
            return
        fraction = float(crit["fraction"])
        self.progress.set_width(min(max(fraction, 0.0), 1.0))
        self.progress.set_facecolor("tab:green" if crit.get("reached") else "tab:olive")
        eta = crit.get("eta_s")
        self.progress_text.set_text(
            f"{float(crit.get('minutes') or 0):.1f} of {float(crit.get('target_minutes') or 0):g}"
            f" min at FD <= {crit.get('threshold_mm')} mm ({100 * fraction:.0f} %)"
            + (", reached" if crit.get("reached") else
               f", ETA {float(eta) / 60:.1f} min" if eta is not None else ""))

    # -- drawing --

    def update(self, state: DisplayState, draw: bool = True) -> set[str]:
        """Bring the artists up to ``state``; draw (blit) if ``draw``.

        Returns the set of panels that were updated; ``state.dirty`` is cleared.
        """
        if state.generation != self._generation:
            self._start_series(state)
            state.dirty |= set(self._panel_artists) | {"design"}
        dirty = set(state.dirty)
        state.dirty.clear()
        self._grow_x(state)
        updaters = {"status": lambda s: self.status.set_text(s.status_line()),
                    "motion": self._update_motion, "fd": self._update_fd,
                    "dvars": self._update_dvars, "carpet": self._update_carpet,
                    "roi": self._update_roi, "maps": self._update_maps,
                    "usable": self._update_usable, "cord": self._update_cord}
        if self._needs_full:
            dirty |= set(updaters)
        for name, fn in updaters.items():
            if name in dirty:
                fn(state)
        if draw:
            self._draw(dirty)
        return dirty

    def _draw(self, dirty: set[str]) -> None:
        canvas = self.figure.canvas
        if not self.blit:
            canvas.draw_idle()
            self._needs_full = False
            return
        if self._needs_full or self._backgrounds is None:
            self.full_redraw()
            return
        for panel in dirty:
            for ax, artists in self._panel_artists.get(panel, []):
                canvas.restore_region(self._backgrounds[ax])
                for artist in artists:
                    ax.draw_artist(artist)
                canvas.blit(ax.bbox)

    def full_redraw(self) -> None:
        """Draw everything: background (without the animated artists), then the artists."""
        canvas = self.figure.canvas
        canvas.draw()
        if self.blit:
            self._backgrounds = {ax: canvas.copy_from_bbox(ax.bbox)
                                 for groups in self._panel_artists.values() for ax, _ in groups}
            for groups in self._panel_artists.values():
                for ax, artists in groups:
                    for artist in artists:
                        ax.draw_artist(artist)
            canvas.blit(self.figure.bbox)
        self._needs_full = False

    def _all_artists(self) -> list[Artist]:
        return [a for groups in self._panel_artists.values() for _, arts in groups for a in arts]

    def save_png(self, path: Any, dpi: int = 100) -> None:
        """Write the dashboard as it is now to a PNG file (animated artists included)."""
        artists = self._all_artists()
        for artist in artists:
            artist.set_animated(False)
        try:
            self.figure.savefig(path, dpi=dpi, facecolor="white")
        finally:
            for artist in artists:
                artist.set_animated(self.blit)
        self._needs_full = True  # the saved draw replaced the canvas' buffer

    def line_data(self) -> dict[str, Any]:
        """The drawn data, for tests: name -> (x, y) of each line."""
        out: dict[str, Any] = {}
        for name, line in (("trans_x", self.trans_lines[0]), ("trans_y", self.trans_lines[1]),
                           ("trans_z", self.trans_lines[2]), ("rot_x", self.rot_lines[0]),
                           ("rot_y", self.rot_lines[1]), ("rot_z", self.rot_lines[2]),
                           ("fd", self.fd_line), ("std_dvars", self.dvars_line),
                           ("global_signal", self.gs_line), ("roi", self.roi_line),
                           ("spikes", self.spike_markers)):
            out[name] = (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
        out["design"] = [np.asarray(line.get_ydata(), float) for line in self.design_lines]
        out["thresholds"] = [float(line.get_ydata()[0]) for line in self.fd_thresholds
                             if math.isfinite(float(line.get_ydata()[0]))]
        return out
