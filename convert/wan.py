"""Wan 2.1 converters: the DiT (convert.wan_dit) and, when present, the VAE (convert.wan_vae)."""

from convert.wan_dit import (convert_dit_state_dict, detect_layout, iter_dit_params, mapping_table,  # noqa: F401
                             plan_dit)


def convert_vae_state_dict(state_dict, cfg=None, **kwargs):
  """Forwards to convert.wan_vae (written separately); imported lazily so the DiT converter works without it."""
  try:
    from convert.wan_vae import convert_vae_state_dict as impl
  except ImportError as e:
    raise ImportError(f"convert.wan_vae is not available ({e}); the VAE converter lives there") from e
  return impl(state_dict, cfg, **kwargs)
