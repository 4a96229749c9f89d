"""eval.py: closed-loop evaluation in the embedded world, per task family and generalization split.

    python eval.py --ckpt runs/tiny --episodes 1 --modes event_oracle baseline   # under a minute: the table's shape
    python eval.py --ckpt runs/default                               # 20 episodes per (family, split, mode)
    python eval.py --ckpt runs/default --json-out results.json
    python eval.py --ckpt runs/default --open-loop-root data/default --episodes 0   # open loop only: action MSE, PSNR, SSIM, F1
    python eval.py --ckpt runs/default --open-loop-root data/default --strips strips --episodes 0   # and PNG strips
    python eval.py --ckpt runs/default --open-loop-root data/default --episodes 0 --video-steps 20  # another video schedule
    python eval.py --ckpt runs/default --open-loop-root data/default --episodes 0 --caption-swaps 24  # does the caption steer an event?
    python eval.py --ckpt runs/default --episodes 10 --modes event_oracle event_told   # with the expert's future in place of the video
    python eval.py --ckpt runs/default --modes event_oracle --guidance 3   # event video with classifier-free guidance
    torchrun --standalone --nproc_per_node=2 eval.py --ckpt runs/default   # episodes sharded over 2 processes
    python eval.py --env metaworld --tasks pick-place,drawer-open --ckpt runs/metaworld --episodes 50   # optional extra
    python eval.py --env metaworld --ckpt runs/metaworld --modes event_oracle event_told baseline baseline_told
    python eval.py compare a.json b.json             # two --json-out files, paired on the same episodes
    python eval.py merge all.json a.json b.json      # --json-out files of different families (or splits), one table
    python eval.py claims a.json                     # the report's four suites beside ours (METHOD.md section 7)
    python eval.py claims a.json --without-cross-view b.json   # and its ablation, b: a baseline without cross-view

Modes (METHOD.md sections 6 and 7), all on the same episode list:
  event_oracle     event mode (<run>/stage4.safetensors: the event-pretrained towers, heads and
                   Staircase); the next-event caption from the world's oracle planner (the caption
                   only: the length comes from the model's remaining-time head)
  event_auto       event mode on the model's own next-event head
  unified_latents  unified mode, text from the Staircase latents (stage 5 towers)
  baseline         the chunk-centric baseline (U-Scratch, <run>/stage6.safetensors), unified mode
                   with the instruction
Diagnostic modes (not in the default list; `--modes event_told baseline_told event_timed`): the _told
modes replace the policy's own video with the future the scripted expert would produce from the current
state (env.expert_future on a copy of the world; on Meta-World, MetaWorldEnv.expert_future, which saves
and restores MuJoCo's state), noised to s*, as the open loop's true_future does, but closed loop:
  event_told       event_oracle with the expert's next event: its frames and its length
  baseline_told    baseline with the expert's next chunk of frames
  event_timed      event_oracle with the expert's next event's length only: the policy's own video, so
                   against event_oracle it isolates the remaining-time head, against event_told the video
Success rates get a Wilson 95% interval, task progress a bootstrap 95% interval of the mean.
Open loop (recorded events, true caption and length): action MSE, and per view the PSNR and SSIM of
the predicted future frames against the recorded ones; the segmenter's F1 on those episodes.
"""
import dataclasses
import json
import math
import os
import sys
import time
import types
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import tyro

import data
import env as world
import model as M
from infer import BASELINE_STAGE, InferError, Policy

MODES = ("event_oracle", "event_auto", "unified_latents", "baseline")
TOLD_MODES = ("event_told", "baseline_told", "event_timed")      # the expert's lookahead (event_timed: its length)
ORACLE_CAPTIONS = ("event_oracle", "event_told", "event_timed")  # the oracle planner names the next event
EVAL_SEED = 1_000_000                 # evaluation episodes use task seeds from here on (training uses small ones)


# --- statistics: 95% intervals ---
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


# --- closed-loop rollouts: batched, step-synchronous, noise per episode ---
def episode_tasks(families, splits, episodes, seed):
    """The evaluation episode list: the same for every mode and every run with this seed. A cell's
    seeds come from its place in the full table (world.FAMILIES x world.SPLITS), not in the
    selection, so a run on some families or splits replays those cells' episodes of the full table.
    Cells are 100 seeds apart, so at most 100 episodes per cell."""
    if not 0 <= episodes <= 100:
        raise ValueError(f"episodes: 0..100 per cell (a cell's seeds are 100 apart from the next's), found {episodes}")
    def cell(f, s):                                     # unknown names: make_task says what it expected
        known = f in world.FAMILIES and s in world.SPLITS
        return world.FAMILIES.index(f) * len(world.SPLITS) + world.SPLITS.index(s) if known else 0
    return [(f, s, world.make_task(f, s, EVAL_SEED + seed * 10_000 + 100 * cell(f, s) + i))
            for f in families for s in splits for i in range(episodes)]


def observation(obs, b):
    return {"frames": obs["frames"][b], "state": obs["state"][b], "intrinsics": obs["intrinsics"],
            "cam_pose": obs["cam_pose"][b]}


def serve(policy, mode, need, history, instr, captions, gens, queue, chunk, told=None):
    """One model call for the episodes `need` whose action queues ran out: the next event (event
    modes, captions None: the model's own head) or the next chunk; the actions fill their queues.
    `told` (TOLD_MODES): per episode (length, future observations or None) in place of the model's.
    Returns the text each episode's call was conditioned on."""
    g = [gens[b] for b in need]
    lengths, futures = zip(*told) if told else (None, None)
    futures = None if futures is None or futures[0] is None else futures         # event_timed: the length only
    if mode.startswith("event"):
        out = policy.event_actions([history[b][-1] for b in need], [instr[b] for b in need], captions, lengths,
                                   generator=g, futures=futures)
    else:
        source = "latents" if mode == "unified_latents" else "instruction"
        out = policy.chunk_actions([history[b] for b in need], [instr[b] for b in need], [chunk[b] for b in need], source,
                                   generator=g, futures=futures)
    for b, a in zip(need, out["action"]):
        queue[b], chunk[b] = list(a), chunk[b] + 1
    if mode == "unified_latents":
        return ["(Staircase latents)"] * len(need)
    return out.get("caption", [instr[b] for b in need])


