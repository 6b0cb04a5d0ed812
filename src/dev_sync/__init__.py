"""dev-sync: keep a remote development VM in lockstep with a local checkout."""

__version__ = "0.1.0"
