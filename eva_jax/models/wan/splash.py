"""The 'splash' attention backend: jax's Pallas splash attention kernel (TPU flash attention).

  out = splash_attention(q, k, v, kv_seq_lengths, blocks=(2048, 2048, 512))   # q [B, Lq, N, d] -> [B, Lq, N, d]

The kernel works on one example in [heads, length, head_dim] and applies no softmax scale, so:
  * q is multiplied by the scale (1/sqrt(d)) before the call;
  * q and k/v are zero-padded along the sequence to multiples of their blocks (15,600 video tokens are not a
    multiple of 128) and d to a multiple of 128 (zero columns change no dot product; the extra output columns
    are dropped);
  * a full (non-causal) mask with segment ids hides padded keys: valid keys get id 1, padding id 0, and every
    query row, padded rows too, gets id 1, so no row is all-masked (its softmax would divide by zero);
  * when the valid key count is the same for every example (no lengths, or one python int) the batch is folded
    into the heads and one kernel call does it all; per-example lengths [B] vmap the kernel over the batch.
Forward and the fused backward kernel (dq, dk, dv in one pass) use the same blocks.

Block sizes (block_q, block_kv, block_kv_compute) are multiples of 128 with block_kv a multiple of
block_kv_compute. DEFAULT_BLOCKS follows maxdiffusion's Wan 2.1 I2V-14B preset; at EVA's 15,600 tokens they pad q
and k to 16,384 (about 10 % more attention FLOPs than unpadded). Short sequences (text 512, CLIP 257) shrink the
blocks to fit. Set others with config.model.attention='splash:BQ,BKV,BKVC' and time them with
`python scripts/bench.py dit-block --size eva --attention=splash:...` (docs/scale.md, "TPU pods").

On CPU the kernel runs only under Pallas's TPU interpret mode (tests: `pltpu.force_tpu_interpret_mode()`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DEFAULT_BLOCKS = (2048, 2048, 512)   # block_q, block_kv, block_kv_compute
LANES = 128                          # TPU vector lane width: block sizes and head_dim are padded to multiples of it
# Tests on CPU: True runs every splash kernel through Pallas's generic interpreter (interpret=True). Unlike TPU
# interpret mode, whose host callbacks jax cannot rematerialise, it runs under nnx.remat.
INTERPRET = False


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def fit_blocks(lq: int, lk: int, blocks=None) -> tuple[int, int, int]:
  """The (block_q, block_kv, block_kv_compute) used for lq queries and lk keys: `blocks` shrunk to the sequence
  when it is shorter. Raises a ValueError naming config.model.attention when `blocks` break the kernel's rules."""
  bq, bkv, bkvc = DEFAULT_BLOCKS if blocks is None else blocks
  if any(b <= 0 or b % LANES for b in (bq, bkv, bkvc)) or bkv % bkvc:
    raise ValueError(f"config.model.attention='splash:{bq},{bkv},{bkvc}': splash block sizes must be positive "
                     f"multiples of {LANES}, and block_kv ({bkv}) a multiple of block_kv_compute ({bkvc})")
  bq = min(bq, _round_up(lq, LANES))
  bkvc = min(bkvc, _round_up(lk, LANES))
  bkv = min(bkv, _round_up(lk, bkvc))
  return bq, bkv, bkvc


