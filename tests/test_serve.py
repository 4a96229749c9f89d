"""infer.py serve: a real HTTP client against the server on a free port; the answers agree with
Policy.infer, and bad requests get 4xx replies that name the problem."""
import base64
import json
import re
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

import env as world
import eval as E
from infer import Policy, PolicyServer, array_to_json

INSTRUCTION = "push the red block to the left edge"


@pytest.fixture
def server(run):
    srv = PolicyServer(Policy.from_checkpoint(run), "127.0.0.1", 0, max_body=200_000, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def call(url, path, body=None, headers=None):
    """(status, JSON reply); body: an object to send as JSON, or raw bytes; None makes a GET."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def obs():
    envs = world.TabletopEnv([world.make_task("push", "seen", 5)], world.WorldConfig(image_size=32))
    return E.observation(envs.observe(), 0)


def as_json(obs, frames="base64"):
    out = {k: v.tolist() for k, v in obs.items()}
    if frames == "base64":
        out["frames"] = array_to_json(obs["frames"])
    return out


def test_a_valid_request_agrees_with_policy_infer(server, run, obs):
    _, url = server
    status, health = call(url, "/health")
    assert status == 200 and health["views"] == 2 and (health["stage"], health["unified_stage"]) == (4, 5)
    assert health["instruction"] == ""
    assert call(url, "/reset", {"instruction": INSTRUCTION}) == (200, {"ok": True})
    req = {"obs": as_json(obs), "caption": "reach the red block", "length": 6, "seed": 3, "return_frames": True}
    status, out = call(url, "/infer", req)
    assert status == 200 and out["length"] == 6 and out["caption"] == "reach the red block" and out["ms"] > 0
    action = np.array(out["action"], np.float32)
    frames = np.frombuffer(base64.b64decode(out["frames"]["base64"]), np.uint8).reshape(out["frames"]["shape"])
    assert action.shape == (6, 4) and frames.shape == (2, 2, 16, 16, 3)
    direct = Policy.from_checkpoint(run)                 # a second copy, called in process
    direct.reset(INSTRUCTION)
    ref = direct.infer(obs, caption="reach the red block", length=6, seed=3, return_frames=True)
    assert np.array_equal(action, ref["action"]) and np.array_equal(frames, ref["frames"])
    status, lists = call(url, "/infer", dict(req, obs=as_json(obs, frames="lists"), return_frames=False))
    assert status == 200 and np.array_equal(np.array(lists["action"], np.float32), action) and "frames" not in lists
    status, err = call(url, "/infer", {"obs": as_json(obs), "mode": "unified"})     # one mode per episode
    assert status == 400 and "this episode runs in event mode" in err["error"]
    assert call(url, "/reset", {"instruction": INSTRUCTION}) == (200, {"ok": True})
    status, chunk = call(url, "/infer", {"obs": as_json(obs), "mode": "unified", "source": "instruction", "seed": 0})
    assert status == 200 and np.array(chunk["action"]).shape == (16, 4) and chunk["caption"] == INSTRUCTION
    for n in range(1, 16):                               # the steps of that chunk, then the next one
        status, seen = call(url, "/observe", {"obs": as_json(obs)})
        assert status == 200 and seen["observed"] == n
    status, chunk = call(url, "/infer", {"obs": as_json(obs), "mode": "unified", "source": "instruction", "seed": 0})
    assert status == 200 and np.array(chunk["action"]).shape == (16, 4)
    status, err = call(url, "/infer", {"obs": as_json(obs), "mode": "unified", "source": "instruction"})
    assert status == 400 and "expected observe(obs) after each" in err["error"]


def bad_frames(obs, change):
    out = as_json(obs)
    out["frames"] = change(obs["frames"])
    return out


@pytest.mark.parametrize("path, body, code, message", [
    ("/infer", b'{"obs": ', 400, "request body: not valid JSON"),
    ("/observe", lambda o: {"obs": as_json(o), "mode": "unified"}, 400, r"unknown fields \['mode'\]"),
    ("/infer", [1, 2], 400, "request body: expected a JSON object, found list"),
    ("/infer", {"obs": None}, 400, "obs: expected a JSON object"),
    ("/infer", lambda o: {"obs": as_json(o), "lenght": 5}, 400, r"unknown fields \['lenght'\]"),
    ("/infer", lambda o: {"obs": as_json(o), "length": 0}, 400, "length: expected an integer in 1..32"),
    ("/infer", lambda o: {"obs": as_json(o), "length": True}, 400, "length: expected an integer"),
    ("/infer", lambda o: {"obs": as_json(o), "mode": "chunky"}, 400, "mode: expected 'event' or 'unified'"),
    ("/infer", lambda o: {"obs": as_json(o), "source": "vibes"}, 400, "source: expected"),
    ("/infer", lambda o: {"obs": as_json(o), "mode": "unified", "source": "atomic"}, 400, "source 'atomic' needs captions"),
    ("/infer", lambda o: {"obs": as_json(o), "return_frames": "yes"}, 400, "return_frames: expected true or false"),
    ("/infer", lambda o: {"obs": bad_frames(o, lambda f: array_to_json(f[:1]))}, 400, r"obs\['frames'\]: expected shape"),
    ("/infer", lambda o: {"obs": bad_frames(o, lambda f: {"shape": [2, 32, 32, 3], "base64": "AAAA"})}, 400,
     r"obs\['frames'\]: expected base64 uint8 bytes of shape"),
    ("/infer", lambda o: {"obs": bad_frames(o, lambda f: (f.astype(int) + 100).tolist())}, 400, "integers in 0..255"),
    ("/infer", lambda o: {"obs": dict(as_json(o), state=["a", "b", "c", "d"])}, 400, r"obs\['state'\]: expected nested lists"),
    ("/infer", lambda o: {"obs": dict(as_json(o), state=array_to_json(np.zeros(4, np.uint8)))}, 400,
     r"obs\['state'\]: expected nested lists of numbers \(only frames may be base64\)"),
    ("/infer", lambda o: {"obs": as_json(o), "mode": "unified", "length": 16}, 400, "length: unified mode's chunks are 16 actions"),
    ("/infer", lambda o: {"obs": dict(as_json(o), state=[0, 0, float("nan"), 0])}, 400, r"obs\['state'\]: expected finite"),
    ("/infer", lambda o: {"obs": {k: v for k, v in as_json(o).items() if k != "cam_pose"}}, 400, "missing 'cam_pose'"),
    ("/reset", {"instruction": ""}, 400, "instruction: expected a non-empty string"),
    ("/reset", {"instruction": "x" * 500}, 400, "instruction: at most"),
    ("/reset", b"x" * 200_001, 413, "request body: at most 200000 bytes, found 200001"),
    ("/act", {}, 404, "unknown path POST /act"),
    ("/infer", None, 404, "unknown path GET /infer"),
])
def test_bad_requests_get_4xx_naming_the_problem(server, obs, path, body, code, message):
    _, url = server
    assert call(url, "/reset", {"instruction": INSTRUCTION})[0] == 200
    status, out = call(url, path, body(obs) if callable(body) else body)
    assert status == code and re.search(message, out["error"]), out


def test_infer_before_reset_is_refused_and_the_server_keeps_serving(server, obs):
    _, url = server
    status, out = call(url, "/infer", {"obs": as_json(obs)})
    assert status == 400 and "call reset(instruction) first" in out["error"]
    assert call(url, "/health")[0] == 200
