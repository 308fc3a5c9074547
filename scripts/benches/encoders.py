"""Conditioning-encoder benchmark: umT5 prompts/s (and CLIP images/s) against transformers' PyTorch models.

  python scripts/bench.py encoders --size tiny   # tiny umT5 + CLIP, same weights in both, on this machine
  python scripts/bench.py encoders --size eva    # real umT5-XXL (random weights) vs transformers: GPU

Prompts are encoded as Wan does it: padded to 512 tokens with the attention mask, a batch of 8
(`EVA_BENCH_BATCH`), prompt lengths 8..120 tokens. `jax` encodes the full 512 like the reference;
`jax_bucketed` cuts the padding to the longest prompt rounded up to 64 (same outputs, what
scripts/cache_embeddings.py does). `eva`/`wan` build umT5-XXL (24 layers, 5.7B parameters) with random bf16 weights
in both frameworks on the GPU; without a GPU they refuse unless EVA_BENCH_UMT5_LAYERS (and optionally
EVA_BENCH_UMT5_VOCAB) shrink the model, which is only a smoke check of the code path. Throughput
excludes compilation (time_fn warms up first).
"""

from __future__ import annotations

import os

import numpy as np

TEXT_LEN = 512


def _batch(vocab: int, batch: int, seed: int = 0):
  """Random ids with true lengths spread over 8..120 tokens (captions are short), padded to 512."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(8, 121, size=batch)
  mask = (np.arange(TEXT_LEN)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(3, vocab, size=(batch, TEXT_LEN)).astype(np.int32) * mask
  return ids, mask


def _hf_umt5_config(cfg):
  from transformers import UMT5Config
  return UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                    num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                    relative_attention_num_buckets=cfg.num_buckets,
                    relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu",
                    dropout_rate=0.0)


def _torch_time(fn, iters):
  from eva_jax.utils.timing import time_torch
  return time_torch(fn, warmup=1, iters=iters)


def _tiny(args) -> dict:
  import jax.numpy as jnp
  import torch
  from flax import nnx
  from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5EncoderModel

  from convert.clip import convert_clip_state_dict
  from convert.umt5 import convert_umt5_state_dict
  from eva_jax.models.clip import CLIPVisionEncoder, clip_config, encode_image_jit
  from eva_jax.models.umt5 import UMT5Encoder, encode_ids, umt5_config
  from eva_jax.utils.timing import time_fn

  iters = int(getattr(args, "iters", 3) or 3)
  batch = int(os.environ.get("EVA_BENCH_BATCH", "8"))
  torch.manual_seed(0)
  cfg = umt5_config("tiny")
  ref = UMT5EncoderModel(_hf_umt5_config(cfg)).eval()
  enc = UMT5Encoder(cfg, rngs=nnx.Rngs(0))
  nnx.update(enc, convert_umt5_state_dict(ref.state_dict(), cfg))
  ids, mask = _batch(cfg.vocab_size, batch)
  t_jax = time_fn(encode_ids, enc, ids, mask, None, iters=iters)    # full 512, like the reference
  t_cut = time_fn(encode_ids, enc, ids, mask, 64, iters=iters)      # cut to the longest prompt
  out = np.asarray(encode_ids(enc, ids, mask, None))
  tid, tmask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  t_ref = _torch_time(lambda: ref(input_ids=tid, attention_mask=tmask).last_hidden_state, iters)
  with torch.no_grad():
    r = ref(input_ids=tid, attention_mask=tmask).last_hidden_state.numpy() * mask[..., None]
  rel = float(np.linalg.norm(out - r) / np.linalg.norm(r))

  # CLIP tiny: images/s at the tiny image size (28 px), same weights.
  ccfg = clip_config("tiny")
  cref = CLIPVisionModel(CLIPVisionConfig(
      hidden_size=ccfg.width, intermediate_size=ccfg.mlp_dim, num_hidden_layers=ccfg.num_layers,
      num_attention_heads=ccfg.num_heads, image_size=ccfg.image_size, patch_size=ccfg.patch_size,
      hidden_act="gelu")).eval()
  clip = CLIPVisionEncoder(ccfg, rngs=nnx.Rngs(0))
  nnx.update(clip, convert_clip_state_dict(cref.state_dict(), ccfg))
  frames = np.random.default_rng(1).uniform(-1, 1, (batch, ccfg.image_size, ccfg.image_size, 3))
  frames = jnp.asarray(frames, jnp.float32)
  pixels = torch.from_numpy(np.asarray(clip.preprocess(frames))).permute(0, 3, 1, 2).contiguous()
  c_jax = time_fn(encode_image_jit, clip, frames, iters=iters)
  c_ref = _torch_time(lambda: cref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2], iters)
  return {
      "jax": t_jax, "jax_bucketed": t_cut, "reference": t_ref, "rel_err": rel,
      "prompts_per_s": {"jax": batch / t_jax["median_s"], "jax_bucketed": batch / t_cut["median_s"],
                        "torch": batch / t_ref["median_s"]},
      "clip": {"jax": c_jax, "reference": c_ref,
               "images_per_s": {"jax": batch / c_jax["median_s"], "torch": batch / c_ref["median_s"]}},
      "note": f"tiny umT5, batch {batch} x 512 tokens, float32, same weights; CLIP tiny 28px",
  }


def _real(args) -> dict:
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx
  from transformers import UMT5EncoderModel

  from eva_jax.models.umt5 import UMT5Encoder, encode_ids, umt5_config
  from eva_jax.utils.timing import device_peak_memory_mb, time_fn

  on_gpu = jax.default_backend() == "gpu"
  layers = int(os.environ.get("EVA_BENCH_UMT5_LAYERS", "0"))
  if not on_gpu and not layers:
    return {"error": "real-size umT5-XXL needs a GPU (or set EVA_BENCH_UMT5_LAYERS for a CPU smoke run)"}
  iters = int(getattr(args, "iters", 3) or 3)
  batch = int(os.environ.get("EVA_BENCH_BATCH", "8"))
  dtype = getattr(args, "dtype", None) or "bfloat16"
  over = {"num_layers": layers} if layers else {}
  if os.environ.get("EVA_BENCH_UMT5_VOCAB"):
    over["vocab_size"] = int(os.environ["EVA_BENCH_UMT5_VOCAB"])
  cfg = umt5_config("umt5-xxl", dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), **over)
  ids, mask = _batch(cfg.vocab_size, batch)

  make = lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  state = jax.jit(lambda: nnx.state(make()))()  # random weights created on the device
  enc = nnx.merge(graphdef, state)
  t_jax = time_fn(encode_ids, enc, ids, mask, None, iters=iters)    # full 512, like the reference
  t_cut = time_fn(encode_ids, enc, ids, mask, 64, iters=iters)      # cut to the longest prompt
  result = {"jax": t_jax, "jax_bucketed": t_cut, "jax_peak_mb": device_peak_memory_mb(),
            "prompts_per_s": {"jax": batch / t_jax["median_s"], "jax_bucketed": batch / t_cut["median_s"]}}
  del enc, state

  if not getattr(args, "no_reference", False):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    with torch.device(dev):
      ref = UMT5EncoderModel(_hf_umt5_config(cfg)).to(tdtype).eval()
    tid = torch.from_numpy(ids).long().to(dev)
    tmask = torch.from_numpy(mask).long().to(dev)
    t_ref = _torch_time(lambda: ref(input_ids=tid, attention_mask=tmask).last_hidden_state, iters)
    result.update(reference=t_ref, reference_device=dev)
    result["prompts_per_s"]["torch"] = batch / t_ref["median_s"]
  result["note"] = (f"umT5-XXL{f' ({layers} layers)' if layers else ''} random {dtype} weights, batch "
                    f"{batch} x 512 tokens (mask as Wan), independent weights: no rel err")
  return result


def run(size: str, args) -> dict:
  if size == "tiny":
    return _tiny(args)
  if size in ("eva", "wan"):
    return _real(args)
  return {"error": f"encoders bench has sizes tiny, eva, wan; got {size!r}"}