def rollout(policy, tasks, mode, horizon, image_size, record=False, trace=False):
    """All tasks at once, step-synchronous: a world whose queue of actions is empty asks the policy
    for its next event (or chunk); the requests of one tick go to the model as one batch. Each
    episode draws its noise from its own generator, seeded by its task seed, so its result does not
    depend on which other episodes share the batch (or the process, under torchrun). Returns one
    dict per task: progress, success, steps, the final state (TCP x, y, z, aperture) and, with
    `record`, every observed frame (T+1, V, H, W, 3). With `trace`, "calls": per model call the step,
    the caption used, the number of actions, the TCP then, where the oracle's next event acts (the
    position of its object, or None) and, in the _told modes, where the expert's lookahead leaves
    the TCP (`expert_end`), so an episode can be read event by event."""
    if mode not in MODES + TOLD_MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES + TOLD_MODES}")
    if not tasks:
        return []
    told = None
    if mode in TOLD_MODES:                                  # the expert's future from a copy of world b
        cfg, steps = policy.cfg, None if mode.startswith("event") else policy.cfg.chunk_frames * policy.cfg.k_p

        def told(envs, b):                                  # event_timed reads the length only: nothing rendered
            acts, future = world.expert_future(envs.worlds[b], steps, cfg.max_event_len, cfg.k_p, mode != "event_timed")
            return len(acts), future
    envs = world.TabletopEnv(tasks, world.WorldConfig(image_size=image_size))
    n = len(tasks)
    queue, history, chunk = [[] for _ in range(n)], [[] for _ in range(n)], [0] * n
    t = np.zeros(n, int)
    gens = [torch.Generator().manual_seed(tk.seed) for tk in tasks]
    obs, active = envs.observe(), np.arange(n)
    frames = [[f] for f in obs["frames"]] if record else None
    instr = [tk.instruction for tk in tasks]
    calls = [[] for _ in range(n)]
    while len(active):
        for k, b in enumerate(active):
            history[b] = (history[b] + [observation(obs, k)])[-policy.keep:]
        need = [b for b in active if not queue[b]]
        if need:
            caps = None
            if mode in ORACLE_CAPTIONS:                     # the oracle names the event; event_oracle's model times it
                caps = [(world.oracle_next_event(envs.worlds[b]) or {"text": "done"})["text"] for b in need]
            known = [told(envs, b) for b in need] if told else None
            used = serve(policy, mode, need, history, instr, caps, gens, queue, chunk, known)
            for k, (b, text) in enumerate(zip(need, used if trace else ())):
                w, plan = envs.worlds[b], world.plan_next(envs.worlds[b])
                calls[b].append({"step": int(t[b]), "caption": text, "length": len(queue[b]), "tcp": w.tcp.tolist(),
                                 "object": None if plan is None or plan.obj < 0 else w.pos[plan.obj].tolist()})
                if known and known[k][1] is not None:
                    calls[b][-1]["expert_end"] = known[k][1][-1]["state"][:3].tolist()
        act = np.stack([queue[b].pop(0) for b in active])
        obs = envs.step(act, active)
        t[active] += 1
        for k, b in enumerate(active if record else ()):
            frames[b].append(obs["frames"][k])
        finished = obs["success"] | (t[active] >= horizon)
        obs = {k: (v[~finished] if k != "intrinsics" else v) for k, v in obs.items()}
        active = active[~finished]
    out = [{"progress": float(w.progress), "success": bool(w.success), "steps": int(t[b]),
            "final_state": w.state().tolist()} for b, w in enumerate(envs.worlds)]
    for b in range(n if record else 0):
        out[b]["frames"] = np.stack(frames[b])
    for b in range(n if trace else 0):
        out[b]["calls"] = calls[b]
    return out


# --- open loop on recorded events: action error, video PSNR and SSIM, segmentation F1 ---
PSNR_CAP = 100.0                      # dB given to identical images (their PSNR is infinite)


def psnr(pred, true, peak=255.0):
    """Peak signal-to-noise ratio in dB, one value per image (..., H, W, C)."""
    mse = ((np.asarray(pred, np.float64) - np.asarray(true, np.float64)) ** 2).mean((-3, -2, -1))
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(peak ** 2 / mse), PSNR_CAP)


def gaussian_window(size, sigma):
    g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
    return g / g.sum()


def local_mean(x, g):
    """Valid-mode separable filtering of (..., H, W, C) with the 1-D window g along H, then W."""
    n = len(g)
    x = sum(g[i] * x[..., i:x.shape[-3] - n + 1 + i, :, :] for i in range(n))
    return sum(g[i] * x[..., :, i:x.shape[-2] - n + 1 + i, :] for i in range(n))


def ssim(pred, true, peak=255.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity, one value per image (..., H, W, C): Wang, Bovik, Sheikh and Simoncelli
    2004, "Image quality assessment: from error visibility to structural similarity", IEEE TIP 13(4),
    eq. 13 with their constants (an 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03),
    computed per colour channel and averaged over the valid window positions and the channels.
    The window shrinks to the image side (kept odd) when the image is smaller than 11 pixels."""
    x, y = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    side = min(x.shape[-3], x.shape[-2])
    g = gaussian_window(min(size, side - (side + 1) % 2), sigma)
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    mx, my = local_mean(x, g), local_mean(y, g)
    vx, vy = local_mean(x * x, g) - mx * mx, local_mean(y * y, g) - my * my
    cxy = local_mean(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean((-3, -2, -1))


def at_model_size(policy, frames):
    """uint8 frames (..., H, W, 3) area-averaged to the model's image size, as its video tower sees them."""
    v = policy.m.cfg.video
    return M.unpatchify(M.patchify(torch.from_numpy(np.asarray(frames)), v.patch, v.image_size), v.patch).numpy()


def recorded_obs(ds, i, t):
    """The observation of episode i at step t, as a policy receives it."""
    return {"frames": ds.get(i, "frames", [t])[0], "state": ds.get(i, "state", [t])[0],
            "intrinsics": ds.get(i, "intrinsics"), "cam_pose": ds.get(i, "cam_pose", [t])[0]}


def recorded_data(policy, root):
    """root's dataset, its windows built as the checkpoint's were: the checkpoint's action targets and
    caption drop (training settings, not data; open loop reads the undropped caption anyway) and its
    state statistics, since the state is the model's input (held-out data has statistics of its own;
    recorded actions keep the data's own, which decode them). Refused when the layout differs."""
    ds = data.with_targets(data.Dataset(root), policy.cfg.action_offsets)
    ds.cfg = dataclasses.replace(ds.cfg, rho_min=policy.cfg.rho_min, rho_max=policy.cfg.rho_max)
    if ds.cfg != policy.cfg:
        raise ValueError(f"{root}: its data layout {ds.cfg} is not the checkpoint's {policy.cfg}")
    ds.stats = dict(ds.stats, state=policy.stats["state"])
    return ds


def open_loop(policy, root, events=40, seed=0, examples=0):
    """Open loop on recorded windows of a dataset, each of the kind the checkpoint trained on: an event
    window for an event stage (its keyframe, true caption and true length given) and a chunk window for
    stage 5 and the baseline (its history frames, anchor, chunk index and the instruction). Returns:
    - the normalised MSE of its actions, of the actions it samples with the true future frames noised
      to s* in place of its own (`true_future`: this isolates the action tower; other noise draws), and
      of predicting the mean action (the floor a useless policy gets);
    - per view, the PSNR and SSIM of its future frames (the video tower denoised to the end) against the
      recorded ones at the model's image size, averaged over frames; the episodes the windows came from;
    - per skill (chunks: "chunk"), where each window's actions end: the distance between the summed xyz
      actions of the prediction and of the record (metres at the embedded world's step size), on the
      video the model generates, with the true future frames, and with the keyframe repeated in place
      of every future frame (`frozen`), and how far freezing moves the end from the true-future one
      (`frames_effect`: near 0 when the action tower ignores the future frames);
    - for the first `examples` windows, (keyframe, predicted, true) frames for strips."""
    ds = recorded_data(policy, root)
    chunks = policy.stage >= 5
    if chunks:
        items = data.all_chunks(ds)
    else:
        per, items = data.all_events(ds)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(items), min(events, len(items)), replace=False)
    gen = torch.Generator().manual_seed(seed)
    err, err_told, floor, shown, ends = [], [], [], [], {}
    st, step_m = policy.stats["action"], world.WorldConfig().max_step
    scores = {"psnr": [[] for _ in range(policy.views)], "ssim": [[] for _ in range(policy.views)]}
    for k in pick:
        i, j = items[k]
        if chunks:                                                       # history, anchor (tau 0), future
            w = data.chunk_window(ds, i, j)
            a, key = j * ds.cfg.chunk_frames * ds.cfg.k_p, ds.cfg.history
            out = policy.chunk_actions([[recorded_obs(ds, i, t) for t in range(max(0, a + 1 - policy.keep), a + 1)]],
                                       [w["instruction"]], [j], generator=gen, return_frames=True)
            skill, valid, fut = "chunk", w["action_valid"], w["frame_valid"][key + 1:]
        else:
            w = data.event_window(ds, per[i], j, rng)                     # frames (1 + F, V, H, W, 3), actions normalised
            key, obs = 0, recorded_obs(ds, i, per[i][j]["steps"][0])
            out = policy.event_actions([obs], [w["instruction"]], [w["event_text"]], [len(w["action"])],
                                       return_frames=True, generator=gen)
            skill, valid, fut = per[i][j].get("skill", "?"), slice(None), slice(None)
            w = dict(w, caption=w["event_text"])
        act, mine = data.actions_from_targets(w["action"][valid], ds.cfg, ds.stats), out["action"][0][valid]
        err.append(float((((mine - act) / st["std"]) ** 2).mean()))      # in normalised per-step actions
        floor.append(float((((act - st["mean"]) / st["std"]) ** 2).mean()))
        pred, true = out["frames"][0][fut], at_model_size(policy, w["frames"][key + 1:])[fut]   # (F, V, h, w, 3)
        for v in range(policy.views):
            scores["psnr"][v] += psnr(pred[:, v], true[:, v]).tolist()
            scores["ssim"][v] += ssim(pred[:, v], true[:, v]).tolist()
        frozen = np.where((w["frame_tau"] > 0)[:, None, None, None, None], w["frames"][key], w["frames"])
        told, still = ((policy.mc if chunks else policy.m).sample(data.collate([[dict(w, frames=f)]]), true_future=True,
                                        generator=torch.Generator().manual_seed(seed + int(k)))["action"][0].cpu().numpy()[valid]
                       for f in (w["frames"], frozen))
        told, still = (data.actions_from_targets(x, policy.cfg, policy.stats) for x in (told, still))
        err_told.append(float((((told - act) / st["std"]) ** 2).mean()))
        moved = [x[:, :3].sum(0) * step_m for x in (mine, told, still, act)]
        ends.setdefault(skill, []).append([np.linalg.norm(moved[0] - moved[3]), np.linalg.norm(moved[1] - moved[3]),
                                           np.linalg.norm(moved[2] - moved[3]), np.linalg.norm(moved[3]),
                                           np.linalg.norm(moved[1] - moved[2])])
        if len(shown) < examples:
            shown.append((at_model_size(policy, w["frames"][key]), pred, true))
    return {"action_mse": float(np.mean(err)), "action_mse_true_future": float(np.mean(err_told)),
            "mean_action_mse": float(np.mean(floor)), "events": len(pick),
            "windows": "chunk" if chunks else "event",
            "psnr": [float(np.mean(x)) for x in scores["psnr"]], "ssim": [float(np.mean(x)) for x in scores["ssim"]],
            "episodes": sorted({items[k][0] for k in pick}), "examples": shown,
            "endpoint": {k: dict(zip(("generated", "true_future", "frozen", "distance", "frames_effect"), np.mean(v, 0).tolist()), events=len(v))
                         for k, v in sorted(ends.items())}}


