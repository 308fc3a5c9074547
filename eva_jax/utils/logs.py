"""What the entry points print: a quiet terminal, the full record in a log file, one line per error.

  logs.setup(verbosity)            # once, when the command line is parsed (scripts/_common.py does it)
  logs.set_log_dir(run_dir)        # when the run directory is known: <run_dir>/eva_jax.log from then on
  code = logs.guarded(main, prog)  # runs main; an exception -> traceback to the log, one line on stderr

Verbosity (`--verbosity=N` or EVA_JAX_VERBOSITY=N; the flag wins):
  0 (default)  the terminal shows warnings and errors from everything, INFO lines from eva_jax, its
               scripts, configs and converters only (stages, output folders), progress bars, summaries;
               the INFO chatter of absl, orbax, jax and tfds (thousands of lines per checkpoint-heavy
               run) is kept out of the terminal, but still goes to the log file.
  1            library INFO lines on the terminal too, in absl's format.
  2            DEBUG as well.

An error prints `error: <what went wrong> (traceback: <log file>)` as the last line on stderr and the
process exits with status 1 (2 for a bad config value, eva_jax/utils/checks.py). The traceback goes to the run's log file, or, before a run directory
exists, to a fresh file under $EVA_JAX_LOG_DIR (default ~/.cache/eva_jax/logs).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pathlib
import sys
import tempfile
import traceback
from typing import Callable

ENV_VERBOSITY = "EVA_JAX_VERBOSITY"
ENV_LOG_DIR = "EVA_JAX_LOG_DIR"
LOG_NAME = "eva_jax.log"

_ROOT = pathlib.Path(__file__).resolve().parents[2]
# INFO records whose source file lies under one of these stay on the terminal at verbosity 0.
_OWN = tuple(str(_ROOT / d) + os.sep for d in ("eva_jax", "scripts", "configs", "convert"))


class _State:
  verbosity: int = 0
  active: bool = False               # setup() was called: an entry point owns the process
  file_handler: logging.Handler | None = None
  terminal_filter: logging.Filter | None = None
  saved_formatter: logging.Formatter | None = None
  prog: str = "eva_jax"
  late_log: pathlib.Path | None = None  # where library noise after the run's end goes (the last log file)
  prev_unraisable: Callable | None = None


_S = _State()


def env_verbosity(default: int = 0) -> int:
  value = os.environ.get(ENV_VERBOSITY, "")
  try:
    return int(value) if value.strip() else default
  except ValueError:
    raise ValueError(f"{ENV_VERBOSITY} must be an integer (0, 1 or 2), found {value!r}") from None


def verbosity() -> int:
  return _S.verbosity


# MARK: terminal


class _TerminalFilter(logging.Filter):
  """At verbosity 0: warnings and up from everyone, INFO only from this project's own files."""

  def filter(self, record: logging.LogRecord) -> bool:
    if _S.verbosity >= 1 or record.levelno >= logging.WARNING:
      return True
    return record.levelno >= logging.INFO and record.pathname.startswith(_OWN)


class _QuietFormatter(logging.Formatter):
  """Plain messages (INFO) and `warning: ...` lines instead of absl's `I1203 09:48:46.379 ... idm.py:357]`."""

  def format(self, record: logging.LogRecord) -> str:
    msg = record.getMessage()
    if record.exc_info:
      msg += "\n" + self.formatException(record.exc_info)
    return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


@contextlib.contextmanager
def without_library_warning(prefix: str, logger: str = "absl"):
  """Drops a library's log records that start with `prefix` inside the block: for a warning known to be
  harmless at that one call (orbax's missing-metadata note when a tree is read from a checkpoint's item
  folder), not to hide warnings in general."""
  class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
      return not str(record.msg).startswith(prefix)

  drop, target = _Drop(), logging.getLogger(logger)
  target.addFilter(drop)
  try:
    yield
  finally:
    target.removeFilter(drop)


def _terminal_handler() -> logging.Handler:
  from absl import logging as absl_logging
  return absl_logging.get_absl_handler()


