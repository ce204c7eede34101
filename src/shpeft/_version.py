"""The package version (its own module, so that modules recording it import no package code)."""

__version__ = "0.1.0"
