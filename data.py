"""Data ecosystem (METHOD.md section 2): episodes on disk, synchronisation and cleaning, events,
caption drop, event and chunk windows, packing, and cluster-balanced sampling.

    python data.py generate --out data/demo --episodes 40            # about 5-10 s on 2 cores
    python data.py generate --out data/big --episodes 2000 --workers 8
    python data.py generate --source metaworld --tasks pick-place,drawer-open --out data/mw --episodes-per-task 10
    python data.py check data/demo                                   # kept / quarantined, with reasons
    python data.py segment-eval data/demo --json                     # automatic segmenter vs L1 boundaries
    python data.py clusters data/demo                                # both clusterings and the sampler's effect
    (torchrun: every rank of train.py builds the same BalancedSampler and reads its global stream by position;
     each rank takes its own micro-batches of every step, see train.py `micro_batches`)

A dataset directory holds `shard-XXXXX.safetensors` files (tensors named `<episode>.<field>`, the
episodes' metadata as JSON in the file header), `dataset.json` (the episode index, quarantine
reasons, normalisation statistics in float64) and, once computed, `clusters-event.safetensors` and
`clusters-chunk.safetensors`.

Dimension letters: T steps (frames T + 1), V views, H x W pixels, S state, A action, L event length,
F future frames, K action tokens, P events in a pack.
"""

import collections
import copy
import hashlib
import json
import math
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from typing import Annotated, Literal

import numpy as np
import torch
import tyro
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

import env as world

Root = tyro.conf.Positional[str]                    # a dataset directory on the command line
JsonFlag = Annotated[bool, tyro.conf.arg(name="json")]   # print the report as JSON

FORMAT = "wallwm-episodes-1"
FPS = 10.0                           # the embedded world's nominal control rate (timestamps = t / FPS)


class DataError(ValueError):
    """Bad input on disk: the message names the file, the field, and what was expected and found."""


@dataclass(frozen=True)
class DataConfig:
    k_p: int = 4                     # action steps per future frame (K_p, METHOD.md section 3)
    max_event_len: int = 32          # longer events are split evenly ([ours]: 98.6th pct; 99th: 33)
    rho_min: float = 0.1             # caption drop probability at L <= l_min (report)
    rho_max: float = 0.9             # ... at L >= l_max (report)
    l_min: int = 15                  # [ours] report 129 raw frames; scaled: see caption_drop_prob
    l_max: int = 26                  # [ours] report 220 raw frames; scaled: see caption_drop_prob
    static_eps: float = 1e-3         # metres: a step moving less than this with the gripper still is quasi-static
    history: int = 2                 # M history frames of a chunk window
    chunk_frames: int = 4            # N future frames of a chunk window (chunk = N * k_p actions)
    max_lag: int = 6                 # cross-correlation searched over lags -max_lag..max_lag (3x plausible_lag)
    plausible_lag: int = 2           # |lag| above this quarantines the episode
    min_lag_corr: float = 0.5        # a best correlation below this quarantines: no lag in the window explains the video
    max_jump: float = 0.05           # metres: a larger end-effector move in one step is a discontinuity
    k_vl: int = 8                    # clusters in the vision-language space
    k_act: int = 8                   # clusters in the action-trajectory space
    balance_power: float = 0.5       # sampler: p(i) ~ n_vl(i)^-power * n_act(i)^-power
    action_offsets: bool = False     # [ours] action targets: xyz summed from the window's start (see action_targets)


# --- episodes on disk: safetensors shards, atomic writes, resumable generation ---
TENSORS = ("frames", "state", "action", "time", "intrinsics", "cam_pose", "progress")
LABELS = ("skill", "l1", "l2", "subgoal", "recovery", "held")


def episode_tensors(ep):
    """An env.Episode as a flat dict of arrays (the on-disk record)."""
    T = len(ep.action)
    out = {"frames": ep.frames, "state": ep.state, "action": ep.action, "time": np.arange(T + 1) / FPS,
           "intrinsics": ep.intrinsics, "cam_pose": ep.cam_pose, "progress": ep.progress}
    return out | {f"label_{k}": ep.labels[k] for k in LABELS}


def write_shard(path, episodes, source=None):
    """episodes: list of (name, tensors dict, meta dict); source: how they were made (JSON). Written to
    a temporary file, then renamed, so a crash never leaves a half-written shard under the final name."""
    tensors = {f"{name}.{k}": np.ascontiguousarray(v) for name, t, _ in episodes for k, v in t.items()}
    header = {"format": FORMAT, "episodes": json.dumps([{"name": n} | m for n, _, m in episodes]),
              "source": json.dumps(source or {})}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.chmod(tmp, 0o644)                     # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_json(text, where, field=None, expected=dict):
    """json.loads for text read from disk (`field` of file `where`, or all of it): anything but JSON of type
    `expected` raises DataError naming the file and the field."""
    where = f"{where}: field {field!r}" if field else where
    try:
        out = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise DataError(f"{where} expected JSON, found {'nothing' if text is None else repr(text[:40])} ({e})") from None
    if not isinstance(out, expected):
        raise DataError(f"{where} expected a JSON {expected.__name__}, found {type(out).__name__}")
    return out


def read_header(path):
    """The shard's episode metadata; a truncated or corrupted file raises DataError naming it."""
    try:
        with safe_open(path, "np") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors shard (truncated or corrupted?): {e}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: header field 'format' expected {FORMAT!r}, found {meta.get('format')!r}")
    episodes = parse_json(meta.get("episodes"), path, "episodes", list)
    for n, m in enumerate(episodes):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise DataError(f"{path}: header field 'episodes'[{n}] expected a record with a string 'name', "
                            f"found {str(m)[:60]}")
        missing = [k for k in ("state", "action") if f"{m['name']}.{k}" not in keys]
        m["missing"] = missing + [k for k in TENSORS if f"{m['name']}.{k}" not in keys and k not in missing]
    return episodes


def shard_tasks(seed, shard, per_shard, n, split, recovery_alpha=world.ExpertConfig().recovery_alpha):
    """The tasks of one shard: a pure function of (seed, shard, alpha), so a re-run regenerates the same."""
    ids = range(shard * per_shard, min(n, (shard + 1) * per_shard))
    # Task seeds seed * 2**32 + i: seed 0 gives 0, 1, ...; other seeds stay clear of eval.py's episodes (from 1e6 on).
    return [(f"ep{i:06d}", world.make_task(world.FAMILIES[i % len(world.FAMILIES)], split, seed * 2 ** 32 + i,
                                           recovery_alpha=recovery_alpha)) for i in ids]


def tabletop_source(seed, shard, per_shard, n, split, image_size, recovery_alpha):
    return {"generator": "env.run_expert", "world_version": world.WORLD_VERSION, "seed": seed, "split": split,
            "image_size": image_size, "recovery_alpha": recovery_alpha,
            "episodes": [f"ep{i:06d}" for i in range(shard * per_shard, min(n, (shard + 1) * per_shard))]}


def shard_source(path):
    with safe_open(path, "np") as f:
        return parse_json((f.metadata() or {}).get("source", "{}"), path, "source")


def _generate_shard(args):
    path, seed, shard, per_shard, n, split, image_size, recovery_alpha = args
    named = shard_tasks(seed, shard, per_shard, n, split, recovery_alpha)
    eps = world.run_expert([t for _, t in named], world.WorldConfig(image_size=image_size))
    write_shard(path, [(name, episode_tensors(ep), ep.meta) for (name, _), ep in zip(named, eps)], tabletop_source(*args[1:]))
    return path


# Meta-World (optional extra, env.py's last section): each shard holds `per_shard` episodes of one
# task; episode k of a task is configuration k of MT1(task, seed + k // 50) (env.mw_tasks). Only
# successful expert episodes are kept: a failed configuration is tried again with other action
# noise (MW_ATTEMPTS times in all), then left out, and the shard's source names it.
MW_ATTEMPTS = 3


