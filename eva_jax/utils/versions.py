"""The software versions that decide a GPU benchmark's speed, as the running process sees them.

  runtime_versions() -> {'jax': '0.11.2', 'jaxlib': '0.11.2', 'cuda_plugin': 'jax-cuda13-plugin 0.11.2',
                         'cudnn': '9.8.0 (90800)' (the loaded library), 'cudnn_build': ..., 'cuda_runtime': ..., 'cublas': ...,
                         'driver': '580.159.04', 'device': 'NVIDIA H200', 'nvidia_packages': {...}}

cuDNN's speed moves a lot between releases (spec/perf_anchors.md: ~630 TFLOP/s measured here vs ~700 for
9.19 on the same card), so every bench result carries the *loaded* library's version, not the wheel's
metadata alone. On CPU the GPU fields are None. Nothing here raises: a field it cannot read is None.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess

import jax


def _fmt(v) -> str | None:
  """The integer versions the CUDA libraries report, dotted, with the raw number kept: cuDNN 9 and cuBLAS
  encode MAJOR*10000 + MINOR*100 + PATCH (90800 -> '9.8.0 (90800)'), the CUDA runtime and driver API
  MAJOR*1000 + MINOR*10 (12080 -> '12.8 (12080)')."""
  if v is None:
    return None
  if not isinstance(v, int):
    return str(v)
  if 90000 <= v < 1000000:
    return f"{v // 10000}.{(v // 100) % 100}.{v % 100} ({v})"
  if 10000 <= v < 90000:
    return f"{v // 1000}.{(v % 1000) // 10} ({v})"
  return str(v)


def _call(module, name):
  fn = getattr(module, name, None)
  if fn is None:
    return None
  try:
    return fn()
  except Exception:  # noqa: BLE001 - a library that cannot answer is reported as unknown
    return None


def _packages(prefixes) -> dict[str, str]:
  out = {}
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith(prefixes):
      out[name] = dist.version
  return dict(sorted(out.items()))


def _nvidia_smi() -> dict:
  exe = shutil.which("nvidia-smi")
  if exe is None:
    return {}
  try:
    line = subprocess.run([exe, "--query-gpu=driver_version,name", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=20).stdout.strip().splitlines()[0]
    driver, name = (s.strip() for s in line.split(",", 1))
    return {"driver": driver, "smi_name": name}
  except Exception:  # noqa: BLE001
    return {}


def runtime_versions() -> dict:
  """jax, jaxlib, the CUDA plugin, cuDNN/CUDA/cuBLAS as loaded, the driver and the device name."""
  import jaxlib
  dev = jax.devices()[0]
  info = {"jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", None),
          "backend": dev.platform, "device": getattr(dev, "device_kind", str(dev))}
  plugins = _packages(("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu"))
  info["cuda_plugin"] = ", ".join(f"{k} {v}" for k, v in plugins.items()) or None
  try:
    from jax._src.lib import cuda_versions
  except ImportError:
    cuda_versions = None
  for key, fn in (("cudnn", "cudnn_get_version"), ("cudnn_build", "cudnn_build_version"),
                  ("cuda_runtime", "cuda_runtime_get_version"), ("cuda_runtime_build", "cuda_runtime_build_version"),
                  ("cuda_driver_api", "cuda_driver_get_version"), ("cublas", "cublas_get_version")):
    info[key] = _fmt(_call(cuda_versions, fn)) if cuda_versions is not None and dev.platform == "gpu" else None
  info["driver"] = None
  if dev.platform == "gpu":
    info.update(_nvidia_smi())
  info["nvidia_packages"] = _packages(("nvidia-",)) or None
  return info