def _quiet_tfds_progress() -> None:
  """tfds draws a bar per split and shuffle when it prepares a dataset: off at verbosity 0."""

  class _Hook:  # a meta-path finder that only watches for tfds' tqdm module, so tfds is not imported here
    name = "tensorflow_datasets.core.utils.tqdm_utils"

    def find_spec(self, fullname, path=None, target=None):
      if fullname != self.name:
        return None
      import importlib.machinery
      spec = importlib.machinery.PathFinder.find_spec(fullname, path)
      if spec is None or spec.loader is None:
        return None
      exec_module = spec.loader.exec_module

      def exec_and_silence(module):
        exec_module(module)
        module.display_progress_bar(False)

      spec.loader.exec_module = exec_and_silence
      return spec

  mod = sys.modules.get(_Hook.name)
  if mod is not None:
    mod.display_progress_bar(False)
  elif not any(type(f).__name__ == "_Hook" for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())


def setup(level: int | None = None) -> int:
  """Sets the terminal's verbosity (None: EVA_JAX_VERBOSITY, default 0); returns it."""
  from absl import logging as absl_logging
  _S.verbosity = env_verbosity() if level is None else int(level)
  _S.active = True
  absl_logging.use_absl_handler()
  # The logger levels decide what reaches any handler (the log file wants INFO); the filter decides
  # what the terminal shows.
  absl_logging.set_verbosity(absl_logging.DEBUG if _S.verbosity >= 2 else absl_logging.INFO)
  handler = _terminal_handler()
  if _S.terminal_filter is None:
    _S.terminal_filter = _TerminalFilter()
    handler.addFilter(_S.terminal_filter)
  if _S.verbosity == 0:
    if _S.saved_formatter is None:
      _S.saved_formatter = handler.formatter or absl_logging.PythonFormatter()
    handler.setFormatter(_QuietFormatter())
    _quiet_tfds_progress()
  elif _S.saved_formatter is not None:
    handler.setFormatter(_S.saved_formatter)
  if sys.unraisablehook is not _unraisable:
    _S.prev_unraisable, sys.unraisablehook = sys.unraisablehook, _unraisable
  return _S.verbosity


def _unraisable(args) -> None:
  """Exceptions no code can catch, raised in library threads: after orbax abandons a read (a damaged
  checkpoint, a resume that does not fit), tensorstore's callbacks hit its closed event loop and Python
  prints dozens of 'RuntimeError: Event loop is closed' tracebacks, before and after our error line. At
  verbosity 0 they go to the log file; the terminal keeps one line per error."""
  if _S.verbosity >= 1:
    (_S.prev_unraisable or sys.__unraisablehook__)(args)
    return
  try:
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    with open(_late_log(), "a", encoding="utf-8") as f:
      f.write(f"\n{args.err_msg or 'Exception ignored'}: {getattr(args, 'object', None)!r}\n{text}")
  except Exception:  # noqa: BLE001  nothing may escape an unraisable hook
    pass


# MARK: log file


def _process_suffix() -> str:
  jax = sys.modules.get("jax")
  try:
    index = jax.process_index() if jax is not None else 0
  except Exception:  # a backend that fails to start must not hide the error being reported
    index = 0
  return "" if index == 0 else f".p{index}"


def set_log_dir(run_dir: str | os.PathLike | None) -> pathlib.Path | None:
  """Log INFO and up (and, on an error, its traceback) to `<run_dir>/eva_jax.log`; None stops it.

  Does nothing unless an entry point called setup(), so library users and tests get no handlers.
  """
  if not _S.active:
    return None
  root = logging.getLogger()
  if _S.file_handler is not None:
    root.removeHandler(_S.file_handler)
    _S.file_handler.close()
    _S.file_handler = None
  if run_dir is None:
    return None
  path = pathlib.Path(run_dir) / f"eva_jax{_process_suffix()}.log"
  path.parent.mkdir(parents=True, exist_ok=True)
  handler = logging.FileHandler(path, encoding="utf-8")
  from absl import logging as absl_logging
  handler.setFormatter(absl_logging.PythonFormatter())
  root.addHandler(handler)
  _S.file_handler = handler
  return path


