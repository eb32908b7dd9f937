"""The package version (one place: vtprune.__version__, the CLI and benchmark reports read it)."""

__version__ = "0.1.0"