def caption_swap(policy, root, events=24, seed=0, draws=8):
    """Does an event's caption steer where the event goes? On recorded reach events (embedded world)
    whose named object is the only one of its name (put_all's "reach the pink block" may mean either
    of two pink blocks) and whose scene holds another object of the same kind, the policy samples the
    event twice from the same noise: with its caption, and with the other object's name put in it.
    Returns how far apart the two ends are (xy, metres), how far apart the two objects are, the share
    of ends nearer the object their caption names than the other one (chance: 0.5), and the video
    tower's flow loss on those events with the true caption, the swapped one and none, each the mean
    of `draws` draws of flow time and noise (the same draws for all three), with `loss_gap` =
    swapped / true - 1 (0: the tower does not read which object the caption names)."""
    ds = recorded_data(policy, root)
    per, items = data.all_events(ds)
    rng = np.random.default_rng(seed)
    found = []
    for k in rng.permutation(len(items)):
        i, j = items[k]
        e, meta = per[i][j], ds.episode_meta(i)
        if e.get("skill") != "reach" or meta.get("family") not in world.FAMILIES:
            continue
        task = world.make_task(meta["family"], meta["split"], meta["seed"])
        names = [world.name_of(task, o) for o in range(len(task.kinds))]
        obj = names.index(e["object"]) if names.count(e.get("object")) == 1 else None   # put_all has look-alikes
        other = [o for o in range(len(names)) if obj is not None and task.kinds[o] == task.kinds[obj] and names[o] != names[obj]]
        if other:
            swapped = e["text"].replace(names[obj], names[other[0]])
            state = ds.get(i, "state", e["steps"][:1])[0]                          # raw (x, y, z, aperture)
            found.append((data.event_window(ds, per[i], j, rng), task.pos[[obj, other[0]], :2], swapped, state))
        if len(found) == events:
            break
    if not found:
        return {"events": 0}
    apart, objects, nearer = [], [], []
    for n, (w, (a, b), swapped, state) in enumerate(found):
        obs = {"frames": w["frames"][0], "state": state, "intrinsics": w["intrinsics"], "cam_pose": w["cam_pose"][0]}
        ends = []
        for cap in (w["event_text"], swapped):
            out = policy.event_actions([obs], [w["instruction"]], [cap], [len(w["action"])],
                                       generator=torch.Generator().manual_seed(seed + n))
            ends.append(state[:2] + out["action"][0][:, :2].sum(0) * world.WorldConfig().max_step)
        apart.append(np.linalg.norm(ends[0] - ends[1]))
        objects.append(np.linalg.norm(a - b))
        nearer += [np.linalg.norm(ends[0] - a) < np.linalg.norm(ends[0] - b), np.linalg.norm(ends[1] - b) < np.linalg.norm(ends[1] - a)]
    loss = {}
    for name, caps in (("true", [f[0]["event_text"] for f in found]), ("swapped", [f[2] for f in found]), ("none", [""] * len(found))):
        batch = data.collate([[dict(f[0], caption=c)] for f, c in zip(found, caps)])
        total = 0.0
        for d in range(draws):                          # one draw of flow time and noise per event, the same for every caption
            torch.manual_seed(seed + d)
            with torch.no_grad():
                total += float(policy.m(batch, action=False)["video"])
        loss[name] = total / draws
    return {"events": len(found), "ends_apart": float(np.mean(apart)), "objects_apart": float(np.mean(objects)),
            "nearer_named": float(np.mean(nearer)), "video_loss": loss, "loss_gap": loss["swapped"] / loss["true"] - 1}


