"""muon.py: one optimizer for WALL-WM: Muon for the hidden matrices, AdamW for everything else.

Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/) steps each hidden matrix
along the nearest semi-orthogonal matrix to its momentum, found with a few Newton-Schulz
iterations. The report trains with a distributed Muon (METHOD.md section 5: owner ranks for whole
matrices, longest-processing-time assignment, broadcast of the results). This file is held against
`torch.optim.Muon` (torch >= 2.9): the same hyperparameters and defaults, the same formulas, the
same `momentum_buffer` state, so each optimizer loads the other's state_dict. What it adds:

  - a plan built once: matrices bucketed by shape (tall ones transposed to wide), dtype and device;
    Newton-Schulz on a bucket is one batched computation (baddbmm), the elementwise work before and
    after is foreach ops; on CPU with one thread, large matrices go one at a time (measured faster);
  - the compute dtype chosen per machine: bf16 on CUDA and on CPUs with bf16 instructions, float32
    elsewhere (torch.optim.Muon always computes in bf16, many times slower on CPUs without them);
    on CPU, wide matrices iterate on their Gram matrix (fewer long products);
  - under torchrun: each rank orthogonalises its share of every bucket, the results are
    all-gathered while the next bucket computes, and every rank applies the same updates;
  - opt-in (compile=True): each bucket's whole update as one torch.compile graph, with momentum,
    lr and weight decay passed as a tensor, so a new learning rate never recompiles.

    python muon.py                                          # self-check on a toy set: plan, parity with torch.optim.Muon
    torchrun --standalone --nproc_per_node=2 muon.py        # the same on two ranks: parameters agree bitwise
    python -m pytest -q tests/test_muon.py                  # parity, fusion, bad input, two-process gloo (CPU)
    python bench.py muon                                    # step time beside torch.optim.Muon and AdamW; Gram; compiled
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python bench.py muon     # the float32 path on a CPU that has bf16

In a training script:

    groups = muon.param_groups(model, muon=dict(lr=0.02), adamw=dict(lr=3e-4))   # prints the split
    opt = muon.Muon(groups)                                 # then opt.step() / opt.zero_grad() as usual
"""

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as adamw_functional

# --- Newton-Schulz: coefficients and the two iterations ---

# Keller Jordan's quintic p(x) = a x + b x^3 + c x^5, tuned for a large slope at zero; it does not
# converge to 1 but leaves singular values in roughly [0.7, 1.2], which does not hurt training
# (post above). torch.optim.Muon's default.
JORDAN = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932, Algorithm 1): a different
# degree-5 polynomial per iteration, each optimal in the sup norm for singular values in
# [1e-3, 1]. As in the paper, all but the last are divided by a safety factor 1.01
# (a/1.01, b/1.01^3, c/1.01^5), the input is normalised by 1.01 ||X||_F, and iterations past the
# eighth repeat the last polynomial.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]) + _POLAR_EXPRESS_RAW[-1:]


def ns_schedule(ns_coefficients, ns_steps):
    """-> (one (a, b, c) per iteration, factor on ||X||_F in the normalisation)."""
    if ns_coefficients == "polar_express":
        return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(ns_steps)], 1.01
    a, b, c = (float(v) for v in ns_coefficients)
    return [(a, b, c)] * ns_steps, 1.0


def _normalise(X, eps, scale):
    # ||X||_2 <= ||X||_F, so every singular value ends up in [0, 1] (torch.optim.Muon: X / max(||X||_F, eps))
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)       # (n, 1, 1)
    if scale != 1.0:
        norm = norm * scale
    return X / norm.clamp_min(eps)


def newton_schulz(X, coeffs, eps=1e-7, scale=1.0, out=None):
    """Orthogonalise every matrix of X (n, m, k), m <= k: X <- a X + (b A + c A A) X with A = X X^T,
    three products per iteration, the multiply-adds folded into baddbmm (torch.optim.Muon's formula,
    batched). The result goes to `out` when given (it may be X itself)."""
    X = _normalise(X, eps, scale)                                       # a new tensor, never `out`
    for i, (a, b, c) in enumerate(coeffs):
        A = torch.bmm(X, X.mT)                                           # (n, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)                      # b A + c A A
        last = out if i + 1 == len(coeffs) else None                     # the last product writes the result in place
        X = torch.baddbmm(X, B, X, beta=a, out=last)                     # a X + B X, (n, m, k)
    return X if out is None or X is out else out.copy_(X)


