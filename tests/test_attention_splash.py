"""The 'splash' attention backend (Pallas TPU splash attention) against 'xla' in float32 on CPU, under Pallas's
TPU interpret mode, and the 'auto' backend choice.

Interpret mode simulates the TPU kernel on CPU and costs seconds per compile, so shapes are tiny, blocks are
128 (the smallest the kernel allows) and forward and gradients come from one jitted vjp.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from eva_jax import parallel
from eva_jax.models.wan import WanModel, wan_config
from eva_jax.models.wan import attention as attn, splash
from eva_jax.models.wan.splash import fit_blocks, padded_fraction, splash_attention
from eva_jax.models.wan.context_parallel import ulysses_attention
from tests.utils import rel_err

BLOCKS = (128, 128, 128)


def _qkv(lq, lk, b=2, n=2, d=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, lq, n, d)), jax.random.normal(ks[1], (b, lk, n, d)),
          jax.random.normal(ks[2], (b, lk, n, d)))


def _out_and_grads(fn, q, k, v):
  """fn(q, k, v) and the gradients of sum(fn * cos(fn)) w.r.t. q, k, v, in one jitted program."""
  def f(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(jnp.cos(out))
  return jax.jit(f)(q, k, v)


def _assert_close(got, want, tol=1e-5):
  (out, grads), (ref, ref_grads) = got, want
  assert rel_err(out, ref) <= tol
  for name, g, r in zip("qkv", grads, ref_grads):
    assert rel_err(g, r) <= tol, name


# MARK: kernel parity

@pytest.mark.parametrize("lq,lk", [(37, 37), (37, 257), (20, 512)],
                         ids=["self-odd-37", "cross-257", "cross-512"])
def test_splash_equals_xla(lq, lk):
  """Self-attention with an odd token count (queries and keys padded to 128), cross-attention to the 257 CLIP
  and 512 text keys: output and the q, k, v gradients of the fused backward."""
  q, k, v = _qkv(lq, lk)
  ref = _out_and_grads(lambda q, k, v: attn.attention(q, k, v, backend="xla"), q, k, v)
  blocks = BLOCKS if lk != 512 else (128, 512, 128)  # 512 keys: one kv block of 4 compute blocks
  with pltpu.force_tpu_interpret_mode():
    got = _out_and_grads(lambda q, k, v: splash_attention(q, k, v, blocks=blocks), q, k, v)
  _assert_close(got, ref)


def test_splash_masks_padded_keys_per_example():
  """kv_seq_lengths [B] (one mask per example) and one int for all (the batch folded into the heads)."""
  q, k, v = _qkv(21, 150)
  lengths = jnp.array([150, 37])
  ref = _out_and_grads(lambda q, k, v: attn.attention(q, k, v, backend="xla", kv_seq_lengths=lengths), q, k, v)
  with pltpu.force_tpu_interpret_mode():
    got = _out_and_grads(lambda q, k, v: splash_attention(q, k, v, lengths, blocks=BLOCKS), q, k, v)
  _assert_close(got, ref)
  # The TPU path vmaps the kernel over the batch; Pallas's generic interpreter can run that on CPU.
  got = _out_and_grads(lambda q, k, v: splash_attention(q, k, v, lengths, blocks=BLOCKS, interpret=True), q, k, v)
  _assert_close(got, ref)


def test_splash_under_a_mesh_runs_per_shard():
  """Under jax.set_mesh (data 2 x tensor 2) the kernel runs in a shard_map over examples and heads, with the
  per-example lengths sharded alongside: equal to single-device xla attention."""
  mesh = parallel.make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
  q, k, v = _qkv(16, 40)
  lengths = jnp.array([40, 9])
  ref = _out_and_grads(lambda q, k, v: attn.attention(q, k, v, backend="xla", kv_seq_lengths=lengths), q, k, v)
  fn = lambda q, k, v: attn.attention(q, k, v, backend="splash:128,128,128", kv_seq_lengths=lengths)
  with pltpu.force_tpu_interpret_mode(), jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    got = _out_and_grads(fn, q, k, v)
  _assert_close(got, ref)


def test_splash_under_ulysses_with_padding():
  """Splash inside the Ulysses all-to-alls (shard_map over 'context' = 2): 13 tokens padded to 14, the padded key
  masked by the static length, equal to single-device xla attention."""
  mesh = parallel.make_mesh({"context": 2}, devices=jax.devices()[:2])
  q, k, v = _qkv(13, 13, b=1, n=2)
  ref = _out_and_grads(lambda q, k, v: attn.attention(q, k, v, backend="xla"), q, k, v)
  with pltpu.force_tpu_interpret_mode():
    got = _out_and_grads(lambda q, k, v: ulysses_attention(q, k, v, mesh=mesh, backend="splash:128,128,128"),
                         q, k, v)
  _assert_close(got, ref)


# MARK: the DiT

def test_tiny_dit_splash_equals_xla(monkeypatch):
  """tiny-i2v, one layer under nnx.scan and nnx.remat (full), 16 text tokens, the 257 CLIP keys: the forward and
  the parameter gradients with attention='splash' equal 'xla'. The kernels run in Pallas's generic interpreter:
  TPU interpret mode's host callbacks cannot be rematerialised (a limit of the simulation, not of the TPU)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 3, 4, 6, 16)), jnp.float32)                     # 18 tokens
  t = jnp.array([700.0])
  ctx = jnp.asarray(rng.standard_normal((1, 7, 24)), jnp.float32)
  clip = jnp.asarray(rng.standard_normal((1, 257, 20)), jnp.float32)
  make = lambda attention: WanModel(wan_config("tiny-i2v", attention=attention, num_layers=1, text_len=16,
                                              remat="full"), rngs=nnx.Rngs(0))
  _, state = nnx.split(make("xla"))                       # one set of weights for both (eager init is slow)

  def out_and_grads(attention):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(attention)))

    def loss(state):
      out = nnx.merge(graphdef, state)(x, t, ctx, clip)
      return jnp.mean(out * jnp.cos(out)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return out, grads

  out_ref, g_ref = out_and_grads("xla")
  monkeypatch.setattr(splash, "INTERPRET", True)
  out, g = out_and_grads("splash:128,384,128")      # 384 keys: the CLIP tokens in one block
  assert rel_err(out, out_ref) <= 1e-5
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert rel_err(a, b) <= 1e-4  # float32 sums in another order; the smallest leaves (norm ~1e-4) move most


def test_tiny_dit_lowers_for_tpu_with_remat(monkeypatch):
  """The TPU program itself (Mosaic kernels, not the interpreter): tiny-i2v's forward + backward under nnx.scan and
  nnx.remat with attention='auto' lowers for the TPU on this CPU, with splash forward and fused backward kernels
  for the self, text and CLIP attentions (the rematerialised forward adds a second set of forward kernels)."""
  monkeypatch.setattr(attn, "TARGET_PLATFORM", "tpu")
  model = nnx.eval_shape(lambda: WanModel(wan_config("tiny-i2v", num_layers=2, remat="full"), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  x, t = jax.ShapeDtypeStruct((1, 3, 4, 6, 16), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
  ctx, clip = jax.ShapeDtypeStruct((1, 7, 24), jnp.float32), jax.ShapeDtypeStruct((1, 257, 20), jnp.float32)
  loss = lambda state, *xs: jnp.mean(nnx.merge(graphdef, state)(*xs) ** 2)
  text = jax.jit(jax.grad(loss)).trace(state, x, t, ctx, clip).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 9, text.count("tpu_custom_call")


# MARK: backend choice and block sizes

@pytest.mark.parametrize("platform,backend", [("gpu", "cudnn"), ("cuda", "cudnn"), ("tpu", "splash"),
                                              ("cpu", "chunked")])
def test_auto_resolution(platform, backend):
  assert attn.resolve_backend("auto", platform) == backend
  for explicit in ("xla", "chunked"):           # explicit choices that run everywhere are kept
    assert attn.resolve_backend(explicit, platform) == explicit


def test_auto_is_chunked_here_and_the_default():
  assert attn.current_platform() == "cpu" and attn.resolve_backend("auto", attn.current_platform()) == "chunked"
  assert wan_config("tiny-i2v").attention == "auto"
  assert attn.resolve_backend("splash:1024,2048,512", "tpu") == "splash:1024,2048,512"
  assert attn.resolve_backend("splash", "cpu") == "splash"   # Pallas interpret mode (these tests)


@pytest.mark.parametrize("backend,platform", [("cudnn", "cpu"), ("cudnn", "tpu"), ("splash", "gpu"),
                                              ("splash:512,512,512", "cuda")])
def test_backend_the_platform_cannot_run_is_an_error(backend, platform):
  with pytest.raises(ValueError, match="config.model.attention"):
    attn.resolve_backend(backend, platform)


def test_splash_outside_interpret_mode_on_cpu_is_an_error():
  q, k, v = _qkv(8, 8)
  with pytest.raises(ValueError, match="runs on TPU"):
    attn.attention(q, k, v, backend="splash")


def test_block_sizes_and_bad_specs():
  assert fit_blocks(15_600, 15_600) == (2048, 2048, 512)      # EVA's self-attention: 15,600 -> 16,384
  assert fit_blocks(15_600, 257) == (2048, 384, 384)          # CLIP keys: one block of 384
  assert fit_blocks(15_600, 512, (1024, 1024, 256)) == (1024, 512, 256)
  assert fit_blocks(37, 37, BLOCKS) == (128, 128, 128)
  assert abs(padded_fraction(15_600) - (16_384 / 15_600) ** 2 + 1) < 1e-12
  assert padded_fraction(15_600, (512, 512, 512)) < padded_fraction(15_600)
  assert attn.parse_backend("splash:2048,1024,512") == ("splash", (2048, 1024, 512))
  for bad in ("flash", "splash:100,128,128", "splash:256,384,256", "splash:128", "cudnn:64,64,64"):
    with pytest.raises(ValueError, match="attention"):
      wan_config("tiny-i2v", attention=bad)
