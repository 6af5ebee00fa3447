"""dpmot-dist: distributed semi-discrete optimal transport for DPM-OT sampling."""

__version__ = "0.1.0"
