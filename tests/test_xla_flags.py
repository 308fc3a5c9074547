"""The default XLA flags the entry points add: appended, never overriding the user's own setting."""

from eva_jax.utils.xla_flags import DEFAULT_XLA_FLAGS, apply_default_xla_flags


def test_appends_defaults_and_keeps_user_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  flags = apply_default_xla_flags().split()
  assert flags[0] == "--xla_force_host_platform_device_count=8"
  assert set(DEFAULT_XLA_FLAGS) <= set(flags)
  assert apply_default_xla_flags().split() == flags  # idempotent


def test_user_setting_wins_and_opt_out(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
  assert apply_default_xla_flags() == "--xla_gpu_enable_triton_gemm=true"
  monkeypatch.delenv("XLA_FLAGS")
  monkeypatch.setenv("EVA_JAX_DEFAULT_XLA_FLAGS", "0")
  assert apply_default_xla_flags() == ""
