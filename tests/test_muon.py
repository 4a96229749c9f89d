"""muon.py: Newton-Schulz against float64, parity with torch.optim.Muon and torch.optim.AdamW,
exact agreement of the float32 path with a hand-written reference, batched = looped, Gram =
plain, conv/split/batch pieces, state_dict both ways, bad input, parameter groups, a real
two-process gloo run (this file is also the torchrun worker: see _worker at the bottom), the
compiled whole-bucket update against eager (CPU; CUDA too where there is one), and the bf16 CUDA
step against the float32 path (skipped without a GPU).

    python -m pytest -q tests/test_muon.py
"""

import io
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import muon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = torch.float32


# --- a toy parameter set with every kind of matrix ---

SHAPES = {"wq": (32, 32), "up": (96, 32), "down": (32, 96), "small": (8, 8), "conv": (16, 4, 3, 3),
          "experts": (3, 24, 40), "qkv": (96, 32), "bias": (32,), "embed": (50, 32)}
MUON_NAMES = ("wq", "up", "down", "small", "conv", "experts")
ADAMW_NAMES = ("bias", "embed")


def toy(steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(s, generator=gen) * 0.1 for n, s in SHAPES.items()}
    grads = [{n: torch.randn(s, generator=gen) for n, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def make(params, **kw):
    named = {n: torch.nn.Parameter(t.clone()) for n, t in params.items()}
    groups = [dict(params=[(n, named[n]) for n in MUON_NAMES], lr=0.02),
              dict(params=[("qkv", named["qkv"])], split=[32, 32, 32], lr=0.01, adjust_lr_fn="match_rms_adamw"),
              dict(params=[(n, named[n]) for n in ADAMW_NAMES], use_muon=False, lr=3e-3)]
    return named, muon.Muon(groups, **kw)


def run(params, grads, drop=(), **kw):
    named, opt = make(params, **kw)
    for gs in grads:
        for n, p in named.items():
            p.grad = None if n in drop else gs[n].clone()
        opt.step()
    return named, opt


def flat(named):
    return torch.cat([p.detach().flatten() for p in named.values()])


# --- Newton-Schulz itself ---

def ns64(X, coeffs, scale):
    """The same polynomial in float64, one matrix at a time, written plainly."""
    out = []
    for M in X.double():
        M = M / (M.norm() * scale)
        for a, b, c in coeffs:
            A = M @ M.T
            M = a * M + (b * A + c * A @ A) @ M
        out.append(M)
    return torch.stack(out)


@pytest.mark.parametrize("coef", [muon.JORDAN, "polar_express"])
@pytest.mark.parametrize("fn", [muon.newton_schulz, muon.gram_newton_schulz])
def test_newton_schulz_float32_matches_float64_and_band(coef, fn):
    torch.manual_seed(0)
    coeffs, scale = muon.ns_schedule(coef, 5)
    for shape in [(4, 32, 96), (4, 48, 48), (2, 40, 200)]:
        X = torch.randn(shape)
        Y = fn(X, coeffs, scale=scale)
        ref = ns64(X, coeffs, scale)
        assert Y.dtype == F32
        assert float((Y.double() - ref).norm() / ref.norm()) <= 1e-4
        s = torch.linalg.svdvals(Y.double())
        lo, hi = (0.65, 1.25) if coef == muon.JORDAN else (0.85, 1.15)   # Jordan: about [0.68, 1.2]; Polar Express: [0.87, 1.13]
        assert lo <= float(s.min()) and float(s.max()) <= hi


def test_polar_express_schedule():
    coeffs, scale = muon.ns_schedule("polar_express", 10)
    assert scale == 1.01 and len(coeffs) == 10
    assert coeffs[0] == pytest.approx((8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3, 17.300387312530933 / 1.01**5))
    assert coeffs[7] == coeffs[9] == (1.875, -1.25, 0.375)


# --- one and several steps against torch.optim.Muon ---

def rel_update(ours, ref, start):
    return max(float((o - r).norm() / (r - s).norm()) for o, r, s in zip(ours, ref, start))


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (None, 5e-2)])
def test_parity_with_torch_muon(adjust, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=gen) * 0.1 for s in [(32, 32), (96, 32), (32, 96), (48, 80)]]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]
    for steps in (1, 3):
        results = []
        for make_opt in (lambda ps: muon.Muon(ps, lr=0.02, adjust_lr_fn=adjust, compute_dtype=dtype),
                         lambda ps: torch.optim.Muon(ps, lr=0.02, adjust_lr_fn=adjust)):
            ps = [torch.nn.Parameter(p.clone()) for p in start]
            opt = make_opt(ps)
            for gs in grads[:steps]:
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
                opt.step()
            results.append([p.detach() for p in ps])
        assert rel_update(*results, start) <= tol


