"""Motion: rigid and slice-wise registration, their kernels and stages."""
