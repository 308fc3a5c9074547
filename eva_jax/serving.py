"""HTTP planner service (FastAPI): `POST /plan`, `GET /health`, `GET /videos/<id>.mp4`.

Requests are validated in the HTTP handler (bad input → 4xx with a message), queued in a bounded
queue (full → 503, never unbounded waiting), and a single worker thread groups queued requests with
equal sampling options into batches of up to `batch_size` for one `Planner.plan_batch` call. If a
batch fails, its requests are retried one by one so one bad request cannot fail the others, and no
exception escapes the worker: the server keeps serving.
"""


import asyncio
import base64
import binascii
import collections
import concurrent.futures
import dataclasses
import io
import pathlib
import queue
import threading
import time
import uuid

import numpy as np
from absl import logging

from eva_jax import planner as planner_lib
from eva_jax.data import video as video_io
from eva_jax.utils import checks


class RequestError(ValueError):
  """A client error: becomes a 4xx response with this message."""

  def __init__(self, message: str, status: int = 422):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
  height: int
  width: int
  fps: float = 16.0
  batch_size: int = 4
  max_queue: int = 32
  max_segments: int = 4
  max_steps: int = 100
  max_guidance: float = 20.0
  max_aspect_change: float = 2.0
  resize: str = "stretch"            # eva_jax.data.images.fit_image mode (EVA's stretch)
  max_image_bytes: int = 20 * 2**20
  batch_wait_s: float = 0.05         # how long the worker waits to fill a batch


@dataclasses.dataclass
class _Job:
  image: np.ndarray
  instruction: str
  options: planner_lib.PlanOptions
  future: concurrent.futures.Future


