"""The engine's error type: bad engine settings or bad requests, each naming the culprit."""

from __future__ import annotations


class EngineError(ValueError):
    """An engine cannot be built with these settings, or a request cannot be served."""