def event_heads(policy, root, events=40, seed=0):
    """The event length that event_oracle executes, against the recorded one: at the keyframes of
    `events` recorded events, the remaining-time head's length (Policy.next_event: rounded, clamped
    to 1..max_event_len) against the event's own (the head's training target). Returns the mean
    absolute and signed error in steps, the share within 2 steps, the share with the right number of
    future frames (ceil(L / k_p)), the recorded mean length, and per skill (n, mean predicted, mean
    recorded, mean absolute error). Two floors from the same events' recorded lengths: a constant
    (their rounded mean) and each skill's median, which a head that knew only the skill would give."""
    ds = recorded_data(policy, root)
    per, items = data.all_events(ds)
    rng = np.random.default_rng(seed)
    true, pred, skill = [], [], []
    for k in rng.choice(len(items), min(events, len(items)), replace=False):
        i, j = items[k]
        w = data.event_window(ds, per[i], j, rng)
        pred += policy.next_event([recorded_obs(ds, i, per[i][j]["steps"][0])], [w["instruction"]], with_captions=False)[1]
        true.append(int(w["remaining"]))
        skill.append(per[i][j].get("skill", "?"))
    true, pred, skill = np.array(true), np.array(pred), np.array(skill)
    k_p = policy.cfg.k_p
    median = np.array([np.round(np.median(true[skill == s])) for s in skill])
    return {"events": len(true), "mae": float(np.abs(pred - true).mean()), "bias": float((pred - true).mean()),
            "within_2": float((np.abs(pred - true) <= 2).mean()), "true_mean": float(true.mean()),
            "frames_right": float((np.ceil(pred / k_p) == np.ceil(true / k_p)).mean()),
            "constant_mae": float(np.abs(np.round(true.mean()) - true).mean()),
            "skill_median_mae": float(np.abs(median - true).mean()),
            "per_skill": {s: [int((skill == s).sum()), float(pred[skill == s].mean()), float(true[skill == s].mean()),
                              float(np.abs(pred - true)[skill == s].mean())] for s in sorted(set(skill))}}


def segmentation_f1(root, episodes, tol=2):
    """data.py's segmenter against the annotated L1 starts (+-tol steps) on these episodes of root."""
    ds = data.Dataset(root)
    return data.segment_eval(data.segment_items(ds, episodes), tol)["all"]


# --- pictures: PNG strips of predicted events and of closed-loop rollouts ---
def event_strip(key, pred, true, scale):
    """One view of one event: the keyframe, then the predicted future frames (top row), and the keyframe,
    then the recorded ones (bottom row). key (h, w, 3), pred and true (F, h, w, 3)."""
    rows = [np.concatenate([key, *frames], 1) for frames in (pred, true)]
    return np.concatenate(rows, 0).repeat(scale, 0).repeat(scale, 1)


def write_strips(out_dir, events, rollouts):
    """events: (name, open_loop's (keyframe, predicted, true) example), one PNG per view; rollouts:
    (name, frames (T+1, V, H, W, 3)), views stacked, 8 frames along the episode. Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, (key, pred, true) in events:
        for v in range(key.shape[0]):
            paths.append(os.path.join(out_dir, f"{name}_view{v}.png"))
            world.save_png(paths[-1], event_strip(key[v], pred[:, v], true[:, v], max(1, 64 // key.shape[1])))
    for name, frames in rollouts:
        paths.append(os.path.join(out_dir, f"rollout_{name}.png"))
        world.save_png(paths[-1], world.episode_strip(types.SimpleNamespace(frames=frames), n=8, scale=2))
    return paths


# --- the closed-loop table: every mode on one episode list, sharded across processes under torchrun ---
def gather(mine, world_size):
    """{episode index: result} of this process -> the union over all processes (small dicts: all_gather_object)."""
    if world_size == 1:
        return mine
    parts = [None] * world_size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def evaluate(ckpt: str, episodes: int = 20, families: tuple[str, ...] = world.FAMILIES, splits: tuple[str, ...] = world.SPLITS,
             modes: tuple[str, ...] = MODES, horizon: int = 300, seed: int = 0, image_size: int = 64, rank=0, world_size=1,
             sampling: dict | None = None):
    """Every mode on the same episodes; returns {mode: {(family, split): {success, progress, ...}}}.
    With world_size > 1 (torchrun), process `rank` rolls out episodes rank, rank + world_size, ...
    and every process returns the gathered result."""
    bad = [m for m in modes if m not in MODES + TOLD_MODES]
    if bad:                                              # before any checkpoint loads, on every rank
        raise ValueError(f"modes {bad}: expected modes from {MODES + TOLD_MODES}")
    items = episode_tasks(families, splits, episodes, seed)
    mine = list(range(rank, len(items), world_size))
    policies = {}
    results = {}
    for mode in modes:
        path = os.path.join(ckpt, "stage6.safetensors") if mode.startswith("baseline") and os.path.isdir(ckpt) else ckpt
        if path not in policies:
            policies[path] = Policy.from_checkpoint(path, **(sampling or {}))
        t0 = time.perf_counter()
        runs = rollout(policies[path], [items[k][2] for k in mine], mode, horizon, image_size)
        runs = gather(dict(zip(mine, runs)), world_size)
        cells = {}
        for k, (f, s, _) in enumerate(items):
            cells.setdefault((f, s), []).append(runs[k])
        results[mode] = {}
        for cell, rs in cells.items():
            per = {key: [r[key] for r in rs] for key in ("progress", "success", "steps", "final_state")}
            p, ok = per["progress"], per["success"]
            results[mode][cell] = {"success": float(np.mean(ok)), "success_ci": wilson(sum(ok), len(ok)),
                                   "progress": float(np.mean(p)), "progress_ci": bootstrap(p, seed), "episodes": len(p),
                                   "per_episode": per}
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


def paired(results, mode, against, family, seed=0, key="progress", scale=1.0):
    """Task progress (or another per-episode `key`, times `scale`) of `mode` minus `against` on the same
    episodes of `family` (all splits; None: every family), paired episode by episode: mean, bootstrap
    95% interval, episodes. A target such as "ahead by at least 10 points" reads the interval's lower bound."""
    cells = [k for k in results[mode] if isinstance(k, tuple) and family in (None, k[0])]
    d = np.concatenate([scale * (np.asarray(results[mode][k]["per_episode"][key], np.float64)
                                 - np.asarray(results[against][k]["per_episode"][key], np.float64)) for k in cells])
    return float(d.mean()), bootstrap(d, seed), len(d)


def paired_table(results, families, against="baseline", label="family"):
    """Per family (or Meta-World task), every mode against `against` (the chunk-centric baseline) on the
    same episodes."""
    modes = [m for m in results if m not in (against, "expert")]
    if against not in results or not modes:
        return ""
    lines = [f"| {label} | " + " | ".join(f"{m} - {against}, progress" for m in modes) + " |", "|---|" + "---|" * len(modes)]
    for f in families:
        cells = [paired(results, m, against, f) for m in modes]
        lines.append(f"| {f} | " + " | ".join(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}] (n {n})" for d, (lo, hi), n in cells) + " |")
    return "\n".join(lines)


# --- the report's claims beside ours (METHOD.md section 7) ---
# Task progress (0-100) on the report's real-robot suites (arXiv 2606.01955, as METHOD.md section 7 quotes
# it): event mode, U-Scratch (the same architecture on fixed-length chunks without event pretraining), pi0.5.
REPORT_SUITES = {"Diverse": (75.9, 63.0, 55.6), "Reasoning": (71.6, 59.5, 56.4),
                 "Dexterous": (32.0, 31.3, 15.0), "Generalization": (53.8, 18.5, 24.0)}
# [ours] the cells of our table that stand for each suite (the report's suites are sets of real-robot tasks)
SUITE_CELLS = {"Diverse": (world.FAMILIES, ("seen",)),
               "Reasoning": (("press_order", "put_all"), ("seen",)),     # an order or a count held in mind
               "Dexterous": (("pick_place", "stack"), ("seen",)),        # placements to a few cm (no hand here)
               "Generalization": (world.FAMILIES, ("unseen_combos", "paraphrase", "distractors"))}


# The report's ablation (METHOD.md section 7): event execution with cross-view attention against fixed-length
# decoding without it, task progress on two suites.
REPORT_ABLATION = {"Reasoning": (71.6, 32.6), "Generalization": (53.8, 22.0)}