def mw_source(task, seed, first, n, image_size):
    return {"generator": "env.run_metaworld_expert", "world_version": world.MW_VERSION, "task": task, "seed": seed,
            "image_size": image_size, "noise": world.MW_NOISE, "episodes": [f"{task}-{k:05d}" for k in range(first, first + n)]}


def _generate_mw_shard(args):
    path, task, seed, first, n, image_size = args
    eps = world.run_metaworld_expert(world.mw_tasks(task, seed, n, first=first), image_size, attempts=MW_ATTEMPTS)
    kept = [(f"{task}-{first + j:05d}", episode_tensors(ep), ep.meta) for j, ep in enumerate(eps) if ep.meta["success"]]
    left_out = [f"{task}-{first + j:05d}" for j, ep in enumerate(eps) if not ep.meta["success"]]
    write_shard(path, kept, mw_source(*args[1:]) | {"expert_failed": left_out})
    return path


def generation_jobs(out, episodes=40, seed=0, split="seen", per_shard=16, image_size=64, source="tabletop", tasks="",
                    episodes_per_task=10, recovery_alpha=world.ExpertConfig().recovery_alpha):
    """generate's shards: (path, worker, args, the source its header records), one per shard."""
    jobs = []                                    # (path, worker, args, source it records)
    if source == "metaworld":
        names = [t for t in tasks.split(",") if t] or list(world.MW_TASKS)
        bad = [t for t in names if t not in world.MW_TASKS]
        if bad:
            raise DataError(f"generate: Meta-World tasks expected among {world.MW_TASKS}, found {bad}")
        for task in names:
            try:
                world.mw_tasks(task, seed, episodes_per_task)              # refuses the evaluation seed up front
            except ValueError as e:
                raise DataError(f"generate: {e}") from None
            for first in range(0, episodes_per_task, per_shard):
                args = (task, seed, first, min(per_shard, episodes_per_task - first), image_size)
                jobs.append((os.path.join(out, f"shard-{len(jobs):05d}.safetensors"), _generate_mw_shard, args, mw_source(*args)))
    else:
        if split not in world.SPLITS:
            raise DataError(f"generate: split expected one of {world.SPLITS}, found {split!r}")
        for shard in range(math.ceil(episodes / per_shard)):
            args = (seed, shard, per_shard, episodes, split, image_size, recovery_alpha)
            jobs.append((os.path.join(out, f"shard-{shard:05d}.safetensors"), _generate_shard, args, tabletop_source(*args)))
    return jobs


def made_otherwise(out, jobs):
    """What the shards in `out` say about how they were made, where it is not what `jobs` would make:
    one line per shard that differs (naming the fields), and extra shards; empty when they match.
    A shard that is missing or unreadable (an interrupted run) is not a difference."""
    names = {os.path.basename(path) for path, *_ in jobs}
    extra = sorted(f for f in os.listdir(out) if f.startswith("shard-") and f.endswith(".safetensors") and f not in names)
    lines = [f"{out}: holds {extra[0]} and {len(extra) - 1} more shard(s) beyond the {len(jobs)} expected"] if extra else []
    for path, _, _, made in jobs:
        try:
            read_header(path)
        except DataError:
            continue                             # missing or unreadable: written again
        try:
            src = shard_source(path)
        except DataError as e:
            lines.append(str(e))
            continue
        if not src:
            lines.append(f"{path}: no record of how it was made")
            continue
        shown = [difference(k, src.get(k), made[k]) for k in made if src.get(k) != made[k]]
        if shown:
            lines.append(f"{path}: made with " + "; ".join(shown))
    return lines


def difference(field, found, expected):
    """One field of a shard's source record against what this run would record."""
    if field != "episodes":
        return f"{field} {found!r}, expected {expected!r}"
    found = found or []
    if len(found) != len(expected):
        return f"{len(found)} episodes, expected {len(expected)}"
    i = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
    return f"episode {found[i]!r} where {expected[i]!r} was expected"


def generate(out: str, episodes: int = 40, seed: int = 0, split: str = "seen", workers: int = 1,
             per_shard: int = 16, image_size: int = 64, source: Literal["tabletop", "metaworld"] = "tabletop",
             tasks: str = "", episodes_per_task: int = 10, recovery_alpha: float = world.ExpertConfig().recovery_alpha):
    """Write expert episodes as shards; existing complete shards made the same way are kept (resume). The
    embedded world (`tabletop`): `episodes` over its families, a share `recovery_alpha` of them started
    perturbed near a contact pose. Meta-World: `episodes_per_task` for each of `tasks` (comma-separated,
    env.MW_TASKS; empty: all nine)."""
    os.makedirs(out, exist_ok=True)
    jobs = generation_jobs(out, episodes, seed, split, per_shard, image_size, source, tasks, episodes_per_task,
                           recovery_alpha)
    other = made_otherwise(out, jobs)            # never overwrite another dataset's shards
    if other:
        more = "; ..." if len(other) > 3 else ""
        raise DataError("; ".join(other[:3]) + more + " (an earlier run?); use a new --out or delete the old shards")
    todo = []
    for path, fn, args, _ in jobs:
        try:                                     # present and readable (so made the same way): resume past it
            read_header(path)
            continue
        except DataError:
            pass
        todo.append((fn, (path, *args)))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_run_job, todo))
    else:
        for job in todo:
            _run_job(job)
    index = build_index(out, DataConfig())
    kept = sum(e["kept"] for e in index["episodes"])
    print(f"{out}: {len(todo)} shard(s) written, {len(index['episodes'])} episodes, {kept} kept")
    return index


def _run_job(job):
    fn, args = job
    return fn(args)


# --- synchronisation: the lag between what the camera sees and what the arm does ---
def visual_motion(frames, still=0.1):
    """(T+1, V, H, W, 3) uint8 -> (T,): how many views change between frames t and t + 1. A view
    "changes" when its mean absolute difference exceeds `still` x its median non-zero difference,
    which keeps sensor noise (and, here, nothing at all) below the line."""
    d = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(2, 3, 4))     # (T, V)
    out = np.zeros(len(d))
    for v in range(d.shape[1]):
        nz = d[:, v][d[:, v] > 0]
        out += d[:, v] > (still * np.median(nz) if len(nz) else 0)
    return out


def action_motion(state, eps=1e-3):
    """(T+1, S) -> (T,): 1 where the end effector moves at least eps metres or the gripper moves."""
    d = np.abs(np.diff(state.astype(np.float64), axis=0))
    return ((np.linalg.norm(d[:, :3], axis=1) >= eps) | (d[:, 3] > 1e-6)).astype(np.float64)


def lag_correlations(vis, act, max_lag):
    """{k: correlation of vis[t + k] with act[t]} for k in -max_lag..max_lag (k > 0: the video runs k frames
    behind the actions); -1 where the overlap is too short or a signal is constant over it."""
    def corr(k):
        a, v = (act[: len(act) - k], vis[k:]) if k >= 0 else (act[-k:], vis[: len(vis) + k])
        return float(np.corrcoef(a, v)[0, 1]) if len(a) > 2 and a.std() > 0 and v.std() > 0 else -1.0
    return {k: corr(k) for k in range(-max_lag, max_lag + 1)}


def estimate_lag(vis, act, max_lag, min_gain=0.05, r=None):
    """The lag k in -max_lag..max_lag maximising the correlation of vis[t + k] with act[t] (r: those
    correlations, if already computed). The signals are the moving/still patterns, whose pauses and starts
    line up sharply; a lag other than 0 must beat lag 0 by min_gain. Measured on 150 clean embedded-world
    episodes: no false lag, and an injected lag of -4..4 frames is found exactly in 83-85% of episodes (the
    rest, with no pause to line up, keep lag 0; `bench.py data`)."""
    r = lag_correlations(vis, act, max_lag) if r is None else r
    best = max(r, key=lambda k: (r[k], -abs(k)))
    return best if r[best] - r[0] >= min_gain else 0