GRAM_RESTART = 2   # iteration at which the Gram iteration rebuilds R from X (Dao AI Lab's Gram Newton-Schulz restarts at 2)


def gram_newton_schulz(X, coeffs, eps=1e-7, scale=1.0, out=None, restart=GRAM_RESTART, stack=True):
    """The same polynomial for wide X (n, m, k), m < k, iterated on the m x m Gram matrix, at most
    three batched products per iteration (Dao, Zhang, Amsel, Chen 2026, "Gram Newton-Schulz",
    https://tridao.me/blog/2026/gram-newton-schulz/: iterate on X X^T, restart once).

    The algebra. Plain Newton-Schulz is X_{t+1} = P_t X_t with P_t = a I + b R_t + c R_t^2 and
    R_t = X_t X_t^T. So X_t = Q_t X_0 with Q_t = P_{t-1} ... P_0, and R_{t+1} = P_t R_t P_t (P_t is
    symmetric). Every P, Q, R is a polynomial in R_0, so they all commute. With Z = b R + c R^2,
    P = a I + Z and a product M P = a M + M Z is one baddbmm. Per iteration:
      Z = b R + c R R                       one product
      [Q; R] P = a [Q; R] + [Q; R] Z        one product: Q and R stacked on rows (2m x m)
      R' = P (R P) = a RP + Z RP            one product
    In flops that is four m x m products, the fewest for this recurrence: R' is a degree-5
    polynomial in R, which takes three multiplications, and Q one more. Only R_0 = X_0 X_0^T and
    the final Q X_0 touch the long side k. On the first iteration (and after the restart) Q = P
    needs no product, and R' is skipped where no further iteration reads it. In floating point R
    drifts from (Q X_0)(Q X_0)^T, so once, at iteration `restart`, X is rebuilt as Q X_0 and R
    recomputed from it (the blog's restart). stack=False multiplies Q and R by P separately (four
    batched products, the same flops; bench.py muon times both)."""
    X = _normalise(X, eps, scale)
    m = X.shape[-2]
    R = torch.bmm(X, X.mT)                                               # (n, m, m)
    Q = None
    for i, (a, b, c) in enumerate(coeffs):
        if i == restart and Q is not None:
            X, Q = torch.bmm(Q, X), None                                 # (n, m, k)
            R = torch.bmm(X, X.mT)
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)                      # b R + c R R
        need_r = i + 1 < len(coeffs) and i + 1 != restart                # a later iteration reads R'
        RP = None
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)                         # Q = P = a I + Z
        elif need_r and stack:
            QR = torch.cat([Q, R], dim=1)                                # (n, 2m, m)
            Q, RP = torch.baddbmm(QR, QR, Z, beta=a).split(m, dim=1)     # Q P and R P in one product
        else:
            Q = torch.baddbmm(Q, Q, Z, beta=a)                           # Q P
        if need_r:
            RP = torch.baddbmm(R, R, Z, beta=a) if RP is None else RP    # R P
            R = torch.baddbmm(RP, Z, RP, beta=a)                         # P R P = a R P + Z R P
    X = X if Q is None else torch.bmm(Q, X, out=out)                    # X is never `out` here (normalised above)
    return X if out is None or X is out else out.copy_(X)


# --- the compute dtype: bf16 where the hardware multiplies it natively, float32 elsewhere ---