def suite_progress(results, mode, suite):
    """Per-episode task progress of `mode` over the cells that stand for `suite`, in one fixed order
    (None when a cell is missing)."""
    families, splits = SUITE_CELLS[suite]
    cells = [(f, s) for f in families for s in splits]
    if mode not in results or any(c not in results[mode] for c in cells):
        return None
    return np.concatenate([np.asarray(results[mode][c]["per_episode"]["progress"], np.float64) for c in cells])


def with_interval(x, seed, sign=""):
    """'mean [lo, hi]' with the bootstrap 95% interval; sign "+" writes the sign of a difference."""
    lo, hi = bootstrap(x, seed)
    return f"{x.mean():{sign}.1f} [{lo:{sign}.1f}, {hi:{sign}.1f}]"


def claims_table(results, seed=0):
    """The report's suites beside ours: per suite, every mode's mean task progress (bootstrap 95%) over the
    suite's cells, and each event mode minus the baseline, paired episode by episode. A suite is left out
    when the results lack one of its cells (an evaluation of some families or splits only)."""
    modes = [m for m in MODES if m in results]
    if not modes:
        return ""
    events = [m for m in ("event_oracle", "event_auto") if m in modes and "baseline" in modes]
    head = (["suite", "our cells", "report: event / U-Scratch / pi0.5"] + [f"{m}, progress" for m in modes]
            + [f"{m} - baseline" for m in events])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for suite, (families, splits) in SUITE_CELLS.items():
        per = {m: suite_progress(results, m, suite) for m in modes}
        if any(x is None for x in per.values()):
            continue
        where = ("every family" if families == world.FAMILIES else ", ".join(families)) + "; " + ", ".join(splits)
        lines.append("| " + " | ".join([suite, where, " / ".join(f"{x:.1f}" for x in REPORT_SUITES[suite])]
                                       + [with_interval(per[m], seed) for m in modes]
                                       + [with_interval(per[m] - per["baseline"], seed, "+") for m in events]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def ablation_table(results, without, seed=0):
    """The report's ablation on the same episodes: `results` (event modes and the chunk baseline, all with
    cross-view attention) beside `without`'s baseline, trained with `--model.video.no-cross-view`: per
    suite, each one's task progress and each event mode minus the baseline without cross-view, paired."""
    events = [m for m in ("event_oracle", "event_auto") if m in results]
    head = (["suite", "report: event with / fixed-length without cross-view"] + [f"{m}, progress" for m in events]
            + ["baseline, progress", "baseline without cross-view, progress"] + [f"{m} - baseline without" for m in events])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for suite, report in REPORT_ABLATION.items():
        per = {m: suite_progress(results, m, suite) for m in events + ["baseline"]}
        off = suite_progress(without, "baseline", suite)
        if off is None or any(x is None for x in per.values()):
            continue
        row = ([suite, " / ".join(f"{x:.1f}" for x in report)] + [with_interval(per[m], seed) for m in events + ["baseline"]]
               + [with_interval(off, seed)] + [with_interval(per[m] - off, seed, "+") for m in events])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


# --- the --json-out file: the settings that fix the episodes and how they run, then the results ---
SETTINGS = ("env", "families", "splits", "episodes", "horizon", "seed", "image_size")   # equal: the same episodes, run alike


def as_json(results):
    """{mode: {(family, split): cell}} -> {mode: {"family/split": cell}}: JSON keys are strings."""
    return {m: {f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k: v for k, v in r.items()} for m, r in results.items()}


def write_report(path, report, **settings):
    """Write {"settings": ..., **report} to a temporary file and rename it: never a half-written report."""
    from train import git_commit
    assert set(SETTINGS) <= set(settings), f"write_report needs every one of {SETTINGS}"
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"settings": {"commit": git_commit(), **settings}, **report}, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- Meta-World (optional extra): success per task on the 50 held-out configurations of seed 1000 ---
MW_MODES = ("expert", "event_oracle", "event_auto", "baseline")   # expert: the scripted policy, the ceiling
MW_SPLIT = "held_out"


def rollout_metaworld(policy, envs, mode, horizon, seed=0):
    """`rollout` on a world.MetaWorldEnv: step-synchronous, to the first success or `horizon` steps.
    The oracle planner is the expert's current phase (its caption only; the model times the event).
    TOLD_MODES get the noise-free expert's lookahead (MetaWorldEnv.expert_future): event_told the
    rest of its current phase, event_timed that rest's length only, baseline_told its next chunk.
    Frames are rendered only where the policy reads them: at a request, and for unified mode also
    k_p, 2 k_p, ..., M k_p steps before it. `expert` runs the scripted policy with the data's noise."""
    n = len(envs)
    queue, history, chunk, t = [[] for _ in range(n)], [[] for _ in range(n)], [0] * n, np.zeros(n, int)
    final = [None] * n                                                          # state when each episode ends
    ids = [tk.seed * world.MW_CONFIGS + tk.index for tk in envs.tasks]          # per configuration, not per slot
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in ids]   # so sharding changes nothing
    rngs = [np.random.default_rng([seed, i, 37]) for i in ids]
    k_p, M_ = (policy.cfg.k_p, policy.cfg.history) if policy is not None else (1, 0)
    event = mode.startswith("event")
    read = lambda q: q == 0 if event else q % k_p == 0 and q <= M_ * k_p     # noqa: E731 (actions left before the next request)
    keep = M_ * k_p + 1                                                          # policy.keep; 1 for the expert
    obs, active = envs.observe(render=mode != "expert"), np.arange(n)
    instr = [tk.instruction for tk in envs.tasks]
    while len(active):
        for k, b in enumerate(active):
            o = {key: obs[key][k] for key in ("frames", "state", "cam_pose") if key in obs} | {"intrinsics": obs["intrinsics"]}
            history[b] = (history[b] + [o])[-keep:]
        need = [b for b in active if not queue[b]]
        if need and mode == "expert":
            for b in need:
                a, _ = envs.expert_action(b)
                a[:3] = np.clip(a[:3] + rngs[b].normal(0, world.MW_NOISE, 3), -1, 1)
                queue[b] = [a]
        elif need:
            caps = [envs.oracle_next_event(b)["text"] for b in need] if mode in ORACLE_CAPTIONS else None
            steps = None if event else policy.cfg.chunk_frames * k_p
            known = [envs.expert_future(b, steps, policy.cfg.max_event_len, k_p, mode != "event_timed")
                     for b in need] if mode in TOLD_MODES else []
            serve(policy, mode, need, history, instr, caps, gens, queue, chunk, [(len(a), f) for a, f in known])
        act = np.stack([queue[b].pop(0) for b in active])
        obs = envs.step(act, active, render=False)
        t[active] += 1
        finished = obs["success"] | (t[active] >= horizon)
        for k in np.flatnonzero(finished):
            final[active[k]] = np.asarray(obs["state"][k], float).round(5).tolist()
        obs = {k: (v[~finished] if k != "intrinsics" else v) for k, v in obs.items()}
        active = active[~finished]
        draw = [k for k, b in enumerate(active) if mode != "expert" and read(len(queue[b]))]
        if draw:
            frames = envs.render(active[draw])
            obs["frames"] = [frames[draw.index(k)] if k in draw else None for k in range(len(active))]
    return [100.0 * s for s in envs.success], list(envs.success), final


