"""Test set-up: 8 CPU devices (set before JAX starts) and tiny HF reference models."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402

# stories260K's real weights ship with the repository (tests/data/stories260K/SOURCE.md).
STORIES = Path(__file__).resolve().parent / "data" / "stories260K"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (STORIES / f).is_file()]
    if missing:
        pytest.fail(f"the stories260K fixture is incomplete: {missing} missing under {STORIES} "
                    "(it ships with the repository; restore it from git)")
    return STORIES


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random HF checkpoints saved with save_pretrained (float32), one per family."""
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_models.save_tiny(name, root / name) for name in hf_models.TINY_FAMILIES}
