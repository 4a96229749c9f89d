"""eval.py: closed-loop evaluation in the embedded world, per task family and generalization split.

    python eval.py --ckpt runs/tiny --episodes 2                     # seconds: the table's shape
    python eval.py --ckpt runs/default                               # 20 episodes per (family, split, mode)
    python eval.py --ckpt runs/default --json-out results.json
    python eval.py --ckpt runs/default --open-loop-root data/default --episodes 0   # open-loop action error only
    python eval.py --env metaworld --tasks pick-place,drawer-open --ckpt runs/metaworld --episodes 50   # optional extra

Modes (METHOD.md sections 6 and 7), all on the same episode list:
  event_oracle     event mode; the next-event caption from the world's oracle planner (the caption
                   only: the length comes from the model's remaining-time head)
  event_auto       event mode on the model's own next-event head
  unified_latents  unified mode, text from the Staircase latents (stage 5 towers)
  baseline         the chunk-centric baseline (U-Scratch, <run>/stage6.safetensors), unified mode
                   with the instruction
Success rates get a Wilson 95% interval, task progress a bootstrap 95% interval of the mean.
"""
import json
import math
import os
import time
from typing import Literal

import numpy as np
import torch
import tyro

import env as world
from infer import Policy

MODES = ("event_oracle", "event_auto", "unified_latents", "baseline")
EVAL_SEED = 1_000_000                 # evaluation episodes use task seeds from here on (training uses small ones)


