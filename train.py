"""train.py: the five-stage WALL-WM pipeline and the chunk-centric baseline (METHOD.md section 5).

    python train.py tiny --run-dir runs/tiny              # every stage and the baseline, a few steps each
    python train.py                                       # default: data, stages 1-5, baseline, results
    python train.py long                                  # longer runs that aim at the closed-loop targets
    python train.py metaworld                             # Meta-World's nine tasks (pip install -r requirements-metaworld.txt)
    torchrun --standalone --nproc_per_node=2 train.py tiny --run-dir runs/tiny2
    python train.py default --stage 3 --init-from runs/default --run-dir runs/s3   # one stage from a run
    python train.py default --resume                      # continue a killed run exactly

Presets are positional; every field can be overridden (`python train.py tiny --model.video.width 96`,
`--model.video.no-cross-view`, `--data.no-balanced`). The run directory gets config.json (with argv,
git commit and library versions), log.jsonl (one record per step), ckpt/ (the latest checkpoint:
model.safetensors, optim.pt, meta.json) and stage<N>.safetensors at the end of each stage.
"""
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import safetensors
import torch
import torch.distributed as dist
import tyro
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data
import env as world
import model as M
import muon

CKPT_FORMAT = "wallwm-ckpt-1"


# --- configuration ---
@dataclass(frozen=True)
class DataSpec:
    root: str = "data/default"        # the episodes; generated here if missing
    episodes: int = 240               # embedded world: episodes over its five families
    source: Literal["tabletop", "metaworld"] = "tabletop"   # the embedded world, or Meta-World (optional extra)
    tasks: str = ""                   # Meta-World: comma-separated tasks (empty: env.MW_TASKS, all nine)
    episodes_per_task: int = 0        # Meta-World: successful expert episodes per task
    seed: int = 0
    image_size: int = 64
    workers: int = 2                  # processes for generation
    balanced: bool = True             # cluster-balanced sampling (both clusterings); off: uniform
    caption_drop: bool = True         # length-aware caption drop rho(L); off: captions always kept
    action_offsets: bool = False      # action targets: xyz offsets from the window's start, not per-step deltas


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3                  # AdamW: embeddings, input/output layers, norms, biases
    muon_lr: float = 0.02             # Muon: hidden matrices (adjust_lr "original")
    weight_decay: float = 0.01
    warmup: int = 30                  # linear warm-up steps, then cosine decay to min_lr_ratio
    min_lr_ratio: float = 0.1
    clip: float = 1.0                 # gradient-norm clipping
    ema: float = 0.9999               # EMA decay, warmed up as min(ema, (1 + n) / (10 + n))


@dataclass(frozen=True)
class TrainConfig:
    model: M.ModelConfig = M.PRESETS["default"]
    data: DataSpec = DataSpec()
    optim: OptimConfig = OptimConfig()
    run_dir: str = "runs/default"     # where config, log, checkpoints and results go
    steps: tuple[int, int, int, int, int] = (480, 480, 150, 100, 120)   # optimizer steps of stages 1-5
    baseline: bool = True             # train U-Scratch for steps[0] + steps[1] + steps[4] steps
    batch: int = 8                    # windows per optimizer step, whatever the number of processes
    micro: int = 8                    # windows per forward pass; accumulation = batch / (micro * processes)
    pack: int = 32                    # event windows are packed into rows of at most this many action tokens
    contrastive_weight: float = 0.1   # stage 1: the text encoder's contrastive loss (METHOD.md section 4)
    text_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)   # stage 3: l_align, l_next, l_time
    stage: int = 0                    # 0: stages 1-5 then the baseline; N in 1..6: only that one (6 = baseline)
    init_from: str = ""               # with --stage N: the run whose stage N-1 weights start this one
    resume: bool = False              # continue from <run>/ckpt
    seed: int = 0
    save_every: int = 100             # checkpoint period in steps (and at the end of every stage)
    stop_after: int = 0               # stop (after a checkpoint) once this invocation ran this many steps; 0: never
    device: str = "auto"              # auto: cuda when present, else cpu
    eval_episodes: int = 2            # closed-loop episodes per (family, split, mode) after training; 0: none
    eval_horizon: int = 300           # steps before an evaluation episode is cut (the expert needs up to 298 on put_all)


def _small(**kw):
    return dataclasses.replace(TrainConfig(), **kw)


# The model `long` and `metaworld` were measured with (README): `default`'s before its towers went from
# width 96 to 128. At 128, `long` would pass its 2 hours on 2 cores.
W96 = dataclasses.replace(M.PRESETS["default"], video=dataclasses.replace(M.PRESETS["default"].video, width=96),
                          action=dataclasses.replace(M.PRESETS["default"].action, width=96))

