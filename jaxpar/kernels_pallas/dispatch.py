"""Kernel dispatch: one entry point per operation, choosing Pallas or the pure-JAX reference.

``impl``:
  * ``"reference"`` -- always the pure-JAX reference (any backend).
  * ``"pallas"``    -- the Pallas Triton kernel. Needs a GPU backend, or ``interpret=True``
    (the Pallas interpreter, e.g. for tests on CPU). A shape the kernel cannot take raises
    :class:`UnsupportedShapeError` naming the shape and the rule.
  * ``"auto"``      -- Pallas when ``jax.default_backend() == "gpu"`` (or interpret=True),
    the reference otherwise. On GPU, a shape the kernel cannot take runs the reference and
    emits a :class:`KernelFallbackWarning` that names the shape and the rule (never silent).

The choice is made at trace time (Python level), so these functions work under ``jax.jit``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal

import jax

from jaxpar.kernels_pallas import attention as attn_ref
from jaxpar.kernels_pallas import attention_pallas as attn_pl
from jaxpar.kernels_pallas import gated_delta_rule as gdn_ref
from jaxpar.kernels_pallas import gated_delta_rule_pallas as gdn_pl
from jaxpar.kernels_pallas.attention_pallas import UnsupportedShapeError

__all__ = [
    "KernelImpl",
    "PallasUnavailableError",
    "UnsupportedShapeError",
    "KernelFallbackWarning",
    "resolve_impl",
    "gated_delta_rule_chunked",
    "gated_delta_rule_decode",
    "gated_delta_rule_conv_decode",
    "attention_prefill",
    "attention_decode",
]

KernelImpl = Literal["auto", "pallas", "reference"]


class PallasUnavailableError(RuntimeError):
    """impl="pallas" was asked for on a backend without the Pallas GPU kernels."""


class KernelFallbackWarning(UserWarning):
    """impl="auto" on GPU ran the reference because the Pallas kernel rejected the shape."""


def resolve_impl(impl: KernelImpl, interpret: bool = False) -> Literal["pallas", "reference"]:
    """Maps an impl request to what will run, raising if Pallas was forced without a GPU."""
    if impl not in ("auto", "pallas", "reference"):
        raise ValueError(f"impl must be 'auto', 'pallas' or 'reference', got {impl!r}")
    if impl == "reference":
        return "reference"
    on_gpu = jax.default_backend() == "gpu"
    if impl == "pallas" and not (on_gpu or interpret):
        raise PallasUnavailableError(
            f"impl='pallas' needs a GPU: the Pallas Triton kernels only compile for CUDA/ROCm, "
            f"and the default JAX backend is {jax.default_backend()!r}. Use impl='reference' "
            f"(pure JAX, any backend) or interpret=True (Pallas interpreter, slow, for tests)."
        )
    return "pallas" if (on_gpu or interpret) else "reference"


def _run(
    name: str,
    impl: KernelImpl,
    interpret: bool,
    pallas_fn: Callable,
    reference_fn: Callable,
    args: tuple,
    pallas_kwargs: dict,
    reference_kwargs: dict,
):
    """Runs the resolved implementation; under "auto" a rejected shape falls back loudly."""
    if resolve_impl(impl, interpret) == "reference":
        return reference_fn(*args, **reference_kwargs)
    try:
        return pallas_fn(*args, **pallas_kwargs, interpret=interpret)
    except UnsupportedShapeError as err:
        if impl == "pallas":
            raise
        warnings.warn(
            f"{name}: Pallas kernel cannot run this shape, using the pure-JAX reference "
            f"instead: {err}",
            KernelFallbackWarning,
            stacklevel=3,
        )
        return reference_fn(*args, **reference_kwargs)


def gated_delta_rule_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    lengths: jax.Array | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    impl: KernelImpl = "auto",
    interpret: bool = False,
    **pallas_options,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule (prefill). See ``gated_delta_rule.chunk_gated_delta_rule``.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g, beta: [B, T, Hv]; initial_state
    [B, Hv, Dk, Dv] float32 or None; lengths [B] int32 or None.
    Returns (o [B, T, Hv, Dv], final_state [B, Hv, Dk, Dv] float32).
    pallas_options (block_v, num_warps, num_stages) go to the Pallas kernel only.
    """
    common = dict(
        initial_state=initial_state,
        lengths=lengths,
        chunk_size=chunk_size,
        use_qk_l2norm=use_qk_l2norm,
        scale=scale,
    )
    return _run(
        "gated_delta_rule_chunked",
        impl,
        interpret,
        gdn_pl.chunk_gated_delta_rule_pallas,
        gdn_ref.chunk_gated_delta_rule,
        (q, k, v, g, beta),
        {**common, **pallas_options},
        common,
    )