# --- the float32 path equals a hand-written float32 reference exactly ---

def reference_steps(params, grads, groups_kw, lr_of, steps):
    """torch.optim.Muon's formulas for every 2-D piece, in float32, no fusion."""
    ps = {n: t.clone() for n, t in params.items()}
    bufs = {n: torch.zeros_like(t) for n, t in params.items()}
    for gs in grads[:steps]:
        for n in MUON_NAMES + ("qkv",):
            g, p, buf = gs[n], ps[n], bufs[n]
            lr, adjust, split = lr_of[n]
            buf.lerp_(g, 1 - 0.95)
            u = g.lerp(buf, 0.95)
            pieces = (lambda t: [t.reshape(t.shape[0], -1)] if t.ndim == 4 else list(t.unbind(0)) if t.ndim == 3 else [t])
            u_pieces, p_pieces = pieces(u), pieces(p)
            if split:
                u_pieces = [q for m in u_pieces for q in m.split(split)]
                p_pieces = [q for m in p_pieces for q in m.split(split)]
            p.mul_(1 - lr * 0.1)
            for U, P in zip(u_pieces, p_pieces):
                tall = U.shape[0] > U.shape[1]
                X = (U.T if tall else U).contiguous()
                X = X / X.norm().clamp(min=1e-7)
                for a, b, c in [muon.JORDAN] * 5:
                    A = X @ X.T
                    B = torch.addmm(A, A, A, beta=b, alpha=c)
                    X = torch.addmm(X, B, X, beta=a)
                rows, cols = U.shape
                ratio = math.sqrt(max(1, rows / cols)) if adjust is None else 0.2 * math.sqrt(max(rows, cols))
                P.add_(X.T if tall else X, alpha=-lr * ratio)
    return ps


@pytest.mark.parametrize("batch", [True, False])
def test_float32_path_equals_handwritten_reference_exactly(batch):
    params, grads = toy()
    named, _ = run(params, grads, compute_dtype=F32, gram=False, batch=batch)
    lr_of = {n: (0.02, None, None) for n in MUON_NAMES} | {"qkv": (0.01, "match_rms_adamw", 32)}
    ref = reference_steps(params, grads, None, lr_of, 3)
    for n in MUON_NAMES + ("qkv",):
        assert torch.equal(named[n].detach(), ref[n]), n


def test_batched_equals_looped_and_gram_equals_plain():
    params, grads = toy()
    looped, _ = run(params, grads, compute_dtype=F32, batch=False, gram=False)
    batched, _ = run(params, grads, compute_dtype=F32, batch=True, gram=False)
    assert torch.equal(flat(looped), flat(batched))
    gram, opt = run(params, grads, compute_dtype=F32, batch=True, gram=True)
    assert any(b.gram for plan in opt._plans.values() for b in plan)
    for n in MUON_NAMES + ("qkv",):
        d_gram, d_plain = gram[n].detach() - params[n], batched[n].detach() - params[n]
        assert float((d_gram - d_plain).norm() / d_plain.norm()) <= 1e-4, n


