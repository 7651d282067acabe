"""sdtrain: textual-inversion and hypernetwork training for AUTOMATIC1111-compatible webuis."""

__version__ = "0.1.0"