def evaluate_metaworld(ckpt: str, tasks=world.MW_TASKS, episodes: int = 50, modes=MW_MODES, horizon: int = 300,
                       seed: int = 0, image_size: int = 64, rank=0, world_size=1, sampling: dict | None = None):
    """Every mode on the first `episodes` of the 50 configurations of MT1(task, seed=1000), per task;
    returns {mode: {(task, "held_out"): {success, success_ci, ...}}} like `evaluate`. A task's
    environments are made once (about 0.4 s and 25 MB each) and reset for every mode."""
    if not 0 <= episodes <= 50:
        raise ValueError(f"episodes: Meta-World evaluates on MT1's 50 held-out configurations of seed 1000; found {episodes}")
    bad = [m for m in modes if m not in MW_MODES + TOLD_MODES]
    if bad:
        raise ValueError(f"modes {bad}: Meta-World evaluation runs modes from {MW_MODES + TOLD_MODES}")
    results = {m: {"_seconds": 0.0} for m in modes}
    path = {m: os.path.join(ckpt, "stage6.safetensors") if m.startswith("baseline") and os.path.isdir(ckpt) else ckpt
            for m in modes}
    policies = {path[m]: Policy.from_checkpoint(path[m], **(sampling or {})) for m in modes if m != "expert"}
    for task in tasks:
        configs = world.mw_tasks(task, world.MW_EVAL_SEED, episodes, MW_SPLIT)
        mine = list(range(rank, len(configs), world_size))            # under torchrun: configurations r, r + N, ...
        envs = world.MetaWorldEnv([configs[k] for k in mine], image_size) if mine else None
        try:
            for mode in modes:
                t0 = time.perf_counter()
                runs = {}
                if envs is not None:
                    for i in range(len(envs)):
                        envs.reset_world(i)
                    runs = dict(zip(mine, zip(*rollout_metaworld(None if mode == "expert" else policies[path[mode]],
                                                                  envs, mode, horizon, seed))))
                runs = gather(runs, world_size)
                p, ok, final = ([runs[k][j] for k in range(len(configs))] for j in range(3))
                results[mode][(task, MW_SPLIT)] = {"success": float(np.mean(ok)), "success_ci": wilson(sum(ok), len(ok)),
                                                   "progress": float(np.mean(p)), "progress_ci": bootstrap(p, seed),
                                                   "episodes": len(ok), "per_episode": {"progress": p, "success": ok, "final_state": final}}
                results[mode]["_seconds"] += time.perf_counter() - t0
        finally:
            if envs is not None:
                envs.close()
    return results


def main_metaworld(ckpt, tasks, episodes, modes, horizon, seed, json_out, image_size=64, rank=0, world_size=1, sampling=None):
    t0 = time.perf_counter()
    tasks = tuple(t for t in tasks.split(",") if t) or world.MW_TASKS
    res = evaluate_metaworld(ckpt, tasks, episodes, MW_MODES if modes == MODES else modes, horizon, seed,
                             image_size, rank, world_size, sampling)
    if rank:
        return res
    print(table(res, tasks, (MW_SPLIT,)))
    pairs = paired_table(res, tasks, label="task")
    if pairs:
        print("\npaired against the baseline, per task (mean difference in success x 100, bootstrap 95%):\n\n" + pairs)
    for m, r in res.items():
        mean = np.mean([r[(task, MW_SPLIT)]["success"] for task in tasks])
        print(f"{m}: mean success over {len(tasks)} task(s) {mean:.3f} ({r['_seconds']:.0f} s)")
    print(f"Meta-World, {episodes} held-out configurations (MT1 seed {world.MW_EVAL_SEED}) per task, horizon {horizon}, "
          f"seed {seed}; wall {time.perf_counter() - t0:.0f} s")
    if json_out:
        write_report(json_out, {"closed_loop": as_json(res)}, env="metaworld", families=list(tasks), splits=[MW_SPLIT],
                     episodes=episodes, horizon=horizon, seed=seed, image_size=image_size, ckpt=ckpt, sampling=sampling)
    return res


# --- command line ---
def checkpoints(ckpt):
    """(name, path) of what open loop reads: a run's stage 2, 5 and 6 files, or the one file given."""
    if not os.path.isdir(ckpt):
        return [(os.path.basename(ckpt).split(".")[0], ckpt)]
    found = [(n, os.path.join(ckpt, f"{n}.safetensors")) for n in ("stage2", "stage5", "stage6")
             if os.path.exists(os.path.join(ckpt, f"{n}.safetensors"))]
    if not found:
        raise FileNotFoundError(f"{ckpt}: no stage2, stage5 or stage6 .safetensors to evaluate open loop")
    return found


