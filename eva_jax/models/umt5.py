"""umT5 encoder (the Wan 2.1 text encoder, umT5-XXL) in Flax NNX.

Architecture (spec/wan.md C.2): token embedding, N pre-norm blocks, final T5 layer norm. Each block
has its own relative-position bias table (umT5, unlike T5, does not share it), attention without the
1/sqrt(d) scale, and a gated GELU(tanh) FFN. T5 layer norm is an RMS norm with float32 statistics and
no mean subtraction. Blocks are stacked along a leading 'layers' axis and applied with `nnx.scan`.

    cfg = umt5_config('umt5-xxl', dtype=jnp.bfloat16)
    enc = UMT5Encoder(cfg, rngs=nnx.Rngs(0))
    hidden = enc(ids, mask)                          # [B, L, 4096]
    embeds = encode_prompts(enc, tokenizer, texts)   # [B, 512, 4096], zero past each true length

Weights: `convert/umt5.py` (Wan `models_t5_umt5-xxl-enc-bf16.pth` and HF `UMT5EncoderModel`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax.parallel.sharding import constrain


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """Sizes of the umT5 encoder. `dtype` is the compute dtype, `param_dtype` the storage dtype."""
  vocab_size: int = 256_384
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10_240
  num_layers: int = 24
  num_heads: int = 64
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  text_len: int = 512           # the DiT's text context length (pad/truncate target)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


UMT5_PRESETS: dict[str, dict[str, Any]] = {
    "umt5-xxl": {},
    # Small enough for CPU tests; the vocabulary covers the tiny test tokenizers.
    "tiny": dict(vocab_size=256, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 num_buckets=32, max_distance=128),
}


def umt5_config(name: str = "umt5-xxl", **overrides) -> UMT5Config:
  """A preset by name ('umt5-xxl', 'tiny') with fields overridden by keyword."""
  if name not in UMT5_PRESETS:
    raise KeyError(f"unknown umT5 preset {name!r}; known: {sorted(UMT5_PRESETS)}")
  return UMT5Config(**{**UMT5_PRESETS[name], **overrides})


# MARK: relative position buckets


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
  """Bidirectional T5 buckets for every (query, key) pair: int32 [q_len, k_len].

  Half of the buckets are for keys after the query. Within a direction, distances below
  `num_buckets // 4` get their own bucket, larger ones share log-spaced buckets up to `max_distance`.
  Computed in float32 like the PyTorch references so that boundary distances land identically.
  """
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # key - query
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  max_exact = half // 2
  safe = np.maximum(dist, 1).astype(np.float32)  # distance 0 takes the exact branch below
  log_ratio = np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets += np.where(dist < max_exact, dist, large)
  return buckets.astype(np.int32)


# MARK: layers


def _dense(d_in: int, d_out: int, names: tuple[str, str], cfg: UMT5Config, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names), rngs=rngs)


class T5LayerNorm(nnx.Module):
  """RMS norm: x * rsqrt(mean(x^2) + eps) * scale, statistics in float32, no bias, no centering."""

  def __init__(self, dim: int, cfg: UMT5Config):
    self.eps = cfg.eps
    self.dtype = cfg.dtype
    self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)  # float32 statistics, as in the reference
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y.astype(self.dtype) * self.scale[...].astype(self.dtype))


class UMT5Attention(nnx.Module):
  """Self-attention with a per-layer relative position bias and no logit scaling."""

  def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
    self.q = _dense(cfg.d_model, inner, ("embed", "heads"), cfg, rngs)
    self.k = _dense(cfg.d_model, inner, ("embed", "heads"), cfg, rngs)
    self.v = _dense(cfg.d_model, inner, ("embed", "heads"), cfg, rngs)
    self.o = _dense(inner, cfg.d_model, ("heads", "embed"), cfg, rngs)
    # [num_buckets, heads]: looked up by bucket index, one table per layer.
    self.rel_bias = nnx.Param(
        nnx.initializers.normal(1.0)(rngs.params(), (cfg.num_buckets, cfg.num_heads), cfg.param_dtype),
        out_sharding=(None, "heads"))

  def __call__(self, x: jax.Array, buckets: jax.Array, mask_bias: jax.Array) -> jax.Array:
    # x [B, L, D]; buckets int [L, L]; mask_bias [B, 1, 1, L] (0 or float32 min)
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, self.d_kv)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))  # [B, L, N, d]
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k)  # no 1/sqrt(d): T5 folds it into the init
    pos_bias = jnp.transpose(self.rel_bias[...][buckets], (2, 0, 1))[None]  # [1, N, L, L]
    # Softmax in float32 with the bias and padding mask added there.
    logits = logits.astype(jnp.float32) + pos_bias.astype(jnp.float32) + mask_bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, l, self.num_heads * self.d_kv)
    return self.o(out)


class UMT5GatedFFN(nnx.Module):
  """wo( gelu_tanh(wi_0 x) * wi_1 x )."""

  def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
    self.wi_0 = _dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
    self.wi_1 = _dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
    self.wo = _dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x)
    h = constrain(h, ("act_batch", "act_text", "act_mlp"))
    return self.wo(h)


class UMT5Block(nnx.Module):
  """Pre-norm block: x + attn(norm1 x); x + ffn(norm2 x)."""

  def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
    self.norm1 = T5LayerNorm(cfg.d_model, cfg)
    self.attn = UMT5Attention(cfg, rngs)
    self.norm2 = T5LayerNorm(cfg.d_model, cfg)
    self.ffn = UMT5GatedFFN(cfg, rngs)

  def __call__(self, x: jax.Array, buckets: jax.Array, mask_bias: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), buckets, mask_bias)
    x = x + self.ffn(self.norm2(x))
    return constrain(x, ("act_batch", "act_text", "act_embed"))


# MARK: encoder


class UMT5Encoder(nnx.Module):
  """ids [B, L] int, mask [B, L] (1 = token, 0 = padding) -> hidden states [B, L, d_model]."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")), rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r: nnx.Rngs) -> UMT5Block:
      return UMT5Block(cfg, r)

    self.blocks = make_blocks(rngs)
    self.final_norm = T5LayerNorm(cfg.d_model, cfg)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    b, l = ids.shape
    if mask is None:
      mask = jnp.ones((b, l), jnp.int32)
    x = self.embed(ids)  # [B, L, D]
    x = constrain(x, ("act_batch", "act_text", "act_embed"))
    buckets = jnp.asarray(relative_position_buckets(l, l, self.cfg.num_buckets, self.cfg.max_distance))
    # Padded keys get the most negative float32, like the references (finite, so no NaN rows).
    mask_bias = jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]

    # The encoder is frozen in EVA (inference only), so blocks are not rematerialised.
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def run(block: UMT5Block, x: jax.Array) -> jax.Array:
      return block(x, buckets, mask_bias)

    x = run(self.blocks, x)
    return self.final_norm(x)


