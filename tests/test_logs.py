"""eva_jax/utils/logs.py: what reaches the terminal at each verbosity, and one line per error with the
traceback in the run's log file (or a fallback file)."""

from __future__ import annotations

import logging
import pathlib

import pytest

from eva_jax.utils import logs

ROOT = pathlib.Path(logs.__file__).resolve().parents[2]


def _record(pathname: str, level=logging.INFO, msg="hello"):
  return logging.LogRecord("absl", level, pathname, 1, msg, None, None)


@pytest.fixture
def restore():
  yield
  logs.setup(0)
  logs._S.active = False  # pylint: disable=protected-access


def test_terminal_filter_by_verbosity(monkeypatch, restore):
  monkeypatch.setenv(logs.ENV_VERBOSITY, "")
  assert logs.setup() == 0
  keep = logs._TerminalFilter()  # pylint: disable=protected-access
  library = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not keep.filter(_record(library))                                  # orbax INFO: hidden
  assert keep.filter(_record(library, logging.WARNING))                     # warnings always shown
  assert keep.filter(_record(str(ROOT / "eva_jax/training/idm.py")))        # our own stage lines shown
  assert not keep.filter(_record(str(ROOT / "eva_jax/training/idm.py"), logging.DEBUG))
  assert logs._QuietFormatter().format(_record(library, logging.WARNING, "disk slow")) == "warning: disk slow"
  monkeypatch.setenv(logs.ENV_VERBOSITY, "1")
  assert logs.setup() == 1 and keep.filter(_record(library))                # EVA_JAX_VERBOSITY=1: all INFO
  assert logs.setup(0) == 0 and not keep.filter(_record(library))           # the flag wins over the env
  monkeypatch.setenv(logs.ENV_VERBOSITY, "loud")
  with pytest.raises(ValueError, match="EVA_JAX_VERBOSITY must be an integer"):
    logs.setup()


def test_error_is_one_line_with_the_traceback_in_the_run_log(tmp_path, capsys, restore):
  logs.setup(0)
  logs.set_log_dir(tmp_path)
  logging.getLogger("orbax").info("a library line for the file only")

  def main():
    raise ValueError(f"{tmp_path}/episode3.hdf5: frame 2 is not a decodable JPEG\n(details)")
  assert logs.guarded(main, "train_idm") == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == (f"error: {tmp_path}/episode3.hdf5: frame 2 is not a decodable JPEG (details) "
                     f"(traceback: {tmp_path / 'eva_jax.log'})")
  text = (tmp_path / "eva_jax.log").read_text()
  assert "a library line for the file only" in text and "Traceback (most recent call last)" in text


def test_error_before_a_run_dir_goes_to_a_fallback_file(tmp_path, monkeypatch, capsys, restore):
  monkeypatch.setenv(logs.ENV_LOG_DIR, str(tmp_path / "logs"))
  logs.setup(0)
  assert logs.guarded(lambda: 1 / 0, "convert") == 1
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("error: ZeroDivisionError: division by zero (traceback: ") and str(tmp_path) in last
  (log,) = (tmp_path / "logs").iterdir()
  assert log.name.startswith("convert-") and "ZeroDivisionError" in log.read_text()
  assert logs.describe(KeyError("'/joint_action/vector' missing")) == "'/joint_action/vector' missing"
  assert logs.guarded(lambda: (_ for _ in ()).throw(KeyboardInterrupt), "x") == 130


def test_library_use_writes_no_log_files(tmp_path):
  from eva_jax.utils.rundir import make_run_dir
  assert not logs._S.active  # pylint: disable=protected-access
  run = make_run_dir(tmp_path)
  assert logs.log_file() is None and list(run.iterdir()) == []


def test_library_thread_noise_goes_to_the_log_not_the_terminal(tmp_path, capsys, restore):
  """An exception no code can catch (orbax's storage threads calling into an event loop an aborted read has
  closed) reaches Python's unraisable hook: at verbosity 0 it lands in the run's log, so the error line stays
  the terminal's last; at verbosity 1 it goes to the usual hook (the terminal)."""
  import gc

  class Noisy:
    def __del__(self):
      raise RuntimeError("Event loop is closed")

  logs.setup(0)
  logs.set_log_dir(tmp_path)
  Noisy()
  gc.collect()
  assert "Event loop is closed" not in capsys.readouterr().err
  assert "RuntimeError: Event loop is closed" in (tmp_path / "eva_jax.log").read_text()
  seen = []
  logs.setup(1)
  logs._S.prev_unraisable, before = seen.append, logs._S.prev_unraisable  # pylint: disable=protected-access
  try:
    Noisy()
    gc.collect()
  finally:
    logs._S.prev_unraisable = before  # pylint: disable=protected-access
  assert [str(u.exc_value) for u in seen] == ["Event loop is closed"]  # the usual hook prints it