def test_bf16_gram_on_cpu_from_side_128_and_its_error_near_plain_bf16():
    """The auto plan takes Gram in bf16 on CPU for wide buckets with a short side of 128 or more,
    not below; there its rounding error against float64 stays near plain bf16 Newton-Schulz's."""
    shapes = [(128, 512), (512, 128), (64, 256), (128, 192)]
    ps = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape)
    opt = muon.Muon(ps, lr=0.02, compute_dtype=torch.bfloat16)
    opt.step()
    (plan,) = opt._plans.values()
    assert {b.shape: b.gram for b in plan} == {(128, 512): True, (64, 256): False, (128, 192): False}
    coeffs, scale = muon.ns_schedule(muon.JORDAN, 5)
    X = torch.randn(2, 128, 512, generator=torch.Generator().manual_seed(3))
    ref = ns64(X, coeffs, scale)
    err = lambda Y: float((Y.double() - ref).norm() / ref.norm())
    plain, gram = muon.newton_schulz(X.bfloat16(), coeffs), muon.gram_newton_schulz(X.bfloat16(), coeffs)
    assert gram.dtype == torch.bfloat16 and err(gram) <= 1.5 * err(plain) and err(gram) <= 2.5e-2
    s = torch.linalg.svdvals(gram.double())
    assert 0.65 <= float(s.min()) and float(s.max()) <= 1.25


def test_pieces_equal_separate_matrices():
    """conv flattened to (out, in*kh*kw), a 3-D tensor as a batch, split= as separate blocks."""
    gen = torch.Generator().manual_seed(2)
    conv, experts, qkv = torch.randn(16, 4, 3, 3, generator=gen), torch.randn(3, 24, 40, generator=gen), torch.randn(96, 32, generator=gen)
    gc, ge, gq = torch.randn(conv.shape, generator=gen), torch.randn(experts.shape, generator=gen), torch.randn(qkv.shape, generator=gen)

    def step(tensors, grads_, **kw):
        ps = [torch.nn.Parameter(t.clone()) for t in tensors]
        for p, g in zip(ps, grads_):
            p.grad = g.clone()
        muon.Muon(ps, lr=0.02, compute_dtype=F32, **kw).step()
        return [p.detach() for p in ps]

    (c,), (c2,) = step([conv], [gc]), step([conv.view(16, -1)], [gc.view(16, -1)])
    assert torch.equal(c.view(16, -1), c2)
    (e,), parts = step([experts], [ge]), step(list(experts.unbind(0)), list(ge.unbind(0)))
    assert torch.equal(e, torch.stack(parts))
    (q,), parts = step([qkv], [gq], split=32), step(list(qkv.split(32)), list(gq.split(32)))
    assert torch.equal(q, torch.cat(parts))
    (q2,) = step([qkv], [gq], split=[32, 64])
    assert not torch.equal(q2, q)                         # a different split is a different update


# --- optimizer contract ---

def test_state_at_construction_grads_untouched_none_skipped():
    params, grads = toy(steps=1)
    named, opt = make(params, compute_dtype=F32)
    for n in MUON_NAMES:
        assert torch.equal(opt.state[named[n]]["momentum_buffer"], torch.zeros(SHAPES[n]))
    for n, p in named.items():
        p.grad = None if n == "up" else grads[0][n].clone()
    opt.step()
    for n, p in named.items():
        if n == "up":
            assert torch.equal(p.detach(), params[n])                       # no gradient: no decay, no step
            assert not opt.state[p]["momentum_buffer"].any()
        else:
            assert torch.equal(p.grad, grads[0][n])                          # p.grad is never modified
            assert not torch.equal(p.detach(), params[n])


def test_adamw_groups_match_torch_adamw_exactly():
    params, grads = toy()
    named, _ = run(params, grads, compute_dtype=F32)
    ref = [torch.nn.Parameter(params[n].clone()) for n in ADAMW_NAMES]
    opt = torch.optim.AdamW(ref, lr=3e-3)
    for gs in grads:
        for p, n in zip(ref, ADAMW_NAMES):
            p.grad = gs[n].clone()
        opt.step()
    for p, n in zip(ref, ADAMW_NAMES):
        assert torch.equal(named[n].detach(), p.detach()), n


def test_lr_change_takes_effect_without_a_new_plan():
    params, grads = toy(steps=2)
    named, opt = make(params, compute_dtype=F32)
    for n, p in named.items():
        p.grad = grads[0][n].clone()
    opt.step()
    before = {n: p.detach().clone() for n, p in named.items()}
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    assert len(opt._plans) == 1
    for n in MUON_NAMES:
        assert torch.equal(named[n].detach(), before[n])


