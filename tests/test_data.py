"""data.py: disk round trip, lazy reads, resume, lag, quarantine, caption drop, windows, packing,
k-means, and the balanced sampler."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import data
import env as world


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    data.generate(out, episodes=20, seed=3, per_shard=8, image_size=32)
    return out


@pytest.fixture(scope="module")
def ds(root):
    return data.Dataset(root)


def clean_episode(seed=11, family="pick_place"):
    ep = world.run_expert([world.make_task(family, "seen", seed)], world.WorldConfig(image_size=32))[0]
    return data.episode_tensors(ep), ep.meta


def test_round_trip_and_lazy_slice(tmp_path):
    t, meta = clean_episode()
    path = str(tmp_path / "shard-00000.safetensors")
    data.write_shard(path, [("a", t, meta)])
    back = data.load_tensors(path, "a")
    for k, v in t.items():
        np.testing.assert_array_equal(back[k], v)
    (head,) = data.read_header(path)
    assert head["captions"] == json.loads(json.dumps(meta["captions"])) and head["missing"] == []
    data.build_index(str(tmp_path), data.DataConfig())
    ds = data.Dataset(str(tmp_path))
    np.testing.assert_array_equal(ds.get(0, "frames", slice(5, 7)), t["frames"][5:7])
    np.testing.assert_array_equal(ds.get(0, "action", np.array([9, 2])), t["action"][[9, 2]])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_generate_resumes_and_is_deterministic(root, capsys):
    files = sorted(f for f in os.listdir(root) if f.startswith("shard-"))
    assert len(files) == 3
    before = {f: os.path.getmtime(os.path.join(root, f)) for f in files}
    first_head = data.read_header(os.path.join(root, files[1]))
    first = {m["name"]: data.load_tensors(os.path.join(root, files[1]), m["name"]) for m in first_head}
    os.remove(os.path.join(root, files[1]))
    data.generate(root, episodes=20, seed=3, per_shard=8, image_size=32)
    assert "1 shard(s) written" in capsys.readouterr().out
    again = data.read_header(os.path.join(root, files[1]))
    assert [m["name"] for m in again] == [m["name"] for m in first_head]          # the same episodes again
    for m in again:
        for k, v in data.load_tensors(os.path.join(root, files[1]), m["name"]).items():
            np.testing.assert_array_equal(v, first[m["name"]][k])
    assert all(os.path.getmtime(os.path.join(root, f)) == before[f] for f in (files[0], files[2]))


def test_generate_refuses_shards_of_a_larger_earlier_run(tmp_path):
    data.write_shard(str(tmp_path / "shard-00005.safetensors"), [("a", *clean_episode())])
    with pytest.raises(data.DataError, match="shard-00005.safetensors and 0 more shard"):
        data.generate(str(tmp_path), episodes=4, per_shard=2, image_size=32)


def test_generate_records_recovery_alpha(tmp_path, capsys):
    """The recovery weight is part of how a shard was made: a re-run with the same alpha resumes past it,
    one with another alpha is refused and the shard kept."""
    out = str(tmp_path)
    data.generate(out, episodes=2, per_shard=2, image_size=32, recovery_alpha=1.0)
    assert data.shard_source(os.path.join(out, "shard-00000.safetensors"))["recovery_alpha"] == 1.0
    assert all(m["recovery_start"] for m in data.read_header(os.path.join(out, "shard-00000.safetensors")))
    data.generate(out, episodes=2, per_shard=2, image_size=32, recovery_alpha=1.0)
    assert "0 shard(s) written" in capsys.readouterr().out
    with pytest.raises(data.DataError, match=r"shard-00000.safetensors: made with recovery_alpha 1.0, expected 0.0 \(an earlier run\?\); use a new --out"):
        data.generate(out, episodes=2, per_shard=2, image_size=32, recovery_alpha=0.0)
    assert all(m["recovery_start"] for m in data.read_header(os.path.join(out, "shard-00000.safetensors")))


def test_generate_never_overwrites_another_datasets_shards(tmp_path):
    """A root that holds another dataset (other size, other episode count) is refused, naming the fields,
    and its shards and index are left as they were."""
    out = str(tmp_path)
    data.generate(out, episodes=3, per_shard=4, image_size=32)
    before = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}
    with pytest.raises(data.DataError, match=r"shard-00000.safetensors: made with image_size 32, expected 64; "
                                             r"3 episodes, expected 4"):
        data.generate(out, episodes=8, per_shard=4, image_size=64)
    assert {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))} == before
    jobs = data.generation_jobs(out, episodes=3, per_shard=4, image_size=32)
    assert data.made_otherwise(out, jobs) == []
    other = [(p, fn, args, dict(made, episodes=["ep000000", "ep000001", "ep000009"])) for p, fn, args, made in jobs]
    assert data.made_otherwise(out, other) == [f"{out}/shard-00000.safetensors: made with episode 'ep000002' where 'ep000009' was expected"]
    foreign = tmp_path / "foreign"                       # a shard with no record of how it was made
    os.makedirs(foreign)
    data.write_shard(str(foreign / "shard-00000.safetensors"), [("a", *clean_episode())])
    with pytest.raises(data.DataError, match="shard-00000.safetensors: no record of how it was made"):
        data.generate(str(foreign), episodes=1, per_shard=4, image_size=32)


def test_block_mask_rows_never_empty():
    seg = torch.tensor([[0, 0, 1, -1]])
    m = data.block_mask(seg, seg)[0]
    assert m.any(1).all() and m[:3, 3].logical_not().all()               # nobody attends to padding
    assert m[0].tolist() == [True, True, False, False] and m[2].tolist() == [False, False, True, False]


def test_corrupted_shard_names_the_file(tmp_path):
    t, meta = clean_episode()
    path = str(tmp_path / "shard-00000.safetensors")
    data.write_shard(path, [("a", t, meta)])
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match="shard-00000.safetensors"):
        data.build_index(str(tmp_path), data.DataConfig())
    open(path, "wb").write(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(data.DataError, match="not a readable safetensors shard"):
        data.read_header(path)


@pytest.mark.parametrize("lag", [1, 2, -2])
def test_lag_recovered_exactly(lag):
    t, _ = clean_episode()
    cfg = data.DataConfig()
    assert data.estimate_lag(data.visual_motion(t["frames"]), data.action_motion(t["state"]), cfg.max_lag) == 0
    fr = t["frames"]
    shifted = dict(t, frames=np.concatenate([np.repeat(fr[:1], lag, 0), fr[:-lag]]) if lag > 0
                   else np.concatenate([fr[-lag:], np.repeat(fr[-1:], -lag, 0)]))
    found = data.estimate_lag(data.visual_motion(shifted["frames"]), data.action_motion(t["state"]), cfg.max_lag)
    assert found == lag
    out = data.align(shifted, found)                       # aligned: frames match the state again
    n = len(out["action"])
    assert len(out["frames"]) == len(out["state"]) == n + 1 == len(t["action"]) - abs(lag) + 1
    s0 = max(-lag, 0)
    np.testing.assert_array_equal(out["frames"], fr[s0: s0 + n + 1])
    np.testing.assert_array_equal(out["state"], t["state"][s0: s0 + n + 1])


def _broken(kind):
    t, _ = clean_episode()
    t = dict(t)
    if kind == "missing stream":
        t["state"] = None
    elif kind == "length mismatch":
        t["action"] = t["action"][:-3]
    elif kind == "non-finite":
        t["state"] = t["state"].copy()
        t["state"][4, 1] = np.nan
    elif kind == "non-monotonic timestamps":
        t["time"] = t["time"].copy()
        t["time"][6] = t["time"][4]
    elif kind == "discontinuity":
        t["state"] = t["state"].copy()
        t["state"][10:, 0] += 0.2
    elif kind == "implausible lag":
        t["frames"] = np.concatenate([np.repeat(t["frames"][:1], 4, 0), t["frames"][:-4]])
    return t


@pytest.mark.parametrize("kind", ["missing stream", "length mismatch", "non-finite", "non-monotonic timestamps",
                                  "discontinuity", "implausible lag"])
def test_each_quarantine_reason(kind):
    reasons, _ = data.check_episode(_broken(kind), data.DataConfig())
    assert len(reasons) == 1 and reasons[0].startswith(kind.replace("non-finite", "non-finite values")), reasons


def test_check_keeps_good_and_quarantines_bad_with_reasons(tmp_path, capsys):
    t, meta = clean_episode()
    bad = {k: v for k, v in _broken("non-finite").items() if v is not None}
    data.write_shard(str(tmp_path / "shard-00000.safetensors"), [("good", t, meta), ("bad", bad, meta)])
    report = data.check(str(tmp_path))
    assert report["kept"] == 1 and report["quarantined"] == 1
    assert "non-finite values in state" in report["reasons"]["shard-00000.safetensors:bad"][0]
    assert "1 kept, 1 quarantined of 2" in capsys.readouterr().out
    assert [e["name"] for e in data.Dataset(str(tmp_path)).episodes] == ["good"]
    L = np.array([c["end"] - c["start"] for c in meta["captions"]["L1"]])      # the kept episode's events only
    r = report["l1_lengths"]
    assert r["events"] == len(L) and (r["min"], r["max"]) == (L.min(), L.max()) and r["p99"] == np.percentile(L, 99)
    assert r["over_max_event_len"] == np.mean(L > data.DataConfig().max_event_len)


def shift_video(t, lag):
    """The episode with its video (frames and camera poses) running `lag` frames behind the actions."""
    out = dict(t)
    for k in ("frames", "cam_pose"):
        v = t[k]
        out[k] = (np.concatenate([np.repeat(v[:1], lag, 0), v[:-lag]]) if lag > 0
                  else np.concatenate([v[-lag:], np.repeat(v[-1:], -lag, 0)]))
    return out


def test_lag_beyond_the_window_is_quarantined():
    """A lag past plausible_lag is quarantined whether it falls inside the search window (found there) or
    beyond it (no lag in the window explains the video). Meta-World's episodes are synchronous by
    construction and never lag-tested: a video shifted by 1 or 12 keeps lag 0 there (the old code applied
    a false lag of -1 to one of 359 clean episodes)."""
    t, meta = clean_episode(seed=3, family="stack")
    cfg = data.DataConfig()
    assert data.check_episode(t, cfg) == ([], 0)
    for lag in (8, -8):
        reasons, found = data.check_episode(shift_video(t, lag), cfg)
        assert reasons == [f"implausible lag: video {found:+d} frames against actions (|lag| <= 2)"] and abs(found) == 6
    reasons, _ = data.check_episode(shift_video(t, 12), cfg)
    assert len(reasons) == 1 and reasons[0].startswith("no lag explains the video: best correlation"), reasons
    assert data.check_episode(shift_video(t, 12), cfg, meta) == (reasons, 0)
    mw = meta | {"world_version": world.MW_VERSION}
    assert data.check_episode(shift_video(t, 12), cfg, mw) == ([], 0)
    assert data.check_episode(shift_video(t, 1), cfg)[1] == 1 and data.check_episode(shift_video(t, 1), cfg, mw) == ([], 0)


@pytest.mark.parametrize("field", ["intrinsics", "progress", "time", "cam_pose"])
def test_non_finite_in_any_float_field(field):
    t, _ = clean_episode()
    t = dict(t, **{field: t[field].astype(np.float32)})                  # a copy
    t[field].reshape(-1)[5] = np.inf if field == "progress" else np.nan
    row = np.unravel_index(5, t[field].shape)[0]
    assert data.check_episode(t, data.DataConfig())[0] == [f"non-finite values in {field} (first at row {row})"]


@pytest.mark.parametrize("kind, expected", [
    ("state 3 columns", "shape mismatch: state width 3 (expected >= 4"),
    ("action 3 columns", "shape mismatch: action width 3 (expected 4"),
    ("state wider than the dataset's", "shape mismatch: state (100, 5) (expected (100, 4))"),
    ("cam_pose one view of two", "shape mismatch: cam_pose (100, 1, 4, 4) (expected (100, 2, 4, 4))"),
    ("intrinsics (V, 3)", "shape mismatch: intrinsics (2, 3) (expected (2, 4))"),
    ("frames without views", "shape mismatch: frames (100, 32, 32, 3)"),
    ("progress as a scalar", "length mismatch against 100 frames: progress has 0 rows (expected 100)"),
    ("no L1 captions", "metadata: no captions 'L1' list"),
    ("no instruction", "metadata: no 'instruction' string"),
])
def test_shapes_and_metadata_checked(kind, expected):
    t, meta = clean_episode()
    t, meta = dict(t), dict(meta)
    dims = (4, 4, 2, 32, 32)                                       # the dataset's (S, A, V, H, W)
    if kind == "state 3 columns":
        t["state"], dims = t["state"][:, :3], None
    elif kind == "action 3 columns":
        t["action"], dims = t["action"][:, :3], None
    elif kind == "state wider than the dataset's":
        t["state"] = np.concatenate([t["state"], t["state"][:, :1]], 1)
    elif kind == "cam_pose one view of two":
        t["cam_pose"] = t["cam_pose"][:, :1]
    elif kind == "intrinsics (V, 3)":
        t["intrinsics"] = t["intrinsics"][:, :3]
    elif kind == "frames without views":
        t["frames"] = t["frames"][:, 0]
    elif kind == "progress as a scalar":
        t["progress"] = np.float32(1.0)
    elif kind == "no L1 captions":
        meta["captions"] = {k: v for k, v in meta["captions"].items() if k != "L1"}
    else:
        del meta["instruction"]
    reasons, _ = data.check_episode(t, data.DataConfig(), meta, dims)
    assert len(reasons) == 1 and reasons[0].startswith(expected), reasons


def test_build_index_quarantines_odd_widths_and_missing_metadata(tmp_path):
    """Widths are checked against the dataset's most common ones; the kept episodes load and window."""
    t, meta = clean_episode()
    wide = dict(t, state=np.concatenate([t["state"], t["state"][:, :3]], 1))
    no_caps = {k: v for k, v in meta.items() if k != "captions"}
    data.write_shard(str(tmp_path / "shard-00000.safetensors"), [("a", t, meta), ("b", t, meta), ("wide", wide, meta),
                                                                 ("no_caps", t, no_caps)])
    index = data.build_index(str(tmp_path), data.DataConfig())
    reasons = {e["name"]: e["reasons"] for e in index["episodes"]}
    assert reasons["a"] == reasons["b"] == [] and reasons["wide"][0].startswith("shape mismatch: state (100, 7)")
    assert reasons["no_caps"] == ["metadata: no captions 'L1' list of {start, end, text} records"]
    ds = data.Dataset(str(tmp_path))
    per, _ = data.all_events(ds)
    assert len(ds) == 2 and data.event_window(ds, per[0], 0, np.random.default_rng(0))["state"].shape == (1, 4)