@functools.lru_cache(maxsize=None)
def cpu_has_bf16():
    """True where this CPU has bf16 matrix instructions (AVX512-BF16 or AMX on x86, the BF16
    extension on Arm) and oneDNN is allowed to use them (ONEDNN_MAX_CPU_ISA may cap it below)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if isa not in ("ALL", "DEFAULT", "") and not any(s in isa for s in ("BF16", "FP16", "AMX", "AVX10")):
        return False
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                flags |= set(line.split(":", 1)[1].split())
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) or any(f() for f in probes if f is not None)


def default_compute_dtype(device):
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.bfloat16


# On CPU, one batched product per bucket wins for small matrices (less dispatch per matrix); with
# one thread it loses for larger ones. Measured on a 2-core AMD EPYC (AVX2, float32, whole step):
# one thread, batched vs one at a time: 43 vs 56 ms at d=64 x 16, 247 vs 229 at 128 x 16, 606 vs
# 506 at 256 x 4; two threads: batched 2.5-3.7x faster at every size (fewer, larger parallel regions).
# In bf16 the break-even is higher (an AVX512-BF16 EPYC, one thread, Newton-Schulz alone, `python
# bench.py muon --tables plan`): batched vs one at a time 21 vs 41 ms at 64x128x128, 42 vs 44 at
# 16x256x256, 494 vs 458 at 24x512x512 (README, muon section).
CPU_BATCH_MAX_SIDE = {torch.float32: 64, torch.bfloat16: 128}   # with one thread, batch a bucket only up to this short side
CPU_BF16_GRAM_MIN_SIDE = 128  # bf16 on CPU: Gram Newton-Schulz for wide buckets from this short side


# --- the matrices of a parameter: 2-D as is, conv flattened, 3-D a batch, optional row splits ---

def _kind(p, group):
    if p.ndim == 2:
        return "matrix"
    if p.ndim >= 4 or group.get("flatten"):
        return "flatten"                  # conv weight (out, in, kh, kw) -> (out, in*kh*kw)
    return "batch"                        # (n, rows, cols): n matrices


def matrices(t, kind, split, view=True):
    """The 2-D pieces that Muon orthogonalises separately; views of t when view=True."""
    if kind == "flatten":
        mats = [t.view(t.shape[0], -1) if view else t.reshape(t.shape[0], -1)]
    elif kind == "batch":
        mats = list(t.unbind(0))
    else:
        mats = [t]
    if split is not None:                 # row blocks: fused QKV (a list of sizes) or heads (an int)
        mats = [piece for m in mats for piece in m.split(split, dim=0)]
    return mats


def lr_ratio(adjust_lr_fn, rows, cols):
    """torch.optim.Muon's _adjust_lr for one matrix of shape (rows, cols)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))          # "match_rms_adamw" (Moonshot, arXiv 2502.16982)


# --- the plan: buckets of one wide shape, owner ranks by longest processing time ---

@dataclass
class Bucket:
    shape: tuple             # (m, k), m <= k: every matrix here, tall ones transposed
    coeffs: list             # (a, b, c) per iteration
    scale: float             # normalisation factor (1.01 for Polar Express)
    eps: float
    gram: bool               # Gram Newton-Schulz instead of the plain iteration
    chunk: int               # matrices per batched product (1: one at a time)
    pieces: list             # every matrix: (active param index j, piece index s, tall, group index, lr ratio)
    mine: list               # positions in `pieces` this rank orthogonalises
    fill: dict               # group index -> positions in `mine` (momentum and nesterov per group)
    apply: dict              # (group index, lr ratio) -> positions in `pieces`
    x: torch.Tensor          # (slots, m, k) compute dtype: input, overwritten by the result
    gathered: torch.Tensor   # (world * slots, m, k) after the all-gather; x itself on one rank
    x_views: list            # x[l] in each mine piece's own orientation
    out_views: list          # gathered[where piece i landed], own orientation
    where: list              # piece i -> its row of gathered
    compiled: tuple = None   # compile=True: the compiled update (one rank), or its two halves
    hp: torch.Tensor = None  # compile=True: per piece (1 - mu, mu, 1 - lr wd, -lr ratio), param dtype
    hp_values: tuple = None  # the values last copied into hp


