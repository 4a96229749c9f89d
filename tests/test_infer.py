"""infer.py and eval.py on a tiny trained run: both modes, the cache, bad input, deterministic evaluation."""
import dataclasses

import numpy as np
import pytest
import torch

import data
import env as world
import eval as E
import train
from infer import InferError, Policy


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    data.generate(root, episodes=6, seed=4, per_shard=6, image_size=32)
    out = tmp_path_factory.mktemp("run")
    base = train.PRESETS["tiny"][1]
    train.main(dataclasses.replace(base, run_dir=str(out), data=dataclasses.replace(base.data, root=root), steps=(2,) * 5))
    return str(out)


@pytest.fixture(scope="module")
def policy(run):
    return Policy.from_checkpoint(run)


def observe(task):
    envs = world.TabletopEnv([task], world.WorldConfig(image_size=32))
    return E.observation(envs.observe(), 0)


def test_event_mode_cached_equals_uncached(policy):
    obs = observe(world.make_task("pick_place", "seen", 7))
    kw = dict(captions=["reach the red block"], lengths=[7])
    a1 = policy.event_actions([obs], ["put the red block in the blue bowl"], cache=True, generator=torch.Generator().manual_seed(0), **kw)
    a2 = policy.event_actions([obs], ["put the red block in the blue bowl"], cache=False, generator=torch.Generator().manual_seed(0), **kw)
    assert a1["action"][0].shape == (7, 4) and np.allclose(a1["action"][0], a2["action"][0], atol=1e-5)


def test_both_modes_return_the_documented_shapes(policy):
    obs = observe(world.make_task("press_order", "seen", 3))
    policy.reset("press the yellow button then the blue one")
    out = policy.infer(obs, caption="press the yellow button", length=9, return_frames=True)
    assert out["action"].shape == (9, 4) and out["action"].dtype == np.float32 and np.abs(out["action"]).max() <= 1
    assert out["frames"].shape == (3, 2, 16, 16, 3) and out["ms"] > 0 and out["caption"] == "press the yellow button"
    auto = policy.infer(obs)                             # the model's own caption and remaining time
    assert 1 <= auto["length"] <= 32 and auto["action"].shape == (auto["length"], 4) and isinstance(auto["caption"], str)
    for source in ("instruction", "latents"):
        policy.reset("press the yellow button then the blue one")
        first, second = policy.infer(obs, mode="unified", source=source), policy.infer(obs, mode="unified", source=source)
        assert first["action"].shape == second["action"].shape == (16, 4) and policy.chunk == 2


@pytest.mark.parametrize("change, message", [
    (lambda o: o.update(frames=o["frames"].astype(np.float32)), "expected dtype uint8"),
    (lambda o: o.update(frames=o["frames"][:1]), r"obs\['frames'\]: expected shape \(2, 'any', 'any', 3\)"),
    (lambda o: o.update(frames=o["frames"][:, :30, :30]), "multiple of 16"),
    (lambda o: o["state"].__setitem__(0, np.nan), r"obs\['state'\]: expected finite numbers"),
    (lambda o: o.pop("cam_pose"), "missing 'cam_pose'"),
])
def test_bad_observations_are_refused(policy, change, message):
    obs = observe(world.make_task("stack", "seen", 2))
    obs = {k: np.array(v) for k, v in obs.items()}
    change(obs)
    policy.reset("stack the red block on the blue block")
    with pytest.raises(InferError, match=message):
        policy.infer(obs, caption="reach the red block", length=4)


def test_bad_instructions_and_modes_are_refused(policy, run):
    for text, message in (("", "non-empty"), ("x" * 500, "at most"), (b"\xff\xfe", "not valid UTF-8")):
        with pytest.raises(InferError, match=message):
            policy.reset(text)
    policy.reset("push the red block to the left edge")
    obs = observe(world.make_task("push", "seen", 1))
    with pytest.raises(InferError, match="length: expected an integer in 1..32"):
        policy.infer(obs, caption="push", length=0)
    with pytest.raises(InferError, match="mode: expected"):
        policy.infer(obs, mode="chunky")
    baseline = Policy.from_checkpoint(f"{run}/stage6.safetensors")
    baseline.reset("push the red block to the left edge")
    with pytest.raises(InferError, match="needs a checkpoint from stage 3 or later.*chunk-centric baseline"):
        baseline.infer(obs)
    with pytest.raises(InferError, match="not a readable checkpoint|no checkpoint"):
        Policy.from_checkpoint(f"{run}/missing.safetensors")


def test_evaluation_is_deterministic_for_a_seed(run):
    kw = dict(episodes=2, families=("pick_place",), splits=("seen", "distractors"), modes=("event_oracle", "baseline"),
              horizon=12, seed=3, image_size=32)
    a, b = E.evaluate(run, **kw), E.evaluate(run, **kw)
    for mode in kw["modes"]:
        for cell in [("pick_place", "seen"), ("pick_place", "distractors")]:
            assert a[mode][cell]["per_episode"] == b[mode][cell]["per_episode"]
            assert a[mode][cell]["episodes"] == 2
    tasks = E.episode_tasks(("pick_place",), ("seen",), 3, seed=3)
    assert [t.seed for _, _, t in tasks] == [t.seed for _, _, t in E.episode_tasks(("pick_place",), ("seen",), 3, seed=3)]
    assert min(t.seed for _, _, t in tasks) >= E.EVAL_SEED


def test_intervals():
    lo, hi = E.wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert E.wilson(0, 10)[0] == 0 and 0.27 < E.wilson(0, 10)[1] < 0.28
    lo, hi = E.bootstrap([0, 100] * 50)
    assert lo < 50 < hi and hi - lo < 30


def test_open_loop_error_is_deterministic_and_beside_its_floor(run, policy):
    import json
    root = json.load(open(f"{run}/config.json"))["config"]["data"]["root"]
    a, b = E.open_loop(policy, root, events=3, seed=1), E.open_loop(policy, root, events=3, seed=1)
    assert a == b and a["events"] == 3 and np.isfinite(a["action_mse"]) and a["mean_action_mse"] > 0
    assert E.open_loop(policy, root, events=3, seed=2)["action_mse"] != a["action_mse"]