def _interpret_mode() -> bool:
  """True under pltpu.force_tpu_interpret_mode() (Pallas TPU kernels simulated on CPU)."""
  from jax._src import config as jax_config
  flag = getattr(jax_config, "pallas_tpu_interpret_mode_context_manager", None)
  return flag is not None and flag.value is not None


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, lq: int, lk: int, blocks: tuple[int, int, int], interpret: bool):
  """A splash kernel for [heads, lq, d] queries against [heads, lk, d] keys: full mask, fused backward."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sam
  bq, bkv, bkvc = blocks
  sizes = sak.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkvc, block_q_dkv=bq, block_kv_dkv=bkv,
                         block_kv_dkv_compute=bkvc, use_fused_bwd_kernel=True)
  mask = sam.MultiHeadMask([sam.FullMask((lq, lk))] * heads)
  with jax.ensure_compile_time_eval():  # its block tables are concrete arrays, cached across traces
    return sak.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_seq_lengths: jax.Array | int | None = None,
                     scale: float | None = None, *, blocks=None, interpret: bool = False) -> jax.Array:
  """softmax(q k^T * scale) v over the first kv_seq_lengths keys with the splash kernel. q [B, Lq, N, d],
  k/v [B, Lk, N, d]; kv_seq_lengths [B] int, one int for all, or None. `interpret=True` runs the kernel through
  Pallas's generic interpreter (CPU tests of the vmapped path).

  XLA cannot partition a Pallas kernel: under a mesh (jax.set_mesh) the kernel runs in a shard_map, each device
  on its examples (act_batch), heads (act_heads) and, for q, its sequence shard (act_seq; keys stay whole), as
  the rules table in eva_jax/parallel/sharding.py places them. Inside a shard_map (Ulysses) it runs as is."""
  from eva_jax.models.wan.attention import current_platform
  interpret = interpret or INTERPRET
  if current_platform() != "tpu" and not (interpret or _interpret_mode()):
    raise ValueError(f"config.model.attention='splash' runs on TPU ({current_platform().upper()} here; on CPU only "
                     "under pltpu.force_tpu_interpret_mode()). Use 'auto' or 'chunked' on CPU, 'cudnn' on GPU.")
  local = functools.partial(_splash_local, scale=scale, blocks=blocks, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return local(q, k, v, kv_seq_lengths)
  q_spec, kv_spec, batch_spec = _specs(mesh, q.shape, k.shape)
  if kv_seq_lengths is None or isinstance(kv_seq_lengths, int):
    fn = lambda q, k, v: local(q, k, v, kv_seq_lengths)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)
  lengths = jnp.asarray(kv_seq_lengths, jnp.int32)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, jax.P(batch_spec)),
                       out_specs=q_spec, check_vma=False)(q, k, v, lengths)


def _specs(mesh, q_shape, k_shape):
  """PartitionSpecs of q and k/v [B, L, N, d] (and the batch entry) from the logical rules; a dimension that
  does not divide over its mesh axes is left whole (gathered) rather than refused."""
  from eva_jax.parallel.sharding import _drop_absent_axes, logical_to_spec
  spec = _drop_absent_axes(logical_to_spec(("act_batch", "act_seq", "act_heads", None)), mesh)

  def fit(entry, size):
    axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    return entry if size % math.prod(mesh.shape[a] for a in axes) == 0 else None
  b, s, h = fit(spec[0], q_shape[0]), fit(spec[1], q_shape[1]), fit(spec[2], q_shape[2])
  return jax.P(b, s, h, None), jax.P(b, None, h, None), b


def _splash_local(q, k, v, kv_seq_lengths, *, scale, blocks, interpret):
  """splash_attention on one device's arrays."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak
  b, lq, n, d = q.shape
  lk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  bq, bkv, bkvc = fit_blocks(lq, lk, blocks)
  lq_pad, lk_pad, d_pad = _round_up(lq, bq), _round_up(lk, bkv), _round_up(d, LANES)

  # [B, L, N, d] -> [B, N, L_pad, d_pad], q pre-scaled (in float32, then back to the compute dtype).
  def to_kernel(x, l_pad):
    x = jnp.pad(x, ((0, 0), (0, l_pad - x.shape[1]), (0, 0), (0, d_pad - d)))
    return x.transpose(0, 2, 1, 3)
  qk = to_kernel((q.astype(jnp.float32) * scale).astype(q.dtype), lq_pad)
  kk, vk = to_kernel(k, lk_pad), to_kernel(v, lk_pad)

  uniform = kv_seq_lengths is None or isinstance(kv_seq_lengths, int)
  valid = lk if kv_seq_lengths is None else kv_seq_lengths
  q_ids = jnp.ones((lq_pad,), jnp.int32)                                   # every query row valid: finite output
  if uniform:
    # One mask for the whole batch: fold the batch into the heads, one kernel call.
    seg = None
    if valid < lk_pad:
      seg = sak.SegmentIds(q=q_ids, kv=(jnp.arange(lk_pad) < valid).astype(jnp.int32))
    kernel = _kernel(b * n, lq_pad, lk_pad, (bq, bkv, bkvc), interpret)
    fold = lambda x: x.reshape(b * n, *x.shape[2:])
    out = kernel(fold(qk), fold(kk), fold(vk), seg).reshape(b, n, lq_pad, d_pad)
  else:
    lengths = jnp.asarray(kv_seq_lengths, jnp.int32)
    seg = sak.SegmentIds(q=jnp.broadcast_to(q_ids, (b, lq_pad)),
                         kv=(jnp.arange(lk_pad)[None] < lengths[:, None]).astype(jnp.int32))   # [B, Lk_pad]
    kernel = _kernel(n, lq_pad, lk_pad, (bq, bkv, bkvc), interpret)
    if _interpret_mode():
      # jax 0.10's TPU interpret mode cannot batch a kernel's grid (vmap adds a grid axis it has no semantics
      # for): one call per example instead. On TPU the kernel is vmapped.
      out = jax.lax.map(lambda xs: kernel(*xs[:3], sak.SegmentIds(*xs[3:])), (qk, kk, vk, seg.q, seg.kv))
    else:
      out = jax.vmap(kernel)(qk, kk, vk, seg)
  return out.transpose(0, 2, 1, 3)[:, :lq, :, :d].astype(q.dtype)


def padded_fraction(tokens: int, blocks=None) -> float:
  """Extra attention work from padding `tokens` self-attention tokens to the blocks (0.10 = 10 % more)."""
  bq, bkv, _ = fit_blocks(tokens, tokens, blocks)
  return _round_up(tokens, bq) * _round_up(tokens, bkv) / tokens ** 2 - 1.0