def build_plan(groups, active, world, rank, compute_dtype=None, batch=None, gram=None):
    """active: [(group index, param)] that step now. Every rank builds the same plan from the same
    list, so the collectives line up."""
    by_key = {}
    for j, (gi, p) in enumerate(active):
        g = groups[gi]
        coeffs, scale = ns_schedule(g["ns_coefficients"], g["ns_steps"])
        for s, mat in enumerate(matrices(p, _kind(p, g), g["split"])):
            rows, cols = mat.shape
            key = (min(rows, cols), max(rows, cols), p.dtype, p.device, tuple(coeffs), scale, g["eps"])
            by_key.setdefault(key, []).append((j, s, rows > cols, gi, lr_ratio(g["adjust_lr_fn"], rows, cols)))
    buckets, loads = [], [0] * world
    # longest processing time first: the costliest matrices are placed first, and each bucket's
    # remainder (n mod world) goes to the ranks with the least work so far
    for key in sorted(by_key, key=lambda k: -k[0] * k[0] * k[1]):
        m, k, dtype, device, coeffs, scale, eps = key
        items = by_key[key]
        base, extra = divmod(len(items), world)
        lucky = set(sorted(range(world), key=lambda r: (loads[r], r))[:extra])
        counts = [base + (r in lucky) for r in range(world)]
        loads = [load + c * m * m * k for load, c in zip(loads, counts)]
        slots = base + (extra > 0)
        where = [r * slots + l for r in range(world) for l in range(counts[r])]   # piece i -> row of gathered
        first = sum(counts[:rank])
        mine = list(range(first, first + counts[rank]))
        cdtype = compute_dtype or default_compute_dtype(device)
        x = torch.empty(slots, m, k, dtype=cdtype, device=device)
        gathered = x if world == 1 else torch.empty(world * slots, m, k, dtype=cdtype, device=device)
        if batch is None:
            small = m <= CPU_BATCH_MAX_SIDE.get(cdtype, 64) or torch.get_num_threads() > 1
            chunk = len(items) if device.type != "cpu" or small else 1
        else:
            chunk = len(items) if batch else 1
        # Gram for wide matrices in float32; in bf16 on CPU from a short side of 128 (README, muon section:
        # faster there, and its rounding error near plain bf16's; at 64 it doubled); bf16 on CUDA: unmeasured
        bf16_gram = device.type == "cpu" and m >= CPU_BF16_GRAM_MIN_SIDE
        use_gram = (k >= 2 * m and (cdtype != torch.bfloat16 or bf16_gram)) if gram is None else (gram and k > m)
        fill, apply = {}, {}
        for l, i in enumerate(mine):
            fill.setdefault(items[i][3], []).append(l)
        for i, (_, _, _, gi, ratio) in enumerate(items):
            apply.setdefault((gi, ratio), []).append(i)
        orient = lambda t, tall: t.mT if tall else t
        buckets.append(Bucket(
            (m, k), list(coeffs), scale, eps, use_gram, max(chunk, 1), items, mine, fill, apply, x,
            gathered, [orient(x[l], items[i][2]) for l, i in enumerate(mine)],
            [orient(gathered[where[i]], it[2]) for i, it in enumerate(items)], where))
    return buckets


# --- the opt-in compiled path: a bucket's whole update as one graph, hyperparameters as tensors ---

# With compile=True each bucket's update (momentum, Nesterov, Newton-Schulz, weight decay, the
# step) is one torch.compile'd function, so the elementwise work fuses around the products. What
# changes between steps (momentum, lr, weight decay) arrives as a tensor `hp` of per-piece values;
# a new learning rate is new data for the same graph, never a recompile. Everything the graph is
# specialised on (shapes, orientation, coefficients, which pieces are this rank's) is fixed for a
# plan. Under torchrun the all-gather sits between two compiled halves.

def _orthogonalise_pieces(G, B, hp, nesterov, tall, mine, ns, dtype):
    """Momentum of every piece (state is replicated on all ranks), then Nesterov and Newton-Schulz
    of the pieces in `mine`: -> (len(mine), m, k) in dtype, or None when mine is empty. The same
    formulas as the eager path below."""
    for i in range(len(G)):
        B[i].lerp_(G[i], hp[i, 0])                                       # B <- B + (1 - mu) (G - B)
    if not mine:
        return None
    U = [G[i].lerp(B[i], hp[i, 1]) if nesterov[i] else B[i] for i in mine]
    X = torch.stack([u.mT if tall[i] else u for u, i in zip(U, mine)]).to(dtype)   # (n, m, k)
    return ns(X)


def _apply_pieces(P, hp, O, rows, tall):
    """Decoupled weight decay, then the step, for every piece; O[rows[i]] is piece i's result."""
    for i, p in enumerate(P):
        o = O[rows[i]].to(p.dtype)
        p.mul_(hp[i, 2]).add_((o.mT if tall[i] else o) * hp[i, 3])


def _bucket_update(G, B, P, hp, nesterov, tall, ns, dtype):
    """One rank: the whole update of one bucket."""
    n = len(P)
    _apply_pieces(P, hp, _orthogonalise_pieces(G, B, hp, nesterov, tall, range(n), ns, dtype), range(n), tall)


