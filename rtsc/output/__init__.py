"""Outputs of a run: the ZeroMQ publisher, the snapshot service, the session folder
(archive, NIfTI, confounds, maps, qc.json) and report.html."""
