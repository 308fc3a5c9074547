"""One loader for every model: `load(kind, source, cfg, mesh=...) -> (graphdef, state)`.

    gdef, state = weights.load("dit", "Wan2.1-I2V-14B-480P/", wan_config("i2v-14b"), mesh=mesh)
    idm = weights.load_module("idm", "outputs/idm_run")           # architecture from the run's config.json

kind: 'dit' (WanModel), 'vae' (WanVAE), 'clip' (CLIPVisionEncoder), 'umt5' (UMT5Encoder), 'idm' (IDM).

source, detected from what is on disk (`source_format`):
  'random'     fresh weights from `seed` (smoke runs, benchmarks).
  PyTorch      a .pt/.pth/.bin file, a Lightning .ckpt (its 'state_dict', EVA's 'model.' prefix), a
               .safetensors file, a folder of shards with or without an index json (the Wan release
               folder): converted on the fly by convert/ (Wan, diffusers, EVA/LVP, IDM_singleview layouts).
  converted    an orbax directory written by `python -m convert` (or any StandardCheckpointer tree of
               the model's weights).
  run          a trainer's run directory or its checkpoints/ folder (train_sft, train_vae, train_idm):
               the weights inside the newest step (the best one for the IDM, when kept); the run's own
               config.json gives the architecture when `cfg` is None.

Every source is checked against the abstract model in one place (`check_tree`) with one error format
(`WeightsError`: the source, the parameter key, expected vs found shape), before anything is read into
device memory. Parameters land on `mesh` with the shardings of the logical-axis rules (one device
without a mesh); a random init of the DiT runs inside `jax.jit` with those output shardings, so no
device ever holds the whole 14B model. LoRA factors (a DiT config with lora_rank > 0) are never taken
from a source: they are initialised fresh, the way an adapter starts (B = 0).

Layering: this module sits above models/ and parallel/ and below data/, training/ and inference; it
imports convert/ (PyTorch readers) lazily, only here.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax.utils import logs
from eva_jax.utils.tree import keyed_like, string_keys

KINDS = ("dit", "vae", "clip", "umt5", "idm")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
LORA_KEYS = ("lora_a", "lora_b")


class WeightsError(ValueError, KeyError):
  """A source that does not fit the model: names the source, the key and the shapes."""

  __str__ = Exception.__str__  # KeyError would quote the message


# MARK: model configs from trainer configs


def dit_config(model_cfg, **extra):
  """WanConfig of a trainer's `config.model` (preset, dtypes, attention, remat, scan, num_layers)."""
  from eva_jax.models.wan import wan_config
  overrides = dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, attention=model_cfg.attention)
  for name in ("remat", "scan_layers", "precision"):
    if name in model_cfg:
      overrides[name] = model_cfg[name]
  if model_cfg.get("num_layers"):
    overrides["num_layers"] = model_cfg.num_layers
  overrides.update(extra)
  return wan_config(model_cfg.preset, **overrides)


def idm_config(model_cfg):
  """IDMConfig of configs/idm.py's `config.model` (a preset, image size, dtypes; blocks/width/mlp_dims
  override the preset's when set)."""
  from eva_jax.models.idm import idm_config as preset_config
  overrides = dict(image_size=tuple(model_cfg.image_size), dtype=jnp.dtype(model_cfg.dtype),
                   param_dtype=jnp.dtype(model_cfg.param_dtype))
  if model_cfg.get("blocks"):
    overrides["blocks"] = tuple(model_cfg.blocks)
  if model_cfg.get("width"):
    overrides["width"] = int(model_cfg.width)
  if model_cfg.get("mlp_dims"):
    overrides["mlp_dims"] = tuple(int(d) for d in model_cfg.mlp_dims)
  return preset_config(model_cfg.preset, **overrides)


def _vae_config_of_run(run):
  from eva_jax.models.vae import vae_config
  v = run.vae
  return vae_config(v.preset, **{k: jnp.dtype(v[k]) for k in ("dtype", "param_dtype") if k in v})


# MARK: the kinds


@dataclasses.dataclass(frozen=True)
class _Kind:
  build: Callable[[Any, nnx.Rngs], nnx.Module]
  convert: Callable[[Mapping, Any], dict]            # PyTorch state dict -> pure dict of numpy arrays
  run_config: Callable[[Any], Any] | None            # a run's config.json -> model config
  run_keys: tuple[str, ...]                          # where the weights sit in a trainer's saved state
  jit_init: bool                                     # random init inside jit (large models)
  best_step: bool = False                            # a run dir gives its best/ step when it has one


