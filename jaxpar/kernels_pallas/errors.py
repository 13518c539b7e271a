"""Errors and warnings shared by every kernel implementation and the dispatcher.

Kernels (Triton, Mosaic GPU) raise :class:`UnsupportedShapeError` for shapes they cannot
take, naming the shape and the rule; the dispatcher turns it into a loud fallback under
``impl="auto"`` and re-raises it when an implementation was forced.
"""

from __future__ import annotations

__all__ = [
    "UnsupportedShapeError",
    "KernelUnavailableError",
    "PallasUnavailableError",
    "KernelCompileError",
    "KernelFallbackWarning",
]


class UnsupportedShapeError(ValueError):
    """A kernel cannot handle these shapes (the message names shape and rule)."""


class KernelUnavailableError(RuntimeError):
    """A forced implementation cannot run here (no GPU, not registered, jax too old, ...)."""


# The name used before Mosaic GPU implementations existed.
PallasUnavailableError = KernelUnavailableError


class KernelCompileError(RuntimeError):
    """A forced GPU kernel failed to compile for these shapes (the cause is chained)."""


class KernelFallbackWarning(UserWarning):
    """impl="auto" ran another implementation because the chosen one could not run."""