def _bucket_orthogonalise(G, B, hp, x, nesterov, tall, mine, ns):
    """Several ranks, before the all-gather: this rank's share into x (its all-gather input)."""
    O = _orthogonalise_pieces(G, B, hp, nesterov, tall, mine, ns, x.dtype)
    if O is not None:
        x.copy_(O)


def compile_bucket(bk, world):
    """The compiled update of one bucket: (whole,) on one rank, (before, after) the all-gather on
    several. isolate_recompiles gives every bucket its own compile cache (they share the code)."""
    ns = functools.partial(gram_newton_schulz if bk.gram else newton_schulz, coeffs=bk.coeffs, eps=bk.eps, scale=bk.scale)
    tall = tuple(it[2] for it in bk.pieces)
    opts = dict(fullgraph=True, dynamic=False, isolate_recompiles=True)
    if world == 1:
        whole = torch.compile(functools.partial(_bucket_update, tall=tall, ns=ns, dtype=bk.x.dtype), **opts)
        return (whole,)
    before = torch.compile(functools.partial(_bucket_orthogonalise, tall=tall, mine=tuple(bk.mine), ns=ns), **opts)
    after = torch.compile(functools.partial(_apply_pieces, rows=tuple(bk.where), tall=tall), **opts)
    return before, after


# --- the optimizer ---

def _freeze(v):
    return tuple(_freeze(u) for u in v) if isinstance(v, (list, tuple)) else v


def _structure(g):
    # what the plan depends on; lr, weight decay and momentum are read at every step instead
    if not g["use_muon"]:
        return (False, len(g["params"]))
    return (True, len(g["params"]), _freeze(g["ns_coefficients"]), g["ns_steps"], g["eps"], _freeze(g["split"]),
            g["flatten"], g["adjust_lr_fn"])


def _check_muon_group(g, gi):
    for k, ok in (("lr", g["lr"] >= 0), ("momentum", g["momentum"] >= 0), ("weight_decay", g["weight_decay"] >= 0),
                  ("ns_steps", isinstance(g["ns_steps"], int) and 0 <= g["ns_steps"] < 100),
                  ("eps", g["eps"] > 0), ("adjust_lr_fn", g["adjust_lr_fn"] in (None, "original", "match_rms_adamw"))):
        if not ok:
            raise ValueError(f"Muon group {gi}: invalid {k}={g[k]!r}")
    c = g["ns_coefficients"]
    if c != "polar_express" and not (isinstance(c, (tuple, list)) and len(c) == 3):
        raise ValueError(f"Muon group {gi}: ns_coefficients must be 3 numbers (a, b, c) or 'polar_express', got {c!r}")
    names = g.get("param_names") or [f"parameter {i}" for i in range(len(g["params"]))]
    for name, p in zip(names, g["params"]):
        where = f"Muon group {gi}: {name!r} with shape {tuple(p.shape)}"
        if p.ndim < 2:
            raise ValueError(f"{where}: Muon needs matrices (ndim >= 2); put it in a group with use_muon=False "
                             "(AdamW), for instance with muon.param_groups(model)")
        if torch.is_complex(p):
            raise ValueError(f"{where}: complex parameters are not supported")
        kind = _kind(p, g)
        if kind == "flatten" and not p.is_contiguous():
            raise ValueError(f"{where}: a flattened (conv) weight must be contiguous, not channels_last")
        rows = p.shape[1] if kind == "batch" else p.shape[0]
        split = g["split"]
        if split is not None:
            if isinstance(split, int):
                ok = split > 0 and rows % split == 0
            else:
                ok = len(split) > 0 and all(isinstance(s, int) and s > 0 for s in split) and sum(split) == rows
            if not ok:
                raise ValueError(f"{where}: split={split!r} does not cut its {rows} rows into blocks")


ADAMW_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)   # torch.optim.AdamW's
MUON_ONLY = ("momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn", "split", "flatten")


