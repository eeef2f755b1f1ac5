"""Outputs of a run: the ZeroMQ publisher, the snapshot service and the session
folder (archive, NIfTI, confounds, qc.json)."""
