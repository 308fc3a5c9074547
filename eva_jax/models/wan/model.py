"""The Wan 2.1 diffusion transformer (WanModel, spec wan.md A) in Flax NNX, channels-last, with EVA's per-frame
timesteps (eva.md A.2).

  model = WanModel(wan_config('tiny-i2v'), rngs=nnx.Rngs(0))
  v = model(x, t, context, clip_fea, y)   # x [B, F, H, W, 16], t [B] or [B, F] on 0..1000 -> velocity like x
  kv = model.context_kv(context, clip_fea)            # cross-attention K/V of every block, once per video
  v = model(x, t, None, None, y, context_kv=kv)       # the same velocity without recomputing them

Precision follows Wan: time embedding, modulation, norms, RoPE and the residual stream in float32; matmuls in
cfg.dtype. cfg.precision='eva' runs the time embedding, modulation, gates, residual and head in cfg.dtype, as
EVA's fork does (docs/models.md, "Precision modes"). The blocks are stacked on a leading 'layers' axis and applied with nnx.scan (cfg.scan_layers), each
wrapped in nnx.remat by cfg.remat; with scan_layers=False they are a python list run in a loop.

Exact fusions, each a WanConfig switch that leaves the parameter tree alone (docs/benchmarks.md): fuse_qkv (one
q/k/v matmul, LoRA deltas added per slice), fused_rope (rope.py), and the cross-attention K/V, which depend only
on the text and CLIP context, computed once by `context_kv` and passed back in (the sampler does, per video).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eva_jax.models.lora import LoRALinear
from eva_jax.models.wan.attention import attention
from eva_jax.models.wan.config import WanConfig
from eva_jax.models.wan.layers import (LayerNorm, Linear, RMSNorm, fused_linear, gate, layer_norm, modulate,
                                       timestep_sinusoid)
from eva_jax.models.wan.rope import apply_rope, rope_tables
from eva_jax.models.wan.context_parallel import self_attention
from eva_jax.parallel.sharding import constrain

_ACT = ("act_batch", "act_seq", "act_embed")


def _linear(cfg: WanConfig, name: str, din: int, dout: int, names, rngs, *, fp32: bool = False,
            in_block: bool = False, **kw):
  """A Linear, or a LoRALinear when `name` is a LoRA target and cfg.lora_rank > 0. Only the blocks' matmuls
  follow cfg.matmul_dtype (fp8); the embeddings and the head stay in the compute dtype."""
  dtype = cfg.stream_dtype if fp32 else cfg.compute_dtype  # fp32: Wan's float32 regions (cfg.precision)
  matmul_dtype = cfg.matmul_dtype if in_block and not fp32 else "default"
  common = dict(names=names, dtype=dtype, param_dtype=cfg.weight_dtype, matmul_dtype=matmul_dtype, rngs=rngs, **kw)
  if cfg.lora_rank > 0 and name in cfg.lora_targets:
    return LoRALinear(din, dout, rank=cfg.lora_rank, alpha=cfg.lora_alpha, **common)
  return Linear(din, dout, **common)


def _init_projections(module: nnx.Module, cfg: WanConfig, rngs: nnx.Rngs) -> None:
  """The q, k, v, o projections and the q/k RMSNorms over the full width that both attentions share."""
  module.cfg = cfg
  d = cfg.dim
  for name in ("q", "k", "v"):
    setattr(module, name, _linear(cfg, name, d, d, ("embed", "heads"), rngs, in_block=True))
  module.o = _linear(cfg, "o", d, d, ("heads", "embed"), rngs, in_block=True)
  module.norm_q = RMSNorm(d, eps=cfg.eps, param_dtype=cfg.weight_dtype)
  module.norm_k = RMSNorm(d, eps=cfg.eps, param_dtype=cfg.weight_dtype)


# MARK: attention layers

class SelfAttention(nnx.Module):
  """q, k, v, o projections, RMSNorm of q and k over the full width, 3D RoPE."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    _init_projections(self, cfg, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, l, _ = x.shape
    heads = (b, l, cfg.num_heads, cfg.head_dim)
    if cfg.fuse_qkv:  # one [D, 3, D] matmul; each adapter's delta goes to its own slice
      q, k, v = fused_linear((self.q, self.k, self.v), x)
    else:
      q, k, v = self.q(x), self.k(x), self.v(x)
    q = apply_rope(self.norm_q(q).reshape(heads), cos, sin, fused=cfg.fused_rope)  # [B, L, N, d]
    k = apply_rope(self.norm_k(k).reshape(heads), cos, sin, fused=cfg.fused_rope)
    v = v.reshape(heads)
    # Ulysses sequence parallelism when the mesh in context has a 'context' axis (eva_jax/models/wan/context_parallel.py).
    out = self_attention(q, k, v, backend=cfg.attention, chunk_size=cfg.attn_chunk_size,
                         kv_multiple=cfg.cudnn_kv_multiple)
    return self.o(out.reshape(b, l, cfg.dim))


