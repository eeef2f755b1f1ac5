"""The files of one series: bold.nii(.gz), bold.json, confounds.tsv, maps and qc.json.

:class:`SeriesWriter` appends each volume and its confounds row as they come
(:mod:`rtsc.output.nifti`), and at the series end rewrites the confound columns the
pipeline only knows then, writes the final maps and qc.json (the summary).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np

from rtsc.conventions import MOTION_NAMES
from rtsc.messages import jsonable
from rtsc.output.durable import fsync_write, mkdir_durable
from rtsc.output.nifti import GrowingNifti, OutputFile
from rtsc.volume import Volume

log = logging.getLogger(__name__)


CONFOUND_COLUMNS = (*MOTION_NAMES, "framewise_displacement", "dvars", "std_dvars",
                    "global_signal")


def _rewrite_columns(path: Path, columns: dict[str, np.ndarray]) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    for name, values in columns.items():
        if name not in header or len(values) != len(rows):
            continue
        col = header.index(name)
        for row, value in zip(rows, values):
            row[col] = _tsv_value(float(value))
    fsync_write(path, ("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
                 .encode("utf-8"))


def _column_value(metrics: dict[str, Any], column: str) -> Any:
    """``metrics[column]``, or item k of the list ``metrics[<field>]`` for a column
    named ``<field>_<k>``."""
    if column in metrics:
        return metrics[column]
    name, _, k = column.rpartition("_")
    values = metrics.get(name)
    if k.isdigit() and isinstance(values, (list, tuple)) and int(k) < len(values):
        return values[int(k)]
    return None


def _tsv_value(value: Any) -> str:
    # np.floating too: np.float32 is not a float subclass, and its NaN printed as "nan"
    # instead of the BIDS "n/a" (and its values at full repr precision).
    if isinstance(value, np.floating):
        value = float(value)
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class SeriesWriter:
    """Writes one series' outputs as volumes arrive (runs on the pipeline worker).

    A volume goes into bold.nii, bold.nii.gz.part and confounds.tsv all together or not
    at all: if one write fails (a full disk), what was written of the volume is cut off
    again, the volume is listed in :attr:`not_written` and the error raised; the next
    volume is tried as usual, so writing resumes by itself once there is space. The
    outputs are then readable and agree with each other at every moment: bold.nii's
    header counts :attr:`n_written` volumes and confounds.tsv has as many rows.

    Parameters
    ----------
    directory : Path
        The series directory from :class:`SessionStore`.
    first : Volume
        The first volume: fixes matrix, affine and stored dtype.
    extra_columns : sequence of str
        confounds.tsv columns after the common ones. A name ``<field>_<k>`` whose
        ``<field>`` is a list in the metrics takes its k-th item (per-slice values).

    Attributes
    ----------
    n_written : int
        Volumes in bold.nii (and rows in confounds.tsv).
    not_written : list of int
        Indices of the volumes that could not be written.
    """

    def __init__(self, directory: Path, first: Volume,
                 extra_columns: Sequence[str] = ()) -> None:
        self.directory = directory
        self._first = first
        self._affine = first.affine
        dtype = first.stored_dtype if first.stored_dtype.kind in "iu" else np.dtype(np.float32)
        self._exact_dtype = dtype
        self._columns = (*CONFOUND_COLUMNS, *extra_columns)
        self._bold: GrowingNifti | None = None
        self._confounds: OutputFile | None = None
        self.outputs: dict[str, str] = {"dicom": str(directory / "dicom")}
        self._sidecar: dict[str, Any] | None = None
        self.n_written = 0
        self.not_written: list[int] = []
        self._written_mask: list[bool] = []  # per volume given, in order: written or not
        try:
            self._open()
        except OSError as exc:  # the first append tries again and reports the error
            log.debug("cannot create the outputs of %s yet (%s)", directory, exc)

    def _open(self) -> None:
        """Create bold.nii (+ .gz.part) and confounds.tsv with its header line."""
        bold = GrowingNifti(self.directory / "bold.nii", self._first.shape, self._affine,
                            self._exact_dtype, self._first.info.tr_s)
        try:
            confounds = OutputFile(self.directory / "confounds.tsv")
            try:
                confounds.append(("\t".join(self._columns) + "\n").encode("utf-8"))
            except BaseException:
                confounds.remove()
                raise
        except BaseException:
            bold.discard()
            raise
        self._bold, self._confounds = bold, confounds

    def append(self, volume: Volume, metrics: dict[str, Any]) -> None:
        """Add the volume to bold.nii and its confounds row to confounds.tsv; (re)write
        bold.json when the volume brings a new sidecar (the first volume's, then the one
        the second volume's headers refined).

        Raises
        ------
        OSError
            The volume was not written (it is in none of the files); listed in
            :attr:`not_written`.
        """
        try:
            self._append(volume, metrics)
        except OSError:
            self.not_written.append(volume.index)
            self._written_mask.append(False)
            raise
        self.n_written += 1
        self._written_mask.append(True)

    def _append(self, volume: Volume, metrics: dict[str, Any]) -> None:
        if self._bold is None:
            self._open()
        assert self._bold is not None and self._confounds is not None
        sidecar = volume.info.sidecar
        if sidecar is not None and sidecar is not self._sidecar:
            fsync_write(self.directory / "bold.json",
                         (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))
            self._sidecar = sidecar  # only once written: a failed write is tried again
            self.outputs["sidecar"] = str(self.directory / "bold.json")
        data = volume.data
        if self._exact_dtype.kind in "iu":
            # Stored integers came through float32 exactly; cast back without loss.
            data = np.rint(data)
        row = ("\t".join(_tsv_value(_column_value(metrics, c)) for c in self._columns)
               + "\n").encode("utf-8")
        confounds = self._confounds
        rows_size = confounds.size
        try:
            # The row is written between the voxels and the header's new count: a failure
            # anywhere takes the voxels back out (GrowingNifti) and the row (here).
            self._bold.append(data, also=lambda: confounds.append(row))
        except BaseException:
            try:
                confounds.truncate(rows_size)
            except OSError as undo:
                log.error("%s: cannot take a failed row back out (%s)", confounds.path, undo)
            raise

    def _rewrite_confounds(self, columns: dict[str, np.ndarray]) -> None:
        _rewrite_columns(self.directory / "confounds.tsv", columns)

    def write_maps(self, maps: dict[str, np.ndarray]) -> None:
        """``maps/<name>.nii.gz`` for each (nx, ny, nz) map, in the first volume's grid.

        Map names come from rtsc's stages and the config (``t:<contrast>``); characters
        other than letters, digits, ``-`` and ``_`` become ``_`` in the file name. Each is
        written whole or not at all (``.part``, then renamed).

        Raises
        ------
        OSError
            From the first map that cannot be written; the maps before it are in place.
        """
        if not maps:
            return
        folder = self.directory / "maps"
        mkdir_durable(folder, exist_ok=True)
        for name, data in maps.items():
            safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:100] or "map"
            path = folder / f"{safe}.nii.gz"
            image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), self._affine)
            image.header.set_xyzt_units("mm")
            # nib.save(image, path) wrote in place: a full disk left a cut .nii.gz.
            fsync_write(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))
            self.outputs[f"map:{name}"] = str(path)

    def finish(self, summary: dict[str, Any],
               final_columns: dict[str, np.ndarray] | None = None,
               maps: dict[str, np.ndarray] | None = None,
               on_error: Callable[[str, OSError], None] | None = None) -> dict[str, str]:
        """Close everything, write the maps and qc.json; returns the output paths.

        ``final_columns`` (name -> one value per volume given to :meth:`append`) replace
        those confounds columns with values that are exact only for the whole series
        (e.g. std_dvars); the values of volumes not written are left out.

        Each output is tried even if one before it failed. An output that cannot be
        written (a full disk) is left out of the returned paths and reported to
        ``on_error(what, error)`` (default: a log line): the maps not written are
        absent, confounds.tsv keeps its per-volume values, bold.nii stays instead of
        bold.nii.gz (complete, and counting the volumes written), qc.json is absent.
        """
        def failed(what: str, exc: OSError) -> None:
            if on_error is not None:
                on_error(what, exc)
            else:
                log.error("%s: cannot write %s (%s)", self.directory, what, exc)

        try:
            self.write_maps(maps or {})
        except OSError as exc:
            failed("the maps", exc)
        if self._confounds is not None:
            self._confounds.close()
            if final_columns:
                keep = np.asarray(self._written_mask, dtype=bool)
                columns = {name: np.asarray(values)[keep] if len(values) == keep.size
                           else values for name, values in final_columns.items()}
                try:
                    self._rewrite_confounds(columns)
                except OSError as exc:
                    failed("confounds.tsv (final columns)", exc)
            self.outputs["confounds"] = str(self.directory / "confounds.tsv")
        if self._bold is not None:
            try:
                self.outputs["bold"] = str(self._bold.finish())
            except OSError as exc:
                self.outputs["bold"] = str(self._bold.path)
                failed("bold.nii.gz (bold.nii kept)", exc)
        qc_path = self.directory / "qc.json"
        try:
            fsync_write(qc_path, json.dumps(jsonable(summary), indent=2).encode("utf-8"))
            self.outputs["qc"] = str(qc_path)
        except OSError as exc:
            failed("qc.json", exc)
        return dict(self.outputs)