def main(ckpt: str, episodes: int = 20, families: tuple[str, ...] = world.FAMILIES, splits: tuple[str, ...] = world.SPLITS,
         modes: tuple[str, ...] = MODES, horizon: int = 300, seed: int = 0, image_size: int = 64, json_out: str = "",
         open_loop_root: str = "", open_loop_events: int = 40, strips: str = "", strip_episodes: int = 2,
         env: Literal["tabletop", "metaworld"] = "tabletop", tasks: str = "", video_steps: int = 0,
         cone_sampling: bool | None = None, caption_swaps: int = 0, guidance: float = 1.0):
    """Closed-loop table: success (Wilson 95%) and task progress (bootstrap 95%) per family, split and
    mode, `episodes` per cell. With --open-loop-root DIR, first the open-loop action error, video PSNR
    and SSIM on DIR's recorded events and the segmentation F1 on their episodes; with --strips DIR,
    PNG strips of `strip_episodes` events (needs --open-loop-root) and closed-loop rollouts. Under
    torchrun the closed-loop episodes are sharded across processes; rank 0 does the rest and prints.
    With --env metaworld: success per task of --tasks (comma-separated; empty: all nine) on --episodes
    held-out configurations, sharded the same way. --video-steps N (> 0) samples every policy with N
    video Euler steps in place of its checkpoint's number; --cone-sampling True / False turns the
    sight-cone mask on / off at sampling (VideoConfig.cone_sampling); --guidance G > 1 samples event
    mode's video with classifier-free guidance on the caption (WallWM.guided_velocity). --caption-swaps N (with --open-loop-root):
    on N reach events, whether naming another object in the caption moves the event (`caption_swap`)."""
    from train import setup_distributed
    rank, world_size = setup_distributed()
    sampling = {"video_steps": video_steps, "cone_sampling": cone_sampling, "guidance": guidance}
    if env == "metaworld":
        try:
            res = main_metaworld(ckpt, tasks, episodes, modes, horizon, seed, json_out, image_size, rank, world_size, sampling)
        except ImportError as e:                 # the optional extra is missing: say what to install
            raise SystemExit(f"error: {e}") from None
        if world_size > 1:
            dist.destroy_process_group()
        return res
    t0 = time.perf_counter()
    report, pictures = {}, []
    if rank == 0 and open_loop_root:
        report["open_loop"], scored = {}, set()
        for name, path in checkpoints(ckpt):
            policy = Policy.from_checkpoint(path, **sampling)
            r = open_loop(policy, open_loop_root, open_loop_events, seed, examples=strip_episodes if strips else 0)
            pictures += [(f"{name}_event{e}", ex) for e, ex in enumerate(r.pop("examples"))]
            report["open_loop"][name], scored = r, scored | set(r["episodes"])
            views = " / ".join(str(v) for v in range(len(r["psnr"])))
            print(f"open loop, {name}: action MSE {r['action_mse']:.3f} (normalised; "
                  f"{r['action_mse_true_future']:.3f} with the true future frames at s*) against "
                  f"{r['mean_action_mse']:.3f} for the mean action; video PSNR {' / '.join(f'{x:.1f}' for x in r['psnr'])} dB, SSIM "
                  f"{' / '.join(f'{x:.3f}' for x in r['ssim'])} (views {views}); {r['events']} {r['windows']} windows of {open_loop_root}")
            print("  where events end, error in cm (generated video / true future frames at s* / keyframe frozen) against the "
                  "distance moved, [true future against frozen]: "
                  + "; ".join(f"{k} {e['generated'] * 100:.1f} / {e['true_future'] * 100:.1f} / {e['frozen'] * 100:.1f} of "
                              f"{e['distance'] * 100:.1f} [{e['frames_effect'] * 100:.1f}] (n {e['events']})"
                              for k, e in r["endpoint"].items()))
            if caption_swaps and policy.stage == BASELINE_STAGE:     # a chunk policy: no event to name
                print("  caption swap: skipped, the chunk-centric baseline samples no events")
            elif caption_swaps:
                c = r["caption_swap"] = caption_swap(policy, open_loop_root, caption_swaps, seed)
                print(f"  caption swap: {c['events']} reach events with two objects of one kind" + (
                      f"; naming the other object moves the end by {c['ends_apart'] * 100:.1f} cm (objects "
                      f"{c['objects_apart'] * 100:.1f} cm apart); ends nearer the named object: {c['nearer_named']:.0%} "
                      f"(chance 50%); video loss with the true / swapped / no caption: "
                      + " / ".join(f"{v:.4f}" for v in c["video_loss"].values()) + f" (swapped {c['loss_gap']:+.1%})"
                      if c["events"] else ""))
        event = Policy.from_checkpoint(ckpt, **sampling)                 # a run's event stage (stage4)
        if event.stage >= 3:
            h = report["event_heads"] = event_heads(event, open_loop_root, open_loop_events, seed)
            print(f"remaining-time head (stage {event.stage}), the length event_oracle executes: {h['mae']:.1f} steps off "
                  f"on average ({h['bias']:+.1f} signed; within 2 steps: {h['within_2']:.0%}; future frames right: "
                  f"{h['frames_right']:.0%}) against recorded events of {h['true_mean']:.1f} steps (n {h['events']}); "
                  f"a constant would be {h['constant_mae']:.1f} off, each skill's median {h['skill_median_mae']:.1f}\n"
                  "  per skill, predicted / recorded mean length (steps off): "
                  + "; ".join(f"{k} {p:.1f} / {t:.1f} ({e:.1f}, n {n})" for k, (n, p, t, e) in h["per_skill"].items()))
        seg = report["segmentation"] = segmentation_f1(open_loop_root, sorted(scored))
        print(f"segmentation F1 {seg['f1']:.3f} (precision {seg['precision']:.3f}, recall {seg['recall']:.3f}; "
              f"data.segment against the annotated L1 starts, +-2 steps) on the {seg['episodes']} episodes of "
              f"every open-loop window above")
    if rank == 0 and strips:
        if not open_loop_root:
            print("--strips without --open-loop-root: rollout strips only (event strips need recorded future frames)")
        items = episode_tasks(families, splits[:1], 1, seed)[:strip_episodes]
        runs = rollout(Policy.from_checkpoint(ckpt, **sampling), [tk for _, _, tk in items], "event_oracle", horizon, image_size, record=True)
        rollouts = [(f"event_oracle_{f}", r["frames"]) for (f, _, _), r in zip(items, runs)]
        paths = write_strips(strips, pictures, rollouts)
        print(f"{len(paths)} PNG strips in {strips}")
    if episodes:
        res = evaluate(ckpt, episodes, families, splits, modes, horizon, seed, image_size, rank, world_size, sampling)
        report["closed_loop"] = as_json(res)
        if rank == 0:
            print(table(res, families, splits))
            pairs, suites = paired_table(res, families), claims_table(res)
            if pairs:
                print("\npaired against the baseline, per family (all splits; mean difference in task progress, "
                      "bootstrap 95%):\n\n" + pairs)
            if suites:
                print("\nthe report's suites beside ours (task progress; METHOD.md section 7):\n\n" + suites)
            print(f"{episodes} episodes per cell, horizon {horizon}, seed {seed}, {world_size} process(es); "
                  f"wall {time.perf_counter() - t0:.0f} s")
    if rank == 0 and json_out:
        write_report(json_out, report, env="tabletop", families=list(families), splits=list(splits), episodes=episodes,
                     horizon=horizon, seed=seed, image_size=image_size, ckpt=ckpt, sampling=sampling)
    if world_size > 1:
        dist.destroy_process_group()
    return report


# --- two evaluations side by side: `python eval.py compare A.json B.json` ---
def read_report(path):
    """A --json-out file -> (settings, {mode: {(family, split): cell}}); a clear error for anything else."""
    try:
        with open(path) as f:
            rep = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable eval.py --json-out file ({e})") from None
    missing = [k for k in ("settings", "closed_loop") if not isinstance(rep, dict) or k not in rep]
    missing = missing or [f"settings.{k}" for k in SETTINGS if k not in rep["settings"]]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)}; expected a file written by eval.py --json-out with --episodes > 0")
    st, res = rep["settings"], {}
    want = {(f, s) for f in st["families"] for s in st["splits"]}
    for m, r in rep["closed_loop"].items():
        res[m] = {tuple(k.split("/")): v for k, v in r.items() if k != "_seconds"}
        got = {c: v.get("episodes") for c, v in res[m].items()}
        missing, extra = sorted(want - set(got)), sorted(set(got) - want)
        other = [(c, got[c]) for c in sorted(want & set(got)) if got[c] != st["episodes"]]
        if missing or extra or other:
            raise ValueError(f"{path}: mode {m} does not match its settings ({st['episodes']} episodes in each of "
                             f"{len(want)} (family, split) cells): missing {missing[:3]}, extra {extra[:3]}, other counts {other[:3]}")
    return st, res


def compare(a: tyro.conf.Positional[str], b: tyro.conf.Positional[str], mode_a: str = "", mode_b: str = "", seed: int = 0):
    """B against A on the same episodes: per family and over all of them, each side's successes and
    mean task progress, and B - A paired episode by episode (success x 100 and progress; bootstrap
    95% intervals, resampled with --seed). A and B are two --json-out files of eval.py, or one file
    twice. Every mode the two files share is compared, or only --mode-a X (in A) against --mode-b Y
    (in B); one of the two alone names the mode on both sides."""
    (sa, ra), (sb, rb) = read_report(a), read_report(b)
    differ = [f"{k}: {sa[k]} in {a}, {sb[k]} in {b}" for k in SETTINGS if sa[k] != sb[k]]
    if differ:
        raise ValueError("not the same episodes, so no paired comparison: " + "; ".join(differ))
    if sa.get("commit") != sb.get("commit"):
        print(f"note: written at commits {sa.get('commit')} and {sb.get('commit')}; "
              "a change to env.py between them would change the episodes")
    if mode_a or mode_b:
        pairs = [(mode_a or mode_b, mode_b or mode_a)]
        for path, res, mode in ((a, ra, pairs[0][0]), (b, rb, pairs[0][1])):
            if mode not in res:
                raise ValueError(f"{path}: no mode {mode!r} (found {sorted(res)})")
    else:
        pairs = [(m, m) for m in ra if m in rb]
        if not pairs:
            raise ValueError(f"no mode in both files ({a}: {sorted(ra)}; {b}: {sorted(rb)}); name them with --mode-a and --mode-b")
        alone = sorted(set(ra) ^ set(rb))
        if alone:
            print(f"not compared, in one file only: {alone}")
    out = {}
    for ma, mb in pairs:
        res, rows = {"A": ra[ma], "B": rb[mb]}, []
        for family in list(sa["families"]) + [None]:
            cells = [k for k in res["A"] if family in (None, k[0])]
            side = {x: (int(sum(sum(res[x][k]["per_episode"]["success"]) for k in cells)),
                        float(np.mean([p for k in cells for p in res[x][k]["per_episode"]["progress"]]))) for x in res}
            ds, dp = (paired(res, "B", "A", family, seed, key, scale) for key, scale in (("success", 100.0), ("progress", 1.0)))
            rows.append({"family": family or "all", "A": side["A"], "B": side["B"], "success": ds, "progress": dp})
        out[(ma, mb)] = rows
        print(f"\nB - A, paired on the same {rows[-1]['progress'][2]} episodes; A = {a} {ma}, B = {b} {mb}\n")
        print(f"| {'task' if sa['env'] == 'metaworld' else 'family'} | A successes / progress | B successes / progress "
              "| B - A, success x 100 | B - A, progress |\n|---|---|---|---|---|")
        for r in rows:
            n = r["progress"][2]
            print(f"| {r['family']} | {r['A'][0]} of {n} / {r['A'][1]:.1f} | {r['B'][0]} of {n} / {r['B'][1]:.1f} | "
                  + " | ".join(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for d, (lo, hi), _ in (r["success"], r["progress"])) + " |")
    return out


