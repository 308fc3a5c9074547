"""The built-in end-to-end demo on the procedural toy world (`make demo`).

  python scripts/demo.py                                   # full demo, ≤ 15 min on 2 CPU cores
  python scripts/demo.py --config=configs/demo.py:short    # the shortened run the tests use (7 min)
  python scripts/demo.py --config.short=True --config.seed=1 --workdir=outputs/demo

Stages: toy data → tiny VAE fitted to the toy frames (configs/vae.py:tiny) → IDM (configs/idm.py:tiny)
→ SFT world model (configs/sft.py:tiny) → Flow-GRPO with the IDM reward (configs/grpo.py:tiny) → report.
Each stage runs the real trainer with its tiny config; the fields below only size the run. `short`
swaps in the `shortened` values (also when set from the command line, so `--config.short=True` works).
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # 'tiny' is an alias of 'short' (every config's smoke variant is called tiny)
  arg = parse_arg(arg.replace('tiny', 'short') if arg else arg, short=False, seed=0)
  c = ml_collections.ConfigDict()
  c.seed = arg.seed
  c.short = arg.short
  # XLA's CPU thread pool spans the cores the process may use, and the split of its work changes the
  # floating-point results (the same code and seed give other bits on 1 and on 2 cores): N pins the run to
  # N cores (scripts/demo.py, before jax starts) so that the figures of docs/demo.md, measured on 2,
  # reproduce on any machine with at least 2. 0 = every core (faster on a big machine, other digits).
  c.cpu_cores = 2

  # Toy data (eva_jax.data.toyworld.generate_dataset): 64 px, 17 frames (1 + 4·4) at 16 fps. 33 frames
  # doubled the world model's tokens: its SFT samples (400 steps, loss 0.41) kept only smeared arms and
  # GRPO raised the reward by erasing them (docs/demo.md, "GRPO on the toy world").
  # idm_episodes: more episodes of the same world (HDF5 only) for the IDM, which needs many poses to
  # beat the constant predictor on held-out episodes (the world model's episodes alone are too few).
  c.data = ml_collections.ConfigDict(dict(
      num_episodes=96, size=64, n_frames=17, smooth_fraction=0.5, val_fraction=0.125,
      idm_episodes=384))

  # Stage sizes: steps and batch sizes handed to each trainer's tiny config.
  # eval_every: validation before step 1 and every so many steps (0 = at the end only).
  c.vae = ml_collections.ConfigDict(dict(num_steps=300, batch_size=8, learning_rate=1e-3, eval_every=0))
  # image_size: the IDM's input resize (configs/idm.py:tiny: two stages, a 4×4 map at 32 px).
  c.idm = ml_collections.ConfigDict(dict(num_steps=3000, batch_size=32, learning_rate=3e-3,
                                         image_size=32))
  # model: the world model's WanConfig preset, for SFT and GRPO alike. toy-i2v (width 128, 4 layers);
  # configs/sft.py:tiny's tiny-i2v (width 32, 2 layers) reaches loss ~0.8 and its samples lose the arms
  # after the first latent frame: the IDM then scores them like decoded noise (2.76 vs 2.76, 64 px
  # shortened run, seed 0) and GRPO has nothing to improve. toy-i2v: loss 0.45 at 400 steps.
  c.sft = ml_collections.ConfigDict(dict(num_steps=600, batch_size=8, learning_rate=1e-3,
                                         model="toy-i2v"))
  # num_conditions: first frames (training rows of the toy CSV) cycled num_prompts per iteration; a
  # divisor of num_prompts · num_iterations / 4 gives the reward curve's first and last quarters the
  # same first frames, so the two are compared on equal footing.
  # Trust region: EVA's (clip 1e-5; configs/grpo.py:tiny lr 1e-3, 2 inner epochs) is sized for 100
  # epochs of a 14B model; on the toy DiT it leaves the policy where SFT put it (approx_kl ~1e-10, flat
  # reward). lr 1e-2, clip 1e-2 and EVA's 4 inner epochs move it within the demo's minutes: on the full
  # demo (17 frames) the reward rose +0.24 ± 0.03 (seed 0), +0.79 ± 0.05 and +0.68 ± 0.04 (seeds 1, 2, with
  # 257 zero CLIP tokens), last quarter vs first, and the aligned samples still show the arms. 4 sampling steps (EVA: 40) keep an
  # iteration at ~5.6 s on 2 cores; 24 iterations of 32 rollouts (16 of each of 2 first frames) lift
  # the rise above the rollout noise (with 8 rollouts it was lost on some seeds).
  # timestep_fraction 1: EVA trains 39 of 40 steps; int(0.99·4) would leave the last step untrained.
  # eval_every: the held-out reward (rollouts of their own random keys, so training is unchanged) at
  # iterations 0 and 12 (the shortened run skips it); checkpoint_every: resumable every 6 iterations.
  # The tiny config's eval every 2 and checkpoint every 1 iteration cost the shortened run ~30 s of its
  # ~4 min GRPO stage inside the suite.
  # beta 0 (Flow-GRPO's own default; EVA: 0.004): EVA's KL pull holds the toy policy ~0.05 from the SFT
  # model, where it balances the reward's (64 px shortened run, seed 0: rise +0.30 with 0.004, +0.56
  # without). docs/demo.md, "GRPO on the toy world", has every measurement.
  c.grpo = ml_collections.ConfigDict(dict(num_iterations=24, group_size=16, num_prompts=2,
                                          num_sampling_steps=4, learning_rate=1e-2, num_conditions=4,
                                          clip_range=1e-2, num_inner_epochs=4, timestep_fraction=1.0,
                                          beta=0.0, eval_every=12, checkpoint_every=6))

  # Report: how many sampled videos to show before/after alignment, frames per strip.
  c.report = ml_collections.ConfigDict(dict(num_samples=4, max_frames=9, gif_scale=3))

  # The shortened run (tests/test_demo.py), small enough for CI yet big enough for GRPO's reward to
  # respond: fewer episodes, IDM and SFT steps (IDM 1000: held-out ratio 0.63, seed 0, against 0.58 at
  # 1500), no held-out GRPO eval; the same 64 px, 17-frame clips, the VAE's 300 steps and GRPO's 24
  # iterations of 32 (with 16, seed 2 rose only 2.1 s.e.). Smaller variants cannot show a rise: at 32 px
  # (4x4 latents), or with a VAE still on its mean-frame plateau (below ~250 steps), every decoded clip
  # scores alike to the IDM (32 px, 10-step VAE: 4.8 for real, still and random latents; docs/demo.md,
  # "GRPO on the toy world"). Batches stay multiples of 8 (8 devices).
  c.shortened = ml_collections.ConfigDict(dict(
      data=dict(num_episodes=32, size=64, n_frames=17, val_fraction=0.125, idm_episodes=960),
      vae=dict(num_steps=300, batch_size=8),
      idm=dict(num_steps=1000, batch_size=32),
      sft=dict(num_steps=400, batch_size=8),
      grpo=dict(num_conditions=2, eval_every=0),
      report=dict(num_samples=2, max_frames=5, gif_scale=2),
  ))
  return c
