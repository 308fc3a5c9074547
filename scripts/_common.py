"""What every entry point shares: the `--config` flag, the command line's rules, quiet output, one-line errors.

  from scripts._common import config_flag, run
  _CONFIG = config_flag("configs/sft.py:tiny")
  def main(argv): ...
  def cli(argv=None): run(main, argv)       # the console script (pyproject.toml) and `python scripts/x.py`

The command line:
  --config=configs/x.py[:variant]   a relative path is taken from the working directory when it exists
                                    there, else from the installed package (so scripts run anywhere)
  --config.a.b=value                overrides; the config is locked, so a misspelled key is an error
  --help / --helpfull               this script's flags and every config field with its value
  --verbosity=N / EVA_JAX_VERBOSITY library INFO logging on the terminal (eva_jax/utils/logs.py)
  positional arguments              an error: every input is a flag
Errors end the run with `error: ... (traceback: <log file>)` and exit status 1; usage errors with status 2.
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `configs.*` and `eva_jax` import from a plain checkout too
  sys.path.insert(0, str(ROOT))

from eva_jax.utils.xla_flags import apply_default_xla_flags  # noqa: E402

apply_default_xla_flags()  # before any computation starts the backend

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from eva_jax.utils import logs  # noqa: E402

_CONFIG_FLAGS: list[str] = []  # names of the config-file flags defined through config_flag()
_CONFIG_DEFAULTS: dict[str, str] = {}  # their default `path[:arg]`
_DOC: list[str | None] = [None]  # the --help page's text: the entry point's module docstring
_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def resolve_config_path(spec: str) -> str:
  """`configs/x.py:arg` -> an absolute path: from the working directory if the file is there, else from
  the package root (the checkout, or site-packages for an installed wheel)."""
  if not spec:
    return spec
  path, sep, arg = spec.partition(":")
  p = pathlib.Path(path).expanduser()
  if not p.is_absolute():
    if not p.exists() and not (ROOT / path).exists():
      where = {str(pathlib.Path.cwd().resolve()), str(ROOT)}  # one folder when run from the checkout
      _usage_error(f"config file {path} not found in {' or in '.join(sorted(where))}")
    p = p.resolve() if p.exists() else ROOT / path
  elif not p.exists():
    _usage_error(f"config file {p} not found")
  return str(p) + sep + arg


def config_flag(default: str | None, name: str = "config", help_string: str = "ml_collections config file[:variant]"):
  """`--config=configs/x.py:tiny --config.a.b=1`; the config is locked, so a misspelled key is an error."""
  if default and not pathlib.Path(default.split(":")[0]).is_absolute():
    path, _, arg = default.partition(":")
    default = str(ROOT / path) + (f":{arg}" if arg else "")
  if name not in _CONFIG_FLAGS:
    _CONFIG_FLAGS.append(name)
  _CONFIG_DEFAULTS[name] = default or ""
  return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)


def workdir_problem(value: str | None) -> str | None:
  """Why `value` cannot be a run directory (None when it can): a file, under a file, not writable."""
  if not value:
    return None
  path = pathlib.Path(value).expanduser()
  if path.exists() and not path.is_dir():
    return "is a file, not a directory (a new run directory, or an earlier run's to resume)"
  probe = path
  while not probe.exists():  # the nearest folder that exists: where the run directory would be made
    probe = probe.parent
  if not probe.is_dir():
    return f"cannot be created: {probe} is a file"
  if not os.access(probe, os.W_OK | os.X_OK):
    return f"{'is' if probe == path else 'cannot be created: ' + str(probe) + ' is'} not writable"
  return None


def workdir_flag(help_string: str):
  """`--workdir`, checked when the command line is parsed: a bad one is a usage error naming the flag."""
  holder = flags.DEFINE_string("workdir", None, help_string)

  def valid(value):
    problem = workdir_problem(value)
    if problem:
      raise flags.ValidationError(problem)
    return True
  flags.register_validator("workdir", valid)
  return holder


def _defined_config_flags() -> list[str]:
  return [n for n in _CONFIG_FLAGS if n in flags.FLAGS]


def _resolve_config_args(argv: list[str]) -> list[str]:
  out, i = list(argv[:1]), 1
  while i < len(argv):
    arg = argv[i]
    for name in _CONFIG_FLAGS:
      if arg.startswith(f"--{name}="):
        arg = f"--{name}=" + resolve_config_path(arg.split("=", 1)[1])
      elif arg == f"--{name}" and i + 1 < len(argv):  # `--config path`
        arg = f"--{name}=" + resolve_config_path(argv[i + 1])
        i += 1
    out.append(arg)
    i += 1
  return out


def _without_traceback(msg: str) -> str:
  """ml_collections puts the config script's whole traceback into its message: keep the last line."""
  head, sep, tail = msg.partition("Traceback (most recent call last)")
  if sep:
    last = [line for line in tail.splitlines() if line.strip()][-1:]
    msg = head.rstrip(": \n\t") + ": " + " ".join(last)
  return " ".join(msg.split())


