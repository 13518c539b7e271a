"""One sharded training step: the rule table that shards inference shards training.

    loss, grads = value_and_grad(causal_lm_loss(model(inputs)))   # model = merge(graph, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = params + updates

The parameters keep the shardings the rule table gives them; the optimizer state (AdamW's
moments) is sharded like the parameter it belongs to, and with `zero1=True` additionally
split over the `dp` axis (ZeRO stage 1: each data-parallel replica updates its slice of the
state; XLA gathers the parameters back). The batch is split over `dp` (and, inside
attention-DP blocks, over their batch groups). One jitted program, parameters and optimizer
state donated. `remat` names the block kinds recomputed in the backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar.config import ModelConfig
from jaxpar.models.decoder import CausalLM
from jaxpar.models.options import RuntimeOptions
from jaxpar.sharding.model_sharding import ModelSharding
from jaxpar.training.data import Batch
from jaxpar.training.loss import causal_lm_loss
from jaxpar.training.optimizer import OptimizerConfig, make_optimizer

REMAT_KINDS = ("attention", "linear_attention", "mamba", "mlp", "moe")


def loss_fn(graphdef, params, batch: Batch):
    """(mean loss, target count) of a batch."""
    model: CausalLM = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(batch.inputs.shape[1], dtype=jnp.int32), batch.inputs.shape)
    logits, _ = model(batch.inputs, positions, None, batch.lengths, mode="prefill")
    return causal_lm_loss(logits, batch.targets, batch.weights)


def grads_fn(graphdef, params, batch: Batch):
    """((loss, target count), gradients) of a batch."""
    return jax.value_and_grad(functools.partial(loss_fn, graphdef), has_aux=True)(params, batch)


def train_step(graphdef, tx: optax.GradientTransformation, params, opt_state, batch: Batch):
    (loss, count), grads = grads_fn(graphdef, params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}


def _zero1(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """The sharding with the `dp` axis added on the first dimension it can split."""
    mesh = sharding.mesh
    dp = mesh.shape.get("dp", 1)
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    used = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
    if dp == 1 or "dp" in used:
        return sharding
    for d, entry in enumerate(spec):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        split = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if shape[d] % (split * dp) == 0:
            spec[d] = ("dp",) + axes if axes else "dp"
            return NamedSharding(mesh, P(*spec))
    return sharding


def optimizer_shardings(tx: optax.GradientTransformation, params, *, zero1: bool = False):
    """Shardings of the optimizer state: each per-parameter leaf like its parameter (with
    `zero1`, also over `dp`), everything else (step counts) replicated."""
    shapes = jax.eval_shape(tx.init, params)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = NamedSharding(mesh, P())

    def like(leaf, param):
        s = param.sharding
        return _zero1(s, tuple(param.shape)) if zero1 else s

    return optax.tree_utils.tree_map_params(tx, like, shapes, params,
                                            transform_non_params=lambda _: replicated)


def model_graph(cfg: ModelConfig, sharding: ModelSharding, dtype, *, remat: Sequence[str] = (),
                kernel_impl: str = "auto"):
    """The model's graph definition for training (with its remat choices)."""
    bad = [k for k in remat if k not in REMAT_KINDS]
    if bad:
        raise ValueError(f"unknown remat block kind(s) {bad} (kinds: {', '.join(REMAT_KINDS)})")
    options = RuntimeOptions(kernel_impl=kernel_impl, remat=tuple(remat))
    return nnx.graphdef(nnx.eval_shape(lambda: CausalLM(cfg, dtype, sharding, options)))


@dataclasses.dataclass
class TrainState:
    params: Any  # nnx.State of the model's parameters, sharded
    opt_state: Any
    step: int = 0


class Trainer:
    """Compiled training step for one model, sharding and optimizer."""

    def __init__(self, cfg: ModelConfig, sharding: ModelSharding, optimizer: OptimizerConfig, *,
                 dtype=jnp.float32, remat: Sequence[str] = (), zero1: bool = False):
        self.cfg, self.sharding, self.dtype = cfg, sharding, dtype
        self.optimizer_config = optimizer
        self.graphdef = model_graph(cfg, sharding, dtype, remat=remat)
        self.tx, self.schedule = make_optimizer(optimizer)
        self.zero1 = zero1
        self._step = None

    def init(self, params) -> TrainState:
        """A fresh state around (sharded) parameters."""
        shardings = optimizer_shardings(self.tx, params, zero1=self.zero1)
        return TrainState(params=params, opt_state=jax.jit(self.tx.init, out_shardings=shardings)(params))

    def abstract_state(self, params) -> TrainState:
        """The state's shapes and shardings (for restoring a checkpoint)."""
        shapes = jax.eval_shape(self.tx.init, params)
        shardings = optimizer_shardings(self.tx, params, zero1=self.zero1)
        opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
        abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
        return TrainState(params=abstract_params, opt_state=opt)

    def batch_sharding(self) -> NamedSharding:
        """Rows over the data-parallel replicas, the rest replicated."""
        mesh = self.sharding.mesh
        return NamedSharding(mesh, P("dp") if mesh.shape.get("dp", 1) > 1 else P())

    def place(self, batch: Batch) -> Batch:
        rows, t = batch.inputs.shape
        if rows % self.sharding.batch_multiple:
            raise ValueError(f"batch of {rows} rows: the policy splits the batch {self.sharding.batch_multiple} "
                             "ways; use a multiple of that")
        if t % self.sharding.seq_multiple:
            raise ValueError(f"sequence of {t} tokens: the policy splits the sequence "
                             f"{self.sharding.seq_multiple} ways; use a multiple of that")
        s = self.batch_sharding()
        return jax.tree.map(lambda x: jax.device_put(x, s), batch)

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, float]]:
        """One optimizer step (the state's arrays are donated). Returns the new state and
        {loss, tokens, grad_norm, learning_rate} (the rate this step used)."""
        if self._step is None:
            param_s = jax.tree.map(lambda a: a.sharding, state.params)
            opt_s = jax.tree.map(lambda a: a.sharding, state.opt_state)
            self._step = jax.jit(functools.partial(train_step, self.graphdef, self.tx), donate_argnums=(0, 1),
                                 out_shardings=(param_s, opt_s, None))
        lr = float(self.schedule(state.step))
        params, opt_state, metrics = self._step(state.params, state.opt_state, self.place(batch))
        out = {k: float(v) for k, v in jax.device_get(metrics).items()}
        out["learning_rate"] = lr
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), out
