"""The Wan 2.1 DiT: WanModel, its config and its checkpoint loader."""

from eva_jax.models.wan.config import PRESETS, WanConfig, wan_config
from eva_jax.models.wan.model import WanModel

__all__ = ["PRESETS", "WanConfig", "WanModel", "wan_config"]
