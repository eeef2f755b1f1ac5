"""Recorded message streams for the display tests: a real simulated run over C-STORE, and
the same stream with the QC stage's fields (issue 5) added, computed offline."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtsc.messages import Message, encode, decode, map_message
from rtsc.service.run import RunService
from simulator.output import write_events
from simulator.scanner import make_plan, run_simulation

from conftest import Collector, make_config


def record_run(tmp_path: Path, n_volumes: int = 24, shape: tuple[int, int, int] = (64, 64, 36),
               task: bool = True, **sections: Any) -> tuple[list[Message], Path, RunService]:
    """Simulate a run, send it to a real RunService, return every published message
    (in order), the simulator's truth folder and the (stopped) service."""
    sim = {"n_volumes": n_volumes, "shape": list(shape), "n_jumps": 2}
    config = make_config(tmp_path, simulator=sim)
    extra: dict[str, Any] = {"publish": {"endpoint": "tcp://127.0.0.1:*",
                                         "snapshot_endpoint": "tcp://127.0.0.1:*",
                                         "map_every": 5}}
    if task:
        plan = make_plan(config.simulator)
        events = tmp_path / "events.tsv"
        write_events(plan.events, events)
        extra["glm"] = {"events": str(events), "contrasts": {"task": "task"},
                        "roi": {"target": {"center_ras_mm":
                                           plan.phantom.activation_center_ras.tolist(),
                                           "radius_mm": 6.0}}}
    # report.html on: the report tests read the one this run's service wrote.
    extra["session"] = {"report": True}
    extra.update(sections)
    config = make_config(tmp_path, simulator=sim, **extra)
    service = RunService(config)
    service.start()
    collector = Collector(service.publisher.endpoint)
    time.sleep(0.3)
    truth = tmp_path / "truth"
    try:
        result = run_simulation(config.simulator, send_to=("127.0.0.1", service.receiver.port),
                                truth_dir=truth)
        assert result.failures == 0
        assert collector.ended.wait(60), "no series.end"
    finally:
        collector.close()
        service.stop()
    return list(collector.messages), truth, service


def _roundtrip(message: Message, series: str) -> Message:
    return decode(encode(Message(message.topic, dict(message.header), list(message.arrays)),
                         series))


def with_qc_fields(messages: list[Message], truth: Path, target_minutes: float = 0.5
                   ) -> list[Message]:
    """The stream as it looks with the QC stage: per-volume ``tsnr``, ``clean_minutes``,
    ``criterion``, ``slice_spikes`` (volume 5: slices [3, 4]; every 7th: a ``spike`` flag),
    ``tsnr`` maps (offline numpy tSNR of the simulator's volumes so far) next to each
    ``mean`` map, and ``verdict`` in the series end."""
    bold = np.load(truth / "bold_quantised.npy").astype(np.float64)
    out: list[Message] = []
    start = next(m for m in messages if m.topic == "series.start").header
    tr = float(start["tr_s"])
    fd_ok = 0
    for m in messages:
        m = Message(m.topic, copy.deepcopy(m.header), list(m.arrays))
        series = m.header["series"]
        if m.topic == "volume":
            i = int(m.header["index"])
            fd = m.header.get("framewise_displacement")
            fd_ok += int(fd is not None and fd <= 0.2)
            minutes = fd_ok * tr / 60
            m.header["tsnr"] = 40.0 + i
            m.header["clean_minutes"] = {"0.2": minutes, "0.3": minutes, "0.4": minutes}
            m.header["criterion"] = {"threshold_mm": 0.2, "target_minutes": target_minutes,
                                     "minutes": minutes, "fraction": minutes / target_minutes,
                                     "eta_s": max(target_minutes - minutes, 0) * 60,
                                     "reached": minutes >= target_minutes}
            m.header["slice_spikes"] = [3, 4] if i == 5 else []
            if i % 7 == 6:
                m.header["flags"] = list(m.header["flags"]) + ["spike"]
        if m.topic == "map" and m.header["name"] == "mean":
            n = int(m.header["index"]) + 1
            window = bold[..., :n]
            std = window.std(axis=-1)
            tsnr = np.divide(window.mean(axis=-1), std, out=np.zeros_like(std), where=std > 0)
            out.append(_roundtrip(map_message("tsnr", np.asarray(m.header["affine"]),
                                              tsnr.astype(np.float32), n - 1), series))
        if m.topic == "series.end":
            m.header["summary"] = dict(m.header["summary"], verdict="warn",
                                       verdict_reasons=["test: injected"])
        out.append(_roundtrip(m, series))
    return out


QC_FIELDS = ("tsnr", "tsnr_detrended", "slice_tsnr", "snr", "slice_spikes", "clean_minutes",
             "session_clean_minutes", "projected_minutes", "criterion")


def without_qc_fields(messages: list[Message]) -> list[Message]:
    """The stream as a run with ``qc.enabled: false`` publishes it: no QC header fields,
    no ``tsnr`` maps, no verdict at the series end."""
    out: list[Message] = []
    for m in messages:
        if m.topic == "map" and m.header["name"].startswith("tsnr"):
            continue
        header = {k: v for k, v in copy.deepcopy(m.header).items() if k not in QC_FIELDS}
        if m.topic == "series.end":
            header["summary"] = {k: v for k, v in header["summary"].items()
                                 if not k.startswith("verdict")}
        out.append(_roundtrip(Message(m.topic, header, list(m.arrays)), m.header["series"]))
    return out


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory):
    """One recorded real run shared by the display and report tests:
    (messages, truth dir, stopped service)."""
    return record_run(tmp_path_factory.mktemp("display_run"), n_volumes=24)