def test_bad_headers_name_the_file_and_field(tmp_path):
    path = str(tmp_path / "shard-00000.safetensors")
    for episodes, match in ((None, "field 'episodes' expected JSON, found nothing"),
                            ("not json", "field 'episodes' expected JSON, found 'not json'"),
                            ('{"name": "a"}', "field 'episodes' expected a JSON list, found dict"),
                            ('[{"nam": 1}]', r"field 'episodes'\[0\] expected a record with a string 'name'")):
        save_file({"x": np.zeros(2)}, path, metadata={"format": data.FORMAT} | ({"episodes": episodes} if episodes else {}))
        with pytest.raises(data.DataError, match="shard-00000.safetensors: .*" + match):
            data.read_header(path)
    save_file({"x": np.zeros(2)}, path, metadata={"format": data.FORMAT, "episodes": "[]", "source": "{"})
    with pytest.raises(data.DataError, match="shard-00000.safetensors: field 'source' expected JSON"):
        data.shard_source(path)


def test_bad_dataset_json_names_the_field(tmp_path):
    t, meta = clean_episode()
    data.write_shard(str(tmp_path / "shard-00000.safetensors"), [("a", t, meta)])
    good = data.build_index(str(tmp_path), data.DataConfig())
    path = tmp_path / "dataset.json"
    cases = [("{", "dataset.json expected JSON, found '{'"),
             (json.dumps(good | {"format": "other"}), "field 'format' expected 'wallwm-episodes-1', found 'other'"),
             (json.dumps({k: v for k, v in good.items() if k != "stats"}), "field 'stats' expected a JSON dict, found None"),
             (json.dumps(good | {"episodes": [{"name": "a"}]}), "field 'episodes' expected records with"),
             (json.dumps(good | {"config": good["config"] | {"old_field": 1}}), "unknown ['old_field']")]
    for text, match in cases:
        path.write_text(text)
        with pytest.raises(data.DataError, match=re.escape(match)):
            data.Dataset(str(tmp_path))
    path.write_text(json.dumps(good | {"config": good["config"] | {"min_event_len": 2}}))     # a retired field: ignored
    assert data.Dataset(str(tmp_path)).cfg == data.DataConfig() and not hasattr(data.DataConfig(), "min_event_len")


