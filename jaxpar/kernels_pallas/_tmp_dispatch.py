# TEMPORARY (removed once dispatch.py lands)
import jax, jax.numpy as jnp

def attention_prefill(q, k, v, lengths, *, scale, impl="auto", causal=True):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    k = jnp.repeat(k, h // kvh, axis=2); v = jnp.repeat(v, h // kvh, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    qi = jnp.arange(t)[:, None]; ki = jnp.arange(t)[None, :]
    mask = (ki <= qi)[None, None] & (ki[None, None] < lengths[:, None, None, None])
    s = jnp.where(mask, s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)

def attention_decode(q, kc, vc, kv_lens, *, scale, impl="auto", slot_positions=None):
    b, h, d = q.shape
    kvh = kc.shape[2]
    qg = q.reshape(b, kvh, h // kvh, d).astype(jnp.float32)
    s = jnp.einsum("bgrd,bsgd->bgrs", qg, kc.astype(jnp.float32)) * scale
    pos = jnp.arange(kc.shape[1]) if slot_positions is None else slot_positions
    mask = pos[None, :] < kv_lens[:, None]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask[:, None, None], jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0)[..., None]), 0)
    o = jnp.einsum("bgrs,bsgd->bgrd", p, vc.astype(jnp.float32))
    return o.reshape(b, h, d), lse.reshape(b, h)
