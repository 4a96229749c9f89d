"""The embedded world: determinism, cameras, tasks and splits, expert, captions, progress, batching."""
import copy
import pickle

import numpy as np
import pytest

import env


def test_tasks_and_episodes_are_deterministic_from_a_seed():
    a, b = env.make_task("put_all", "seen", 3), env.make_task("put_all", "seen", 3)
    assert a.instruction == b.instruction and np.array_equal(a.pos, b.pos)
    assert env.make_task("put_all", "seen", 4).instruction != a.instruction or not np.array_equal(
        env.make_task("put_all", "seen", 4).pos, a.pos)
    e1, e2 = (env.run_expert([env.make_task("stack", "seen", 7)])[0] for _ in range(2))
    assert np.array_equal(e1.frames, e2.frames) and np.array_equal(e1.action, e2.action)
    assert e1.meta["captions"] == e2.meta["captions"]


@pytest.mark.parametrize("view", [0, 1])
def test_project_and_unproject_round_trip(view):
    cams = env.make_cameras(64)
    origin = env.SCENE_ORIGIN if view == 0 else np.array([0.05, 0.2, 0.1]) + env.WRIST_OFFSET
    pose = cams[view].pose(origin)
    point = np.array([0.03, 0.21, 0.01])
    uv, depth = env.project(point, cams[view].intrinsics, pose)
    assert depth > 0 and (0 <= uv).all() and (uv < 64).all()
    assert np.allclose(env.unproject(uv, depth, cams[view].intrinsics, pose), point, atol=1e-9)
    # the pose is a rotation with OpenCV axes: camera z looks down at the table (negative world z)
    R = pose[:3, :3]
    assert np.allclose(R.T @ R, np.eye(3)) and np.isclose(np.linalg.det(R), 1) and R[2, 2] < 0


def test_wrist_footprint_shrinks_as_the_gripper_descends():
    wrist = env.make_cameras(64)[1]
    corners = np.array([[0, 0], [63, 0], [63, 63], [0, 63]], float)

    def footprint(height):          # area of the image's footprint on the table plane
        pose = wrist.pose(np.array([0.0, 0.2, height]) + env.WRIST_OFFSET)
        fx, fy, cx, cy = wrist.intrinsics
        rays = np.stack([(corners[:, 0] - cx) / fx, (corners[:, 1] - cy) / fy, np.ones(4)], 1) @ pose[:3, :3].T
        pts = pose[:3, 3] + rays * (-pose[2, 3] / rays[:, 2:3])
        x, y = pts[:, 0], pts[:, 1]
        return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))

    areas = [footprint(h) for h in (0.2, 0.12, 0.05)]
    assert areas[0] > areas[1] > areas[2] > 0


def test_renderer_draws_a_block_where_the_camera_projects_it():
    task = env.make_task("pick_place", "seen", 0)
    e = env.TabletopEnv([task])
    frames = e.observe()["frames"][0]
    block = task.pos[task.subgoals[0][1]]
    top = block + [0, 0, env.BLOCK_H]                 # the middle of its top face
    u, v = np.round(env.project(top, e.intrinsics[0], e.cam_poses([0])[0, 0])[0]).astype(int)
    colour = np.array(env.COLOURS[task.colours[task.subgoals[0][1]]])
    assert np.abs(frames[0, v, u].astype(int) - colour).max() <= 2       # a top face is unshaded
    assert frames.shape == (2, 64, 64, 3) and frames.dtype == np.uint8


def _dense_labels(cam, origins, lo, hi):
    """The renderer's reference: every box tested at every pixel, one box at a time (no windows)."""
    B, N = lo.shape[:2]
    a, b, e = cam.rays()
    depth, code = env._table(cam, origins)
    key = (depth + (3 * N + 3) * np.arange(B)[:, None] + 3 * N)[..., None] + code        # (B, H, W)
    with np.errstate(divide="ignore", invalid="ignore"):
        for w, n in np.ndindex(B, N):
            def slab(i, d):
                t1, t2 = (lo[w, n, i] - origins[w, i]) * (1 / d), (hi[w, n, i] - origins[w, i]) * (1 / d)
                return np.minimum(t1, t2).astype(np.float32), np.maximum(t1, t2).astype(np.float32)
            (cn, cf), (yn, yf), (zn, zf) = slab(0, a), slab(1, b), slab(2, e)
            rn, rf = np.maximum(np.maximum(yn, zn), 1e-6)[:, None], np.minimum(yf, zf)[:, None]
            near = np.maximum(cn, rn)                                                      # (H, W)
            face = np.where(cn >= rn, 0, np.where(zn >= yn, 2, 1)[:, None])
            box = (near.view(np.int32).astype(np.int64) << 32) | ((3 * N + 3) * w + 3 * n + face)
            hit = (near < np.minimum(cf, rf)) & (hi[w, n] > lo[w, n]).all()
            key[w] = np.where(hit, np.minimum(key[w], box), key[w])
    return key & 0xFFFFFFFF


