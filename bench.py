"""Measurements, one subcommand per area; every figure stands beside a baseline from the same run.

    python bench.py env --episodes 64            # tiny: a quick look
    OMP_NUM_THREADS=1 python bench.py env --episodes 128   # the README's env table
    python bench.py data --episodes 150          # the README's lag and segmenter robustness figures
    python bench.py muon --sets 64x16 128x16 --threads 1   # tiny: the small sets, one thread
    python bench.py muon --tables gram compile --threads 1  # Gram iteration and compiled update only
    python bench.py muon                         # the README's optimizer table (10-15 minutes on 2 cores)
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python bench.py muon   # the float32 path on a CPU that has bf16
    python bench.py train --steps 6              # tiny: a quick look
    python bench.py train                        # the README's training-step table
    python bench.py train --width 96             # the same with the towers at the width they had before
    python bench.py threads                      # a step with and without an idle thread that ran a torch op
    python bench.py infer                        # the README's inference latencies
    python bench.py infer --compile              # and with the action tower torch.compile'd

Machines here are shared and noisy: compare ratios within one run, not numbers across runs.
"""

import collections
import os
import platform
import time

import numpy as np
import torch
import tyro


def machine_header():
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return (f"machine: {model} ({os.cpu_count()} cpus; {' '.join(isa) or 'no avx2'}) | "
            f"torch threads: {torch.get_num_threads()} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} | "
            f"torch {torch.__version__} | numpy {np.__version__}")


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


# --- env: the embedded world's expert loop, one world against batches ---
def env(episodes: int = 256, batches: tuple[int, ...] = (1, 8, 32, 64), size: int = 64, seed: int = 0):
    """Steps/s of the expert loop (plan, step, render two views) for one world and for batches."""
    import env as world
    print(machine_header())
    tasks = [world.make_task(world.FAMILIES[s % 5], "seen", seed + s) for s in range(episodes)]
    cfg = world.WorldConfig(image_size=size)
    world.run_expert(tasks[:8], cfg, batch=8)                 # warm caches

    def run(batch, render=True):
        t0 = time.perf_counter()
        eps = world.run_expert(tasks, cfg, batch=batch, render=render)
        dt = time.perf_counter() - t0
        return sum(len(e.action) for e in eps), dt

    rows, base = [], None
    for b in batches:
        steps, dt = run(b)
        base = base or steps / dt
        rows.append([b, f"{size}x{size} x2", len(tasks), steps, f"{dt:.2f}", f"{steps / dt:.0f}",
                     f"{steps / dt / base:.2f}x", f"{len(tasks) / dt:.1f}"])
    steps, dt = run(max(batches), render=False)
    rows.append([max(batches), "no render", len(tasks), steps, f"{dt:.2f}", f"{steps / dt:.0f}",
                 f"{steps / dt / base:.2f}x", f"{len(tasks) / dt:.1f}"])
    table(["batch", "views", "episodes", "steps", "wall s", "steps/s", "vs batch 1", "episodes/s"], rows)


