"""infer.py and eval.py on a tiny trained run (tests/conftest.py): both modes, the cache, bad input,
deterministic evaluation, two processes against one, PSNR and SSIM, PNG strips."""
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import data
import env as world
import eval as E
from infer import InferError, Policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    seeded = policy.infer(obs, caption="press the yellow button", length=9, seed=5)["action"]   # the batch call, one episode
    direct = policy.event_actions([obs], [policy.instruction], ["press the yellow button"], [9],
                                  generator=torch.Generator().manual_seed(5))["action"][0]
    assert np.array_equal(seeded, np.asarray(direct)) and np.abs(seeded).max() > 0.01
    auto = policy.infer(obs)                             # the model's own caption and remaining time
    assert 1 <= auto["length"] <= 32 and auto["action"].shape == (auto["length"], 4) and isinstance(auto["caption"], str)
    for source in ("instruction", "latents"):
        policy.reset("press the yellow button then the blue one")
        first = policy.infer(obs, mode="unified", source=source)
        for _ in range(15):                              # the observations while the first chunk executes
            policy.observe(obs)
        second = policy.infer(obs, mode="unified", source=source)
        assert first["action"].shape == second["action"].shape == (16, 4) and policy.chunk == 2
        assert first["source"] == source and first["caption"] == {"instruction": policy.instruction, "latents": None}[source]
    policy.reset("press the yellow button then the blue one")
    atomic = policy.infer(obs, mode="unified", source="atomic", caption="press the yellow button", return_frames=True)
    assert atomic["caption"] == "press the yellow button" and atomic["frames"].shape == (4, 2, 16, 16, 3)


def test_unified_mode_reads_history_frames_k_p_steps_back(policy):
    """Policy.infer builds eval.rollout's window: after a chunk and its 15 observed steps, tau = -1 and
    -2 are the observations 4 and 8 steps before the anchor. One observation per chunk, one too many,
    and a switch to event mode within the episode are refused."""
    envs = world.TabletopEnv([world.make_task("push", "seen", 4)], world.WorldConfig(image_size=32))
    seen = [E.observation(envs.observe(), 0)]
    for a in np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype(np.float32):
        envs.step(a[None])
        seen.append(E.observation(envs.observe(), 0))
    policy.reset(INSTR := "push the red block to the left edge")
    policy.infer(seen[0], mode="unified", source="instruction")
    with pytest.raises(InferError, match="after each of the last chunk's first 15 actions.*found 0 observations"):
        policy.infer(seen[16], mode="unified", source="instruction")
    for o in seen[1:17]:                                 # the last step's observation too: one too many
        policy.observe(o)
    with pytest.raises(InferError, match="found 16 observations"):
        policy.infer(seen[16], mode="unified", source="instruction")
    with pytest.raises(InferError, match="this episode runs in unified mode.*call reset"):
        policy.infer(seen[16], caption="push the red block", length=4)
    policy.reset(INSTR)
    policy.infer(seen[0], mode="unified", source="instruction")
    for o in seen[1:16]:
        policy.observe(o)
    got = policy.infer(seen[16], mode="unified", source="instruction", seed=5)["action"]
    ref = policy.chunk_actions([seen], [INSTR], [1], "instruction", generator=[torch.Generator().manual_seed(5)])["action"][0]
    shifted = policy.chunk_actions([seen[:1] + seen[:16]], [INSTR], [1], "instruction",
                                   generator=[torch.Generator().manual_seed(5)])["action"][0]
    assert np.array_equal(got, ref) and not np.allclose(got, shifted)   # the history frames matter, one step off


@pytest.mark.parametrize("change, message", [
    (lambda o: o.update(frames=o["frames"].astype(np.float32)), "expected dtype uint8"),
    (lambda o: o.update(frames=o["frames"][:1]), r"obs\['frames'\]: expected shape \(2, 'any', 'any', 3\)"),
    (lambda o: o.update(frames=o["frames"][:, :30, :30]), "multiple of 16"),
    (lambda o: o["state"].__setitem__(0, np.nan), r"obs\['state'\]: expected finite numbers"),
    (lambda o: o.pop("cam_pose"), "missing 'cam_pose'"),
    (lambda o: o.update(frames=o["frames"][:, :0, :0]), "multiple of 16"),
    (lambda o: o.update(state=o["state"].astype(np.complex64)), r"obs\['state'\]: expected real numbers, found complex64"),
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
    with pytest.raises(InferError, match="event mode needs a checkpoint from stage 2 or later.*chunk-centric baseline"):
        baseline.infer(obs, caption="push", length=4)
    stage1 = Policy.from_checkpoint(f"{run}/stage1.safetensors")     # its action tower never trained
    stage1.reset("push the red block to the left edge")
    with pytest.raises(InferError, match="event mode needs a checkpoint from stage 2 or later.*this one is stage 1"):
        stage1.infer(obs, caption="push", length=4)
    policy.reset("push the red block to the left edge")
    for kw, message in ((dict(length=16), "length: unified mode's chunks are 16 actions"),
                        (dict(planner=lambda o: "push"), "planner: unified mode's chunks"),
                        (dict(caption="push", source="latents"), "caption: unified mode reads one with source 'atomic' only")):
        with pytest.raises(InferError, match=message):
            policy.infer(obs, mode="unified", **kw)
    with pytest.raises(InferError, match="not a readable checkpoint|no checkpoint"):
        Policy.from_checkpoint(f"{run}/missing.safetensors")


def test_a_run_gives_event_mode_stage_4_and_unified_mode_stage_5(run, policy):
    event, chunk = (Policy.from_checkpoint(f"{run}/stage{s}.safetensors") for s in (4, 5))
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (policy.stage, policy.chunk_stage) == (4, 5)
    assert same(policy.m, event.m) and same(policy.mc, chunk.m) and not same(policy.m, policy.mc)
    obs, instr = observe(world.make_task("stack", "seen", 2)), "stack the red block on the blue block"
    kw = dict(captions=["reach the red block"], lengths=[6])
    a, b = (p.event_actions([obs], [instr], generator=torch.Generator().manual_seed(0), **kw)["action"][0] for p in (policy, event))
    assert np.array_equal(a, b)
    outs = []
    for p in (policy, chunk):
        p.reset(instr)
        outs.append(p.infer(obs, mode="unified", source="instruction", seed=0)["action"])
    assert np.array_equal(*outs)


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
    other = E.episode_tasks(("pick_place",), ("seen",), 3, seed=4)
    assert not {t.seed for *_, t in tasks} & {t.seed for *_, t in other}      # another seed, other episodes
    # a selection of cells replays those cells' episodes of the full table, in the order asked
    full = E.episode_tasks(world.FAMILIES, world.SPLITS, 3, seed=3)
    some = E.episode_tasks(("put_all", "push"), ("distractors",), 3, seed=3)
    want = [t for f in ("put_all", "push") for ff, s, t in full if (ff, s) == (f, "distractors")]
    assert [(t.family, t.split, t.seed) for *_, t in some] == [(t.family, t.split, t.seed) for t in want]
    assert len({t.seed for *_, t in full}) == len(full)                               # no seed repeats across cells


def test_a_traced_rollout_lists_every_model_call(policy):
    task = world.make_task("press_order", "seen", 5)
    first = world.oracle_next_event(world.TabletopEnv([task], world.WorldConfig(image_size=32)).worlds[0])
    r = E.rollout(policy, [task], "event_oracle", 20, 32, trace=True)[0]
    calls = r["calls"]
    assert calls[0]["step"] == 0 and calls[0]["caption"] == first["text"]
    assert np.allclose(calls[0]["tcp"], task.gripper_start) and len(calls[0]["object"]) == 3
    for c, nxt in zip(calls, calls[1:]):              # each call's actions run until the next call
        assert nxt["step"] == c["step"] + c["length"]
    assert calls[-1]["step"] < r["steps"] <= calls[-1]["step"] + calls[-1]["length"]
    assert "calls" not in E.rollout(policy, [task], "event_oracle", 4, 32)[0]


def test_told_modes_give_the_policy_the_experts_future(run, policy, monkeypatch):
    """event_told times each event by the expert's lookahead (env.expert_future) and samples with its
    frames as the true future (noised to s* in place of generated video). A wrong number of future
    observations, and an unknown mode, are refused."""
    task = world.make_task("pick_place", "seen", 7)
    envs = world.TabletopEnv([task], world.WorldConfig(image_size=32))
    acts, future = world.expert_future(envs.worlds[0], limit=policy.cfg.max_event_len, k_p=policy.cfg.k_p)
    calls = E.rollout(policy, [task], "event_told", 20, 32, trace=True)[0]["calls"]
    assert calls[0]["length"] == len(acts) and calls[0]["caption"] == world.oracle_next_event(envs.worlds[0])["text"]
    assert np.allclose(calls[0]["expert_end"], future[-1]["state"][:3])        # where the lookahead left the TCP
    obs = E.observation(envs.observe(), 0)
    kw = dict(instructions=[task.instruction], captions=["reach the red block"], lengths=[len(acts)])
    seen, sample = [], policy.m.sample
    monkeypatch.setattr(policy.m, "sample", lambda b, **k: seen.append((b, k)) or sample(b, **k))
    told = policy.event_actions([obs], futures=[future], **kw)["action"][0]
    batch, k = seen[-1]
    assert told.shape == (len(acts), 4) and k["true_future"] and batch["frames"].shape[1] == len(future) + 1
    assert np.array_equal(batch["frames"][0, 0], obs["frames"]) and np.allclose(batch["state"][0, 0],
                                                                               data.normalise(obs["state"], policy.stats["state"]))
    assert all(np.array_equal(batch["frames"][0, f + 1], o["frames"]) and np.array_equal(batch["cam_pose"][0, f + 1], o["cam_pose"])
               for f, o in enumerate(future))
    with pytest.raises(InferError, match=r"futures\[0\]: expected ceil"):
        policy.event_actions([obs], futures=[future[:-1]], **kw)
    with pytest.raises(InferError, match=r"futures\[0\]\[0\]: expected frames"):
        policy.event_actions([obs], futures=[[dict(o, frames=o["frames"][:, :16]) for o in future]], **kw)
    with pytest.raises(ValueError, match="mode 'event_toldd'"):
        E.rollout(policy, [task], "event_toldd", 20, 32)
    base = Policy.from_checkpoint(f"{run}/stage6.safetensors")                 # baseline_told: the next chunk's frames
    seen, sample = [], base.mc.sample
    monkeypatch.setattr(base.mc, "sample", lambda b, **k: seen.append((b, k)) or sample(b, **k))
    E.rollout(base, [task], "baseline_told", 4, 32)
    batch, k = seen[0]
    N = base.cfg.chunk_frames * base.cfg.k_p
    _, future = world.expert_future(envs.worlds[0], steps=N, k_p=base.cfg.k_p)
    tau = batch["frame_tau"][0].tolist()
    assert k["true_future"] and len(future) == max(tau)
    assert all(np.array_equal(batch["frames"][0, tau.index(f + 1)], o["frames"]) for f, o in enumerate(future))


def test_event_timed_takes_the_experts_length_and_its_own_video(policy, monkeypatch):
    """event_timed: the oracle's caption and the expert's length, and the policy's own video (no true
    future), so that it differs from event_oracle in the length only."""
    task = world.make_task("push", "seen", 7)
    envs = world.TabletopEnv([task], world.WorldConfig(image_size=32))
    acts, _ = world.expert_future(envs.worlds[0], limit=policy.cfg.max_event_len, k_p=policy.cfg.k_p)
    seen, sample = [], policy.m.sample
    monkeypatch.setattr(policy.m, "sample", lambda b, **k: seen.append(k) or sample(b, **k))
    calls = E.rollout(policy, [task], "event_timed", 20, 32, trace=True)[0]["calls"]
    assert calls[0]["length"] == len(acts) and calls[0]["caption"] == world.oracle_next_event(envs.worlds[0])["text"]
    assert "expert_end" not in calls[0] and not any(k["true_future"] for k in seen)


def test_intervals():
    lo, hi = E.wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert E.wilson(0, 10)[0] == 0 and 0.27 < E.wilson(0, 10)[1] < 0.28
    lo, hi = E.bootstrap([0, 100] * 50)
    assert lo < 50 < hi and hi - lo < 30


def test_sampling_overrides_change_only_the_sampler(run, policy):
    fewer, coned = Policy.from_checkpoint(run, video_steps=2), Policy.from_checkpoint(run, cone_sampling=True)
    assert fewer.m.cfg.flow.video_steps == 2 and policy.m.cfg.flow.video_steps != 2
    assert coned.m.cfg.video.cone_sampling and coned.mc.cfg.video.cone_sampling and not policy.m.cfg.video.cone_sampling
    for p in (fewer, coned):
        assert all(torch.equal(a, b) for a, b in zip(p.m.state_dict().values(), policy.m.state_dict().values()))
    root = data_root(run)
    a, b = E.open_loop(policy, root, events=2, seed=1), E.open_loop(fewer, root, events=2, seed=1)
    assert a["psnr"] != b["psnr"]                     # another Euler schedule, other frames (the mask: test_model.py)


def data_root(run):
    return json.load(open(f"{run}/config.json"))["config"]["data"]["root"]


def test_open_loop_error_is_deterministic_and_beside_its_floor(run, policy):
    root = data_root(run)
    a, b = E.open_loop(policy, root, events=3, seed=1), E.open_loop(policy, root, events=3, seed=1)
    assert a == b and a["events"] == 3 and np.isfinite(a["action_mse"]) and a["mean_action_mse"] > 0
    assert np.isfinite(a["action_mse_true_future"]) and a["action_mse_true_future"] != a["action_mse"]
    # the true-future error of one event, recomputed: the same window, noise and normalised units
    one = E.open_loop(policy, root, events=1, seed=3)
    ds, rng = data.Dataset(root), np.random.default_rng(3)
    per, items = data.all_events(ds)
    k = int(rng.choice(len(items), 1, replace=False)[0])
    i, j = items[k]
    w = data.event_window(ds, per[i], j, rng)
    told = policy.m.sample(data.collate([[dict(w, caption=w["event_text"])]]), true_future=True,
                           generator=torch.Generator().manual_seed(3 + k))["action"][0].cpu().numpy()
    assert one["action_mse_true_future"] == pytest.approx(float(((told - w["action"]) ** 2).mean()), rel=1e-6)
    assert E.open_loop(policy, root, events=3, seed=2)["action_mse"] != a["action_mse"]
    assert len(a["psnr"]) == len(a["ssim"]) == 2 and all(0 < p < E.PSNR_CAP for p in a["psnr"])
    assert all(-1 <= s < 1 for s in a["ssim"])
    ends = a["endpoint"]
    assert sum(e["events"] for e in ends.values()) == 3
    assert all(e["generated"] >= 0 and e["true_future"] >= 0 and e["frozen"] >= 0 and e["distance"] >= 0 for e in ends.values())
    assert all(e["generated"] > 0 and e["generated"] != e["true_future"] for e in ends.values())   # a tiny model misses
    # frozen future frames are another input than the true ones: the action tower's answer moves
    assert all(e["frames_effect"] > 0 for e in ends.values())
    seg = E.segmentation_f1(root, a["episodes"])
    assert seg == data.segment_eval(data.segment_items(data.Dataset(root), a["episodes"]))["all"]
    assert seg["episodes"] == len(a["episodes"]) and 0 <= seg["f1"] <= 1


def test_the_data_layout_travels_in_the_checkpoint(run, policy, tmp_path):
    """A checkpoint made with another K_p makes
    windows with that K_p (an event of 6 steps: 3 future frames at K_p = 2, 2 at the default 4); one
    written without a layout gets data.DataConfig()."""
    import dataclasses
    import train
    model_sd, ema_sd, stats, stage, _, _ = train.read_weights(f"{run}/stage4.safetensors")
    m = Policy.from_checkpoint(f"{run}/stage4.safetensors").m
    m.load_state_dict(model_sd)
    for name, layout in (("kp2", dataclasses.replace(policy.cfg, k_p=2)), ("none", None)):
        train.write_weights(str(tmp_path / f"{name}.safetensors"), m, ema_sd, stats, stage, layout)
    other = Policy.from_checkpoint(str(tmp_path / "kp2.safetensors"))
    assert other.cfg.k_p == 2 and Policy.from_checkpoint(str(tmp_path / "none.safetensors")).cfg == data.DataConfig()
    obs = observe(world.make_task("stack", "seen", 2))
    for p, frames in ((other, 3), (policy, 2)):
        p.reset("stack the red block on the blue block")
        assert p.infer(obs, caption="reach the red block", length=6, return_frames=True)["frames"].shape[0] == frames
    both = tmp_path / "both"                                # a run directory whose stages 4 and 5 saw other data
    both.mkdir()
    train.write_weights(str(both / "stage4.safetensors"), m, ema_sd, stats, stage, policy.cfg)
    moved = dict(stats, state={n: v + 1 for n, v in stats["state"].items()})
    train.write_weights(str(both / "stage5.safetensors"), m, ema_sd, moved, 5, policy.cfg)
    with pytest.raises(InferError, match=r"different normalisation statistics \(state\."):
        Policy.from_checkpoint(str(both))


def test_an_offsets_checkpoint_turns_offsets_into_steps(run, policy, tmp_path):
    """The same weights written as an offset checkpoint (the layout and its statistics travel in the
    file): its policy turns the model's raw output into the differences of the offsets it denotes,
    clipped to the action range; a per-step policy denormalises it as it is."""
    import train
    model_sd, ema_sd, stats, stage, _, _ = train.read_weights(f"{run}/stage4.safetensors")
    ds = data.with_targets(data.Dataset(data_root(run)), True)
    m = Policy.from_checkpoint(f"{run}/stage4.safetensors").m
    m.load_state_dict(model_sd)
    path = str(tmp_path / "offsets.safetensors")
    train.write_weights(path, m, ema_sd, stats | {"offset": ds.stats["offset"]}, stage, ds.cfg)
    off = Policy.from_checkpoint(path)
    assert off.cfg.action_offsets and not policy.cfg.action_offsets
    np.testing.assert_array_equal(off.stats["offset"]["std"], ds.stats["offset"]["std"])
    raw = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(0))      # (B, K, A) normalised targets
    steps, offsets = policy.actions_out(raw, [9, 5]), off.actions_out(raw, [9, 5])
    sa, so = stats["action"], ds.stats["offset"]
    for b, n in enumerate((9, 5)):
        x = raw[b, :n].double().numpy()
        np.testing.assert_allclose(steps[b], np.clip(x * sa["std"] + sa["mean"], -1, 1), atol=1e-6)
        where = x * so["std"] + so["mean"]
        np.testing.assert_allclose(offsets[b][:, :3], np.clip(np.diff(where[:, :3], axis=0, prepend=0), -1, 1), atol=1e-6)
        np.testing.assert_allclose(offsets[b][:, 3], np.clip(where[:, 3], -1, 1), atol=1e-6)   # the gripper is not summed
    obs = observe(world.make_task("stack", "seen", 2))
    out = off.event_actions([obs], ["stack the red block on the blue block"], ["reach the red block"], [6])
    assert out["action"][0].shape == (6, 4) and np.abs(out["action"][0]).max() <= 1


def test_inference_chunk_window_equals_the_training_one(run, policy):
    """What unified mode and the baseline see at inference is data.chunk_window's window: the history
    frames k_p steps back (masked before the episode starts), the anchor, the state, tau, the chunk index."""
    ds = data.Dataset(data_root(run))
    H = ds.cfg.chunk_frames * ds.cfg.k_p
    last = (ds.length(0) - 1) // H                          # the episode's last chunk: its future runs past the end
    for i, c in ((0, 0), (0, 1), (1, 2), (0, last)):
        train = data.collate([[data.chunk_window(ds, i, c)]])
        infer = policy.chunk_batch([[E.recorded_obs(ds, i, t) for t in range(c * H + 1)]], [c])
        seen, past = (train["frame_seg"] >= 0) & (train["frame_tau"] <= 0), train["frame_tau"] <= 0
        for key in ("frame_tau", "action_tau", "chunk_index", "state_seg"):
            assert torch.equal(infer[key], train[key]), key
        assert torch.equal(infer["frame_seg"][past], train["frame_seg"][past]) and (infer["frame_seg"][~past] == 0).all()
        assert torch.equal(infer["frames"][seen], train["frames"][seen]) and torch.allclose(infer["state"], train["state"])
        assert torch.equal(infer["cam_pose"][seen], train["cam_pose"][seen]) and torch.equal(infer["intrinsics"], train["intrinsics"])
        assert torch.equal(infer["action_seg"], torch.zeros_like(train["action_seg"]))   # the whole chunk is asked for
        told = policy.chunk_batch([[E.recorded_obs(ds, i, t) for t in range(c * H + 1)]], [c],     # baseline_told's window
                                  [[E.recorded_obs(ds, i, min(c * H + f * ds.cfg.k_p, ds.length(i))) for f in range(1, ds.cfg.chunk_frames + 1)]])
        valid = train["frame_seg"] >= 0
        assert torch.equal(told["frames"][valid], train["frames"][valid]) and torch.equal(told["cam_pose"][valid], train["cam_pose"][valid])
        assert torch.allclose(told["state"], train["state"])                             # still the anchor's


def test_open_loop_scores_chunk_checkpoints_on_chunk_windows(run):
    """Stage 5 and the baseline are scored on the windows they trained on, with their history frames."""
    root = data_root(run)
    base = Policy.from_checkpoint(f"{run}/stage6.safetensors")
    a = E.open_loop(base, root, events=3, seed=1)
    assert a["windows"] == "chunk" and list(a["endpoint"]) == ["chunk"] and a == E.open_loop(base, root, events=3, seed=1)
    assert np.isfinite(a["action_mse"]) and a["mean_action_mse"] > 0 and all(0 < p < E.PSNR_CAP for p in a["psnr"])
    assert E.open_loop(Policy.from_checkpoint(f"{run}/stage2.safetensors"), root, events=3, seed=1)["windows"] == "event"


def test_event_heads_score_the_length_event_mode_executes(run, policy, monkeypatch):
    """event_heads: the remaining-time head's length at recorded keyframes against each event's own;
    with a head that knows the true lengths, it scores 0 steps off; a checkpoint without the heads is refused."""
    root = data_root(run)
    a = E.event_heads(policy, root, events=4, seed=1)
    assert a == E.event_heads(policy, root, events=4, seed=1) and a["events"] == 4
    assert a["mae"] >= abs(a["bias"]) and 0 <= a["within_2"] <= 1 and a["true_mean"] >= 1
    ds, rng = data.Dataset(root), np.random.default_rng(1)
    per, items = data.all_events(ds)
    truth = iter([len(data.event_window(ds, per[items[k][0]], items[k][1], rng)["action"])
                  for k in rng.choice(len(items), 4, replace=False)])
    # the head itself answers each event's true length, 0.3 off: Policy.next_event rounds it back
    monkeypatch.setattr(policy.m.vlm, "predict", lambda frames, instr, max_len=None:
                        {"caption": [""], "remaining": torch.tensor([next(truth) + 0.3])})
    exact = E.event_heads(policy, root, events=4, seed=1)
    assert exact["mae"] == 0 and exact["within_2"] == 1 and exact["frames_right"] == 1 and exact["true_mean"] == a["true_mean"]
    assert all(e == 0 and p == t for _, p, t, e in exact["per_skill"].values())
    assert sum(n for n, *_ in a["per_skill"].values()) == 4 and a["skill_median_mae"] <= a["constant_mae"]
    with pytest.raises(InferError, match="needs a checkpoint from stage 3"):
        E.event_heads(Policy.from_checkpoint(f"{run}/stage2.safetensors"), root, events=1)


def test_caption_swap_reaches_the_model_and_is_deterministic(run, policy):
    root = data_root(run)
    c = E.caption_swap(policy, root, events=3, seed=1)
    assert c == E.caption_swap(policy, root, events=3, seed=1)
    assert 1 <= c["events"] <= 3 and c["objects_apart"] > 0 and 0 <= c["nearer_named"] <= 1
    # the other object's name reached the towers: another event end, another video loss
    assert c["ends_apart"] > 0 and c["video_loss"]["swapped"] != c["video_loss"]["true"] != c["video_loss"]["none"]
    assert c["loss_gap"] == pytest.approx(c["video_loss"]["swapped"] / c["video_loss"]["true"] - 1)
    one = E.caption_swap(policy, root, events=3, seed=1, draws=1)                      # the loss is a mean over draws
    assert one["ends_apart"] == c["ends_apart"] and one["video_loss"]["true"] != c["video_loss"]["true"]


def test_caption_swap_scores_a_policy_that_follows_the_caption(run, policy, monkeypatch):
    """A fake policy whose events end on the object their caption names: every end is nearer the named
    object (nearer_named 1) and the two ends lie as far apart as the objects; one that stays put: 0 apart."""
    ds = data.Dataset(data_root(run))
    per, _ = data.all_events(ds)
    where = {}                                          # (keyframe, object name) -> the object's xy
    for i in range(len(per)):
        meta = ds.episode_meta(i)
        task = world.make_task(meta["family"], meta["split"], meta["seed"])
        for e in per[i]:
            key = ds.get(i, "frames", e["steps"][:1])[0].tobytes()               # episodes share start states, not pictures
            where |= {(key, world.name_of(task, o)): task.pos[o, :2] for o in range(len(task.kinds))}
    step = world.WorldConfig().max_step
    def follow(obs, instructions, captions, lengths, generator=None, **kw):
        key, state, L = obs[0]["frames"].tobytes(), obs[0]["state"], lengths[0]
        name = max((n for k, n in where if k == key and n in captions[0]), key=len)
        act = np.zeros((L, 4), np.float32)
        act[:, :2] = (where[(key, name)] - state[:2]) / (step * L)
        return {"action": [act]}
    monkeypatch.setattr(policy, "event_actions", follow)
    c = E.caption_swap(policy, data_root(run), events=3, seed=1, draws=1)
    assert c["events"] >= 1 and c["nearer_named"] == 1 and c["ends_apart"] == pytest.approx(c["objects_apart"], rel=1e-4)
    monkeypatch.setattr(policy, "event_actions", lambda obs, instructions, captions, lengths, **k:
                        {"action": [np.zeros((lengths[0], 4), np.float32)]})
    assert E.caption_swap(policy, data_root(run), events=3, seed=1, draws=1)["ends_apart"] == 0


def test_paired_differences_are_per_episode():
    cell = lambda p: {"per_episode": {"progress": p}}                                   # noqa: E731
    res = {"event_auto": {("push", "seen"): cell([50.0, 0.0]), ("push", "paraphrase"): cell([100.0, 100.0]), "_seconds": 1.0},
           "baseline": {("push", "seen"): cell([0.0, 0.0]), ("push", "paraphrase"): cell([100.0, 50.0]), "_seconds": 1.0}}
    mean, (lo, hi), n = E.paired(res, "event_auto", "baseline", "push")
    assert n == 4 and mean == 25.0 and lo <= 25.0 <= hi and lo >= 0.0
    assert "+25.0" in E.paired_table(res, ("push",))


def test_compare_pairs_two_reports_and_refuses_other_episodes(tmp_path):
    cell = lambda p, ok: {"episodes": len(p), "per_episode": {"progress": p, "success": ok}}   # noqa: E731
    a = {"event_told": {("push", "seen"): cell([50.0, 0.0], [False, False]), ("put_all", "seen"): cell([100.0, 20.0], [True, False])}}
    b = {"event_told": {("push", "seen"): cell([100.0, 0.0], [True, False]), ("put_all", "seen"): cell([100.0, 60.0], [True, False])},
         "baseline": {("push", "seen"): cell([0.0, 0.0], [False, False]), ("put_all", "seen"): cell([0.0, 0.0], [False, False])}}
    st = dict(env="tabletop", families=["push", "put_all"], splits=["seen"], episodes=2, horizon=300, seed=0, image_size=64)
    E.write_report(str(tmp_path / "a.json"), {"closed_loop": E.as_json(a)}, **st, ckpt="runs/a")
    E.write_report(str(tmp_path / "b.json"), {"closed_loop": E.as_json(b)}, **st, ckpt="runs/b")
    out = E.compare(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert list(out) == [("event_told", "event_told")]                                 # the one mode both files have
    push, put_all, both = out[("event_told", "event_told")]
    assert (push["A"], push["B"], push["success"][0], push["progress"][0]) == ((0, 25.0), (1, 50.0), 50.0, 25.0)
    assert (put_all["success"][0], put_all["progress"][0]) == (0.0, 20.0)
    assert both["family"] == "all" and both["progress"][0] == 22.5 and both["progress"][2] == 4
    lo, hi = both["progress"][1]
    assert lo <= 22.5 <= hi and hi > lo
    # one file against itself, one mode against another: the baseline is 80 points behind on put_all
    one = E.compare(str(tmp_path / "b.json"), str(tmp_path / "b.json"), mode_a="event_told", mode_b="baseline")
    assert one[("event_told", "baseline")][1]["progress"][0] == -80.0
    E.write_report(str(tmp_path / "c.json"), {"closed_loop": E.as_json(a)}, **{**st, "seed": 1}, ckpt="runs/a")
    with pytest.raises(ValueError, match="seed: 0 in .*a.json, 1 in .*c.json"):
        E.compare(str(tmp_path / "a.json"), str(tmp_path / "c.json"))
    with pytest.raises(ValueError, match="no mode 'baseline'"):
        E.compare(str(tmp_path / "a.json"), str(tmp_path / "b.json"), mode_a="baseline")
    (tmp_path / "old.json").write_text(json.dumps({"closed_loop": E.as_json(a)}))   # no settings: episodes unknown
    with pytest.raises(ValueError, match="old.json: no settings;"):
        E.compare(str(tmp_path / "old.json"), str(tmp_path / "a.json"))
    E.write_report(str(tmp_path / "d.json"), {"closed_loop": E.as_json({"baseline": b["baseline"]})}, **st, ckpt="runs/d")
    with pytest.raises(ValueError, match="no mode in both files"):
        E.compare(str(tmp_path / "a.json"), str(tmp_path / "d.json"))
    short = {"event_told": {("push", "seen"): a["event_told"][("push", "seen")]}}      # a cell lost: not the settings' episodes
    E.write_report(str(tmp_path / "e.json"), {"closed_loop": E.as_json(short)}, **st, ckpt="runs/e")
    with pytest.raises(ValueError, match=r"e.json: mode event_told does not match its settings .*missing \[\('put_all', 'seen'\)\]"):
        E.compare(str(tmp_path / "a.json"), str(tmp_path / "e.json"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error: not the same episodes" in r.stderr and "Traceback" not in r.stderr


def test_merge_joins_parts_of_one_table_and_refuses_others(run, tmp_path):
    # real parts: one family each, evaluated apart, joined, against one evaluation of both
    kw = dict(episodes=1, splits=("seen",), modes=("event_oracle", "baseline"), horizon=10, seed=2, image_size=32)
    for f in ("push", "pick_place"):                                   # not the table's order
        E.main(run, families=(f,), json_out=str(tmp_path / f"{f}.json"), **kw)
    joined = E.merge(str(tmp_path / "all.json"), (str(tmp_path / "push.json"), str(tmp_path / "pick_place.json")))
    E.main(run, families=("pick_place", "push"), json_out=str(tmp_path / "one.json"), **kw)
    st_all, res_all = E.read_report(str(tmp_path / "all.json"))
    st_one, res_one = E.read_report(str(tmp_path / "one.json"))
    assert st_all["families"] == ["pick_place", "push"] and st_all["parts"][0].endswith("push.json")
    assert {k: v for k, v in st_all.items() if k != "parts"} == st_one    # the same settings as one run of both
    assert sorted(joined) == sorted(res_all) == ["baseline", "event_oracle"]
    for m in kw["modes"]:
        for cell in res_one[m]:
            a, b = res_all[m][cell]["per_episode"], res_one[m][cell]["per_episode"]
            assert (a["progress"], a["success"], a["steps"]) == (b["progress"], b["success"], b["steps"])
            assert np.allclose(a["final_state"], b["final_state"], atol=1e-5)
    assert res_all["event_oracle"][("push", "seen")]["per_episode"] != res_all["event_oracle"][("pick_place", "seen")]["per_episode"]
    assert E.compare(str(tmp_path / "one.json"), str(tmp_path / "all.json"))[("baseline", "baseline")][-1]["progress"][0] == 0.0
    # refusals, each naming the problem
    with pytest.raises(ValueError, match="at least two files"):
        E.merge(str(tmp_path / "x.json"), (str(tmp_path / "push.json"),))
    with pytest.raises(ValueError, match="cell push/seen is in both"):
        E.merge(str(tmp_path / "x.json"), (str(tmp_path / "push.json"), str(tmp_path / "all.json")))
    rep = json.load(open(tmp_path / "push.json"))
    for name, change in (("seed", dict(seed=5)), ("modes", None), ("hole", dict(splits=["distractors"]))):
        r = json.loads(json.dumps(rep))
        r["settings"] |= change or {}
        if name == "modes":
            del r["closed_loop"]["baseline"]
        if name == "hole":
            r["closed_loop"] = {m: {"push/distractors": c["push/seen"]} for m, c in r["closed_loop"].items()}
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    msg = {"seed": "not parts of one table: seed: 2 in .*pick_place.json, 5 in .*seed.json",
           "modes": r"modes \['baseline', 'event_oracle'\] in .*, \['event_oracle'\] in .*modes.json",
           "hole": "do not make a whole table of families x splits: no cell pick_place/distractors"}
    for name, m in msg.items():
        with pytest.raises(ValueError, match=m):
            E.merge(str(tmp_path / "x.json"), (str(tmp_path / "pick_place.json"), str(tmp_path / f"{name}.json")))
    assert not os.path.exists(tmp_path / "x.json")                     # nothing written for a refused merge
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "merge", str(tmp_path / "x.json"),
                        str(tmp_path / "pick_place.json"), str(tmp_path / "seed.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error: not parts of one table" in r.stderr and "Traceback" not in r.stderr


# --- two processes against one: the same episodes, the same results ---
def test_two_processes_evaluate_like_one(run, tmp_path):
    kw = dict(episodes=2, families=("pick_place", "push"), splits=("seen",), modes=("event_oracle", "unified_latents"),
              horizon=10, seed=1, image_size=32)
    one = E.evaluate(run, **kw)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "eval.py"),
           "--ckpt", run, "--json-out", str(tmp_path / "two.json")]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, tuple) else (v,))]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("| pick_place | seen |") == 1   # rank 0 alone prints
    two = json.load(open(tmp_path / "two.json"))
    assert len(two["settings"].pop("commit")) in (40, 7)                   # a git hash, or "unknown" outside a clone
    assert two["settings"] == {"env": "tabletop", **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items() if k != "modes"},
                               "ckpt": run, "sampling": {"video_steps": 0, "cone_sampling": None, "guidance": 1.0}}
    two = two["closed_loop"]
    states = []
    for mode in kw["modes"]:
        for f in kw["families"]:
            a, b = one[mode][(f, "seen")]["per_episode"], two[mode][f"{f}/seen"]["per_episode"]
            assert (a["progress"], a["success"], a["steps"]) == (b["progress"], b["success"], b["steps"])
            assert np.allclose(a["final_state"], b["final_state"], atol=1e-5), (mode, f, a, b)
            states += a["final_state"]
    assert len({tuple(s) for s in states}) == len(states)   # every episode ends elsewhere: the comparison can fail


# --- video metrics on known inputs ---
def test_psnr_and_ssim_on_known_inputs():
    rng = np.random.default_rng(0)
    img = rng.integers(20, 236, (2, 24, 24, 3)).astype(np.uint8)
    assert np.all(E.psnr(img, img) == E.PSNR_CAP) and np.allclose(E.ssim(img, img), 1, atol=1e-12)
    noisy = img.astype(int) + rng.choice([-10, 10], img.shape)      # |error| 10 everywhere: MSE 100
    assert np.allclose(E.psnr(noisy, img), 10 * np.log10(255 ** 2 / 100))
    assert np.all(E.ssim(noisy, img) < 0.99) and np.allclose(E.ssim(noisy, img), E.ssim(img, noisy))
    a, b = np.full((16, 16, 3), 100.0), np.full((16, 16, 3), 150.0)   # flat images: only the luminance term
    c1 = (0.01 * 255) ** 2
    assert np.isclose(E.ssim(a, b), (2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1))
    x, y = img[0, :13, :12].astype(float), noisy[0, :13, :12].astype(float)    # against a window-by-window loop
    g = E.gaussian_window(11, 1.5)
    w = np.outer(g, g)[..., None]
    vals = []
    for i in range(3):
        for j in range(2):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum((0, 1)), (w * py).sum((0, 1))
            vx, vy = (w * (px - mx) ** 2).sum((0, 1)), (w * (py - my) ** 2).sum((0, 1))
            cxy = (w * (px - mx) * (py - my)).sum((0, 1))
            c2 = (0.03 * 255) ** 2
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert np.isclose(E.ssim(x, y), np.mean(vals))


