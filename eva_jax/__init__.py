"""eva_jax: EVA (Executable Video Alignment) in JAX/Flax NNX."""

from flax import nnx as _nnx

# Parameters carry logical axis names as metadata only; placement on a mesh is done explicitly by
# eva_jax.parallel (jit with out_shardings), so modules can be built with or without a mesh.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
