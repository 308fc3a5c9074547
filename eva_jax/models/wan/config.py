"""WanConfig: the frozen description of a Wan 2.1 DiT, and the named presets.

Field names follow Wan's `WanModel.__init__` (dim, ffn_dim, freq_dim, num_heads, ...) so configs read like the
released `config.json`; the rest are ours (compute dtype, attention backend, remat policy, LoRA).

  cfg = wan_config('i2v-14b', num_layers=2, dtype='bfloat16')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from eva_jax.models.wan.attention import BACKENDS as ATTENTION_BACKENDS, parse_backend
REMAT_POLICIES = ("none", "full", "dots", "offload")
MATMUL_DTYPES = ("default", "fp8")


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Architecture (Wan's names) plus how to run it (ours)."""
  # architecture (spec wan.md A.1)
  model_type: str = "t2v"           # 't2v' | 'i2v'
  dim: int = 1536
  ffn_dim: int = 8960
  freq_dim: int = 256
  num_heads: int = 12
  num_layers: int = 30
  in_dim: int = 16                  # 36 for i2v: [noisy latent 16 | mask 4 | cond latent 16]
  out_dim: int = 16
  text_dim: int = 4096
  text_len: int = 512
  image_dim: int = 1280             # CLIP ViT-H/14 width (i2v only)
  patch_size: tuple[int, int, int] = (1, 2, 2)
  eps: float = 1e-6
  rope_max_len: int = 1024
  rope_theta: float = 10000.0
  # execution
  dtype: str = "float32"            # matmul / activation compute dtype ('bfloat16' on accelerators)
  param_dtype: str = "float32"
  attention: str = "auto"           # one of ATTENTION_BACKENDS ('auto': cudnn on GPU, splash on TPU, chunked on
                                    # CPU, at trace time), or 'splash:BQ,BKV,BKVC' with splash block sizes
  attn_chunk_size: int = 1024       # query and key block of the 'chunked' backend
  remat: str = "none"               # one of REMAT_POLICIES
  scan_layers: bool = True          # stacked blocks applied with nnx.scan (else a python loop)
  # exact fusions (docs/benchmarks.md "Fusions and switches"): same output to float32 rounding either way
  fuse_qkv: bool = True             # self-attention q/k/v as one [D, 3, D] matmul (kernels stacked per call)
  fused_rope: bool = True           # RoPE as x*cos + swap_pairs(x)*sin (no stack), fusable with the q/k RMSNorm
  cudnn_kv_multiple: int = 0        # cuDNN: pad key lengths to a multiple of this; 0 = attention.CUDNN_KV_MULTIPLE
  # 'fp8': the block matmuls in float8_e4m3fn with per-tensor scales (inference only, never the default)
  matmul_dtype: str = "default"
  # 'wan': time embedding, modulation, gates, the residual stream and the head in float32 (upstream Wan).
  # 'eva': all of them in `dtype`, the sinusoid cast to it, as EVA's fork runs (its float32 autocast regions
  # are commented out; spec/eva_fidelity_models.md, section 1). Equal when dtype is float32.
  precision: str = "wan"
  # LoRA on the attention projections (eva.md A.5)
  lora_rank: int = 0                # 0 = no adapters
  lora_alpha: float = 32.0
  lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "k_img", "v_img")

  def __post_init__(self):
    if self.model_type not in ("t2v", "i2v"):
      raise ValueError(f"WanConfig.model_type must be 't2v' or 'i2v', got {self.model_type!r}")
    if self.dim % self.num_heads:
      raise ValueError(f"WanConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
    try:
      name, blocks = parse_backend(self.attention)
      if blocks is not None:
        from eva_jax.models.wan.splash import fit_blocks
        fit_blocks(1, 1, blocks)  # the kernel's block rules, checked before anything is traced
    except ValueError as e:
      raise ValueError(f"WanConfig.attention: {e}") from None
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"WanConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"WanConfig.matmul_dtype must be one of {MATMUL_DTYPES}, got {self.matmul_dtype!r}")
    if self.precision not in ("wan", "eva"):
      raise ValueError(f"WanConfig.precision must be 'wan' or 'eva', got {self.precision!r}")
    if self.cudnn_kv_multiple < 0:
      raise ValueError(f"WanConfig.cudnn_kv_multiple must be >= 0 (0 = the module default), got "
                       f"{self.cudnn_kv_multiple}")
    if len(self.patch_size) != 3:
      raise ValueError(f"WanConfig.patch_size must have 3 entries (t, h, w), got {self.patch_size}")
    for name in ("dtype", "param_dtype"):
      jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def is_i2v(self) -> bool:
    return self.model_type == "i2v"

  @property
  def patch_volume(self) -> int:
    pt, ph, pw = self.patch_size
    return pt * ph * pw

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def stream_dtype(self):
    """The dtype of the residual stream, time embedding and modulation: float32 ('wan') or `dtype` ('eva')."""
    return jnp.dtype(jnp.float32) if self.precision == "wan" else self.compute_dtype

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


# Named presets: only the fields that differ from the WanConfig defaults (= t2v-1.3B).
_T2V_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
PRESETS: dict[str, dict[str, Any]] = {
    "t2v-1.3b": {},
    "t2v-14b": _T2V_14B,
    "i2v-14b": dict(_T2V_14B, model_type="i2v", in_dim=36),
    # Tiny random-weight models for tests and smoke runs (head_dim 16 keeps the 8/4/4 RoPE split non-trivial).
    "tiny-t2v": dict(dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=2, text_dim=24, text_len=512,
                     rope_max_len=64),
    "tiny-i2v": dict(model_type="i2v", dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=2, in_dim=36,
                     text_dim=24, text_len=512, image_dim=20, rope_max_len=64),
    # The built-in demo's world model (configs/demo.py): tiny-i2v's conditioning sizes, wide and deep
    # enough to carry the first frame's arms into the later frames (tiny-i2v's samples lose them).
    # text_len 16: the demo's text is 16 tokens (configs/sft.py:tiny, max_text_tokens); padded to 512,
    # the zero keys made the text cross-attention most of the work (GRPO update 8.1 s -> 3.7 s per
    # iteration on 2 CPU cores, docs/demo.md).
    "toy-i2v": dict(model_type="i2v", dim=128, ffn_dim=256, freq_dim=64, num_heads=4, num_layers=4, in_dim=36,
                    text_dim=24, text_len=16, image_dim=20, rope_max_len=64),
}


def wan_config(name: str = "t2v-1.3b", **overrides) -> WanConfig:
  """A preset by name with Wan-named overrides; an unknown preset or field name raises."""
  key = name.lower()
  if key not in PRESETS:
    raise KeyError(f"unknown Wan config {name!r}; known: {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(WanConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"wan_config({name!r}): unknown field(s) {unknown}; WanConfig fields: {sorted(fields)}")
  values = dict(PRESETS[key], **overrides)
  for k in ("patch_size", "lora_targets"):
    if k in values:
      values[k] = tuple(values[k])
  return WanConfig(**values)


def zero_clip_features(batch: int, image_dim: int) -> np.ndarray:
  """The image context of clip.source='zeros' (smoke runs, the toy demo): one zero CLIP token per example,
  [batch, 1, image_dim].

  Every zero token embeds to the same key and value, so the image cross-attention over Wan's 257 of them
  gives what it gives over one (softmax weights 1/257 each on one value; the gradients sum the same way).
  One token is that model at a fraction of the cost: the demo's toy-i2v DiT, forward+backward of 8 clips on
  2 CPU cores, 214 ms with 257 zero tokens, 110 ms with one (outputs equal to 2e-6 relative).
  """
  return np.zeros((batch, 1, image_dim), np.float32)
