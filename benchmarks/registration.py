"""Registration benchmark: rtsc against SimpleITK and nipy (pyneal's call), speed and accuracy.

For each matrix (field of view 192 x 192 x 108 mm) the simulator makes one seeded run
with motion up to 3 mm / 3 degrees; every tool registers volumes 1..n-1 to volume 0,
each warm-started from its own previous estimate (as a real-time pipeline does), and
the estimates are compared with the simulator's ground truth.

Tools
-----
rtsc
    ``rtsc.pipeline.motion.register.RigidRegistration`` (inverse-compositional Gauss-Newton,
    sigma 1.2 voxel smoothing, at most ``motion.max_points`` (8,000) mask points, updates
    until one moves points less than 0.01 mm), numba on all its threads;
    and again with numba limited to 1 thread ("rtsc 1thr"): when another process keeps
    one of the 2 cores busy, numba's OpenMP threads wait on each other at every
    parallel region: in one such run the 2-thread figure was ~48 ms at every matrix
    (7-20x its quiet value) while 1 thread stayed at 3-14 ms.
SimpleITK
    ``ImageRegistrationMethod``: ``Euler3DTransform`` centred on the grid centre,
    MeanSquares, linear interpolator, RegularStepGradientDescent (learning rate 0.25,
    minimum step 1e-4, relaxation 0.7, at most 300 iterations, gradient tolerance
    1e-8), scales from physical shift, gradients by central differences on the fly (no
    gradient-image filters); given what rtsc has: both images smoothed by the same sigma
    (1.2 voxels, ``SmoothingRecursiveGaussian``; the reference once, each volume inside
    the timed call), rtsc's head mask as the fixed mask and REGULAR sampling of about
    the same number of mask points as rtsc; ``SetNumberOfThreads`` (default 2). Measured at
    64x64x36 while choosing these: minimum step 3e-4 or 1e-3 is 1.5-3x faster but the
    worst rotation error grows to 0.2-0.6 degrees; relaxation 0.5 takes ~1.7x the
    iterations for the same accuracy; without smoothing the worst rotation error
    doubles; all mask voxels instead of 40,000 change nothing but the time. Its
    accuracy is limited by where the minimum step stops it, so a second row, "SimpleITK
    fine", uses minimum step 3e-5 (median iterations ~40 instead of ~30, the worst
    ~200 instead of ~120); speed-ups are against the first.
nipy (pyneal)
    pyneal's motion engine verbatim: ``HistogramRegistration(current, reference,
    interp='tri').optimize(previous.copy(), ftol=0.1, maxfun=30)`` (Powell, nipy's
    default optimiser), stdout swallowed as pyneal does, a new registration object per
    volume. Skipped, with the reason, if nipy does not import.

Frames
------
Our motion ``M`` maps a reference head point to the same point in the current volume
(RAS+ mm). SimpleITK works in LPS: images are built with ``origin = F o``, ``direction =
F L / spacing`` from our RAS affine ``[L | o]``, ``F = diag(-1, -1, 1)``; with
fixed = reference and moving = current the transform it returns maps fixed points to
moving points, i.e. ``M`` in LPS, so ``M = F T F``. nipy's transform maps the `from`
image's world points (current) to the `to` image's (reference), so ``M = inv(T)``. The
conversions are checked first on a pure +2 mm superior translation and on a mixed
motion (x, y translations and rotations about all three axes, which a missing LPS flip
or an inverted transform would get wrong by about twice their size).

Timing: median per volume, warm (rtsc's ``warm_up()`` first; the first registered
volume's time is left out). Accuracy: median and max of the absolute parameter errors
over volumes and axes, and the worst displacement error of points on a 50 mm sphere
about the grid centre. The machine's load average is printed: other work on the
2 cores inflates every time, numba's parallel kernels most.

Usage: python benchmarks/registration.py [--volumes 20] [--seed 7] [--threads 2]
           [--matrices 64x64x36,96x96x60,128x128x72] [--no-nipy]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rtsc.config import MotionConfig  # noqa: E402
from rtsc.pipeline.motion._kernels import warm_up  # noqa: E402
from rtsc.conventions import rigid_matrix, rigid_params  # noqa: E402
from rtsc.pipeline.motion.register import RigidRegistration, registration_mask  # noqa: E402
from simulator.bold import simulate_run  # noqa: E402
from simulator.phantom import Grid  # noqa: E402
from sitk_reference import FLIP, sitk_image, sitk_to_ras  # noqa: E402

try:
    import nibabel as nib
    from nipy.algorithms.registration import HistogramRegistration, Rigid
    NIPY_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
    NIPY_ERROR = f"{type(exc).__name__}: {exc}"

FOV_MM = np.array([192.0, 192.0, 108.0])
MATRICES = ((64, 64, 36), (96, 96, 60), (128, 128, 72))
MOTION = dict(max_trans_mm=3.0, max_rot_deg=3.0, n_jumps=4, jump_mm=1.5)
SPHERE_RADIUS_MM = 50.0
#: Minimum step of the "SimpleITK fine" row.
FINE_MIN_STEP = 3e-5


# ---- conversions -------------------------------------------------------------------------

def as_euler(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """The Euler3DTransform inside what ``ImageRegistrationMethod.Execute`` returns."""
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0).Downcast()
    return sitk.Euler3DTransform(transform)


def nipy_to_ras(transform: Rigid) -> np.ndarray:
    """(4, 4) RAS reference -> current map of nipy's current -> reference transform."""
    return np.linalg.inv(transform.as_affine())


