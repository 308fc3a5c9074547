"""Runs an entry point as N local processes × M CPU devices: the multi-host path on one machine.

  python scripts/launch/local_cpu.py --processes 2 --devices 4 -- \
      scripts/train_sft.py --config=configs/sft.py:tiny --config.train.num_steps=4

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, so the script's
`jax.distributed.initialize()` (scripts/_common.py) forms one 2×4 = 8-device job; cross-process
collectives run over gloo. Output lines are prefixed with the process index. If one process fails, the
others are stopped and the launcher exits with that process's code. The caller's $XLA_FLAGS are passed on
with the device count set to --devices.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def xla_flags_with_devices(flags: str, devices: int) -> str:
  """The caller's XLA flags with the CPU device count set to `devices` (any earlier count replaced)."""
  kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def _pump(proc: subprocess.Popen, index: int):
  for line in proc.stdout:
    sys.stdout.write(f"[{index}] {line}")
    sys.stdout.flush()


def launch(cmd: list[str], processes: int, devices: int, timeout: float | None = None) -> int:
  port = free_port()
  procs = []
  for i in range(processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i),
               XLA_FLAGS=xla_flags_with_devices(os.environ.get("XLA_FLAGS", ""), devices))
    env.pop("EVA_JAX_NO_DISTRIBUTED", None)
    procs.append(subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  pumps = [threading.Thread(target=_pump, args=(p, i), daemon=True) for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  code = 0
  deadline = None if timeout is None else time.monotonic() + timeout
  try:
    # Poll them all: the first to fail stops the others at once (a peer blocked in a collective waiting
    # for the failed one would otherwise hang until the timeout).
    while code == 0 and any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.poll() not in (None, 0)]
      if failed:
        code = failed[0]
        break
      if deadline is not None and time.monotonic() > deadline:
        code = 124
        break
      time.sleep(0.2)
    if code == 0:
      code = next((p.returncode for p in procs if p.returncode), 0)
    for other in procs:
      if other.poll() is None:
        other.terminate()
    for other in procs:
      try:
        other.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for t in pumps:
      t.join(timeout=5)
  return code


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
  parser.add_argument("--timeout", type=float, default=None)
  parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- script.py [args]")
  args = parser.parse_args()
  cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
  if not cmd:
    parser.error("give the entry point after --")
  return launch(cmd, args.processes, args.devices, args.timeout)


if __name__ == "__main__":
  sys.exit(main())
