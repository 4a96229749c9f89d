"""data.py's signal-only event segmenter and its boundary scores."""
import inspect

import numpy as np
import pytest

import data
import env
from data import boundary_scores, segment


def expert_episodes(seeds, render):
    tasks = [env.make_task(f, s, seed, recovery_alpha=0.1) for seed in seeds for f in env.FAMILIES for s in env.SPLITS]
    return env.run_expert(tasks, env.WorldConfig(image_size=32), env.ExpertConfig(recovery_alpha=0.1), render=render)


@pytest.fixture(scope="module")
def rendered():                      # 20 episodes with frames, one per family x split
    return expert_episodes([3000], render=True)


@pytest.fixture(scope="module")
def held_out():                      # 40 episodes on seeds never used for tuning (0..99 were)
    return expert_episodes([2000, 2001], render=False)


# --- (a) the events tile the episode and respect the length limits ---
@pytest.mark.parametrize("min_len, max_len", [(1, 90), (3, 8), (5, 10)])
def test_events_tile_the_episode(rendered, min_len, max_len):
    for ep in rendered:
        events, T = segment(ep.frames, ep.state, ep.action, min_len=min_len, max_len=max_len), len(ep.action)
        assert events[0]["start"] == 0 and events[-1]["end"] == T
        assert all(a["end"] == b["start"] for a, b in zip(events, events[1:]))
        lengths = np.array([e["end"] - e["start"] for e in events])
        assert lengths.max() <= max_len and (lengths.min() >= min_len or T < min_len)
        assert all(isinstance(e["text"], str) and e["text"] for e in events)


def test_captions_use_motion_words_only(rendered):
    words = {"move", "up", "down", "left", "right", "forward", "backward", "and",
             "open", "close", "the", "gripper", "hold", "still"}
    for ep in rendered:
        for e in segment(ep.frames, ep.state, ep.action):
            assert set(e["text"].split()) <= words, e["text"]


def test_frames_are_optional(rendered):
    for ep in rendered:
        assert segment(None, ep.state, ep.action) == segment(ep.frames, ep.state, ep.action)


def test_long_still_episode_is_split_evenly():
    T = 100
    state, action = np.tile([0, 0, 0.16, 1], (T + 1, 1)), np.tile([0, 0, 0, -1.0], (T, 1))
    events = segment(None, state, action, min_len=1, max_len=30)
    assert [e["end"] - e["start"] for e in events] == [25, 25, 25, 25]
    assert {e["text"] for e in events} == {"hold still"}


def test_bad_input_is_refused():
    state, action = np.zeros((11, 4)), np.zeros((10, 4))
    with pytest.raises(ValueError, match="state"):
        segment(None, state[:-1], action)
    with pytest.raises(ValueError, match="finite"):
        segment(None, state, np.full((10, 4), np.nan))
    with pytest.raises(ValueError, match="min_len"):
        segment(None, state, action, min_len=6, max_len=10)


# --- (b) boundary matching on hand-made lists ---
@pytest.mark.parametrize("pred, true, tol, expected", [
    ([0, 5, 10], [0, 5, 10], 2, (1.0, 1.0, 1.0, 2, 2)),       # step 0 is never a boundary
    ([7], [5], 2, (1.0, 1.0, 1.0, 1, 1)),                      # exactly tol away still matches
    ([8], [5], 2, (0.0, 0.0, 0.0, 1, 1)),                      # tol + 1 away does not
    ([3], [5], 2, (1.0, 1.0, 1.0, 1, 1)),                      # early counts like late
    ([6], [5], 0, (0.0, 0.0, 0.0, 1, 1)),                      # tol 0: exact steps only
    ([5, 6], [5], 2, (0.5, 1.0, 2 / 3, 2, 1)),                 # one-to-one: a second cut near a boundary is a false alarm
    ([3], [1, 5], 2, (1.0, 0.5, 2 / 3, 1, 2)),                 # one cut serves one boundary only
    ([4, 6], [5, 7], 2, (1.0, 1.0, 1.0, 2, 2)),                # closest pairs first: 4-5 and 6-7
    ([10, 20, 40], [11, 30], 2, (1 / 3, 0.5, 0.4, 3, 2)),
    ([], [], 2, (1.0, 1.0, 1.0, 0, 0)),
    ([], [4], 2, (1.0, 0.0, 0.0, 0, 1)),
    ([4], [], 2, (0.0, 1.0, 0.0, 1, 0)),
])
def test_boundary_scores(pred, true, tol, expected):
    assert boundary_scores(pred, true, tol) == pytest.approx(expected)


# --- (c) the cuts find the expert's L1 events ---
def segment_eval(episodes):
    return data.segment_eval((ep.frames, ep.state, ep.action, [c["start"] for c in ep.meta["captions"]["L1"]],
                              bool(ep.labels["recovery"].any() or ep.meta["recovery_start"] or ep.meta["slips"]))
                             for ep in episodes)


def test_f1_on_held_out_episodes(held_out):
    r = segment_eval(held_out)
    assert r["all"]["episodes"] == 40 and r["all"]["n_true"] > 200
    assert r["all"]["f1"] >= 0.9, r
    assert r["recovery"]["episodes"] == 0 or r["recovery"]["f1"] >= 0.9, r


def test_eval_counts_misses(held_out):           # the metric can fail: a segmenter that never cuts scores 0
    ep = held_out[0]
    true = [c["start"] for c in ep.meta["captions"]["L1"]]
    assert boundary_scores([0], true)[2] == 0.0 and len(true) > 1


# --- (d) the segmenter sees signals only, never labels or captions ---
def test_segmenter_takes_signals_only(held_out):
    params = inspect.signature(segment).parameters
    assert list(params) == ["frames", "state", "action", "min_len", "max_len"]
    assert all(params[k].default is inspect.Parameter.empty for k in ("frames", "state", "action"))
    assert all(isinstance(params[k].default, int) for k in ("min_len", "max_len"))
    ep = held_out[0]
    events = segment(None, ep.state.copy(), ep.action.copy())          # positional data arguments only
    assert events and events[-1]["end"] == len(ep.action)
