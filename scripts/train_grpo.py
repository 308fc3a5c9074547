"""Flow-GRPO post-training of the Wan I2V world model with EVA's IDM smoothness reward.

  python scripts/train_grpo.py --config=configs/grpo.py --config.reward.idm_checkpoint=IDM_singleview.pt \
      --config.model.checkpoint=outputs/<date>/<time>/checkpoints
  python scripts/train_grpo.py --config=configs/grpo.py:tiny --config.reward.idm_checkpoint=<ckpt> \
      --workdir=outputs/grpo_tiny            # rerun with the same --workdir to resume

Results go to --workdir (default: a fresh outputs/<date>/<time>/): metrics.jsonl, tensorboard/,
checkpoints/, lora_adapter/ (PEFT safetensors), best_reward/, idm_plots/, videos/.
"""

from __future__ import annotations

import _common  # noqa: F401  (repo root on sys.path)
from _common import trainer_main


def _needs_reward(config):
  if not config.reward.idm_checkpoint:
    raise SystemExit("error: set --config.reward.idm_checkpoint (the reward IDM, e.g. IDM_singleview.pt); "
                     "GRPO has no reward without it")


if __name__ == "__main__":
  trainer_main("configs/grpo.py", "grpo", "grpo", check=_needs_reward)
