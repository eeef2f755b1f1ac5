"""The end-of-run report: one self-contained HTML file per series directory.

:func:`write_report` reads a series directory (``confounds.tsv``, ``qc.json``,
``maps/*.nii.gz``, ``bold.nii.gz``) and writes ``report.html``: motion, FD, DVARS and
global signal, tSNR and activation figures as base64-embedded PNGs, the usable-frame
table and the QC summary. No scripts, no external files: it opens in any browser
without rtsc installed. Figures are drawn on plain Agg canvases (no pyplot), so the
report can be made in any thread or process.

``python -m rtsc.output.report SESSION_DIR`` writes it (what the service starts in a
separate, low-priority process at series end; see :func:`start_report_process`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rtsc.conventions import MOTION_NAMES
from rtsc.output.slice_mosaic import mosaic, mosaic_slices, outline
from rtsc.pipeline.roi.criterion import activation_phrase
from rtsc.errors import RtscError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS_MM = (0.2, 0.3, 0.4)


class ReportError(RtscError):
    """A series directory without what the report needs."""


def read_confounds(path: Path) -> dict[str, np.ndarray]:
    """confounds.tsv -> column name -> (n,) float64 (BIDS ``n/a`` -> NaN)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ReportError(f"{path} is empty")
    names = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    out = {}
    for j, name in enumerate(names):
        values = []
        for row in rows:
            cell = row[j] if j < len(row) else "n/a"
            try:
                values.append(float(cell))
            except ValueError:
                values.append(math.nan)
        out[name] = np.asarray(values, dtype=np.float64)
    return out


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="white")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def thresholds_of(qc: dict[str, Any]) -> list[float]:
    """FD thresholds (mm) the run used: the keys of ``fd_num_by_threshold`` (or of
    ``usable_frames``), else 0.2/0.3/0.4."""
    by_threshold = qc.get("fd_num_by_threshold") or qc.get("usable_frames")
    keys = by_threshold.keys() if isinstance(by_threshold, dict) else ()
    found = sorted(float(k) for k in keys)
    return found or list(DEFAULT_THRESHOLDS_MM)


def usable_table(fd: np.ndarray, thresholds: Sequence[float], tr_s: float | None
                 ) -> list[dict[str, Any]]:
    """Per threshold: frames with FD <= threshold (the first frame, FD 0, counts), their
    percentage and minutes (frames x TR)."""
    n = int(fd.size)
    rows = []
    for t in thresholds:
        usable = int(np.sum(np.nan_to_num(fd, nan=np.inf) <= t))
        rows.append({"threshold_mm": float(t), "frames": usable, "of": n,
                     "percent": 100.0 * usable / n if n else None,
                     "minutes": usable * tr_s / 60.0 if tr_s else None})
    return rows


def plot_motion(conf: dict[str, np.ndarray]) -> str:
    fig = _figure(10, 4.2)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(conf["trans_x"]))
    for name, c in zip(MOTION_NAMES[:3], ("tab:red", "tab:green", "tab:blue")):
        ax1.plot(x, conf[name], color=c, label=name)
        ax2.plot(x, np.degrees(conf["rot" + name[5:]]), color=c, label="rot" + name[5:])
    ax1.set_ylabel("translation (mm)")
    ax2.set_ylabel("rotation (deg)")
    ax2.set_xlabel("volume")
    for ax in (ax1, ax2):
        ax.legend(loc="upper left", ncol=3, fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_fd(conf: dict[str, np.ndarray], thresholds: Sequence[float]) -> str:
    fig = _figure(10, 2.6)
    ax = fig.subplots()
    fd = conf["framewise_displacement"]
    ax.plot(np.arange(fd.size), fd, color="black", lw=1.2, label="FD")
    for t, c in zip(thresholds, ("tab:green", "orange", "tab:red", "purple")):
        ax.axhline(t, color=c, ls="--", lw=0.9, label=f"{t:g} mm")
    ax.set_ylabel("FD (mm)")
    ax.set_xlabel("volume")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, ncol=4, frameon=False)
    fig.tight_layout()
    return _png(fig)