def align(tensors, lag):
    """Shift frames (and their camera poses) against the state-side streams by `lag`, dropping the
    ends: lag > 0 keeps frames[lag:] with state[:-lag]; lag < 0 keeps frames[:lag] with state[-lag:]."""
    if lag == 0:
        return tensors
    T = len(tensors["action"])
    n = T - abs(lag)                                          # actions left
    f0, s0 = max(lag, 0), max(-lag, 0)
    out = {}
    for k, v in tensors.items():
        if k in ("frames", "cam_pose"):
            out[k] = v[f0: f0 + n + 1]
        elif k == "action":
            out[k] = v[s0: s0 + n]
        else:
            out[k] = v if k == "intrinsics" else v[s0: s0 + n + 1]
    return out


# Meta-World's renders keep changing while its arm stands still (and stay still while it moves), so even in
# sync the two motion signals hardly line up (the embedded world's clean episodes correlate at 0.6 and
# above: `bench.py data`), and a coincidence gave one of 359 clean episodes lag -1, which align() then
# applied. Its episodes are synchronous by construction (frame t is rendered from the MuJoCo state of
# state t, before action t; a replay of the stored actions reproduces every frame), so they are not
# lag-tested: lag 0.
def synchronous_by_construction(meta):
    return str((meta or {}).get("world_version", "")).startswith("metaworld")


# --- cleaning: every episode is kept or quarantined with its reasons, never silently dropped ---
def meta_problems(meta):
    """What the windows read from an episode's header record: its instruction and its L1 captions."""
    l1 = meta["captions"].get("L1") if isinstance(meta.get("captions"), dict) else None
    ok = isinstance(l1, list) and all(isinstance(c, dict) and isinstance(c.get("start"), int) and
                                      isinstance(c.get("end"), int) and isinstance(c.get("text"), str) for c in l1)
    return ([] if isinstance(meta.get("instruction"), str) else ["metadata: no 'instruction' string"]) + \
        ([] if ok else ["metadata: no captions 'L1' list of {start, end, text} records"])


