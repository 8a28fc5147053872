"""The package version (one place: the package, checkpoints and data folders record it)."""

__version__ = "0.1.0"