def test_state_dict_interchangeable_with_torch_muon():
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen) * 0.1 for s in [(32, 32), (64, 32)]]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]

    def steps(opt, ps, gs_list):
        for gs in gs_list:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()

    for first, second in ((torch.optim.Muon, muon.Muon), (muon.Muon, torch.optim.Muon)):
        ps = [torch.nn.Parameter(p.clone()) for p in start]
        a = first(ps, lr=0.02)
        steps(a, ps, grads[:2])
        ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        b = second(ps2, lr=0.02)
        f = io.BytesIO()
        torch.save(a.state_dict(), f)       # a copy: a loaded state_dict shares tensors with its source
        f.seek(0)
        b.load_state_dict(torch.load(f, weights_only=True))
        for p, p2 in zip(ps, ps2):
            assert torch.equal(a.state[p]["momentum_buffer"], b.state[p2]["momentum_buffer"])
        mid = [p.detach().clone() for p in ps]
        steps(a, ps, grads[2:])
        steps(b, ps2, grads[2:])
        ours, ref = ([p.detach() for p in q] for q in ((ps2, ps) if second is muon.Muon else (ps, ps2)))
        assert rel_update(ours, ref, mid) <= 5e-2           # float32 path here vs torch's bf16


def reloaded(named, opt):
    """A fresh optimizer on copies of the parameters, its state read back through a weights_only file."""
    f = io.BytesIO()
    torch.save(opt.state_dict(), f)
    f.seek(0)
    named2, opt2 = make({n: p.detach() for n, p in named.items()}, compute_dtype=F32)
    opt2.load_state_dict(torch.load(f, weights_only=True))
    return named2, opt2


def test_state_dict_round_trip_through_weights_only_file():
    params, grads = toy()
    named, opt = run(params, grads[:2], compute_dtype=F32)
    named2, opt2 = reloaded(named, opt)
    for nm, o in ((named, opt), (named2, opt2)):
        for n, p in nm.items():
            p.grad = grads[2][n].clone()
        o.step()
    assert torch.equal(flat(named), flat(named2))


def test_bad_input_names_the_parameter():
    w, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match=r"'blocks.0.bias' with shape \(8,\).*use_muon=False"):
        muon.Muon([("blocks.0.weight", w), ("blocks.0.bias", b)])
    with pytest.raises(ValueError, match="split"):
        muon.Muon([w], split=3)
    with pytest.raises(ValueError, match="split"):
        muon.Muon([w], split=[4, 2])
    with pytest.raises(ValueError, match="ns_coefficients"):
        muon.Muon([w], ns_coefficients="fast")
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        muon.Muon([w], adjust_lr_fn="sqrt")
    with pytest.raises(ValueError, match="lr"):
        muon.Muon([w], lr=-1.0)


