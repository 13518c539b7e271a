"""Orbax checkpoints: `hf_to_orbax` (HF safetensors / GGUF -> Orbax, streamed, atomic),
`OrbaxCheckpoint.restore_state` (onto any mesh and policy; `jaxpar.load(dir)` uses it),
`orbax_to_hf` (back to HF safetensors) and `inspect_checkpoint`."""

from jaxpar.checkpoint.atomic import (ConversionError, DestinationExistsError,
                                      UnsupportedModelError)
from jaxpar.checkpoint.export_hf import orbax_to_hf
from jaxpar.checkpoint.inspect import format_report, inspect_checkpoint
from jaxpar.checkpoint.orbax_io import (MARKER, OrbaxCheckpoint, hf_to_orbax, is_orbax_checkpoint,
                                        orbax_config)

__all__ = ["hf_to_orbax", "orbax_to_hf", "inspect_checkpoint", "format_report", "OrbaxCheckpoint",
           "is_orbax_checkpoint", "orbax_config", "MARKER", "ConversionError",
           "DestinationExistsError", "UnsupportedModelError"]