def wilson(k, n, z=1.96):
    """Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, c - h), min(1.0, c + h))


def bootstrap(x, seed=0, n=2000):
    """Percentile bootstrap 95% interval of the mean."""
    x = np.asarray(x, np.float64)
    if len(x) == 0:
        return (0.0, 0.0)
    means = x[np.random.default_rng(seed).integers(0, len(x), (n, len(x)))].mean(1)
    return tuple(np.percentile(means, [2.5, 97.5]).tolist())


def episode_tasks(families, splits, episodes, seed):
    """The evaluation episode list: the same for every mode and every run with this seed."""
    return [(f, s, world.make_task(f, s, EVAL_SEED + seed * 10_000 + 100 * j + i))
            for j, (f, s) in enumerate((f, s) for f in families for s in splits) for i in range(episodes)]


def observation(obs, b):
    return {"frames": obs["frames"][b], "state": obs["state"][b], "intrinsics": obs["intrinsics"],
            "cam_pose": obs["cam_pose"][b]}


def rollout(policy, tasks, mode, horizon, image_size, seed=0):
    """All tasks at once, step-synchronous: a world whose queue of actions is empty asks the policy
    for its next event (or chunk); the requests of one tick go to the model as one batch."""
    envs = world.TabletopEnv(tasks, world.WorldConfig(image_size=image_size))
    n = len(tasks)
    queue, history, chunk = [[] for _ in range(n)], [[] for _ in range(n)], [0] * n
    t, done = np.zeros(n, int), np.zeros(n, bool)
    gen = torch.Generator().manual_seed(seed)
    keep = policy.cfg.history * policy.cfg.k_p + 1
    obs, active = envs.observe(), np.arange(n)
    instr = [tk.instruction for tk in tasks]
    while len(active):
        for k, b in enumerate(active):
            history[b] = (history[b] + [observation(obs, k)])[-keep:]
        need = [b for b in active if not queue[b]]
        if need:
            if mode in ("event_oracle", "event_auto"):
                caps = None
                if mode == "event_oracle":                  # the oracle names the event; the model still times it
                    caps = [(world.oracle_next_event(envs.worlds[b]) or {"text": "done"})["text"] for b in need]
                out = policy.event_actions([history[b][-1] for b in need], [instr[b] for b in need], caps, None, generator=gen)
            else:
                source = "latents" if mode == "unified_latents" else "instruction"
                out = policy.chunk_actions([history[b] for b in need], [instr[b] for b in need], [chunk[b] for b in need],
                                           source, generator=gen)
            for b, a in zip(need, out["action"]):
                queue[b], chunk[b] = list(a), chunk[b] + 1
        act = np.stack([queue[b].pop(0) for b in active])
        obs = envs.step(act, active)
        t[active] += 1
        finished = obs["success"] | (t[active] >= horizon)
        done[active[finished]] = True
        obs = {k: (v[~finished] if k != "intrinsics" else v) for k, v in obs.items()}
        active = active[~finished]
    return ([w.progress for w in envs.worlds], [bool(w.success) for w in envs.worlds])


def open_loop(policy, root, events=40, seed=0):
    """Open-loop action error on recorded events of a dataset: the policy gets each event's
    keyframe, true caption and true length; returns the normalised MSE of its actions and of
    predicting the mean action (the floor a useless policy gets), over `events` events."""
    import data
    ds = data.Dataset(root)
    per, items = data.all_events(ds)
    pick = np.random.default_rng(seed).choice(len(items), min(events, len(items)), replace=False)
    st = policy.stats["action"]
    err, floor = [], []
    gen = torch.Generator().manual_seed(seed)
    for k in pick:
        i, j = items[k]
        e = per[i][j]
        steps = e["steps"]
        obs = {"frames": ds.get(i, "frames", steps[:1])[0], "state": ds.get(i, "state", steps[:1])[0],
               "intrinsics": ds.get(i, "intrinsics"), "cam_pose": ds.get(i, "cam_pose", steps[:1])[0]}
        out = policy.event_actions([obs], [ds.episode_meta(i)["instruction"]], [e["text"]], [len(steps)], generator=gen)
        true = (ds.get(i, "action", steps) - st["mean"]) / st["std"]
        pred = (out["action"][0] - st["mean"]) / st["std"]
        err.append(float(((pred - true) ** 2).mean()))
        floor.append(float((true ** 2).mean()))
    return {"action_mse": float(np.mean(err)), "mean_action_mse": float(np.mean(floor)), "events": len(pick)}


def evaluate(ckpt: str, episodes: int = 20, families: tuple[str, ...] = world.FAMILIES, splits: tuple[str, ...] = world.SPLITS,
             modes: tuple[str, ...] = MODES, horizon: int = 300, seed: int = 0, image_size: int = 64):
    """Every mode on the same episodes; returns {mode: {(family, split): {success, progress, ...}}}."""
    items = episode_tasks(families, splits, episodes, seed)
    tasks = [tk for _, _, tk in items]
    policies = {}
    results = {}
    for mode in modes:
        path = os.path.join(ckpt, "stage6.safetensors") if mode == "baseline" and os.path.isdir(ckpt) else ckpt
        if path not in policies:
            policies[path] = Policy.from_checkpoint(path)
        t0 = time.perf_counter()
        progress, success = rollout(policies[path], tasks, mode, horizon, image_size, seed)
        cells = {}
        for (f, s, _), p, ok in zip(items, progress, success):
            cells.setdefault((f, s), ([], []))
            cells[(f, s)][0].append(p)
            cells[(f, s)][1].append(ok)
        results[mode] = {k: {"success": float(np.mean(ok)), "success_ci": wilson(sum(ok), len(ok)),
                             "progress": float(np.mean(p)), "progress_ci": bootstrap(p, seed), "episodes": len(p),
                             "per_episode": {"progress": p, "success": ok}}
                         for k, (p, ok) in cells.items()}
        results[mode]["_seconds"] = time.perf_counter() - t0
    return results


def table(results, families, splits):
    modes = list(results)
    lines = ["| family | split | " + " | ".join(f"{m} success / progress" for m in modes) + " |",
             "|---|---|" + "---|" * len(modes)]
    for f in families:
        for s in splits:
            cells = []
            for m in modes:
                r = results[m][(f, s)]
                cells.append(f"{r['success']:.2f} [{r['success_ci'][0]:.2f}, {r['success_ci'][1]:.2f}] / "
                             f"{r['progress']:.0f} [{r['progress_ci'][0]:.0f}, {r['progress_ci'][1]:.0f}]")
            lines.append(f"| {f} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- Meta-World (optional extra): success per task on the 50 held-out configurations of seed 1000 ---
MW_MODES = ("expert", "event_oracle", "event_auto", "baseline")   # expert: the scripted policy, the ceiling
MW_SPLIT = "held_out"


def rollout_metaworld(policy, envs, mode, horizon, seed=0):
    """`rollout` on a world.MetaWorldEnv: step-synchronous, to the first success or `horizon` steps.
    The oracle planner is the expert's current phase (its caption only; the model times the event).
    Frames are rendered only where the policy reads them: at a request, and for unified mode also
    k_p, 2 k_p, ..., M k_p steps before it. `expert` runs the scripted policy with the data's noise."""
    n = len(envs)
    queue, history, chunk, t = [[] for _ in range(n)], [[] for _ in range(n)], [0] * n, np.zeros(n, int)
    gen = torch.Generator().manual_seed(seed)
    rngs = [np.random.default_rng([seed, i, 37]) for i in range(n)]
    k_p, M_ = (policy.cfg.k_p, policy.cfg.history) if policy is not None else (1, 0)
    event = mode.startswith("event")
    read = lambda q: q == 0 if event else q % k_p == 0 and q <= M_ * k_p     # noqa: E731 (actions left before the next request)
    obs, active = envs.observe(render=mode != "expert"), np.arange(n)
    instr = [tk.instruction for tk in envs.tasks]
    while len(active):
        for k, b in enumerate(active):
            o = {key: obs[key][k] for key in ("frames", "state", "cam_pose") if key in obs} | {"intrinsics": obs["intrinsics"]}
            history[b] = (history[b] + [o])[-(M_ * k_p + 1):]
        need = [b for b in active if not queue[b]]          # served as in `rollout` (kept apart: see README)
        if need and mode == "expert":
            for b in need:
                a, _ = envs.expert_action(b)
                a[:3] = np.clip(a[:3] + rngs[b].normal(0, world.MW_NOISE, 3), -1, 1)
                queue[b] = [a]
        elif need and event:
            caps = [envs.oracle_next_event(b)["text"] for b in need] if mode == "event_oracle" else None
            out = policy.event_actions([history[b][-1] for b in need], [instr[b] for b in need], caps, None, generator=gen)
            for b, a in zip(need, out["action"]):
                queue[b] = list(a)
        elif need:
            source = "latents" if mode == "unified_latents" else "instruction"
            out = policy.chunk_actions([history[b] for b in need], [instr[b] for b in need], [chunk[b] for b in need],
                                       source, generator=gen)
            for b, a in zip(need, out["action"]):
                queue[b], chunk[b] = list(a), chunk[b] + 1
        act = np.stack([queue[b].pop(0) for b in active])
        obs = envs.step(act, active, render=False)
        t[active] += 1
        finished = obs["success"] | (t[active] >= horizon)
        obs = {k: (v[~finished] if k != "intrinsics" else v) for k, v in obs.items()}
        active = active[~finished]
        draw = [k for k, b in enumerate(active) if mode != "expert" and read(len(queue[b]))]
        if draw:
            frames = envs.render(active[draw])
            obs["frames"] = [frames[draw.index(k)] if k in draw else None for k in range(len(active))]
    return [100.0 * s for s in envs.success], list(envs.success)


