"""The run service: lifecycle, the worker loop and the state of one series."""
