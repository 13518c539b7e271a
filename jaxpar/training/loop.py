"""Fine-tuning a checkpoint on a text file: `jaxpar train MODEL --data TEXT --out DIR`.

Loads the model sharded by the policy, builds the data set, and runs `steps` optimizer steps,
saving to `out/checkpoints` every `save_every` steps and at the end. If `out` already holds
checkpoints of the same run, training resumes from the latest one and continues exactly as
the uninterrupted run would have. Metrics go to `out/metrics.jsonl`, one line per step.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxpar.training.checkpointing import TrainCheckpoints, check_compatible
from jaxpar.training.data import TextDataset
from jaxpar.training.optimizer import OptimizerConfig
from jaxpar.training.step import Trainer, TrainState

# Settings that must match for a resumed run to be the same run.
RESUME_KEYS = ("model", "policy", "dtype", "batch", "seq", "seed", "data_sha", "optimizer", "remat", "zero1")


@dataclasses.dataclass
class TrainResult:
    steps: int  # the last step taken (the state's step)
    resumed_from: int | None
    metrics: list[dict[str, float]]  # of the steps taken in this call
    out: Path

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def train(model: str | Path, data: str | Path, out: str | Path, *, steps: int, policy=None,
          devices: Sequence[jax.Device] | None = None, batch: int = 8, seq: int = 256,
          optimizer: OptimizerConfig | None = None, dtype: str = "float32", remat: Sequence[str] = (),
          zero1: bool = False, seed: int = 0, save_every: int | None = None, max_to_keep: int = 3,
          progress: bool = False, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Trains `model` (HF folder, GGUF, Orbax checkpoint or alias) on the text file `data`
    until the state reaches `steps` steps. Returns what this call did."""
    from jaxpar.api import load

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out, data = Path(out), Path(data)
    optimizer = optimizer or OptimizerConfig(total_steps=steps)
    loaded = load(model, dtype=dtype, policy=policy, devices=devices, progress=progress)
    if loaded.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer: training on text needs one")
    dataset = TextDataset.from_file(data, loaded.tokenizer, seq, seed=seed)
    trainer = Trainer(loaded.cfg, loaded.sharding, optimizer, dtype=loaded.dtype, remat=remat, zero1=zero1)
    from flax import nnx

    params = nnx.state(loaded.module)
    meta = {"model": str(model), "policy": str(policy), "dtype": dtype, "batch": batch, "seq": seq, "seed": seed,
            "data": str(data), "data_sha": _sha(data), "optimizer": dataclasses.asdict(optimizer),
            "remat": sorted(remat), "zero1": zero1, "windows": len(dataset)}
    out.mkdir(parents=True, exist_ok=True)
    ckpts = TrainCheckpoints(out / "checkpoints", max_to_keep=max_to_keep)
    resumed = ckpts.latest_step()
    try:
        if resumed is not None:
            check_compatible(json.loads(json.dumps(ckpts.meta(resumed))), json.loads(json.dumps(meta)), RESUME_KEYS)
            state = ckpts.restore(trainer.abstract_state(params), resumed)
        else:
            state = trainer.init(params)
        del params
        metrics: list[dict[str, float]] = []
        bar = None
        if progress and state.step < steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=state.step, desc="training", unit="step")
        with open(out / "metrics.jsonl", "a") as log:
            while state.step < steps:
                t0 = time.perf_counter()
                step = state.step
                state, m = trainer.step(state, dataset.batch(step, batch))
                m = {"step": state.step, **m, "seconds": time.perf_counter() - t0}
                metrics.append(m)
                log.write(json.dumps(m) + "\n")
                if not np.isfinite(m["loss"]):
                    raise FloatingPointError(f"the loss is {m['loss']} at step {state.step}: stopping "
                                             "(lower --lr, or clip harder)")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['learning_rate']:.2e}")
                if on_step is not None:
                    on_step(state.step, m)
                if save_every and state.step % save_every == 0 and state.step < steps:
                    ckpts.save(state, {**meta, "recent": metrics[-10:]})
        if bar is not None:
            bar.close()
        if ckpts.latest_step() != state.step:
            ckpts.save(state, {**meta, "recent": metrics[-10:]})
    finally:
        ckpts.close()
    return TrainResult(steps=state.step, resumed_from=resumed if resumed is not None else None,
                       metrics=metrics, out=out)


def restore_params(out: str | Path, trainer: Trainer, params_like) -> TrainState:
    """The latest state of a training run under `out` (for evaluation or export)."""
    ckpts = TrainCheckpoints(Path(out) / "checkpoints")
    try:
        return ckpts.restore(trainer.abstract_state(params_like))
    finally:
        ckpts.close()


def summary(result: TrainResult) -> dict[str, Any]:
    return {"steps": result.steps, "resumed_from": result.resumed_from,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None, "out": str(result.out)}