class Muon(torch.optim.Optimizer):
    """Muon groups (use_muon=True, the default) and AdamW groups (use_muon=False) in one optimizer.

    Muon hyperparameters and defaults are torch.optim.Muon's (lr, weight_decay, momentum, nesterov,
    ns_coefficients: 3 numbers or "polar_express", eps, ns_steps, adjust_lr_fn: None/"original" or
    "match_rms_adamw"), plus per group:
      split:   rows per block (int) or a list of block sizes: orthogonalise row blocks separately
      flatten: treat a 3-D parameter as a Conv1d weight (out, in*k) instead of a batch of matrices
    AdamW groups take torch.optim.AdamW's defaults (lr, betas, eps, weight_decay) for what they omit.
    Optimizer-wide switches (None: chosen per machine, see the plan above):
      compute_dtype: torch.bfloat16 or torch.float32 for Newton-Schulz
      batch:         one batched product per bucket (True) or one matrix at a time (False)
      gram:          Gram Newton-Schulz for wide matrices (auto: k >= 2m; in bf16 only on CPU, m >= 128)
      compile:       torch.compile each bucket's whole update, hyperparameters as tensors (CUDA or CPU)
      process_group: the group to share the work over (default: the whole world, when initialised)
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=JORDAN,
                 eps=1e-7, ns_steps=5, adjust_lr_fn=None, split=None, flatten=False,
                 compute_dtype=None, batch=None, gram=None, compile=False, process_group=None):
        self._plans = {}
        self.compute_dtype, self.batch, self.gram, self.process_group = compute_dtype, batch, gram, process_group
        self.compile = compile
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        split=split, flatten=flatten)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        group = dict(param_group)
        use_muon = group.setdefault("use_muon", True)
        if not use_muon:
            for k, v in ADAMW_DEFAULTS.items():
                group.setdefault(k, v)
        super().add_param_group(group)
        group, gi = self.param_groups[-1], len(self.param_groups) - 1
        if use_muon:
            _check_muon_group(group, gi)
        else:
            for k in MUON_ONLY:
                group.pop(k, None)
        self._init_state(group)
        self._plans.clear()

    def _init_state(self, group):
        # state exists from construction (torch.optim.Muon makes it at the first step), so a
        # state_dict always covers every parameter and ranks agree on it
        for p in group["params"]:
            st = self.state[p]
            if group["use_muon"]:
                st.setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))
            elif "step" not in st:
                st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                          exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))

    def load_state_dict(self, state_dict):
        saved = state_dict["param_groups"]
        if len(saved) == len(self.param_groups):
            # a torch.optim.Muon state_dict lacks this file's keys (use_muon, split, ...): keep ours
            state_dict = dict(state_dict, param_groups=[
                {**{k: v for k, v in cur.items() if k not in ("params", "param_names")}, **s}
                for cur, s in zip(self.param_groups, saved)])
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._init_state(group)
        self._plans.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw(group)
        self._muon()
        return loss

    def _adamw(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        st = [self.state[p] for p in params]
        # torch's own functional AdamW, so AdamW groups match torch.optim.AdamW exactly
        adamw_functional(
            params, [p.grad for p in params], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [],
            [s["step"] for s in st], amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
            has_complex=any(torch.is_complex(p) for p in params))

    def _world(self):
        if dist.is_available() and dist.is_initialized():
            pg = self.process_group or dist.group.WORLD
            return pg, dist.get_world_size(pg), dist.get_rank(pg)
        return None, 1, 0

    def _muon(self):
        entries = [(gi, p) for gi, g in enumerate(self.param_groups) if g["use_muon"] for p in g["params"]]
        if not entries:
            return
        pg, world, rank = self._world()
        has = [p.grad is not None for _, p in entries]
        if world > 1:
            # a matrix steps only where every rank has its gradient: ranks never diverge, and the
            # plan (hence every collective) is the same on all of them
            flags = torch.tensor(has, dtype=torch.uint8, device=entries[0][1].device)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=pg)
            has = [bool(v) for v in flags.tolist()]
        active = [e for e, h in zip(entries, has) if h]
        if not active:
            return
        for _, p in active:
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
        groups = self.param_groups
        key = (tuple(has), world, rank, tuple(_structure(g) for g in groups))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build_plan(groups, active, world, rank, self.compute_dtype, self.batch, self.gram)
        params = [p for _, p in active]
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]

        def pieces(ts, view=True):
            return [matrices(t, _kind(p, groups[gi]), groups[gi]["split"], view) for t, (gi, p) in zip(ts, active)]
        G, B, P = pieces(grads, view=False), pieces(bufs), pieces(params)
        if self.compile:
            self._muon_compiled(plan, G, B, P, pg, world)
            return

        # momentum as an EMA, torch.optim.Muon's form: B <- B + (1 - mu) (G - B)
        by_group = {}
        for j, (gi, _) in enumerate(active):
            by_group.setdefault(gi, []).append(j)
        for gi, js in by_group.items():
            torch._foreach_lerp_([bufs[j] for j in js], [grads[j] for j in js], 1 - groups[gi]["momentum"])

        # orthogonalise this rank's share of each bucket; its all-gather runs while the next computes
        works = []
        for bk in plan:
            self._orthogonalise(bk, G, B)
            if world > 1:
                works.append(dist.all_gather_single(bk.gathered, bk.x, group=pg, async_op=True))

        # decoupled weight decay, p <- (1 - lr wd) p, then p <- p - lr * ratio * O
        for gi, js in by_group.items():
            factor = 1 - groups[gi]["lr"] * groups[gi]["weight_decay"]
            if factor != 1:
                torch._foreach_mul_([params[j] for j in js], factor)
        for w in works:
            w.wait()
        for bk in plan:
            for (gi, ratio), pos in bk.apply.items():
                targets = [P[bk.pieces[i][0]][bk.pieces[i][1]] for i in pos]
                torch._foreach_add_(targets, [bk.out_views[i] for i in pos], alpha=-float(groups[gi]["lr"]) * ratio)

    def _muon_compiled(self, plan, G, B, P, pg, world):
        groups, works, after = self.param_groups, [], []
        for bk in plan:
            if bk.compiled is None:
                bk.compiled = compile_bucket(bk, world)
            g, b, p = ([T[j][s] for j, s, *_ in bk.pieces] for T in (G, B, P))
            # the same scalars as the eager path, computed in Python, rounded once to the parameter dtype
            values = tuple((1 - groups[gi]["momentum"], groups[gi]["momentum"], 1 - groups[gi]["lr"] * groups[gi]["weight_decay"],
                            -float(groups[gi]["lr"]) * ratio) for *_, gi, ratio in bk.pieces)
            if values != bk.hp_values:          # copied only when a value changed (every step under an lr schedule)
                hp = torch.tensor(values, dtype=p[0].dtype)                  # (pieces, 4)
                bk.hp = hp.to(p[0].device) if bk.hp is None else bk.hp.copy_(hp)
                bk.hp_values = values
            nesterov = tuple(groups[gi]["nesterov"] for *_, gi, _ in bk.pieces)
            if world == 1:
                bk.compiled[0](g, b, p, bk.hp, nesterov)
            else:
                bk.compiled[0](g, b, bk.hp, bk.x[:len(bk.mine)], nesterov)
                works.append(dist.all_gather_single(bk.gathered, bk.x, group=pg, async_op=True))
                after.append((bk, p))
        for w in works:
            w.wait()
        for bk, p in after:
            bk.compiled[1](p, bk.hp, bk.gathered)

    def _orthogonalise(self, bk, G, B):
        n = len(bk.mine)
        if n == 0:
            return
        for gi, ls in bk.fill.items():
            g = self.param_groups[gi]
            dst = [bk.x_views[l] for l in ls]
            src_g = [G[bk.pieces[bk.mine[l]][0]][bk.pieces[bk.mine[l]][1]] for l in ls]
            src_b = [B[bk.pieces[bk.mine[l]][0]][bk.pieces[bk.mine[l]][1]] for l in ls]
            if not g["nesterov"]:
                torch._foreach_copy_(dst, src_b)
            elif dst[0].dtype == src_g[0].dtype:       # float32 path: nesterov straight into the bucket
                torch._foreach_copy_(dst, src_g)
                torch._foreach_lerp_(dst, src_b, g["momentum"])
            else:                                      # G + mu (B - G) in the parameter dtype, then cast
                torch._foreach_copy_(dst, torch._foreach_lerp(src_g, src_b, g["momentum"]))
        ns = gram_newton_schulz if bk.gram else newton_schulz
        for s in range(0, n, bk.chunk):
            x = bk.x[s:min(n, s + bk.chunk)]
            ns(x, bk.coeffs, bk.eps, bk.scale, out=x)


# --- parameter groups for a model: hidden matrices to Muon, the rest to AdamW ---

ADAMW_NAMES = ("embed", "head")   # a parameter whose name contains one of these goes to AdamW
MUON_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def param_groups(module, muon=None, adamw=None, adamw_names=ADAMW_NAMES, min_side=16, verbose=True):
    """Proposed groups for Muon(...), following Keller Jordan's advice that Muon is for hidden
    layers only: the weights of Linear and Conv layers go to Muon; embeddings, output heads (by
    name), norms, biases, gains, free tables (queries, positional and modulation tables) and
    projections from or to a space narrower than `min_side` (actions, states) go to AdamW.
    Frozen parameters are left out. Prints the split with the reason for each AdamW share."""
    owner = {}
    for mod in module.modules():
        for p in mod.parameters(recurse=False):
            owner[id(p)] = mod
    plain, conv1d, rest, why = [], [], [], {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            why.setdefault("frozen (left out)", []).append((name, p))
            continue
        mod = owner.get(id(p))
        layer_weight = isinstance(mod, MUON_LAYERS) and name.rsplit(".", 1)[-1] == "weight"
        reason = ("vector (bias, gain, norm)" if p.ndim < 2 else
                  "embedding" if isinstance(mod, torch.nn.Embedding) else
                  "name has " + "/".join(adamw_names) if any(s in name.lower() for s in adamw_names) else
                  "not a Linear/Conv weight (tables, queries)" if not layer_weight else
                  f"in/out projection narrower than {min_side}" if min(p.shape[:2]) < min_side else None)
        if reason:
            rest.append((name, p))
            why.setdefault(reason, []).append((name, p))
        elif p.ndim == 3:
            conv1d.append((name, p))      # Conv1d weight (out, in, k): flattened, not a batch
        else:
            plain.append((name, p))
    groups = [dict(params=plain, use_muon=True, **(muon or {})),
              dict(params=conv1d, use_muon=True, flatten=True, **(muon or {})),
              dict(params=rest, use_muon=False, **(adamw or {}))]
    groups = [g for g in groups if g["params"]]
    if verbose:
        count = lambda ps: f"{len(ps)} tensors, {sum(p.numel() for _, p in ps) / 1e6:.3f}M values"
        print(f"muon.param_groups: Muon {count(plain + conv1d)} | AdamW {count(rest)}")
        for reason, ps in why.items():
            shown = ", ".join(f"{n} {tuple(p.shape)}" for n, p in ps[:3]) + (", ..." if len(ps) > 3 else "")
            print(f"  {reason}: {count(ps)}: {shown}")
    return groups


# --- self-check: python muon.py, or the same under torchrun ---

def _selfcheck(d=64, layers=2, steps=3):
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    # one single-rank group per rank, so local references can run beside the shared run
    solo = [dist.new_group([r]) for r in range(world)][rank] if distributed else None
    gen = torch.Generator().manual_seed(0)
    shapes = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
    ps = [torch.randn(s, generator=gen) * 0.02 for _ in range(layers) for s in shapes]
    grads = [[torch.randn(p.shape, generator=gen) for p in ps] for _ in range(steps)]

    def run(make):
        params = [torch.nn.Parameter(p.clone()) for p in ps]
        opt = make(params)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    def rel(a, b):       # relative difference of the total updates, worst matrix
        return max(float(((x - y).norm() / (y - p0).norm())) for x, y, p0 in zip(a, b, ps))

    shared = run(lambda q: Muon(q, lr=0.02))
    local = run(lambda q: Muon(q, lr=0.02, process_group=solo))
    ref = run(lambda q: torch.optim.Muon(q, lr=0.02))
    bf16 = run(lambda q: Muon(q, lr=0.02, compute_dtype=torch.bfloat16, process_group=solo))
    if rank == 0:
        print(f"compute dtype here: {default_compute_dtype(torch.device('cpu'))} (bf16 instructions: {cpu_has_bf16()})")
        print(f"{len(ps)} matrices, {steps} steps, update relative to torch.optim.Muon's: "
              f"ours (auto dtype) {rel(shared, ref):.2e}, ours (bf16) {rel(bf16, ref):.2e}")
    if distributed:
        flat = torch.cat([p.flatten() for p in shared])
        every = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(every, flat)
        if rank == 0:
            same = all(torch.equal(every[0], e) for e in every[1:])
            print(f"{world} ranks: bitwise identical across ranks: {same}; "
                  f"equal to one process: {torch.equal(flat, torch.cat([p.flatten() for p in local]))}")
        dist.destroy_process_group()


if __name__ == "__main__":
    _selfcheck()
