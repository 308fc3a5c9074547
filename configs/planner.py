"""The planner service (scripts/serve_planner.py): configs/infer.py's models and sampler, plus the IDM and
the HTTP server settings.

  python scripts/serve_planner.py --config=configs/planner.py \\
      --config.ckpt.wan_dir=data/ckpts/Wan2.1-I2V-14B-480P --config.ckpt.tuned=data/ckpts/eva_i2v_14B.ckpt \\
      --config.idm.checkpoint=data/ckpts/IDM_singleview.pt --config.server.port=8000
  python scripts/serve_planner.py --config=configs/planner.py:tiny     # random tiny models on CPU

See docs/planner.md for the HTTP API.
"""

from __future__ import annotations

import ml_collections

from configs import infer


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = infer.get_config(arg)           # model / ckpt / sampler / precision, same variants ('eva', 'tiny')
  del c.data                          # requests bring the images
  c.use_mesh = False
  c.idm = ml_collections.ConfigDict(dict(
      checkpoint="",                  # any IDM source of eva_jax.weights: IDM_singleview.pt, a train_idm run dir
      preset="resnet50"))             # architecture for random init and for orbax dirs without a config.json
  c.server = ml_collections.ConfigDict(dict(
      host="127.0.0.1", port=8000,
      batch_size=2,                   # requests with equal options are batched up to this size
      max_queue=16,                   # more waiting requests -> 503
      max_segments=4,                 # '<sep>' segments per instruction
      max_steps=50, max_guidance=20.0, max_aspect_change=2.0,
      resize="stretch",               # observation resize: EVA's stretch, or 'crop' / 'pad' (configs/infer.py)
      batch_wait_s=0.05,
      warmup=True))                   # compile at start-up with a dummy request (reported in /health)
  if c.variant == "tiny":
    c.idm.preset = "tiny"
    c.sampler.num_steps = 4
    c.server.max_steps = 8
  return c
