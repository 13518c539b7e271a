"""Test set-up: 8 CPU devices (set before JAX starts) and tiny HF reference models.

The suite runs with torch (Python 3.11, the HF reference) and without (Python 3.12, the
newest jax): nothing imported at collection may import torch (checked below); tests that
need it skip through `tests/hf_models` (`needs_torch`, `require_torch()`).
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402

_TORCH_BEFORE_TESTS = "torch" in sys.modules

# stories260K's real weights ship with the repository (tests/data/stories260K/SOURCE.md).
STORIES = Path(__file__).resolve().parent / "data" / "stories260K"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (STORIES / f).is_file()]
    if missing:
        pytest.fail(f"the stories260K fixture is incomplete: {missing} missing under {STORIES} "
                    "(it ships with the repository; restore it from git)")
    return STORIES


def pytest_report_header(config):
    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    torch = version("torch") or f"not installed (tests that need it skip: {hf_models.NO_TORCH_REASON})"
    return [f"jax {version('jax')}, jaxlib {version('jaxlib')}, flax {version('flax')}, "
            f"transformers {version('transformers')}, torch {torch}"]


def pytest_collection_finish(session):
    if "torch" in sys.modules and not _TORCH_BEFORE_TESTS:
        raise pytest.UsageError(
            "torch was imported while collecting tests/: the Python 3.12 pass has no torch, so "
            "import it inside the test, through tests/hf_models.require_torch() or under "
            "@hf_models.needs_torch")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random float32 checkpoints, one per family: HF's save_pretrained where torch is
    installed, the same files written without torch where it is not (hf_models.save_tiny)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_models.save_tiny(name, root / name) for name in hf_models.TINY_FAMILIES}
