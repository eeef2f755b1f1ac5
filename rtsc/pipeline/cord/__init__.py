"""Spinal cord mode: cord mask, cord QC and the slice-wise GLM."""