def gated_delta_rule_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    impl: KernelImpl = "auto",
    interpret: bool = False,
    **pallas_options,
) -> tuple[jax.Array, jax.Array]:
    """One decode token. q, k: [B, Hk, Dk]; v: [B, Hv, Dv]; g, beta: [B, Hv];
    state [B, Hv, Dk, Dv]. Returns (o [B, Hv, Dv], new_state)."""
    common = dict(use_qk_l2norm=use_qk_l2norm, scale=scale)
    return _run(
        "gated_delta_rule_decode",
        impl,
        interpret,
        gdn_pl.gated_delta_rule_step_pallas,
        gdn_ref.gated_delta_rule_step,
        (q, k, v, g, beta, state),
        {**common, **pallas_options},
        common,
    )


def gated_delta_rule_conv_decode(
    mixed_qkv: jax.Array,
    conv_state: jax.Array,
    conv_weight: jax.Array,
    conv_bias: jax.Array | None,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
    *,
    num_k_heads: int,
    head_k_dim: int,
    num_v_heads: int,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    impl: KernelImpl = "auto",
    interpret: bool = False,
    **pallas_options,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Conv-state shift + causal conv1d + SiLU + one delta-rule token.
    See ``gated_delta_rule.fused_conv_gdn_decode_step``."""
    common = dict(
        num_k_heads=num_k_heads,
        head_k_dim=head_k_dim,
        num_v_heads=num_v_heads,
        use_qk_l2norm=use_qk_l2norm,
        scale=scale,
    )
    return _run(
        "gated_delta_rule_conv_decode",
        impl,
        interpret,
        gdn_pl.fused_conv_gdn_decode_step_pallas,
        gdn_ref.fused_conv_gdn_decode_step,
        (mixed_qkv, conv_state, conv_weight, conv_bias, g, beta, state),
        {**common, **pallas_options},
        common,
    )


def attention_prefill(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    impl: KernelImpl = "auto",
    interpret: bool = False,
    **pallas_options,
) -> jax.Array:
    """Prefill attention. q [B, T, H, D]; k, v [B, T, KVH, D]; lengths [B] int32.
    pallas_options: block_q, block_k, num_warps, num_stages."""
    common = dict(scale=scale, causal=causal)
    return _run(
        "attention_prefill",
        impl,
        interpret,
        attn_pl.prefill_attention_pallas,
        attn_ref.prefill_attention,
        (q, k, v, lengths),
        {**common, **pallas_options},
        common,
    )


def attention_decode(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    slot_positions: jax.Array | None = None,
    impl: KernelImpl = "auto",
    interpret: bool = False,
    **pallas_options,
) -> tuple[jax.Array, jax.Array]:
    """Decode attention with log-sum-exp. q [B, H, D]; caches [B, S, KVH, D]; kv_lens [B].
    Returns (o [B, H, D] float32, lse [B, H] float32).
    pallas_options: block_k, num_splits, num_warps, num_stages."""
    common = dict(scale=scale, slot_positions=slot_positions)
    return _run(
        "attention_decode",
        impl,
        interpret,
        attn_pl.decode_attention_pallas,
        attn_ref.decode_attention,
        (q, k_cache, v_cache, kv_lens),
        {**common, **pallas_options},
        common,
    )
