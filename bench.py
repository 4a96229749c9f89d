"""Measurements, one subcommand per area; every figure stands beside a baseline from the same run.

    python bench.py env --episodes 64            # tiny: a quick look
    python bench.py env                          # the README's env table
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


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict({"env": env})