def test_normalisation_stats_float64(ds):
    s = ds.stats["action"]
    assert s["mean"].dtype == np.float64 and s["mean"].shape == (4,) and (s["std"] > 0).all()
    every = np.concatenate([ds.get(i, "action") for i in range(len(ds))]).astype(np.float64)
    np.testing.assert_allclose(s["mean"], every.mean(0), rtol=1e-9, atol=1e-12)


def test_offset_targets_sum_the_deltas_and_invert(root):
    ds = data.with_targets(data.Dataset(root), True)               # a fresh copy: the fixture's stays on deltas
    per, items = data.all_events(ds)
    rng = np.random.default_rng(0)
    targets = []
    for i, j in items:
        w, recorded = data.event_window(ds, per[i], j, rng), ds.get(i, "action", per[i][j]["steps"]).astype(np.float64)
        x = w["action"] * ds.stats["offset"]["std"] + ds.stats["offset"]["mean"]
        np.testing.assert_allclose(x[-1, :3], recorded[:, :3].sum(0), atol=1e-4)   # where the event leaves the hand
        np.testing.assert_allclose(x[:, 3], recorded[:, 3], atol=1e-5)              # the gripper command as is
        np.testing.assert_allclose(data.actions_from_targets(w["action"], ds.cfg, ds.stats), recorded, atol=1e-5)
        targets.append(w["action"])
    every = np.concatenate(targets)                                   # the statistics standardise the targets
    np.testing.assert_allclose(every[:, :3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(every[:, :3].std(0), 1, atol=1e-5)
    H = ds.cfg.chunk_frames * ds.cfg.k_p
    i = next(i for i in range(len(ds)) if ds.length(i) % H)          # an episode whose last chunk is cut short
    c = ds.length(i) // H
    w = data.chunk_window(ds, i, c)
    valid = w["action_valid"]
    assert 0 < valid.sum() < H and (w["action"][~valid] == 0).all()   # a valid prefix, then zero padding
    np.testing.assert_allclose(data.actions_from_targets(w["action"][valid], ds.cfg, ds.stats),
                               ds.get(i, "action", np.arange(c * H, ds.length(i))), atol=1e-5)
    plain = data.Dataset(root)                                       # the clusterings read per-step actions either way
    assert all(np.array_equal(a["action"], b["action"]) for a, b in zip(data.event_windows(ds), data.event_windows(plain)))
    delta = data.event_window(plain, per[0], 0, rng)["action"]       # deltas: normalised actions as recorded
    np.testing.assert_allclose(data.actions_from_targets(delta, data.DataConfig(), ds.stats),
                               ds.get(0, "action", per[0][0]["steps"]), atol=1e-5)


def test_caption_drop_schedule():
    cfg = data.DataConfig()
    rho = lambda L: float(data.caption_drop_prob(L, cfg))
    assert rho(1) == rho(cfg.l_min) == pytest.approx(0.1)
    assert rho(cfg.l_max) == rho(500) == pytest.approx(0.9)
    assert rho((cfg.l_min + cfg.l_max) / 2) == pytest.approx(0.5)
    quarter = cfg.l_min + (cfg.l_max - cfg.l_min) / 4
    assert rho(quarter) == pytest.approx(0.1 + 0.8 * (1 - np.cos(np.pi / 4)) / 2)
    ramp = data.caption_drop_prob(np.arange(cfg.l_min, cfg.l_max + 1), cfg)
    assert (np.diff(ramp) > 0).all()


def test_events_split_long_and_prune_quasi_static(ds):
    per, _ = data.all_events(ds)
    cfg = ds.cfg
    for i, events in enumerate(per):
        assert events[0]["start"] == 0 and all(a["end"] == b["start"] for a, b in zip(events, events[1:]))
        moving = data.moving_steps(ds.get(i, "state"), cfg.static_eps)
        for e in events:
            assert e["end"] - e["start"] <= cfg.max_event_len
            if moving[e["start"]:e["end"]].any():
                assert moving[e["steps"]].all()
    assert data.split_long([{"start": 0, "end": 70}], 32) == [{"start": 0, "end": 23, "part": (0, 3), "event_len": 70},
                                                             {"start": 23, "end": 47, "part": (1, 3), "event_len": 70},
                                                             {"start": 47, "end": 70, "part": (2, 3), "event_len": 70}]


def test_caption_drop_reads_the_whole_event_length(ds):
    """A split event's parts drop their caption with the whole event's rho, so rho stays monotone in L
    (from its parts' lengths, a 33-step event would drop less often than a 32-step one)."""
    cfg = data.DataConfig()
    rho = [float(data.caption_drop_prob(p["event_len"], cfg)) for L in range(1, 100)
           for p in data.split_long([{"start": 0, "end": L}], cfg.max_event_len)]
    assert (np.diff(rho) >= 0).all() and rho[-1] == pytest.approx(cfg.rho_max)
    e = data.all_events(ds)[0][0][0]
    drops = {L: sum(data.event_window(ds, [dict(e, event_len=L)], 0, np.random.default_rng(s))["caption_dropped"]
                    for s in range(200)) for L in (1, 100)}
    assert drops[1] < 50 and drops[100] > 150                     # rho 0.1 and 0.9 on the same span


def test_event_window_shapes_and_tau(ds):
    per, _ = data.all_events(ds)
    cfg, rng = ds.cfg, np.random.default_rng(0)
    for j in range(len(per[0])):
        w = data.event_window(ds, per[0], j, rng)
        L, F = len(per[0][j]["steps"]), -(-len(per[0][j]["steps"]) // cfg.k_p)
        assert w["frames"].shape == (F + 1, 2, 32, 32, 3) and w["cam_pose"].shape == (F + 1, 2, 4, 4)
        assert w["action"].shape == (L, 4) and w["state"].shape == (1, 4)
        np.testing.assert_array_equal(w["frame_tau"], np.arange(F + 1))
        np.testing.assert_array_equal(w["action_tau"], np.arange(L) // cfg.k_p + 1)
        assert w["action_tau"].max() == F and w["remaining"] == L
        assert w["next_caption"] == (per[0][j + 1]["text"] if j + 1 < len(per[0]) else "done")
        # the last future frame is the one observed after the event's last action
        last = per[0][j]["steps"][-1] + 1
        np.testing.assert_array_equal(w["frames"][-1], ds.get(0, "frames", [last])[0])
    assert per[0][0]["text"] and w["reasoning"]


def test_chunk_window_tau_and_masks(ds):
    cfg = ds.cfg
    H = cfg.chunk_frames * cfg.k_p
    n = ds.length(0)
    last = (n - 1) // H
    w0, wl = data.chunk_window(ds, 0, 0), data.chunk_window(ds, 0, last)
    np.testing.assert_array_equal(w0["frame_tau"], np.arange(-cfg.history, cfg.chunk_frames + 1))
    assert not w0["frame_valid"][: cfg.history].any() and w0["frame_valid"][cfg.history:].all()
    assert wl["chunk_index"] == last and wl["action_valid"].sum() == n - last * H
    assert (wl["action"][~wl["action_valid"]] == 0).all()
    np.testing.assert_array_equal(w0["frames"][cfg.history], ds.get(0, "frames", [0])[0])


def test_chunk_clustering_reads_the_anchor_not_the_history(ds):
    """The vision-language embedding of a chunk window uses its anchor frame (tau 0): blanking the
    history frames changes nothing, blanking the anchor does."""
    ws = [data.chunk_window(ds, i, c) for i in range(4) for c in (1, 2)]
    base = data.embeddings(ws)[0]
    hist = [dict(w, frames=np.where((w["frame_tau"] < 0)[:, None, None, None, None], 0, w["frames"])) for w in ws]
    anchor = [dict(w, frames=np.where((w["frame_tau"] == 0)[:, None, None, None, None], 0, w["frames"])) for w in ws]
    assert np.array_equal(data.embeddings(hist)[0], base) and not np.allclose(data.embeddings(anchor)[0], base)


def test_pixel_features_at_any_size():
    """Block means on an 8 x 8 grid of near-equal blocks: exact at 32 x 32 (the old reshape), and at 36 x 37."""
    rng = np.random.default_rng(0)
    f = rng.integers(0, 256, (3, 2, 32, 32, 3), dtype=np.uint8)
    old = f.reshape(3, 2, 8, 4, 8, 4, 3).mean(axis=(3, 5)).reshape(3, -1) / 255
    np.testing.assert_allclose(data.pixel_features(f), old, atol=1e-12)
    f = rng.integers(0, 256, (3, 2, 36, 37, 3), dtype=np.uint8)
    rows, cols = np.array_split(np.arange(36), 8), np.array_split(np.arange(37), 8)
    naive = np.array([[[[f[n, v][np.ix_(r, c)].mean((0, 1)) for c in cols] for r in rows]
                        for v in range(2)] for n in range(3)])
    np.testing.assert_allclose(data.pixel_features(f), naive.reshape(3, -1) / 255, atol=1e-12)


def test_training_tasks_never_repeat_evaluation_episodes():
    """Whatever the data seed, a generated training task is not one of eval.py's episodes (seeds 0-2)."""
    import eval as E
    held = {(t.family, t.split, t.seed) for s in range(3) for _, _, t in E.episode_tasks(world.FAMILIES, world.SPLITS, 100, s)}
    for seed in range(4):
        tasks = [t for _, t in data.shard_tasks(seed, 0, 1000, 1000, "seen")]
        assert not held & {(t.family, t.split, t.seed) for t in tasks}


def naive_attention(q, k, v, mask):
    s = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1)) @ v


def test_packing_equals_separate_events(ds):
    per, _ = data.all_events(ds)
    rng = np.random.default_rng(0)
    windows = [data.event_window(ds, per[1], j, rng) for j in range(4)]
    packed = data.collate(data.pack(windows, max_actions=10_000))
    padded = data.collate([[w] for w in sorted(windows, key=lambda w: -len(w["action_tau"]))])
    assert packed["action"].shape[0] == 1 and padded["action"].shape[0] == 4
    torch.manual_seed(0)
    proj = torch.randn(3, 4, 8)
    x = packed["action"][0]                                              # (K_total, A)
    q, k, v = (x @ p for p in proj)
    mask = data.block_mask(packed["action_seg"], packed["action_seg"])[0]
    out_packed = naive_attention(q, k, v, mask)
    start = 0
    for b in range(4):
        K = int((padded["action_seg"][b] >= 0).sum())
        xs = padded["action"][b, :K]
        np.testing.assert_array_equal(xs.numpy(), x[start:start + K].numpy())
        qs, ks, vs = (xs @ p for p in proj)
        ref = naive_attention(qs, ks, vs, torch.ones(K, K, dtype=torch.bool))
        torch.testing.assert_close(out_packed[start:start + K], ref)
        start += K
    assert (packed["state_seg"][0] == torch.arange(4)).all()
    assert set(packed["frame_seg"][0].tolist()) == {0, 1, 2, 3}


def test_kmeans_recovers_separable_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]])
    truth = torch.arange(4).repeat_interleave(50)
    x = centres[truth] + 0.5 * torch.randn(200, 2, generator=g)
    labels, c = data.kmeans(x, 4, seed=0)
    pairs = {(int(a), int(b)) for a, b in zip(truth, labels)}
    assert len(pairs) == 4 and len({b for _, b in pairs}) == 4              # a bijection of clusters
    assert torch.cdist(c.float(), centres).min(1).values.max() < 0.5


