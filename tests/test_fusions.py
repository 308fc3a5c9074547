"""The DiT's exact fusions (issue 26) against the unfused forms in float32, and the FP8 matmul mode on CPU.

fuse_qkv (one q/k/v matmul with LoRA deltas per slice), fused_rope (pair swap instead of stack) and the
cross-attention K/V computed once (`WanModel.context_kv`) must give today's output to float32 rounding,
forward and gradients; matmul_dtype='fp8' runs on CPU (XLA converts float8_e4m3fn there) and stays close to
float32. Random tiny-i2v weights with a non-zero head and non-zero LoRA B, so every path carries signal.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eva_jax.models.lora import LoRALinear, LoRAParam
from eva_jax.models.wan import WanModel, wan_config
from eva_jax.models.wan.layers import E4M3_MAX, matmul
from eva_jax.models.wan.model import SelfAttention
from eva_jax.models.wan.rope import apply_rope, rope_tables
from tests.utils import rel_err

B, F, H, W = 2, 3, 4, 6


def _model(**overrides):
  cfg = wan_config("tiny-i2v", lora_rank=4, lora_alpha=8.0, **overrides)

  @nnx.jit  # one compiled init instead of hundreds of eager ops
  def build():
    model = WanModel(cfg, rngs=nnx.Rngs(0))
    key = jax.random.key(7)
    for _, m in nnx.iter_modules(model):
      if isinstance(m, LoRALinear):
        key, sub = jax.random.split(key)
        m.lora_b[...] = 0.05 * jax.random.normal(sub, m.lora_b[...].shape)
    head = model.head.head.kernel
    head[...] = 0.1 * jax.random.normal(jax.random.key(8), head[...].shape)   # zero-initialised otherwise
    return model
  return build()


def _like(model, **overrides):
  """A model with other execution switches holding the same parameters."""
  cfg = wan_config("tiny-i2v", lora_rank=4, lora_alpha=8.0, **overrides)
  other = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(1)))
  nnx.update(other, nnx.state(model))
  return other


def _inputs():
  k = jax.random.split(jax.random.key(3), 4)
  return (jax.random.normal(k[0], (B, F, H, W, 16)), jnp.array([900.0, 130.0]),
          jax.random.normal(k[1], (B, 7, 24)), jax.random.normal(k[2], (B, 257, 20)),
          jax.random.normal(k[3], (B, F, H, W, 20)))


def _forward(model, *args):
  return nnx.jit(lambda m, *a: m(*a))(model, *args)


@pytest.fixture(scope="module")
def fused():
  model = _model()
  assert model.cfg.fuse_qkv and model.cfg.fused_rope   # the defaults
  return model, _forward(model, *_inputs())


def test_fused_qkv_and_rope_equal_unfused(fused):
  model, out = fused
  assert rel_err(out, _forward(_like(model, fuse_qkv=False, fused_rope=False), *_inputs())) <= 1e-6


def test_fused_self_attention_gradients_equal_unfused():
  """The gradients training takes (LoRA factors for GRPO / LoRA SFT, every weight, the input), on the one
  module the two switches change (a whole-model backward compiles too long for the suite)."""
  cfg = wan_config("tiny-i2v", lora_rank=4, lora_alpha=8.0)
  attn = SelfAttention(cfg, rngs=nnx.Rngs(0))
  for name in ("q", "k", "v", "o"):
    lora = getattr(attn, name)
    lora.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(len(name) + ord(name[0])), lora.lora_b[...].shape)
  grid = (3, 2, 3)
  cos, sin = rope_tables(grid, cfg.head_dim)
  x = jax.random.normal(jax.random.key(1), (B, 18, cfg.dim))

  @nnx.jit
  def grads(m, x):
    def loss(m, x):
      out = m(x, cos, sin)
      return jnp.mean(out * jnp.cos(out))
    return nnx.grad(loss, argnums=(0, 1))(m, x)

  g_fused = grads(attn, x)
  attn.cfg = dataclasses.replace(cfg, fuse_qkv=False, fused_rope=False)
  g_ref = grads(attn, x)
  lora = jax.tree.leaves(nnx.state(g_fused[0], LoRAParam))
  assert len(lora) == 8 and all(float(jnp.abs(g).max()) > 0 for g in lora)   # (A, B) of q, k, v, o
  for g, r in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_ref)):
    assert rel_err(g, r) <= 1e-5


def test_rope_swap_equals_stack_bitwise():
  cos, sin = rope_tables((3, 4, 5), 16)
  x = jax.random.normal(jax.random.key(0), (2, 60, 3, 16))
  for dtype in (jnp.float32, jnp.bfloat16):
    a = apply_rope(x.astype(dtype), cos, sin, fused=True)
    b = apply_rope(x.astype(dtype), cos, sin, fused=False)
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


@pytest.mark.parametrize("scan", [True, False])
def test_context_kv_equals_recomputing(fused, scan):
  # a python list of blocks has its own parameters (one block: the unrolled programs compile slowly)
  model = fused[0] if scan else _model(scan_layers=False, num_layers=1)
  x, t, ctx, clip, y = _inputs()

  @nnx.jit  # both forms in one program: one compile
  def both(m, x, t, ctx, clip, y):
    kv = m.context_kv(ctx, clip)
    return m(x, t, ctx, clip, y), m(x, t, None, None, y, context_kv=kv), kv

  ref, out, kv = both(model, x, t, ctx, clip, y)
  n, d = model.cfg.num_heads, model.cfg.head_dim
  assert kv["k"].shape == (model.cfg.num_layers, B, model.cfg.text_len, n, d)
  assert kv["v_img"].shape == (model.cfg.num_layers, B, 257, n, d)
  assert rel_err(out, ref) <= 1e-6
  with pytest.raises(ValueError, match="context_kv has keys"):
    model(x, t, None, None, y, context_kv={"k": kv["k"], "v": kv["v"]})


def test_fp8_matmul_runs_on_cpu_and_is_close():
  x = jax.random.normal(jax.random.key(0), (64, 32))
  w = jax.random.normal(jax.random.key(1), (32, 48)) * 0.1
  exact, q = matmul(x, w), matmul(x, w, "fp8")
  # e4m3 keeps 3 mantissa bits: ~2-3 % per operand element, averaged down over the 32-term sums
  assert 1e-3 < rel_err(q, exact) < 5e-2
  # the operands really are on the e4m3 grid (one per-tensor scale each)
  with pytest.raises(ValueError, match="matmul mode"):
    matmul(x, w, "int8")
  scale = float(jnp.max(jnp.abs(x))) / E4M3_MAX
  grid = (x / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale
  np.testing.assert_allclose(np.asarray(matmul(x, jnp.eye(32), "fp8")), np.asarray(grid), rtol=1e-6, atol=0)


def test_fp8_model_close_to_float32(fused):
  model, ref = fused
  out = _forward(_like(model, matmul_dtype="fp8"), *_inputs())
  err = rel_err(out, ref)
  assert 1e-3 < err < 0.1, err   # FP8 changes the numbers, but not beyond a few per cent
  with pytest.raises(ValueError, match="matmul_dtype"):
    wan_config("tiny-i2v", matmul_dtype="int8")


def test_precision_eva_mode():
  """precision='eva' (EVA's bf16 time embedding, modulation, residual and head) equals 'wan' bit for bit in
  float32 and moves a bf16 forward away from the float32 one (measured: 3.7e-3 for 'wan', 7.4e-3 for 'eva'
  on this tiny model; docs/models.md, "Precision modes")."""
  from eva_jax.models.vae import WanVAE, stats_dtype, vae_config

  def run(dtype, precision):
    cfg = wan_config("tiny-i2v", dtype=dtype, precision=precision)
    m = WanModel(cfg, rngs=nnx.Rngs(0))
    m.head.head.kernel[...] = jax.random.normal(jax.random.key(5), m.head.head.kernel.shape) * 0.1
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (2, 3, 8, 8, 16))
    t = jnp.array([[71.0, 500.0, 500.0], [999.0, 999.0, 999.0]])
    ctx, clip = jax.random.normal(ks[1], (2, 16, cfg.text_dim)), jax.random.normal(ks[2], (2, 257, cfg.image_dim))
    return np.asarray(nnx.jit(lambda m, x: m(x, t, ctx, clip))(m, x), np.float32)

  ref = run("float32", "wan")
  np.testing.assert_array_equal(run("float32", "eva"), ref)
  wan, eva = rel_err(run("bfloat16", "wan"), ref), rel_err(run("bfloat16", "eva"), ref)
  assert wan < 1e-2 and eva < 2e-2 and eva > 1.3 * wan, (wan, eva)
  # The VAE side: EVA's bf16 mean and 1/std shift latents by up to ~0.4 % of their scale.
  vid = jax.random.uniform(jax.random.key(1), (1, 5, 16, 16, 3), minval=-1, maxval=1)
  encode = nnx.jit(lambda vae, v: vae.encode(v))  # one program each, not op-by-op compiles
  z32 = encode(WanVAE(vae_config("tiny"), rngs=nnx.Rngs(0)), vid)
  z16 = encode(WanVAE(vae_config("tiny", stats_dtype=stats_dtype("eva")), rngs=nnx.Rngs(0)), vid)
  assert 1e-5 < rel_err(z16, z32) < 1e-2
  with pytest.raises(ValueError, match="precision must be 'wan' or 'eva'"):
    wan_config("tiny-i2v", precision="fp16")


def test_grpo_rollout_with_cached_context_kv_equals_recomputing(fused):
  """GRPO's rollouts (rl/rollout.sample_latents) with the cross-attention K/V computed once per rollout
  (kv_fn, training/grpo.py's default) give the same latents and log-probs as recomputing them per step."""
  from eva_jax.diffusion.schedules import wan_timesteps
  from eva_jax.rl.rollout import RolloutConfig, sample_latents
  gdef, lora_s, base_s = nnx.split(fused[0], LoRAParam, ...)

  @jax.jit  # merged in its own jit, as training/grpo.py does (one trace level inside the scan)
  def policy(lo, ba, x, t, cond, context_kv=None):
    m = nnx.merge(gdef, lo, ba)
    return m(x, t, None, None, context_kv=context_kv) if context_kv is not None else m(
        x, t, cond["context"], cond["clip_fea"])

  @jax.jit
  def kv_fn(lo, ba, cond):
    return nnx.merge(gdef, lo, ba).context_kv(cond["context"], cond["clip_fea"])

  ts, sig = wan_timesteps(3)
  x, _, ctx, clip, _ = _inputs()
  cond = dict(context=ctx, clip_fea=clip)
  cfg = RolloutConfig(sigma_max=float(sig[1]), t_hist=float(ts[-1]))

  @jax.jit
  def both(lo, ba):
    run = lambda f: sample_latents(policy, lo, ba, x[:, :1], cond, x, jax.random.key(4), ts, sig, cfg, f)  # noqa: E731
    return run(None), run(kv_fn)

  (lat, lps), (lat_kv, lps_kv) = both(lora_s, base_s)
  assert rel_err(lat_kv, lat) <= 1e-6 and float(jnp.max(jnp.abs(lps_kv - lps))) <= 1e-4
  assert float(jnp.abs(lat[:, -1] - lat[:, 0]).max()) > 0.1   # the policy moved the latents