PRESETS = {
    "tiny": ("seconds: every stage a few steps on 8 small episodes (tests, smoke runs)",
             _small(model=M.PRESETS["tiny"], data=DataSpec(root="data/tiny", episodes=8, image_size=32, workers=1),
                    run_dir="runs/tiny", steps=(3, 3, 3, 3, 3), batch=4, micro=2, save_every=2,
                    optim=OptimConfig(warmup=2), eval_episodes=0)),
    "default": ("a laptop run: the whole pipeline on 2 CPU cores in at most 30 minutes", TrainConfig()),
    # Measured on 2 CPU cores (README, "The long preset"): training 56 min at ef3d842, and the evaluation at 20
    # episodes per cell 57 min in one process (1600 episodes, 2.1 s each), so about 2 hours in all. The infer/eval
    # issue's 50 per cell is `torchrun --standalone --nproc_per_node=2 eval.py --ckpt runs/long --episodes 50`
    # afterwards: 79 min for its 4000 episodes.
    "long": ("at most 2 hours on 2 CPU cores, much less on a GPU: the closed-loop targets",
             _small(model=W96, data=DataSpec(root="data/long", episodes=600), run_dir="runs/long", steps=(1000, 1000, 500, 300, 500),
                    batch=16, save_every=250, eval_episodes=20, eval_horizon=300)),
    # Measured as one command: 38 min on 2 CPU cores, evaluation included (README, Meta-World). The
    # model is `default`'s at width 96 (W96) with two changes: the scene camera stands 1.1-1.5 m from the workspace, so the sight-cone band
    # reaches 2 m; and fewer Euler steps make a policy call at evaluation cheaper on a CPU.
    "metaworld": ("Meta-World's nine tasks (optional extra): data, stages 1-5, the baseline and 20 held-out "
                  "configurations per task, within 3 hours on 2 CPU cores (measured: 38 min)",
                  _small(data=DataSpec(root="data/metaworld", source="metaworld", episodes_per_task=40),
                         model=dataclasses.replace(W96, video=dataclasses.replace(W96.video, cone_band=(0.05, 2.0)),
                                                   flow=dataclasses.replace(W96.flow, video_steps=8, action_steps=6)),
                         run_dir="runs/metaworld", steps=(400, 400, 200, 120, 200),
                         save_every=100, eval_episodes=20, eval_horizon=300)),
}


# --- stages (METHOD.md section 5): what trains, on which windows ---
@dataclass(frozen=True)
class Stage:
    name: str
    trains: tuple[str, ...]          # parts of model.WallWM (model.PARTS); all others are frozen
    windows: str                     # "event" or "chunk"


STAGES = {1: Stage("video pretraining", ("video", "text"), "event"),
          2: Stage("action pretraining", ("action",), "event"),
          3: Stage("VLM text conditioner", ("vlm", "recon"), "event"),
          4: Stage("Staircase distillation", ("stair", "prefix"), "event"),
          5: Stage("next-chunk adaptation", ("video", "action"), "chunk"),
          6: Stage("chunk-centric baseline (U-Scratch)", ("text", "video", "action"), "chunk")}


def stage_steps(cfg, s):
    return sum(cfg.steps[i] for i in (0, 1, 4)) if s == 6 else cfg.steps[s - 1]


# --- processes: one, or many under torchrun ---
def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1
    # With CUDA, NCCL for CUDA tensors and gloo for CPU ones (all_mean's loss terms; gradients with --device cpu;
    # barriers and object collectives, which pick the CPU backend when there is one). The timeout covers
    # rank 0 generating the data while the others wait at a barrier (Meta-World's takes minutes).
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=2))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def all_mean(values, world):
    """Average a dict of floats over the processes (the same numbers on every rank)."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


def seed_of(*parts):
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


# --- data: generated if missing, windows drawn by the cluster-balanced sampler ---
def ensure_data(spec, rank, world_size):
    made = dict(episodes=spec.episodes, seed=spec.seed, image_size=spec.image_size, source=spec.source, tasks=spec.tasks,
                episodes_per_task=spec.episodes_per_task)
    if rank == 0 and not os.path.exists(os.path.join(spec.root, "dataset.json")):
        what = (f"{spec.episodes_per_task} Meta-World episodes per task ({spec.tasks or 'all nine tasks'})"
                if spec.source == "metaworld" else f"{spec.episodes} episodes")
        print(f"generating {what} into {spec.root} ...", flush=True)
        data.generate(spec.root, workers=spec.workers, **made)
    elif rank == 0:                                    # a dataset already there: say so if --data would make another
        try:
            jobs = data.generation_jobs(spec.root, **made)
            other = data.made_otherwise(spec.root, jobs) if jobs else []
        except data.DataError as e:                    # settings that only generating reads: not this run's concern
            other = [f"--data would not generate ({e})"]
        if other:
            more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
            print(f"note: training on the dataset already in {spec.root}, not the one --data describes: "
                  f"{other[0]}{more}; another --data.root generates that one", flush=True)
    if world_size > 1:
        dist.barrier()
    ds = data.Dataset(spec.root)
    if not spec.caption_drop:
        ds.cfg = dataclasses.replace(ds.cfg, rho_min=0.0, rho_max=0.0)
    return data.with_targets(ds, spec.action_offsets)


def paraphrases(event):
    """Every template of this L1 event's caption form, filled with its object and target (env.L1_TEXTS,
    and env.MW_L1_TEXTS for Meta-World's own forms)."""
    for texts in (*world.L1_TEXTS.values(), *world.MW_L1_TEXTS.values()):
        filled = [t.format(o=event["object"], t=event["target"]) for t in texts]
        if event["text"] in filled:
            return filled
    return [event["text"]]


