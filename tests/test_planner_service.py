"""The planner service on loopback, driven by a real HTTP client, with tiny random models."""

import base64
import concurrent.futures
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from configs.planner import get_config
from eva_jax import planner as planner_lib
from eva_jax import serving
from eva_jax.data import video as video_io


def _png(h=48, w=64, seed=0) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class _Server:
  def __init__(self, app):
    import uvicorn
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 30
    while not self.server.started:
      assert time.time() < deadline, "server did not start"
      time.sleep(0.05)
    self.url = f"http://127.0.0.1:{self.port}"

  def close(self):
    self.server.should_exit = True
    self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  config = get_config("tiny")
  app, info = serving.build_service_app(config, tmp_path_factory.mktemp("planner"))
  srv = _Server(app)
  srv.info = info
  yield srv
  srv.close()


def _plan(server, instruction="raise the left arm", **params):
  return httpx.post(f"{server.url}/plan", params={"instruction": instruction, **params}, content=_png(),
                    headers={"Content-Type": "image/png"}, timeout=120)


def test_valid_request_returns_trajectory_and_playable_mp4(server, tmp_path):
  r = _plan(server)
  assert r.status_code == 200, r.text
  body = r.json()
  actions = np.asarray(body["actions"])
  assert actions.shape == (9, 14) and np.isfinite(actions).all()
  assert body["num_frames"] == 9
  assert set(body["terms"]) >= {"jerk", "acc", "vlim", "alim", "total"}
  assert 0 < body["reward"] <= 10
  mp4 = httpx.get(server.url + body["video_url"], timeout=30)
  assert mp4.status_code == 200
  (tmp_path / "v.mp4").write_bytes(mp4.content)
  frames, fps = video_io.read_video(tmp_path / "v.mp4")
  assert frames.shape == (9, 32, 48, 3) and fps == pytest.approx(16)


def test_json_base64_request(server):
  r = httpx.post(f"{server.url}/plan", timeout=120, json={
      "image": base64.b64encode(_png(seed=1)).decode(), "instruction": "wave the right arm", "seed": 3,
      "video": "base64"})
  assert r.status_code == 200, r.text
  assert base64.b64decode(r.json()["video_mp4_base64"])[4:8] == b"ftyp"


def test_same_seed_same_plan(server):
  a, b = _plan(server, seed=7).json(), _plan(server, seed=7).json()
  np.testing.assert_allclose(a["actions"], b["actions"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,status", [
    ("undecodable", 400), ("aspect", 422), ("empty_instruction", 422), ("too_many_segments", 422),
    ("steps_out_of_range", 422), ("guidance_out_of_range", 422), ("unknown_field", 422), ("content_type", 415),
    ("bad_base64", 400)])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, case, status):
  url, hdr = f"{server.url}/plan", {"Content-Type": "image/png"}
  if case == "undecodable":
    r = httpx.post(url, params={"instruction": "x"}, content=b"not an image", headers=hdr)
  elif case == "aspect":
    r = httpx.post(url, params={"instruction": "x"}, content=_png(16, 320), headers=hdr)
  elif case == "empty_instruction":
    r = httpx.post(url, params={"instruction": "  "}, content=_png(), headers=hdr)
  elif case == "too_many_segments":
    r = httpx.post(url, params={"instruction": " <sep> ".join(["a"] * 5)}, content=_png(), headers=hdr)
  elif case == "steps_out_of_range":
    r = httpx.post(url, params={"instruction": "x", "steps": 1000}, content=_png(), headers=hdr)
  elif case == "guidance_out_of_range":
    r = httpx.post(url, params={"instruction": "x", "hist_guidance": -1}, content=_png(), headers=hdr)
  elif case == "unknown_field":
    r = httpx.post(url, params={"instruction": "x", "stepz": 3}, content=_png(), headers=hdr)
  elif case == "content_type":
    r = httpx.post(url, content=b"x", headers={"Content-Type": "text/plain"})
  else:
    r = httpx.post(url, json={"image": "%%%not base64", "instruction": "x"})
  assert r.status_code == status, r.text
  assert "error" in r.json() and r.json()["error"]
  assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_concurrent_load_every_request_answered_once(server):
  before = httpx.get(f"{server.url}/health").json().get("served", 0)
  def client(k):
    out = []
    with httpx.Client(timeout=300) as c:
      for j in range(4):
        r = c.post(f"{server.url}/plan", params={"instruction": "reach forward", "seed": 4 * k + j},
                   content=_png(seed=k), headers={"Content-Type": "image/png"})
        out.append(r.status_code)
    return out
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    codes = [c for cs in pool.map(client, range(4)) for c in cs]
  assert codes == [200] * 16
  health = httpx.get(f"{server.url}/health").json()
  assert health["served"] - before == 16
  assert health["queued"] == 0


def test_long_horizon_segments_concatenate(server):
  r = _plan(server, instruction="raise the left arm <sep> wave the right arm <sep> lower both arms", video="none")
  assert r.status_code == 200, r.text
  body = r.json()
  frames = [s["frames"] for s in body["segments"]]
  assert frames == [9, 8, 8]
  assert body["num_frames"] == sum(frames) == len(body["actions"]) == 25


# MARK: queueing and failure isolation with injected model functions (no compiled models needed)

def _fake_planner(gate=None, fail_on="boom"):
  def generate(frames, prompts, options):
    if gate is not None:
      gate.wait(timeout=30)
    if any(fail_on in p for p in prompts):
      raise RuntimeError("model exploded")
    return np.repeat(frames[:, None], 5, axis=1)
  actions = lambda videos: np.zeros(videos.shape[:2] + (14,), np.float32)
  return planner_lib.Planner(generate, actions)


def test_overload_returns_503(tmp_path):
  from fastapi.testclient import TestClient
  gate = threading.Event()
  limits = serving.ServiceLimits(height=32, width=48, batch_size=1, max_queue=2)
  service = serving.PlanService(_fake_planner(gate), limits, tmp_path)
  image = np.zeros((32, 48, 3), np.uint8)
  futures = [service.submit(image, "a", planner_lib.PlanOptions())]
  deadline = time.time() + 10
  while service.queued():  # the worker has taken the first request and blocks on the gate
    assert time.time() < deadline
    time.sleep(0.01)
  futures += [service.submit(image, "a", planner_lib.PlanOptions()) for _ in range(2)]  # fills the queue
  with pytest.raises(serving.RequestError) as e:
    service.submit(image, "a", planner_lib.PlanOptions())
  assert e.value.status == 503
  with TestClient(serving.create_app(service)) as client:
    r = client.post("/plan", params={"instruction": "a"}, content=_png(32, 48), headers={"Content-Type": "image/png"})
    assert r.status_code == 503 and "busy" in r.json()["error"]
  gate.set()
  assert all(f.result(timeout=30) is not None for f in futures)
  service.close()


def test_one_failing_request_does_not_fail_its_batch(tmp_path):
  limits = serving.ServiceLimits(height=32, width=48, batch_size=4, batch_wait_s=0.5)
  service = serving.PlanService(_fake_planner(), limits, tmp_path)
  image = np.zeros((32, 48, 3), np.uint8)
  futs = [service.submit(image, p, planner_lib.PlanOptions()) for p in ("ok 1", "boom", "ok 2")]
  assert futs[0].result(timeout=30).actions.shape == (5, 14)
  assert futs[2].result(timeout=30).actions.shape == (5, 14)
  with pytest.raises(RuntimeError, match="exploded"):
    futs[1].result(timeout=30)
  assert service.stats["failed"] == 1
  service.close()