# ---- the tools ---------------------------------------------------------------------------

class Tool(Protocol):
    def register(self, volume: np.ndarray) -> np.ndarray:
        """(4, 4) RAS reference -> current estimate for ``volume``, warm-started."""
        ...


class RtscTool:
    """rtsc's registration, warm-started from its previous matrix as the motion stage is."""

    name = "rtsc"

    def __init__(self, reference: np.ndarray, affine: np.ndarray,
                 numba_threads: int | None = None) -> None:
        self.registration = RigidRegistration(reference, affine)
        self.matrix = np.eye(4)
        self.numba_threads = numba_threads
        self.iterations: list[int] = []

    def register(self, volume: np.ndarray) -> np.ndarray:
        before = numba.get_num_threads()
        if self.numba_threads is not None:
            numba.set_num_threads(self.numba_threads)
        try:
            result = self.registration.register(volume, self.matrix)
        finally:
            numba.set_num_threads(before)
        self.matrix = result.matrix
        self.iterations.append(result.iterations)
        return self.matrix


class SitkTool:
    """SimpleITK Euler3D / MeanSquares / RegularStepGradientDescent (settings: module doc)."""

    name = "SimpleITK"

    def __init__(self, reference: np.ndarray, affine: np.ndarray, threads: int = 2,
                 smooth_vox: float = 1.2, max_points: int = MotionConfig().max_points,
                 min_step: float = 1e-4) -> None:
        self.affine = affine
        self.sigma_mm = (smooth_vox * np.linalg.norm(affine[:3, :3], axis=0)).tolist()
        self.fixed = sitk.SmoothingRecursiveGaussian(sitk_image(reference, affine), self.sigma_mm)
        mask = registration_mask(np.asarray(reference, dtype=np.float32))
        method = sitk.ImageRegistrationMethod()
        method.SetNumberOfThreads(threads)
        method.SetMetricAsMeanSquares()
        method.SetMetricFixedMask(sitk_image(mask.astype(np.uint8), affine))
        method.SetMetricSamplingStrategy(method.REGULAR)
        method.SetMetricSamplingPercentage(min(1.0, max_points / int(mask.sum())), seed=1)
        method.SetMetricUseFixedImageGradientFilter(False)
        method.SetMetricUseMovingImageGradientFilter(False)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=0.25, minStep=min_step, numberOfIterations=300, relaxationFactor=0.7,
            gradientMagnitudeTolerance=1e-8)
        method.SetOptimizerScalesFromPhysicalShift()
        self.method = method
        shape = np.asarray(reference.shape, dtype=np.float64)
        center_ras = affine[:3, :3] @ ((shape - 1.0) / 2.0) + affine[:3, 3]
        self.transform = sitk.Euler3DTransform()
        self.transform.SetCenter((FLIP[:3, :3] @ center_ras).tolist())
        self.iterations: list[int] = []

    def register(self, volume: np.ndarray) -> np.ndarray:
        moving = sitk.SmoothingRecursiveGaussian(sitk_image(volume, self.affine), self.sigma_mm)
        self.method.SetInitialTransform(sitk.Euler3DTransform(self.transform), inPlace=False)
        self.transform = as_euler(self.method.Execute(self.fixed, moving))
        self.iterations.append(self.method.GetOptimizerIteration())
        return sitk_to_ras(self.transform)


class PynealTool:
    """nipy HistogramRegistration exactly as pyneal's motion processor calls it."""

    name = "nipy (pyneal)"

    def __init__(self, reference: np.ndarray, affine: np.ndarray,
                 optimize_kwargs: dict | None = None) -> None:
        self.affine = affine
        self.reference = nib.Nifti1Image(np.asarray(reference), affine)
        self.previous = Rigid(np.eye(4))
        self.kwargs = dict(ftol=0.1, maxfun=30) if optimize_kwargs is None else optimize_kwargs

    def register(self, volume: np.ndarray) -> np.ndarray:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy: maxfun exceeded
            reg = HistogramRegistration(nib.Nifti1Image(volume, self.affine), self.reference,
                                        interp="tri")
            self.previous = reg.optimize(self.previous.copy(), **self.kwargs)
        return nipy_to_ras(self.previous)


