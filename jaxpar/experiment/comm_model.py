"""The collectives one inference step needs at least, derived from the resolved per-block
plans (what any implementation of the sharding must move), to compare with the compiled HLO.

Bytes convention: RESULT-BUFFER bytes, the size of each collective's result on one device
(an all-reduce of [B, E] bf16 counts B*E*2, a reduce-scatter its 1/n-sized output, an
all-gather its full output) — what `jaxpar.sharding.collectives` counts in compiled HLO.
`jaxpar.sharding.collectives.ring_wire_bytes` converts either side to bytes sent.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

from jaxpar.sharding.collectives import ring_wire_bytes

F32 = 4  # logits, attention outputs and LSE statistics are float32 whatever the model dtype


@dataclasses.dataclass(frozen=True)
class Term:
    """One collective the policy cannot avoid: `result_bytes` is the size of its result
    buffer on one device, `group` the number of devices that take part."""

    what: str
    kind: str  # all-reduce / all-gather / reduce-scatter
    result_bytes: int
    group: int


def analytic_collectives(cfg, plans: Sequence[Any], *, devices: int, batch: int, seq: int,
                         decode: bool, itemsize: int, replicas: int = 1,
                         greedy: bool = True) -> list[Term]:
    """The collectives one step needs at least.

    `plans`: `ModelSharding.plans` (embed, then mixer / ffn per layer, then lm_head);
    `devices`: the table's tp (devices of one replica); `batch`, `seq`: the (padded) step
    shape (`seq` = new tokens per row: the prompt for prefill, the chunk for extend);
    `replicas`: the table's dp (each replica runs batch / replicas rows, no traffic between
    replicas); `itemsize`: bytes of the activation dtype. Decode is one token per row (T = 1).
    With act = B*T*E*itemsize (B rows of a replica):

    * embed, vocab-parallel over t > 1: all-reduce(act) over t of the partial lookups; a
      reduce-scatter(act/t) instead when the next block keeps a sequence-sharded residual.
    * attention with t = tp_size, d = dcp_size, a = dp_size (rows per rank Bl = B/a):
        - row-parallel o_proj: all-reduce(Bl*T*E) over the t heads shards (t > 1);
        - DCP decode (d > 1): the LSE merge over d ranks, all-reduces of o (Bl*(H/t)*D f32),
          the max and the weight sum (Bl*(H/t) f32 each); DCP prefill needs nothing (each
          rank keeps its slots of the replicated k / v);
        - attention DP (a > 1): all-gather over the a ranks of the attention output (result
          B*T*E); the batch split of the replicated input is a local slice.
    * linear attention (Gated DeltaNet), t > 1: all-reduce(act) after the row-parallel
      out_proj (nothing inside the mixer: it is split by key-head groups).
    * mlp, t > 1: all-reduce(act) after the row-parallel down_proj.
    * moe over its t > 1 devices (ep_size splits the experts among them, each expert's ffn
      split t / ep ways): one all-reduce(act) summing the ranks' expert outputs (the shared
      expert's partial sums can join the same reduction).
    * SP (not at decode, T = 1): a block with `sp` ends with reduce-scatter(act/t) instead of
      all-reduce(act) and leaves the residual sequence-sharded; a block entered with a
      sequence-sharded residual first all-gathers it (result act, over the tp devices).
    * prefill keeps only each row's last token: if the residual is sequence-sharded this
      needs one all-reduce of B*E (the token lives on one rank).
    * lm_head, vocab-parallel over t > 1, greedy sampling: the argmax across vocab shards
      all-gathers each shard's (max, index): two all-gathers of B*t*4 bytes.
    Norms, rotary, the cache writes and the column-parallel projections need nothing.
    """
    b = batch // max(replicas, 1)
    t_len = 1 if decode else seq
    e = cfg.hidden_size
    act = b * t_len * e * itemsize
    plans = list(plans)
    terms: list[Term] = []

    def sp_mode(p) -> bool:
        return bool(p.sp) and not decode and p.kind in ("attention", "mlp", "moe")

    sharded = False  # is the residual stream sequence-sharded (prefill SP)?
    for i, p in enumerate(plans):
        t = p.tp_size
        if p.kind == "embed":
            nxt = plans[i + 1] if i + 1 < len(plans) else None
            to_sp = nxt is not None and sp_mode(nxt)
            if t > 1:
                if to_sp:
                    terms.append(Term("embed: vocab-parallel lookup (reduce-scatter)", "reduce-scatter",
                                      act // t, t))
                else:
                    terms.append(Term("embed: vocab-parallel lookup", "all-reduce", act, t))
            sharded = to_sp and t > 1  # a replicated lookup feeds the first SP block as is
            continue
        if p.kind == "lm_head":
            if sharded:
                terms.append(Term("last token from the sequence-sharded residual", "all-reduce",
                                  b * e * itemsize, devices))
            if t > 1 and greedy:
                for what in ("max", "index"):
                    terms.append(Term(f"lm_head: argmax {what} over vocab shards", "all-gather",
                                      b * t * F32, t))
            continue
        if p.kind not in ("attention", "linear_attention", "mlp", "moe"):
            continue
        where = f"layer {p.layer} {p.kind}"
        sp = sp_mode(p)
        if sharded:
            terms.append(Term(f"{where}: gather the sequence-sharded residual", "all-gather", act, devices))
        if p.kind == "attention":
            a, d = p.dp_size, p.dcp_size
            bl = b // a
            h_local = cfg.num_heads // t
            if decode and d > 1:
                terms.append(Term(f"{where}: DCP LSE merge, max", "all-reduce", bl * h_local * F32, d))
                terms.append(Term(f"{where}: DCP LSE merge, o", "all-reduce",
                                  bl * h_local * cfg.head_dim * F32, d))
                terms.append(Term(f"{where}: DCP LSE merge, weight sum", "all-reduce", bl * h_local * F32, d))
            out = bl * t_len * e * itemsize
            if t > 1:
                if sp and a == 1:
                    terms.append(Term(f"{where}: o_proj (reduce-scatter)", "reduce-scatter", out // t, t))
                else:
                    terms.append(Term(f"{where}: o_proj", "all-reduce", out, t))
            if a > 1:
                terms.append(Term(f"{where}: attention-DP gather of the output", "all-gather", act, a))
        else:
            proj = {"mlp": "down_proj", "moe": "expert sum", "linear_attention": "out_proj"}[p.kind]
            if t > 1:
                if sp:
                    terms.append(Term(f"{where}: {proj} (reduce-scatter)", "reduce-scatter", act // t, t))
                else:
                    terms.append(Term(f"{where}: {proj}", "all-reduce", act, t))
        # the residual leaves sequence-sharded only from a reduce-scatter (a replicated or
        # DP-gathered output stays replicated: no point in slicing it to gather it again)
        sharded = sp and t > 1 and not (p.kind == "attention" and p.dp_size > 1)
    return terms


def analytic_kv_bytes(cfg, plans: Sequence[Any], *, batch: int, seq: int, itemsize: int,
                      replicas: int = 1) -> int:
    """Ideal KV-cache bytes per device: k and v [B/(dp*a), S/d, KVH/g, D] per attention
    layer, g = gcd(KVH, t) (KV heads split as far as they go, replicated beyond), plus the
    replicated int32 lengths [B] that the cache also carries."""
    total = batch * 4
    for p in plans:
        if p.kind != "attention":
            continue
        rows = batch // max(replicas, 1) // p.dp_size
        g = math.gcd(cfg.num_kv_heads, p.tp_size)
        total += 2 * rows * (seq // p.dcp_size) * (cfg.num_kv_heads // g) * cfg.head_dim * itemsize
    return total


def summarize(terms: Iterable[Term]) -> dict[str, dict[str, float]]:
    """{kind: {count, bytes, wire_bytes}} of analytic terms."""
    out: dict[str, dict[str, float]] = {}
    for term in terms:
        s = out.setdefault(term.kind, {"count": 0, "bytes": 0, "wire_bytes": 0.0})
        s["count"] += 1
        s["bytes"] += term.result_bytes
        s["wire_bytes"] += ring_wire_bytes(term.kind, term.result_bytes, term.group)
    return out