@pytest.mark.parametrize("view", [0, 1])
def test_windowed_renderer_matches_a_dense_reference(view):
    rng = np.random.default_rng(view)
    cam = env.make_cameras(48)[view]
    B, N = 4, 9
    origins = np.broadcast_to(env.SCENE_ORIGIN, (B, 3)) if view == 0 else rng.uniform([-0.1, 0.1, 0.06], [0.1, 0.3, 0.25], (B, 3))
    lo = rng.uniform([-0.25, -0.05, 0], [0.25, 0.45, 0.1], (B, N, 3))
    if view == 1:                                                   # near the wrist camera: large windows
        lo[..., :2] = origins[:, None, :2] + rng.uniform([-0.12, -0.08], [0.06, 0.1], (B, N, 2))
    hi = lo + rng.uniform(0.005, 0.12, (B, N, 3))
    hi[:, -1] = lo[:, -1]                                           # empty boxes (padding)
    lo[:, 0], hi[:, 0] = origins - [0.05, 0.05, -0.01], origins + 0.05   # corners behind the camera
    lo[:, 1], hi[:, 1] = lo[:, 2], hi[:, 2]                         # equal depths: the lower label wins
    assert np.array_equal(env._labels(cam, origins, lo, hi), _dense_labels(cam, origins, lo, hi))


@pytest.mark.parametrize("family", env.FAMILIES)
def test_expert_succeeds_in_every_split(family):
    tasks = [env.make_task(family, split, s, recovery_alpha=0.3) for split in env.SPLITS for s in range(4)]
    eps = env.run_expert(tasks, render=False)
    assert all(e.meta["success"] for e in eps), [(e.meta["split"], e.meta["seed"]) for e in eps if not e.meta["success"]]
    assert all(e.progress[-1] == 100 for e in eps)


def _nests(inner, outer, T):
    for level in (inner, outer):                      # each level partitions [0, T) in order
        assert level[0]["start"] == 0 and level[-1]["end"] == T
        assert all(a["end"] == b["start"] for a, b in zip(level, level[1:]))
        assert all(c["end"] > c["start"] for c in level)
    for c in inner:
        assert any(p["start"] <= c["start"] and c["end"] <= p["end"] for p in outer), c


def test_captions_nest_and_cover_the_episode():
    tasks = [env.make_task(f, "seen", s) for f in env.FAMILIES for s in range(3)]
    for ep in env.run_expert(tasks, env.WorldConfig(slip_prob=0.5), render=False):
        caps, T = ep.meta["captions"], len(ep.action)
        _nests(caps["L0"], caps["L1"], T)
        _nests(caps["L1"], caps["L2"], T)
        _nests(caps["L2"], caps["L3"], T)
        assert len(caps["L3"]) == 1 and caps["L3"][0]["text"] == ep.meta["instruction"]
        assert all({"text", "skill", "object", "target"} <= set(c) for lv in caps.values() for c in lv)
        # a reasoning trace at every L1 boundary, naming what comes next
        assert [r["frame"] for r in ep.meta["reasoning"]] == [c["start"] for c in caps["L1"]]
        assert all("; next: " in r["text"] for r in ep.meta["reasoning"])
        assert ep.labels["l1"].shape == (T + 1,) and ep.labels["l1"][-1] == len(caps["L1"]) - 1


def test_slips_produce_recovery_segments():
    tasks = [env.make_task("pick_place", "seen", s) for s in range(12)]
    eps = env.run_expert(tasks, env.WorldConfig(slip_prob=0.6), render=False)
    assert all(ep.meta["success"] for ep in eps) and sum(ep.meta["slips"] > 0 for ep in eps) >= 3
    for ep in eps:
        regrasp = any(c["text"].startswith("re-grasp after slip") for c in ep.meta["captions"]["L0"])
        assert regrasp == (ep.meta["slips"] > 0) and ep.labels["recovery"].any() == (ep.meta["slips"] > 0)


def test_recovery_augmentation_starts_near_a_contact_pose():
    task = env.make_task("pick_place", "seen", 0, recovery_alpha=1.0)
    assert task.recovery_start
    block = task.pos[task.subgoals[0][1]]
    assert np.hypot(*(task.gripper_start[:2] - block[:2])) < 0.04 and task.gripper_start[2] < env.SAFE_Z - 0.05
    ep = env.run_expert([task], render=False)[0]
    assert ep.meta["success"] and ep.meta["captions"]["L1"][0]["recovery"] == "start"