# MARK: prompts -> DiT context


def pad_to_length(hidden: jax.Array, lengths: jax.Array, text_len: int) -> jax.Array:
  """Zeroes every position at or past each row's true length and pads/truncates to `text_len`.

  hidden [B, L, D], lengths [B] -> [B, text_len, D]. This is Wan's "trim to seq_len, then zero-pad to
  512" done without ragged arrays.
  """
  b, l, d = hidden.shape
  if l < text_len:
    hidden = jnp.pad(hidden, ((0, 0), (0, text_len - l), (0, 0)))
  hidden = hidden[:, :text_len]
  keep = jnp.arange(text_len)[None, :] < lengths[:, None]  # [B, text_len]
  return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype))


@nnx.jit
def _encode_padded(encoder: UMT5Encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
  hidden = encoder(ids, mask)
  return pad_to_length(hidden, mask.sum(axis=-1), encoder.cfg.text_len)


def encode_ids(encoder: UMT5Encoder, ids, mask, bucket: int | None = 64) -> jax.Array:
  """Token ids/mask [B, L] -> DiT text context [B, text_len, D] (jitted; zero past each true length).

  With `bucket`, the padded tail is cut to the longest prompt rounded up to a multiple of `bucket`
  before encoding. Valid positions are unchanged (padded keys are masked and the relative bias only
  depends on distances), and short captions cost a fraction of the full 512 tokens; at most
  512 / bucket shapes are compiled. `bucket=None` encodes the full padded length, as Wan does.
  """
  ids, mask = np.asarray(ids), np.asarray(mask)
  if bucket:
    longest = int(mask.sum(axis=-1).max(initial=1))
    keep = min(ids.shape[1], max(bucket, -(-longest // bucket) * bucket))
    ids, mask = ids[:, :keep], mask[:, :keep]
  return _encode_padded(encoder, jnp.asarray(ids), jnp.asarray(mask))


def encode_prompts(encoder: UMT5Encoder, tokenizer, prompts: Sequence[str],
                   bucket: int | None = 64) -> jax.Array:
  """Prompts -> [B, text_len, D]: tokenised to text_len, encoded, zero past each true length.

  `tokenizer` is an `eva_jax.models.tokenizer.T5Tokenizer` (or anything whose call returns
  `(ids [B, L], mask [B, L])`); `bucket` as in `encode_ids`.
  """
  ids, mask = tokenizer(list(prompts))
  return encode_ids(encoder, ids, mask, bucket)
