"""The built-in end-to-end demo on the procedural toy world (`make demo`).

  python scripts/demo.py                                   # full demo, ≤ 15 min on 2 CPU cores
  python scripts/demo.py --config=configs/demo.py:short    # the CI-sized run (~3.5 min)
  python scripts/demo.py --config.short=True --config.seed=1 --workdir=outputs/demo

Stages: toy data → tiny VAE fitted to the toy frames (configs/vae.py:tiny) → IDM (configs/idm.py:tiny)
→ SFT world model (configs/sft.py:tiny) → Flow-GRPO with the IDM reward (configs/grpo.py:tiny) → report. Each stage runs the real trainer with its tiny config;
the fields below only size the run. `short` swaps in the `shortened` values (also when set from the
command line, so `--config.short=True` works).
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

  # Toy data (eva_jax.data.toyworld.generate_dataset): 64 px, 33 frames (1 + 4·8) at 16 fps.
  # idm_episodes: more episodes of the same world (HDF5 only) for the IDM, which needs many poses to
  # beat the constant predictor on held-out episodes (the world model's episodes alone are too few).
  c.data = ml_collections.ConfigDict(dict(
      num_episodes=96, size=64, n_frames=33, smooth_fraction=0.5, val_fraction=0.125,
      idm_episodes=384))

  # Stage sizes: steps and batch sizes handed to each trainer's tiny config.
  c.vae = ml_collections.ConfigDict(dict(num_steps=300, batch_size=8, learning_rate=1e-3))
  # image_size: the IDM's input resize (configs/idm.py:tiny: two stages, a 4×4 map at 32 px).
  c.idm = ml_collections.ConfigDict(dict(num_steps=3000, batch_size=32, learning_rate=3e-3,
                                         image_size=32))
  # model: the world model's WanConfig preset, for SFT and GRPO alike. toy-i2v (width 128, 4 layers);
  # configs/sft.py:tiny's tiny-i2v (width 32, 2 layers) reaches loss ~0.8 and its samples lose the arms
  # after the first latent frame: the IDM then scores them like decoded noise (2.76 vs 2.76, 64 px
  # shortened run, seed 0) and GRPO has nothing to improve. toy-i2v: loss 0.45 at 400 steps.
  c.sft = ml_collections.ConfigDict(dict(num_steps=400, batch_size=8, learning_rate=1e-3,
                                         model="toy-i2v"))
  # num_conditions: first frames (training rows of the toy CSV) cycled num_prompts per iteration; a
  # divisor of num_prompts · num_iterations / 4 gives the reward curve's first and last quarters the
  # same first frames, so the two are compared on equal footing.
  # Trust region: EVA's (clip 1e-5; configs/grpo.py:tiny lr 1e-3, 2 inner epochs) is sized for 100
  # epochs of a 14B model; on the tiny DiT it leaves the policy where SFT put it (approx_kl ~1e-10, flat
  # reward). lr 3e-2, clip 1e-2 move it: on four full-demo draws with the tiny-i2v world model lr 3e-2
  # raised the reward by +0.47, +0.37, +0.27 and +0.01 (last vs first quarter), lr 1e-2 by +0.02,
  # +0.22, +0.06 and +0.12; with toy-i2v, +0.77 (seed 0), but by erasing the arms (docs/demo.md).
  # num_inner_epochs 2 (those figures: 4): with toy-i2v an update of 4 epochs takes 29 s of each
  # 33 s iteration on 2 idle cores, which would make the whole demo ~17.5 min (the stages before
  # GRPO took 473 s); 2 epochs halve the update.
  # timestep_fraction 1: EVA trains 39 of 40 steps; int(0.99·10) would leave the last step (σ 0.25 -> 0,
  # the largest noise of the 10-step schedule) untrained. beta 0 (Flow-GRPO's own default; EVA: 0.004):
  # EVA's KL pull holds the toy policy ~0.05 from the SFT model, where it balances the reward's (64 px
  # shortened run, seed 0: rise +0.30 with 0.004, +0.56 without). 32 rollouts an iteration (16 of each
  # of 2 first frames): with 8 the rise is lost in the rollout noise on some seeds (full demo, seed 2:
  # +0.03 ± 0.03 over 24 iterations of 8, +0.27 ± 0.02 over 16 of 32). The rise is still not reliable:
  # see docs/demo.md, "GRPO on the toy world".
  c.grpo = ml_collections.ConfigDict(dict(num_iterations=16, group_size=16, num_prompts=2,
                                          num_sampling_steps=10, learning_rate=3e-2, num_conditions=4,
                                          clip_range=1e-2, num_inner_epochs=2, timestep_fraction=1.0,
                                          beta=0.0))

  # Report: how many sampled videos to show before/after alignment, frames per strip.
  c.report = ml_collections.ConfigDict(dict(num_samples=4, max_frames=9, gif_scale=3))

  # The CI-sized run (tests/test_demo.py): same stages, a few steps each, tiny frames. Batches stay
  # multiples of 8 so they split over 8 devices. Its reward cannot show GRPO's effect: at 32 px (4x4
  # latents) with a 10-step VAE every decoded clip scores alike (IDM reward 4.8 for real, still and
  # random latents). A shortened run whose reward does respond costs ~10 min on 2 cores (64 px, the
  # VAE's 300 steps, 400 SFT steps, 24 GRPO iterations of 32): docs/demo.md, "GRPO on the toy world".
  c.shortened = ml_collections.ConfigDict(dict(
      data=dict(num_episodes=32, size=32, n_frames=17, val_fraction=0.125, idm_episodes=960),
      vae=dict(num_steps=10, batch_size=8),
      idm=dict(num_steps=1500, batch_size=32),
      sft=dict(num_steps=10, batch_size=8),
      grpo=dict(num_iterations=4, group_size=4, num_prompts=2, num_sampling_steps=4,
                num_conditions=2),
      report=dict(num_samples=2, max_frames=5, gif_scale=2),
  ))
  return c
