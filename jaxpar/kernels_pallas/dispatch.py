"""Kernel dispatch: one entry point per operation, each with a table of implementations.

``impl`` (per call here, or per operation through ``RuntimeOptions.kernel_impl``):

* ``"reference"`` -- the pure-JAX reference (any backend).
* ``"triton"``    -- the Pallas Triton kernel: a GPU, or ``interpret=True`` (the Pallas
  interpreter, e.g. tests on CPU). ``"pallas"`` is a deprecated alias of ``"triton"``.
* ``"mosaic"``    -- the Pallas Mosaic GPU kernel, for operations that have one registered
  in :data:`MOSAIC_KERNELS`: a GPU of compute capability >= 9.0 and jax >= 0.11.
* ``"auto"``      -- on a GPU: Mosaic GPU where it is registered and supported, else Triton;
  elsewhere the reference (Triton under ``interpret=True``).

A forced implementation that cannot run here raises :class:`KernelUnavailableError` saying
why. Under ``"auto"``, an implementation that rejects the shapes
(:class:`UnsupportedShapeError`) or, on a GPU, fails to compile them hands over to the next
one (Mosaic GPU -> Triton -> reference) with a :class:`KernelFallbackWarning` naming the
operation, the implementation and the reason; a forced implementation re-raises
(:class:`KernelCompileError` for a compile failure). On a GPU each kernel is compiled
alone once per shape before it is used, so a compile failure is seen here, at trace time,
and not deep inside the compile of the whole model.

Contract of every implementation of an operation: the reference's positional arguments
and keywords; kernels also take ``interpret`` and their own tile keywords (``**options``
of the entry points, passed to whichever kernel runs and dropped for the reference).
The choice is made at trace time (Python level), so the entry points work under ``jax.jit``
and inside ``shard_map``.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Callable, Literal

import jax
import numpy as np

from jaxpar.kernels_pallas import attention as attn_ref
from jaxpar.kernels_pallas import attention_pallas as attn_tr
from jaxpar.kernels_pallas import gated_delta_rule as gdn_ref
from jaxpar.kernels_pallas import gated_delta_rule_pallas as gdn_tr
from jaxpar.kernels_pallas.errors import (
    KernelCompileError,
    KernelFallbackWarning,
    KernelUnavailableError,
    PallasUnavailableError,
    UnsupportedShapeError,
)

__all__ = [
    "KernelImpl",
    "OPS",
    "IMPLS",
    "MOSAIC_KERNELS",
    "KernelUnavailableError",
    "PallasUnavailableError",
    "KernelCompileError",
    "UnsupportedShapeError",
    "KernelFallbackWarning",
    "check_impl",
    "resolve_impl",
    "implementations",
    "gated_delta_rule_chunked",
    "gated_delta_rule_decode",
    "attention_prefill",
    "attention_extend",
    "attention_decode",
]

KernelImpl = Literal["auto", "mosaic", "triton", "reference", "pallas"]
IMPLS = ("auto", "mosaic", "triton", "reference")

REFERENCE_KERNELS: dict[str, Callable] = {
    "attention_prefill": attn_ref.prefill_attention,
    "attention_extend": attn_ref.extend_attention,
    "attention_decode": attn_ref.decode_attention,
    "gated_delta_rule_chunked": gdn_ref.chunk_gated_delta_rule,
    "gated_delta_rule_decode": gdn_ref.gated_delta_rule_step,
}
TRITON_KERNELS: dict[str, Callable] = {
    "attention_prefill": attn_tr.prefill_attention_pallas,
    "attention_extend": attn_tr.extend_attention_pallas,
    "attention_decode": attn_tr.decode_attention_pallas,
    "gated_delta_rule_chunked": gdn_tr.chunk_gated_delta_rule_pallas,
    "gated_delta_rule_decode": gdn_tr.gated_delta_rule_step_pallas,
}
# Mosaic GPU kernels, "module:function" per operation. Registering one is one line here;
# the module is imported on first use, and one that is absent or fails to import leaves
# the operation on Triton (impl="mosaic" then says why).
MOSAIC_KERNELS: dict[str, str] = {
    "attention_prefill": "jaxpar.kernels_pallas.attention_mgpu:prefill_attention_mgpu",
    "attention_decode": "jaxpar.kernels_pallas.attention_mgpu:decode_attention_mgpu",
    "gated_delta_rule_chunked":
        "jaxpar.kernels_pallas.gated_delta_rule_mgpu:chunk_gated_delta_rule_mgpu",
    "gated_delta_rule_decode":
        "jaxpar.kernels_pallas.gated_delta_rule_mgpu:gated_delta_rule_step_mgpu",
}  # fmt: skip

OPS = tuple(REFERENCE_KERNELS)
_MOSAIC_MIN_JAX = (0, 11)
_MOSAIC_MIN_CAPABILITY = 9.0


# --------------------------------------------------------------------------- resolution


def check_impl(impl: str, op: str | None = None) -> str:
    """Validates an impl name (and op name); returns it with "pallas" mapped to "triton"."""
    if op is not None and op not in OPS:
        raise ValueError(f"unknown kernel operation {op!r}; operations: {', '.join(OPS)}")
    if impl == "pallas":
        warnings.warn("impl='pallas' is deprecated: use 'triton' (the Pallas Triton kernels) "
                      "or 'mosaic' (Pallas Mosaic GPU)", DeprecationWarning, stacklevel=3)  # fmt: skip
        return "triton"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    return impl


def _jax_version() -> tuple[int, ...]:
    return tuple(int(part) for part in jax.__version__.split(".")[:2])


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _compute_capability() -> float | None:
    """Compute capability of the first GPU (9.0 for H100), None without one."""
    if not _on_gpu():
        return None
    value = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _mosaic_kernel(op: str) -> tuple[Callable | None, str]:
    """(the registered Mosaic GPU kernel, "") or (None, why it cannot be used here)."""
    spec = MOSAIC_KERNELS.get(op)
    if spec is None:
        return None, f"no Mosaic GPU kernel is registered for {op} (dispatch.MOSAIC_KERNELS)"
    if _jax_version() < _MOSAIC_MIN_JAX:
        return None, f"Mosaic GPU kernels need jax >= 0.11, this is jax {jax.__version__}"
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr), ""
    except Exception as err:  # a missing module or one this jax cannot import
        return None, f"cannot import {spec}: {type(err).__name__}: {err}"


def _available(op: str, name: str, interpret: bool) -> tuple[Callable | None, str]:
    """(kernel, "") when implementation `name` of `op` can run here, else (None, reason)."""
    if name == "reference":
        return REFERENCE_KERNELS[op], ""
    if name == "triton":
        fn = TRITON_KERNELS.get(op)
        if fn is None:
            return None, f"{op} has no Triton kernel"
        if not (_on_gpu() or interpret):
            return None, (
                f"impl='triton' needs a GPU: the Pallas Triton kernels only compile for CUDA/ROCm, "
                f"and the default JAX backend is {jax.default_backend()!r}. Use impl='reference' "
                f"(pure JAX, any backend) or interpret=True (Pallas interpreter, slow, for tests)."
            )
        return fn, ""
    fn, reason = _mosaic_kernel(op)
    if fn is None:
        return None, reason
    if interpret:
        return fn, ""
    capability = _compute_capability()
    if capability is None:
        return None, (f"impl='mosaic' needs a GPU, and the default JAX backend is "
                      f"{jax.default_backend()!r}")  # fmt: skip
    if capability < _MOSAIC_MIN_CAPABILITY:
        return None, f"Mosaic GPU kernels need compute capability >= 9.0, this GPU has {capability}"
    return fn, ""


def _candidates(op: str, impl: str, interpret: bool) -> list[tuple[str, Callable]]:
    """Implementations to try in order: one when forced (or raise why it cannot run).
    `impl` has been through :func:`check_impl`."""
    if impl != "auto":
        fn, reason = _available(op, impl, interpret)
        if fn is None:
            raise KernelUnavailableError(f"{op}: {reason}")
        return [(impl, fn)]
    if interpret:  # interpret mode runs the Triton kernels; Mosaic GPU only when forced
        order = ("triton", "reference")
    elif _on_gpu():
        order = ("mosaic", "triton", "reference")
    else:
        order = ("reference",)
    found = [(name, _available(op, name, interpret)[0]) for name in order]
    return [(name, fn) for name, fn in found if fn is not None]


def resolve_impl(impl: KernelImpl, interpret: bool = False, op: str = "attention_decode") -> str:
    """What impl="..." runs for `op` here (before any shape fallback); raises if forced and
    unavailable."""
    return _candidates(op, check_impl(impl, op), interpret)[0][0]


def implementations(op: str, interpret: bool = False) -> dict[str, Callable]:
    """Every implementation of `op` that can run here, by name (for checks and benchmarks)."""
    check_impl("auto", op)
    found = {name: _available(op, name, interpret)[0] for name in ("mosaic", "triton", "reference")}
    return {name: fn for name, fn in found.items() if fn is not None}


# ------------------------------------------------------------------------ compile check

_COMPILED: dict = {}


def _needs_compile_check(interpret: bool) -> bool:
    """A kernel is compiled alone first when it will be compiled for a GPU."""
    return _on_gpu() and not interpret


def _compile_check(op: str, name: str, fn: Callable, args: tuple, kwargs: dict) -> None:
    """Compiles fn(*args, **kwargs) on abstract values once per signature; a failure raises
    KernelCompileError (an UnsupportedShapeError raised while tracing passes through)."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) or hasattr(leaf, "aval")
                for leaf in leaves]  # fmt: skip
    avals = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
             for leaf, arr in zip(leaves, is_array) if arr]  # fmt: skip
    statics = tuple(leaf for leaf, arr in zip(leaves, is_array) if not arr)
    key = (op, name, treedef, tuple(is_array), statics,
           tuple((a.shape, str(a.dtype)) for a in avals))  # fmt: skip
    if key in _COMPILED:
        error = _COMPILED[key]
    else:

        def standalone(*arrays):
            it_arrays, it_statics = iter(arrays), iter(statics)
            full = [next(it_arrays) if arr else next(it_statics) for arr in is_array]
            a, kw = jax.tree_util.tree_unflatten(treedef, full)
            return fn(*a, **kw)

        try:
            jax.jit(standalone).lower(*avals).compile()
            error = None
        except UnsupportedShapeError:
            raise
        except Exception as err:  # Triton / Mosaic GPU / ptxas errors have no common type
            error = f"{type(err).__name__}: {str(err)[:2000]}"
        _COMPILED[key] = error
    if error is not None:
        shapes = ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in avals)
        raise KernelCompileError(f"the {name} kernel failed to compile for [{shapes}]: {error}")


