"""MNI registration benchmark: wall time of registering one EPI volume to the MNI152
template (rtsc/pipeline/roi/mni.py), the cost the first volume of a series with an ROI
in MNI space pays. Issue 19's target: < 2 s at 64 x 64 x 36.

Cases: the simulator's MNI head on 64 x 64 x 36 at 3 mm and on 128 x 128 x 72 at 1.5 mm,
and real EPI (dcm2niix's NIfTI of tests/data/realdata: Siemens 64 x 64 x 35 and 86 x 86 x
51). Each is registered ``--repeats`` times after one warm-up (the template and the
numba kernel load once per process: printed separately). Medians and max, s.

Usage: python benchmarks/mni_registration.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL = ROOT / "tests" / "data" / "realdata" / "dcm_qa_stc" / "Ref"


def cases():
    import nibabel as nib

    from simulator.bold import simulate_run
    from simulator.phantom import Grid
    from simulator.real_anatomy import mni152_anatomy

    for shape, voxel in (((64, 64, 36), (3.0, 3.0, 3.0)), ((128, 128, 72), (1.5, 1.5, 1.5))):
        grid = Grid(shape, voxel)
        run = simulate_run(grid, 1, 2.0, seed=1, phantom=mni152_anatomy(grid), psf_samples=1,
                           motion=np.zeros((1, 6)))
        yield f"simulated MNI head {shape}", run.data[..., 0], run.affine
    for name in ("Siemens_FMRI_AX_ASC_2", "Siemens_Rest_fMRI_AP_7"):
        image = nib.load(REAL / f"{name}.nii.gz")
        data = np.asarray(image.dataobj, dtype=np.float32)[..., 0]
        yield f"real {name} {data.shape}", data, image.affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    from rtsc.pipeline.roi import mni

    t0 = time.perf_counter()
    mni.load_template()
    print(f"template load (once per process): {time.perf_counter() - t0:.2f} s")
    for label, volume, affine in cases():
        t0 = time.perf_counter()
        mni.register_to_mni(volume, affine)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            reg = mni.register_to_mni(volume, affine)
            times.append(reg.seconds)
        print(f"{label}: median {np.median(times):.3f} s, max {max(times):.3f} s, first call "
              f"{first:.2f} s; eta2 {reg.eta2:.3f}")


if __name__ == "__main__":
    main()
