"""Multi-echo BOLD: per-echo series plus the T2*-weighted combination (Posse 1999).

Known answer: noise-free echoes S_n = S0 exp(-TE_n / T2*) from a known T2* map; the fit
must recover T2*, and the combination must equal a naive per-voxel reference (np.polyfit
of log S against TE, weights TE exp(-TE/T2*)). Through the service, a three-echo series
sent over C-STORE yields four series: the three echoes and their combination.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from rtsc.dicom.echoes import EchoCombiner, t2star_fit, t2star_weights
from rtsc.volume import SeriesInfo, Volume, series_id
from simulator.dicom_series import new_series_info
from simulator.dicom_writer import volume_to_mosaic
from simulator.phantom import Grid
from simulator.sender import send_series

TE_S = np.array([0.015, 0.035, 0.055])
SHAPE = (6, 5, 4)


def naive_combination(echo_means: np.ndarray, echoes_t: np.ndarray) -> np.ndarray:
    """Per voxel: polyfit log(mean) vs TE -> T2*, weights TE exp(-TE/T2*) normalised."""
    out = np.zeros(echoes_t.shape[1:])
    for idx in np.ndindex(*echoes_t.shape[1:]):
        slope = np.polyfit(TE_S, np.log(echo_means[(slice(None),) + idx]), 1)[0]
        t2s = np.clip(-1 / slope if slope < 0 else 0.5, 0.001, 0.5)
        w = TE_S * np.exp(-TE_S / t2s)
        out[idx] = (w / w.sum()) @ echoes_t[(slice(None),) + idx]
    return out


def test_t2star_fit_recovers_the_known_map(rng):
    t2s = rng.uniform(0.02, 0.08, size=SHAPE)
    s0 = rng.uniform(500, 2000, size=SHAPE)
    echoes = s0[None] * np.exp(-TE_S[:, None, None, None] / t2s[None])
    np.testing.assert_allclose(t2star_fit(echoes, TE_S), t2s, rtol=1e-9)
    w = t2star_weights(t2s, TE_S)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-6)


def _info(echo: int) -> SeriesInfo:
    return SeriesInfo(series=f"e{echo}", tr_s=2.0, n_expected=6, series_number=1,
                      description="me", source="mosaic", echo=echo,
                      echo_time_s=float(TE_S[echo - 1]), echo_group="g")


def test_combiner_equals_naive_reference_and_freezes_weights(rng):
    t2s = rng.uniform(0.02, 0.08, size=SHAPE)
    s0 = rng.uniform(500, 2000, size=SHAPE)
    combiner = EchoCombiner(n_echoes=3, t2star_volumes=3)
    all_echoes, out = [], []
    for t in range(6):
        bold = 1 + 0.02 * rng.standard_normal(SHAPE)  # signal change shared by the echoes
        echoes = (s0 * bold)[None] * np.exp(-TE_S[:, None, None, None] / t2s[None])
        echoes = echoes + rng.normal(0, 2.0, size=echoes.shape)
        all_echoes.append(echoes)
        for e in (2, 1, 3):  # any arrival order
            vol = Volume(np.asfortranarray(echoes[e - 1], dtype=np.float32), np.eye(4), t,
                         _info(e), None, time.time(), time.time())
            out += combiner.add(vol)
    assert [v.index for v in out] == list(range(6))
    assert {v.info.series for v in out} == {series_id("g/t2star")}
    assert all(v.info.echo is None for v in out)
    stack = np.array(all_echoes, dtype=np.float32).astype(np.float64)
    for t, v in enumerate(out):
        means = stack[:min(t + 1, 3)].mean(axis=0)  # weights frozen after 3 volumes
        np.testing.assert_allclose(v.data, naive_combination(means, stack[t]), rtol=2e-4)


def test_service_processes_each_echo_and_the_combination(service_factory, rng):
    service, collector = service_factory(session={"report": False},
                                         multi_echo={"combine": "t2star", "n_echoes": 3,
                                                     "t2star_volumes": 2})
    n, shape = 4, (16, 16, 8)
    affine = Grid(shape, (3.0, 3.0, 3.0)).affine()
    t2s = rng.uniform(0.03, 0.06, size=shape)
    s0 = rng.uniform(800, 2000, size=shape)
    infos = [new_series_info(6, 1.0, n_volumes=n, te_s=float(te), series_description="me_bold",
                             series_uid="1.2.826.0.1.3680043.8.498.77", start_time=time.time())
             for te in TE_S]
    data = np.empty((3, *shape, n), dtype=np.int16)
    volumes = []
    for t in range(n):
        bold = 1 + 0.01 * rng.standard_normal(shape)
        for e, info in enumerate(infos):
            data[e, ..., t] = np.round(s0 * bold * np.exp(-TE_S[e] / t2s))
            ds = volume_to_mosaic(data[e, ..., t], affine, info, t)
            ds.EchoNumbers = str(e + 1)
            volumes.append([ds])
    assert send_series(volumes, "127.0.0.1", service.receiver.port, speed=0).n_failed == 0
    uid = infos[0].series_uid
    ids = [series_id(uid), series_id(uid + "/echo2"), series_id(uid + "/echo3"),
           series_id(series_id(uid) + "/t2star")]
    deadline = time.time() + 60
    while len(collector.topic("series.end")) < 4 and time.time() < deadline:
        time.sleep(0.1)
    ends = {m.header["series"]: m.header for m in collector.topic("series.end")}
    assert set(ends) == set(ids)
    for e in range(3):
        img = nib.load(ends[ids[e]]["outputs"]["bold"])
        np.testing.assert_array_equal(np.asarray(img.dataobj), data[e])
    combined = np.asarray(nib.load(ends[ids[3]]["outputs"]["bold"]).dataobj, dtype=np.float64)
    stack = data.astype(np.float64)
    for t in range(n):
        means = stack[..., :min(t + 1, 2)].mean(axis=-1)
        np.testing.assert_allclose(combined[..., t], naive_combination(means, stack[..., t]),
                                   rtol=2e-4, atol=1e-2)
    start = [m.header for m in collector.topic("series.start") if m.header["series"] == ids[3]]
    assert start and start[0]["echo"] is None


def test_single_echo_series_is_not_hoarded(rng):
    combiner = EchoCombiner(n_echoes=3, t2star_volumes=3)
    for t in range(50):
        vol = Volume(np.zeros(SHAPE, dtype=np.float32, order="F"), np.eye(4), t, _info(1),
                     None, time.time(), time.time())
        assert combiner.add(vol) == []
    assert len(combiner._groups["g"].pending) <= 4