def test_balanced_sampler_determinism_sharding_resume():
    w = np.linspace(1, 3, 40)
    a, b = data.BalancedSampler(w, 100, seed=5), data.BalancedSampler(w, 100, seed=5)
    ia, ib = iter(a), iter(b)
    first = [next(ia) for _ in range(250)]
    assert first == [next(ib) for _ in range(250)]
    assert first[:100] != first[100:200]                                  # a new stream per epoch
    glob = torch.cat([a.stream(e) for e in range(3)]).tolist()
    assert first == glob[:250]
    # 3 ranks, 7 draws per epoch (not a multiple of 3): lockstep, and the union is the global prefix
    shards = [iter(data.BalancedSampler(w, 7, seed=5, rank=r, world=3)) for r in range(3)]
    steps = [[next(it) for it in shards] for _ in range(10)]             # 10 steps of every rank
    glob = torch.cat([data.BalancedSampler(w, 7, seed=5).stream(e) for e in range(5)]).tolist()
    assert sum(steps, []) == glob[:30]                                    # position r + 3 j, no overlap
    c = data.BalancedSampler(w, 100, seed=5)
    c.load_state_dict(a.state_dict())
    assert a.state_dict() == {"pos": 250}
    assert [next(iter(c)) for _ in range(1)] == [next(ia)]


