"""Measurements, one subcommand per area; every figure stands beside a baseline from the same run.

    python bench.py env --episodes 64            # tiny: a quick look
    python bench.py env                          # the README's env table
    python bench.py data --episodes 150          # the README's lag and segmenter robustness figures
    (muon, train and infer subcommands come with their issues)

Machines here are shared and noisy: compare ratios within one run, not numbers across runs.
"""

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
    rows = []
    for name, cfg in (("default", world.ExpertConfig()), ("action_noise 0.06", world.ExpertConfig(action_noise=0.06)),
                      ("action_noise 0.10", world.ExpertConfig(action_noise=0.10)), ("speed 0.25-1.0", world.ExpertConfig(speed=(0.25, 1.0)))):
        ee = world.run_expert(tasks, world.WorldConfig(image_size=size), cfg, render=False)
        r = D.segment_eval((None, e.state, e.action, [c["start"] for c in e.meta["captions"]["L1"]], False) for e in ee)["all"]
        rows.append([name, episodes, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}"])
    table(["expert", "episodes", "precision", "recall", "F1 (+-2 steps)"], rows)
    print(f"wall {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict({"env": env, "data": data})