def test_cpu_bf16_detection_respects_onednn_cap(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    muon.cpu_has_bf16.cache_clear()
    try:
        assert muon.cpu_has_bf16() is False
        assert muon.default_compute_dtype(torch.device("cpu")) == F32
    finally:
        monkeypatch.undo()
        muon.cpu_has_bf16.cache_clear()


def test_param_groups_split_a_model(capsys):
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.blocks = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
            self.conv = torch.nn.Conv1d(16, 16, 3, padding=1)
            self.norm = torch.nn.LayerNorm(16)
            self.head = torch.nn.Linear(16, 5)
            self.queries = torch.nn.Parameter(torch.randn(3, 4))
            self.action_in = torch.nn.Linear(4, 16)
            self.frozen = torch.nn.Linear(16, 16).requires_grad_(False)

        def forward(self, tok):
            h = self.blocks(self.embed(tok) + self.action_in(self.queries).mean(0))
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
            return self.head(self.norm(h)).square().mean()

    model = Toy()
    groups = muon.param_groups(model, muon=dict(lr=0.02), adamw=dict(lr=1e-3))
    names = {g["use_muon"]: [] for g in groups}
    for g in groups:
        names[g["use_muon"]] += [n for n, _ in g["params"]]
    assert sorted(names[True]) == ["blocks.0.weight", "blocks.2.weight", "conv.weight"]
    for n in ("head.weight", "embed.weight", "norm.weight", "queries", "action_in.weight", "conv.bias"):
        assert n in names[False], n
    assert not any(n.startswith("frozen") for ns in names.values() for n in ns)
    assert "Muon 3 tensors" in capsys.readouterr().out
    opt = muon.Muon(groups)
    assert [g.get("flatten") for g in opt.param_groups if g["use_muon"]] == [False, True]
    before = model.conv.weight.detach().clone()
    model(torch.randint(0, 50, (2, 7))).backward()
    opt.step()
    assert not torch.equal(before, model.conv.weight.detach())


# --- a real two-process run (gloo) ---

def two_ranks(out, *args, timeout=180):
    """This file as a two-process gloo worker under torchrun (see the bottom); each rank's results."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), str(out), *args]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("two-process run hung (timeout)")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [torch.load(out / f"rank{k}.pt", weights_only=True) for k in (0, 1)]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_gloo(tmp_path):
    r0, r1 = two_ranks(tmp_path)
    assert torch.equal(r0["shared"], r1["shared"])                 # bitwise identical across ranks
    assert torch.equal(r0["shared"], r0["local"])                  # and equal to one process
    assert r0["split_work"] and r1["split_work"]                   # both ranks orthogonalised something
    assert torch.equal(r0["none_shared"], r1["none_shared"])       # rank 1 lacked a gradient: no hang, no drift
    assert torch.equal(r0["none_shared"], r0["none_local"])
    assert torch.equal(r0["resumed"], r0["shared"])                # state_dict round trip mid-run
    assert torch.equal(r0["bf16"], r1["bf16"])                     # bf16 all-gather keeps ranks identical


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_compiled_equal_eager(tmp_path):
    """The compiled path under torchrun (the all-gather between its two compiled halves) equals the
    eager step, with no recompilation when the learning rate changes."""
    if cpp_compiler_missing():
        pytest.skip(cpp_compiler_missing())
    r0, r1 = two_ranks(tmp_path, "compiled", timeout=300)
    assert torch.equal(r0["compiled"], r1["compiled"])             # bitwise identical across ranks
    assert r0["halves"] == r1["halves"] == 2                        # split in two around the all-gather
    start = toy()[0]
    s = torch.cat([t.flatten() for t in start.values()])
    assert float((r0["compiled"] - r0["eager"]).norm() / (r0["eager"] - s).norm()) <= 1e-5


def _compiled_worker(out):
    """Three steps, the learning rate halved after the first; a recompilation there would raise."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    params, grads = toy()

    def steps(compile):
        named, opt = make(params, compute_dtype=F32, compile=compile)
        for i, gs in enumerate(grads):
            for g in opt.param_groups if i == 1 else ():
                g["lr"] *= 0.5
            for n, p in named.items():
                p.grad = gs[n].clone()
            with torch.compiler.set_stance("fail_on_recompile" if i > 0 else "default"):
                opt.step()
        return named, opt

    with torch._inductor.config.patch(compile_threads=1):
        named, opt = steps(True)
    res = {"compiled": flat(named), "eager": flat(steps(False)[0]),
           "halves": min(len(b.compiled) for plan in opt._plans.values() for b in plan)}
    torch.save(res, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


def _worker(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    solo = [dist.new_group([r]) for r in range(world)][rank]
    params, grads = toy()
    res = {}
    named, opt = run(params, grads, compute_dtype=F32)
    res["shared"] = flat(named)
    res["split_work"] = sum(len(b.mine) for plan in opt._plans.values() for b in plan) > 0
    res["local"] = flat(run(params, grads, compute_dtype=F32, process_group=solo)[0])
    res["none_shared"] = flat(run(params, grads, drop=("up",) if rank == 1 else (), compute_dtype=F32)[0])
    res["none_local"] = flat(run(params, grads, drop=("up",), compute_dtype=F32, process_group=solo)[0])
    named, opt = run(params, grads[:2], compute_dtype=F32)
    named2, opt2 = reloaded(named, opt)
    for n, p in named2.items():
        p.grad = grads[2][n].clone()
    opt2.step()
    res["resumed"] = flat(named2)
    res["bf16"] = flat(run(params, grads, compute_dtype=torch.bfloat16)[0])
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


# --- the compiled whole-bucket update (CPU here; CUDA where there is one) ---

def cpp_compiler_missing():
    """Why torch.compile cannot build CPU kernels here, or None: Inductor's CPU backend needs a C++ compiler."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
        return None
    except Exception as e:                 # Inductor raises its own error type when no compiler is found
        return f"torch.compile on CPU needs a C++ compiler (g++ or $CXX): {e}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_compiled_update_equals_eager_without_recompiles(device):
    """One bucket (32, 96): down, up transposed, and the three split blocks of qkv (a second group,
    views of one tensor); Gram iteration on the float32 path. The learning rate changes after the
    first step; a recompilation would raise (fail_on_recompile) and add a graph."""
    if device == "cpu" and cpp_compiler_missing():
        pytest.skip(cpp_compiler_missing())
    from torch._dynamo.utils import counters
    gen = torch.Generator().manual_seed(5)
    shapes = {"down": (32, 96), "up": (96, 32), "qkv": (96, 96), "bias": (32,)}
    start = {n: torch.randn(s, generator=gen) * 0.1 for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(3)]
    dtype = F32 if device == "cpu" else None        # CUDA: the machine's choice, bf16

    def steps(compile):
        named = {n: torch.nn.Parameter(t.to(device, copy=True)) for n, t in start.items()}
        opt = muon.Muon([dict(params=[named["down"], named["up"]], lr=0.02),
                         dict(params=[named["qkv"]], split=32, lr=0.01, adjust_lr_fn="match_rms_adamw"),
                         dict(params=[named["bias"]], use_muon=False)], compute_dtype=dtype, compile=compile)
        graphs = []
        for i, gs in enumerate(grads):
            if i == 1:
                for g in opt.param_groups:
                    g["lr"] *= 0.5
            for n, p in named.items():
                p.grad = gs[n].to(device)
            with torch.compiler.set_stance("fail_on_recompile" if i > 0 else "default"):
                opt.step()
            graphs.append(counters["stats"]["unique_graphs"])
        return {n: p.detach().cpu() for n, p in named.items()}, opt, graphs

    eager, _, _ = steps(False)
    before = counters["stats"]["unique_graphs"]
    with torch._inductor.config.patch(compile_threads=1):   # one small graph: a worker pool costs more than it saves
        compiled, opt, graphs = steps(True)
    (plan,) = opt._plans.values()
    assert [b.shape for b in plan] == [(32, 96)] and plan[0].gram == (device == "cpu")
    assert graphs == [before + 1] * 3                    # one graph, none added after the lr change
    tol = 1e-5 if device == "cpu" else 2e-2
    for n in ("down", "up", "qkv"):
        d_c, d_e = compiled[n] - start[n], eager[n] - start[n]
        assert float((d_c - d_e).norm() / d_e.norm()) <= tol, n
    assert torch.equal(compiled["bias"], eager["bias"])


# --- CUDA only ---

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_step_matches_float32_path_and_torch_muon():
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(s, generator=gen) * 0.1 for s in [(256, 256), (1024, 256), (256, 1024)]]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]

    def steps(make_opt, device):
        ps = [torch.nn.Parameter(p.to(device, copy=True)) for p in start]
        opt = make_opt(ps)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(device)
            opt.step()
        return opt, [p.detach().cpu() for p in ps]

    opt, cuda_bf16 = steps(lambda ps: muon.Muon(ps, lr=0.02), "cuda")
    assert all(b.x.dtype == torch.bfloat16 and b.x.is_cuda for plan in opt._plans.values() for b in plan)
    _, cpu_f32 = steps(lambda ps: muon.Muon(ps, lr=0.02, compute_dtype=F32), "cpu")
    _, reference = steps(lambda ps: torch.optim.Muon(ps, lr=0.02), "cuda")
    assert rel_update(cuda_bf16, cpu_f32, start) <= 2e-2      # bf16 rounding against the float32 path
    assert rel_update(cuda_bf16, reference, start) <= 2e-2


if __name__ == "__main__":
    (_compiled_worker if sys.argv[2:] == ["compiled"] else _worker)(sys.argv[1])