def evaluate_metaworld(ckpt: str, tasks=world.MW_TASKS, episodes: int = 50, modes=MW_MODES, horizon: int = 300,
                       seed: int = 0, image_size: int = 64):
    """Every mode on the first `episodes` of the 50 configurations of MT1(task, seed=1000), per task;
    returns {mode: {(task, "held_out"): {success, success_ci, ...}}} like `evaluate`. A task's
    environments are made once (about 0.4 s and 25 MB each) and reset for every mode."""
    results = {m: {"_seconds": 0.0} for m in modes}
    path = {m: os.path.join(ckpt, "stage6.safetensors") if m == "baseline" and os.path.isdir(ckpt) else ckpt for m in modes}
    policies = {path[m]: Policy.from_checkpoint(path[m]) for m in modes if m != "expert"}
    for task in tasks:
        envs = world.MetaWorldEnv(world.mw_tasks(task, world.MW_EVAL_SEED, episodes, MW_SPLIT), image_size)
        try:
            for mode in modes:
                t0 = time.perf_counter()
                for i in range(len(envs)):
                    envs.reset_world(i)
                p, ok = rollout_metaworld(None if mode == "expert" else policies[path[mode]], envs, mode, horizon, seed)
                results[mode][(task, MW_SPLIT)] = {"success": float(np.mean(ok)), "success_ci": wilson(sum(ok), len(ok)),
                                                   "progress": float(np.mean(p)), "progress_ci": bootstrap(p, seed),
                                                   "episodes": len(ok), "per_episode": {"progress": p, "success": ok}}
                results[mode]["_seconds"] += time.perf_counter() - t0
        finally:
            envs.close()
    return results