# ----------------------------------------------------------------------------- running


def _check_keywords(op: str, name: str, fn: Callable, kwargs: dict) -> None:
    """A kernel that does not take a keyword the call needs (the scales of an fp8 KV cache,
    for a kernel written before them) rejects the call like an unsupported shape."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = sorted(k for k, v in kwargs.items() if v is not None and k not in params)
    if missing:
        raise UnsupportedShapeError(
            f"the {name} kernel of {op} does not take {', '.join(missing)} (a scaled fp8 KV "
            f"cache needs them)")


def _run(op: str, impl: KernelImpl, interpret: bool, args: tuple, kwargs: dict,
         options: dict):  # fmt: skip
    """Runs the first implementation that takes these shapes; under auto, loudly."""
    impl = check_impl(impl, op)
    candidates = _candidates(op, impl, interpret)
    forced = impl != "auto"
    # Keywords left at None are not passed: kernels need not know optional inputs.
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in _OPTIONAL_INPUTS}
    for i, (name, fn) in enumerate(candidates):
        if name == "reference":
            return fn(*args, **kwargs)
        call_kwargs = {**kwargs, **options, "interpret": interpret}
        try:
            _check_keywords(op, name, fn, kwargs)
            if _needs_compile_check(interpret):
                _compile_check(op, name, fn, args, call_kwargs)
            return fn(*args, **call_kwargs)
        except (UnsupportedShapeError, KernelCompileError) as err:
            if forced or i + 1 == len(candidates):
                raise
            warnings.warn(
                f"{op}: the {name} kernel cannot run this call, using the "
                f"{candidates[i + 1][0]} implementation instead: {err}",
                KernelFallbackWarning,
                stacklevel=3,
            )
    raise AssertionError("unreachable: the reference is always a candidate")


# Array keywords an operation takes only for some callers (an fp8 cache's scales).
_OPTIONAL_INPUTS = ("k_scale", "v_scale")


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
    **options,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule (prefill). See ``gated_delta_rule.chunk_gated_delta_rule``.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g, beta: [B, T, Hv]; initial_state
    [B, Hv, Dk, Dv] float32 or None; lengths [B] int32 or None.
    Returns (o [B, T, Hv, Dv], final_state [B, Hv, Dk, Dv] float32).
    """
    kwargs = dict(initial_state=initial_state, lengths=lengths, chunk_size=chunk_size,
                  use_qk_l2norm=use_qk_l2norm, scale=scale)  # fmt: skip
    return _run("gated_delta_rule_chunked", impl, interpret, (q, k, v, g, beta), kwargs, options)


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
    **options,
) -> tuple[jax.Array, jax.Array]:
    """One decode token. q, k: [B, Hk, Dk]; v: [B, Hv, Dv]; g, beta: [B, Hv];
    state [B, Hv, Dk, Dv]. Returns (o [B, Hv, Dv], new_state)."""
    kwargs = dict(use_qk_l2norm=use_qk_l2norm, scale=scale)
    return _run("gated_delta_rule_decode", impl, interpret, (q, k, v, g, beta, state), kwargs,
                options)  # fmt: skip