class Windows:
    """The training items of one stage, with their sampling weights; a window is built per draw."""

    def __init__(self, ds, kind, balanced, seed):
        self.ds, self.kind = ds, kind
        if kind == "event":
            self.per, self.items = data.all_events(ds)
            every = data.event_windows(ds)
        else:
            self.items = data.all_chunks(ds)
            self.per = [data.episode_events(ds, i) for i in range(len(ds))]
            every = data.chunk_windows(ds)
        vl, act = data.cluster(ds, every, kind)        # stage 5 clusters its own (chunk) windows
        w = data.balance_weights(vl, act, ds.cfg.balance_power) if balanced else np.full(len(every), 1 / len(every))
        self.sampler = data.BalancedSampler(w, per_epoch=len(every), seed=seed)
        self._stream = (None, None)
        events = [e for ev in self.per for e in ev]
        self.captions = [(paraphrases(e), e) for e in events]

    def index_at(self, pos):                           # the item at a global position of the sampler's stream
        epoch, off = divmod(pos, self.sampler.per_epoch)
        if self._stream[0] != epoch:
            self._stream = (epoch, self.sampler.stream(epoch))
        return int(self._stream[1][off])

    def window(self, pos, seed):
        i, j = self.items[self.index_at(pos)]
        rng = np.random.default_rng(seed_of(seed, pos))               # caption drop redrawn per draw
        if self.kind == "event":
            return data.event_window(self.ds, self.per[i], j, rng)
        w = data.chunk_window(self.ds, i, j)
        a = j * self.ds.cfg.chunk_frames * self.ds.cfg.k_p
        w["event_text"] = next((e["text"] for e in self.per[i] if e["start"] <= a < e["end"]), w["instruction"])
        return w                                                      # event_text: the L1 caption at the anchor

    def batch(self, positions, seed, pack):
        ws = [self.window(p, seed) for p in positions]
        return data.collate(data.pack(ws, pack) if self.kind == "event" else [[w] for w in ws])

    def paraphrase_pairs(self, n, rng):
        """Stage 1's contrastive batch: n captions, each with another template of the same meaning."""
        texts, keys = [], []
        for k in rng.choice(len(self.captions), n, replace=False):
            filled, e = self.captions[k]
            pick = rng.choice(len(filled), 2, replace=len(filled) < 2)
            texts += [filled[pick[0]], filled[pick[1]]]
            keys += [filled[0]] * 2
        return texts, keys


# --- the losses of each stage ---
def mixed_context(m, b, choice):
    """Stage 5's text context, one source per chunk (choice (B, ns): 0 the global instruction,
    1 the L1 caption at the anchor, 2 the Staircase latents through the project-out head), padded
    to a common length; padding tokens get window id -1 and are never attended."""
    B, ns = b["state_seg"].shape
    flat = lambda key: [t for row in b[key] for t in row]                         # noqa: E731
    make = [lambda: m.text.encode(flat("instruction")).unflatten(0, (B, ns)),
            lambda: m.text.encode(flat("event_text")).unflatten(0, (B, ns)),
            lambda: m.latent_context(b)[0].unflatten(1, (ns, -1))]
    T = max(m.cfg.text.slots, m.cfg.vlm.num_latents)
    feats = torch.zeros(B, ns, T, m.cfg.text.width, device=m.device)
    seg = torch.full((B, ns, T), -1, dtype=torch.long, device=m.device)
    choice = choice.to(m.device)
    for k, source in enumerate(make):
        pick = choice == k
        if not bool(pick.any()):                       # only the sources some chunk drew are computed
            continue
        with torch.no_grad():
            s = source()
        feats[:, :, :s.shape[2]][pick] = s[pick]
        seg[:, :, :s.shape[2]][pick] = torch.arange(ns, device=m.device)[None, :, None].expand(B, ns, s.shape[2])[pick]
    return feats.flatten(1, 2), seg.flatten(1)


