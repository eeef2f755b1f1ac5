"""The recursive GLM and its design matrix."""