# --- parts of one table, joined: `python eval.py merge OUT A.json B.json ...` ---
def in_order(names, known):
    """`names` in the order of `known` (the full table's), any others after them as first seen."""
    seen = list(dict.fromkeys(names))
    return [n for n in known if n in seen] + [n for n in seen if n not in known]


def merge(out: tyro.conf.Positional[str], parts: tyro.conf.Positional[tuple[str, ...]]):
    """Join --json-out files that evaluated different families or splits of one table (the same
    checkpoint, modes, episodes per cell, horizon, seed, image size and sampling) into OUT, and print
    the table. A cell's episodes depend only on its place in the full table (`episode_tasks`; on
    Meta-World, on its task), so OUT holds the episodes one run over every cell would have had, with
    the full table's order of families and splits, and `compare` reads it like one. Open-loop parts
    of the files are not carried over."""
    if len(parts) < 2:
        raise ValueError(f"merge needs at least two files to join, found {len(parts)}")
    reports = [(path, *read_report(path)) for path in parts]
    _, first, res0 = reports[0]
    for path, st, res in reports[1:]:
        keys = sorted((set(first) | set(st)) - {"families", "splits", "commit", "parts"})   # what fixes the episodes and the policy
        differ = [f"{k}: {first.get(k)} in {parts[0]}, {st.get(k)} in {path}" for k in keys if first.get(k) != st.get(k)]
        if differ:
            raise ValueError("not parts of one table: " + "; ".join(differ))
        if sorted(res) != sorted(res0):
            raise ValueError(f"not parts of one table: modes {sorted(res0)} in {parts[0]}, {sorted(res)} in {path}")
    owner = {}
    for path, _, res in reports:
        for cell in next(iter(res.values())):
            if cell in owner:
                raise ValueError(f"cell {cell[0]}/{cell[1]} is in both {owner[cell]} and {path}: each cell must come from one file")
            owner[cell] = path
    mw = first["env"] == "metaworld"
    families = in_order([c[0] for c in owner], world.MW_TASKS if mw else world.FAMILIES)
    splits = in_order([c[1] for c in owner], [MW_SPLIT] if mw else world.SPLITS)
    holes = [f"{f}/{s}" for f in families for s in splits if (f, s) not in owner]
    if holes:
        raise ValueError(f"the files do not make a whole table of families x splits: no cell {', '.join(holes[:4])}")
    joined = {m: {c: r[m][c] for _, _, r in reports for c in r[m]} for m in res0}
    commits = sorted({st.get("commit") for _, st, _ in reports})
    if len(commits) > 1:
        print(f"note: the parts were written at commits {commits}; a change to env.py between them would change the episodes")
    label = "task" if mw else "family"
    print(table(joined, families, splits))
    pairs, suites = paired_table(joined, families, label=label), "" if mw else claims_table(joined)
    if pairs:
        print(f"\npaired against the baseline, per {label} (all splits; mean difference in task progress, "
              f"bootstrap 95%):\n\n" + pairs)
    if suites:
        print("\nthe report's suites beside ours (task progress; METHOD.md section 7):\n\n" + suites)
    settings = {**first, "families": families, "splits": splits, "commit": ",".join(commits), "parts": list(parts)}
    write_report(out, {"closed_loop": as_json(joined)}, **settings)
    print(f"{len(owner)} cells of {len(parts)} files -> {out}")
    return joined


# --- the report's claims beside a saved evaluation: `python eval.py claims A.json` ---
def claims(path: tyro.conf.Positional[str], without_cross_view: str = "", seed: int = 0):
    """The report's four suites (METHOD.md section 7) beside the cells of an embedded-world --json-out
    file that stand for them (eval.SUITE_CELLS): each mode's task progress and each event mode's paired
    lead over the baseline, bootstrap 95% intervals resampled with --seed. --without-cross-view B.json:
    a file of the same episodes whose `baseline` was trained with --model.video.no-cross-view; adds the
    report's ablation (event execution with cross-view attention against fixed-length decoding without)."""
    st, res = read_report(path)
    if st["env"] != "tabletop":
        raise ValueError(f"{path}: env {st['env']!r}; the report's suites map onto the embedded world's cells only")
    out = claims_table(res, seed)
    if not out:
        need = "; ".join(f"{k}: {', '.join(f)} x {', '.join(s)}" for k, (f, s) in SUITE_CELLS.items())
        raise ValueError(f"{path}: no suite has all its cells ({st['families']} x {st['splits']} evaluated; {need})")
    print(f"{path}: {st['episodes']} episodes per cell, commit {st.get('commit')}\n\n{out}")
    if without_cross_view:
        sb, rb = read_report(without_cross_view)
        differ = [f"{k}: {st[k]} in {path}, {sb[k]} in {without_cross_view}" for k in SETTINGS if st[k] != sb[k]]
        if differ:
            raise ValueError("not the same episodes, so no paired ablation: " + "; ".join(differ))
        if "baseline" not in rb or "baseline" not in res:
            raise ValueError(f"the ablation needs mode 'baseline' in both files ({path}: {sorted(res)}; "
                             f"{without_cross_view}: {sorted(rb)})")
        if st.get("commit") != sb.get("commit"):
            print(f"note: written at commits {st.get('commit')} and {sb.get('commit')}; "
                  "a change to env.py between them would change the episodes")
        abl = ablation_table(res, rb, seed)
        if not abl:
            raise ValueError(f"no suite of the ablation ({', '.join(REPORT_ABLATION)}) has all its cells in both files")
        print(f"\nthe report's ablation; without cross-view: {without_cross_view}, commit {sb.get('commit')}\n\n{abl}")
        out += "\n\n" + abl
    return out


if __name__ == "__main__":
    sub = {"compare": compare, "merge": merge, "claims": claims}
    if sys.argv[1:2] and sys.argv[1] in sub:
        try:
            tyro.cli(sub[sys.argv[1]], args=sys.argv[2:], prog=f"eval.py {sys.argv[1]}")
        except ValueError as e:                  # files that cannot be compared or joined: say which and why
            raise SystemExit(f"error: {e}") from None
    else:
        try:
            tyro.cli(main)
        except (InferError, data.DataError, FileNotFoundError) as e:   # a checkpoint or dataset that is missing or wrong
            raise SystemExit(f"error: {e}") from None
