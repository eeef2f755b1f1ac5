"""Where a simulated run goes: paced files or C-STORE, its ground truth's volumes, a summary.

Shared by the brain run (:mod:`simulator.scanner`) and the spinal cord run
(:mod:`simulator.cord_run`): :func:`deliver` writes the volumes' DICOM datasets to a
directory or sends them over C-STORE at the TR pace (with the configured delays and
dropped volumes), :class:`TruthWriter` stores the volumes of the ground truth as they
are produced, and :class:`SimulationResult` says what came out.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from rtsc.config import SimulatorConfig
from simulator.dicom_series import SeriesInfo
from simulator.dicom_writer import write_dataset
from simulator.sender import send_series

__all__ = ["SimulationResult", "TruthWriter", "write_events", "deliver"]


@dataclass
class SimulationResult:
    """What a simulation produced.

    Attributes
    ----------
    n_volumes : int
    n_files : int
        DICOM datasets written or sent.
    truth_dir : Path
    dicom_dir : Path or None
        Where files were written (``--out``).
    sent : bool
    series_uid : str
    seconds : float
        Wall time of the whole run.
    failures : int
        C-STORE failures (0 when all were accepted).
    """

    n_volumes: int
    n_files: int
    truth_dir: Path
    dicom_dir: Path | None
    sent: bool
    series_uid: str
    seconds: float
    failures: int = 0
    files: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the CLI."""
        where = (f"sent over C-STORE ({self.failures} failures)" if self.sent
                 else f"written to {self.dicom_dir}")
        return (f"simulated {self.n_volumes} volumes, {self.n_files} DICOM files {where} in "
                f"{self.seconds:.1f} s; ground truth in {self.truth_dir}")


def write_events(events: list, path: Path) -> None:
    """A BIDS events.tsv (onset and duration in seconds, trial_type)."""
    rows = ["onset\tduration\ttrial_type"]
    rows += [f"{o:.9g}\t{dur:.9g}\t{tt}" for o, dur, tt in events]
    Path(path).write_text("\n".join(rows) + "\n")


class TruthWriter:
    """Saves the ground truth of a run as volumes are produced.

    ``bold_float.npy`` (signal + noise before quantisation, float32) and
    ``bold_quantised.npy`` (the DICOM pixel values, int16), each (nx, ny, nz, nt), are
    memory maps filled by :meth:`add`; a subclass writes the run's static truth
    (:meth:`_write_static`, called once at the start).

    Parameters
    ----------
    directory : Path
    plan : the run's plan (a :class:`~simulator.bold.RunPlan` or
        :class:`~simulator.cord.CordPlan`: its ``grid`` and ``n_volumes``)
    info : SeriesInfo, the series' DICOM identity (UIDs, start time)
    fmt : str, the DICOM format written (``mosaic``, ``slices``, ``multiframe``)
    vendor : str
    """

    def __init__(self, directory: Path, plan: Any, info: SeriesInfo, fmt: str,
                 vendor: str = "siemens") -> None:
        self.directory = directory
        self.vendor = vendor
        directory.mkdir(parents=True, exist_ok=True)
        shape = (*plan.grid.shape, plan.n_volumes)
        self.float_data = np.lib.format.open_memmap(directory / "bold_float.npy", mode="w+",
                                                    dtype=np.float32, shape=shape)
        self.quantised = np.lib.format.open_memmap(directory / "bold_quantised.npy", mode="w+",
                                                   dtype=np.int16, shape=shape)
        self._write_static(plan, info, fmt)

    def _write_static(self, plan: Any, info: SeriesInfo, fmt: str) -> None:
        """Write the run's static truth into :attr:`directory`."""
        raise NotImplementedError

    def add(self, index: int, data: np.ndarray, quantised: np.ndarray) -> None:
        """Store volume ``index`` (before and after quantisation)."""
        self.float_data[..., index] = data
        self.quantised[..., index] = quantised

    def close(self) -> None:
        """Flush the memory maps."""
        self.float_data.flush()
        self.quantised.flush()


def deliver(stream: Iterator[list[Dataset]], config: SimulatorConfig, tr_s: float,
            send_to: tuple[str, int] | None, called_ae: str, dicom_dir: Path | None,
            ) -> tuple[int, int, list[Path]]:
    """Send the volumes' datasets over C-STORE to ``send_to`` (at ``tr_s / speed``, with the
    configured delays and drops), or write them to ``dicom_dir`` at the same pace.

    Returns (datasets sent or written, C-STORE failures, files written).
    """
    if send_to is not None:
        report = send_series(stream, send_to[0], send_to[1], called_ae=called_ae,
                             calling_ae=config.calling_ae, tr_s=tr_s, speed=config.speed,
                             delays_s=config.delays_s, drop=config.drop_volumes)
        return report.n_sent, report.n_failed, []
    assert dicom_dir is not None
    files = _write_paced(stream, dicom_dir, tr_s, config.speed, set(config.drop_volumes))
    return len(files), 0, files


def _write_paced(stream: Iterator[list[Dataset]], directory: Path, tr_s: float,
                 speed: float, drop: Collection[int] = ()) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    written = []
    for index, volume in enumerate(stream):
        if index in drop:
            continue
        if speed > 0:
            delay = start + index * tr_s / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        for k, ds in enumerate(volume):
            path = directory / (f"vol{index:05d}.dcm" if len(volume) == 1
                                else f"vol{index:05d}_sl{k:03d}.dcm")
            write_dataset(ds, path)
            written.append(path)
    return written