def log_file() -> pathlib.Path | None:
  return pathlib.Path(_S.file_handler.baseFilename) if _S.file_handler is not None else None


def _late_log() -> pathlib.Path:
  """The run's log file, else the last one this process wrote, else a fresh fallback file."""
  path = log_file() or _S.late_log
  if path is None:
    path = _S.late_log = _fallback_file(_S.prog)
  return path


def _fallback_file(prog: str) -> pathlib.Path:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  name = f"{pathlib.Path(prog).stem or 'eva_jax'}-{stamp}-{os.getpid()}.log"
  for folder in (os.environ.get(ENV_LOG_DIR), pathlib.Path.home() / ".cache" / "eva_jax" / "logs",
                 pathlib.Path(tempfile.gettempdir()) / "eva_jax_logs"):
    if not folder:
      continue
    try:
      pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
      path = pathlib.Path(folder) / name
      path.touch()
      return path
    except OSError:
      continue
  return pathlib.Path(os.devnull)


# MARK: errors


# Messages of these types read on their own ("<file>: frame 3 is not a decodable JPEG"); others get
# their type name in front ("ZeroDivisionError: division by zero").
_PLAIN = (ValueError, LookupError, OSError)


def describe(exc: BaseException) -> str:
  """One line saying what went wrong: the exception's message, newlines folded, notes left out."""
  if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
    msg = exc.args[0]  # str(KeyError) adds quotes
  else:
    msg = str(exc)
  msg = " ".join(msg.split())
  if len(msg) > 600:
    msg = msg[:600] + " ..."
  if not msg:
    return type(exc).__name__
  return msg if isinstance(exc, _PLAIN) else f"{type(exc).__name__}: {msg}"


def report(exc: BaseException, prog: str = "eva_jax") -> pathlib.Path:
  """Writes the traceback to the log file (the run's or a fallback) and one line to stderr; returns the file."""
  text = "".join(traceback.format_exception(exc))
  path = log_file()
  if path is not None:
    _S.file_handler.flush()
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"\n{datetime.datetime.now().isoformat()} error in {prog}:\n{text}")
  else:
    path = _S.late_log or _fallback_file(prog)
    if str(path) != os.devnull:
      with open(path, "a", encoding="utf-8") as f:
        f.write(f"{' '.join(sys.argv)}\n\n{text}")
  _S.late_log = path
  sys.stderr.flush()
  sys.stdout.flush()
  sys.stderr.write(f"\nerror: {describe(exc)} (traceback: {path})\n")
  sys.stderr.flush()
  return path


def _close_progress_bars() -> None:
  """Closes the bars an error left open, so their last redraw comes before the error line, not after it
  (the error must be the last line on the terminal)."""
  std = sys.modules.get("tqdm.std")
  for bar in list(getattr(getattr(std, "tqdm", None), "_instances", None) or []):
    try:
      bar.close()
    except Exception:  # noqa: BLE001  a broken bar must not hide the error being reported
      pass


def guarded(main: Callable[[], object], prog: str = "eva_jax") -> int:
  """Runs `main()`; returns its int result (0 for None). An exception is reported (one line) -> 1 (2 for
  a ConfigError: a config field the code cannot run with);
  Ctrl-C -> 130. SystemExit passes through (the entry points' own usage errors)."""
  _S.prog, _S.late_log = prog, None
  try:
    result = main()
  except KeyboardInterrupt:
    _close_progress_bars()
    sys.stderr.write("\ninterrupted\n")
    return 130
  except Exception as exc:  # every error: one line on the terminal, the traceback in the file
    _close_progress_bars()
    report(exc, prog)
    from eva_jax.utils.checks import ConfigError
    return 2 if isinstance(exc, ConfigError) else 1  # a bad config value is a usage error, like a bad flag
  finally:
    _S.late_log = log_file() or _S.late_log  # library noise after the end (at exit) goes there too
    set_log_dir(None)
    _S.active = False  # the entry point is done: later library calls in this process log nowhere new
  return result if isinstance(result, int) else 0
