"""The package version (kept apart so that low modules can name it without importing jaxpar)."""

__version__ = "0.1.0"