class CrossAttention(nnx.Module):
  """Attention to the text tokens; i2v adds a second softmax over the CLIP tokens, summed before `o`."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    _init_projections(self, cfg, rngs)
    d = cfg.dim
    if cfg.is_i2v:
      self.k_img = _linear(cfg, "k_img", d, d, ("embed", "heads"), rngs, in_block=True)
      self.v_img = _linear(cfg, "v_img", d, d, ("embed", "heads"), rngs, in_block=True)
      self.norm_k_img = RMSNorm(d, eps=cfg.eps, param_dtype=cfg.weight_dtype)

  def _split(self, t: jax.Array) -> jax.Array:
    return t.reshape(t.shape[0], t.shape[1], self.cfg.num_heads, self.cfg.head_dim)

  def context_kv(self, ctx: jax.Array | None, img: jax.Array | None) -> dict[str, jax.Array]:
    """The keys and values of the embedded text ctx [B, L_text, D] -> 'k', 'v' [B, L_text, N, d], and of the
    CLIP tokens img [B, 257, D] -> 'k_img', 'v_img' (i2v); a None input leaves its pair out."""
    kv = {}
    if ctx is not None:
      kv["k"], kv["v"] = self._split(self.norm_k(self.k(ctx))), self._split(self.v(ctx))
    if img is not None and self.cfg.is_i2v:
      kv["k_img"], kv["v_img"] = self._split(self.norm_k_img(self.k_img(img))), self._split(self.v_img(img))
    return kv

  def __call__(self, x: jax.Array, ctx: jax.Array | None, img: jax.Array | None,
               kv: dict[str, jax.Array] | None = None) -> jax.Array:
    """kv: `context_kv(ctx, img)` computed earlier (ctx and img are then not read)."""
    cfg = self.cfg
    b, l, _ = x.shape
    kv = self.context_kv(ctx, img) if kv is None else kv
    q = self._split(self.norm_q(self.q(x)))                                    # [B, L, N, d]
    attend = lambda k, v: attention(q, k, v, backend=cfg.attention, chunk_size=cfg.attn_chunk_size,
                                    kv_multiple=cfg.cudnn_kv_multiple)
    out = attend(kv["k"], kv["v"])                                             # text: [B, 512, N, d] keys
    if cfg.is_i2v:
      out = out + attend(kv["k_img"], kv["v_img"])                             # CLIP: [B, 257, N, d] keys
    return self.o(out.reshape(b, l, cfg.dim))


class FeedForward(nnx.Module):
  """Linear(D, F) -> GELU(tanh) -> Linear(F, D)."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.fc1 = _linear(cfg, "fc1", cfg.dim, cfg.ffn_dim, ("embed", "mlp"), rngs, in_block=True)
    self.fc2 = _linear(cfg, "fc2", cfg.ffn_dim, cfg.dim, ("mlp", "embed"), rngs, in_block=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


# MARK: block

class WanBlock(nnx.Module):
  """adaLN-modulated self-attention, un-modulated cross-attention (affine norm3), modulated FFN (spec A.3)."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # Wan's `modulation` [1, 6, D] stored as [6, D]: shift/scale/gate for attention, then for the FFN.
    self.modulation = nnx.Param(
        jax.random.normal(rngs.params(), (6, cfg.dim), cfg.weight_dtype) / cfg.dim ** 0.5,
        out_sharding=(None, "embed"))
    self.self_attn = SelfAttention(cfg, rngs=rngs)
    self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, affine=True, param_dtype=cfg.weight_dtype)
    self.cross_attn = CrossAttention(cfg, rngs=rngs)
    self.ffn = FeedForward(cfg, rngs=rngs)

  def __call__(self, x, e0, ctx, img, cos, sin, kv=None):
    """x [B, L, D] residual; e0 [B, T, 6, D] (T = 1 or frames), both in cfg.stream_dtype (float32 as Wan);
    kv: this block's precomputed cross-attention keys and values (CrossAttention.context_kv), or None."""
    cfg = self.cfg
    dt, sd = cfg.compute_dtype, cfg.stream_dtype
    x = constrain(x, _ACT)
    m = self.modulation[...].astype(sd) + e0                                   # [B, T, 6, D]
    h = modulate(layer_norm(x, cfg.eps).astype(sd), m[:, :, 0], m[:, :, 1], sd)
    x = x + gate(self.self_attn(h.astype(dt), cos, sin), m[:, :, 2], sd)
    x = x + self.cross_attn(self.norm3(x).astype(dt), ctx, img, kv).astype(sd)
    h = modulate(layer_norm(x, cfg.eps).astype(sd), m[:, :, 3], m[:, :, 4], sd)
    return x + gate(self.ffn(h.astype(dt)), m[:, :, 5], sd)


def remat_policy(name: str):
  """cfg.remat -> (wrap?, jax checkpoint policy)."""
  if name == "none":
    return False, None
  if name == "full":
    return True, None
  if name == "dots":
    return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name == "offload":
    return True, jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  raise ValueError(f"unknown remat policy {name!r}; expected none, full, dots or offload")


# MARK: embeddings and head

class TimeEmbedding(nnx.Module):
  """sinusoid(t) -> Linear -> SiLU -> Linear, in cfg.stream_dtype (float32 as Wan)."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.freq_dim = cfg.freq_dim
    self.dtype = cfg.stream_dtype
    self.fc1 = _linear(cfg, "fc1", cfg.freq_dim, cfg.dim, (None, "embed"), rngs, fp32=True)
    self.fc2 = _linear(cfg, "fc2", cfg.dim, cfg.dim, ("embed", None), rngs, fp32=True)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.silu(self.fc1(timestep_sinusoid(t, self.freq_dim).astype(self.dtype))))


class TextEmbedding(nnx.Module):
  """Linear(text_dim, D) -> GELU(tanh) -> Linear(D, D)."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.fc1 = _linear(cfg, "fc1", cfg.text_dim, cfg.dim, (None, "embed"), rngs)
    self.fc2 = _linear(cfg, "fc2", cfg.dim, cfg.dim, ("embed", None), rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class ImageEmbedding(nnx.Module):
  """Wan's MLPProj: LayerNorm(1280) -> Linear -> GELU (erf) -> Linear(1280, D) -> LayerNorm(D), eps 1e-5."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    c = cfg.image_dim
    self.norm1 = LayerNorm(c, eps=1e-5, param_dtype=cfg.weight_dtype)
    self.fc1 = _linear(cfg, "fc1", c, c, (None, None), rngs)
    self.fc2 = _linear(cfg, "fc2", c, cfg.dim, (None, "embed"), rngs)
    self.norm2 = LayerNorm(cfg.dim, eps=1e-5, param_dtype=cfg.weight_dtype)
    self.dtype = cfg.compute_dtype

  def __call__(self, x):
    h = self.fc2(jax.nn.gelu(self.fc1(self.norm1(x).astype(self.dtype)), approximate=False))
    return self.norm2(h).astype(self.dtype)


class Head(nnx.Module):
  """LayerNorm (no affine) modulated by the time embedding e, then Linear(D, prod(patch) * out_dim) in float32."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.eps
    self.dtype = cfg.stream_dtype
    self.modulation = nnx.Param(
        jax.random.normal(rngs.params(), (2, cfg.dim), cfg.weight_dtype) / cfg.dim ** 0.5,
        out_sharding=(None, "embed"))
    self.head = _linear(cfg, "head", cfg.dim, cfg.patch_volume * cfg.out_dim, ("embed", None), rngs,
                        fp32=True, kernel_init=nnx.initializers.zeros)

  def __call__(self, x: jax.Array, e: jax.Array) -> jax.Array:
    m = self.modulation[...].astype(self.dtype) + e[:, :, None]                # [B, T, 2, D]
    return self.head(modulate(layer_norm(x, self.eps).astype(self.dtype), m[:, :, 0], m[:, :, 1], self.dtype))


# MARK: model

class WanModel(nnx.Module):
  """Wan 2.1 DiT. __call__(x [B,F,H,W,16], t [B]|[B,F], context [B,Lt,text_dim], clip_fea, y) -> [B,F,H,W,16]."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pt, ph, pw = cfg.patch_size
    # Conv3d(in_dim, D, kernel = stride = patch) as a kernel [pt, ph, pw, C_in, D] on non-overlapping patches.
    self.patch_embedding = nnx.Module()
    self.patch_embedding.kernel = nnx.Param(
        jax.random.normal(rngs.params(), (pt, ph, pw, cfg.in_dim, cfg.dim), cfg.weight_dtype)
        * (2.0 / (cfg.patch_volume * cfg.in_dim + cfg.dim)) ** 0.5,
        out_sharding=(None, None, None, "conv_in", "embed"))
    self.patch_embedding.bias = nnx.Param(jnp.zeros((cfg.dim,), cfg.weight_dtype), out_sharding=("embed",))
    self.text_embedding = TextEmbedding(cfg, rngs=rngs)
    self.time_embedding = TimeEmbedding(cfg, rngs=rngs)
    self.time_projection = _linear(cfg, "time_projection", cfg.dim, 6 * cfg.dim, ("embed", None), rngs,
                                   fp32=True)
    if cfg.is_i2v:
      self.img_emb = ImageEmbedding(cfg, rngs=rngs)
    if cfg.scan_layers:
      self.blocks = _stacked_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List([WanBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.head = Head(cfg, rngs=rngs)

  def context_kv(self, context: jax.Array | None, clip_fea: jax.Array | None = None) -> dict[str, jax.Array]:
    """Every block's cross-attention keys and values for a context: they depend only on the prompt
    embedding context [B, L, text_dim] and the CLIP features clip_fea [B, 257, image_dim], not on x or t.
    Returns {'k', 'v'} from the context and {'k_img', 'v_img'} from clip_fea (i2v), each
    [num_layers, B, L, N, d]; a None input leaves its pair out (e.g. the empty prompt's text pair alone).
    Pass a complete set back as `__call__(..., context_kv=...)`."""
    cfg = self.cfg
    dt = cfg.compute_dtype
    ctx = None if context is None else self.text_embedding(_fit_text(context, cfg.text_len).astype(dt))
    img = self.img_emb(clip_fea.astype(dt)) if cfg.is_i2v and clip_fea is not None else None
    if not cfg.scan_layers:
      per_layer = [block.cross_attn.context_kv(ctx, img) for block in self.blocks]
      return jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def run(carry, block):
      return carry, block.cross_attn.context_kv(ctx, img)

    return run(0, self.blocks)[1]

  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array | None, clip_fea: jax.Array | None = None,
               y: jax.Array | None = None, *, context_kv: dict[str, jax.Array] | None = None) -> jax.Array:
    """context_kv: `self.context_kv(context, clip_fea)` computed earlier; context and clip_fea are then not
    read (pass None). Equal to the call without it."""
    cfg = self.cfg
    dt = cfg.compute_dtype
    if context_kv is not None:
      need = {"k", "v"} | ({"k_img", "v_img"} if cfg.is_i2v else set())
      if set(context_kv) != need:
        raise ValueError(f"context_kv has keys {sorted(context_kv)}, this {cfg.model_type} model needs "
                         f"{sorted(need)}")
    elif context is None:
      raise ValueError("WanModel needs a context [B, L, text_dim] (or context_kv)")
    if cfg.is_i2v:
      if clip_fea is None and context_kv is None:
        raise ValueError("an i2v WanModel needs clip_fea [B, 257, image_dim]")
      y = jnp.zeros(x.shape[:-1] + (cfg.in_dim - x.shape[-1],), x.dtype) if y is None else y
      x = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)                     # [B, F, H, W, 36]
    if x.shape[-1] != cfg.in_dim:
      raise ValueError(f"x (+ y) has {x.shape[-1]} channels, the config expects in_dim={cfg.in_dim}")
    b, f, hh, ww, c = x.shape
    pt, ph, pw = cfg.patch_size
    grid = (f // pt, hh // ph, ww // pw)
    if (grid[0] * pt, grid[1] * ph, grid[2] * pw) != (f, hh, ww):
      raise ValueError(f"latent {x.shape[1:4]} is not a multiple of the patch size {cfg.patch_size}")

    # Patch embedding: tokens row-major over (f, h, w).
    patches = x.reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, c).astype(dt)
    tokens = _patch_embed(patches, self.patch_embedding.kernel[...].astype(dt))    # [B, F', H', W', D]
    tokens = tokens + self.patch_embedding.bias[...].astype(dt)
    seq = tokens.reshape(b, grid[0] * grid[1] * grid[2], cfg.dim).astype(cfg.stream_dtype)  # float32 as Wan

    # Time: [B] -> one modulation for all tokens, [B, F] -> one per latent frame.
    t = jnp.asarray(t, jnp.float32)
    t = t[:, None] if t.ndim == 1 else t
    if t.ndim != 2 or t.shape[0] != b or t.shape[1] not in (1, grid[0]):
      raise ValueError(f"t must be [B] or [B, F'] with B={b}, F'={grid[0]}; got shape {t.shape}")
    e = self.time_embedding(t)                                                 # [B, T, D] float32
    e0 = self.time_projection(jax.nn.silu(e)).reshape(b, t.shape[1], 6, cfg.dim)

    ctx = img = None
    if context_kv is None:
      ctx = self.text_embedding(_fit_text(context, cfg.text_len).astype(dt))  # [B, text_len, D]
      img = self.img_emb(clip_fea.astype(dt)) if cfg.is_i2v else None         # [B, 257, D]
    cos, sin = rope_tables(grid, cfg.head_dim, cfg.rope_theta, cfg.rope_max_len)

    seq = self._run_blocks(seq, e0, ctx, img, cos, sin, context_kv)
    out = self.head(seq, e)                                                    # [B, L, pt*ph*pw*out] float32
    out = out.reshape(b, *grid, pt, ph, pw, cfg.out_dim)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7)                                # (f, pt, h, ph, w, pw, c)
    return out.reshape(b, f, hh, ww, cfg.out_dim)

  def _run_blocks(self, x, e0, ctx, img, cos, sin, context_kv=None):
    """context_kv: {name: [layers, ...]} cross-attention K/V (then ctx and img are unused), or None."""
    wrap, policy = remat_policy(self.cfg.remat)

    def body(block, h, kv):
      return block(h, e0, ctx, img, cos, sin, kv)

    if wrap:
      body = nnx.remat(body, policy=policy, prevent_cse=not self.cfg.scan_layers)
    if not self.cfg.scan_layers:
      for i, block in enumerate(self.blocks):
        kv = None if context_kv is None else jax.tree.map(lambda a: a[i], context_kv)
        x = body(block, x, kv)
      return x

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
    def run(h, block, kv):
      return body(block, h, kv)

    return run(x, self.blocks, context_kv)


def _patch_embed(patches: jax.Array, kernel: jax.Array) -> jax.Array:
  """patches [B, F', pt, H', ph, W', pw, C] x kernel [pt, ph, pw, C, D] -> [B, F', H', W', D]."""
  return jnp.einsum("bfthpwqc,tpqcd->bfhwd", patches, kernel)


def _fit_text(context: jax.Array, text_len: int) -> jax.Array:
  """Zero-pads (or truncates, like EVA) the text context to text_len tokens."""
  n = context.shape[1]
  if n >= text_len:
    return context[:, :text_len]
  return jnp.pad(context, ((0, 0), (0, text_len - n), (0, 0)))


def _stacked_blocks(cfg: WanConfig, rngs: nnx.Rngs) -> WanBlock:
  """num_layers WanBlocks with every parameter stacked on a leading 'layers' axis."""
  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r: nnx.Rngs) -> WanBlock:
    return WanBlock(cfg, rngs=r)
  return create(rngs)
