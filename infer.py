"""infer.py: the WALL-WM policy, in event mode and unified mode (METHOD.md section 6).

    python infer.py --ckpt runs/tiny --family press_order --image-size 32   # one closed-loop episode
    python infer.py --ckpt runs/default --mode unified_latents
    python infer.py --ckpt runs/default --family pick_place --trace     # and what each event did
    python infer.py --ckpt runs/default --family pick_place --trace --mode event_told   # given the expert's future
    python infer.py serve --ckpt runs/default --port 8000             # Policy.infer over HTTP (see the bottom)

    from infer import Policy
    policy = Policy.from_checkpoint("runs/default")   # a run (event mode: stage4, unified: stage5) or one file
    policy.reset("put the red block in the blue bowl")
    out = policy.infer(obs)                           # obs: frames (V, H, W, 3) uint8, state, intrinsics, cam_pose
    out["action"]                                     # (L, 4): the whole next event, executed open loop
    chunk = policy.infer(obs, mode="unified")["action"]       # (16, 4); then, while executing it, call
    policy.observe(obs)                                       # after each of its first 15 actions, and
    policy.infer(obs, mode="unified")                         # infer on the observation after the last

Event mode: the next-event caption comes from the caller, a planner callback, or the model's own
next-event head; its length from the caller or the remaining-time head. The video tower denoises to
s*, its features at s* are cached, and the action tower denoises the whole event against the cache.
Unified mode: fixed-length chunks on an observation-centred window (history frames, the anchor, the
future), with the text context from the instruction, an atomic caption, or the Staircase latents.
The batched functions (`event_actions`, `chunk_actions`) serve many episodes at once (eval.py).
"""
import base64
import binascii
import dataclasses
import json
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import numpy as np
import torch

import data
import model as M

BASELINE_STAGE = 6                    # train.py's stage number of the chunk-centric baseline
CAPTION_BYTES = 48                    # greedy next-event captions stop here (the world's L1 captions are shorter)


class InferError(ValueError):
    """Bad input to the policy: the message names the field, what was expected and what was found."""


EVENT_STAGES = (4, 3, 2, 1)           # event mode: the event pipeline's last stage (METHOD.md section 5)
UNIFIED_STAGES = (5, 4, 3, 2, 1)      # unified mode: stage 5's towers, adapted to fixed-length chunks


def checkpoint_file(path, stages=UNIFIED_STAGES):
    """A checkpoint file as given, or a run directory's stage<N>.safetensors for the first N of `stages`
    that exists (else its ckpt/model.safetensors)."""
    if not os.path.isdir(path):
        return path
    cands = [os.path.join(path, f"stage{s}.safetensors") for s in stages] + [os.path.join(path, "ckpt", "model.safetensors")]
    found = [c for c in cands if os.path.exists(c)]
    if not found:
        raise InferError(f"{path}: no checkpoint (expected stage<N>.safetensors or ckpt/model.safetensors)")
    return found[0]


def load_checkpoint(path, weights="ema", device="cpu"):
    """A checkpoint file (or a run directory's, as checkpoint_file picks it) -> (model, stats, stage,
    data layout). A checkpoint written before the layout travelled in it gets data.DataConfig()."""
    path = checkpoint_file(path)
    from train import CheckpointError, read_weights   # one reader of the checkpoint format (METHOD.md section 8)
    try:
        model_sd, ema_sd, stats, stage, cfg, data_cfg = read_weights(path)
    except CheckpointError as e:
        raise InferError(str(e)) from None
    m = M.WallWM(cfg)
    missing = m.load_state_dict(ema_sd if weights == "ema" else model_sd, strict=False)
    lost = [k for k in missing.missing_keys if not k.endswith("view_angles")]
    if lost or missing.unexpected_keys:
        raise InferError(f"{path}: its {weights} weights do not match its config "
                         f"(missing {lost[:3]}, unexpected {missing.unexpected_keys[:3]})")
    stats = {k: {s: np.asarray(v, np.float64) for s, v in d.items()} for k, d in stats.items()}
    return m.to(device).eval(), stats, int(stage), data_cfg or data.DataConfig()