def _kind(kind: str) -> _Kind:
  # Imported on use: a kind's model and converter modules load only when that kind is asked for.
  if kind == "dit":
    from eva_jax.models.wan import WanModel
    return _Kind(lambda c, r: WanModel(c, rngs=r), _convert("convert.wan_dit", "convert_dit_state_dict"),
                 lambda run: dit_config(run.model), ("params", "model"), jit_init=True)
  if kind == "vae":
    from eva_jax.models.vae import WanVAE
    return _Kind(lambda c, r: WanVAE(c, rngs=r), _convert("convert.wan_vae", "convert_vae_state_dict"),
                 _vae_config_of_run, ("params", "model"), jit_init=False)
  if kind == "clip":
    from eva_jax.models.clip import CLIPVisionEncoder
    return _Kind(lambda c, r: CLIPVisionEncoder(c, rngs=r), _convert("convert.clip", "convert_clip_state_dict"),
                 None, ("params", "model"), jit_init=False)
  if kind == "umt5":
    from eva_jax.models.umt5 import UMT5Encoder
    return _Kind(lambda c, r: UMT5Encoder(c, rngs=r), _convert("convert.umt5", "convert_umt5_state_dict"),
                 None, ("params", "model"), jit_init=False)
  if kind == "idm":
    from eva_jax.models.idm import IDM
    return _Kind(lambda c, r: IDM(c, rngs=r), _convert("convert.idm", "convert_idm_state_dict"),
                 lambda run: idm_config(run.model), ("model_state_dict", "params", "model"), jit_init=True,
                 best_step=True)
  raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def _convert(module: str, name: str):
  def run(state_dict, cfg):
    import importlib
    return getattr(importlib.import_module(module), name)(state_dict, cfg)
  return run


# MARK: sources


def require_sources(config, fields: tuple[str, ...], kinds: Mapping[str, str] | None = None) -> None:
  """Fails before anything is built or compiled when a configured weights source is missing: `fields` are
  dotted config keys ('reward.idm_checkpoint'); an empty value or 'random' is not checked. `kinds` maps a field
  to the model kind it must hold: a trainer's run directory of another kind (a VAE run as the DiT's init) fails
  here too, naming the field."""
  for field in fields:
    value = config
    for part in field.split("."):
      value = value.get(part, "") if hasattr(value, "get") else ""
    if not value or str(value) == "random":
      continue
    if not pathlib.Path(str(value)).expanduser().exists():
      raise FileNotFoundError(f"config.{field}: weights source {value} does not exist (a PyTorch file or folder, "
                              "an orbax directory from `python -m convert`, a trainer's run directory, or 'random')")
    kind = (kinds or {}).get(field)
    if kind is not None and pathlib.Path(str(value)).is_dir() and _checkpoint_root(pathlib.Path(str(value))):
      try:
        _check_run_kind(kind, value)
      except WeightsError as e:
        raise WeightsError(f"config.{field}: {e}") from None


def source_format(source: str | pathlib.Path) -> str:
  """'random', 'torch', 'converted' or 'run' (see the module docstring); raises for anything else."""
  text = str(source)
  if text == "random":
    return "random"
  path = pathlib.Path(text)
  if not path.exists():
    raise FileNotFoundError(f"weights source {path} does not exist (a PyTorch file or folder, an orbax "
                            "directory from `python -m convert`, a trainer's run directory, or 'random')")
  if path.is_file():
    if text.endswith((".safetensors", ".safetensors.index.json") + TORCH_SUFFIXES):
      return "torch"
    raise WeightsError(f"{path}: unknown weights file type (expected .safetensors, an index json or "
                       f"{TORCH_SUFFIXES})")
  if _checkpoint_root(path) is not None:
    return "run"
  if any((path / n).exists() for n in ("eva_convert.json", "_CHECKPOINT_METADATA", "_METADATA")):
    return "converted"
  if any(path.glob("*.safetensors")) or any(p.suffix in TORCH_SUFFIXES for p in path.iterdir()):
    return "torch"
  raise WeightsError(f"{path}: not a weights directory: no safetensors or torch files, no orbax metadata, "
                     "no checkpoints/ with numbered steps")


def _checkpoint_root(path: pathlib.Path) -> pathlib.Path | None:
  """The folder of numbered step directories of a trainer's run (path itself or path/checkpoints)."""
  for root in (path / "checkpoints", path):
    if root.is_dir() and any(c.name.isdigit() and c.is_dir() for c in root.iterdir()):
      return root
  return None


