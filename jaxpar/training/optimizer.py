"""The optimizer: AdamW with a learning-rate schedule and global-norm gradient clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    total_steps: int = 1000  # the schedule decays over these
    schedule: str = "cosine"  # cosine / linear decay to final_fraction * lr after warmup, or constant
    final_fraction: float = 0.1
    weight_decay: float = 0.1  # on matrices only (not on norms, biases or other vectors)
    clip_norm: float | None = 1.0  # global gradient norm; None: no clipping
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {self.warmup_steps} "
                             f"and {self.total_steps}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.final_fraction
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps) if cfg.warmup_steps else None
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_fraction)
    if warmup is None:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule)."""
    schedule = learning_rate_schedule(cfg)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm is not None else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule
