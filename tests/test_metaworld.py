"""Meta-World (optional extra): an episode through the episode format with cameras in the project's
convention, the phase-to-event map on the nine tasks, and a two-episode closed-loop evaluation.
Skipped, with the reason, when the extra is not installed."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")          # before mujoco is first imported (env.py does the same, lazily)
pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install -r requirements-metaworld.txt")
mujoco = pytest.importorskip("mujoco", reason="Meta-World is an optional extra: pip install -r requirements-metaworld.txt")
try:                                              # headless OpenGL: EGL or OSMesa (README, Meta-World)
    mujoco.Renderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 8, 8).close()
except Exception as e:                            # noqa: BLE001 (any backend failure means: no rendering here)
    pytest.skip(f"no headless OpenGL for MuJoCo (MUJOCO_GL={os.environ['MUJOCO_GL']}; install libegl1 or "
                f"libosmesa6): {e}", allow_module_level=True)

import data                                       # noqa: E402
import env as world                               # noqa: E402
import eval as evaluation                         # noqa: E402
import model as M                                 # noqa: E402
import train                                      # noqa: E402


def nested(inner, outer):
    """Every interval of `inner` lies inside one interval of `outer`, and both tile the same range."""
    tiles = lambda level: [(c["start"], c["end"]) for c in level]             # noqa: E731
    for level in (inner, outer):
        t = tiles(level)
        assert t[0][0] == 0 and all(a[1] == b[0] for a, b in zip(t, t[1:])) and all(s < e for s, e in t)
    assert tiles(inner)[-1][1] == tiles(outer)[-1][1]
    return all(any(s >= a and e <= b for a, b in tiles(outer)) for s, e in tiles(inner))


@pytest.fixture(scope="module")
def droot(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mw"))
    data.generate(out, source="metaworld", tasks="pick-place", episodes_per_task=1, image_size=32)
    return out


def test_an_episode_round_trips_with_cameras_in_the_project_convention(droot):
    ds = data.Dataset(droot)
    assert len(ds) == 1 and ds.index["world_version"] == world.MW_VERSION
    T, m = ds.length(0), ds.episode_meta(0)
    frames, state, action = ds.get(0, "frames"), ds.get(0, "state"), ds.get(0, "action")
    intr, pose = ds.get(0, "intrinsics").astype(np.float64), ds.get(0, "cam_pose").astype(np.float64)
    assert frames.shape == (T + 1, 2, 32, 32, 3) and frames.dtype == np.uint8
    assert state.shape == (T + 1, world.MW_STATE_DIM) and action.shape == (T, 4) and np.abs(action).max() <= 1
    assert m["success"] and m["instruction"] in world.MW_INSTRUCTIONS["pick-place"]
    assert np.abs(state[:, 4:] - state[0, 4:]).max() == 0 and np.abs(state[0, 4:]).sum() > 0   # pick-place: the goal
    # captions nest strictly: L0 in L1 in L2 in L3, each level tiling the episode's actions
    caps = m["captions"]
    assert nested(caps["L0"], caps["L1"]) and nested(caps["L1"], caps["L2"]) and nested(caps["L2"], caps["L3"])
    # poses: rigid transforms; the hand (state xyz) in front of both cameras and inside both images
    R = pose[..., :3, :3]
    assert np.allclose(R @ np.swapaxes(R, -1, -2), np.eye(3), atol=1e-5) and np.allclose(np.linalg.det(R), 1, atol=1e-5)
    assert np.allclose(pose[..., 3, :], [0, 0, 0, 1])
    assert np.allclose(pose[:, 0], pose[0, 0]) and not np.allclose(pose[:, 1], pose[0, 1])   # the wrist camera moves
    for t in range(T + 1):
        for v in range(2):
            uv, z = world.project(state[t, :3].astype(np.float64), intr[v], pose[t, v])
            assert z > 0.02 and ((uv >= 0) & (uv <= 31)).all(), (t, v, uv, z)
    # the rest of the pipeline reads it unchanged: windows, clustering features, the segmenter
    windows = data.event_windows(ds)
    assert windows and all(w["state"].shape == (1, world.MW_STATE_DIM) for w in windows)
    assert len(data.segment(None, state, action)) >= 1


def test_the_scene_camera_sees_the_hand_where_its_pose_projects_it():
    """Independent of the pose arithmetic: MuJoCo's segmentation image of the (rotated) scene view
    has the hand's geoms around the pixel where intrinsics and pose put the hand."""
    tk = world.mw_tasks("drawer-open", 0, 1)[0]
    env = world.MetaWorldEnv([tk], image_size=64)
    try:
        for _ in range(10):
            env.step(env.expert_action(0)[0][None], [0], render=False)
        mj, e = env.mujoco, env.envs[0]
        root = mj.mj_name2id(e.model, mj.mjtObj.mjOBJ_BODY, "right_hand")      # the wrist, hand and fingers

        def in_hand(b):
            while b > 0 and b != root:
                b = e.model.body_parentid[b]
            return b == root
        geoms = [g for g in range(e.model.ngeom) if in_hand(e.model.geom_bodyid[g])]
        r = env.renderer(0)
        r.enable_segmentation_rendering()
        r.update_scene(e.data, camera=env.cam_ids[tk.family][0], scene_option=env.option)
        seg = r.render()[::-1, ::-1]                             # the scene view is rotated by 180 degrees
        r.disable_segmentation_rendering()
        rows, cols = np.nonzero(np.isin(seg[..., 0], geoms) & (seg[..., 1] == mj.mjtObj.mjOBJ_GEOM))
        assert len(rows) > 3
        o = env.observe([0], render=False)
        (u, v), z = world.project(e.data.body("hand").xpos.copy(), env.intrinsics[0].astype(np.float64),
                                  o["cam_pose"][0, 0].astype(np.float64))
        assert z > 0 and cols.min() - 2 <= u <= cols.max() + 2 and rows.min() - 2 <= v <= rows.max() + 2, \
            ((u, v), (cols.min(), cols.max()), (rows.min(), rows.max()))
    finally:
        env.close()


def test_the_phase_map_covers_every_phase_the_expert_visits():
    tasks = [tk for t in world.MW_TASKS for tk in world.mw_tasks(t, 0, 2)]
    episodes = world.run_metaworld_expert(tasks, render=False)
    for tk, ep in zip(tasks, episodes):
        phases = set(ep.meta["phases"])
        assert phases <= set(world.MW_SKILLS), (tk.family, phases - set(world.MW_SKILLS))
        assert ep.meta["success"], tk
        for c in ep.meta["captions"]["L1"]:
            assert c["text"] and c["skill"] in world.MW_SKILLS
            assert c["text"] in train.paraphrases(c), c                # paraphrases are found for the contrastive loss


def test_the_phase_changes_wherever_the_policy_switches_its_target():
    """The phase functions repeat the policies' branch tests: every jump of the policy's own target
    (its `_desired_pos`) of more than 5 cm falls on a change of phase. A carried or rolling object moves
    the target less than that per step. drawer-open's policy computes its target inline: not checked."""
    tasks = [world.mw_tasks(t, 0, 1)[0] for t in world.MW_TASKS if t != "drawer-open"]
    env = world.MetaWorldEnv(tasks)
    jumps = 0
    try:
        for i, tk in enumerate(tasks):
            policy, before = env.policies[i], None
            for _ in range(300):
                action, phase = env.expert_action(i)
                target = policy._desired_pos(policy._parse_obs(env.obs[i]))
                if before is not None and np.linalg.norm(target - before[0]) > 0.05:
                    assert phase != before[1], (tk.family, before[1])
                    jumps += 1
                before = (target, phase)
                env.step(action[None], [i], render=False)
                if env.success[i]:
                    break
    finally:
        env.close()
    assert jumps >= 2 * len(tasks)


def tiny_run(path):
    """A run directory with an untrained tiny model for Meta-World's state: stages 4, 5 and 6."""
    cfg = M.PRESETS["tiny"]
    cfg = dataclasses.replace(cfg, action=dataclasses.replace(cfg.action, state_dim=world.MW_STATE_DIM))
    stats = {"state": {"mean": np.zeros(world.MW_STATE_DIM), "std": np.ones(world.MW_STATE_DIM)},
             "action": {"mean": np.zeros(4), "std": np.ones(4)}}
    m = M.WallWM(cfg)
    ema = {k: v.detach().clone() for k, v in m.named_parameters()}
    for stage in (4, 5, 6):                          # event modes read stage 4, unified mode 5, the baseline 6
        train.write_weights(str(path / f"stage{stage}.safetensors"), m, ema, stats, stage, None)
    return str(path)


def test_a_two_episode_closed_loop_evaluation_runs(tmp_path):
    tiny_run(tmp_path)
    res = evaluation.evaluate_metaworld(str(tmp_path), ("button-press-topdown",), episodes=2, horizon=12, image_size=32)
    assert set(res) == set(evaluation.MW_MODES)
    for mode in evaluation.MW_MODES:
        cell = res[mode][("button-press-topdown", evaluation.MW_SPLIT)]
        assert cell["episodes"] == 2 and 0 <= cell["success"] <= 1
        assert cell["success_ci"][0] <= cell["success"] <= cell["success_ci"][1]
        assert set(cell) >= {"success", "success_ci", "progress", "progress_ci", "per_episode"}
    assert "button-press-topdown" in evaluation.table(res, ("button-press-topdown",), (evaluation.MW_SPLIT,))
    # under torchrun the configurations are sharded across two processes: the same per-episode results
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py", "--env", "metaworld",
           "--ckpt", str(tmp_path), "--tasks", "button-press-topdown", "--episodes", "2", "--horizon", "12",
           "--image-size", "32", "--json-out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.load(open(out))
    assert two["settings"]["env"] == "metaworld" and two["settings"]["families"] == ["button-press-topdown"]
    same = evaluation.compare(str(out), str(out))                     # the file reads back: every mode against itself
    assert list(same) == [(m, m) for m in evaluation.MW_MODES] and all(r[-1]["progress"][:2] == (0.0, (0.0, 0.0)) for r in same.values())
    two = two["closed_loop"]
    for mode in evaluation.MW_MODES:
        a = two[mode][f"button-press-topdown/{evaluation.MW_SPLIT}"]["per_episode"]
        b = res[mode][("button-press-topdown", evaluation.MW_SPLIT)]["per_episode"]
        assert a["progress"] == b["progress"] and a["success"] == b["success"]
        assert np.allclose(a["final_state"], b["final_state"], atol=1e-4)     # where each hand ended: not vacuous


def test_one_renderer_serves_every_configuration_of_a_task():
    """The renderer made from the first configuration's model draws another configuration (whose shelf
    stands elsewhere: Meta-World moves bodies in the model) exactly as that configuration's own model."""
    tasks = world.mw_tasks("shelf-place", 0, 2)
    env = world.MetaWorldEnv(tasks, image_size=32)
    try:
        shared = env.render([1])
        own = world.MetaWorldEnv(tasks[1:], image_size=32)
        try:
            assert not np.allclose(env.envs[0].model.body_pos, env.envs[1].model.body_pos)
            assert np.array_equal(shared, own.render([0]))
        finally:
            own.close()
    finally:
        env.close()


def test_the_expert_lookahead_is_the_future_and_leaves_the_world_as_it_was():
    """MetaWorldEnv.expert_future (the _told modes): world A looks ahead at every model call of the
    rollout, world B (the same configuration) never does. Both follow the noise-free expert. The
    lookahead's actions, states and frames are what B then does and shows; an event lookahead ends
    where the phase changes (or at its limit); and A goes on exactly as B, bit for bit."""
    tk = world.mw_tasks("pick-place", world.MW_EVAL_SEED, 1, "held_out")
    a, b = world.MetaWorldEnv(tk, image_size=32), world.MetaWorldEnv(tk, image_size=32)
    try:
        t, k_p, calls = 0, 4, 0
        while t < 90:
            steps = None if calls % 2 == 0 else 8                       # an event, then a fixed chunk
            acts, future = a.expert_future(0, steps, limit=24, k_p=k_p)
            blind, none = a.expert_future(0, steps, limit=24, k_p=k_p, frames=False)   # event_timed's
            assert np.array_equal(blind, acts) and none is None
            first = b.expert_action(0)[1]
            assert len(acts) == 8 if steps else 1 <= len(acts) <= 24
            assert len(future) == -(-len(acts) // k_p)
            done = []
            for j, act in enumerate(acts):
                want, phase = b.expert_action(0)
                done.append(want)
                assert np.array_equal(act, want.astype(np.float32)), (t, j)
                assert steps or phase == first
                o = b.step(want[None], [0], render=True)
                if (j + 1) % k_p == 0 or j + 1 == len(acts):
                    f = future[j // k_p]
                    assert np.array_equal(f["state"], o["state"][0]) and np.array_equal(f["frames"], o["frames"][0])
                    assert np.array_equal(f["cam_pose"], o["cam_pose"][0])
            if steps is None and len(acts) < 24:
                assert b.expert_action(0)[1] != first                  # the event ended at the phase change
            for want in done:                                           # A now does what B did
                oa = a.step(want[None], [0], render=True)
            assert np.array_equal(a.obs[0], b.obs[0]) and a.success[0] == b.success[0]
            assert np.array_equal(oa["frames"], o["frames"]) and np.array_equal(oa["cam_pose"], o["cam_pose"])
            t, calls = t + len(acts), calls + 1
        assert calls >= 4
    finally:
        a.close()
        b.close()


def test_the_told_modes_hand_the_policy_the_expert_lookahead(tmp_path, monkeypatch):
    """event_told and baseline_told on Meta-World: every model call gets the noise-free expert's future
    frames (an event: the rest of its phase, its length; a chunk: N k_p steps), the other modes none."""
    from infer import Policy
    seen = []

    def spy(name):
        real = getattr(Policy, name)

        def call(self, *args, **kw):
            seen.append((name, args[3] if name == "event_actions" else None, kw.get("futures")))
            return real(self, *args, **kw)
        return call
    for name in ("event_actions", "chunk_actions"):
        monkeypatch.setattr(Policy, name, spy(name))
    res = evaluation.evaluate_metaworld(tiny_run(tmp_path), ("drawer-open",), episodes=2, horizon=20, image_size=32,
                                        modes=("event_oracle", "event_told", "baseline_told"))
    cfg = Policy.from_checkpoint(str(tmp_path)).cfg
    assert [r[("drawer-open", evaluation.MW_SPLIT)]["episodes"] for r in res.values()] == [2, 2, 2]
    told = [(n, lengths, fut) for n, lengths, fut in seen if fut is not None]
    assert told and len(told) < len(seen)                             # event_oracle's calls carry no future
    assert {n for n, _, _ in told} == {"event_actions", "chunk_actions"}
    for name, lengths, futures in told:
        lengths = lengths or [cfg.chunk_frames * cfg.k_p] * len(futures)
        for n, fut in zip(lengths, futures):
            assert 1 <= n <= cfg.max_event_len and len(fut) == -(-n // cfg.k_p)
            assert fut[0]["frames"].shape == (2, 32, 32, 3) and fut[0]["frames"].std() > 0    # rendered frames
