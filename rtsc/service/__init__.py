"""The run service: start and stop (run.py), the worker loop (worker.py), the state of
the series (series.py) and the failed-write episodes (writes.py)."""
