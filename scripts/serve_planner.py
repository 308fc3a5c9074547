"""HTTP planner service: observation + instruction in, video and executable joint trajectory out.

  python scripts/serve_planner.py --config=configs/planner.py:tiny
  curl -s localhost:8000/health
  curl -s -X POST 'localhost:8000/plan?instruction=raise%20the%20left%20arm' \\
       -H 'Content-Type: image/png' --data-binary @frame.png

See docs/planner.md.
"""

if __package__ in (None, ""):  # run as a file (python scripts/x.py): the checkout's root on sys.path
  import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from scripts._common import config_flag, run  # noqa: E402

_CONFIG = config_flag("configs/planner.py:tiny")


def main(argv):
  del argv
  import uvicorn
  from eva_jax.serving import build_service_app
  app, info = build_service_app(_CONFIG.value)
  print(f"planner ready in {info['startup_s']:.1f} s (models {info['load_s']:.1f} s, compile {info['compile_s']:.1f} s)",
        flush=True)
  uvicorn.run(app, host=_CONFIG.value.server.host, port=int(_CONFIG.value.server.port), log_level="info")


def cli(argv=None):
  run(main, argv)


if __name__ == "__main__":
  cli()