# --- data: how reliable are the lag estimate and the segmenter on expert data ---
def data(episodes: int = 150, seed: int = 7000, size: int = 32, lags: tuple[int, ...] = (-4, -3, -2, -1, 1, 2, 3, 4)):
    """Lag: false lags on clean episodes (baseline: lag 0 is the truth) and the share of injected
    lags found exactly. Segmenter: boundary F1 against the L1 starts as the expert gets noisier."""
    import data as D
    import env as world
    print(machine_header())
    tasks = [world.make_task(world.FAMILIES[i % 5], world.SPLITS[i % 4], seed + i, recovery_alpha=0.1)
             for i in range(episodes)]
    t0 = time.perf_counter()
    eps = world.run_expert(tasks, world.WorldConfig(image_size=size))
    lag_of = lambda fr, st: D.estimate_lag(D.visual_motion(fr), D.action_motion(st), D.DataConfig().max_lag)
    clean = np.array([lag_of(e.frames, e.state) for e in eps])

    def shifted(fr, k):                      # the video k frames behind (k > 0) or ahead of the actions
        return np.concatenate([np.repeat(fr[:1], k, 0), fr[:-k]]) if k > 0 else np.concatenate([fr[-k:], np.repeat(fr[-1:], -k, 0)])
    found = {k: np.mean([lag_of(shifted(e.frames, k), e.state) == k for e in eps]) for k in lags}
    rows = [["clean (truth 0)", episodes, f"{np.mean(clean != 0):.3f} nonzero", f"{np.mean(np.abs(clean) > 2):.3f} quarantined"]]
    rows += [[f"injected {k:+d}", episodes, f"{found[k]:.3f} exact", ""] for k in lags]
    table(["lag", "episodes", "estimate", "note"], rows)
    # what cleaning decides (D.check_episode), also for lags past the search window, and the clean episodes'
    # best correlation over the window where both motion signals vary (the floor is DataConfig.min_lag_corr)
    cfg = D.DataConfig()
    def record(e, k=0):
        t = D.episode_tensors(e)
        return t if k == 0 else dict(t, frames=shifted(t["frames"], k), cam_pose=shifted(t["cam_pose"], k))
    best = []
    for e in eps:
        vis, act = D.visual_motion(e.frames), D.action_motion(e.state)
        if vis.std() > 0 and act.std() > 0:
            best.append(max(D.lag_correlations(vis, act, min(cfg.max_lag, (len(e.action) - 1) // 2)).values()))
    print(f"clean episodes' best lag correlation ({len(best)} of {episodes} with both signals varying): "
          f"min {min(best):.3f}, 1st percentile {np.percentile(best, 1):.3f}, median {np.median(best):.3f}")
    rows = [[name, episodes, f"{np.mean([bool(D.check_episode(record(e, k), cfg, e.meta)[0]) for e in eps]):.3f}"]
            for name, k in (("clean", 0), ("injected +5", 5), ("injected +8", 8), ("injected -8", -8), ("injected +12", 12))]
    table(["video against actions", "episodes", f"quarantined (window -{cfg.max_lag}..{cfg.max_lag})"], rows)
    rows = []
    for name, cfg in (("default", world.ExpertConfig()), ("action_noise 0.06", world.ExpertConfig(action_noise=0.06)),
                      ("action_noise 0.10", world.ExpertConfig(action_noise=0.10)), ("speed 0.25-1.0", world.ExpertConfig(speed=(0.25, 1.0)))):
        ee = world.run_expert(tasks, world.WorldConfig(image_size=size), cfg, render=False)
        r = D.segment_eval((None, e.state, e.action, [c["start"] for c in e.meta["captions"]["L1"]], False) for e in ee)["all"]
        rows.append([name, episodes, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}"])
    table(["expert", "episodes", "precision", "recall", "F1 (+-2 steps)"], rows)
    print(f"wall {time.perf_counter() - t0:.1f} s")



# --- muon: one optimizer step, muon.Muon beside torch.optim.Muon and AdamW on the same matrices ---
def hidden_set(d, layers):
    """Six matrices per layer, layer after layer (so the first len // layers are one layer): q, k, v, o
    (d x d), MLP up (4d x d) and down (d x 4d)."""
    return ([(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]) * layers


def muon_matrix_shapes(module):
    """The 2-D matrices that muon.param_groups(module) sends to Muon (conv weights flattened)."""
    import muon as M
    shapes = []
    for g in M.param_groups(module, verbose=False):
        if g["use_muon"]:
            for _, p in g["params"]:
                shapes += [tuple(m.shape) for m in M.matrices(p, M._kind(p, g), None)]
    return shapes


def matrix_sets(names):
    """Sets by name: "DxL" is L layers of width D, "default" the Muon share of
    model.PRESETS["default"] (one layer). Yields (name, shapes, layers); skips the model if it cannot be built."""
    for name in names:
        if name != "default":
            d, layers = (int(v) for v in name.split("x"))
            yield name, hidden_set(d, layers), layers
            continue
        try:
            import model
            yield name, muon_matrix_shapes(model.WallWM(model.PRESETS["default"])), 1
        except (ImportError, AttributeError) as e:
            print(f"skipping the default model: {e}")


def time_interleaved(calls, repeats, budget_s, sync=lambda: None):
    """Median seconds per call for each callable, called round by round (the first round untimed:
    warm-up, compilation), as many rounds as fit in budget_s, at least one; repeats=0: the first
    round only. -> (medians, seconds of each first call)."""
    times = {name: [] for name in calls}
    for r in range(repeats + 1):
        t_round = time.perf_counter()
        for name, call in calls.items():
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - t0)
        if r >= 1 and (time.perf_counter() - t_round) * (r + 1) > budget_s:
            break
    return {name: float(np.median(ts[1:] or ts)) for name, ts in times.items()}, {name: ts[0] for name, ts in times.items()}


def time_optimizers(makers, shapes, threads, repeats, budget_s, seed=0, device="cpu"):
    """time_interleaved over one step of each optimizer, all on the same parameters and gradients."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    start = [(torch.randn(s, generator=gen) * 0.02).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    opts = {}
    for name, make in makers.items():
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        for p, g in zip(ps, grads):
            p.grad = g
        opts[name] = make(ps)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return time_interleaved({name: opt.step for name, opt in opts.items()}, repeats, budget_s, sync)


def muon(sets: tuple[str, ...] = ("64x16", "128x16", "256x4", "512x6", "default"), threads: tuple[int, ...] = (1, 2),
         repeats: int = 7, budget_s: float = 30.0, max_step_s: float = 20.0, bf16: bool = True,
         tables: tuple[str, ...] = ("step", "gram", "compile"), gram_repeats: int = 31,
         compile_sets: tuple[str, ...] = ("64x16", "128x16", "256x4"),
         cuda_sets: tuple[str, ...] = ("768x12",)):
    """Tables (pick with --tables):
    step:    step time of muon.Muon (compute dtype chosen for this machine; and forced to bf16, the
             arithmetic of torch.optim.Muon) against torch.optim.Muon and AdamW on the same hidden
             matrices. A set whose torch.optim.Muon step would exceed max_step_s is timed on one
             layer and multiplied by its layers (marked *): both are sums over matrices.
    gram:    Newton-Schulz alone (float32) on the buckets that the float32 path gives the Gram
             iteration (k >= 2m), all of a set's per call: plain, Gram in four batched products
             (stack=False), Gram in three; up to gram_repeats rounds within budget_s.
    compile: muon.Muon step, eager against compile=True (each bucket's whole update compiled), on
             compile_sets; the first compiled step (not in the median) includes compilation.
    plan:    the plan's two CPU choices, per bucket, in this machine's compute dtype: Newton-Schulz
             alone batched against one matrix at a time, plain and Gram (wide buckets), and each
             form's relative error against float64 (the batching and Gram thresholds of muon.py).
    Sets "DxL" are L layers of width D; "default" is the Muon share of model.PRESETS["default"].
    With CUDA, cuda_sets are timed on the GPU too (bf16; eager and torch.compile'd buckets)."""
    import muon as M
    print(machine_header())
    print(f"muon.Muon compute dtype here: {M.default_compute_dtype(torch.device('cpu'))} "
          f"(bf16 instructions: {M.cpu_has_bf16()}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')})")
    makers = {"ours": lambda ps: M.Muon(ps, lr=0.02),
              "torch": lambda ps: torch.optim.Muon(ps, lr=0.02),
              "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3)}
    if bf16:
        makers["ours_bf16"] = lambda ps: M.Muon(ps, lr=0.02, compute_dtype=torch.bfloat16)
    t_all = time.perf_counter()
    done = lambda what: print(f"  {what}: done ({time.perf_counter() - t_all:.0f} s)", flush=True)
    if "step" in tables:
        rows = []
        for name, shapes, layers in matrix_sets(sets):
            values = sum(a * b for a, b in shapes)
            for th in threads:
                probe = time_optimizers({"torch": makers["torch"]}, shapes[:len(shapes) // layers], th, 0, 0)[0]["torch"]
                scaled = layers > 1 and probe * layers > max_step_s
                t, _ = time_optimizers(makers, shapes[:len(shapes) // layers] if scaled else shapes, th, repeats, budget_s)
                t = {k: v * (layers if scaled else 1) for k, v in t.items()}
                star = "*" if scaled else ""
                ms = lambda v: f"{v * 1e3:.1f}{star}"
                row = [name, len(shapes), f"{values / 1e6:.2f}M", th, ms(t["ours"]), ms(t["torch"]), ms(t["adamw"]),
                       f"{t['torch'] / t['ours']:.2f}x", f"{t['ours'] / t['adamw']:.2f}x"]
                if bf16:
                    row += [ms(t["ours_bf16"]), f"{t['torch'] / t['ours_bf16']:.2f}x"]
                rows.append(row)
                done(f"step {name} threads={th}")
        header = ["set", "matrices", "values", "threads", "muon.Muon ms", "torch.optim.Muon ms", "AdamW ms",
                  "speed-up vs torch", "vs AdamW"]
        if bf16:
            header += ["muon.Muon bf16 ms", "bf16 speed-up vs torch"]
        table(header, rows)
        print("* one layer timed, times the number of layers. Medians of interleaved steps")
    if "gram" in tables:
        rows, coeffs = [], [M.JORDAN] * 5
        for name, shapes, _ in matrix_sets(sets):
            count = collections.Counter((min(s), max(s)) for s in shapes)          # buckets: shape after transposing
            wide = [(n, m, k) for (m, k), n in sorted(count.items()) if k >= 2 * m]
            xs = [torch.randn(b, generator=torch.Generator().manual_seed(0)) for b in wide]
            calls = {"plain": lambda: [M.newton_schulz(X, coeffs) for X in xs],
                     "gram4": lambda: [M.gram_newton_schulz(X, coeffs, stack=False) for X in xs],
                     "gram3": lambda: [M.gram_newton_schulz(X, coeffs) for X in xs]}
            for th in threads:
                torch.set_num_threads(th)
                t, _ = time_interleaved(calls, gram_repeats, budget_s)
                rows.append([name, " ".join(f"{n}x{m}x{k}" for n, m, k in wide) if len(wide) < 3 else f"{len(wide)} buckets",
                             th, f"{t['plain'] * 1e3:.2f}", f"{t['gram4'] * 1e3:.2f}", f"{t['gram3'] * 1e3:.2f}",
                             f"{t['plain'] / t['gram3']:.2f}x", f"{t['gram4'] / t['gram3']:.2f}x"])
                done(f"gram {name} threads={th}")
        table(["set", "Gram buckets (n x m x k)", "threads", "plain ms", "Gram 4 products ms", "Gram 3 products ms",
               "plain / Gram 3", "Gram 4 / Gram 3"], rows)
        print("Newton-Schulz alone, float32, 5 iterations (Jordan's coefficients), every Gram bucket of the set "
              "once per call; medians of interleaved calls")
    if "plan" in tables:
        rows, coeffs = [], [M.JORDAN] * 5
        dtype = M.default_compute_dtype(torch.device("cpu"))
        for name, shapes, _ in matrix_sets(sets):
            count = collections.Counter((min(s), max(s)) for s in shapes)
            for (m, k), n in sorted(count.items()):
                X = torch.randn(n, m, k, generator=torch.Generator().manual_seed(0))
                xs = X.to(dtype)
                forms = {"plain": M.newton_schulz} | ({"gram": M.gram_newton_schulz} if k > m else {})
                ref = M.newton_schulz(X.double(), coeffs)
                err = {f: float(((fn(xs, coeffs).double() - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max())
                       for f, fn in forms.items()}
                calls = {}
                for f, fn in forms.items():
                    calls[f + " batched"] = lambda fn=fn: fn(xs, coeffs)
                    calls[f + " looped"] = lambda fn=fn: [fn(xs[i:i + 1], coeffs) for i in range(n)]
                for th in threads:
                    torch.set_num_threads(th)
                    t, _ = time_interleaved(calls, gram_repeats, budget_s)
                    ms = lambda key: f"{t[key] * 1e3:.1f}" if key in t else "-"
                    rows.append([name, f"{n}x{m}x{k}", th, ms("plain looped"), ms("plain batched"), ms("gram looped"),
                                 ms("gram batched"), f"{err['plain']:.4f}", f"{err['gram']:.4f}" if "gram" in err else "-"])
                    done(f"plan {name} {n}x{m}x{k} threads={th}")
        table(["set", "bucket (n x m x k)", "threads", "plain looped ms", "plain batched ms", "Gram looped ms",
               "Gram batched ms", "plain error", "Gram error"], rows)
        print(f"Newton-Schulz alone in {str(dtype)[6:]} (this machine's compute dtype), 5 iterations; medians of "
              "interleaved calls; error: worst matrix's relative distance to the float64 plain result")
    if "compile" in tables:
        rows = []
        for name, shapes, _ in matrix_sets(compile_sets):
            for th in threads:
                t, first = time_optimizers({"eager": makers["ours"], "compiled": lambda ps: M.Muon(ps, lr=0.02, compile=True)},
                                           shapes, th, repeats, budget_s)
                rows.append([name, len(shapes), th, f"{t['eager'] * 1e3:.1f}", f"{t['compiled'] * 1e3:.1f}",
                             f"{t['eager'] / t['compiled']:.2f}x", f"{first['compiled']:.1f}"])
                done(f"compile {name} threads={th}")
        table(["set", "matrices", "threads", "eager ms", "compiled ms", "eager / compiled", "first compiled step s"], rows)
        print("muon.Muon, compute dtype chosen for this machine; medians of interleaved steps after one untimed step")
    print(f"wall {time.perf_counter() - t_all:.0f} s")
    if torch.cuda.is_available() and cuda_sets:
        print(f"cuda: {torch.cuda.get_device_name()}")
        gpu = {"ours": makers["ours"], "ours_compiled": lambda ps: M.Muon(ps, lr=0.02, compile=True),
               "torch": makers["torch"], "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)}
        rows = []
        for name in cuda_sets:
            d, layers = (int(v) for v in name.split("x"))
            t, _ = time_optimizers(gpu, hidden_set(d, layers), torch.get_num_threads(), repeats, budget_s, device="cuda")
            rows.append([name, 6 * layers, f"{t['ours'] * 1e3:.2f}", f"{t['ours_compiled'] * 1e3:.2f}",
                         f"{t['torch'] * 1e3:.2f}", f"{t['adamw'] * 1e3:.2f}", f"{t['torch'] / t['ours']:.2f}x",
                         f"{t['torch'] / t['ours_compiled']:.2f}x"])
        table(["set (cuda)", "matrices", "muon.Muon ms", "compiled ms", "torch.optim.Muon ms", "AdamW ms",
               "speed-up", "compiled speed-up"], rows)


# --- train: training steps of a preset, against the machine's own matrix-product peak ---
def matmul_peak(n=2048, dtype=torch.float32, repeats=5):
    """FLOP/s of an n x n matrix product in `dtype` at the current thread count (median of repeats)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / float(np.median(times))


# torch.utils.flop_counter has formulas for the CUDA attention kernels but none for the one scaled
# dot-product attention runs on a CPU, so until this mapping its FLOPs counted as zero. Model FLOPs,
# as in PaLM's MFU (Chowdhery et al. 2022, appendix B): the two products of the forward pass and the
# four of the backward, over the query-key pairs the mask allows; the kernel's recomputation of the
# scores in the backward pass, and the masked pairs it also computes, are not counted.
def attention_pairs(q, k, is_causal=False, mask=None):
    """Query-key pairs of one attention call that its mask (bool, or additive float) or causality allows."""
    b, h, sq, sk = *q.shape[:3], k.shape[-2]
    if mask is not None:
        allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
        return int(torch.broadcast_to(allowed, (b, h, sq, sk)).sum())
    if is_causal:                                        # top-left aligned, as torch's is_causal
        return b * h * int(torch.arange(1, sq + 1).clamp(max=sk).sum())
    return b * h * sq * sk


def cpu_attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None, out_val=None):
    return 2 * attention_pairs(query, key, is_causal, attn_mask) * (query.shape[-1] + value.shape[-1])


def cpu_attention_backward_flops(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *,
                                 attn_mask=None, scale=None, out_val=None):
    return 4 * attention_pairs(query, key, is_causal, attn_mask) * (query.shape[-1] + value.shape[-1])


cpu_attention_flops._get_raw = cpu_attention_backward_flops._get_raw = True   # FlopCounterMode passes tensors, not shapes
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
                   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops}


def train(preset: str = "default", steps: int = 12, root: str = "data/bench-train", episodes: int = 24,
          stages: tuple[int, ...] = (1, 2, 5, 6), width: int = 0):
    """One short real run of each tower stage through train.run_stage (windows built in the training
    thread, optimizer, EMA, logging): samples/s, achieved FLOP/s as a share of a 2048 x 2048 matrix product's FLOP/s in
    the training dtype at the same thread count, data-wait share, and the process's peak memory.
    FLOPs are counted from the ops' shapes by torch.utils.flop_counter (forward and backward) on the
    same windows as the timed steps, CPU attention by ATTENTION_FLOPS (the pairs its mask allows); the
    first two steps of each run are left out of the means. `width` > 0 sets both towers' width
    (`--width 96`: the default preset's towers before they went to 128)."""
    import dataclasses
    import json
    import resource
    import tempfile

    import data as D
    import model as M
    import train as T
    from torch.utils.flop_counter import FlopCounterMode
    print(machine_header())
    cfg = T.PRESETS[preset][1]
    if width:
        mc = cfg.model
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(mc, video=dataclasses.replace(mc.video, width=width),
                                                                 action=dataclasses.replace(mc.action, width=width)))
    if not os.path.exists(os.path.join(root, "dataset.json")):
        D.generate(root, episodes=episodes, seed=1, image_size=cfg.data.image_size, workers=2)
    ds = D.Dataset(root)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    # the peak is measured before every stage and after the last, and the highest is used: on a
    # shared machine one low reading would inflate every share (seen: 124 against 188-194 GFLOP/s)
    peaks = [matmul_peak(dtype=dtype)]
    measured = []
    for s in stages:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as run:   # its checkpoint is ~80 MB
            c = dataclasses.replace(cfg, run_dir=run, steps=(steps,) * 5, save_every=10 ** 9)
            torch.manual_seed(0)
            m = M.WallWM(c.model)
            ema = {k: v.detach().clone() for k, v in m.named_parameters()}
            windows = T.Windows(ds, T.STAGES[s].windows, True, 0)
            T.run_stage(s, m, ema, windows, c, {"rank": 0, "world": 1, "stats": ds.stats, "data": ds.cfg})
            recs = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))][2:]
            step_time = float(np.mean([r["step_time"] for r in recs]))
            wait = float(np.mean([r["data_wait"] for r in recs]))
            flops, attention, video_tokens, action_tokens = 0, 0, 0, 0   # counted on the very windows of the timed steps
            for r in recs:
                for _, b in T.micro_batches(windows, c, s, r["step"], range(c.batch // c.micro)):
                    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as fc:
                        out = T.stage_losses(m, s, b, c, windows, np.random.default_rng(0), torch.Generator().manual_seed(0))
                        sum(out.values()).backward()
                    flops += fc.get_total_flops() / len(recs)
                    attention += sum(n for op, n in fc.get_flop_counts()["Global"].items() if "attention" in str(op)) / len(recs)
                    video_tokens += int((b["frame_seg"] >= 0).sum()) * c.model.video.views * m.P / len(recs)
                    action_tokens += int((b["action_seg"] >= 0).sum()) / len(recs)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        measured.append((s, video_tokens, action_tokens, step_time, flops, attention, wait, rss))
        peaks.append(matmul_peak(dtype=dtype))
    peak = max(peaks)
    print(f"2048 x 2048 {str(dtype)[6:]} matrix product: {peak / 1e9:.1f} GFLOP/s (highest of {len(peaks)} readings, "
          f"lowest {min(peaks) / 1e9:.1f}); preset {preset}, tower width {cfg.model.video.width}, batch {cfg.batch}")
    rows = []
    for s, video_tokens, action_tokens, step_time, flops, attention, wait, rss in measured:
        rows.append([f"{s} {T.STAGES[s].name}", f"{video_tokens:.0f}", f"{action_tokens:.0f}", f"{step_time:.3f}",
                     f"{cfg.batch / step_time:.1f}", f"{flops / 1e9:.2f}", f"{attention / 1e9:.2f}", f"{flops / step_time / 1e9:.1f}",
                     f"{flops / step_time / peak:.0%}", f"{wait / step_time:.1%}", f"{rss:.0f}"])
    table(["stage", "video tokens / step", "action tokens / step", "step s", "samples/s", "GFLOP / step",
           "of which attention", "GFLOP/s", "share of matmul peak", "data wait share", "peak RSS MiB (process so far)"], rows)


# --- threads: why train.py loads windows in the training thread ---
def threads(preset: str = "default", root: str = "data/bench-train", repeats: int = 6, rounds: int = 3):
    """A stage-1 forward and backward of `preset`, timed while no other thread exists and while an
    idle thread exists that once ran a parallel torch op (a 500 x 500 product), as a background
    loader thread would. The two settings alternate within one run (`rounds` times each) in a child
    process apiece, because an OpenMP thread team, once made, lasts as long as its thread."""
    import subprocess
    import sys
    print(machine_header())
    rows, times = [], {"no other thread": [], "an idle thread that ran a torch op": []}
    for _ in range(rounds):
        for name, side in zip(times, ("0", "1")):
            out = subprocess.run([sys.executable, __file__, "threads-child", "--preset", preset, "--root", root,
                                  "--repeats", str(repeats), "--side", side], capture_output=True, text=True, check=True)
            times[name].append(float(out.stdout.strip().splitlines()[-1]))
    base = float(np.median(times["no other thread"]))
    for name, ts in times.items():
        rows.append([name, f"{np.median(ts):.3f}", " ".join(f"{t:.3f}" for t in ts), f"{np.median(ts) / base:.2f}x"])
    table(["setting", "median step s", "per child process", "time against no other thread"], rows)


def threads_child(preset: str = "default", root: str = "data/bench-train", repeats: int = 6, side: int = 0):
    import threading

    import data as D
    import model as M
    import train as T
    cfg = T.PRESETS[preset][1]
    if not os.path.exists(os.path.join(root, "dataset.json")):
        D.generate(root, episodes=24, seed=1, image_size=cfg.data.image_size, workers=1)
    ds = D.Dataset(root)
    torch.manual_seed(0)
    m = M.WallWM(cfg.model)
    for n in M.PARTS:
        getattr(m, n).requires_grad_(n in T.STAGES[1].trains)
    windows = T.Windows(ds, T.STAGES[1].windows, True, 0)
    b = windows.batch(list(range(cfg.batch)), 0, cfg.pack)
    if side:                                   # a thread that ran one parallel op, then waits (like a loader)
        ran, hold = threading.Event(), threading.Event()
        threading.Thread(target=lambda: (torch.randn(500, 500) @ torch.randn(500, 500), ran.set(), hold.wait()),
                         daemon=True).start()
        ran.wait()
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        out = T.stage_losses(m, 1, b, cfg, windows, np.random.default_rng(0), torch.Generator().manual_seed(0))
        sum(out.values()).backward()
        times.append(time.perf_counter() - t0)
    print(float(np.median(times[2:])))


# --- infer: event mode with and without the video-feature cache; unified mode; Staircase vs a serial chain ---
def infer(preset: str = "default", repeats: int = 15, length: int = 16, compile: bool = False):
    """Latency on one episode (batch 1) of `preset` with untrained weights (latency does not depend
    on them): an event of `length` actions with the cached video features against recomputing the
    video tower at every action denoising step; one unified-mode chunk with Staircase latents; the
    Staircase one-pass latents against a serial latent chain of the same depth. --compile adds a
    column with the action tower torch.compile'd (dynamic shapes), timed in the same rounds."""
    import copy
    import dataclasses

    import env as world
    import model as M
    from eval import observation
    from infer import Policy
    print(machine_header())
    torch.manual_seed(0)
    m = M.WallWM(M.PRESETS[preset]).eval()
    stats = {k: {"mean": np.zeros(4), "std": np.ones(4)} for k in ("state", "action")}
    policies = {"eager": Policy(m, stats, stage=5)}
    if compile:
        policies["compiled"] = Policy(copy.deepcopy(m), stats, stage=5)
        policies["compiled"].m.action.compile(dynamic=True)
    envs = world.TabletopEnv([world.make_task("pick_place", "seen", 1)], world.WorldConfig(image_size=64))
    obs, instr = observation(envs.observe(), 0), envs.tasks[0].instruction

    # Every call is timed round by round with the others (time_interleaved), so that the rows that
    # subtract the video part from a whole event compare calls made under the same load: timed one
    # after the other, they swung by tens of ms on a shared machine. The first round (untimed)
    # compiles the action tower with --compile.
    fl = m.cfg.flow

    def event_call(policy, cache, steps):          # steps=0: the video part alone
        cfg = dataclasses.replace(policy.m.cfg, flow=dataclasses.replace(fl, action_steps=steps))
        full = policy.m.cfg

        def call():
            policy.m.cfg = cfg
            policy.event_actions([obs], [instr], ["reach the red block"], [length], cache=cache)
            policy.m.cfg = full
        return call
    with torch.no_grad():
        cache, p0 = m.stair.prefill(m.vlm, torch.from_numpy(obs["frames"])[None], [instr])
    calls = {}
    for name, p in policies.items():
        calls |= {(name, "event", c): event_call(p, c, fl.action_steps) for c in (True, False)}
        # with the cache, the call without action steps still makes the one pass at s*; without, it does not
        calls |= {(name, "video", c): event_call(p, c, 0) for c in (True, False)}
    calls["chunk"] = lambda: policies["eager"].chunk_actions([[obs] * policies["eager"].keep], [instr], [0], "latents")
    calls["stair"] = torch.no_grad()(lambda: m.stair(m.vlm, cache, p0))
    calls["chain"] = torch.no_grad()(lambda: M.serial_chain(m.vlm, cache, p0, m.stair.start, m.cfg.vlm.num_latents))
    ms = {k: 1000 * v for k, v in time_interleaved(calls, repeats, budget_s=float("inf"))[0].items()}
    n = fl.action_steps
    rows = {}
    for name in policies:
        event = {c: ms[(name, "event", c)] for c in (True, False)}
        # the action loop: what the cache changes. Cached: the one video pass at s* and n action steps;
        # recomputed: n video passes at s* and n action steps. Both subtract the same video part
        # (the Euler steps down to s*, without the pass at s*).
        loop = {c: event[c] - ms[(name, "video", False)] for c in (True, False)}
        V = ms[(name, "video", True)] - ms[(name, "video", False)]
        A = (event[True] - ms[(name, "video", True)]) / max(n, 1)
        rows[name] = {"event": event, "loop": loop, "V": V, "A": A}
    L, Nr, C = m.cfg.vlm.depth, m.cfg.vlm.relay_depth, m.cfg.vlm.num_latents
    ideal = C * L / (Nr + C * (L - Nr))
    chunk, stair, chain = ms["chunk"], ms["stair"], ms["chain"]
    print(f"preset {preset}; {n} action denoising steps, {fl.video_steps}-step video schedule down to s* = {fl.anchor_sigma}")
    cols = list(rows.values())
    table(["what"] + [f"{name} ms" for name in rows], [
        [f"event of {length} actions, video features cached"] + [f"{r['event'][True]:.1f}" for r in cols],
        [f"event of {length} actions, video tower recomputed per action step"] + [f"{r['event'][False]:.1f}" for r in cols],
        ["cache ratio, whole event"] + [f"{r['event'][False] / r['event'][True]:.2f}x" for r in cols],
        ["actions per second, cached"] + [f"{1000 * length / r['event'][True]:.0f}" for r in cols],
        [f"action loop, cached: one video pass at s* + {n} action steps"] + [f"{r['loop'][True]:.1f}" for r in cols],
        [f"action loop, recomputed: {n} x (video pass + action step)"] + [f"{r['loop'][False]:.1f}" for r in cols],
        ["cache ratio, action loop"] + [f"{r['loop'][False] / r['loop'][True]:.2f}x" for r in cols],
        ["one video pass at s* (V)"] + [f"{r['V']:.2f}" for r in cols],
        ["one action step against the cache (A)"] + [f"{r['A']:.2f}" for r in cols],
        [f"{n} (V + A) / (V + {n} A) at these V and A"] + [f"{n * (r['V'] + r['A']) / (r['V'] + n * r['A']):.2f}x" for r in cols]])
    table(["what", "ms", "per second", "ratio"], [
        [f"unified chunk ({policies['eager'].cfg.chunk_frames * policies['eager'].cfg.k_p} actions), Staircase latents",
         f"{chunk:.1f}", f"{1000 / chunk:.1f} chunks/s", ""],
        [f"Staircase latents, one pass (K_c {C}, L {L}, N_r {Nr})", f"{stair:.2f}", "",
         f"{chain / stair:.2f}x faster = {chain / stair / ideal:.2f} of the ideal {ideal:.2f}x"],
        [f"serial latent chain ({C} x {L} layer passes)", f"{chain:.2f}", "", "1.00x"]])


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict({"env": env, "data": data, "muon": muon, "train": train, "threads": threads,
                                        "threads-child": threads_child, "infer": infer})