def stage_losses(m, s, b, cfg, windows, rng, gen):
    if s == 1:
        out = m(b, action=False)
        texts, keys = windows.paraphrase_pairs(max(2, len(b["caption"])), rng)
        out["contrastive"] = cfg.contrastive_weight * M.contrastive_loss(m.text.encode(texts), keys, m.cfg.text.temperature)
        return out
    if s == 2:
        return m(b, video=False)
    if s == 3:
        out = m.text_losses(b)
        for k, w in zip(("align", "next", "time"), cfg.text_weights):
            out[k] = w * out[k]
        return out
    if s == 4:
        return {"cot": m.cot_loss(b)}
    if s == 5:
        choice = torch.randint(3, b["state_seg"].shape, generator=gen)
        return m(b, text=mixed_context(m, b, choice))
    return m(b)                                        # baseline: chunk windows captioned by the instruction


# --- checkpoints: safetensors + tensors-only optimizer state + JSON, written to a temporary directory ---
class CheckpointError(RuntimeError):
    pass


def write_weights(path, m, ema, stats, stage, data_cfg):
    """The weights and EMA, with the model config, the normalisation statistics and the data layout
    (data.DataConfig: K_p, the event and chunk window sizes) that inference must rebuild windows with.
    Written beside `path` and renamed: a kill leaves the old file or the new one, never a part."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.items()}
    meta = {"format": CKPT_FORMAT, "config": json.dumps(asdict(m.cfg)), "stage": str(stage),
            "stats": json.dumps({k: {s: v.tolist() for s, v in d.items()} for k, d in stats.items()})}
    if data_cfg is not None:                           # None: no layout (inference then assumes data.DataConfig())
        meta["data"] = json.dumps(asdict(data_cfg))
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_weights(path, cfg=None):
    """-> (model state, ema state, stats, stage, model config, data layout or None for a checkpoint
    written without one); refuses damaged files, naming them, and, when `cfg` is given, checkpoints
    made with another model config, naming the field."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (safetensors: {e})") from None
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: format expected {CKPT_FORMAT!r}, found {meta.get('format')!r}")
    model_cfg = M.config_from_dict(json.loads(meta["config"]))  # fields added since the checkpoint take their defaults
    found = json.loads(json.dumps(asdict(model_cfg)))
    if cfg is not None and found != (want := json.loads(json.dumps(asdict(cfg)))):
        diff = [f"{k}.{n}: checkpoint {found[k][n]!r}, this run {want[k][n]!r}" for k in want if isinstance(want[k], dict)
                for n in want[k] if found[k][n] != want[k][n]]
        raise CheckpointError(f"{path}: made with another model config ({'; '.join(diff[:3]) or 'fields differ'})")
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema_sd = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    stats = {k: {s: np.array(v) for s, v in d.items()} for k, d in json.loads(meta["stats"]).items()}
    data_cfg = data.config_from_dict(json.loads(meta["data"]), path, "data") if "data" in meta else None
    return model_sd, ema_sd, stats, meta["stage"], model_cfg, data_cfg