def read_run_config(source: str | pathlib.Path):
  """The ConfigDict a trainer saved as config.json in its run directory (or beside its checkpoints/),
  or None when there is none."""
  import ml_collections
  path = pathlib.Path(source)
  for candidate in (path / "config.json", path.parent / "config.json"):
    if candidate.is_file():
      try:
        return ml_collections.ConfigDict(json.loads(candidate.read_text()))
      except json.JSONDecodeError as e:
        raise WeightsError(f"{candidate}: not valid JSON ({e})") from None
  return None


def _run_step_dir(root: pathlib.Path, best: bool) -> pathlib.Path:
  """<root>/<newest step>, or <root>/best/<step> when `best` and a best checkpoint is kept."""
  def newest(folder: pathlib.Path):
    steps = sorted((int(c.name) for c in folder.iterdir() if c.name.isdigit() and (c / "state").is_dir()),
                   reverse=True) if folder.is_dir() else []
    return folder / str(steps[0]) if steps else None
  found = (newest(root / "best") if best else None) or newest(root)
  if found is None:
    raise FileNotFoundError(f"{root}: no finished checkpoint step (expected <step>/state)")
  return found / "state"


# MARK: the one entry point


def load(kind: str, source: str | pathlib.Path, cfg=None, *, mesh=None, dtype=None, seed: int = 0,
         use_ema: bool = False, best: bool | None = None, default_cfg=None,
         overrides: Mapping[str, Any] | None = None, jit_init: bool | None = None):
  """(graphdef, state) of model `kind` with weights from `source`, checked and placed.

  cfg: the model config (WanConfig, VAEConfig, ...). None: read from a run's config.json, or inferred
    from a PyTorch IDM checkpoint, else `default_cfg`.
  mesh: place parameters by their logical axis names on this mesh (default: the first device).
  dtype: cast floating weights to this dtype (default: the config's param_dtype).
  overrides: config fields replaced in a config read or inferred from the source (e.g. the IDM's
    image_size).
  use_ema: from an SFT run, take its EMA weights. best: from a run, its best/ checkpoint (default:
    the IDM's best, the others' newest step).
  jit_init: random weights (and fresh LoRA factors) created inside jit, sharded at creation (default: the
    DiT and the IDM); eager creation differs from it by float32 rounding.
  """
  spec = _kind(kind)
  fmt = source_format(source)
  where = f"{kind} weights {source}"
  if fmt == "run":
    _check_run_kind(kind, source)
  if cfg is None:
    cfg = _config_from_source(kind, spec, source, fmt, default_cfg)
    if overrides:
      cfg = dataclasses.replace(cfg, **overrides)
  if fmt == "random":
    return _random(spec, cfg, mesh, seed, dtype, spec.jit_init if jit_init is None else jit_init)
  graphdef, abstract = _abstract(spec, cfg, seed)
  weights_abs, lora_abs = nnx.split_state(abstract, _not_lora(), ...)
  targets = _targets(weights_abs, mesh, dtype)
  if fmt == "torch":
    pure = _from_torch(kind, spec, pathlib.Path(source), cfg, targets, where)
  else:
    pure = _from_orbax(spec, pathlib.Path(source), fmt, targets, where, use_ema, best)
  nnx.replace_by_pure_dict(weights_abs, pure)
  if jax.tree.leaves(lora_abs):  # fresh adapters (inside jit, XLA drops the unused base initialisers)
    lora_sh = _shardings(lora_abs, mesh)
    init = lambda: nnx.to_pure_dict(nnx.state(spec.build(cfg, nnx.Rngs(seed)), _lora_filter()))  # noqa: E731
    use_jit = spec.jit_init if jit_init is None else jit_init
    nnx.replace_by_pure_dict(lora_abs, jax.jit(init, out_shardings=lora_sh)() if use_jit
                             else jax.device_put(init(), lora_sh))
  return graphdef, nnx.merge_state(weights_abs, lora_abs)


def load_module(kind: str, source, cfg=None, **kwargs) -> nnx.Module:
  """`load` merged into a module (the IDM comes back in eval mode)."""
  model = nnx.merge(*load(kind, source, cfg, **kwargs))
  if kind == "idm":
    model.eval()
  return model


# Sections only one trainer's config.json has: which trainer wrote a run directory, and the model it holds.
_TRAINERS = (("train_grpo", ("reward", "sample"), "a LoRA adapter (its lora_adapter/)"),
             ("train_sft", ("diffusion",), "dit"), ("train_idm", ("augment",), "idm"),
             ("train_vae", ("loss", "vae"), "vae"))


