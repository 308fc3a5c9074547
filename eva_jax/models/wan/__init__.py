"""The Wan 2.1 DiT: WanModel, its config and its checkpoint loader.

Model and loader are imported on first use (PEP 562) so that eva_jax.models.lora, which builds on
eva_jax.models.wan.layers, can be imported first without a cycle.
"""

from eva_jax.models.wan.config import PRESETS, WanConfig, wan_config, zero_clip_features

__all__ = ["PRESETS", "WanConfig", "WanModel", "abstract_dit", "wan_config", "zero_clip_features"]


def __getattr__(name):
  if name == "WanModel":
    from eva_jax.models.wan.model import WanModel
    return WanModel
  if name == "abstract_dit":
    from eva_jax.models.wan import loading
    return getattr(loading, name)
  raise AttributeError(f"module 'eva_jax.models.wan' has no attribute {name!r}")