def test_splits_never_leak_held_out_parts_into_training():
    n_train = {f: len(t) - env.N_HELD_TEMPLATES for f, t in env.TEMPLATES.items()}
    for fam in env.FAMILIES:
        for s in range(25):
            seen = env.make_task(fam, "seen", s)
            assert not set(map(tuple, seen.named)) & env.HELD_OUT[fam]
            assert seen.template < n_train[fam] and len(seen.kinds) <= env.TRAIN_MAX_OBJECTS
            unseen = env.make_task(fam, "unseen_combos", s)
            assert set(map(tuple, unseen.named)) & env.HELD_OUT[fam] and unseen.template < n_train[fam]
            para = env.make_task(fam, "paraphrase", s)
            assert para.template >= n_train[fam] and not set(map(tuple, para.named)) & env.HELD_OUT[fam]
            dist = env.make_task(fam, "distractors", s)
            assert len(dist.kinds) > env.TRAIN_MAX_OBJECTS and not set(map(tuple, dist.named)) & env.HELD_OUT[fam]
    # held-out templates never appear in a training instruction
    held = {t.split("{")[0] for f in env.FAMILIES for t in env.TEMPLATES[f][-env.N_HELD_TEMPLATES:]}
    for fam in env.FAMILIES:
        for s in range(25):
            instr = env.make_task(fam, "seen", s).instruction
            assert not any(instr.startswith(h) and h for h in held if len(h) > 6), instr


def test_a_reversed_stack_is_not_a_stack():
    """The named block must end on the target block, not the target on the named block."""
    task = env.make_task("stack", "seen", 5)
    w = env.World(task, env.WorldConfig())
    obj, tgt = task.subgoals[0][1], task.subgoals[0][2]
    w.pos[tgt] = w.pos[obj] + [0, 0, 2 * env.BLOCK_H]
    assert not w.subgoal_done(0)
    w.pos[obj] = w.pos[tgt] + [0, 0, 2 * env.BLOCK_H]
    assert w.subgoal_done(0)


def test_a_block_on_the_bowl_floor_is_in_the_bowl():
    """Success in a bowl means where the physics puts a block on its floor (support), no stricter."""
    task = env.make_task("pick_place", "seen", 3)
    w = env.World(task, env.WorldConfig())
    obj, tgt = task.subgoals[0][1], task.subgoals[0][2]
    for off in (0.0, 0.03, 0.042, 0.05):
        w.pos[obj, :2] = w.pos[tgt, :2] + [off, 0]
        w._drop(obj)
        on_floor = abs(w.pos[obj, 2] - (env.BOWL_FLOOR + env.BLOCK_H)) < 1e-9
        assert on_floor == (off < env.BOWL_IN) and w.subgoal_done(0) == on_floor


@pytest.mark.parametrize("bad, message", [
    (np.full((1, 4), np.nan), "NaN or inf"),
    (np.zeros((1, 3)), "shape (1, 4)"),
    (np.zeros(4), "shape (1, 4)"),
    (np.array([["a", "b", "c", "d"]]), "numeric"),
])
def test_invalid_actions_raise_a_clear_error(bad, message):
    e = env.TabletopEnv([env.make_task("push", "seen", 0)])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        e.step(bad)


def test_progress_only_drops_at_a_scripted_slip_and_ends_at_100():
    tasks = [env.make_task(f, "seen", s) for f in env.FAMILIES for s in range(4)]
    eps = env.run_expert(tasks, env.WorldConfig(slip_prob=0.5), render=False)
    slips = 0
    for ep in eps:
        drops = np.flatnonzero(np.diff(ep.progress) < 0) + 1               # frames where progress fell
        skill = ep.labels["skill"]
        for t in drops:                                                  # the block left the fingers mid-lift
            assert ep.labels["held"][t - 1] == 1 and ep.labels["held"][t] == 0
            assert env.SKILLS[skill[t - 1]] == "lift"
        slips += len(drops)
        assert ep.meta["success"] and ep.progress[-1] == 100
    assert slips > 0                                                     # the test saw slips at all


def test_oracle_planner_names_the_event_the_expert_executes():
    task = env.make_task("press_order", "seen", 2)
    ep = env.run_expert([task], render=False)[0]
    w = env.World(task, env.WorldConfig())
    starts = {c["start"]: c for c in ep.meta["captions"]["L1"]}
    for t, a in enumerate(ep.action):
        if t in starts:
            oracle = env.oracle_next_event(w)
            assert oracle["meaning"] == {k: starts[t][k] for k in ("skill", "object", "target")}
        w.step(a.astype(np.float64))
    assert w.success and env.oracle_next_event(w) is None