def _usage_error(msg: str) -> None:
  sys.stderr.write(f"error: {msg}\n")
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses argv into the global FLAGS (config resolved, overrides applied); returns [argv[0]].

  Usage errors (a bad override, an unknown flag, a positional argument) exit with status 2 and one line.
  """
  argv = _resolve_config_args(list(argv))
  for name in _defined_config_flags():
    given = any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv[1:])
    default = _CONFIG_DEFAULTS.get(name)
    overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith(f"--{name}.")]
    if not given and default and any(o not in flags.FLAGS for o in overrides):
      # Overrides of the default config: ml_collections defines (and applies) those it saw in sys.argv when
      # the flag was defined at import, which misses a cli(argv) call; naming the file makes it parse them
      # now. Not when they are defined already (`python scripts/x.py --config.a=1`): a second definition
      # is an absl error.
      argv.insert(1, f"--{name}={default}")
  # ml_collections reads the --config.* overrides from sys.argv, not from the argv it is given.
  sys.argv = argv
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _usage_error(f"{_without_traceback(str(e))} (run with --help to list the flags)")
  except (AttributeError, KeyError, TypeError, ValueError, OSError, ImportError) as e:
    msg = " ".join(str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").split())
    overrides = [a for a in argv[1:] if any(a.startswith(f"--{n}.") for n in _CONFIG_FLAGS)]
    files = [a for a in argv[1:] if any(a.startswith(f"--{n}=") for n in _CONFIG_FLAGS)]
    what = f"config override {' '.join(overrides)}" if overrides else f"config {' '.join(files)}".strip()
    _usage_error(f"bad {what}: {msg} (config keys are fixed by the config file; run with --help to list them)")
  for name in _defined_config_flags():  # ml_collections defers a config file's load error to the first `.value`
    try:
      value = flags.FLAGS[name].value
      if type(value).__name__ == "_ErrorConfig":  # what ml_collections holds for a file that did not load
        raise object.__getattribute__(value, "_error")
    except Exception as e:  # the config script's own error: a missing file, a bad variant, a typo in it
      spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{name}=")), flags.FLAGS[name].default)
      _usage_error(f"bad --{name}={spec}: {' '.join(str(e).split())}")
  if len(rest) > 1:
    _usage_error(f"unexpected positional argument(s) {rest[1:]}: every input is a --flag "
                 "(run with --help to list them)")
  return rest[:1]


def _is_ours(module: str) -> bool:
  return (module in ("__main__", sys.argv[0]) or module.startswith("scripts") or module == "_common"
          or module.endswith(".py") and str(ROOT) in os.path.abspath(module))


def help_text(full: bool = False) -> str:
  """The main module's docstring, its flags, and every field of the parsed config."""
  doc = (_DOC[0] or getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
  lines = [f"usage: {pathlib.Path(sys.argv[0]).name} [--flag=value ...]", ""]
  if doc:
    lines += [doc, ""]
  lines.append("flags:")
  seen = set()
  for module, module_flags in sorted(flags.FLAGS.flags_by_module_dict().items()):
    if not _is_ours(module):
      continue
    for fl in module_flags:
      if fl.name in seen or "." in fl.name:
        continue
      seen.add(fl.name)
      default = fl.default_as_str.strip('"') if fl.default_as_str else repr(fl.default)
      lines.append(f"  --{fl.name}: {fl.help} (default: {default})")
  lines.append("  --verbosity: 0 = quiet terminal (default), 1 = library INFO logging too, 2 = DEBUG; "
               f"or set {logs.ENV_VERBOSITY}")
  for name in _defined_config_flags():
    try:
      config = flags.FLAGS[name].value
      if type(config).__name__ == "_ErrorConfig":
        raise object.__getattribute__(config, "_error")
    except Exception as e:  # a help page must print even when the config does not load
      lines += ["", f"(--{name} did not load: {' '.join(str(e).split())})"]
      continue
    if config is None:
      continue
    lines += ["", f"config fields (override with --{name}.<field>=<value>):"]
    lines += [f"  --{name}.{k}={v!r}" for k, v in _flatten(config)]
  if full:
    lines += ["", "all flags, the libraries' included:", flags.FLAGS.get_help()]
  return "\n".join(lines) + "\n"


def _flatten(config, prefix: str = ""):
  items = config.items() if hasattr(config, "items") else []
  for k, v in sorted(items):
    if hasattr(v, "items"):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _parse(argv):
  argv = list(argv)
  wants_help = [a for a in argv[1:] if a in _HELP or a.split("=")[0] in _HELP]
  if wants_help:
    rest = [a for a in argv if a not in wants_help]
    try:
      flags.FLAGS(_resolve_config_args(rest), known_only=True)
    except (Exception, SystemExit):  # a help page must print even when the other flags do not parse
      sys.stderr.flush()
      flags.FLAGS.mark_as_parsed()
    sys.stdout.write(help_text(full=any("full" in a or "xml" in a for a in wants_help)))
    sys.exit(0)
  rest = parse_flags(argv)
  v = flags.FLAGS["verbosity"]
  logs.setup(v.value if v.present else None)
  return rest


def run(main, argv: list[str] | None = None, doc: str | None = None) -> None:
  """absl app.run with the rules above and `jax.distributed.initialize()` on multi-host launches.

  `doc` (default: the docstring of main's module) heads the --help page."""
  prog = pathlib.Path((argv or sys.argv)[0]).name
  _DOC[0] = doc if doc is not None else getattr(sys.modules.get(main.__module__), "__doc__", None)

  def wrapped(args):
    def body():
      from eva_jax.parallel import distributed
      distributed.initialize()
      return main(args)
    return logs.guarded(body, prog)
  app.run(wrapped, argv=argv, flags_parser=_parse)


def trainer_cli(config_default: str, module: str, name: str, check=None):
  """Defines the flags of a `scripts/train_<x>.py` and returns its `cli(argv=None)`: `--config`, `--workdir`
  (default a fresh outputs/<date>/<time>/; an existing one resumes), then
  eva_jax.training.<module>.train_and_evaluate. `check(config)` may reject a config before anything is
  built (raise SystemExit with the message)."""
  doc = sys._getframe(1).f_globals.get("__doc__")  # pylint: disable=protected-access  (the script's)
  config = config_flag(config_default)
  workdir = workdir_flag("run directory (resumes if it holds checkpoints)")

  def main(argv):
    del argv
    import importlib
    from eva_jax.utils.rundir import make_run_dir
    if check is not None:
      check(config.value)
    trainer = importlib.import_module(f"eva_jax.training.{module}")
    out = workdir.value or make_run_dir("outputs")
    logs.set_log_dir(out)
    print(f"{name}: writing to {out}", flush=True)
    metrics = trainer.train_and_evaluate(config.value, out) or {}
    print(f"{name}: done, " + ", ".join(f"{k}={v:.5g}" for k, v in metrics.items()
                                        if "/" not in k and isinstance(v, (int, float))), flush=True)

  def cli(argv: list[str] | None = None) -> None:
    run(main, argv, doc)
  return cli


def trainer_main(config_default: str, module: str, name: str, check=None) -> None:
  """Kept for scripts written against the old helper: defines the flags and runs."""
  trainer_cli(config_default, module, name, check)()
