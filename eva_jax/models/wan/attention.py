"""Multi-head attention as one pure function of (q, k, v) with selectable backends.

Layout is [B, L, N, d] throughout (batch, tokens, heads, head dim), non-causal, softmax scale 1/sqrt(d).

Backends:
  'xla'     jax.nn.dot_product_attention(implementation='xla'): materialises the [B, N, Lq, Lk] scores.
  'cudnn'   cuDNN flash attention (GPU). A key length that is not a multiple of `CUDNN_KV_MULTIPLE` is padded to
            one and the padding masked with `key_value_seq_lengths`, because the cuDNN backward refuses some key
            lengths (e.g. 257 CLIP tokens). Lengths that need no padding run without a mask (the fastest kernel).
  'chunked' online-softmax attention over query and key blocks with lax.scan: memory O(chunk^2) instead of
            O(Lq * Lk), so long sequences run on CPU. Equal to 'xla' to float32 rounding.

A context-parallel (Ulysses) wrapper can be put around `attention` without touching the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Key lengths that are a multiple of this run unpadded and unmasked on cuDNN; others are padded up to one.
# `python scripts/bench.py --device-check` probes which lengths the installed cuDNN accepts (step cudnn-lengths).
CUDNN_KV_MULTIPLE = 64
_MASKED = -1e30  # finite "minus infinity" for the running max: avoids inf - inf = nan on fully padded blocks


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "xla",
              kv_seq_lengths: jax.Array | None = None, chunk_size: int = 1024,
              scale: float | None = None, kv_multiple: int | None = None) -> jax.Array:
  """softmax(q k^T * scale) v over the first kv_seq_lengths[b] keys. q [B, Lq, N, d], k/v [B, Lk, N, d].

  kv_multiple: cuDNN only, the key-length multiple that runs unpadded (None or 0: CUDNN_KV_MULTIPLE)."""
  if backend == "xla":
    return _xla_attention(q, k, v, kv_seq_lengths, scale)
  if backend == "cudnn":
    return cudnn_attention(q, k, v, kv_seq_lengths, scale, kv_multiple=kv_multiple or None)
  if backend == "chunked":
    return chunked_attention(q, k, v, kv_seq_lengths, chunk_size=chunk_size, scale=scale)
  raise ValueError(f"attention backend must be 'xla', 'cudnn' or 'chunked', got {backend!r}")


def _xla_attention(q, k, v, kv_seq_lengths, scale):
  return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=kv_seq_lengths,
                                      implementation="xla")


def pad_kv(k: jax.Array, v: jax.Array, kv_seq_lengths: jax.Array | None, multiple: int | None = None):
  """Zero-pads keys/values along L to a multiple of `multiple` (default CUDNN_KV_MULTIPLE).

  Returns (k, v, lengths): lengths [B] int32 masks the padding, or is None when nothing was padded and no
  lengths were given, so the kernel runs without a mask.
  """
  multiple = CUDNN_KV_MULTIPLE if multiple is None else multiple
  b, lk = k.shape[:2]
  pad = (-lk) % multiple
  if kv_seq_lengths is None and not pad:
    return k, v, None
  lengths = (jnp.full((b,), lk, jnp.int32) if kv_seq_lengths is None
             else jnp.asarray(kv_seq_lengths, jnp.int32))
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    k, v = jnp.pad(k, widths), jnp.pad(v, widths)
  return k, v, lengths


def cudnn_attention(q, k, v, kv_seq_lengths=None, scale=None, *, implementation: str = "cudnn",
                    kv_multiple: int | None = None):
  """cuDNN flash attention, keys padded to a multiple of `kv_multiple` (default CUDNN_KV_MULTIPLE) where needed.

  `implementation` is overridable so tests run the padding logic on the xla kernel.
  """
  k, v, lengths = pad_kv(k, v, kv_seq_lengths, kv_multiple)
  in_dtype = q.dtype
  if implementation == "cudnn" and in_dtype == jnp.float32:
    # cuDNN flash attention runs only in half precision; float32 callers get a bf16 kernel.
    q, k, v = (t.astype(jnp.bfloat16) for t in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out.astype(in_dtype)


def chunked_attention(q, k, v, kv_seq_lengths=None, *, chunk_size: int = 1024, scale=None):
  """Memory-bounded attention: lax.scan over query blocks, and inside it over key blocks (online softmax)."""
  b, lq, n, d = q.shape
  lk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  qc, kc = min(chunk_size, lq), min(chunk_size, lk)
  lengths = (jnp.full((b,), lk, jnp.int32) if kv_seq_lengths is None
             else jnp.asarray(kv_seq_lengths, jnp.int32))
  q_pad, k_pad = (-lq) % qc, (-lk) % kc
  q = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, k_pad), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, k_pad), (0, 0), (0, 0)))
  nq, nk = q.shape[1] // qc, k.shape[1] // kc
  # Blocks on a leading axis for scan: [nq, B, qc, N, d] and [nk, B, kc, N, d].
  q_blocks = q.reshape(b, nq, qc, n, d).swapaxes(0, 1)
  k_blocks = k.reshape(b, nk, kc, n, d).swapaxes(0, 1)
  v_blocks = v.reshape(b, nk, kc, n, d).swapaxes(0, 1)
  key_pos = jnp.arange(nk * kc).reshape(nk, kc)
  valid = key_pos[:, None, :] < lengths[None, :, None]                       # [nk, B, kc]

  @functools.partial(jax.checkpoint, prevent_cse=False)  # backward recomputes block scores
  def key_step(carry, blk):
    m, l, acc, qb = carry                                                    # m, l: [B, N, qc]
    kb, vb, ok = blk
    s = jnp.einsum("bqnd,bknd->bnqk", qb, kb, preferred_element_type=jnp.float32) * scale
    s = jnp.where(ok[:, None, None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])                                        # [B, N, qc, kc] float32
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(-1)
    pv = jnp.einsum("bnqk,bknd->bqnd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    acc = acc * corr.transpose(0, 2, 1)[..., None] + pv                      # [B, qc, N, d] float32
    return (m_new, l, acc, qb), None

  def query_block(qb):
    init = (jnp.full((b, n, qc), _MASKED, jnp.float32), jnp.zeros((b, n, qc), jnp.float32),
            jnp.zeros((b, qc, n, d), jnp.float32), qb)
    (_, l, acc, _), _ = jax.lax.scan(key_step, init, (k_blocks, v_blocks, valid))
    return acc / l.transpose(0, 2, 1)[..., None]

  out = jax.lax.map(query_block, q_blocks)                                   # [nq, B, qc, N, d]
  out = out.swapaxes(0, 1).reshape(b, nq * qc, n, d)[:, :lq]
  return out.astype(q.dtype)
