"""jaxpar: Hugging Face LLM checkpoints in JAX, sharded over a named mesh by one rule table.

Modules are layered top to bottom (docs/ARCHITECTURE.md): cli -> api -> generate,
checkpoint, sharding.inspect -> assembly -> models -> sharding -> loading -> config.
"""

from jaxpar.api import DEFAULT_MODEL, Engine, LoadedModel, generate, load
from jaxpar.config import ConfigError, ModelConfig, load_config
from jaxpar.generate import GenerationResult
from jaxpar.loading.fp8 import UnsupportedQuantizationError
from jaxpar.loading.sources import CheckpointError
from jaxpar.version import __version__

__all__ = ["load", "generate", "Engine", "LoadedModel", "GenerationResult", "ModelConfig", "load_config",
           "ConfigError", "CheckpointError", "UnsupportedQuantizationError", "DEFAULT_MODEL", "__version__"]
