"""Two local processes under jax.distributed (gloo) form one 4-device mesh; tp=4 across
them generates the same tokens as one device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jaxpar

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_tp4_matches_one_device(stories_dir, tmp_path):
    port = str(_free_port())
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    repo = Path(__file__).resolve().parents[1]
    # The worker sets its own device count; drop the 8-device flag conftest exported.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(stories_dir), str(outs[i])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads(o.read_text()) for o in outs]
    assert results[0]["processes"] == 2 and results[0]["mesh"] == {"dp": 1, "tp": 4}
    assert results[0]["token_ids"] == results[1]["token_ids"]

    single = jaxpar.load(stories_dir, progress=False).generate(["Once upon a time", "The little dog"], 24)
    assert results[0]["token_ids"] == single.token_ids
    assert results[0]["texts"] == single.texts