def check_episode(t, cfg, meta=None, dims=None):
    """Reasons to quarantine one episode (empty: keep it) and the estimated lag. t: its tensors; meta: its
    header record (None: not checked); dims: the dataset's widths (S, A, V, H, W) (None: this episode's own)."""
    reasons = meta_problems(meta) if meta is not None else []
    missing = [k for k in TENSORS if t.get(k) is None]
    if missing:
        return reasons + [f"missing stream(s): {', '.join(missing)}"], 0
    f = t["frames"]
    if f.ndim != 5 or f.shape[-1] != 3:
        return reasons + [f"shape mismatch: frames {f.shape} (expected (T+1, V, H, W, 3))"], 0
    T = len(f) - 1                                              # the video sets the length
    S, A, V, H, W = dims or (*(t[k].shape[1] if t[k].ndim == 2 else 0 for k in ("state", "action")), *f.shape[1:4])
    want = {"frames": (T + 1, V, H, W, 3), "state": (T + 1, S), "action": (T, A), "time": (T + 1,),
            "intrinsics": (V, 4), "cam_pose": (T + 1, V, 4, 4), "progress": (T + 1,)}
    want |= {k: (T + 1,) for k in t if k.startswith("label_") and t[k] is not None}   # labels are optional
    bad = [f"{k} has {len(t[k]) if t[k].ndim else 0} rows (expected {n[0]})"
           for k, n in want.items() if k != "intrinsics" and t[k].shape[:1] != n[:1]]
    if bad:
        return reasons + [f"length mismatch against {T + 1} frames: {', '.join(bad)}"], 0
    bad = [f"{k} {t[k].shape} (expected {n})" for k, n in want.items() if t[k].shape != n]
    bad += [f"state width {S} (expected >= 4: x, y, z, aperture first)"] if S < 4 else []
    bad += [f"action width {A} (expected 4: dx, dy, dz, grip)"] if A != 4 else []
    if bad:
        return reasons + [f"shape mismatch: {', '.join(bad)}"], 0
    bad = [f"non-finite values in {k} (first at row {int(np.argwhere(~np.isfinite(v))[0, 0])})"
           for k, v in t.items() if v is not None and np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        return reasons + bad, 0
    dt = np.diff(t["time"])
    if (dt <= 0).any():
        reasons.append(f"non-monotonic timestamps at step {int(np.argmax(dt <= 0))}")
    jump = np.linalg.norm(np.diff(t["state"][:, :3], axis=0), axis=1)
    if (jump > cfg.max_jump).any():
        reasons.append(f"discontinuity: end effector moved {jump.max():.3f} m in one step at step "
                       f"{int(jump.argmax())} (max {cfg.max_jump})")
    K = min(cfg.max_lag, (T - 1) // 2)                          # at most half the steps shifted out
    if K <= cfg.plausible_lag or synchronous_by_construction(meta):   # too short to tell a lag, or no need
        return reasons, 0
    vis, act = visual_motion(f), action_motion(t["state"])
    r = lag_correlations(vis, act, K)
    lag, best = estimate_lag(vis, act, K, r=r), max(r.values())
    if abs(lag) > cfg.plausible_lag:
        reasons.append(f"implausible lag: video {lag:+d} frames against actions (|lag| <= {cfg.plausible_lag})")
    elif vis.std() > 0 and act.std() > 0 and best < cfg.min_lag_corr:   # a constant signal has nothing to line up
        reasons.append(f"no lag explains the video: best correlation of video and arm motion over lags "
                       f"-{K}..{K} is {best:.2f} (min {cfg.min_lag_corr})")
    return reasons, lag


def dataset_dims(paths):
    """The widths (S, A, V, H, W) most episodes of the shards share, from the headers alone (None: none readable)."""
    seen = collections.Counter()
    for path in paths:
        names = [m["name"] for m in read_header(path)]
        with safe_open(path, "np") as f:
            keys = set(f.keys())
            for n in names:
                s, a, fr = (f.get_slice(f"{n}.{k}").get_shape() if f"{n}.{k}" in keys else []
                            for k in ("state", "action", "frames"))
                if (len(s), len(a), len(fr)) == (2, 2, 5):
                    seen[(s[1], a[1], *fr[1:4])] += 1
    return seen.most_common(1)[0][0] if seen else None


def need_directory(root):
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such dataset directory (`python data.py generate --out {root}` makes one)")


def build_index(root, cfg):
    """Read every shard's header, check every episode (widths against the dataset's most common ones),
    compute normalisation statistics over the kept ones (float64), and write dataset.json atomically."""
    need_directory(root)
    shards = sorted(f for f in os.listdir(root) if f.startswith("shard-") and f.endswith(".safetensors"))
    if not shards:
        raise DataError(f"{root}: no shard-*.safetensors files")
    dims = dataset_dims([os.path.join(root, s) for s in shards])
    episodes, sums = [], None
    for s in shards:
        path = os.path.join(root, s)
        for m in read_header(path):
            t = load_tensors(path, m["name"], optional=True)
            reasons, lag = check_episode(t, cfg, m, dims)
            episodes.append({"shard": s, "name": m["name"], "T": len(t["action"]) if np.ndim(t.get("action")) else 0,
                             "lag": lag, "kept": not reasons, "reasons": reasons})
            if not reasons:
                t = align(t, lag)
                s_, a_ = t["state"].astype(np.float64), t["action"].astype(np.float64)
                parts = [len(s_), s_.sum(0), (s_ ** 2).sum(0), len(a_), a_.sum(0), (a_ ** 2).sum(0)]
                sums = parts if sums is None else [x + y for x, y in zip(sums, parts)]
    stats = {}
    if sums is not None:
        for key, (n, s1, s2) in (("state", sums[:3]), ("action", sums[3:])):
            mean = s1 / n
            stats[key] = {"mean": mean.tolist(), "std": np.sqrt(np.maximum(s2 / n - mean ** 2, 0)).clip(1e-6).tolist()}
    made = shard_source(os.path.join(root, shards[0]))
    index = {"format": FORMAT, "world_version": made.get("world_version", world.WORLD_VERSION), "episodes": episodes, "stats": stats,
             "config": asdict(cfg)}
    _write_json(os.path.join(root, "dataset.json"), index)
    return index


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_tensors(path, name, optional=False):
    """All of one episode's tensors (eagerly; see Dataset for lazy slices)."""
    out = {}
    with safe_open(path, "np") as f:
        keys = set(f.keys())
        for k in TENSORS + tuple(f"label_{k}" for k in LABELS):
            if f"{name}.{k}" in keys:
                out[k] = f.get_tensor(f"{name}.{k}")
            elif not optional:
                raise DataError(f"{path}: episode {name} has no tensor {k!r}")
    return out


RETIRED = ("min_event_len",)          # DataConfig fields since removed: ignored where an old file still has them


def config_from_dict(d, where, field="config"):
    """The inverse of asdict for DataConfig (dataset.json's `config`, a checkpoint's `data`); `where` names the file."""
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(d) - known - set(RETIRED))
    if unknown:
        raise DataError(f"{where}: field {field!r} expected DataConfig fields, found unknown {unknown} "
                        f"(written by another version of data.py?)")
    return DataConfig(**{k: v for k, v in d.items() if k in known})


class Dataset:
    """A dataset directory, read lazily: headers and the index in memory, tensors sliced on demand."""

    def __init__(self, root):
        self.root = root
        path = os.path.join(root, "dataset.json")
        need_directory(root)
        if not os.path.exists(path):
            raise DataError(f"{path}: missing (run `python data.py check {root}` to build it)")
        with open(path) as f:
            self.index = parse_json(f.read(), path)
        if self.index.get("format") != FORMAT:
            raise DataError(f"{path}: field 'format' expected {FORMAT!r}, found {self.index.get('format')!r} "
                            f"(run `python data.py check {root}` to rebuild it)")
        for k, typ in (("episodes", list), ("stats", dict), ("config", dict)):
            if not isinstance(self.index.get(k), typ):
                raise DataError(f"{path}: field {k!r} expected a JSON {typ.__name__}, found {self.index.get(k)!r:.40}")
        need = {"shard", "name", "T", "lag", "kept"}
        if not all(isinstance(e, dict) and need <= set(e) for e in self.index["episodes"]):
            raise DataError(f"{path}: field 'episodes' expected records with {sorted(need)}")
        self.cfg = config_from_dict(self.index["config"], path)
        self.meta = {}
        for s in sorted({e["shard"] for e in self.index["episodes"]}):
            for m in read_header(os.path.join(root, s)):
                self.meta[m["name"]] = m
        self.episodes = [e for e in self.index["episodes"] if e["kept"]]
        self.stats = {k: {s: np.array(v, np.float64) for s, v in d.items()} for k, d in self.index["stats"].items()}
        self._files = {}

    def __len__(self):
        return len(self.episodes)

    def _file(self, shard):
        if shard not in self._files:
            self._files[shard] = safe_open(os.path.join(self.root, shard), "np")
        return self._files[shard]

    def get(self, i, field, rows=None):
        """Tensor `field` of kept episode i, rows `rows` (a slice or index array) read lazily; the lag
        estimated at check time is applied (frames shifted against state and action)."""
        e = self.episodes[i]
        lag, T = e["lag"], e["T"]
        n = T - abs(lag)                                     # actions after alignment
        sl = self._file(e["shard"]).get_slice(f"{e['name']}.{field}")
        if field == "intrinsics":
            return sl[:]
        start = max(lag, 0) if field in ("frames", "cam_pose") else max(-lag, 0)
        rows = np.arange(n + (field != "action"))[rows if rows is not None else slice(None)]
        if len(rows) == 0:
            return sl[start:start][:0]
        lo_, hi_ = int(rows.min()), int(rows.max()) + 1
        block = sl[start + lo_: start + hi_]                 # one contiguous read covering the rows
        return block[rows - lo_]

    def length(self, i):
        e = self.episodes[i]
        return e["T"] - abs(e["lag"])

    def recovery(self, i, rows=None):
        """Per-frame recovery flags (all False for recorded data without that label)."""
        e = self.episodes[i]
        if f"{e['name']}.label_recovery" not in self._file(e["shard"]).keys():
            return np.zeros(len(np.arange(self.length(i) + 1)[rows if rows is not None else slice(None)]), bool)
        return self.get(i, "label_recovery", rows).astype(bool)

    def episode_meta(self, i):
        return self.meta[self.episodes[i]["name"]]


def check(root: Root, json_out: JsonFlag = False):
    """Re-check every episode of a dataset, rewrite its index, and print the report."""
    cfg = DataConfig()
    index = build_index(root, cfg)
    bad = [e for e in index["episodes"] if not e["kept"]]
    report = {"root": root, "episodes": len(index["episodes"]), "kept": len(index["episodes"]) - len(bad),
              "quarantined": len(bad), "reasons": {f"{e['shard']}:{e['name']}": e["reasons"] for e in bad}}
    kept = {(e["shard"], e["name"]) for e in index["episodes"] if e["kept"]}
    L = np.array([c["end"] - c["start"] for s in sorted({sh for sh, _ in kept}) for m in read_header(os.path.join(root, s))
                  if (s, m["name"]) in kept for c in m["captions"]["L1"]])
    if len(L):                                   # what max_event_len and the caption-drop knots are read against
        report["l1_lengths"] = {"events": len(L), "min": int(L.min()), "max": int(L.max()),
                                **{f"p{q}": float(np.percentile(L, q)) for q in (95, 97, 99)},
                                "over_max_event_len": float((L > cfg.max_event_len).mean())}
    if json_out:
        print(json.dumps(report, indent=1))
        return report
    for name, reasons in report["reasons"].items():
        print(f"quarantined {name}: {'; '.join(reasons)}")
    print(f"{root}: {report['kept']} kept, {report['quarantined']} quarantined of {report['episodes']}")
    if "l1_lengths" in report:
        r = report["l1_lengths"]
        print(f"L1 events: {r['events']}, {r['min']}-{r['max']} steps; percentiles 95 / 97 / 99: {r['p95']:.0f} / "
              f"{r['p97']:.0f} / {r['p99']:.0f}; {r['over_max_event_len']:.1%} longer than max_event_len {cfg.max_event_len}")
    return report


# --- events: the unit of learning (annotations when a dataset has them, else the segmenter) ---
# One event record, shared by the embedded world and recorded data:
#   {episode, start, end, text, level, skill}  over action indices [start, end) of the episode,
#   plus optional object, target, recovery. level is "L3" .. "L0"; windows use L1.
# AgiBot-World: each `action_config` entry {start_frame, end_frame, action_text, skill} of an
#   episode becomes one L1 event (end exclusive = end_frame + 1, frames at the dataset's rate).
# LeRobot: a `subtask` annotation (a per-frame subtask index into the subtasks table) becomes one
#   event per run of equal indices, text = the subtask string, skill = its first verb.
EVENT_FIELDS = {"episode": str, "start": int, "end": int, "text": str, "level": str, "skill": str}


def read_events_jsonl(path):
    """Recorded annotations, one event record per line, validated field by field."""
    events = []
    for n, line in enumerate(open(path), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not JSON ({err})") from None
        for k, typ in EVENT_FIELDS.items():
            if not isinstance(e.get(k), typ):
                raise DataError(f"{path}:{n}: field {k!r} expected {typ.__name__}, found {e.get(k)!r}")
        if not 0 <= e["start"] < e["end"]:
            raise DataError(f"{path}:{n}: expected 0 <= start < end, found start={e['start']} end={e['end']}")
        events.append(e)
    return events


def moving_steps(state, eps):
    """(T+1, S) -> (T,) bool: the step moves the end effector or the gripper (not quasi-static)."""
    d = np.abs(np.diff(state.astype(np.float64), axis=0))
    return (np.linalg.norm(d[:, :3], axis=1) >= eps) | (d[:, 3] > 1e-6)


def split_long(events, max_len):
    """Events longer than max_len become ceil(L / max_len) near-equal parts with the same caption; every
    part keeps the whole event's length L as `event_len` (the caption drop reads it)."""
    out = []
    for e in events:
        L = e["end"] - e["start"]
        n = math.ceil(L / max_len)
        cuts = np.linspace(e["start"], e["end"], n + 1).round().astype(int)
        out += [e | {"start": int(a), "end": int(b), "part": (j, n), "event_len": L}
                for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
    return out


def episode_events(ds, i, source="annotations"):
    """L1 events of kept episode i (action indices after alignment), split at max_event_len, each with
    `steps`: its action indices with quasi-static steps pruned (all of them if none moves)."""
    cfg, n, lag = ds.cfg, ds.length(i), ds.episodes[i]["lag"]
    state = ds.get(i, "state")
    if source == "annotations":
        shift = max(-lag, 0)
        events = [{k: c.get(k, "") for k in ("text", "skill", "object", "target", "recovery")}
                  | {"start": max(c["start"] - shift, 0), "end": min(c["end"] - shift, n)}
                  for c in ds.episode_meta(i)["captions"]["L1"]]
        events = [e for e in events if e["end"] > e["start"]]
    else:
        frames = ds.get(i, "frames")
        events = [e | {"skill": "", "object": "", "target": "", "recovery": ""}
                  for e in segment(frames, state, ds.get(i, "action"))]
    moving = moving_steps(state, cfg.static_eps)
    events = split_long(events, cfg.max_event_len)
    for e in events:
        idx = np.arange(e["start"], e["end"])
        e["steps"] = idx[moving[idx]] if moving[idx].any() else idx
        e["episode"], e["level"] = i, "L1"
    return events


# --- the automatic segmenter: signals only (METHOD.md section 2: offline, at atomic-action boundaries) ---
# Cuts an episode into atomic motion events using only what a robot log holds: the commanded
# action and the proprioceptive state (frames are accepted but not needed). An event starts where
# the gripper command flips, where the end effector starts moving after standing still, or where
# its direction of motion turns. Standing still (a controller's last short step, a pause) belongs
# to the event it ends, as in the expert's own records. Captions name only the motion primitive.
STILL = 0.25        # |commanded dx, dy, dz| below this (action units) is standing still: pauses are exact zeros,
                    # holding still with noise peaks near 0.19, a motion's first step is >= ~0.33 (speed >= 0.4)
TURN_COS = 0.5      # two moving steps whose directions differ by more than 60 degrees belong to different events
MIN_LEN = 1         # shortest event in steps (the expert's shortest true events last one step)
MAX_LEN = 90        # longest event in steps; the expert gives up on an event after 80 steps, plus a pause of <= 3
VERTICAL = 1.0      # a motion is "up" / "down" when |dz| exceeds VERTICAL times its horizontal speed
SIDEWAYS = 0.4      # a horizontal axis is named when it carries at least this share of the horizontal speed (~22 deg)


def _cuts(action):
    """(T,) bool: True where a new event starts (step 0 always)."""
    v, grip = action[:, :3], action[:, 3] > 0                             # (T, 3), (T,)
    speed = np.linalg.norm(v, axis=1)
    moving = speed > STILL
    last = np.maximum.accumulate(np.where(moving, np.arange(len(v)), -1))  # latest moving step <= t
    prev = np.concatenate([[-1], last[:-1]])                                # latest moving step < t
    u = v / np.maximum(speed, 1e-9)[:, None]                                # unit directions
    turn = moving & (prev >= 0) & ((u * u[np.maximum(prev, 0)]).sum(1) < TURN_COS)
    starts_moving = moving & ~np.concatenate([[False], moving[:-1]])
    flip = grip != np.concatenate([grip[:1], grip[:-1]])
    cut = turn | starts_moving | flip
    cut[0] = True
    return cut


def _enforce_lengths(starts, T, min_len, max_len):
    """Merge events shorter than min_len into their successor (the last one into its predecessor), then
    split those longer than max_len evenly."""
    kept = [0]
    for s in starts[1:]:
        if s - kept[-1] >= min_len and T - s >= min_len:
            kept.append(s)
    bounds = []
    for s, e in zip(kept, kept[1:] + [T]):
        n = -(-(e - s) // max_len)                                          # pieces needed, rounded up
        bounds += np.linspace(s, e, n + 1).round().astype(int)[:-1].tolist()
    return bounds + [T]


def _caption(v, aperture):
    """Motion-primitive words for one event: v (L, 3) commanded motion, aperture (L + 1,) 1 open .. 0 closed."""
    moving = v[np.linalg.norm(v, axis=1) > STILL]
    if len(moving) == 0:
        change = aperture[-1] - aperture[0]
        return "close the gripper" if change < 0 else "open the gripper" if change > 0 else "hold still"
    dx, dy, dz = moving.mean(0)
    flat = np.hypot(dx, dy)
    if abs(dz) > VERTICAL * flat:
        return "move up" if dz > 0 else "move down"
    words = [w for w, c in (("right" if dx > 0 else "left", dx), ("forward" if dy > 0 else "backward", dy))
             if abs(c) >= SIDEWAYS * flat]
    return "move " + " and ".join(words)


def segment(frames, state, action, min_len=MIN_LEN, max_len=MAX_LEN):
    """Events [{start, end, text}] over action indices [start, end) that tile 0..T in order.
    frames (T+1, V, H, W, 3) or None (unused); state (T+1, S) x, y, z, aperture first; action (T, 4) dx, dy, dz, grip."""
    action, state = np.asarray(action, np.float64), np.asarray(state, np.float64)
    T = len(action)
    if action.shape != (T, 4) or state.ndim != 2 or state.shape[0] != T + 1 or state.shape[1] < 4 or \
            not (np.isfinite(action).all() and np.isfinite(state).all()):
        raise ValueError(f"segment: expected finite action (T, 4) and state (T+1, S >= 4), found {action.shape} and {state.shape}")
    if not 1 <= min_len <= max_len // 2:       # so that splitting a long event never leaves a piece below min_len
        raise ValueError(f"segment: need 1 <= min_len <= max_len // 2, found {min_len}, {max_len}")
    if T == 0:
        return []
    bounds = _enforce_lengths(np.flatnonzero(_cuts(action)).tolist(), T, min_len, max_len)
    return [{"start": s, "end": e, "text": _caption(action[s:e, :3], state[s:e + 1, 3])}
            for s, e in zip(bounds[:-1], bounds[1:])]


# --- how well the cuts match the expert's L1 events ---
def _matches(pred, true, tol):
    """Greedy one-to-one matching, closest pairs first: (matches, n_pred, n_true); step 0 is no boundary."""
    pred, true = sorted(set(pred) - {0}), sorted(set(true) - {0})
    pairs = sorted((abs(p - t), p, t) for p in pred for t in true if abs(p - t) <= tol)
    used_p, used_t = set(), set()
    for _, p, t in pairs:
        if p not in used_p and t not in used_t:
            used_p.add(p)
            used_t.add(t)
    return len(used_p), len(pred), len(true)


def _scores(m, n_pred, n_true):
    precision = m / n_pred if n_pred else 1.0     # no prediction makes no false alarm
    recall = m / n_true if n_true else 1.0        # nothing to find is all found
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1, n_pred, n_true


def boundary_scores(pred_starts, true_starts, tol=2):
    """(precision, recall, f1, n_pred, n_true) of predicted event starts against true ones, within +-tol steps."""
    return _scores(*_matches(pred_starts, true_starts, tol))


def segment_eval(items, tol=2):
    """items: (frames, state, action, true L1 starts, has a recovery) per episode -> micro-averaged
    boundary scores {"all": {...}, "recovery": {...}}."""
    totals = {"all": np.zeros(4, int), "recovery": np.zeros(4, int)}          # matches, n_pred, n_true, episodes
    for frames, state, action, true, recovery in items:
        counts = np.array([*_matches([e["start"] for e in segment(frames, state, action)], true, tol), 1])
        totals["all"] += counts
        if recovery:
            totals["recovery"] += counts
    keys = ("precision", "recall", "f1", "n_pred", "n_true")
    return {k: dict(zip(keys, _scores(*map(int, c[:3]))), episodes=int(c[3])) for k, c in totals.items()}


def segment_items(ds, episodes=None):
    """segment_eval's items for kept episodes of ds (all of them by default): the annotated L1 starts
    in aligned steps, and whether the episode has a recovery (a recovery event, a perturbed start, or a slip)."""
    for i in range(len(ds)) if episodes is None else episodes:
        m, shift = ds.episode_meta(i), max(-ds.episodes[i]["lag"], 0)
        true = [c["start"] - shift for c in m["captions"]["L1"] if 0 < c["start"] - shift < ds.length(i)]
        rec = bool(ds.recovery(i).any() or m.get("recovery_start") or m.get("slips", 0) > 0)
        yield None, ds.get(i, "state"), ds.get(i, "action"), true, rec


def segment_eval_cli(root: Root, json_out: JsonFlag = False, tol: int = 2):
    """Score `segment` against the annotated L1 starts (+-tol steps), over all kept episodes and over
    those with a recovery (a recovery event, a perturbed start, or a slip)."""
    report = segment_eval(segment_items(Dataset(root)), tol)
    print(json.dumps(report, indent=1) if json_out else "\n".join(
        f"{k}: precision {v['precision']:.3f} recall {v['recall']:.3f} F1 {v['f1']:.3f} "
        f"({v['n_true']} boundaries, {v['episodes']} episodes)" for k, v in report.items()))
    return report


def caption_drop_prob(L, cfg):
    """rho(L): rho_min up to l_min, rho_max from l_max, a cosine ramp between (METHOD.md section 2).
    [ours] The report's knots are 129 and 220 raw frames; here l_max = 26 steps is about the 97th
    percentile of L1 event lengths in the embedded world (95th: 24; `data.py check` prints them) and
    l_min keeps the ratio 129/220."""
    x = np.clip((np.asarray(L, np.float64) - cfg.l_min) / (cfg.l_max - cfg.l_min), 0, 1)
    return cfg.rho_min + (cfg.rho_max - cfg.rho_min) * (1 - np.cos(np.pi * x)) / 2


# --- training windows: events (variable length) and chunks (fixed length, observation-centred) ---
# Every window is a "sequence" of frames, action tokens and state tokens, each tagged with a frame
# index tau and a segment id; a padded batch holds one window per row, a packed batch several, and
# the same block-diagonal mask (equal segment ids) serves both.
def normalise(x, stats):
    return ((x - stats["mean"]) / stats["std"]).astype(np.float32)


def action_targets(action, cfg, stats):
    """(L, A) recorded actions -> the normalised targets the action tower learns. Per-step deltas, or
    with cfg.action_offsets the xyz summed from the window's first action (where each action leaves
    the hand, relative to where the window starts; the gripper command as is). [ours] The report does
    not say; offsets can be read from a future frame directly, where a delta is a difference of two,
    and an offset's error does not accumulate over the event (Chi et al. 2023, Diffusion Policy,
    found position targets better than velocity targets)."""
    if not cfg.action_offsets:
        return normalise(action, stats["action"])
    out = action.astype(np.float64)
    out[:, :3] = np.cumsum(out[:, :3], 0)
    return normalise(out, stats["offset"])


def actions_from_targets(x, cfg, stats):
    """Inverse of action_targets for one window's (L, A) normalised targets -> actions (float64).
    Pass only the valid rows (a chunk window's padded tail would become steps)."""
    st = stats["offset" if cfg.action_offsets else "action"]
    a = np.asarray(x, np.float64) * st["std"] + st["mean"]
    if cfg.action_offsets:
        a[:, :3] = np.diff(a[:, :3], axis=0, prepend=0)
    return a


def offset_stats(ds):
    """Normalisation statistics of the offset targets over every event window of the dataset. Chunk
    windows (16 steps) use them too: their offsets are then a little below unit scale."""
    per, _ = all_events(ds)
    rows = [np.cumsum(ds.get(i, "action", e["steps"]).astype(np.float64)[:, :3], 0) for i, ev in enumerate(per) for e in ev]
    xyz = np.concatenate(rows)
    mean = np.append(xyz.mean(0), ds.stats["action"]["mean"][3:])
    std = np.append(xyz.std(0), ds.stats["action"]["std"][3:]).clip(1e-6)
    return {"mean": mean, "std": std}


def with_targets(ds, offsets):
    """The dataset set to train on offset (True) or delta (False) action targets."""
    ds.cfg = replace(ds.cfg, action_offsets=offsets)
    if offsets and "offset" not in ds.stats:
        ds.stats["offset"] = offset_stats(ds)
    return ds


def reasoning_at(meta, frame, shift):
    """The latest reasoning trace at or before `frame` (aligned indices)."""
    traces = [r for r in meta.get("reasoning", []) if r["frame"] - shift <= frame]
    return traces[-1]["text"] if traces else ""


def event_window(ds, events, j, rng):
    """Window of event j of one episode's event list: observed keyframe + future frames every k_p
    actions, the (pruned) action sequence, the state token, captions, remaining time, reasoning."""
    cfg, e = ds.cfg, events[j]
    i, steps = e["episode"], e["steps"]
    L, meta, shift = len(steps), ds.episode_meta(i), max(-ds.episodes[i]["lag"], 0)
    F = math.ceil(L / cfg.k_p)
    future = steps[np.minimum(np.arange(1, F + 1) * cfg.k_p, L) - 1] + 1      # frame after k_p f actions
    rows = np.concatenate([[steps[0]], future])
    dropped = bool(rng.random() < caption_drop_prob(e["event_len"], cfg))        # the whole event's length, not the part's
    nxt = events[j + 1]["text"] if j + 1 < len(events) else "done"
    return {
        "frames": ds.get(i, "frames", rows),                                  # (1 + F, V, H, W, 3) uint8
        "frame_tau": np.arange(F + 1),                                         # 0: observed, 1..F future
        "cam_pose": ds.get(i, "cam_pose", rows),                               # (1 + F, V, 4, 4)
        "intrinsics": ds.get(i, "intrinsics"),                                 # (V, 4)
        "action": action_targets(ds.get(i, "action", steps), cfg, ds.stats),  # (L, A)
        "action_tau": np.arange(L) // cfg.k_p + 1,                             # METHOD.md section 3
        "state": normalise(ds.get(i, "state", steps[:1]), ds.stats["state"]), # (1, S), tau 0
        "caption": "" if dropped else e["text"], "event_text": e["text"], "caption_dropped": dropped,
        "remaining": float(L), "next_caption": nxt, "instruction": meta["instruction"],   # action tokens to go
        "reasoning": reasoning_at(meta, int(steps[0]), shift),
        "recovery": bool(e.get("recovery")) or bool(ds.recovery(i, steps).any()),
        "chunk_index": -1,
    }


def chunk_window(ds, i, c):
    """Chunk c of episode i: anchor a = c * N k_p, M history frames at a - m k_p (tau -m), the anchor
    (tau 0), N future frames (tau 1..N), and N k_p actions; steps past the end are masked."""
    cfg, n = ds.cfg, ds.length(i)
    H = cfg.chunk_frames * cfg.k_p
    a = c * H
    tau = np.arange(-cfg.history, cfg.chunk_frames + 1)
    rows = a + tau * cfg.k_p
    valid_f = (rows >= 0) & (rows <= n)
    steps = np.arange(a, a + H)
    valid_a = steps < n
    act = np.zeros((H, len(ds.stats["action"]["mean"])), np.float32)
    act[valid_a] = action_targets(ds.get(i, "action", steps[valid_a]), cfg, ds.stats)
    meta = ds.episode_meta(i)
    return {
        "frames": ds.get(i, "frames", np.clip(rows, 0, n)), "frame_tau": tau, "frame_valid": valid_f,
        "cam_pose": ds.get(i, "cam_pose", np.clip(rows, 0, n)), "intrinsics": ds.get(i, "intrinsics"),
        "action": act, "action_tau": np.arange(H) // cfg.k_p + 1, "action_valid": valid_a,
        "state": normalise(ds.get(i, "state", [a]), ds.stats["state"]),
        "caption": meta["instruction"], "event_text": meta["instruction"], "caption_dropped": False,
        "remaining": float(max(n - a, 0)), "next_caption": "", "instruction": meta["instruction"],
        "reasoning": reasoning_at(meta, a, max(-ds.episodes[i]["lag"], 0)),
        "recovery": bool(ds.recovery(i, np.clip(steps, 0, n)).any()), "chunk_index": c,
    }


def collate(groups):
    """groups: list of rows, each a list of windows packed into one sequence (one window per row is
    plain padding). Returns torch tensors: per token a segment id (the window's place in its row,
    -1 for padding), so `block_mask(seg_q, seg_k)` forbids attention across events."""
    B = len(groups)
    nf = max(sum(len(w["frame_tau"]) for w in g) for g in groups)
    nk = max(sum(len(w["action_tau"]) for w in g) for g in groups)
    ns = max(len(g) for g in groups)
    w0 = groups[0][0]
    V, Hh, Ww = w0["frames"].shape[1:4]
    out = {"frames": torch.zeros(B, nf, V, Hh, Ww, 3, dtype=torch.uint8), "frame_tau": torch.zeros(B, nf, dtype=torch.long),
           "frame_seg": torch.full((B, nf), -1), "cam_pose": torch.eye(4).repeat(B, nf, V, 1, 1),
           "intrinsics": torch.zeros(B, ns, V, 4), "action": torch.zeros(B, nk, w0["action"].shape[1]),
           "action_tau": torch.zeros(B, nk, dtype=torch.long), "action_seg": torch.full((B, nk), -1),
           "state": torch.zeros(B, ns, w0["state"].shape[1]), "state_seg": torch.full((B, ns), -1),
           "remaining": torch.zeros(B, ns), "chunk_index": torch.full((B, ns), -1),
           "caption_dropped": torch.zeros(B, ns, dtype=torch.bool), "recovery": torch.zeros(B, ns, dtype=torch.bool)}
    texts = {k: [[""] * ns for _ in range(B)] for k in ("caption", "event_text", "next_caption", "instruction", "reasoning")}
    for b, g in enumerate(groups):
        f = k = 0
        for s, w in enumerate(g):
            vf = w.get("frame_valid", np.ones(len(w["frame_tau"]), bool))
            va = w.get("action_valid", np.ones(len(w["action_tau"]), bool))
            F, K = len(vf), len(va)
            out["frames"][b, f:f + F] = torch.from_numpy(w["frames"])
            out["frame_tau"][b, f:f + F] = torch.from_numpy(w["frame_tau"])
            out["frame_seg"][b, f:f + F] = torch.where(torch.from_numpy(vf), s, -1)
            out["cam_pose"][b, f:f + F] = torch.from_numpy(w["cam_pose"])
            out["action"][b, k:k + K] = torch.from_numpy(w["action"])
            out["action_tau"][b, k:k + K] = torch.from_numpy(w["action_tau"])
            out["action_seg"][b, k:k + K] = torch.where(torch.from_numpy(va), s, -1)
            out["intrinsics"][b, s] = torch.from_numpy(w["intrinsics"])
            out["state"][b, s], out["state_seg"][b, s] = torch.from_numpy(w["state"][0]), s
            out["remaining"][b, s], out["chunk_index"][b, s] = w["remaining"], w["chunk_index"]
            out["caption_dropped"][b, s], out["recovery"][b, s] = w["caption_dropped"], w["recovery"]
            for key in texts:
                texts[key][b][s] = w[key]
            f, k = f + F, k + K
    return out | texts


def block_mask(seg_q, seg_k):
    """(B, Nq), (B, Nk) segment ids -> (B, Nq, Nk) bool: attend only within the same event. A padding
    query (-1) may attend anywhere, so that no row is empty (an all-masked softmax row is NaN)."""
    return ((seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] >= 0)) | (seg_q[:, :, None] < 0)


def pack(windows, max_actions):
    """Greedy first-fit packing of windows into rows of at most max_actions action tokens."""
    rows, used = [], []
    for w in sorted(windows, key=lambda w: -len(w["action_tau"])):
        K = len(w["action_tau"])
        for r in range(len(rows)):
            if used[r] + K <= max_actions:
                rows[r].append(w)
                used[r] += K
                break
        else:
            rows.append([w])
            used.append(K)
    return rows


# --- cluster-balanced sampling: two offline clusterings, balanced at once ---
def all_events(ds, source="annotations"):
    """Every event of every kept episode: (per-episode event lists, flat list of (episode, j))."""
    per = [episode_events(ds, i, source) for i in range(len(ds))]
    return per, [(i, j) for i, ev in enumerate(per) for j in range(len(ev))]


def text_features(texts, dim=128):
    """Hashed byte-trigram counts, L2-normalised: a fixed, training-free caption embedding."""
    out = np.zeros((len(texts), dim))
    for n, t in enumerate(texts):
        b = f"  {t.lower()} ".encode()
        for k in range(len(b) - 2):
            out[n, int.from_bytes(hashlib.blake2s(b[k:k + 3], digest_size=4).digest(), "little") % dim] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def pixel_features(frames):
    """(N, V, H, W, 3) uint8 keyframes, H, W >= 8 -> (N, V 8 8 3): block means on an 8 x 8 grid per view
    (blocks of near-equal size where 8 does not divide H or W)."""
    x = np.stack([b.mean(axis=2) for b in np.array_split(frames, 8, axis=2)], 2)        # (N, V, 8, W, 3)
    x = np.stack([b.mean(axis=3) for b in np.array_split(x, 8, axis=3)], 3) / 255.0     # (N, V, 8, 8, 3)
    return x.reshape(len(frames), -1)


def resample(action, n=16):
    """(L, A) -> (n, A) by linear interpolation along the event (a fixed-length trajectory)."""
    src = np.linspace(0, 1, len(action)) if len(action) > 1 else np.zeros(1)
    dst = np.linspace(0, 1, n)
    return np.stack([np.interp(dst, src, action[:, a]) for a in range(action.shape[1])], 1)


def standardise(x):
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def pca(x, dim):
    """Project rows of x onto their top `dim` principal directions (torch SVD, float64)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return (x @ vh[:dim].T).numpy()


def keyframe(w):
    """The window's frame at tau 0: an event window's observed frame, a chunk window's anchor."""
    return w["frames"][list(w["frame_tau"]).index(0)]


def embeddings(windows):
    """(vision-language, action-trajectory) embeddings of windows: caption text features with the
    keyframe's (tau 0: a chunk window's anchor, after its history) pixel features, reduced with PCA;
    the action sequence resampled and standardised."""
    text = text_features([w["event_text"] for w in windows])
    pix = standardise(pixel_features(np.stack([keyframe(w) for w in windows])))
    vl = np.concatenate([standardise(text), pix * math.sqrt(text.shape[1] / pix.shape[1])], 1)
    vl = pca(vl, min(16, len(windows) - 1, vl.shape[1]))
    act = standardise(np.stack([resample(w["action"][w.get("action_valid", slice(None))]).ravel() for w in windows]))
    return vl, act


def kmeans(x, k, iters=50, seed=0):
    """k-means with k-means++ initialisation, in torch. x (N, D) -> (labels (N,), centroids (k, D))."""
    x = torch.as_tensor(x, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    c = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):                               # k-means++: next centre with p ~ squared distance
        d2 = torch.cdist(x, c).min(1).values ** 2
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(x))
        c = torch.cat([c, x[torch.multinomial(p, 1, generator=g)]])
    for _ in range(iters):
        labels = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return torch.cdist(x, c).argmin(1), c


def balance_weights(vl, act, power):
    """The sampler's rule: p(i) ~ n_vl(c_vl(i))^-power * n_act(c_act(i))^-power. Each clustering's
    large clusters are tempered (power 0: uniform; 1 with one clustering: uniform over clusters), and
    every item keeps a non-zero probability."""
    n_vl, n_act = np.bincount(vl)[vl], np.bincount(act)[act]
    w = (n_vl.astype(np.float64) ** -power) * (n_act.astype(np.float64) ** -power)
    return w / w.sum()


class BalancedSampler:
    """Indices drawn with replacement from `weights` as one global stream: epoch e holds per_epoch
    draws, deterministic from (seed, e), and the epochs follow each other. Rank r of `world` takes
    global positions r, r + world, r + 2 world, ..., so the ranks advance in lockstep and the union of
    their first n draws is the stream's first n * world. The state is the global position."""

    def __init__(self, weights, per_epoch, seed=0, rank=0, world=1):
        self.w, self.per_epoch = torch.as_tensor(weights, dtype=torch.float64), per_epoch
        self.seed, self.rank, self.world = seed, rank, world
        self.pos, self._cache = 0, (None, None)          # pos: global draws consumed by all ranks together

    def stream(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.multinomial(self.w, self.per_epoch, replacement=True, generator=g)

    def __iter__(self):
        while True:
            epoch, offset = divmod(self.pos + self.rank, self.per_epoch)
            if self._cache[0] != epoch:
                self._cache = (epoch, self.stream(epoch))
            self.pos += self.world
            yield int(self._cache[1][offset])

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = int(s["pos"])


EMBEDDING_VERSION = 2                 # bump when `embeddings` changes, so saved clusterings are recomputed
KMEANS_SEEDS = (1, 2)                 # k-means seeds of the vision-language and the action clustering


def items_digest(windows, kind, cfg):
    """What a clustering depends on: the settings, and each window's caption, actions and keyframe."""
    h = hashlib.sha256(f"{kind} {EMBEDDING_VERSION} k {cfg.k_vl} {cfg.k_act} seeds {KMEANS_SEEDS}".encode())
    for w in windows:
        h.update(w["event_text"].encode() + np.asarray(w["action"]).tobytes() + np.ascontiguousarray(keyframe(w)).tobytes())
    return h.hexdigest()[:16]


def cluster(ds, windows, kind="event"):
    """Both clusterings of a set of windows, computed once and saved (clusters-<kind>.safetensors);
    recomputed when the windows or the clustering settings change. Returns (vl labels, act labels) as numpy int64."""
    path = os.path.join(ds.root, f"clusters-{kind}.safetensors")
    digest = items_digest(windows, kind, ds.cfg)
    if os.path.exists(path):
        with safe_open(path, "np") as f:
            if (f.metadata() or {}).get("digest") == digest:
                return f.get_tensor("vl"), f.get_tensor("act")
    vl_x, act_x = embeddings(windows)
    vl, vl_c = kmeans(vl_x, ds.cfg.k_vl, seed=KMEANS_SEEDS[0])
    act, act_c = kmeans(act_x, ds.cfg.k_act, seed=KMEANS_SEEDS[1])
    fd, tmp = tempfile.mkstemp(dir=ds.root, suffix=".tmp")
    os.close(fd)
    save_file({"vl": vl.numpy(), "act": act.numpy(), "vl_centroids": vl_c.numpy(), "act_centroids": act_c.numpy()},
              tmp, metadata={"digest": digest, "kind": kind})
    os.replace(tmp, path)
    return vl.numpy(), act.numpy()


def per_step(ds):
    """The dataset as the clusterings see it: per-step action targets, whatever the tower learns, so
    that --data.action-offsets changes the targets and not the sampler."""
    if not ds.cfg.action_offsets:
        return ds
    view = copy.copy(ds)
    view.cfg = replace(ds.cfg, action_offsets=False)
    return view


def event_windows(ds, source="annotations", seed=0):
    """All event windows once (for clustering, which reads the undropped `event_text`). Training calls
    event_window per draw with its own rng, so each draw redraws the caption drop."""
    ds = per_step(ds)
    per, items = all_events(ds, source)
    rng = np.random.default_rng(seed)
    return [event_window(ds, per[i], j, rng) for i, j in items]


def all_chunks(ds):
    """Every chunk of every kept episode: a flat list of (episode, chunk index)."""
    H = ds.cfg.chunk_frames * ds.cfg.k_p
    return [(i, c) for i in range(len(ds)) for c in range(math.ceil(ds.length(i) / H))]


def chunk_windows(ds):
    ds = per_step(ds)
    return [chunk_window(ds, i, c) for i, c in all_chunks(ds)]


def entropy(labels, k):
    p = np.bincount(labels, minlength=k) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def clusters(root: Root, kind: Literal["event", "chunk"] = "event", draws: int = 20000, json_out: JsonFlag = False):
    """Cluster sizes, and the sampled-label entropy and recovery share with and without balancing."""
    ds = Dataset(root)
    windows = event_windows(ds) if kind == "event" else chunk_windows(ds)
    vl, act = cluster(ds, windows, kind)
    rec = np.array([w["recovery"] for w in windows])
    report = {"items": len(windows), "vl_sizes": np.bincount(vl).tolist(), "act_sizes": np.bincount(act).tolist()}
    for name, w in (("uniform", np.full(len(windows), 1 / len(windows))),
                    ("balanced", balance_weights(vl, act, ds.cfg.balance_power))):
        idx = BalancedSampler(w, draws, seed=0).stream(0).numpy()
        report[name] = {"entropy_vl": entropy(vl[idx], vl.max() + 1), "entropy_act": entropy(act[idx], act.max() + 1),
                        "recovery_share": float(rec[idx].mean()), "min_prob": float(w.min())}
    if json_out:
        print(json.dumps(report, indent=1))
        return report
    print(f"{root}: {kind} windows {report['items']}; vision-language cluster sizes {report['vl_sizes']}; "
          f"action cluster sizes {report['act_sizes']}")
    rows = [[k, f"{report[k]['entropy_vl']:.3f}", f"{report[k]['entropy_act']:.3f}",
             f"{report[k]['recovery_share']:.3f}", f"{report[k]['min_prob']:.2e}"] for k in ("uniform", "balanced")]
    print("| sampling | entropy (vision-language) | entropy (action) | recovery share | min item prob |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return report


# --- command line ---
if __name__ == "__main__":
    try:
        tyro.extras.subcommand_cli_from_dict({"generate": generate, "check": check, "segment-eval": segment_eval_cli,
                                              "clusters": clusters})
    except (ImportError, DataError) as e:        # the Meta-World extra is missing, or bad data: say what and where
        raise SystemExit(f"error: {e}") from None