def attention_prefill(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    impl: KernelImpl = "auto",
    interpret: bool = False,
    **options,
) -> jax.Array:
    """Prefill attention. q [B, T, H, D]; k, v [B, T, KVH, D]; lengths [B] int32;
    window: sliding window (keys i - window < j <= i), None for none.
    Returns [B, T, H, D] in q.dtype (padding query rows zero)."""
    return _run("attention_prefill", impl, interpret, (q, k, v, lengths),
                dict(scale=scale, causal=causal, window=window), options)  # fmt: skip


def attention_extend(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    dcp_rank=0,
    dcp_size: int = 1,
    window: int | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    impl: KernelImpl = "auto",
    interpret: bool = False,
    **options,
) -> tuple[jax.Array, jax.Array]:
    """Chunked-prefill attention over a cache in the DCP layout (slot s holds position
    s * dcp_size + dcp_rank). q [B, T, H, D]; caches [B, S, KVH, D]; q_positions [B, T];
    kv_lens [B] tokens cached including this chunk; window: sliding window or None;
    k_scale, v_scale [B, S, KVH] for an fp8 cache (key = k_cache * k_scale).
    Returns (o [B, T, H, D] f32, lse [B, T, H] f32)."""
    return _run("attention_extend", impl, interpret, (q, k_cache, v_cache, q_positions, kv_lens),
                dict(scale=scale, dcp_rank=dcp_rank, dcp_size=dcp_size, window=window,
                     k_scale=k_scale, v_scale=v_scale), options)  # fmt: skip


def attention_decode(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    *,
    scale: float,
    kv_starts: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    impl: KernelImpl = "auto",
    interpret: bool = False,
    **options,
) -> tuple[jax.Array, jax.Array]:
    """Decode attention with log-sum-exp. q [B, H, D]; caches [B, S, KVH, D]; kv_lens [B]
    valid slots (a prefix; under DCP ``attention.dcp_local_lengths``); kv_starts [B] the
    first valid slot under a sliding window (None: 0); k_scale, v_scale [B, S, KVH] for an
    fp8 cache (key = k_cache * k_scale).
    Returns (o [B, H, D] float32, lse [B, H] float32)."""
    return _run("attention_decode", impl, interpret, (q, k_cache, v_cache, kv_lens),
                dict(scale=scale, kv_starts=kv_starts, k_scale=k_scale, v_scale=v_scale),
                options)  # fmt: skip