def save_checkpoint(run, m, ema, opt, stats, meta, data_cfg):
    """<run>/ckpt, replaced atomically: a kill at any moment leaves the previous checkpoint or this one."""
    tmp = tempfile.mkdtemp(dir=run, prefix=".ckpt-")
    write_weights(os.path.join(tmp, "model.safetensors"), m, ema, stats, meta["stage"], data_cfg)
    torch.save(opt.state_dict(), os.path.join(tmp, "optim.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    final, old = os.path.join(run, "ckpt"), os.path.join(run, "ckpt.old")
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)         # left by a kill between the rename and the removal below
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(run):                       # temporaries of saves that a kill interrupted
        if name.startswith(".ckpt-"):
            shutil.rmtree(os.path.join(run, name), ignore_errors=True)


def find_checkpoint(run):
    for name in ("ckpt", "ckpt.old"):                  # ckpt.old: killed between the two renames
        path = os.path.join(run, name)
        if os.path.exists(os.path.join(path, "meta.json")):
            return path
    raise CheckpointError(f"{run}: no checkpoint to resume from (expected {run}/ckpt/meta.json)")


def differing_stats(a, b):
    """The normalisation statistics ("state.mean", ...) that two sets, both holding them, give differently."""
    return [f"{k}.{n}" for k in a if k in b for n in a[k] if n in b[k] and not np.allclose(a[k][n], b[k][n])]


def load_state(m, ema, sd, ema_sd, path, layout=None, ds_cfg=None, stage=1, stats=None, ds_stats=None):
    """Weights and EMA into the model. After stage 1 the action tower has learned its targets, so
    `layout` (the checkpoint's data layout) must have the same as this run's data (ds_cfg). The
    towers learned states and actions normalised by the checkpoint's `stats`: this run's data must
    give the same (ds_stats), since its checkpoints carry its own."""
    other = differing_stats(stats or {}, ds_stats or {})
    if other:
        raise CheckpointError(f"{path}: trained on data with other normalisation statistics than this run's "
                              f"({', '.join(other[:3])}); train on the same data (--data.root)")
    if layout is not None and stage >= 2 and layout.action_offsets != ds_cfg.action_offsets:
        what = {True: "offsets (--data.action-offsets)", False: "per-step actions"}
        raise CheckpointError(f"{path}: its action tower learned {what[layout.action_offsets]}, "
                              f"this run's data gives {what[ds_cfg.action_offsets]}")
    missing = m.load_state_dict(sd, strict=False)
    if missing.missing_keys or missing.unexpected_keys or set(ema_sd) != set(ema):
        raise CheckpointError(f"{path}: tensors do not match the model (missing {missing.missing_keys[:3]}, "
                              f"unexpected {missing.unexpected_keys[:3]})")
    for k, v in ema_sd.items():
        ema[k].copy_(v)


# --- the loop ---
class NonFiniteLoss(RuntimeError):
    pass


class Stopped(Exception):
    pass


class ConfigError(ValueError):
    pass


def frozen_digest(m, trains):
    """A checksum of every frozen part, compared before and after a stage."""
    return {n: float(sum(p.double().abs().sum() + p.double().sum() for p in getattr(m, n).parameters()))
            for n in M.PARTS if n not in trains}


def lr_factor(step, total, oc):
    warm = min(1.0, (step + 1) / max(oc.warmup, 1))
    progress = min(step / max(total - 1, 1), 1.0)
    return warm * (oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(m, trains, oc, verbose):
    parts = torch.nn.ModuleDict({n: getattr(m, n) for n in trains})
    # by substring of the parameter's name; free tables (queries, view_angles, mod, ...) go to AdamW anyway,
    # as they are not Linear weights ("view" once sent the cross-view blocks' `xview` matrices there too)
    names = ("embed", "head", "norm", "_in", "_out", "chunk", "tau_")
    groups = muon.param_groups(parts, muon=dict(lr=oc.muon_lr, weight_decay=oc.weight_decay),
                               adamw=dict(lr=oc.lr, weight_decay=oc.weight_decay), adamw_names=names, verbose=verbose)
    adamw = next((g for g in groups if not g["use_muon"]), None)
    if adamw is not None:                              # nanoGPT's rule: no weight decay on vectors (biases, norm gains)
        vectors = [(n, p) for n, p in adamw["params"] if p.ndim < 2]
        adamw["params"] = [(n, p) for n, p in adamw["params"] if p.ndim >= 2]
        groups.append(dict(adamw, params=vectors, weight_decay=0.0))
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return muon.Muon(groups)


def stream_start(s, step, batch):
    """Where step `step` of stage s starts in the sampler's stream: one stream per stage, positions never reused."""
    return (s * 1_000_003 + step) * batch


def micro_batches(windows, cfg, s, step, mine):
    """The micro-batches `mine` of one step: micro-batch u takes stream positions start + u + j*n_micro
    (start = stream_start(s, step, batch)), so any number of processes sees the same windows."""
    n_micro, base = cfg.batch // cfg.micro, stream_start(s, step, cfg.batch)
    return [(u, windows.batch([base + u + j * n_micro for j in range(cfg.micro)], seed_of(cfg.seed, s), cfg.pack))
            for u in mine]


def tail_start(total):
    """The first step of a stage's last 10%, whose mean losses the results table reports."""
    return total - max(1, total // 10)


def run_stage(s, m, ema, windows, cfg, ctx, resume_meta=None, opt_state=None):
    """Train stage s; returns the mean of each loss term over the stage's last 10% of steps."""
    rank, world_size, run, stats, data_cfg = ctx["rank"], ctx["world"], cfg.run_dir, ctx["stats"], ctx["data"]
    st, total = STAGES[s], stage_steps(cfg, s)
    for n in M.PARTS:
        getattr(m, n).requires_grad_(n in st.trains)
    m.train()
    opt = make_optimizer(m, st.trains, cfg.optim, verbose=rank == 0 and opt_state is None)
    if opt_state is not None:
        shape = lambda groups: [(len(g["params"]), g["weight_decay"]) for g in groups]     # noqa: E731
        found, expected = shape(opt_state["param_groups"]), shape(opt.param_groups)
        if found != expected:                          # written by an older split (vectors shared the AdamW group)
            raise CheckpointError(f"{run}: the checkpoint's optim.pt has parameter groups (size, weight decay) {found}, "
                                  f"this code makes {expected} for stage {s}; resume with the commit that wrote it, "
                                  "or rerun the stage")
        opt.load_state_dict(opt_state)
    start = resume_meta["step"] if resume_meta else 0
    if s == 4 and start == 0:
        m.stair.init_from(m.vlm)                       # the branch starts as a copy of the VLM's upper layers
    before = frozen_digest(m, st.trains)
    n_micro = cfg.batch // cfg.micro                   # micro-batches per step over all processes (main checks they divide)
    mine = range(rank * n_micro // world_size, (rank + 1) * n_micro // world_size)
    params = [p for n in st.trains for p in getattr(m, n).parameters()]
    names = [f"{n}.{k}" for n in st.trains for k, _ in getattr(m, n).named_parameters()]
    ema_list = [ema[k] for k in names]

    # The windows load in this thread, between steps (about 7 ms against 0.2-0.7 s steps on 2 cores).
    # A background loader would be slower: once a second thread has run a parallel torch op, libgomp
    # sees more OpenMP threads than cores and stops spin-waiting, and the thousands of small ops of
    # a step each pay a futex wake-up; measured on 2 cores, that made a stage-1 step 2x slower.
    tail, log = [], open(os.path.join(run, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(range(start, total), desc=f"stage {s} {st.name}", disable=rank != 0, leave=False)
    for step in bar:
        t0 = time.perf_counter()
        batches = micro_batches(windows, cfg, s, step, mine)
        wait = time.perf_counter() - t0
        factor = lr_factor(step, total, cfg.optim)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        opt.zero_grad(set_to_none=True)
        terms = {}
        for u, b in batches:
            torch.manual_seed(seed_of(cfg.seed, s, step, u))               # noise and flow times of this micro-batch
            rng, gen = np.random.default_rng(seed_of(cfg.seed, s, step, u, 1)), torch.Generator().manual_seed(seed_of(cfg.seed, s, step, u, 2))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=m.device.type == "cuda"):
                out = stage_losses(m, s, b, cfg, windows, rng, gen)
            (sum(out.values()) / n_micro).backward()  # over every process's micro-batches: summed below, the step's mean
            for k, v in out.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / len(mine)
        terms = all_mean(terms, world_size)
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        if bad:
            last = os.path.join(run, "ckpt")
            raise NonFiniteLoss(f"stage {s} ({st.name}) step {step}: loss term {bad[0]!r} is {terms[bad[0]]}; "
                                f"stopped without updating; the last good checkpoint is {last}")
        if world_size > 1:                             # sum gradients: one flat all-reduce, plus which ones exist
            has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
            flat = torch.cat([has] + [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
            dist.all_reduce(flat)
            has, grads = flat[:len(params)], flat[len(params):].split([q.numel() for q in params])
            for p, g, h in zip(params, grads, has.tolist()):
                p.grad = g.view_as(p) if h else None   # untouched on every process: skipped, as with one process
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip))   # before clipping
        opt.step()
        decay = min(cfg.optim.ema, (1 + step) / (10 + step))               # METHOD.md section 5, EMA warm-up
        torch._foreach_lerp_(ema_list, [p.detach() for p in params], 1 - decay)
        dt = time.perf_counter() - t0
        if step >= tail_start(total):
            tail.append(terms)
        if rank == 0:
            rec = {"stage": s, "step": step, **{k: round(v, 6) for k, v in terms.items()}, "lr": factor,
                   "grad_norm": round(grad_norm, 6), "step_time": round(dt, 4), "data_wait": round(wait, 4), "samples_per_s": round(cfg.batch / dt, 2)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})
        stop = cfg.stop_after and step + 1 - start >= cfg.stop_after and step + 1 < total
        if ((step + 1) % cfg.save_every == 0 or stop) and step + 1 < total and rank == 0:
            # No RNG state to save: every micro-batch's generators are seeded from (seed, stage, step, micro-batch),
            # and its windows sit at stream_start(s, step, batch); "sampler" records where the next step reads.
            save_checkpoint(run, m, ema, opt, stats, {"stage": s, "step": step + 1, "sampler": stream_start(s, step + 1, cfg.batch),
                                                      "seed": cfg.seed}, data_cfg)
        if stop:
            if world_size > 1:
                dist.barrier()
            raise Stopped(f"stopped after {step + 1 - start} steps at stage {s} step {step + 1}; continue with --resume")
    if frozen_digest(m, st.trains) != before:
        raise RuntimeError(f"stage {s}: a frozen part changed during the stage")
    for k, p in zip(names, params):                    # the next stage (and evaluation) starts from the EMA weights
        p.data.copy_(ema[k])
    if rank == 0:
        log.close()
        write_weights(os.path.join(run, f"stage{s}.safetensors"), m, ema, stats, s, data_cfg)
        save_checkpoint(run, m, ema, opt, stats, {"stage": s, "step": total, "sampler": None, "seed": cfg.seed, "done": True},
                        data_cfg)
    if world_size > 1:
        dist.barrier()
    keys = tail[0].keys() if tail else []
    return {k: float(np.mean([t[k] for t in tail])) for k in keys}


# --- provenance and the results table ---
def git_commit():
    """The commit checked out where this file lives, or "unknown" (no git, not a clone)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def provenance(cfg):
    commit = git_commit()
    import safetensors as st_
    import tqdm as tq
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "tyro": tyro.__version__, "safetensors": st_.__version__, "tqdm": tq.__version__}
    return {"config": asdict(cfg), "argv": sys.argv, "commit": commit, "versions": versions,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {torch.get_num_threads()} threads"}


def logged_row(cfg, s):
    """Stage s's row rebuilt from log.jsonl, for a resumed run: the stages that finished before this process
    started, and the one it resumed. Wall time is then the sum of the logged step times (no start-up)."""
    recs = [r for r in map(json.loads, open(os.path.join(cfg.run_dir, "log.jsonl"))) if r["stage"] == s]
    if not recs:                                       # not run in this directory (a single stage from --init-from)
        return None
    total = stage_steps(cfg, s)
    tail = [r for r in recs if r["step"] >= tail_start(total)]
    keys = [k for k in recs[-1] if k not in ("stage", "step", "lr", "grad_norm", "step_time", "data_wait", "samples_per_s")]
    return total, sum(r["step_time"] for r in recs), {k: float(np.mean([r[k] for r in tail])) for k in keys}


def results_table(rows, logged=()):
    lines = ["| stage | trains | steps | wall time (s) | final losses (mean of the last 10% of steps) |",
             "|---|---|---|---|---|"]
    for s, (steps, secs, losses) in rows.items():
        terms = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
        mark = "*" if s in logged else ""
        lines.append(f"| {s} {STAGES[s].name} | {' + '.join(STAGES[s].trains)} | {steps} | {secs:.0f}{mark} | {terms} |")
    if logged:
        lines.append("\n\\* resumed: the sum of the stage's logged step times, across the interrupted and resumed processes")
    return "\n".join(lines)


# --- main ---
def sized_to_data(cfg, ds):
    """The model's state and action widths (S, A) from the data's normalisation statistics, so that
    a dataset whose S or A differs from the preset's (Meta-World: S = 7) sizes the model itself."""
    S, A = len(ds.stats["state"]["mean"]), len(ds.stats["action"]["mean"])
    a = cfg.model.action
    if (a.state_dim, a.action_dim) == (S, A):
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, action=dataclasses.replace(a, state_dim=S, action_dim=A)))


# Settings a resumed run may change: they decide when to save, stop and evaluate, and where it runs, not what
# it trains. Any other difference from the run's config.json would make the resumed run another run.
RESUMABLE = ("resume", "stop_after", "save_every", "device", "eval_episodes", "eval_horizon", "baseline", "run_dir",
             "data.workers")


def flatten(d, prefix=""):
    """{"model": {"video": {"width": 128}}} -> {"model.video.width": 128}"""
    out = {}
    for k, v in d.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def check_resume(cfg):
    """The run's config.json against this invocation's settings; returns the run's provenance record.
    Fields only one side has (added to the code since, or retired) are not compared."""
    path = os.path.join(cfg.run_dir, "config.json")          # there: main checked
    try:
        before = json.load(open(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); --resume checks the run's settings against it") from None
    was, now = flatten(before["config"]), flatten(json.loads(json.dumps(asdict(cfg))))
    bad = [f"{k}: the run has {was[k]!r}, this command {now.get(k)!r}" for k in was
           if not any(k == r or k.startswith(r + ".") for r in RESUMABLE) and k in now and was[k] != now[k]]
    if bad:
        raise ConfigError(f"--resume in {cfg.run_dir}: settings differ from its config.json ({'; '.join(bad[:3])}); "
                          f"resume with the run's own command plus --resume")
    return before


def main(cfg):
    rank, world_size = setup_distributed()
    if cfg.batch % (cfg.micro * world_size):
        raise ConfigError(f"--batch {cfg.batch} must be a multiple of --micro {cfg.micro} x processes {world_size}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    try:
        M.check_config(cfg.model)                      # before anything is written
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.resume and not os.path.exists(os.path.join(cfg.run_dir, "config.json")):
        raise CheckpointError(f"{cfg.run_dir}/config.json: missing; --resume continues a run that train.py started there")
    os.makedirs(cfg.run_dir, exist_ok=True)
    if world_size > 1:
        dist.barrier()
    ds = ensure_data(cfg.data, rank, world_size)
    cfg = sized_to_data(cfg, ds)
    planned = [cfg.stage] if cfg.stage else [1, 2, 3, 4, 5] + ([6] if cfg.baseline else [])
    stages, resume, opt_state = planned, None, None
    if cfg.resume:
        record = check_resume(cfg)                     # every process: all refuse together
        path = find_checkpoint(cfg.run_dir)
        resume = json.load(open(os.path.join(path, "meta.json")))
        stages = [s for s in stages if s >= resume["stage"]]
        if resume.get("done"):
            stages = [s for s in stages if s > resume["stage"]]
    if rank == 0:
        now = provenance(cfg)
        if resume:                                     # the run's own record stays; this invocation's is added
            now = dict(record, resumed=record.get("resumed", []) + [{k: v for k, v in now.items() if k != "config"}])
        tmp = os.path.join(cfg.run_dir, f".config.json.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(now, f, indent=1)
        os.replace(tmp, os.path.join(cfg.run_dir, "config.json"))   # atomic: other processes may be reading it
        if resume:                                     # drop log records of steps that will run again
            path_log = os.path.join(cfg.run_dir, "log.jsonl")
            keep = [r for r in map(json.loads, open(path_log)) if (r["stage"], r["step"]) < (resume["stage"], resume["step"])]
            with open(path_log, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
    ctx = {"rank": rank, "world": world_size, "stats": ds.stats, "data": ds.cfg}
    torch.manual_seed(cfg.seed)                        # the same initial weights on every process
    m = M.WallWM(cfg.model).to(device)
    ema = {k: v.detach().clone() for k, v in m.named_parameters()}
    if 1 < cfg.stage < 6 and not resume:              # one stage, from the weights an earlier run ended stage N-1 with
        src = os.path.join(cfg.init_from, f"stage{cfg.stage - 1}.safetensors")
        sd, ema_sd, stats, trained, _, layout = read_weights(src, cfg.model)
        load_state(m, ema, sd, ema_sd, src, layout, ds.cfg, int(trained), stats, ds.stats)
    if resume:                                         # path: the checkpoint found above
        sd, ema_sd, stats, trained, _, layout = read_weights(os.path.join(path, "model.safetensors"), cfg.model)
        load_state(m, ema, sd, ema_sd, path, layout, ds.cfg, int(trained), stats, ds.stats)
        if not resume.get("done"):
            opt_state = torch.load(os.path.join(path, "optim.pt"), weights_only=True, map_location=device)
    rows, windows = {}, {}
    for s in stages:
        if s == 6:                                     # U-Scratch: the same architecture from scratch
            torch.manual_seed(cfg.seed)
            if not (resume and resume["stage"] == 6):
                m = M.WallWM(cfg.model).to(device)
                ema = {k: v.detach().clone() for k, v in m.named_parameters()}
        kind = STAGES[s].windows
        if kind not in windows:
            windows[kind] = Windows(ds, kind, cfg.data.balanced, cfg.seed)
        t0 = time.perf_counter()
        here = resume if resume and resume["stage"] == s and not resume.get("done") else None
        losses = run_stage(s, m, ema, windows[kind], cfg, ctx, here, opt_state if here else None)
        rows[s] = (stage_steps(cfg, s), time.perf_counter() - t0, losses)
        if rank == 0:
            tqdm.write(f"stage {s} ({STAGES[s].name}) done in {rows[s][1]:.0f} s: " +
                       ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    if rank == 0 and resume:                          # a resumed run's table covers every stage of its run directory
        earlier = {s: logged_row(cfg, s) for s in planned if s <= resume["stage"]}
        rows = {**{s: r for s, r in earlier.items() if r}, **{s: r for s, r in rows.items() if s not in earlier}}
    logged = [s for s in rows if resume and s <= resume["stage"]]
    if rank == 0 and rows:
        table = results_table(rows, logged)
        if cfg.eval_episodes and not cfg.stage and cfg.baseline:      # every mode needs stages 1-5 and the baseline
            import eval as evaluation
            t0 = time.perf_counter()
            if cfg.data.source == "metaworld":
                tasks = tuple(t for t in cfg.data.tasks.split(",") if t) or world.MW_TASKS
                res = evaluation.evaluate_metaworld(cfg.run_dir, tasks, cfg.eval_episodes, horizon=cfg.eval_horizon,
                                                    seed=cfg.seed, image_size=cfg.data.image_size)
                cells = evaluation.table(res, tasks, (evaluation.MW_SPLIT,)) + "\n\npaired against the baseline:\n\n" + \
                    evaluation.paired_table(res, tasks, label="task")
            else:
                res = evaluation.evaluate(cfg.run_dir, cfg.eval_episodes, horizon=cfg.eval_horizon, seed=cfg.seed,
                                          image_size=cfg.data.image_size)
                cells = (evaluation.table(res, world.FAMILIES, world.SPLITS) + "\n\npaired against the baseline:\n\n"
                         + evaluation.paired_table(res, world.FAMILIES) + "\n\nthe report's suites beside ours "
                         "(task progress; METHOD.md section 7):\n\n" + evaluation.claims_table(res))
            table += (f"\n\nclosed loop, {cfg.eval_episodes} episodes per cell, horizon {cfg.eval_horizon} "
                      f"({time.perf_counter() - t0:.0f} s):\n\n" + cells)
        print(table)
        with open(os.path.join(cfg.run_dir, "results.md"), "w") as f:
            f.write(table + "\n")
    if world_size > 1:
        dist.destroy_process_group()
    return rows


def cli(args=None):
    cfg = tyro.extras.overridable_config_cli({k: v for k, v in PRESETS.items()}, args=args)
    try:
        return main(cfg)
    except Stopped as e:
        print(e)
    except (NonFiniteLoss, CheckpointError, ConfigError, data.DataError, ImportError) as e:   # ImportError: the Meta-World extra
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) == 1 or sys.argv[1].startswith("-"):
        sys.argv.insert(1, "default")                  # no preset named: default
    cli()
