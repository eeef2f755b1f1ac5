"""Regions of interest and the neurofeedback value."""