def test_balancing_raises_entropy_on_a_skewed_set():
    rng = np.random.default_rng(0)
    vl = rng.choice(5, 2000, p=[0.8, 0.1, 0.05, 0.03, 0.02])
    act = rng.choice(4, 2000, p=[0.7, 0.2, 0.07, 0.03])
    w = data.balance_weights(vl, act, 0.5)
    assert (w > 0).all()
    uni = data.BalancedSampler(np.ones(2000), 20000).stream(0).numpy()
    bal = data.BalancedSampler(w, 20000).stream(0).numpy()
    for lab, k in ((vl, 5), (act, 4)):
        assert data.entropy(lab[bal], k) > data.entropy(lab[uni], k) + 0.1


def test_clusters_report(root):
    rep = data.clusters(root, draws=5000, json_out=True)
    assert sum(rep["vl_sizes"]) == sum(rep["act_sizes"]) == rep["items"]
    assert rep["balanced"]["entropy_vl"] > rep["uniform"]["entropy_vl"]
    assert rep["balanced"]["entropy_act"] > rep["uniform"]["entropy_act"]
    assert rep["balanced"]["min_prob"] > 0
    assert os.path.exists(os.path.join(root, "clusters-event.safetensors"))


def test_cluster_cache_follows_settings_and_keyframes(ds, tmp_path):
    """A saved clustering is reused only for the same windows (keyframes included) and the same k's."""
    ws = data.event_windows(ds)
    blank = [dict(w, frames=np.zeros_like(w["frames"])) if n == 0 else w for n, w in enumerate(ws)]   # one keyframe
    small = dataclasses.replace(ds.cfg, k_vl=3, k_act=2)
    digests = []
    for cfg, windows in ((ds.cfg, ws), (small, ws), (small, blank)):
        vl, act = data.cluster(types.SimpleNamespace(root=str(tmp_path), cfg=cfg), windows)   # cluster reads root, cfg
        assert vl.max() < cfg.k_vl and act.max() < cfg.k_act
        with data.safe_open(str(tmp_path / "clusters-event.safetensors"), "np") as f:
            digests.append(f.metadata()["digest"])
    assert len(set(digests)) == 3                                    # recomputed each time


