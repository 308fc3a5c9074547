"""The built-in end-to-end EVA demo on the procedural toy world (`make demo`).

  python scripts/demo.py                                    # writes outputs/<date>/<time>/
  python scripts/demo.py --config.short=True                # the shortened run the tests use
  python scripts/demo.py --config.seed=1 --workdir=outputs/my_demo

Stages and sizes: configs/demo.py; the work is done by eva_jax.demo.run_demo.
"""

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from scripts._common import config_flag, run  # noqa: E402
from absl import flags

from eva_jax.demo import pin_cpu_cores, run_demo
from eva_jax.utils import logs
from eva_jax.utils.rundir import make_run_dir

_CONFIG = config_flag("configs/demo.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (default: a new outputs/<date>/<time>/)")


def main(argv):
  del argv
  config = _CONFIG.value
  pin_cpu_cores(config.cpu_cores)  # before the first jax computation starts the CPU backend
  workdir = _WORKDIR.value or make_run_dir("outputs")
  logs.set_log_dir(workdir)
  summary = run_demo(config, workdir)
  print(f"demo: report in {summary['workdir']}/summary.md")


def cli(argv=None):
  run(main, argv)


if __name__ == "__main__":
  cli()