class Policy:
    def __init__(self, model, stats, stage, data_cfg=data.DataConfig(), chunk_model=None, chunk_stage=None, guidance=1.0):
        """`model` serves event mode; `chunk_model` (default: the same) serves unified mode. `guidance`:
        event mode's classifier-free guidance scale on the caption (WallWM.guided_velocity; 1: off).
        Unified mode never uses it: chunk windows keep their text in training, so no empty-caption
        branch is trained for them."""
        self.m, self.stats, self.stage, self.cfg = model.eval(), stats, stage, data_cfg
        self.mc = self.m if chunk_model is None else chunk_model.eval()
        self.chunk_stage = stage if chunk_stage is None else chunk_stage
        self.views = model.cfg.video.views
        self.keep = self.cfg.history * self.cfg.k_p + 1      # observations a chunk window reaches back over
        self.instruction, self.mode, self.history, self.chunk, self.observed = "", None, [], 0, 0
        self.guidance = guidance

    @classmethod
    def from_checkpoint(cls, path, device="cpu", weights="ema", video_steps=0, cone_sampling=None, guidance=1.0):
        """A checkpoint file serves both modes. A run directory gives each mode its own weights: event
        mode its last event stage (stage4: the towers of stages 1-2, the VLM heads, the Staircase
        branch), unified mode stage5, whose towers stage 5 adapted to fixed-length chunks and so no
        longer predict events well (README, closed loop). Sampling overrides: video_steps > 0 replaces
        the checkpoint's number of video Euler steps; cone_sampling True / False turns the sight-cone
        mask at sampling on / off (None: the checkpoint's VideoConfig.cone_sampling); guidance: event
        mode's classifier-free guidance scale (see __init__)."""
        files = [checkpoint_file(path, stages) for stages in (EVENT_STAGES, UNIFIED_STAGES)]
        loaded = {f: load_checkpoint(f, weights, device) for f in dict.fromkeys(files)}
        for m, *_ in loaded.values():
            if video_steps:
                m.cfg = dataclasses.replace(m.cfg, flow=dataclasses.replace(m.cfg.flow, video_steps=video_steps))
            if cone_sampling is not None:
                m.cfg = dataclasses.replace(m.cfg, video=dataclasses.replace(m.cfg.video, cone_sampling=cone_sampling))
        (m, stats, stage, data_cfg), (mc, stats_c, stage_c, data_c) = loaded[files[0]], loaded[files[1]]
        if data_c != data_cfg:
            raise InferError(f"{files[0]} and {files[1]}: made with different data layouts ({data_cfg} and {data_c})")
        from train import differing_stats
        other = differing_stats(stats, stats_c)
        if other:                                          # one Policy normalises both modes' states and actions
            raise InferError(f"{files[0]} and {files[1]}: trained on data with different normalisation statistics "
                             f"({', '.join(other[:3])})")
        return cls(m, stats, stage, data_cfg, chunk_model=mc, chunk_stage=stage_c, guidance=guidance)

    # --- input checks: each names what it expected and what it found ---
    def check_text(self, text, field="instruction"):
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InferError(f"{field}: not valid UTF-8 ({e})") from None
        if not isinstance(text, str) or not text.strip():
            raise InferError(f"{field}: expected a non-empty string, found {text!r}")
        n = len(text.encode("utf-8"))
        if n > self.m.cfg.vlm.max_bytes - 1:
            raise InferError(f"{field}: at most {self.m.cfg.vlm.max_bytes - 1} UTF-8 bytes, found {n}")
        return text

    def check_obs(self, obs):
        if not isinstance(obs, dict):
            raise InferError(f"obs: expected a dict with frames, state, intrinsics, cam_pose, found {type(obs).__name__}")
        v, s = self.views, self.m.cfg.action.state_dim
        want = {"frames": ((v, None, None, 3), np.uint8), "state": ((s,), None), "intrinsics": ((v, 4), None),
                "cam_pose": ((v, 4, 4), None)}
        out = {}
        for key, (shape, dtype) in want.items():
            if key not in obs:
                raise InferError(f"obs: missing {key!r}")
            x = np.asarray(obs[key])
            if x.ndim != len(shape) or any(w is not None and w != n for w, n in zip(shape, x.shape)):
                raise InferError(f"obs[{key!r}]: expected shape {tuple(w or 'any' for w in shape)}, found {x.shape}")
            if dtype is not None and x.dtype != dtype:
                raise InferError(f"obs[{key!r}]: expected dtype uint8, found {x.dtype}")
            if dtype is None and not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
                raise InferError(f"obs[{key!r}]: expected real numbers, found {x.dtype}")
            if dtype is None and not np.isfinite(x).all():
                raise InferError(f"obs[{key!r}]: expected finite numbers, found non-finite values")
            out[key] = x
        size, H = self.m.cfg.video.image_size, out["frames"].shape[1]
        if out["frames"].shape[1] != out["frames"].shape[2] or H < size or H % size:
            raise InferError(f"obs['frames']: expected square views whose side is a multiple of {size}, "
                             f"found {out['frames'].shape[1:3]}")
        return out

    def need_stage(self, what, stage, have=None):
        have = self.stage if have is None else have
        if have == BASELINE_STAGE or have < stage:
            have = "the chunk-centric baseline" if have == BASELINE_STAGE else f"stage {have}"
            raise InferError(f"{what} needs a checkpoint from stage {stage} or later of the event pipeline; "
                             f"this one is {have}")

    def check_futures(self, futures, lengths, shape, episodes):
        """Known future observations: per episode one per k_p actions, frames shaped like the anchor's."""
        if lengths is None or not len(futures) == len(lengths) == episodes:
            raise InferError(f"futures: one list per episode ({episodes}) with its length given; found "
                             f"{len(futures)} lists and lengths {lengths}")
        for b, (fut, n) in enumerate(zip(futures, lengths)):
            if not isinstance(n, (int, np.integer)) or n < 1:
                raise InferError(f"lengths[{b}]: expected a positive integer with futures, found {n!r}")
            want = math.ceil(n / self.cfg.k_p)
            if len(fut) != want:
                raise InferError(f"futures[{b}]: expected ceil({n} / k_p {self.cfg.k_p}) = {want} observations, "
                                 f"found {len(fut)}")
            for f, o in enumerate(fut):
                if not isinstance(o, dict):
                    raise InferError(f"futures[{b}][{f}]: expected a dict with frames and cam_pose, found {type(o).__name__}")
                if np.shape(o.get("frames")) != shape or np.shape(o.get("cam_pose")) != (shape[0], 4, 4):
                    raise InferError(f"futures[{b}][{f}]: expected frames {shape} and cam_pose {(shape[0], 4, 4)}, "
                                     f"found {np.shape(o.get('frames'))} and {np.shape(o.get('cam_pose'))}")

    # --- batched: one window per row ---
    def window_batch(self, obs, rows, tau, L, futures=None):
        """Collated windows, one per episode: frame f of row b is observation rows[b][f] of that
        episode's list when tau[f] <= 0, a placeholder to denoise when tau[f] > 0 (with `futures`,
        the known observation futures[b][tau[f] - 1]), and padding (masked out) when rows[b][f] is
        None; L[b] action placeholders, padded to the longest. The last observation is the anchor."""
        B, nf = len(obs), len(tau)
        ref = obs[0][-1]
        frames = np.zeros((B, nf, *ref["frames"].shape), np.uint8)
        pose = np.repeat(np.stack([o[-1]["cam_pose"] for o in obs])[:, None], nf, 1)
        valid = np.array([[r is not None for r in row] for row in rows])
        for b, hist in enumerate(obs):
            for f, (r, t) in enumerate(zip(rows[b], tau)):
                if r is None:                                # padding
                    continue
                if t <= 0:
                    frames[b, f], pose[b, f] = hist[r]["frames"], hist[r]["cam_pose"]
                elif futures is not None:
                    frames[b, f], pose[b, f] = futures[b][t - 1]["frames"], futures[b][t - 1]["cam_pose"]
        K = max(L)
        aseg = torch.tensor([[0] * n + [-1] * (K - n) for n in L])
        state = np.stack([data.normalise(o[-1]["state"], self.stats["state"]) for o in obs])
        return {"frames": torch.from_numpy(frames), "frame_tau": torch.tensor(tau).repeat(B, 1),
                "frame_seg": torch.where(torch.from_numpy(valid), 0, -1), "cam_pose": torch.from_numpy(pose).float(),
                "intrinsics": torch.from_numpy(np.stack([o[-1]["intrinsics"] for o in obs])[:, None]).float(),
                "action": torch.zeros(B, K, self.m.cfg.action.action_dim),
                "action_tau": (torch.arange(K) // self.cfg.k_p + 1).repeat(B, 1), "action_seg": aseg,
                "state": torch.from_numpy(state)[:, None].float(), "state_seg": torch.zeros(B, 1, dtype=torch.long),
                "chunk_index": torch.full((B, 1), -1)}

    def noise(self, generator, B, nf, K, size):
        """Starting noise for B rows of nf frames and K actions. A list of generators draws row b from
        generator[b] at the fixed size `size` (frames, actions), then cuts it to (nf, K): an episode's
        noise then depends on its own generator only, not on the batch it shares (sharded evaluation
        gives each episode the same result as one process). One generator (or None) serves every row."""
        v, A = self.m.cfg.video, self.m.cfg.action.action_dim
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * B
        per_view = ((v.image_size // v.patch) ** 2, v.patch * v.patch * 3)
        frames = [torch.randn((size[0], self.views, *per_view), generator=g)[:nf] for g in gens]
        action = [torch.randn((size[1], A), generator=g)[:K] for g in gens]
        return {"frames": torch.stack(frames), "action": torch.stack(action)}

    def actions_out(self, a, L):
        a = a.double().cpu().numpy()
        return [np.clip(data.actions_from_targets(a[b, :n], self.cfg, self.stats), -1, 1).astype(np.float32)
                for b, n in enumerate(L)]

    @torch.no_grad()
    def next_event(self, obs, instructions, with_captions=True):
        """The model's own next event at these observations (VLM heads, stage 3 on): its caption from
        the next-event head (greedy bytes; empty strings without with_captions) and its length from the
        remaining-time head, rounded and clamped to 1..max_event_len, as event mode executes it."""
        self.need_stage("the model's own next-event caption and remaining time", 3)
        frames = torch.from_numpy(np.stack([o["frames"] for o in obs])).to(self.m.device)
        pred = self.m.vlm.predict(frames, instructions, max_len=CAPTION_BYTES if with_captions else 0)
        return pred["caption"], pred["remaining"].round().clamp(1, self.cfg.max_event_len).long().tolist()

    @torch.no_grad()
    def event_actions(self, obs, instructions, captions=None, lengths=None, cache=True, return_frames=False, generator=None,
                      futures=None):
        """Event mode for a batch of episodes: obs[b] is one observation dict. Returns per episode the
        event's actions (L_b, A), its caption and length, and with return_frames its predicted future
        frames (F_b, V, h, w, 3) at the model's image size; captions/lengths None come from the
        model's heads. `generator`: one torch.Generator, or one per episode (see `noise`).
        `futures` (a diagnostic): per episode its true future observations tau = 1..ceil(L_b / k_p),
        noised to s* in place of the generated video (WallWM.sample's true_future); needs lengths."""
        m, cfg = self.m, self.cfg
        if futures is not None:
            self.check_futures(futures, lengths, np.shape(obs[0]["frames"]), len(obs))
        if captions is None or lengths is None:
            own_captions, own_lengths = self.next_event(obs, instructions, captions is None)
            captions = own_captions if captions is None else captions
            lengths = own_lengths if lengths is None else lengths
        self.need_stage("event mode", 2)                             # stage 1 leaves the action tower untrained
        L = [int(n) for n in lengths]
        F_ = [math.ceil(n / cfg.k_p) for n in L]                     # each event's own future frames; the rest padding
        rows = [[0] * (f + 1) + [None] * (max(F_) - f) for f in F_]
        b = self.window_batch([[o] for o in obs], rows, list(range(max(F_) + 1)), L, futures)
        longest = max(cfg.max_event_len, *L)
        noise = self.noise(generator, len(obs), max(F_) + 1, max(L), (math.ceil(longest / cfg.k_p) + 1, longest))
        text = m.context(m.text.encode(list(captions))[:, None])
        out = m.sample(b, text=text, cache=cache, to_end=return_frames, noise=noise, true_future=futures is not None,
                       guidance=self.guidance)
        res = {"action": self.actions_out(out["action"], L), "caption": list(captions), "length": L}
        if return_frames:
            res["frames"] = [x[1:f + 1] for x, f in zip(out["frames"].cpu().numpy(), F_)]
        return res

    def chunk_batch(self, history, chunk_index, futures=None):
        """The chunk windows of a batch (data.chunk_window's layout): frames tau = -M..0 from k_p-step
        strides back through history[b] (the last observation is the anchor), N future placeholders,
        or with `futures` each episode's N known future observations (tau 1..N)."""
        cfg = self.cfg
        tau = list(range(-cfg.history, cfg.chunk_frames + 1))
        rows = [[r if r >= 0 else None for r in (len(h) - 1 + min(t, 0) * cfg.k_p for t in tau)] for h in history]
        if futures is not None:
            self.check_futures(futures, [cfg.chunk_frames * cfg.k_p] * len(history), np.shape(history[0][-1]["frames"]), len(history))
        b = self.window_batch(history, rows, tau, [cfg.chunk_frames * cfg.k_p] * len(history), futures)
        b["chunk_index"] = torch.tensor(chunk_index).view(-1, 1)
        return b

    @torch.no_grad()
    def chunk_actions(self, history, instructions, chunk_index, source="instruction", captions=None, generator=None,
                      return_frames=False, futures=None):
        """Unified mode for a batch: history[b] is the list of observations of episode b so far (the
        last is the anchor). Frames tau = -M..0 come from k_p-step strides back; the chunk is N k_p
        actions. With return_frames, also its N predicted future frames (N, V, h, w, 3) per episode.
        `futures` (a diagnostic): per episode its N true future observations, as in event_actions."""
        m, M_ = self.mc, self.cfg.history
        b = self.chunk_batch(history, chunk_index, futures)
        nf, L = b["frame_tau"].shape[1], [b["action"].shape[1]] * len(history)
        noise = self.noise(generator, len(history), nf, L[0], (nf, L[0]))
        if source == "latents":
            self.need_stage("unified mode with Staircase latents", 4, self.chunk_stage)
            anchor = b["frames"][:, M_]                                       # the keyframe (tau 0) of each window
            feats = m.vlm.text_out(m.latents(anchor.to(m.device), instructions))
            text = m.context(feats[:, None])
        else:
            texts = instructions if source == "instruction" else captions
            if texts is None:
                raise InferError("unified mode with source 'atomic' needs captions (an atomic instruction per episode)")
            text = m.context(m.text.encode(list(texts))[:, None])
        out = m.sample(b, text=text, noise=noise, to_end=return_frames, true_future=futures is not None)
        res = {"action": self.actions_out(out["action"], L)}
        if return_frames:
            res["frames"] = list(out["frames"][:, M_ + 1:].cpu().numpy())
        return res

    # --- one episode: reset, then infer per event or per chunk ---
    def reset(self, instruction):
        """A new episode: its instruction; its mode is set by its first `infer`."""
        self.instruction = self.check_text(instruction)
        self.mode, self.history, self.chunk, self.observed = None, [], 0, 0

    def observe(self, obs):
        """Record an observation seen while a unified-mode chunk executes: call it after each of the
        chunk's actions but the last, whose observation goes to the next `infer`. The window's history
        frames are k_p steps apart, so the policy needs every step (it keeps the last `keep`)."""
        self.history = (self.history + [self.check_obs(obs)])[-self.keep:]
        self.observed += 1

    def check_episode(self, mode):
        """One mode per episode (a switch would hand unified mode a history and chunk counter it did
        not build); in unified mode after the first chunk, exactly L - 1 observations since the last
        chunk, else the history frames would not be k_p steps apart (one observation per chunk would
        put them whole chunks back). Before the first chunk, any earlier observations are history."""
        if self.mode not in (None, mode):
            raise InferError(f"mode: this episode runs in {self.mode} mode, found {mode!r}; call reset(instruction) to switch")
        want = self.cfg.chunk_frames * self.cfg.k_p - 1
        if mode == "unified" and self.chunk > 0 and self.observed != want:
            raise InferError(f"unified mode: expected observe(obs) after each of the last chunk's first {want} actions "
                             f"(its last action's observation goes to infer), found {self.observed} observations")

    def infer(self, obs, mode: Literal["event", "unified"] = "event", caption=None, length=None, planner=None,
              source: Literal["instruction", "atomic", "latents"] = "latents", return_frames=False, seed=None):
        """The next event (event mode) or chunk (unified mode) for this observation. Returns the actions
        (L, A) in [-1, 1], the caption used, the event length, and the time it took in milliseconds.
        Unified mode also returns its text `source`; its caption is the atomic instruction (source
        'atomic'), the episode's instruction ('instruction') or None ('latents': no text, the
        Staircase latents); it refuses a length, a planner, and a caption without source 'atomic'.
        `seed` fixes the starting noise (the same seed and input give the same actions)."""
        if not self.instruction:
            raise InferError("infer: call reset(instruction) first")
        t0 = time.perf_counter()
        obs = self.check_obs(obs)
        if source not in ("instruction", "atomic", "latents"):
            raise InferError(f"source: expected 'instruction', 'atomic' or 'latents', found {source!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InferError(f"seed: expected a non-negative integer, found {seed!r}")
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        if mode not in ("event", "unified"):
            raise InferError(f"mode: expected 'event' or 'unified', found {mode!r}")
        self.check_episode(mode)
        if mode == "event":
            if caption is None and planner is not None:
                caption = planner(obs)
            caption = None if caption is None else self.check_text(caption, "caption")
            if length is not None and (isinstance(length, bool) or not isinstance(length, (int, np.integer))
                                       or not 1 <= length <= self.cfg.max_event_len):
                raise InferError(f"length: expected an integer in 1..{self.cfg.max_event_len}, found {length!r}")
            out = self.event_actions([obs], [self.instruction], None if caption is None else [caption],
                                     None if length is None else [length], return_frames=return_frames,
                                     generator=generator)
            res = {"action": out["action"][0], "caption": out["caption"][0], "length": out["length"][0]}
            if return_frames:
                res["frames"] = out["frames"][0]
        else:
            n = self.cfg.chunk_frames * self.cfg.k_p
            for name, given in (("length", length), ("planner", planner)):
                if given is not None:
                    raise InferError(f"{name}: unified mode's chunks are {n} actions, found {name} {given!r}; "
                                     f"use mode='event' for a variable-length event")
            if caption is not None and source != "atomic":
                raise InferError(f"caption: unified mode reads one with source 'atomic' only (the atomic instruction); "
                                 f"found source {source!r}")
            caption = None if caption is None else self.check_text(caption, "caption")
            out = self.chunk_actions([self.history + [obs]], [self.instruction], [self.chunk], source,
                                     None if caption is None else [caption], generator=generator, return_frames=return_frames)
            self.history = (self.history + [obs])[-self.keep:]   # only once the chunk is made: a refused call leaves no trace
            self.chunk, self.observed = self.chunk + 1, 0
            text = {"atomic": caption, "instruction": self.instruction, "latents": None}[source]
            res = {"action": out["action"][0], "caption": text, "source": source, "length": len(out["action"][0])}
            if return_frames:
                res["frames"] = out["frames"][0]
        self.mode = mode
        res["ms"] = (time.perf_counter() - t0) * 1000
        return res


# --- command line: one closed-loop episode of the embedded world ---
def main(ckpt: str, family: str = "pick_place", split: str = "seen", seed: int = 1_000_000,
         mode: Literal["event_oracle", "event_auto", "unified_latents", "baseline", "event_told", "baseline_told",
                       "event_timed"] = "event_oracle",
         horizon: int = 300, image_size: int = 64, trace: bool = False):
    """Roll out one episode with the policy and print its progress, success and time per step. With
    --trace, one line per model call: the caption, the number of actions, where the TCP went (cm),
    and where the oracle's next event acts (its object's position), to read the episode event by event;
    in the _told modes (eval.py), also how far from the expert's lookahead the call left the TCP."""
    import env as world
    import eval as evaluation
    policy = Policy.from_checkpoint(os.path.join(ckpt, "stage6.safetensors") if mode.startswith("baseline") else ckpt)
    task = world.make_task(family, split, seed)
    t0 = time.perf_counter()
    r = evaluation.rollout(policy, [task], mode, horizon, image_size, trace=trace)[0]
    calls = r.get("calls", [])

    def cm(x):
        return "(" + ", ".join(f"{100 * v:.1f}" for v in x) + ")"
    for c, nxt in zip(calls, [c["tcp"] for c in calls[1:]] + [r["final_state"][:3]]):
        obj = "" if c["object"] is None else f"; the oracle's object at {cm(c['object'])}"
        if "expert_end" in c:
            obj += (f"; the expert's lookahead moves {100 * math.dist(c['tcp'], c['expert_end']):.1f} cm and "
                    f"ends {100 * math.dist(nxt, c['expert_end']):.1f} cm from here")
        print(f"step {c['step']:3d}: {c['caption']!r}, {c['length']} actions, TCP {cm(c['tcp'])} -> {cm(nxt)}{obj}")
    print(f"{task.instruction!r} ({family}, {split}, seed {seed}), {mode}: progress {r['progress']:.0f}, "
          f"success {r['success']}, {r['steps']} steps, {time.perf_counter() - t0:.1f} s")


# --- serving: Policy.infer over HTTP with JSON, standard library only ---
#   GET  /health                                 -> {"ok", "stage", "views", "image_size", "state_dim", ...}
#   POST /reset {"instruction"}                  -> {"ok": true}
#   POST /observe {"obs"}                        -> {"ok": true, "observed"}: unified mode's every-step history
#   POST /infer {"obs": {"frames", "state", "intrinsics", "cam_pose"}, and optionally "mode", "caption",
#                "length", "source", "return_frames", "seed" (Policy.infer's arguments)}
#                                                -> {"action" (L, A), "caption", "length", "ms", ["frames"],
#                                                    and in unified mode "source"}
# Arrays are nested lists; frames may instead be {"shape": [V, H, W, 3], "base64": raw uint8 bytes}, the
# form predicted frames come back in. One policy per server (it holds the episode's instruction and
# history); a lock serialises model calls. Bad requests get 400 with the problem named, unknown paths
# 404, bodies over max_body bytes 413.
MAX_BODY = 8 << 20                    # bytes: a 2-view 256 x 256 observation as nested lists fits
INFER_FIELDS = ("obs", "mode", "caption", "length", "source", "return_frames", "seed")


def array_from_json(x, key):
    """One obs field from JSON: nested lists of numbers, or for frames {"shape", "base64"} (raw uint8 bytes)."""
    if isinstance(x, dict) and key != "frames":
        raise InferError(f"obs[{key!r}]: expected nested lists of numbers (only frames may be base64), found an object")
    if isinstance(x, dict):
        if set(x) != {"shape", "base64"}:
            raise InferError(f"obs[{key!r}]: expected nested lists or {{'shape', 'base64'}}, found keys {sorted(x)}")
        try:
            return np.frombuffer(base64.b64decode(x["base64"], validate=True), np.uint8).reshape(x["shape"])
        except (binascii.Error, ValueError, TypeError) as e:
            raise InferError(f"obs[{key!r}]: expected base64 uint8 bytes of shape {x['shape']!r} ({e})") from None
    try:
        a = np.asarray(x, np.float64)
    except (ValueError, TypeError):
        raise InferError(f"obs[{key!r}]: expected nested lists of numbers") from None
    if key != "frames":
        return a
    if a.size and not (np.all(a == np.round(a)) and a.min() >= 0 and a.max() <= 255):
        raise InferError("obs['frames']: expected integers in 0..255")
    return a.astype(np.uint8)


def array_to_json(a):
    return {"shape": list(a.shape), "base64": base64.b64encode(np.ascontiguousarray(a, np.uint8).tobytes()).decode()}


class Handler(BaseHTTPRequestHandler):
    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def do_GET(self):
        if self.path != "/health":
            return self.reply(404, {"error": f"unknown path GET {self.path} (expected GET /health, POST /reset, /observe, /infer)"})
        p = self.server.policy
        self.reply(200, {"ok": True, "stage": p.stage, "unified_stage": p.chunk_stage, "views": p.views, "image_size": p.m.cfg.video.image_size,
                         "state_dim": p.m.cfg.action.state_dim, "action_dim": p.m.cfg.action.action_dim,
                         "max_event_len": p.cfg.max_event_len, "instruction": p.instruction, "max_body": self.server.max_body})

    def do_POST(self):
        if self.path not in ("/reset", "/observe", "/infer"):
            return self.reply(404, {"error": f"unknown path POST {self.path} (expected POST /reset, /observe or /infer)"})
        size = self.headers.get("Content-Length", "")
        if not size.isdigit():
            self.close_connection = True
            return self.reply(411, {"error": f"request: expected a Content-Length header, found {size!r}"})
        if int(size) > self.server.max_body:
            self.close_connection = True                 # the body is never read
            return self.reply(413, {"error": f"request body: at most {self.server.max_body} bytes, found {size}"})
        try:
            body = json.loads(self.rfile.read(int(size)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self.reply(400, {"error": f"request body: not valid JSON ({e})"})
        try:
            with self.server.lock:
                out = {"/reset": self.reset, "/observe": self.observe, "/infer": self.infer}[self.path](body)
        except InferError as e:
            return self.reply(400, {"error": str(e)})
        except Exception as e:                           # a bug, not a bad request: say so and keep serving
            return self.reply(500, {"error": f"internal error: {type(e).__name__}: {e}"})
        self.reply(200, out)

    def fields(self, body, allowed):
        if not isinstance(body, dict):
            raise InferError(f"request body: expected a JSON object, found {type(body).__name__}")
        if unknown := sorted(set(body) - set(allowed)):
            raise InferError(f"request body: unknown fields {unknown} (expected {list(allowed)})")
        return body

    def reset(self, body):
        self.server.policy.reset(self.fields(body, ("instruction",)).get("instruction"))
        return {"ok": True}

    def parse_obs(self, body):
        obs = body.get("obs")
        if not isinstance(obs, dict):
            raise InferError(f"obs: expected a JSON object with frames, state, intrinsics, cam_pose, found {obs!r:.40}")
        return {k: array_from_json(v, k) for k, v in obs.items()}

    def observe(self, body):
        self.server.policy.observe(self.parse_obs(self.fields(body, ("obs",))))
        return {"ok": True, "observed": self.server.policy.observed}

    def infer(self, body):
        body = self.fields(body, INFER_FIELDS)
        obs = self.parse_obs(body)
        if not isinstance(body.get("return_frames", False), bool):
            raise InferError(f"return_frames: expected true or false, found {body['return_frames']!r}")
        kw = {k: body[k] for k in INFER_FIELDS[1:] if k in body}
        out = self.server.policy.infer(obs, **kw)
        res = {"action": out["action"].tolist(), "caption": out["caption"], "length": int(out["length"]), "ms": out["ms"]}
        if "frames" in out:
            res["frames"] = array_to_json(out["frames"])
        return res


class PolicyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, policy, host="127.0.0.1", port=8000, max_body=MAX_BODY, quiet=False):
        super().__init__((host, port), Handler)
        self.policy, self.lock, self.max_body, self.quiet = policy, threading.Lock(), max_body, quiet


def serve(ckpt: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", max_body: int = MAX_BODY):
    """Serve the policy of a checkpoint over HTTP (bound to 127.0.0.1 unless --host says otherwise)."""
    server = PolicyServer(Policy.from_checkpoint(ckpt, device), host, port, max_body)
    print(f"serving {ckpt} (event mode: stage {server.policy.stage}, unified mode: stage {server.policy.chunk_stage}) on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


if __name__ == "__main__":
    import sys

    import tyro
    try:
        if sys.argv[1:2] == ["serve"]:
            tyro.cli(serve, args=sys.argv[2:])
        else:
            tyro.cli(main)
    except InferError as e:                      # a checkpoint or an input that cannot serve: say which and why
        raise SystemExit(f"error: {e}") from None