def plot_dvars(conf: dict[str, np.ndarray]) -> str:
    fig = _figure(10, 3.6)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    x = np.arange(conf["std_dvars"].size)
    ax1.plot(x, conf["std_dvars"], color="tab:purple")
    ax1.set_ylabel("std DVARS")
    ax2.plot(x, conf["global_signal"], color="tab:brown")
    ax2.set_ylabel("global signal")
    ax2.set_xlabel("volume")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def offline_tsnr(bold_path: Path) -> np.ndarray:
    """Voxel tSNR (temporal mean / temporal standard deviation) of bold.nii.gz, computed
    slab by slab in float64; 0 where the standard deviation is 0. (nx, ny, nz) float32."""
    import nibabel as nib

    data = np.asanyarray(nib.load(bold_path).dataobj)
    out = np.zeros(data.shape[:3], dtype=np.float32)
    for k in range(data.shape[2]):
        slab = data[:, :, k, :].astype(np.float64)
        std = slab.std(axis=-1)
        out[:, :, k] = np.divide(slab.mean(axis=-1), std, out=np.zeros_like(std), where=std > 0)
    return out


def plot_map(image: np.ndarray, title: str, cmap: str = "viridis") -> str:
    slices = mosaic_slices(image.shape[2], 12)
    m = mosaic(image, slices)
    finite = m[np.isfinite(m) & (m > 0)]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    fig = _figure(8, 5.2)
    ax = fig.subplots()
    shown = ax.imshow(m, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(shown, ax=ax, fraction=0.03)
    fig.tight_layout()
    return _png(fig)


def plot_activation(t_map: np.ndarray, mean: np.ndarray | None, roi: np.ndarray | None,
                    threshold: float, title: str) -> str:
    slices = mosaic_slices(t_map.shape[2], 12)
    fig = _figure(8, 5.2)
    ax = fig.subplots()
    if mean is not None:
        mm = mosaic(mean, slices)
        finite = mm[np.isfinite(mm)]
        ax.imshow(mm, cmap="gray", vmin=float(np.percentile(finite, 1)) if finite.size else 0,
                  vmax=float(np.percentile(finite, 99.5)) if finite.size else 1,
                  interpolation="nearest")
    t = mosaic(t_map, slices)
    peak = float(np.nanmax(np.abs(t))) if np.isfinite(t).any() else threshold + 1
    shown = ax.imshow(np.ma.masked_where(~(np.abs(np.nan_to_num(t)) >= threshold), np.abs(t)),
                      cmap="hot", vmin=threshold, vmax=max(peak, threshold + 1),
                      interpolation="nearest")
    if roi is not None:
        edge = outline(mosaic(roi, slices, fill=0) > 0.5)
        rgba = np.zeros((*edge.shape, 4), np.float32)
        rgba[edge] = (0, 1, 1, 1)
        ax.imshow(rgba, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(shown, ax=ax, fraction=0.03, label="|t|")
    fig.tight_layout()
    return _png(fig)


def _load_map(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        if not value:
            out.append((prefix, "{}"))
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, float):
        out.append((prefix, f"{value:.4g}"))
    elif isinstance(value, list) and len(value) > 20:
        out.append((prefix, f"{len(value)} items: " + ", ".join(map(str, value[:20])) + ", ..."))
    else:
        out.append((prefix, json.dumps(value) if not isinstance(value, str) else value))


CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}th{background:#eee}img{max-width:100%;display:block;margin:.5em 0}
.pass{color:#0a0;font-weight:bold}.warn{color:#c80;font-weight:bold}.fail{color:#c00;
font-weight:bold}.note{color:#666;font-size:.9em}"""


def site_norm_table(qc: dict[str, Any]) -> list[str]:
    """The "Site norm" section: each QC figure and its percentile among the earlier
    series of the protocol (qc.json ``site_percentiles``), or nothing without them."""
    ranks = qc.get("site_percentiles")
    if not isinstance(ranks, dict):
        return []
    n = qc.get("n_volumes") or 0
    threshold = qc.get("fd_threshold_mm")
    usable = None if threshold is None else \
        (qc.get("usable_frames") or {}).get(f"{float(threshold):g}")
    values = {"tsnr": qc.get("tsnr"), "snr": qc.get("snr_background"),
              "fd_mean": qc.get("fd_mean"), "dvars_std": qc.get("dvars_std"),
              "usable_fraction": usable / n if usable is not None and n else None}
    rows = ["<h2>Site norm</h2><p class='note'>Percentile among the earlier series of the "
            f"same protocol (fingerprint {html.escape(str(qc.get('protocol_fingerprint')))}"
            "); n/a before history.min_series of them.</p><table><tr><th>figure</th>"
            "<th>value</th><th>site percentile</th></tr>"]
    for key in ("tsnr", "snr", "fd_mean", "usable_fraction", "dvars_std"):
        value, rank = values.get(key), ranks.get(key)
        rows.append(f"<tr><td>{key}</td><td>{'n/a' if value is None else f'{value:.3g}'}"
                    f"</td><td>{'n/a' if rank is None else f'{rank:.1f}'}</td></tr>")
    rows.append("</table>")
    return rows


def build_report(series_dir: Path, t_threshold: float = 3.1) -> str:
    """The HTML text of the report of ``series_dir`` (see the module notes).

    Raises
    ------
    ReportError
        Without confounds.tsv or qc.json.
    """
    series_dir = Path(series_dir)
    conf_path, qc_path = series_dir / "confounds.tsv", series_dir / "qc.json"
    for path in (conf_path, qc_path):
        if not path.exists():
            raise ReportError(f"{series_dir} is not a finished series directory: no {path.name}")
    conf = read_confounds(conf_path)
    qc = json.loads(qc_path.read_text(encoding="utf-8"))
    thresholds = thresholds_of(qc)
    tr_s = qc.get("tr_s")
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>rtsc report "
             f"{esc(series_dir.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>rtsc report: {esc(series_dir.name)}</h1>"]
    verdict = qc.get("verdict")
    parts.append("<p>" + (f"verdict: <span class='{esc(str(verdict))}'>{esc(str(verdict))}"
                          f"</span>" if verdict else "verdict: n/a (no QC verdict in qc.json)")
                 + (" &mdash; " + esc("; ".join(map(str, qc.get("verdict_reasons") or [])))
                    if qc.get("verdict_reasons") else "") + "</p>")
    parts.append(f"<p>{qc.get('n_volumes')} volumes (expected {qc.get('n_expected')}), "
                 f"TR {tr_s} s, matrix {esc(str(qc.get('shape')))}, voxels "
                 f"{esc(str(qc.get('voxel_size_mm')))} mm; written "
                 f"{esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>")

    def figure(title: str, png: str, note: str = "") -> None:
        parts.append(f"<h2>{esc(title)}</h2>" + (f"<p class='note'>{esc(note)}</p>" if note else "")
                     + f"<img alt='{esc(title)}' src='data:image/png;base64,{png}'>")

    if all(name in conf for name in MOTION_NAMES):
        figure("Motion", plot_motion(conf),
               "Head displacement from the reference volume (RAS+, mm and degrees).")
    if "framewise_displacement" in conf:
        fd = conf["framewise_displacement"]
        figure("Framewise displacement", plot_fd(conf, thresholds),
               "Power et al. 2012, 50 mm sphere.")
        rows = usable_table(fd, thresholds, tr_s)
        parts.append("<h2>Usable frames</h2><table><tr><th>FD threshold</th><th>frames</th>"
                     "<th>percent</th><th>minutes</th></tr>")
        for r in rows:
            percent = "n/a" if r["percent"] is None else f"{r['percent']:.1f} %"
            minutes = "n/a" if r["minutes"] is None else f"{r['minutes']:.2f}"
            parts.append(f"<tr><td>&le; {r['threshold_mm']:g} mm</td><td>{r['frames']} of "
                         f"{r['of']}</td><td>{percent}</td><td>{minutes}</td></tr>")
        parts.append("</table>")
    if "std_dvars" in conf and "global_signal" in conf:
        figure("DVARS and global signal", plot_dvars(conf))
    maps = series_dir / "maps"
    tsnr_path = maps / "tsnr.nii.gz"
    bold_path = series_dir / "bold.nii.gz"
    if tsnr_path.exists():
        figure("tSNR", plot_map(_load_map(tsnr_path), "tSNR (maps/tsnr.nii.gz)"))
    elif bold_path.exists():
        figure("tSNR", plot_map(offline_tsnr(bold_path), "tSNR of bold.nii.gz (as acquired)"),
               "No tSNR map from the QC stage: computed here from bold.nii.gz, not motion "
               "corrected.")
    t_maps = sorted(maps.glob("t_*.nii.gz")) if maps.is_dir() else []
    mean = _load_map(maps / "mean.nii.gz") if (maps / "mean.nii.gz").exists() else None
    roi_maps = sorted(maps.glob("roi_*.nii.gz")) if maps.is_dir() else []
    roi = _load_map(roi_maps[0]) if roi_maps else None
    for path in t_maps:
        name = path.name[2:-7]
        figure(f"Activation: {name}",
               plot_activation(_load_map(path), mean, roi, t_threshold,
                               f"t ({name}), |t| >= {t_threshold:g}, over the mean"
                               + (f"; ROI {roi_maps[0].name[4:-7]} outlined" if roi_maps else "")))
    if not t_maps:
        parts.append("<h2>Activation</h2><p class='note'>n/a: no GLM in this run.</p>")
    activation = activation_phrase(qc.get("activation_criterion"))
    if activation:
        parts.append(f"<p>Time to criterion (feedback ROI, at the run's end): "
                     f"{esc(activation)}.</p>")
    parts.extend(site_norm_table(qc))
    rows_qc: list[tuple[str, str]] = []
    _flatten("", qc, rows_qc)
    parts.append("<h2>QC summary (qc.json)</h2><table><tr><th>field</th><th>value</th></tr>")
    parts.extend(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows_qc)
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_report(series_dir: str | Path, out: str | Path | None = None,
                 t_threshold: float = 3.1) -> Path:
    """Write ``report.html`` (or ``out``) for a series directory; returns its path."""
    series_dir = Path(series_dir)
    path = Path(out) if out is not None else series_dir / "report.html"
    text = build_report(series_dir, t_threshold=t_threshold)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def start_report_process(series_dir: str | Path) -> "subprocess.Popen[bytes]":
    """Write the report in a separate, low-priority Python process (never in the
    pipeline's process: its CPU time and the GIL stay the pipeline's)."""
    def lower_priority() -> None:  # runs in the child before exec
        os.nice(10)

    return subprocess.Popen([sys.executable, "-m", "rtsc.output.report", str(series_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=lower_priority)


class ReportJobs:
    """Reports being written by background processes (the service's, at series end).

    :meth:`poll` never waits; failures come back as (series, message) for the caller to
    log and alert. Nothing here can raise into the data path.
    """

    def __init__(self) -> None:
        self._running: list[tuple[str, Path, "subprocess.Popen[bytes]"]] = []

    def __len__(self) -> int:
        return len(self._running)

    def start(self, series: str, series_dir: Path) -> str | None:
        """Start one; returns an error message if the process cannot even start."""
        try:
            self._running.append((series, Path(series_dir), start_report_process(series_dir)))
        except OSError as exc:
            return f"cannot start the report process for {series_dir}: {exc}"
        return None

    def poll(self, wait_s: float = 0.0) -> list[tuple[str, str]]:
        """Collect finished processes (waiting up to ``wait_s`` for all); returns the
        failures as (series, message)."""
        deadline = time.monotonic() + wait_s
        failures, still = [], []
        for series, directory, proc in self._running:
            try:
                rc = proc.wait(timeout=max(0.0, deadline - time.monotonic())) if wait_s \
                    else proc.poll()
            except subprocess.TimeoutExpired:
                rc = None
            if rc is None:
                still.append((series, directory, proc))
                continue
            stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
            if proc.stderr:
                proc.stderr.close()
            if rc != 0:
                tail = stderr.strip().splitlines()[-1:] or [f"exit code {rc}"]
                failures.append((series, f"report for {directory.name} failed: {tail[0]}"))
            else:
                log.info("report written: %s", directory / "report.html")
        self._running = still
        return failures


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rtsc.output.report",
                                     description="write report.html for a series directory")
    parser.add_argument("series_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        path = write_report(args.series_dir, args.out)
    except (RtscError, OSError, ValueError) as exc:
        print(f"rtsc report: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
