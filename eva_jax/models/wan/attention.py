"""Multi-head attention as one pure function of (q, k, v) with selectable backends.

Layout is [B, L, N, d] throughout (batch, tokens, heads, head dim), non-causal, softmax scale 1/sqrt(d).

Backends:
  'xla'     jax.nn.dot_product_attention(implementation='xla'): materialises the [B, N, Lq, Lk] scores.
  'cudnn'   cuDNN flash attention (GPU). A key length that is not a multiple of `CUDNN_KV_MULTIPLE` is padded to
            one and the padding masked with `key_value_seq_lengths`, because the cuDNN backward refuses some key
            lengths (e.g. 257 CLIP tokens). Lengths that need no padding run without a mask (the fastest kernel).
  'chunked' online-softmax attention over query and key blocks with lax.scan: memory O(chunk^2) instead of
            O(Lq * Lk), so long sequences run on CPU. Equal to 'xla' to float32 rounding.
  'splash'  Pallas splash attention (TPU flash attention, forward and fused backward; splash.py).
            'splash:BQ,BKV,BKVC' sets its query / key / key-compute block sizes.
  'auto'    cudnn on GPU, splash on TPU, chunked on CPU (resolve_backend), from the platform of the devices of the
            mesh in context (jax.set_mesh), else of jax.devices().

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
              kv_seq_lengths: jax.Array | int | None = None, chunk_size: int = 1024,
              scale: float | None = None, kv_multiple: int | None = None) -> jax.Array:
  """softmax(q k^T * scale) v over the first kv_seq_lengths[b] keys. q [B, Lq, N, d], k/v [B, Lk, N, d].

  kv_seq_lengths: [B] int32, or one python int for every example (static: splash then masks without a
  per-example kernel); None = all keys.
  kv_multiple: cuDNN only, the key-length multiple that runs unpadded (None or 0: CUDNN_KV_MULTIPLE).
  """
  backend = resolve_backend(backend, current_platform())
  if backend.startswith("splash"):
    from eva_jax.models.wan.splash import splash_attention  # Pallas TPU imports only where splash runs
    return splash_attention(q, k, v, kv_seq_lengths, scale, blocks=parse_backend(backend)[1])
  if isinstance(kv_seq_lengths, int):
    kv_seq_lengths = jnp.full((q.shape[0],), kv_seq_lengths, jnp.int32)
  if backend == "xla":
    return _xla_attention(q, k, v, kv_seq_lengths, scale)
  if backend == "cudnn":
    return cudnn_attention(q, k, v, kv_seq_lengths, scale, kv_multiple=kv_multiple or None)
  if backend == "chunked":
    if max(q.shape[1], k.shape[1]) <= chunk_size:  # one block: the same O(chunk^2) memory, the plain kernel
      return _xla_attention(q, k, v, kv_seq_lengths, scale)
    return chunked_attention(q, k, v, kv_seq_lengths, chunk_size=chunk_size, scale=scale)
  raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


# MARK: backend choice

BACKENDS = ("auto", "xla", "cudnn", "chunked", "splash")
# Where a platform cannot run a backend (config.model.attention names the choice in every config).
_UNSUPPORTED = {"cudnn": ("cpu", "tpu"), "splash": ("gpu",)}
# Set by tools that trace for another platform than the devices they hold (scripts/plan_memory.py lowers
# TPU programs on CPU devices); None = the platform of the mesh in context, else of jax.devices().
TARGET_PLATFORM: str | None = None


def parse_backend(spec: str) -> tuple[str, tuple[int, ...] | None]:
  """'splash:2048,2048,512' -> ('splash', (2048, 2048, 512)); other names -> (name, None). Raises on a bad spec."""
  name, _, rest = spec.partition(":")
  if name not in BACKENDS:
    raise ValueError(f"config.model.attention must be one of {BACKENDS} (or 'splash:BQ,BKV,BKVC'), got {spec!r}")
  if not rest:
    return name, None
  try:
    blocks = tuple(int(x) for x in rest.split(","))
  except ValueError:
    blocks = ()
  if name != "splash" or len(blocks) != 3:
    raise ValueError(f"config.model.attention={spec!r}: only 'splash' takes block sizes, as "
                     "'splash:BQ,BKV,BKVC' (query, key and key-compute blocks, e.g. 'splash:2048,2048,512')")
  return name, blocks


def backend_rule(spec) -> str | None:
  """config.model.attention's rule (eva_jax.utils.checks): None for a spec parse_backend reads, else what
  was expected."""
  try:
    parse_backend(spec)
    return None
  except (ValueError, AttributeError, TypeError):
    return f"one of {list(BACKENDS)}, or 'splash:BQ,BKV,BKVC' (block sizes)"


def canonical_platform(platform: str) -> str:
  """jax platform names to 'gpu' | 'tpu' | 'cpu' ('cuda' and 'rocm' are GPUs)."""
  platform = platform.lower()
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def resolve_backend(backend: str, platform: str) -> str:
  """The backend that runs `backend` ('auto' or an explicit choice) on `platform` ('gpu', 'cuda', 'tpu', 'cpu').

  auto: cudnn on GPU, splash on TPU, chunked elsewhere. An explicit choice is kept; one the platform cannot run
  (cudnn off GPU, splash on GPU) is a ValueError that names config.model.attention.
  """
  name, _ = parse_backend(backend)
  platform = canonical_platform(platform)
  if name == "auto":
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "chunked")
  if platform in _UNSUPPORTED.get(name, ()):
    fits = resolve_backend("auto", platform)
    raise ValueError(f"config.model.attention={backend!r} cannot run on {platform.upper()}: cudnn runs on GPUs, "
                     f"splash on TPUs (and on CPU only under Pallas interpret mode). Use 'auto' (here: "
                     f"{fits!r}), 'xla' or 'chunked'.")
  return backend


def current_platform() -> str:
  """The platform attention is traced for: TARGET_PLATFORM, else that of the mesh in context, else jax.devices()."""
  if TARGET_PLATFORM:
    return canonical_platform(TARGET_PLATFORM)
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
  platform = getattr(device, "platform", None)
  return canonical_platform(platform or jax.devices()[0].platform)


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