def decode_image(data: bytes, limits: ServiceLimits) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 [H, W, 3] resized/cropped to the model size, or a RequestError."""
  from PIL import Image, UnidentifiedImageError

  if not data:
    raise RequestError("image is empty", 400)
  if len(data) > limits.max_image_bytes:
    raise RequestError(f"image is {len(data)} bytes; at most {limits.max_image_bytes} are accepted", 413)
  try:
    with Image.open(io.BytesIO(data)) as im:
      image = np.asarray(im.convert("RGB"))
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise RequestError(f"image could not be decoded as PNG/JPEG: {e}", 400) from e
  try:
    return planner_lib.resize_observation(image, limits.height, limits.width, mode=limits.resize,
                                          max_aspect_change=limits.max_aspect_change)
  except ValueError as e:
    raise RequestError(str(e), 422) from e


def parse_options(params: dict, limits: ServiceLimits, defaults: planner_lib.PlanOptions) -> planner_lib.PlanOptions:
  """Optional steps / hist_guidance / lang_guidance / seed, range-checked."""
  unknown = set(params) - {"steps", "hist_guidance", "lang_guidance", "seed"}
  if unknown:
    raise RequestError(f"unknown request fields {sorted(unknown)}", 422)
  try:
    steps = int(params.get("steps", defaults.steps))
    hist = float(params.get("hist_guidance", defaults.hist_guidance))
    lang = float(params.get("lang_guidance", defaults.lang_guidance))
    seed = int(params.get("seed", defaults.seed))
  except (TypeError, ValueError) as e:
    raise RequestError(f"bad numeric parameter: {e}", 422) from e
  if not 1 <= steps <= limits.max_steps:
    raise RequestError(f"steps must be in [1, {limits.max_steps}], got {steps}", 422)
  for name, value in (("hist_guidance", hist), ("lang_guidance", lang)):
    if not 0.0 <= value <= limits.max_guidance or not np.isfinite(value):
      raise RequestError(f"{name} must be in [0, {limits.max_guidance}], got {value}", 422)
  if not 0 <= seed < 2**31:
    raise RequestError(f"seed must be in [0, 2^31), got {seed}", 422)
  return planner_lib.PlanOptions(steps=steps, hist_guidance=hist, lang_guidance=lang, seed=seed)


class PlanService:
  """The queue and the batching worker around a Planner."""

  def __init__(self, planner: planner_lib.Planner, limits: ServiceLimits, video_dir: str | pathlib.Path):
    self.planner, self.limits = planner, limits
    self.video_dir = pathlib.Path(video_dir)
    self.video_dir.mkdir(parents=True, exist_ok=True)
    self._queue: queue.Queue[_Job] = queue.Queue(maxsize=limits.max_queue)
    self._held: collections.deque[_Job] = collections.deque()  # taken from the queue, other options
    self._stop = threading.Event()
    self.stats = collections.Counter()
    self._worker = threading.Thread(target=self._run, name="planner-worker", daemon=True)
    self._worker.start()

  def submit(self, image, instruction, options) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    try:
      self._queue.put_nowait(_Job(image, instruction, options, fut))
    except queue.Full:
      self.stats["rejected_busy"] += 1
      raise RequestError(f"planner is busy ({self.limits.max_queue} requests queued); retry later", 503)
    return fut

  def queued(self) -> int:
    return self._queue.qsize() + len(self._held)

  def close(self):
    self._stop.set()
    self._worker.join(timeout=5)

  # MARK: worker
  def _next_batch(self) -> list[_Job]:
    first = self._held.popleft() if self._held else self._queue.get(timeout=0.1)
    batch, deadline = [first], time.monotonic() + self.limits.batch_wait_s
    for job in list(self._held):  # held jobs with the same options go first
      if len(batch) < self.limits.batch_size and job.options == first.options:
        self._held.remove(job)
        batch.append(job)
    while len(batch) < self.limits.batch_size:
      try:
        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      (batch if job.options == first.options else self._held).append(job)
    return batch

  def _run(self):
    while not self._stop.is_set():
      try:
        batch = self._next_batch()
      except queue.Empty:
        continue
      try:
        self._finish(batch, self.planner.plan_batch([j.image for j in batch], [j.instruction for j in batch],
                                                    batch[0].options))
      except Exception:  # isolate the failing request(s)
        logging.exception("batch of %d failed; retrying one by one", len(batch))
        for job in batch:
          try:
            self._finish([job], self.planner.plan_batch([job.image], [job.instruction], job.options))
          except Exception as e:  # noqa: BLE001 - reported to that client only
            self.stats["failed"] += 1
            job.future.set_exception(e)

  def _finish(self, jobs: list[_Job], plans: list[planner_lib.Plan]):
    self.stats["batches"] += 1
    for job, plan in zip(jobs, plans):
      self.stats["served"] += 1
      job.future.set_result(plan)

  def save_video(self, plan: planner_lib.Plan) -> str:
    vid = uuid.uuid4().hex
    video_io.write_video(self.video_dir / f"{vid}.mp4", plan.video, fps=self.limits.fps)
    return vid


def plan_to_json(plan: planner_lib.Plan, video_ref: dict) -> dict:
  return {"actions": plan.actions.tolist(), "num_frames": int(len(plan.actions)), "reward": plan.reward,
          "terms": plan.terms, "segments": plan.segments, **video_ref}


def create_app(service: PlanService, *, defaults: planner_lib.PlanOptions = planner_lib.PlanOptions(),
               startup_info: dict | None = None):
  """The FastAPI app. Image as JSON base64 (`{"image": ..., "instruction": ...}`) or as raw PNG/JPEG bytes
  (`Content-Type: image/png`, other fields as query parameters)."""
  from fastapi import FastAPI, Request
  from fastapi.responses import FileResponse, JSONResponse

  app = FastAPI(title="eva_jax planner")
  limits = service.limits

  def error(status: int, message: str):
    return JSONResponse(status_code=status, content={"error": message})

  @app.get("/health")
  async def health():
    return {"status": "ok", "queued": service.queued(), "batch_size": limits.batch_size,
            "size": [limits.height, limits.width], **dict(service.stats), **(startup_info or {})}

  @app.post("/plan")
  async def plan(request: Request):  # noqa: D401 (FastAPI needs the real Request class here)
    try:
      ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
      if ctype.startswith("image/") or ctype == "application/octet-stream":
        params = dict(request.query_params)
        data = await request.body()
      elif ctype == "application/json":
        try:
          params = await request.json()
        except ValueError as e:
          raise RequestError(f"body is not valid JSON: {e}", 400) from e
        if not isinstance(params, dict):
          raise RequestError("JSON body must be an object", 400)
        params = dict(params)
        b64 = params.pop("image", None)
        if not isinstance(b64, str):
          raise RequestError("field 'image' (base64 PNG/JPEG) is required", 422)
        try:
          data = base64.b64decode(b64.split(",")[-1], validate=True)
        except (binascii.Error, ValueError) as e:
          raise RequestError(f"field 'image' is not valid base64: {e}", 400) from e
      else:
        raise RequestError(f"unsupported content type {ctype!r}; send application/json or image/*", 415)
      instruction = params.pop("instruction", None)
      video_mode = params.pop("video", "url")
      if video_mode not in ("url", "base64", "none"):
        raise RequestError("field 'video' must be 'url', 'base64' or 'none'", 422)
      if not isinstance(instruction, str) or not instruction.strip():
        raise RequestError("field 'instruction' is required and must not be empty", 422)
      try:
        planner_lib.split_instruction(instruction, limits.max_segments)
      except ValueError as e:
        raise RequestError(str(e), 422) from e
      options = parse_options(params, limits, defaults)
      image = decode_image(data, limits)
      fut = service.submit(image, instruction, options)
    except RequestError as e:
      return error(e.status, str(e))
    try:
      result = await asyncio.wrap_future(fut)
    except Exception as e:  # noqa: BLE001 - the model failed on this request; the server goes on
      return error(500, f"planning failed: {type(e).__name__}: {e}")
    if video_mode == "none":
      ref = {}
    else:
      vid = await asyncio.to_thread(service.save_video, result)
      path = service.video_dir / f"{vid}.mp4"
      ref = ({"video_url": f"/videos/{vid}.mp4"} if video_mode == "url"
             else {"video_mp4_base64": base64.b64encode(path.read_bytes()).decode()})
    return plan_to_json(result, ref)

  @app.get("/videos/{name}")
  async def get_video(name: str):
    path = service.video_dir / name
    if not name.endswith(".mp4") or "/" in name or not path.exists():
      return error(404, f"no video {name!r}")
    return FileResponse(path, media_type="video/mp4")

  return app


SERVER_RULES = {  # configs/planner.py's `server` (checked with eva_jax.inference.check_config's fields)
    "server.port": checks.integer(0, 65535),
    "server.batch_size": checks.integer(1),
    "server.max_queue": checks.integer(1),
    "server.max_segments": checks.integer(1),
    "server.max_steps": checks.integer(1),
    "server.max_guidance": checks.number(0),
    "server.max_aspect_change": checks.number(1),
    "server.batch_wait_s": checks.number(0),
}


def build_service_app(config, workdir=None):
  """Loads the models, compiles with a warm-up plan, and returns (app, startup_info)."""
  from eva_jax import inference
  from eva_jax.utils.rundir import make_run_dir

  inference.check_config(config, SERVER_RULES)  # before the run directory exists

  t0 = time.perf_counter()
  run_dir = pathlib.Path(workdir) if workdir else make_run_dir(config.output_root)
  planner = planner_lib.build_planner(config, run_dir)
  t_load = time.perf_counter() - t0
  srv, s = config.server, config.sampler
  limits = ServiceLimits(height=s.height, width=s.width, fps=float(config.fps), batch_size=srv.batch_size,
                         max_queue=srv.max_queue, max_segments=srv.max_segments, max_steps=srv.max_steps,
                         max_guidance=srv.max_guidance, max_aspect_change=srv.max_aspect_change,
                         resize=srv.get("resize", "stretch"), batch_wait_s=srv.batch_wait_s)
  defaults = planner_lib.PlanOptions(steps=s.num_steps, hist_guidance=s.hist_guidance, lang_guidance=s.lang_guidance)
  t1 = time.perf_counter()
  if srv.warmup:
    planner.plan(np.zeros((s.height, s.width, 3), np.uint8), "warm up", defaults)
  t_compile = time.perf_counter() - t1
  info = {"startup_s": time.perf_counter() - t0, "load_s": t_load, "compile_s": t_compile}
  service = PlanService(planner, limits, run_dir / "videos")
  return create_app(service, defaults=defaults, startup_info=info), info
