"""rtsc: real-time scanner-side fMRI monitoring."""

__version__ = "0.1.0"