def run_trainer(run) -> tuple[str, str] | None:
  """(trainer, the model kind its checkpoints hold) of a run's config.json, None when unknown."""
  for trainer, sections, holds in _TRAINERS:
    if all(k in run for k in sections):
      return trainer, holds
  return None


def _check_run_kind(kind: str, source) -> None:
  """A run of another trainer given as this kind's weights (a VAE run as DiT init, an SFT run as the reward
  IDM) fails naming what the run is, instead of a missing parameter or a config field it lacks."""
  run = read_run_config(source)
  found = run_trainer(run) if run is not None else None
  if found is not None and found[1] != kind:
    raise WeightsError(f"{kind} weights {source}: this is a {found[0]} run directory (its config.json), which "
                       f"holds {found[1]} weights, not {kind} weights")


def _config_from_source(kind: str, spec: _Kind, source, fmt: str, default_cfg):
  if fmt == "run" and spec.run_config is not None:
    run = read_run_config(source)
    if run is not None:
      try:
        return spec.run_config(run)
      except (AttributeError, KeyError, TypeError, ValueError) as e:  # a config.json without the model's fields
        raise WeightsError(f"{kind} weights {source}: its config.json does not describe a {kind} model "
                           f"({type(e).__name__}: {e})") from None
  if fmt == "torch" and kind == "idm":  # the release checkpoint states its own architecture
    from convert.idm import infer_idm_config
    return infer_idm_config(_torch_state_dict(kind, pathlib.Path(source)))
  if default_cfg is not None:
    return default_cfg
  raise WeightsError(f"{kind} weights {source}: no model config given and none found "
                     f"({'no config.json in the run directory' if fmt == 'run' else fmt + ' source'})")


def _lora_filter():
  from eva_jax.models.lora import LoRAParam
  return LoRAParam


def _not_lora():
  return nnx.Not(_lora_filter())


def _shardings(state, mesh):
  if mesh is not None:
    from eva_jax.parallel.sharding import state_shardings
    return nnx.to_pure_dict(state_shardings(state, mesh))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: one, nnx.to_pure_dict(state))


def _targets(abstract_state, mesh, dtype) -> dict:
  """Pure dict of ShapeDtypeStructs with their final dtype and sharding."""
  def one(x, sh):
    dt = jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    return jax.ShapeDtypeStruct(x.shape, dt, sharding=sh)
  return jax.tree.map(one, nnx.to_pure_dict(abstract_state), _shardings(abstract_state, mesh))


def _abstract(spec: _Kind, cfg, seed: int):
  """(graphdef, state of ShapeDtypeStructs), allocating nothing; unlike nnx.eval_shape this also works
  under an active mesh (the variables keep their logical axis names)."""
  return jax.eval_shape(lambda: nnx.split(spec.build(cfg, nnx.Rngs(seed))))


def _random(spec: _Kind, cfg, mesh, seed: int, dtype, jit_init: bool):
  graphdef, abstract = _abstract(spec, cfg, seed)
  shardings = _shardings(abstract, mesh)

  def create():
    pure = nnx.to_pure_dict(nnx.state(spec.build(cfg, nnx.Rngs(seed))))
    if dtype is not None:
      pure = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, pure)
    return pure
  pure = jax.jit(create, out_shardings=shardings)() if jit_init else jax.device_put(create(), shardings)
  nnx.replace_by_pure_dict(abstract, pure)
  return graphdef, abstract


# MARK: checks


def check_tree(expected: Mapping, found: Mapping, where: str, *, ignore: tuple[str, ...] = (), prefix: str = ""):
  """Same keys and shapes as `expected` (leaves with .shape); raises WeightsError naming the first
  difference: a missing key, an unexpected one (except names in `ignore`), or expected vs found shape."""
  for k, e in expected.items():
    key = f"{prefix}{k}"
    if str(k) not in {str(x) for x in found}:
      shape = "" if isinstance(e, Mapping) else f" (expected shape {tuple(e.shape)})"
      raise WeightsError(f"{where}: missing parameter {key}{shape}")
    f = found[k] if k in found else found[str(k)]
    if isinstance(e, Mapping):
      if not isinstance(f, Mapping):
        raise WeightsError(f"{where}: {key} should be a group of parameters, found an array")
      check_tree(e, f, where, ignore=ignore, prefix=f"{key}/")
    elif isinstance(f, Mapping):
      raise WeightsError(f"{where}: {key} should be an array of shape {tuple(e.shape)}, found a group")
    elif _shape(f) != tuple(e.shape):
      raise WeightsError(f"{where}: parameter {key}: expected shape {tuple(e.shape)}, found {_shape(f)}")
  extra = sorted(str(k) for k in found if str(k) not in {str(x) for x in expected} and str(k) not in ignore)
  if extra:
    raise WeightsError(f"{where}: unexpected parameter(s) {[prefix + k for k in extra][:8]}"
                       f"{' ...' if len(extra) > 8 else ''} ({len(extra)} in all)")


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


