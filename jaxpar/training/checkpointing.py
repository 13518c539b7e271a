"""Training checkpoints: parameters, optimizer state and step in an Orbax CheckpointManager.

Each saved step holds the state as nested dicts keyed by the pytree path parts (Orbax
stores one array per key) and a JSON record of what produced it (model config, optimizer,
data settings, recent metrics). Restoring passes ShapeDtypeStructs carrying the trainer's
shardings, so every device reads its own shard; the restored arrays equal the saved ones
bit for bit, and since the batch of a step depends only on (seed, step), a resumed run
takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxpar.training.step import TrainState

STATE, META = "state", "meta"


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with other settings than the one resuming it."""


def _ocp():
    import orbax.checkpoint as ocp  # imported on first use: it takes a second

    return ocp


def _part(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def to_nested(tree: Any) -> dict[str, Any]:
    """A pytree as nested dicts with string keys (its path parts)."""
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        parts = [_part(k) for k in path]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return out


def from_nested(nested: dict[str, Any], like: Any) -> Any:
    """Inverse of `to_nested`, given a tree of the target structure."""
    leaves = []
    for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]:
        node = nested
        for k in path:
            node = node[_part(k)]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


class TrainCheckpoints:
    """Saves and restores `TrainState`s under `directory` (an Orbax CheckpointManager)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3):
        ocp = _ocp()
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        ocp = _ocp()
        tree = to_nested({"params": state.params, "opt_state": state.opt_state})
        self.manager.save(state.step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(tree), META: ocp.args.JsonSave({**meta, "step": state.step})}))
        self.manager.wait_until_finished()

    def meta(self, step: int | None = None) -> dict[str, Any]:
        ocp = _ocp()
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

    def restore(self, abstract: TrainState, step: int | None = None) -> TrainState:
        """The state saved at `step` (default the latest), placed like `abstract`'s arrays
        (ShapeDtypeStructs with shardings, e.g. `Trainer.abstract_state`)."""
        ocp = _ocp()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no training checkpoint under {self.directory}")
        like = {"params": abstract.params, "opt_state": abstract.opt_state}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(to_nested(like))}))[STATE]
        tree = from_nested(restored, like)
        return TrainState(params=tree["params"], opt_state=tree["opt_state"], step=step)

    def close(self) -> None:
        self.manager.close()


def check_compatible(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Resuming with other data / optimizer settings would not continue the same run."""
    diff = {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}
    if diff:
        detail = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointMismatchError(f"the checkpoint was written with other settings ({detail}); "
                                      "use the same settings to resume, or another --out folder")
