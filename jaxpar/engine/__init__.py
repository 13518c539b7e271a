"""The serving engine: continuous batching over fixed decode slots, chunked prefill,
prefill / decode disaggregation (see `jaxpar.engine.engine.Engine`)."""

from jaxpar.engine.engine import Engine
from jaxpar.engine.errors import EngineError
from jaxpar.engine.requests import EngineResult, RequestHandle, RequestOutput, StreamDelta

__all__ = ["Engine", "EngineError", "EngineResult", "RequestHandle", "RequestOutput", "StreamDelta"]