def test_event_records_validated(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text('{"episode": "e0", "start": 0, "end": 12, "text": "reach the cup", "level": "L1", "skill": "reach"}\n')
    assert data.read_events_jsonl(str(p))[0]["end"] == 12
    p.write_text('{"episode": "e0", "start": 5, "end": "9", "text": "x", "level": "L1", "skill": "reach"}\n')
    with pytest.raises(data.DataError, match=r"events.jsonl:1: field 'end' expected int, found '9'"):
        data.read_events_jsonl(str(p))
    p.write_text('{"episode": "e0", "start": 9, "end": 9, "text": "x", "level": "L1", "skill": "reach"}\n')
    with pytest.raises(data.DataError, match="start < end"):
        data.read_events_jsonl(str(p))


def test_segmenter_events_make_windows(ds):
    per, items = data.all_events(ds, source="segmenter")
    assert len(items) > len(ds)
    for i, events in enumerate(per):
        assert events[0]["start"] == 0 and events[-1]["end"] == ds.length(i)
        assert all(e["skill"] == "" and e["text"].split()[0] in ("move", "close", "open", "hold") for e in events)
    w = data.event_window(ds, per[0], 0, np.random.default_rng(0))
    assert len(w["action"]) == len(per[0][0]["steps"])


def test_command_line_errors_are_one_line(tmp_path):
    """A missing dataset directory: one line naming it and what makes one, no traceback, exit status 1."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "data.py", "check", str(tmp_path / "none")], cwd=root, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {tmp_path / 'none'}: no such dataset directory (`python data.py generate --out {tmp_path / 'none'}` makes one)"
