"""megacluster: the software of an AI supercomputer (train, plan, serve)."""

__version__ = "0.1.0"