def test_expert_future_is_the_experts_own_continuation_and_leaves_the_world_alone():
    """From a fresh world the lookahead is the recorded episode's start: its next event up to the end
    of the event's motion (a trailing pause excluded), and the frames after every k_p-th action and
    after the last; with `steps`, exactly that many actions, across event boundaries. Mid-episode, the
    world it looks ahead from is left as it was."""
    cfg = env.WorldConfig(image_size=32)
    for family, seed in (("pick_place", 4), ("press_order", 2), ("push", 1)):
        task = env.make_task(family, "seen", seed)
        ep = env.run_expert([task], cfg)[0]
        first = ep.meta["captions"]["L1"][0]
        motion = max(c["end"] for c in ep.meta["captions"]["L0"] if c["text"] != "pause" and c["end"] <= first["end"])
        envs = env.TabletopEnv([task], cfg)
        acts, future = env.expert_future(envs.worlds[0], k_p=4)
        assert len(acts) == motion - first["start"] and np.array_equal(acts, ep.action[:len(acts)])
        blind, none = env.expert_future(envs.worlds[0], k_p=4, frames=False)     # event_timed's: the length only
        assert np.array_equal(blind, acts) and none is None
        assert len(future) == -(-len(acts) // 4)
        for f, o in enumerate(future):
            t = min(4 * (f + 1), len(acts))
            assert np.array_equal(o["frames"], ep.frames[t]) and np.array_equal(o["cam_pose"], ep.cam_pose[t])
            assert np.array_equal(o["state"], ep.state[t])
        n = len(acts) + 5                                  # past the first event
        acts, future = env.expert_future(envs.worlds[0], steps=n, k_p=4)
        assert len(acts) == n and np.array_equal(acts, ep.action[:n]) and np.array_equal(future[-1]["frames"], ep.frames[n])
        for a in ep.action[:n]:                            # mid-episode: nothing of the world moves
            envs.step(a[None])
        w = envs.worlds[0]
        before = envs.observe(), copy.deepcopy(vars(w))
        env.expert_future(w, k_p=4)
        after = envs.observe(), vars(w)
        assert all(np.array_equal(before[0][k], after[0][k]) for k in before[0])
        assert before[1].keys() == after[1].keys()
        assert all(pickle.dumps(v) == pickle.dumps(after[1][k]) for k, v in before[1].items())   # every field, rng included


def test_batched_and_single_stepping_give_identical_frames():
    tasks = [env.make_task(f, "seen", 1) for f in ("pick_place", "press_order", "push")]
    batched = env.run_expert(tasks, batch=3)
    for task, ep in zip(tasks, batched):
        single = env.run_expert([task], batch=1)[0]
        assert np.array_equal(single.frames, ep.frames) and np.array_equal(single.action, ep.action)
        assert np.array_equal(single.cam_pose, ep.cam_pose)


def test_episode_record_matches_the_interface():
    ep = env.run_expert([env.make_task("stack", "seen", 0)])[0]
    T = len(ep.action)
    assert ep.frames.shape == (T + 1, 2, 64, 64, 3) and ep.frames.dtype == np.uint8
    assert ep.state.shape == (T + 1, 4) and ep.action.shape == (T, 4) and ep.action.dtype == np.float32
    assert ep.intrinsics.shape == (2, 4) and ep.cam_pose.shape == (T + 1, 2, 4, 4)
    # the wrist camera rides on the gripper: its pose follows the recorded TCP
    assert np.allclose(ep.cam_pose[:, 1, :3, 3], ep.state[:, :3] + env.WRIST_OFFSET, atol=1e-5)
    assert np.allclose(ep.cam_pose[:, 0], ep.cam_pose[0, 0])
    assert (np.abs(ep.action) <= 1).all()
    for key in ("instruction", "family", "split", "seed", "world_version", "captions", "reasoning"):
        assert key in ep.meta


def test_meta_world_training_seeds_never_reach_the_evaluation_seed():
    """Training configurations come from MT1 seeds seed + k // 50; seed 1000's 50 are the evaluation's."""
    assert {t.seed for t in env.mw_tasks("hammer", 0, 120)} == {0, 1, 2}
    assert {t.seed for t in env.mw_tasks("hammer", 1000, 5, split="held_out")} == {1000}
    for seed, n in ((1000, 1), (999, 51), (990, 1000)):
        with pytest.raises(ValueError, match="would include the evaluation seed 1000"):
            env.mw_tasks("hammer", seed, n)