# MARK: PyTorch sources


def _torch_state_dict(kind: str, path: pathlib.Path) -> Mapping:
  from convert.io import open_state_dict
  try:
    return open_state_dict(str(path))
  except ImportError:
    raise  # convert.io says which extra to install
  except Exception as e:  # noqa: BLE001 (torch/safetensors raise their own types: truncated, not a pickle, ...)
    if kind == "idm" and path.suffix in TORCH_SUFFIXES and "weights_only" in str(e):
      # The released IDM_singleview.pt pickles training arguments next to the tensors.
      from convert.io import import_torch
      return import_torch().load(path, map_location="cpu", weights_only=False)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise WeightsError(f"{path}: cannot read as PyTorch weights ({type(e).__name__}: {msg})") from None


def _from_torch(kind: str, spec: _Kind, path: pathlib.Path, cfg, targets: Mapping, where: str) -> dict:
  """Converted PyTorch weights as device arrays; the DiT streams one parameter at a time."""
  sd = _torch_state_dict(kind, path)
  try:
    if kind == "dit":
      from convert.wan_dit import iter_dit_params
      out: dict = {}
      for p, arr in iter_dit_params(sd, cfg):  # converter checks keys and shapes before reading
        node, tgt = out, targets
        for k in p[:-1]:
          node, tgt = node.setdefault(k, {}), tgt[k]
        t = tgt[p[-1]]
        node[p[-1]] = jax.device_put(np.asarray(arr, t.dtype), t.sharding)
      check_tree(targets, out, where)
      return out
    tree = spec.convert(sd, cfg)
  except WeightsError:
    raise
  except (KeyError, ValueError) as e:
    raise WeightsError(f"{where}: {e.args[0] if e.args else e}") from None
  check_tree(targets, tree, where)
  return jax.tree.map(lambda x, t: jax.device_put(np.asarray(x, t.dtype), t.sharding), tree, targets)


# MARK: orbax sources


def _from_orbax(spec: _Kind, path: pathlib.Path, fmt: str, targets: Mapping, where: str, use_ema: bool,
                best: bool | None) -> dict:
  """Weights restored straight onto their shardings (only the weights: a train state's optimiser
  moments are not read)."""
  import orbax.checkpoint as ocp
  if fmt == "run":
    item = _run_step_dir(_checkpoint_root(path), spec.best_step if best is None else best)
  else:  # `python -m convert` (orbax v1) keeps the tree in state/; a StandardCheckpointer dir holds it
    item = path / "state" if (path / "state" / "_METADATA").exists() else path
  where = f"{where} ({item})"
  try:
    # a Checkpointer step keeps _CHECKPOINT_METADATA one folder up, which orbax warns about here
    with logs.without_library_warning("Metadata file does not exist"):
      tree = ocp.PyTreeCheckpointer().metadata(item.absolute())
    tree = getattr(tree, "item_metadata", tree)
    tree = tree.tree if hasattr(tree, "tree") else tree
    if tree is None:
      raise ValueError("no tree metadata")
  except (OSError, ValueError, KeyError) as e:
    raise WeightsError(f"{where}: not a readable orbax checkpoint ({type(e).__name__}: {e})") from None
  tree = dict(tree) if isinstance(tree, Mapping) else tree
  keys = (("ema",) if use_ema else ()) + spec.run_keys
  key = next((k for k in keys if isinstance(tree, Mapping) and k in tree), None)
  if use_ema and key != "ema":
    raise WeightsError(f"{where}: use_ema is set but the checkpoint has no 'ema' weights")
  found = tree[key] if key is not None else tree
  wanted = string_keys(targets)
  check_tree(wanted, found, where, ignore=LORA_KEYS)
  target = {key: wanted} if key is not None else wanted
  restored = ocp.PyTreeCheckpointer().restore(
      item.absolute(), args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  return keyed_like(restored[key] if key is not None else restored, targets)