# ---- running and scoring -----------------------------------------------------------------

def sphere_points(center: np.ndarray, radius: float = SPHERE_RADIUS_MM, n: int = 2000) -> np.ndarray:
    """(n, 4) homogeneous points spread evenly over a sphere (Fibonacci lattice)."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = math.pi * (3.0 - math.sqrt(5.0)) * k
    r = np.sqrt(1.0 - z * z)
    xyz = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1) * radius + center
    return np.concatenate([xyz, np.ones((n, 1))], axis=1)


@dataclass
class Outcome:
    """One tool on one run: per-volume times (s) and estimates (volumes 1..n-1)."""

    tool: str
    matrix: str
    times: np.ndarray
    params: np.ndarray  # (n-1, 6) mm / radians
    errors: np.ndarray  # (n-1, 6) estimate - truth
    sphere_mm: np.ndarray  # (n-1,) worst displacement error on the sphere

    @property
    def ms(self) -> float:
        return 1e3 * float(np.median(self.times[1:] if len(self.times) > 1 else self.times))


def run_tool(tool: Tool, name: str, label: str, volumes: list[np.ndarray],
             motion: np.ndarray, center: np.ndarray) -> Outcome:
    """Register ``volumes[1:]`` in order, timing each call, and score against ``motion``."""
    times, params, errors, sphere = [], [], [], []
    points = sphere_points(center)
    for t in range(1, len(volumes)):
        start = time.perf_counter()
        matrix = tool.register(volumes[t])
        times.append(time.perf_counter() - start)
        p = rigid_params(matrix, center)
        params.append(p)
        errors.append(p - motion[t])
        truth = rigid_matrix(motion[t], center)
        sphere.append(float(np.linalg.norm((points @ (matrix - truth).T)[:, :3], axis=1).max()))
    return Outcome(name, label, np.array(times), np.array(params), np.array(errors),
                   np.array(sphere))


def simulate(shape: tuple[int, int, int], n_volumes: int, seed: int,
             motion: np.ndarray | None = None) -> tuple[Grid, np.ndarray, list[np.ndarray]]:
    """A run on a 192 x 192 x 108 mm grid: (grid, motion (n, 6), Fortran float32 volumes)."""
    grid = Grid(shape, tuple(FOV_MM / np.asarray(shape)))
    run = simulate_run(grid, n_volumes, 2.0, seed=seed, noise_sigma=10.0, motion=motion,
                       motion_kwargs=None if motion is not None else MOTION)
    volumes = [np.asfortranarray(run.data[..., t], dtype=np.float32) for t in range(n_volumes)]
    return grid, np.asarray(run.motion, dtype=np.float64), volumes


def make_tools(volumes: list[np.ndarray], affine: np.ndarray, threads: int,
               with_nipy: bool) -> list[tuple[str, Tool]]:
    tools: list[tuple[str, Tool]] = [
        (RtscTool.name, RtscTool(volumes[0], affine)),
        ("rtsc 1thr", RtscTool(volumes[0], affine, numba_threads=1)),
        (SitkTool.name, SitkTool(volumes[0], affine, threads=threads)),
        ("SimpleITK fine", SitkTool(volumes[0], affine, threads=threads, min_step=FINE_MIN_STEP)),
    ]
    if with_nipy:
        tools.append((PynealTool.name, PynealTool(volumes[0], affine)))
    return tools


# ---- checks and report -------------------------------------------------------------------

def verify_conversions(threads: int, with_nipy: bool) -> bool:
    """Known motions through every tool's conversion; prints a table, True if all agree.

    Volume 1: +2 mm superior only. Volume 2: trans (1.5, -1.2, 0.8) mm, rot (1.5, -1.5,
    2.0) degrees. Tolerances: 0.2 mm / 0.2 degrees for rtsc and SimpleITK; nipy is run
    with its default optimiser settings (pyneal's 30 evaluations do not converge from
    identity, shown for information) and allowed 0.5 mm / 1 degree: a sign or direction
    error would be off by 1.6 mm / 3 degrees or more.
    """
    motion = np.zeros((3, 6))
    motion[1, 2] = 2.0
    motion[2] = [1.5, -1.2, 0.8, *np.radians([1.5, -1.5, 2.0])]
    grid, truth, volumes = simulate((64, 64, 36), 3, seed=3, motion=motion)
    affine, center = grid.affine(), grid.center_ras()
    checks: list[tuple[str, Tool, float, float]] = [
        ("rtsc", RtscTool(volumes[0], affine), 0.2, 0.2),
        ("SimpleITK", SitkTool(volumes[0], affine, threads=threads), 0.2, 0.2),
    ]
    if with_nipy:
        checks.append(("nipy (defaults)", PynealTool(volumes[0], affine, {}), 0.5, 1.0))
        checks.append(("nipy (pyneal)", PynealTool(volumes[0], affine), math.inf, math.inf))
    print("Conversion check (64x64x36, 3 mm): estimated trans (mm) / rot (deg)")
    print(f"  {'truth':18s}", *(_fmt_params(truth[t]) for t in (1, 2)))
    ok = True
    for name, tool, tol_mm, tol_deg in checks:
        estimates = [rigid_params(tool.register(volumes[t]), center) for t in (1, 2)]
        err = np.abs(np.array(estimates) - truth[1:])
        good = bool(err[:, :3].max() <= tol_mm and np.degrees(err[:, 3:]).max() <= tol_deg)
        ok &= good
        flag = "ok" if good else "FAILED"
        if math.isinf(tol_mm):
            flag = "(not converged from identity in 30 evaluations; information only)"
        print(f"  {name:18s}", *(_fmt_params(p) for p in estimates), flag)
    return ok


def _fmt_params(p: np.ndarray) -> str:
    t = " ".join(f"{v:+.2f}" for v in p[:3])
    r = " ".join(f"{v:+.2f}" for v in np.degrees(p[3:]))
    return f"[{t} | {r}]"


def print_table(outcomes: list[Outcome]) -> None:
    header = (f"{'tool':15s} {'matrix':11s} {'ms/vol':>8s} {'vs SITK':>8s} "
              f"{'trans err med/max mm':>21s} {'rot err med/max deg':>20s} {'sphere max mm':>14s}")
    print(header)
    print("-" * len(header))
    sitk_ms = {o.matrix: o.ms for o in outcomes if o.tool == SitkTool.name}
    for o in outcomes:
        e = np.abs(o.errors)
        rot = np.degrees(e[:, 3:])
        speed = sitk_ms.get(o.matrix, math.nan) / o.ms
        print(f"{o.tool:15s} {o.matrix:11s} {o.ms:8.1f} {speed:7.1f}x "
              f"{np.median(e[:, :3]):10.3f}/{e[:, :3].max():<10.3f} "
              f"{np.median(rot):9.3f}/{rot.max():<10.3f} {o.sphere_mm.max():14.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="SimpleITK threads")
    parser.add_argument("--matrices", default=",".join("x".join(map(str, m)) for m in MATRICES))
    parser.add_argument("--no-nipy", action="store_true")
    args = parser.parse_args(argv)
    matrices = [tuple(int(n) for n in m.split("x")) for m in args.matrices.split(",")]
    with_nipy = NIPY_ERROR is None and not args.no_nipy

    started = time.perf_counter()
    warm_up()
    print(f"numba {numba.__version__}: {numba.get_num_threads()} threads "
          f"(layer {numba.threading_layer()}); OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}; SimpleITK {sitk.Version.VersionString()}: "
          f"{args.threads} threads (global default "
          f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()})")
    if NIPY_ERROR is not None:
        print(f"nipy not available, its rows are skipped: {NIPY_ERROR}")
    else:
        import nipy
        print(f"nipy {nipy.__version__}" + (" (skipped: --no-nipy)" if args.no_nipy else ""))
    load = os.getloadavg()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load)}")
    if load[0] > 0.5:
        print("WARNING: other work is running; times (numba's 2-thread ones most) are inflated")
    print()
    if not verify_conversions(args.threads, with_nipy):
        print("conversion check failed: the table would not be trustworthy")
        return 1
    print()

    outcomes: list[Outcome] = []
    for shape in matrices:
        grid, motion, volumes = simulate(shape, args.volumes, args.seed)
        label = "x".join(map(str, shape))
        vox = "x".join(f"{v:g}" for v in grid.voxel_size_mm)
        print(f"{label} ({vox} mm), {args.volumes} volumes, max |trans| "
              f"{np.abs(motion[:, :3]).max():.2f} mm, max |rot| "
              f"{np.degrees(np.abs(motion[:, 3:])).max():.2f} deg", flush=True)
        for name, tool in make_tools(volumes, grid.affine(), args.threads, with_nipy):
            outcomes.append(run_tool(tool, name, label, volumes, motion, grid.center_ras()))
            if isinstance(tool, (SitkTool, RtscTool)):
                print(f"  {name}: iterations per volume median "
                      f"{np.median(tool.iterations):.0f}, max {max(tool.iterations)}", flush=True)
    print()
    print_table(outcomes)
    print()
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