# --- PNG strips ---
def read_png(path):
    """The tiny decoder the strips need: 8-bit RGB, one IDAT stream, every row with filter 0 (save_png's form)."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(raw):
        n, tag = struct.unpack(">I4s", raw[pos:pos + 8])
        body = raw[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", raw[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert np.all(rows[:, 0] == 0)
    return rows[:, 1:].reshape(h, w, 3)


def test_strips_are_pngs_of_the_expected_size_and_a_run_directory_is_scored_whole(run, tmp_path):
    out = str(tmp_path / "strips")
    E.main(run, episodes=0, families=("push",), splits=("seen",), horizon=6, image_size=32, open_loop_root=data_root(run),
           open_loop_events=4, strips=out, strip_episodes=1, json_out=str(tmp_path / "r.json"), caption_swaps=2)
    report = json.load(open(tmp_path / "r.json"))            # the segmenter on every open-loop window's episode
    assert [n for n, r in report["open_loop"].items() if "caption_swap" in r] == ["stage2", "stage5"]   # not the baseline
    scored = set().union(*(r["episodes"] for r in report["open_loop"].values()))
    assert len(scored) > len(report["open_loop"]["stage6"]["episodes"])   # (these 4 windows: not the last file's alone)
    assert report["segmentation"]["episodes"] == len(scored) and len(report["open_loop"]) == 3
    names = sorted(os.listdir(out))
    events = [f"{s}_event0_view{v}.png" for s in ("stage2", "stage5", "stage6") for v in (0, 1)]
    assert names == sorted(events + ["rollout_event_oracle_push.png"])
    for name in events:                                  # keyframe + F future frames wide, predicted over true
        img = read_png(os.path.join(out, name))
        assert img.shape[0] == 2 * 64 and img.shape[1] % 64 == 0 and img.shape[1] >= 2 * 64
        assert np.array_equal(img[:64, :64], img[64:, :64])             # the observed keyframe starts both rows
    strip = read_png(os.path.join(out, "rollout_event_oracle_push.png"))
    assert strip.shape == (2 * 32 * 2, 8 * 32 * 2, 3)                  # 2 views stacked, 8 frames, scale 2
    task = E.episode_tasks(("push",), ("seen",), 1, 0)[0][2]
    first = world.TabletopEnv([task], world.WorldConfig(image_size=32)).observe()["frames"][0]
    assert np.array_equal(strip[:, :64], np.concatenate(list(first), 0).repeat(2, 0).repeat(2, 1))


def test_recorded_data_builds_windows_as_the_checkpoint_did(run, policy):
    """Open loop, event_heads and the caption swap read a dataset through recorded_data: the
    checkpoint's action targets and caption drop (training settings, so a checkpoint trained with
    --data.action-offsets or --data.no-caption-drop is not refused), and its state statistics (the
    model's input, on held-out data too); the recorded actions keep the data's own statistics."""
    import copy
    import dataclasses
    root = data_root(run)
    other = copy.copy(policy)
    other.cfg = dataclasses.replace(policy.cfg, action_offsets=True, rho_min=0.0, rho_max=0.0)
    other.stats = dict(policy.stats, state={k: v + 1 for k, v in policy.stats["state"].items()})
    ds, own = E.recorded_data(other, root), data.Dataset(root)
    assert ds.cfg == other.cfg and "offset" in ds.stats
    np.testing.assert_array_equal(ds.stats["state"]["mean"], other.stats["state"]["mean"])
    np.testing.assert_array_equal(ds.stats["action"]["mean"], own.stats["action"]["mean"])
    other.cfg = dataclasses.replace(policy.cfg, k_p=2)                   # a layout field: refused
    with pytest.raises(ValueError, match="is not the checkpoint's"):
        E.recorded_data(other, root)


def test_episode_counts_past_the_seed_ranges_are_refused():
    with pytest.raises(ValueError, match="episodes: 0..100 per cell"):
        E.episode_tasks(("push",), ("seen",), 101, 0)
    with pytest.raises(ValueError, match="MT1's 50 held-out configurations of seed 1000; found 51"):
        E.evaluate_metaworld("runs/none", ("pick-place",), episodes=51)


def test_claims_table_maps_cells_onto_the_reports_suites(tmp_path):
    """Each suite averages exactly its cells (SUITE_CELLS), event mode minus the baseline is paired
    episode by episode, a suite with a cell missing is left out, and `claims` refuses what it cannot map."""
    cell = lambda p: {"episodes": len(p), "per_episode": {"progress": p, "success": [x == 100 for x in p]}}   # noqa: E731
    fams, splits = world.FAMILIES, world.SPLITS
    # progress: 10 x (family index) on seen, 1 on the other splits; the baseline 5 below event_oracle
    ev = {(f, s): cell([10.0 * i if s == "seen" else 1.0, 10.0 * i if s == "seen" else 1.0])
          for i, f in enumerate(fams) for s in splits}
    base = {c: cell([x - 5 for x in v["per_episode"]["progress"]]) for c, v in ev.items()}
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in E.claims_table({"event_oracle": ev, "baseline": base}).splitlines()[2:]}
    assert list(rows) == ["Diverse", "Reasoning", "Dexterous", "Generalization"]
    mean = lambda names: np.mean([10.0 * fams.index(f) for f in names])                                 # noqa: E731
    assert rows["Diverse"][3].startswith(f"{mean(fams):.1f} [") and rows["Generalization"][3].startswith("1.0 [1.0, 1.0]")
    assert rows["Reasoning"][3].startswith(f"{mean(('press_order', 'put_all')):.1f} [")
    assert rows["Dexterous"][3].startswith(f"{mean(('pick_place', 'stack')):.1f} [")
    assert all(r[-1].strip(" |") == "+5.0 [+5.0, +5.0]" for r in rows.values())                     # paired: exactly 5
    assert rows["Reasoning"][2] == "71.6 / 59.5 / 56.4"
    part = {m: {c: v for c, v in r.items() if c[1] == "seen"} for m, r in {"event_oracle": ev, "baseline": base}.items()}
    assert [r.split(" | ")[0].strip("| ") for r in E.claims_table(part).splitlines()[2:]] == ["Diverse", "Reasoning", "Dexterous"]
    st = dict(env="tabletop", families=["push"], splits=["seen"], episodes=2, horizon=300, seed=0, image_size=64)
    E.write_report(str(tmp_path / "push.json"), {"closed_loop": E.as_json({"baseline": {("push", "seen"): base[("push", "seen")]}})}, **st, ckpt="r")
    with pytest.raises(ValueError, match=r"push.json: no suite has all its cells \(\['push'\] x \['seen'\] evaluated; Diverse: pick_place"):
        E.claims(str(tmp_path / "push.json"))
    # the ablation: event mode against a baseline without cross-view on the same episodes, 3 points lower
    full = dict(env="tabletop", families=list(fams), splits=list(splits), episodes=2, horizon=300, seed=0, image_size=64)
    off = {c: cell([x - 3 for x in v["per_episode"]["progress"]]) for c, v in ev.items()}
    E.write_report(str(tmp_path / "a.json"), {"closed_loop": E.as_json({"event_oracle": ev, "baseline": base})}, **full, ckpt="a")
    E.write_report(str(tmp_path / "b.json"), {"closed_loop": E.as_json({"baseline": off})}, **full, ckpt="b")
    abl = E.claims(str(tmp_path / "a.json"), without_cross_view=str(tmp_path / "b.json")).split("\n\n")[1].splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in abl] == ["Reasoning", "Generalization"]
    assert all(r.split(" | ")[-1].strip(" |") == "+3.0 [+3.0, +3.0]" for r in abl) and abl[0].split(" | ")[1] == "71.6 / 32.6"
    E.write_report(str(tmp_path / "c.json"), {"closed_loop": E.as_json({"baseline": off})}, **{**full, "horizon": 200}, ckpt="c")
    with pytest.raises(ValueError, match="not the same episodes, so no paired ablation: horizon: 300 in"):
        E.claims(str(tmp_path / "a.json"), without_cross_view=str(tmp_path / "c.json"))
    dex = dict(full, families=["pick_place", "stack"], splits=["seen"])   # the Dexterous cells only: no ablation suite
    cells = lambda r: {c: v for c, v in r.items() if c in {("pick_place", "seen"), ("stack", "seen")}}    # noqa: E731
    E.write_report(str(tmp_path / "d.json"), {"closed_loop": E.as_json({"event_oracle": cells(ev), "baseline": cells(base)})}, **dex, ckpt="d")
    E.write_report(str(tmp_path / "e.json"), {"closed_loop": E.as_json({"baseline": cells(off)})}, **dex, ckpt="e")
    with pytest.raises(ValueError, match=r"no suite of the ablation \(Reasoning, Generalization\) has all its cells"):
        E.claims(str(tmp_path / "d.json"), without_cross_view=str(tmp_path / "e.json"))


@pytest.mark.parametrize("command", [["eval.py", "--ckpt", "NONE", "--episodes", "1"], ["infer.py", "--ckpt", "NONE"]])
def test_command_line_errors_are_one_line(tmp_path, command):
    """A checkpoint that is not there: one line naming it, no traceback, exit status 1."""
    missing = str(tmp_path / "no-run")
    r = subprocess.run([sys.executable] + [missing if c == "NONE" else c for c in command], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith(f"error: {missing}: not a readable checkpoint")
