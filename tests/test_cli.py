"""`jaxpar generate` in-process on stories260K (output, --json, batches, errors) and the
console-script entry point."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jaxpar import cli
from tests.test_real_weights import PROMPT, reference_story

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_the_reference_continuation(capsys, stories_dir):
    code, out, err = _run(capsys, "generate", "--model", str(stories_dir), "--prompt", PROMPT,
                          "--max-new-tokens", "40")
    assert code == 0
    # The continuation is streamed to stdout (the prompt is not repeated), then a newline.
    assert out.endswith("\n") and not out.startswith(PROMPT)
    assert PROMPT + out[:-1] == reference_story(stories_dir)
    # Compilation is timed apart, so the tokens/s figure is the steady-state one.
    assert err.startswith("compile ") and "prefill" in err and "tokens/s" in err
    assert "includes compilation" not in err


def test_generate_json_and_batch(capsys, stories_dir):
    code, out, _ = _run(capsys, "generate", "--model", str(stories_dir), "--prompt", PROMPT,
                        "--prompt", "The dog", "--max-new-tokens", "12", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"texts", "token_ids", "finish_reasons", "prefill_ms", "decode_tokens_per_s"}
    assert len(result["texts"]) == len(result["token_ids"]) == 2
    assert [len(t) for t in result["token_ids"]] == [12, 12]
    assert result["finish_reasons"] == ["length", "length"]
    # Greedy: 12 tokens are a prefix of the 40-token reference.
    assert reference_story(stories_dir).startswith(PROMPT + result["texts"][0])
    assert result["texts"][1] and result["texts"][1] != result["texts"][0]


def test_generate_batch_prints_one_line_per_prompt(capsys, stories_dir):
    code, out, _ = _run(capsys, "generate", "--model", str(stories_dir), "--prompt", PROMPT,
                        "--prompt", "The dog", "--max-new-tokens", "12")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[0] ") and lines[1].startswith("[1] ")
    assert reference_story(stories_dir).startswith(PROMPT + lines[0][len("[0] "):])


def test_bad_model_path_exits_2(capsys, tmp_path):
    code, out, err = _run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and out == ""
    assert err.startswith("jaxpar: error:") and "neither a model folder" in err


def test_bad_argument_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", "hi", "--dtype", "float8"])
    assert e.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_console_script_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["scripts"]["jaxpar"]
    assert target == "jaxpar.cli:main"
    module, func = target.split(":")
    assert getattr(importlib.import_module(module), func) is cli.main


def test_module_runs_as_a_program():
    done = subprocess.run([sys.executable, "-m", "jaxpar.cli", "generate", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--max-new-tokens" in done.stdout and "--prompt" in done.stdout


# --------------------------------------------------------------------------- edges


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if the weights are loaded: these errors must come before."""
    import jaxpar

    def load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the input was checked")
    monkeypatch.setattr(jaxpar, "load", load)


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-k", "-2"], "top_k must be a whole number >= 0"),
    (["--prompt", ""], "--prompt number 2 is empty"),
    (["--chat"], "chat=True, but this model's tokenizer has no chat template"),
    (["--max-new-tokens", "1000000"], "exceeds the model's context of"),
])
def test_generate_input_is_checked_before_the_weights_load(capsys, stories_dir, no_weights, flags, message):
    code, out, err = _run(capsys, "generate", "--model", str(stories_dir), "--prompt", PROMPT, *flags)
    assert code == 2 and out == ""
    assert err.startswith("jaxpar: error:") and message in err


def test_generate_without_tokenizer_files_is_refused(capsys, tmp_path, stories_dir, no_weights):
    (tmp_path / "config.json").write_text((stories_dir / "config.json").read_text())
    code, _, err = _run(capsys, "generate", "--model", str(tmp_path), "--prompt", PROMPT)
    assert code == 2 and "has no tokenizer files" in err


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch, stories_dir):
    import jaxpar

    class Interrupted:
        def generate(self, *args, stream=None, **kwargs):
            stream(0, "Once")  # half a line streamed, then Ctrl-C
            raise KeyboardInterrupt

    monkeypatch.setattr(jaxpar, "load", lambda *args, **kwargs: Interrupted())
    code, out, err = _run(capsys, "generate", "--model", str(stories_dir), "--prompt", PROMPT)
    assert code == 130
    assert out == "Once\n"                       # the streamed line is ended
    assert err == "jaxpar: interrupted\n"         # one line, no traceback


def test_plan_devices_beyond_those_present(capsys, stories_dir):
    import jax

    n = len(jax.devices()) * 2
    code, out, err = _run(capsys, "plan", str(stories_dir), "--devices", str(n))
    assert code == 2 and out == ""
    assert f"XLA_FLAGS=--xla_force_host_platform_device_count={n}" in err
    assert f"only {len(jax.devices())} cpu device(s) are present" in err


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_plan_devices_must_be_positive(capsys, stories_dir, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", str(stories_dir), "--devices", value])
    assert e.value.code == 2
    assert "--devices" in capsys.readouterr().err