def main_metaworld(ckpt, tasks, episodes, modes, horizon, seed, json_out):
    t0 = time.perf_counter()
    tasks = tuple(t for t in tasks.split(",") if t) or world.MW_TASKS
    res = evaluate_metaworld(ckpt, tasks, episodes, MW_MODES if modes == MODES else modes, horizon, seed)
    print(table(res, tasks, (MW_SPLIT,)))
    for m, r in res.items():
        mean = np.mean([r[(task, MW_SPLIT)]["success"] for task in tasks])
        print(f"{m}: mean success over {len(tasks)} task(s) {mean:.3f} ({r['_seconds']:.0f} s)")
    print(f"Meta-World, {episodes} held-out configurations (MT1 seed {world.MW_EVAL_SEED}) per task, horizon {horizon}, "
          f"seed {seed}; wall {time.perf_counter() - t0:.0f} s")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({m: {f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k: v for k, v in r.items()} for m, r in res.items()}, f, indent=1)
    return res


def main(ckpt: str, episodes: int = 20, families: tuple[str, ...] = world.FAMILIES, splits: tuple[str, ...] = world.SPLITS,
         modes: tuple[str, ...] = MODES, horizon: int = 300, seed: int = 0, json_out: str = "", open_loop_root: str = "",
         env: Literal["tabletop", "metaworld"] = "tabletop", tasks: str = ""):
    """Closed-loop table: success (Wilson 95%) and task progress (bootstrap 95%) per family, split and mode;
    with --open-loop-root DIR, first the open-loop action error on DIR's recorded events. With --env metaworld:
    success per task of --tasks (comma-separated; empty: all nine) on --episodes held-out configurations."""
    if env == "metaworld":
        try:
            return main_metaworld(ckpt, tasks, episodes, modes, horizon, seed, json_out)
        except ImportError as e:                 # the optional extra is missing: say what to install
            raise SystemExit(f"error: {e}") from None
    t0 = time.perf_counter()
    if open_loop_root:
        for name in ("stage2", "stage5", "stage6"):
            path = os.path.join(ckpt, f"{name}.safetensors")
            if os.path.exists(path):
                r = open_loop(Policy.from_checkpoint(path), open_loop_root, seed=seed)
                print(f"open loop, {name}: action MSE {r['action_mse']:.3f} (normalised) against "
                      f"{r['mean_action_mse']:.3f} for the mean action, {r['events']} events of {open_loop_root}")
        if episodes == 0:
            return {}
    res = evaluate(ckpt, episodes, families, splits, modes, horizon, seed)
    print(table(res, families, splits))
    print(f"{episodes} episodes per cell, horizon {horizon}, seed {seed}; wall {time.perf_counter() - t0:.0f} s")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({m: {f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k: v for k, v in r.items()} for m, r in res.items()}, f, indent=1)
    return res


if __name__ == "__main__":
    tyro.cli(main)
