"""Flow-GRPO post-training of the Wan I2V world model with EVA's IDM smoothness reward.

  python scripts/train_grpo.py --config=configs/grpo.py --config.reward.idm_checkpoint=IDM_singleview.pt \
      --config.model.checkpoint=outputs/<date>/<time>/checkpoints
  python scripts/train_grpo.py --config=configs/grpo.py:tiny --config.reward.idm_checkpoint=<ckpt> \
      --workdir=outputs/grpo_tiny            # rerun with the same --workdir to resume

Results go to --workdir (default: a fresh outputs/<date>/<time>/): metrics.jsonl, tensorboard/,
checkpoints/, lora_adapter/ (PEFT safetensors), best_reward/, idm_plots/, videos/.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from scripts._common import trainer_cli  # noqa: E402


def _needs_reward(config):
  if not config.reward.idm_checkpoint:
    raise SystemExit("error: set --config.reward.idm_checkpoint (the reward IDM, e.g. IDM_singleview.pt); "
                     "GRPO has no reward without it")


cli = trainer_cli("configs/grpo.py", "grpo", "grpo", check=_needs_reward)

if __name__ == "__main__":
  cli()
