"""model.py: the WALL-WM architecture at small scale, read bottom up (METHOD.md sections 3 and 4).

    python model.py                      # parameter counts of the default preset
    python model.py --preset tiny        # the preset the tests use
    python model.py --preset paper       # the report's sizes, built on the meta device (nothing allocated)

Training lives in train.py (`torchrun --standalone --nproc_per_node=N train.py` for several processes);
this file only defines modules, losses and samplers. Order: primitives (bytes, RoPE, attention), the
sight-cone geometry, the video and action towers, the language side (text encoder, VLM, Staircase,
reconstructor), config presets, and the WallWM model that ties them to the windows of data.py.

Dimension letters: B batch rows, V views, F frames, P patches per view and frame, N tokens, K action
tokens, A action dim, S state dim, T text tokens, C Staircase latents (K_c), D width, H heads.
"""
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- bytes: every text in the model is UTF-8 bytes plus four specials ---
PAD, BOS, EOS, SEP = 256, 257, 258, 259
VOCAB = 260


def encode_bytes(texts, max_len, bos=True, eos=False, left_pad=False):
    """list[str] -> (B, N) long ids padded with PAD to the longest row; rows longer than max_len are cut."""
    rows = [[BOS] * bos + list(t.encode("utf-8"))[:max_len - bos - eos] + [EOS] * eos for t in texts]
    out = torch.full((len(rows), max(1, *map(len, rows))), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        start = out.shape[1] - len(r) if left_pad else 0
        out[i, start:start + len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def decode_bytes(ids):
    """(N,) ids -> str, up to the first EOS; specials dropped, invalid UTF-8 replaced."""
    ids = ids.tolist()
    ids = ids[:ids.index(EOS)] if EOS in ids else ids
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# --- primitives: RoPE, attention, feed-forward, time embedding ---
def rope_angles(pos, n, base=100.0):
    """pos (..., N) -> (..., N, n) rotation angles pos * base^(-j/n) for n frequency pairs."""
    freqs = base ** (-torch.arange(n, device=pos.device, dtype=torch.float32) / n)
    return pos.float()[..., None] * freqs


def axis_pairs(half, axes):
    """Split `half` frequency pairs over `axes` axes; the first axis takes the remainder."""
    each = half // axes
    return [half - each * (axes - 1)] + [each] * (axes - 1)


def rotary(ang):
    """RoPE angles (B or 1, N, n) -> (cos, sin), each (B or 1, 1, N, 2n), laid out for apply_rope.
    Computed once per layout and shared by every block (and every denoising step) that uses it."""
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]


def apply_rope(x, rot):
    """x (B, H, N, dh), rot = rotary(angles): rotate the pairs (x_j, x_{j + dh/2}) by angle j,
    as x * cos + (x_{j + dh/2}, x_j) * (-sin, sin): three ops on CPU instead of seven."""
    cos, sin = rot
    xf = x.float()
    x1, x2 = xf.chunk(2, -1)
    return torch.addcmul(xf * cos, torch.cat([x2, x1], -1), sin).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with normalised queries and keys (QK-norm); self- or cross-attention (ctx_dim)."""

    def __init__(self, dim, heads, ctx_dim=None, zero_out=False):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.v = nn.Linear(ctx_dim or dim, dim, bias=False)
        # QK-norm as LayerNorm without bias (as in ViT-22B, Dehghani et al. 2023): on a CPU torch runs
        # layer_norm as one kernel and RMSNorm as six elementwise ops (README, training-step speed)
        self.q_norm, self.k_norm = nn.LayerNorm(dim // heads, bias=False), nn.LayerNorm(dim // heads, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        if zero_out:                                    # the block starts as if this attention were absent
            nn.init.zeros_(self.o.weight)

    def split(self, x):                                 # (B, N, D) -> (B, H, N, dh)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def kv(self, ctx, rope=None):
        k = self.k_norm(self.split(self.k(ctx)))
        return (k if rope is None else apply_rope(k, rope)), self.split(self.v(ctx))

    def forward(self, x, ctx=None, mask=None, rope=None, kv=None):
        """mask (B, Nq, Nk) bool, True = may attend; `kv` replaces the keys and values (a cache)."""
        q = self.q_norm(self.split(self.q(x)))
        q = q if rope is None else apply_rope(q, rope)
        k, v = kv if kv is not None else self.kv(x if ctx is None else ctx, rope if ctx is None else None)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.o(o.transpose(1, 2).flatten(2))


class MLP(nn.Module):                                   # the video tower's FFN
    def __init__(self, dim, hidden):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))          # erf GELU: 3x faster than the tanh form on CPU


class GatedMLP(nn.Module):                              # SwiGLU: the action tower's gated FFN and the LMs'
    def __init__(self, dim, hidden):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.up(x).chunk(2, -1)
        return self.down(F.silu(a) * b)


def layer_norm(x):                                      # AdaLN supplies scale and shift
    return F.layer_norm(x, x.shape[-1:])


def modulate(x, shift, scale):                          # one fused op for scale and shift (CPU time, README)
    return torch.addcmul(shift, layer_norm(x), 1 + scale)


class TimeEmbed(nn.Module):
    """Flow time t in [0, 1] -> (..., D): sinusoids of 1000 t, then an MLP."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.dim // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        a = 1000 * t.float()[..., None] * f
        return self.mlp(torch.cat([a.cos(), a.sin()], -1).to(self.mlp[0].weight.dtype))


def block_mask(seg_q, seg_k):
    """(B, Nq), (B, Nk) segment ids -> (B, Nq, Nk): attend only within the same window (the packing
    mask, METHOD.md section 3); padding keys (-1) are never seen, padding queries see everything so
    that no softmax row is empty. The same rule as data.block_mask."""
    return ((seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] >= 0)) | (seg_q[:, :, None] < 0)


def causal_mask(valid, n_new):
    """Queries are the last n_new of the keys; valid (B, N) marks real keys -> (B, n_new, N)."""
    N = valid.shape[1]
    q = torch.arange(N - n_new, N, device=valid.device)[:, None]
    k = torch.arange(N, device=valid.device)[None]
    return ((k <= q)[None] & valid[:, None, :]) | (k == q)[None]      # a padding query sees itself


def positions_in_segment(seg):
    """(B, N) segment ids, each segment contiguous -> the index of each token inside its segment."""
    idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return idx - torch.cummax(torch.where(start, idx, 0), 1).values


def renumber(seg, ns, draws):
    """Window ids of `draws` copies of a row side by side: copy d's window s becomes d ns + s."""
    return torch.cat([torch.where(seg >= 0, seg + d * ns, -1) for d in range(draws)], 1)


def keyframe_index(frame_tau, frame_seg):
    """(B, F) -> (B, F): the index of each frame's window keyframe (tau 0, same window id)."""
    key = (frame_seg[:, :, None] == frame_seg[:, None, :]) & (frame_tau[:, None, :] == 0)
    return key.float().argmax(-1)


def gather_segments(values, seg):
    """values (B, ns, ...) per window, seg (B, N) -> (B, N, ...) the value of each token's window."""
    idx = seg.clamp(min=0)
    return values[torch.arange(seg.shape[0], device=seg.device)[:, None], idx]


# --- sight-cone mask (METHOD.md section 3): which patches of two views can see the same space ---
def patch_cones(intrinsics, pose, image_size, patch, scale=1.0, widen=1.0):
    """Each patch as a cone: apex (..., V, 1, 3), unit axis (..., V, P, 3), tan of its half-angle
    (..., V, P), with the half-angle enclosing the patch's corners, times `widen`. Intrinsics are in
    pixels of frames `scale` times larger than image_size (pixel centres at integer coordinates)."""
    fx, fy, cx, cy = intrinsics.unbind(-1)
    off = (scale - 1) / 2                               # a model pixel averages scale x scale data pixels
    fx, fy, cx, cy = fx / scale, fy / scale, (cx - off) / scale, (cy - off) / scale
    g = image_size // patch
    centre = torch.arange(g, device=intrinsics.device) * patch + (patch - 1) / 2
    v, u = torch.meshgrid(centre, centre, indexing="ij")
    du = torch.tensor([-1, -1, 1, 1], device=u.device) * patch / 2
    dv = torch.tensor([-1, 1, -1, 1], device=u.device) * patch / 2
    uu = torch.stack([u.flatten(), *(u.flatten()[:, None] + du).T])  # (5, P): centre, then 4 corners
    vv = torch.stack([v.flatten(), *(v.flatten()[:, None] + dv).T])
    x = (uu - cx[..., None, None]) / fx[..., None, None]               # (..., V, 5, P) camera axes
    y = (vv - cy[..., None, None]) / fy[..., None, None]
    cam = torch.stack([x, y, torch.ones_like(x)], -1)
    ray = F.normalize(cam @ pose[..., None, :3, :3].transpose(-1, -2), dim=-1)   # world directions
    axis, cos = ray[..., 0, :, :], (ray[..., :1, :, :] * ray[..., 1:, :, :]).sum(-1).amin(-2)
    tan = torch.tan(torch.arccos(cos.clamp(-1, 1))) * widen
    return pose[..., None, :3, 3], axis, tan


def sight_cone_mask(apex, axis, tan, d_min, d_max):
    """(..., V*P, V*P) bool: two patches may attend if their cones meet inside the depth band.
    Closest approach of the two axes, clamped to [d_min, d_max] (distance along each axis; the
    other parameter re-solved after each clamp), then |p1 - p2| <= t1 tan g1 + t2 tan g2 (METHOD.md
    section 3). Parallel axes are tested at d_max, where the cones are widest. The test at one pair
    of points is conservative (it can miss cones that touch elsewhere in the band); cone_widen
    makes up for part of that. A token always attends to its own view."""
    V, P = axis.shape[-3:-1]
    c = apex.expand_as(axis).flatten(-3, -2)            # (..., N, 3)
    d, tg = axis.flatten(-3, -2), tan.flatten(-2)       # (..., N, 3), (..., N)
    w0 = c[..., :, None, :] - c[..., None, :, :]        # (..., N, N, 3) apex_i - apex_j
    b = d @ d.transpose(-1, -2)                         # cos of the angle between the axes
    e1 = (d[..., :, None, :] * w0).sum(-1)
    e2 = (d[..., None, :, :] * w0).sum(-1)
    den = 1 - b * b
    par = den < 1e-6
    den = torch.where(par, 1.0, den)
    t1 = torch.where(par, d_max, (b * e2 - e1) / den).clamp(d_min, d_max)
    t2 = (e2 + b * t1).clamp(d_min, d_max)              # the best t2 for the clamped t1, then t1 for that t2
    t1 = (b * t2 - e1).clamp(d_min, d_max)
    gap = (w0 + t1[..., None] * d[..., :, None, :] - t2[..., None] * d[..., None, :, :]).norm(dim=-1)
    ok = gap <= t1 * tg[..., :, None] + t2 * tg[..., None, :]
    ok = ok | ok.transpose(-1, -2)                      # the re-solve order favours one side: either suffices
    view = torch.arange(V, device=axis.device).repeat_interleave(P)
    return ok | (view[:, None] == view[None, :])


# --- video tower (METHOD.md section 3): a DiT over pixel patches of every view ---
def patchify(frames, patch, size):
    """(..., H, W, 3) uint8 -> (..., P, patch*patch*3) in [-1, 1], area-averaged down to size x size."""
    lead = frames.shape[:-3]
    x = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != size:
        x = F.avg_pool2d(x, x.shape[-1] // size)
    x = x.unfold(2, patch, patch).unfold(3, patch, patch)   # (n, 3, g, g, p, p)
    x = x.permute(0, 2, 3, 4, 5, 1).reshape(x.shape[0], -1, patch * patch * 3)
    return x.reshape(*lead, *x.shape[1:])


def unpatchify(x, patch):
    """(..., P, patch*patch*3) in [-1, 1] -> (..., H, W, 3) uint8."""
    g = math.isqrt(x.shape[-2])
    x = x.reshape(*x.shape[:-2], g, g, patch, patch, 3).transpose(-4, -3)
    x = x.reshape(*x.shape[:-5], g * patch, g * patch, 3)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class VideoBlock(nn.Module):
    """AdaLN(t) -> within-view self-attention (3D RoPE) -> cross-view self-attention (Camera RoPE,
    zero-initialised output, AdaLN gate; the report's VI-SA) -> text cross-attention -> FFN."""

    def __init__(self, c, text_dim):
        super().__init__()
        D = c.width
        # Wan-style modulation: one time projection shared by the tower plus a learned per-block offset
        self.mod = nn.Parameter(torch.randn(1, 9, D) / D ** 0.5)
        self.attn = Attention(D, c.heads)
        self.xview = Attention(D, c.heads, zero_out=True) if c.cross_view else None
        self.text_norm, self.text = nn.LayerNorm(D), Attention(D, c.heads, ctx_dim=text_dim)
        self.ffn = MLP(D, round(c.ffn_mult * D))

    def forward(self, x, e, lay, text):
        """x (B, F, V, P, D), e (B, F, V, P, 9, D) time modulation, lay: masks and RoPE angles."""
        B, F_, V, P, D = x.shape
        m = (self.mod + e).unbind(-2)
        h = modulate(x, m[0], m[1]).transpose(1, 2).reshape(B * V, F_ * P, D)    # one sequence per view
        h = self.attn(h, mask=lay["view_mask"], rope=lay["view_rope"])
        x = torch.addcmul(x, m[2], h.reshape(B, V, F_, P, D).transpose(1, 2))   # gated residuals: x + gate h
        if self.xview is not None:                      # all views of one frame see each other
            h = modulate(x, m[3], m[4]).reshape(B * F_, V * P, D)
            h = self.xview(h, mask=lay["xview_mask"], rope=lay["xview_rope"])
            x = torch.addcmul(x, m[5], h.reshape(B, F_, V, P, D))
        h = self.text(self.text_norm(x).reshape(B, -1, D), ctx=text, mask=lay["text_mask"])
        x = x + h.reshape(x.shape)
        return torch.addcmul(x, m[8], self.ffn(modulate(x, m[6], m[7])))


class VideoTower(nn.Module):
    def __init__(self, c, text_dim, max_chunks, key_residual=False):
        super().__init__()
        D, dh = c.width, c.width // c.heads
        self.c = c
        # [ours] With x-prediction, a frame is predicted as its keyframe plus a change: the patches
        # (192 values) are wider than the tower (96 or 128), so the stream cannot carry a static scene
        # through unchanged, and most of a future frame is its keyframe (README, open loop).
        self.key_residual = key_residual and c.key_channels
        # [ours] Each token reads its window's keyframe patch at the same (view, row, column) beside its
        # own noisy patch (channel concatenation, as image-to-video DiTs condition on the first frame,
        # e.g. Wan2.1 I2V). Without it, the default run's sampled futures lost even the static objects
        # of the keyframe, and event mode could not see where anything was (README, open loop).
        self.patch_in = nn.Linear(c.patch * c.patch * 3 * (2 if c.key_channels else 1), D)
        self.time, self.time_proj = TimeEmbed(D), nn.Sequential(nn.SiLU(), nn.Linear(D, 9 * D))
        self.chunk = nn.Embedding(max_chunks + 1, D)   # E_abs, row 0 for event windows (section 6)
        self.blocks = nn.ModuleList(VideoBlock(c, text_dim) for _ in range(c.depth))
        self.out_mod, self.out_time = nn.Parameter(torch.zeros(1, 2, D)), nn.Linear(D, 2 * D)
        self.patch_out = nn.Linear(D, c.patch * c.patch * 3)
        nn.init.zeros_(self.patch_out.weight)
        nn.init.zeros_(self.patch_out.bias)
        # Camera RoPE: one learnable rotary angle table over views, shared by every cross-view layer;
        # initialised as ordinary RoPE over the view index; a new camera is a new row.
        self.view_pairs, row_col = dh // 2 - 2 * (dh // 6), dh // 6
        angles = rope_angles(torch.arange(c.views), self.view_pairs, 10.0)
        if c.camera_rope:
            self.view_angles = nn.Parameter(angles)
        else:
            self.register_buffer("view_angles", torch.zeros_like(angles))
        self.view_embed = None if c.camera_rope else nn.Embedding(c.views, D)   # view identity when off
        self.row_col_pairs = row_col

    def layout(self, frame_tau, frame_seg, text_seg, cone):
        """Masks and RoPE angles shared by every block and every denoising step of one batch."""
        c = self.c
        B, F_ = frame_tau.shape
        g = c.image_size // c.patch
        P = g * g
        r, col = (torch.arange(P, device=frame_tau.device) // g), (torch.arange(P, device=frame_tau.device) % g)
        nf, nr, nc = axis_pairs(c.width // c.heads // 2, 3)
        tau = frame_tau[:, :, None].expand(B, F_, P)
        ang = torch.cat([rope_angles(tau, nf), rope_angles(r.expand_as(tau), nr), rope_angles(col.expand_as(tau), nc)], -1)
        lay = {"view_rope": tuple(x.repeat_interleave(c.views, 0) for x in rotary(ang.reshape(B, F_ * P, -1)))}   # (B V, 1, F P, dh)
        lay["key_index"] = keyframe_index(frame_tau, frame_seg)                      # (B, F): each frame's keyframe
        seg = frame_seg[:, :, None].expand(B, F_, P).reshape(B, F_ * P)
        single = bool((frame_seg == 0).all())           # one window, no padding: no mask needed
        lay["view_mask"] = None if single else block_mask(seg, seg).repeat_interleave(c.views, 0)
        view = torch.arange(c.views, device=r.device).repeat_interleave(P)
        rr, cc = r.repeat(c.views), col.repeat(c.views)
        va = self.view_angles[view]
        lay["xview_rope"] = rotary(torch.cat([va, rope_angles(rr, self.row_col_pairs), rope_angles(cc, self.row_col_pairs)], -1)[None])
        lay["xview_mask"] = None if cone is None else cone.reshape(B * F_, *cone.shape[-2:])
        tok = frame_seg[:, :, None].expand(B, F_, c.views * P).reshape(B, -1)
        lay["text_mask"] = None if bool((text_seg == 0).all()) and single else block_mask(tok, text_seg)
        return lay

    def forward(self, x, t, lay, text, chunk):
        """x (B, F, V, P, p*p*3) noisy patches, t (B, F, V, P) per-token flow time (0 = clean
        conditioning), text (B, T, D_text), chunk (B, F) E_abs row per frame.
        Returns the prediction (B, F, V, P, p*p*3) and every block's output (the action tower's input)."""
        B, F_, V, P, E = x.shape
        key = None
        if self.c.key_channels:                          # the clean keyframe patch (zero where a tube hides it)
            idx = lay["key_index"][:, :, None, None]
            key = x.gather(1, idx[..., None].expand(B, F_, V, P, E)) * (t.gather(1, idx.expand(B, F_, V, P)) == 0)[..., None]
            x = torch.cat([x, key], -1)                                             # (B, F, V, P, 2 E)
        h = self.patch_in(x) + self.chunk(chunk)[:, :, None, None]
        if self.view_embed is not None:
            h = h + self.view_embed.weight[:, None]
        if bool((t == t[:, :, :1, :1]).all()):                          # one time per frame unless a tube is masked
            t = t[:, :, :1, :1]
        te = self.time(t)                                               # (B, F, V or 1, P or 1, D)
        e = self.time_proj(te).unflatten(-1, (9, -1))                   # (B, F, V or 1, P or 1, 9, D)
        hidden = []
        for blk in self.blocks:
            h = blk(h, e, lay, text)
            hidden.append(h)
        shift, scale = (self.out_mod + self.out_time(te).unflatten(-1, (2, -1))).unbind(-2)
        out = self.patch_out(modulate(h, shift, scale))
        return (out if key is None or not self.key_residual else out + key), hidden


# --- action tower (METHOD.md section 3): same depth, reads the matched video block, never written to ---
class ActionBlock(nn.Module):
    """Self-attention over action tokens -> cross-attention to the state token -> cross-attention to
    the matched video block (E_tau on both sides) -> gated FFN; AdaLN on the action flow time."""

    def __init__(self, c, video_dim):
        super().__init__()
        D = c.width
        self.mod = nn.Parameter(torch.randn(1, 6, D) / D ** 0.5)
        self.attn = Attention(D, c.heads)
        self.state_norm, self.state = nn.LayerNorm(D), Attention(D, c.heads)
        self.video_norm, self.ctx_norm = nn.LayerNorm(D), nn.LayerNorm(video_dim)
        self.video = Attention(D, c.heads, ctx_dim=video_dim)
        self.ffn = GatedMLP(D, round(c.ffn_mult * D))

    def context_kv(self, h, tau_embed, state):
        """The keys and values this block reads from its video block and from the state token."""
        return self.video.kv(self.ctx_norm(h) + tau_embed), self.state.kv(state)

    def forward(self, a, e, lay, kv):
        m = (self.mod + e).unbind(-2)
        video_kv, state_kv = kv
        a = torch.addcmul(a, m[2], self.attn(modulate(a, m[0], m[1]), mask=lay["action_mask"], rope=lay["action_rope"]))
        # One key per token, its window's state token: the softmax over it is 1, so this adds o(v(state)),
        # the same for every token, whatever the query. So q, k and state_norm get only float noise as
        # gradient (Muon's normalised steps make them drift, with no effect on any output). Kept as the
        # report draws the block (section 3); a second state token would make the attention real.
        a = a + self.state(self.state_norm(a), kv=state_kv, mask=lay["state_mask"])
        a = a + self.video(self.video_norm(a) + lay["tau_q"], kv=video_kv, mask=lay["video_mask"])
        return torch.addcmul(a, m[5], self.ffn(modulate(a, m[3], m[4])))


def where_code(views, grid, dim):
    """(V, g g, dim) sin-cos code of each video token's (view, row, column)."""
    cell = torch.arange(grid * grid)
    idx = [torch.arange(views).repeat_interleave(grid * grid), (cell // grid).repeat(views), (cell % grid).repeat(views)]
    ang = torch.cat([rope_angles(i, n, 10.0) for i, n in zip(idx, axis_pairs(dim // 2, 3))], -1)
    return torch.cat([ang.sin(), ang.cos()], -1).reshape(views, grid * grid, -1)


class ActionTower(nn.Module):
    def __init__(self, c, video_dim, depth, n_tau, tau_offset, max_chunks, views, grid):
        super().__init__()
        D = c.width
        self.c, self.tau_offset, self.n_tau = c, tau_offset, n_tau
        # [ours] The video tower places its tokens with RoPE only, so its features need not say where
        # a token sits; the action tower must know that to reach an object. A learnable code of
        # (view, row, column), initialised as sin-cos, is added on the video side with E_tau.
        self.where = nn.Parameter(where_code(views, grid, video_dim)) if c.video_where else None
        self.action_in, self.state_in = nn.Linear(c.action_dim, D), nn.Linear(c.state_dim, D)
        self.time, self.time_proj = TimeEmbed(D), nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.tau_action, self.tau_video = nn.Embedding(n_tau, D), nn.Embedding(n_tau, video_dim)   # E_tau
        self.chunk = nn.Embedding(max_chunks + 1, D)
        self.blocks = nn.ModuleList(ActionBlock(c, video_dim) for _ in range(depth))
        self.out_mod, self.out_time = nn.Parameter(torch.zeros(1, 2, D)), nn.Linear(D, 2 * D)
        self.action_out = nn.Linear(D, c.action_dim)
        nn.init.zeros_(self.action_out.weight)
        nn.init.zeros_(self.action_out.bias)

    def tau_index(self, tau):
        i = tau + self.tau_offset
        if bool(((i < 0) | (i >= self.n_tau)).any()):
            raise ValueError(f"frame index tau out of range: found {int(tau.min())}..{int(tau.max())}, the "
                             f"model covers {-self.tau_offset}..{self.n_tau - 1 - self.tau_offset} "
                             f"(ActionConfig.max_history / max_future)")
        return i

    def context_kv(self, hidden, frame_tau, state, views, patches):
        """Everything the action tower reads besides its own tokens, computed once per video pass and
        reused by every action denoising step (the cache): per block, the (k, v) over all views' tokens
        of every frame, with E_tau added on the video side, and the (k, v) of the state token(s)
        (state (B, ns, S))."""
        B, F_ = frame_tau.shape
        te = self.tau_video(self.tau_index(frame_tau))[:, :, None, None].expand(B, F_, views, patches, -1)
        if self.where is not None:
            te = te + self.where                                          # (B, F, V, P, D_video)
        te = te.reshape(B, F_ * views * patches, -1)
        s = self.state_in(state) + self.tau_action.weight[self.tau_offset]      # the state token has tau 0
        return [blk.context_kv(h.reshape(B, -1, h.shape[-1]), te, s) for blk, h in zip(self.blocks, hidden)]

    def layout(self, action_tau, action_seg, state_seg, frame_seg, views, patches, draws=1):
        """Masks, RoPE angles and E_tau of the action tokens. With draws > 1, the independent noise
        draws of every window sit side by side on the token axis (draw d renumbers window s as
        d ns + s), so they share one copy of the video keys and values and never see each other."""
        B, ns = frame_seg.shape[0], state_seg.shape[1]
        seg, sseg = renumber(action_seg, ns, draws), renumber(state_seg, ns, draws)
        vseg = frame_seg[:, :, None].expand(-1, -1, views * patches).reshape(B, -1)
        pos = positions_in_segment(action_seg).repeat(1, draws)
        return {"action_mask": block_mask(seg, seg), "state_mask": block_mask(seg, sseg),
                "video_mask": block_mask(action_seg.repeat(1, draws), vseg),
                "tau_q": self.tau_action(self.tau_index(action_tau)).repeat(1, draws, 1),
                "action_rope": rotary(rope_angles(pos, self.c.width // self.c.heads // 2))}

    def forward(self, a, t, lay, kvs, chunk):
        """a (B, K, A) noisy actions, t (B, K) flow time, kvs from context_kv, chunk (B, K) E_abs rows."""
        h = self.action_in(a) + self.chunk(chunk)
        te = self.time(t)
        e = self.time_proj(te).unflatten(-1, (6, -1))
        for blk, kv in zip(self.blocks, kvs):
            h = blk(h, e, lay, kv)
        shift, scale = (self.out_mod + self.out_time(te).unflatten(-1, (2, -1))).unbind(-2)
        return self.action_out(modulate(h, shift, scale))


# --- language side (METHOD.md section 4) ---
class Block(nn.Module):
    """Pre-norm transformer block of the text encoder, the VLM and the reconstructor. Returns the
    keys and values it attended over (past + new), which is what a cache stores."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(dim), Attention(dim, heads)
        self.norm2, self.ffn = nn.RMSNorm(dim), GatedMLP(dim, 4 * dim)

    def forward(self, x, mask=None, rope=None, past=None):
        h = self.norm1(x)
        k, v = self.attn.kv(h, rope)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        x = x + self.attn(h, mask=mask, rope=rope, kv=(k, v))
        return x + self.ffn(self.norm2(x)), (k, v)


class TextEncoder(nn.Module):
    """Byte-level encoder, the stand-in for the report's frozen T5. [ours] Its output is `slots`
    learned queries attention-pooled from the byte features, so every caption is T = slots tokens
    and the VLM's project-out head can regress them position by position."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(VOCAB, c.width)
        self.blocks = nn.ModuleList(Block(c.width, c.heads) for _ in range(c.depth))
        self.queries = nn.Parameter(torch.randn(c.slots, c.width) / c.width ** 0.5)
        self.pool, self.norm = Attention(c.width, c.heads), nn.RMSNorm(c.width)

    def forward(self, ids):                             # (B, N) -> (B, T, D_text)
        valid = ids != PAD
        x = self.embed(ids)
        rope = rotary(rope_angles(torch.arange(ids.shape[1], device=ids.device), self.c.width // self.c.heads // 2)[None])
        mask = valid[:, None, :].expand(-1, ids.shape[1], -1)
        for blk in self.blocks:
            x, _ = blk(x, mask=mask, rope=rope)
        q = self.queries.expand(ids.shape[0], -1, -1)
        return self.norm(self.pool(q, ctx=x, mask=valid[:, None, :].expand(-1, self.c.slots, -1)))

    def encode(self, texts):
        return self(encode_bytes(texts, self.c.max_bytes).to(self.queries.device))


def contrastive_loss(feats, keys, temperature):
    """Supervised InfoNCE over pooled caption features: captions with the same key (same skill,
    object and target) are positives, all others negatives. feats (B, T, D), keys list of B."""
    z = F.normalize(feats.mean(1), dim=-1)
    sim = z @ z.T / temperature
    eye = torch.eye(len(keys), dtype=torch.bool, device=z.device)
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    lab = torch.tensor([ids[k] for k in keys], device=z.device)
    pos = (lab[:, None] == lab[None]) & ~eye
    logp = sim.masked_fill(eye, float("-inf")).log_softmax(-1)
    has = pos.any(1)
    if not bool(has.any()):
        raise ValueError("contrastive_loss: no two captions share a key; a batch needs paraphrase pairs")
    return -(logp.masked_fill(~pos, 0).sum(1)[has] / pos.sum(1)[has]).mean()


class VLM(nn.Module):
    """[ours] A small causal transformer standing in for the report's frozen Qwen VLM: it reads the
    instruction bytes (left-padded) and the current observation's patch tokens of every view, then
    `slots` query tokens (project-out head, MSE against the text encoder's features), SEP (the
    remaining-time head, Huber) and the next-event caption bytes (byte cross-entropy)."""

    def __init__(self, c, video_cfg, text_cfg):
        super().__init__()
        self.c, self.vc, self.slots = c, video_cfg, text_cfg.slots
        D = c.width
        self.embed = nn.Embedding(VOCAB, D)
        self.patch_in, self.view = nn.Linear(video_cfg.patch ** 2 * 3, D), nn.Parameter(torch.zeros(video_cfg.views, 1, D))
        self.layers = nn.ModuleList(Block(D, c.heads) for _ in range(c.depth))
        self.norm = nn.RMSNorm(D)
        self.queries = nn.Parameter(torch.randn(self.slots, D) / D ** 0.5)
        self.lm_head, self.text_out = nn.Linear(D, VOCAB, bias=False), nn.Linear(D, text_cfg.width)
        self.time_head = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, 1))

    def rope(self, pos):
        return rotary(rope_angles(pos, self.c.width // self.c.heads // 2, 1000.0))

    def prompt(self, obs, instruction):
        """obs (B, V, H, W, 3) uint8, instructions -> embeddings (B, N, D), valid (B, N), positions (B, N)."""
        ids = encode_bytes(instruction, self.c.max_bytes, left_pad=True).to(self.queries.device)
        img = self.patch_in(patchify(obs, self.vc.patch, self.vc.image_size)) + self.view    # (B, V, P, D)
        x = torch.cat([self.embed(ids), img.flatten(1, 2)], 1)
        valid = torch.cat([ids != PAD, torch.ones(img.shape[0], img.shape[1] * img.shape[2], dtype=torch.bool,
                                                   device=ids.device)], 1)
        return x, valid, valid.long().cumsum(1) - 1

    def run(self, x, valid, pos, layers, past=None):
        """Run `layers` over new tokens x with an optional per-layer cache of earlier tokens; returns
        the hidden states and the per-layer (k, v) including the cache."""
        full = valid if past is None else torch.cat([past[1], valid], 1)
        mask, rope, kvs = causal_mask(full, x.shape[1]), self.rope(pos), []
        for i, layer in enumerate(layers):
            x, kv = layer(x, mask=mask, rope=rope, past=None if past is None else past[0][i])
            kvs.append(kv)
        return x, (kvs, full)

    def loss(self, obs, instruction, caption, remaining, target):
        """L_text = l_align * MSE + l_next * CE + l_time * Huber (METHOD.md section 4), returned apart.
        `caption`: strings, or byte ids (B, n) ending in EOS and padded with PAD."""
        c = self.c
        x, valid, pos = self.prompt(obs, instruction)
        cap = caption.to(x.device) if torch.is_tensor(caption) else encode_bytes(caption, c.max_bytes, bos=False, eos=True).to(x.device)
        sep = torch.full((len(cap), 1), SEP, device=x.device)
        inp = torch.cat([sep, cap[:, :-1]], 1)                         # teacher forcing: SEP c1 .. cn
        B, Nq = x.shape[0], self.slots
        x = torch.cat([x, self.queries.expand(B, -1, -1), self.embed(inp)], 1)
        valid = torch.cat([valid, torch.ones(B, Nq, dtype=torch.bool, device=x.device), inp != PAD], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(Nq + inp.shape[1], device=x.device)], 1)
        h, _ = self.run(x, valid, pos, self.layers)
        h = self.norm(h)
        n0 = h.shape[1] - inp.shape[1] - Nq
        slots, hs = h[:, n0:n0 + Nq], h[:, n0 + Nq:]
        return {"align": F.mse_loss(self.text_out(slots), target),
                "next": F.cross_entropy(self.lm_head(hs).flatten(0, 1), cap.flatten(), ignore_index=PAD),
                "time": F.huber_loss(self.time_head(hs[:, 0]).squeeze(-1), remaining / c.remaining_scale)}

    @torch.no_grad()
    def predict(self, obs, instruction, max_len=None):
        """Greedy next-event caption (strings and byte ids (B, n)), project-out text features "text"
        (B, T, D_text), and the remaining steps of the event (B,). Decodes with a key/value cache."""
        c = self.c
        x, valid, pos = self.prompt(obs, instruction)
        B = x.shape[0]
        x = torch.cat([x, self.queries.expand(B, -1, -1), self.embed.weight[SEP].expand(B, 1, -1)], 1)
        valid = torch.cat([valid, torch.ones(B, self.slots + 1, dtype=torch.bool, device=x.device)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(self.slots + 1, device=x.device)], 1)
        h, cache = self.run(x, valid, pos, self.layers)
        h = self.norm(h)
        slots, remaining = self.text_out(h[:, -1 - self.slots:-1]), self.time_head(h[:, -1]).squeeze(-1) * c.remaining_scale
        out, done, p = [], torch.zeros(B, dtype=torch.bool, device=x.device), pos[:, -1:]
        for _ in range(c.max_bytes if max_len is None else max_len):
            nxt = self.lm_head(h[:, -1]).argmax(-1)
            nxt = torch.where(done, PAD, nxt)
            out.append(nxt)
            done = done | (nxt == EOS)
            if bool(done.all()):
                break
            p = p + 1
            h, cache = self.run(self.embed(nxt)[:, None], torch.ones(B, 1, dtype=torch.bool, device=x.device), p, self.layers,
                                past=cache)
            h = self.norm(h)
        ids = torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long, device=x.device)
        return {"caption": [decode_bytes(row) for row in ids], "ids": ids, "text": slots, "remaining": remaining.clamp(min=1)}


class Staircase(nn.Module):
    """Staircase Decoding (METHOD.md section 4): a Mixture-of-Transformers copy of the VLM's layers
    from the relay depth N_r up, a learned first-latent input and per-position embeddings.
    Latent position 1 runs the frozen VLM's lower layers; its state at depth N_r (the relay) starts
    positions 2..C (plus their embedding); all C positions then run the copied upper layers in one
    parallel pass, attending to the prompt's cache (frozen weights) and causally to earlier latents."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.start = nn.Parameter(torch.randn(1, 1, c.width) / c.width ** 0.5)
        self.pos = nn.Parameter(torch.randn(1, c.num_latents - 1, c.width) / c.width ** 0.5)
        self.upper = nn.ModuleList(Block(c.width, c.heads) for _ in range(c.depth - c.relay_depth))

    def init_from(self, vlm):                          # stage 4 starts the branch as a copy of the VLM
        for mine, theirs in zip(self.upper, vlm.layers[self.c.relay_depth:]):
            mine.load_state_dict(theirs.state_dict())

    def prefill(self, vlm, obs, instruction):
        x, valid, pos = vlm.prompt(obs, instruction)
        return vlm.run(x, valid, pos, vlm.layers)[1], pos[:, -1:] + 1

    def relay(self, vlm, cache, p0):
        """Position 1 through the frozen lower layers -> (B, 1, D) at depth N_r."""
        kvs, valid = cache
        x = self.start.expand(valid.shape[0], -1, -1)
        ones = torch.ones(valid.shape[0], 1, dtype=torch.bool, device=valid.device)
        h, _ = vlm.run(x, ones, p0, vlm.layers[:self.c.relay_depth], past=(kvs[:self.c.relay_depth], valid))
        return h

    def forward(self, vlm, cache, p0):
        """One parallel pass: (B, C, D) latents; N_r + C (L - N_r) layer passes in all."""
        kvs, valid = cache
        h1 = self.relay(vlm, cache, p0)
        x = torch.cat([h1, h1 + self.pos], 1)                         # the staircase's first step
        C, Nr = x.shape[1], self.c.relay_depth
        ones = torch.ones(x.shape[0], C, dtype=torch.bool, device=x.device)
        y, _ = vlm.run(x, ones, p0 + torch.arange(C, device=x.device), self.upper, past=(kvs[Nr:], valid))
        return vlm.norm(y)

    def reference(self, vlm, cache, p0):
        """The same function computed one latent at a time, each with the cache of earlier ones."""
        kvs, valid = cache
        h1 = self.relay(vlm, cache, p0)
        past, out = (kvs[self.c.relay_depth:], valid), []
        one = torch.ones(valid.shape[0], 1, dtype=torch.bool, device=valid.device)
        for j in range(self.c.num_latents):
            x = h1 if j == 0 else h1 + self.pos[:, j - 1:j]
            y, past = vlm.run(x, one, p0 + j, self.upper, past=past)
            out.append(y)
        return vlm.norm(torch.cat(out, 1))


def serial_chain(vlm, cache, p0, start, n):
    """The latency baseline (Coconut-style continuous thoughts): n latents one after another, each
    through all L layers, each fed the previous latent's last hidden state: n L layer passes."""
    past, x, out = cache, start.expand(cache[1].shape[0], -1, -1), []
    one = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
    for j in range(n):
        x, past = vlm.run(x, one, p0 + j, vlm.layers, past=past)
        out.append(x)
    return vlm.norm(torch.cat(out, 1))


class Reconstructor(nn.Module):
    """[ours] The frozen language model that reads a soft prefix and must reconstruct the reasoning
    trace (L_CoT). Trained on the traces in stage 3 behind a learned generic prefix, then frozen."""

    def __init__(self, c, num_latents):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(VOCAB, c.width)
        self.layers = nn.ModuleList(Block(c.width, c.heads) for _ in range(c.depth))
        self.norm, self.head = nn.RMSNorm(c.width), nn.Linear(c.width, VOCAB, bias=False)
        self.null_prefix = nn.Parameter(torch.randn(1, num_latents, c.width) / c.width ** 0.5)

    def nll(self, prefix, traces):
        """-(1/M) sum_m log p(r_m | prefix, r_<m): prefix (B, C, D) or None for the generic one."""
        ids = encode_bytes(traces, self.c.max_bytes, eos=True).to(self.embed.weight.device)
        prefix = self.null_prefix.expand(len(traces), -1, -1) if prefix is None else prefix
        x = torch.cat([prefix, self.embed(ids[:, :-1])], 1)
        valid = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.bool, device=x.device), ids[:, :-1] != PAD], 1)
        rope = rotary(rope_angles(torch.arange(x.shape[1], device=x.device), self.c.width // self.c.heads // 2, 1000.0)[None])
        mask = causal_mask(valid, x.shape[1])
        for layer in self.layers:
            x, _ = layer(x, mask=mask, rope=rope)
        logits = self.head(self.norm(x[:, prefix.shape[1]:]))
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD)


# --- configuration: one frozen dataclass per concern; presets tiny / default / paper ---
@dataclass(frozen=True)
class VideoConfig:
    depth: int = 4                    # blocks; the action tower has the same depth (section 3)
    width: int = 96                   # D of the video tower
    heads: int = 4
    ffn_mult: float = 4.0             # FFN hidden = ffn_mult * width
    image_size: int = 32              # frames are area-averaged down to this size (data is 64)
    patch: int = 8                    # pixel patch side: P = (image_size / patch)^2 tokens per view and frame
    views: int = 2                    # rows of the Camera RoPE table
    key_channels: bool = True         # [ours] every token also reads its keyframe's patch (channel concat); with
                                      # x-prediction the output is that patch plus a predicted change
    cross_view: bool = True           # cross-view self-attention (VI-SA); off: views never meet
    camera_rope: bool = True          # learnable view axis in cross-view RoPE; off: an additive view embedding
    sight_cone: bool = True           # sight-cone mask on cross-view attention (training only)
    cone_sampling: bool = False       # [ours] the mask at sampling too: it reads no future camera pose
    cone_band: tuple[float, float] = (0.05, 1.2)   # [ours] depth band [d_min, d_max] in metres along each ray
    cone_widen: float = 1.5           # [ours] widening factor on each patch cone's half-angle
    tube_mask: bool = False           # tube masking (off in the report's main recipe)
    tube_size: int = 2                # k: a k x k patch window
    tube_weight: float = 2.0          # loss weight on the tube's tokens
    motion_weight: float = 0.0        # [ours] extra L_V weight on future patches that differ from their keyframe's
                                      # patch (scene view: the gripper and what it moves; wrist view: nearly every
                                      # patch, since the camera moves); 0: every future patch weighs 1
    motion_eps: float = 2 / 127.5     # a patch differs when some value changes by more than 2 of 255 levels


@dataclass(frozen=True)
class ActionConfig:
    width: int = 96
    heads: int = 4
    ffn_mult: float = 4.0
    action_dim: int = 4               # (dx, dy, dz, grip)
    state_dim: int = 4                # (x, y, z, aperture)
    max_history: int = 2              # E_tau covers tau = -max_history .. max_future
    max_future: int = 8               # = ceil(max_event_len / k_p) of data.DataConfig
    video_where: bool = True          # [ours] (view, row, column) code on the video keys it reads


@dataclass(frozen=True)
class FlowConfig:
    prediction: Literal["v", "x"] = "v"   # v-prediction (report, Wan-style) or x-prediction
    anchor: bool = True               # asymmetric anchor (report default); off: symmetric t_action = t_video
    anchor_sigma: float = 0.25        # [ours] s* as a noise level: step 45 of 50 is u = 0.1, shifted by 3 -> 0.25
    anchor_jitter: float = 0.02       # training draws s* + U(-jitter, jitter)
    action_draws: int = 6             # K action-noise draws per anchored video pass (report: 6)
    own_futures: float = 0.0          # [ours] share of action-training batches whose future frames at s* are the
                                      # video tower's own samples (noise -> exactly s*, no jitter, no gradient, the
                                      # sampler's mask), not the recorded ones; needs the anchor
    time_shift: float = 3.0           # t = shift u / (1 + (shift - 1) u) for training draws and sampling
    dct_weight: float = 0.0           # auxiliary low-frequency DCT action loss (off in the report)
    dct_freqs: int = 4
    video_steps: int = 20             # Euler steps of the video schedule (noise -> s* uses the part above s*)
    action_steps: int = 10


@dataclass(frozen=True)
class TextConfig:
    width: int = 64
    depth: int = 2
    heads: int = 2
    slots: int = 8                    # T text tokens per caption
    max_bytes: int = 96
    temperature: float = 0.1          # of the stage-1 contrastive loss


@dataclass(frozen=True)
class VLMConfig:
    width: int = 128
    depth: int = 6                    # L
    heads: int = 4
    relay_depth: int = 3              # N_r
    num_latents: int = 6              # K_c
    max_bytes: int = 96               # instruction and caption bytes
    remaining_scale: float = 32.0     # the remaining-time head regresses steps / remaining_scale


@dataclass(frozen=True)
class ReconConfig:
    width: int = 96
    depth: int = 3
    heads: int = 3
    max_bytes: int = 160              # reasoning-trace bytes


@dataclass(frozen=True)
class ModelConfig:
    video: VideoConfig = VideoConfig()
    action: ActionConfig = ActionConfig()
    flow: FlowConfig = FlowConfig()
    text: TextConfig = TextConfig()
    vlm: VLMConfig = VLMConfig()
    recon: ReconConfig = ReconConfig()
    max_chunks: int = 64              # rows of E_abs (unified mode); later chunks reuse the last row


PRESETS = {
    "tiny": ModelConfig(VideoConfig(depth=2, width=64, heads=2, image_size=16, patch=4), ActionConfig(width=32, heads=2),
                        FlowConfig(action_draws=2, video_steps=4, action_steps=4), TextConfig(width=32, depth=1, slots=4),
                        VLMConfig(width=32, depth=4, heads=2, relay_depth=2, num_latents=4), ReconConfig(width=32, depth=2, heads=2)),
    # [ours] x-prediction: a pixel patch (8 x 8 x 3 = 192 values) is wider than the tower (128), so a
    # v-target, which carries the noise, cannot pass through it; x0 can (Li and He 2025, "Back to
    # Basics: Let Denoising Generative Models Denoise"). With v, the default
    # pipeline's sampled futures were noise (PSNR 10 dB); with x, 21.6 dB (README, open loop).
    # 8 video Euler steps: on the same checkpoint, open-loop action MSE 0.141 and PSNR 23.4 dB
    # against 0.142 and 23.2 dB with 20 steps (`eval.py --video-steps`, README), at 2.3x fewer
    # video passes per event.
    # [ours] Towers of width 128 (4 heads of 32), not 96: at 96 a training step reached 24-27% of this
    # CPU's matrix-product peak in stages 1 and 2, at 128 33-34% (`bench.py train`, README), and the
    # wider action tower follows the true future frames far better (stage 2 loss 0.098 against
    # 0.155; with the expert's future, 11 against 4 closed-loop successes of 200; README, "Results
    # of the default pipeline"). The default pipeline stays within its 30 minutes on 2 cores.
    "default": ModelConfig(VideoConfig(width=128), ActionConfig(width=128), FlowConfig(prediction="x", video_steps=8)),
    # The report's sizes: Wan2.2-5B's DiT (30 blocks, width 3072, 24 heads, FFN 14336), a VLM of ~9B
    # (Qwen3.5-9B in the report), a T5-XXL-sized encoder and a 0.8B reconstructor; [ours] the action
    # tower's width, the relay depth and K_c, which the report does not give.
    "paper": ModelConfig(VideoConfig(depth=30, width=3072, heads=24, ffn_mult=14336 / 3072, image_size=256, patch=16),
                         ActionConfig(width=1024, heads=16), FlowConfig(),
                         TextConfig(width=4096, depth=24, heads=64, slots=32, max_bytes=512),
                         VLMConfig(width=4096, depth=34, heads=32, relay_depth=17, num_latents=8, max_bytes=512),
                         ReconConfig(width=1536, depth=20, heads=12, max_bytes=512)),
}


def config_from_dict(d):
    """The inverse of dataclasses.asdict for ModelConfig (checkpoint metadata)."""
    parts = {"video": VideoConfig, "action": ActionConfig, "flow": FlowConfig, "text": TextConfig,
             "vlm": VLMConfig, "recon": ReconConfig}
    kw = {k: parts[k](**{n: tuple(x) if isinstance(x, list) else x for n, x in v.items()}) for k, v in d.items() if k in parts}
    return ModelConfig(**kw, **{k: v for k, v in d.items() if k not in parts})


def check_config(cfg):
    """Settings the model cannot be built with, named with their values (train.py checks before it writes anything)."""
    v, a = cfg.video, cfg.action
    bad = [f"{name} {x} is not a multiple of {what} {y}" for name, x, what, y in (
        ("video.image_size", v.image_size, "video.patch", v.patch), ("video.width", v.width, "video.heads", v.heads),
        ("action.width", a.width, "action.heads", a.heads)) if x % y]
    if bad:
        raise ValueError("ModelConfig: " + "; ".join(bad))
    if cfg.flow.own_futures and not cfg.flow.anchor:
        raise ValueError(f"FlowConfig.own_futures {cfg.flow.own_futures} needs the asymmetric anchor (anchor=True)")
    if not 0 < cfg.vlm.relay_depth < cfg.vlm.depth:
        raise ValueError(f"VLMConfig.relay_depth must lie in 1..depth-1, found {cfg.vlm.relay_depth}")


# --- the model: towers, language side, losses and samplers on data.py's windows ---
def shift_time(u, shift):
    """Time shift of the flow schedule (SD3, Esser et al. 2024, eq. 23): more steps at high noise."""
    return shift * u / (1 + (shift - 1) * u)


def schedule(steps, shift, device=None):
    return shift_time(torch.linspace(1, 0, steps + 1, device=device), shift)


def dct_coefficients(x, seg, n):
    """The n lowest DCT-II coefficients of each window's sequence: x (B, K, A), seg (B, K) -> (B, ns, n, A)."""
    ns = int(seg.max()) + 1
    onehot = F.one_hot(seg.clamp(min=0), ns).float() * (seg >= 0)[..., None]       # (B, K, ns)
    length = gather_segments(onehot.sum(1), seg)                                     # (B, K)
    pos = positions_in_segment(seg).float()
    basis = torch.cos(math.pi * (pos + 0.5)[..., None] * torch.arange(n, device=x.device) / length[..., None])
    return torch.einsum("bkj,bks,bka->bsja", basis, onehot, x) / onehot.sum(1).clamp(min=1)[:, :, None, None]


def dct_loss(x, target, seg, n):
    """Mean squared error of the n lowest DCT coefficients, averaged over the windows that exist (a
    row with fewer windows than the batch's widest has empty slots, which must not count)."""
    err = (dct_coefficients(x, seg, n) - dct_coefficients(target, seg, n)).pow(2).mean((-2, -1))   # (B, ns)
    has = F.one_hot(seg.clamp(min=0), err.shape[1]).mul((seg >= 0)[..., None]).amax(1).float()   # (B, ns)
    return (err * has).sum() / has.sum().clamp(min=1)


PARTS = ("text", "video", "action", "vlm", "stair", "prefix", "recon")   # what train.py freezes by name
# (stage 4 starts with stair.init_from(vlm): the branch begins as a copy of the VLM's upper layers)


def window_features(feats, rows, segs, shape):
    """Per-window features (n, T, D) (a VLM prediction, a planner's encoded caption) placed at their
    (row, window) slots of a batch: (B, ns, T, D), zeros where a row has no window."""
    out = feats.new_zeros(*shape, *feats.shape[1:])
    out[rows, segs] = feats
    return out


class WallWM(nn.Module):
    def __init__(self, cfg=ModelConfig()):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        v, a = cfg.video, cfg.action
        self.text = TextEncoder(cfg.text)
        self.video = VideoTower(v, cfg.text.width, cfg.max_chunks, key_residual=cfg.flow.prediction == "x")
        self.action = ActionTower(a, v.width, v.depth, a.max_history + a.max_future + 1, a.max_history, cfg.max_chunks,
                                   v.views, v.image_size // v.patch)
        self.vlm = VLM(cfg.vlm, v, cfg.text)
        self.stair = Staircase(cfg.vlm)
        self.prefix = nn.Sequential(nn.Linear(cfg.vlm.width, cfg.recon.width), nn.GELU(),
                                    nn.Linear(cfg.recon.width, cfg.recon.width))   # the prefix projector
        self.recon = Reconstructor(cfg.recon, cfg.vlm.num_latents)
        self.P = (v.image_size // v.patch) ** 2

    @property
    def device(self):
        return self.video.patch_in.weight.device

    def to_device(self, batch):
        return {k: x.to(self.device) if torch.is_tensor(x) else x for k, x in batch.items()}

    # --- text context of the video tower: encoded captions, or any (B, ns, T, D_text) features ---
    def context(self, feats):
        """(B, ns, T, D_text) per-window features -> tokens (B, ns T, D_text) and their window ids."""
        B, ns, T, _ = feats.shape
        return feats.reshape(B, ns * T, -1), torch.arange(ns, device=feats.device).repeat_interleave(T).expand(B, -1)

    def text_context(self, texts):
        """texts [B][ns] (a collated batch's caption or instruction lists) -> the video tower's context."""
        feats = self.text.encode([t for row in texts for t in row])
        return self.context(feats.unflatten(0, (len(texts), -1)))

    # --- one video pass and its geometry ---
    def cones(self, b):
        """The sight-cone mask of every frame from its cameras: (B, F, V P, V P). A future frame (tau > 0)
        takes the cameras of its window's anchor (the last frame with tau <= 0 before it). [ours] The
        report is silent here; with each future frame's own pose, the wrist camera's recorded path (so
        the actions themselves) reached the towers through the mask in training: a chunk model then
        reproduced its training chunks with the recorded poses and missed them without (README)."""
        v = self.cfg.video
        intr = gather_segments(b["intrinsics"], b["frame_seg"])                # (B, F, V, 4)
        F_ = b["frame_tau"].shape[1]
        idx = torch.arange(F_, device=self.device).expand_as(b["frame_tau"])
        last = torch.where(b["frame_tau"] <= 0, idx, 0).cummax(1).values       # (B, F) the latest observed frame
        pose = torch.gather(b["cam_pose"], 1, last[:, :, None, None, None].expand_as(b["cam_pose"]))  # (B, F, V, 4, 4)
        scale = b["frames"].shape[-2] / v.image_size
        with torch.autocast(self.device.type, enabled=False):   # geometry in fp32: under bf16 autocast the rays'
            apex, axis, tan = patch_cones(intr.float(), pose.float(), v.image_size, v.patch, scale, v.cone_widen)
            return sight_cone_mask(apex, axis, tan, *v.cone_band)   # matmuls flipped about 3% of the pairs

    def chunk_rows(self, b, seg):
        return (gather_segments(b["chunk_index"], seg) + 1).clamp(0, self.cfg.max_chunks)

    def video_pass(self, b, x, t, text, cone):
        lay = self.video.layout(b["frame_tau"], b["frame_seg"], text[1], cone)
        return self.video(x, t, lay, text[0], self.chunk_rows(b, b["frame_seg"]))

    def tube(self, b, cone):
        """Tube masking: per row one view and a k x k window of patches that are all co-visible with
        another view (by the sight cones of the row's first anchor frame, tau = 0), in every frame:
        (B, F, V, P) bool. Where no window is wholly co-visible, one that is partly; else any."""
        v = self.cfg.video
        B, F_ = b["frame_tau"].shape
        g, k, V = v.image_size // v.patch, v.tube_size, v.views
        anchor = (b["frame_tau"] == 0).int().argmax(1)                           # (B,) history frames come first
        out = torch.zeros(B, F_, V, g, g, dtype=torch.bool, device=self.device)
        windows = [(r, c) for r in range(g - k + 1) for c in range(g - k + 1)]
        for i in range(B):
            view = int(torch.randint(V, ()))
            pair = cone[i, anchor[i]].reshape(V, self.P, V, self.P)[view]        # (P, V, P)
            seen = torch.cat([pair[:, w] for w in range(V) if w != view], -1).any(-1).reshape(g, g)
            starts = ([(r, c) for r, c in windows if seen[r:r + k, c:c + k].all()]
                      or [(r, c) for r, c in windows if seen[r:r + k, c:c + k].any()] or windows)
            r, c = starts[int(torch.randint(len(starts), ()))]
            out[i, :, view, r:r + k, c:c + k] = True
        return out.flatten(-2) & (b["frame_seg"] >= 0)[:, :, None, None]

    # --- training losses (METHOD.md sections 3 and 5) ---
    def forward(self, batch, video=True, action=True, text=None):
        """Flow-matching losses {video, action} on a collated batch (data.collate). `text` is the video
        tower's context (tokens, window ids); by default the windows' (possibly dropped) captions."""
        b = self.to_device(batch)
        v, fl = self.cfg.video, self.cfg.flow
        text = self.text_context(b["caption"]) if text is None else text
        x0 = patchify(b["frames"], v.patch, v.image_size)                       # (B, F, V, P, E)
        need_cone = self.training and ((v.cross_view and v.sight_cone) or (video and v.tube_mask))
        cone_all = self.cones(b) if need_cone else None                         # tubes are chosen by co-visibility
        cone = cone_all if v.sight_cone and v.cross_view else None
        future = (b["frame_seg"] >= 0) & (b["frame_tau"] > 0)                   # the frames to generate
        B, ns = b["state_seg"].shape
        t_win = shift_time(torch.rand(B, ns, device=self.device), fl.time_shift)   # one flow time per window
        out, hidden = {}, None

        def noised(t_win, tube=None):                   # clean conditioning frames, noised future frames
            t = torch.where(future, gather_segments(t_win, b["frame_seg"]), 0.0)[:, :, None, None].expand(x0.shape[:-1])
            t = t if tube is None else torch.where(tube, 1.0, t)               # a tube is pure noise
            noise = torch.randn_like(x0)
            return t[..., None] * noise + (1 - t[..., None]) * x0, t, noise

        if video:
            tube = self.tube(b, cone_all) if self.training and v.tube_mask and cone_all is not None else None
            x_t, t, noise = noised(t_win, tube)
            pred, hidden = self.video_pass(b, x_t, t, text, cone)
            target = noise - x0 if fl.prediction == "v" else x0
            w = future[:, :, None, None].expand(t.shape).float()
            w = w if tube is None else torch.where(tube, v.tube_weight, w)
            if v.motion_weight:                         # [ours] most scene patches are a static table
                key = x0.gather(1, keyframe_index(b["frame_tau"], b["frame_seg"])[:, :, None, None, None].expand_as(x0))
                w = w * (1 + v.motion_weight * ((x0 - key).abs().amax(-1) > v.motion_eps))
            out["video"] = (w * (pred - target).pow(2).mean(-1)).sum() / w.sum().clamp(min=1)
        if action:
            if fl.anchor:                               # one pass at s*, shared by K action draws
                t_anchor = (fl.anchor_sigma + fl.anchor_jitter * (2 * torch.rand(B, ns, device=self.device) - 1)).clamp(0, 1)
                grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.video.parameters())
                x_t, t, _ = noised(t_anchor)
                if self.training and fl.own_futures > 0 and float(torch.rand(())) < fl.own_futures:
                    cone = cone if v.cone_sampling else None    # [ours] own_futures: this pass as inference makes it
                    with torch.no_grad():
                        cond = ~future[:, :, None, None, None]
                        x_t = self.to_anchor(b, torch.where(cond, x0, torch.randn_like(x0)), cond, text, cone)
                    t = torch.where(future, fl.anchor_sigma, 0.0)[:, :, None, None].expand(x0.shape[:-1])
                with torch.set_grad_enabled(grad):
                    _, hidden = self.video_pass(b, x_t, t, text, cone)
            elif hidden is None:                        # symmetric mode: the action shares the video's time
                x_t, t, _ = noised(t_win)
                _, hidden = self.video_pass(b, x_t, t, text, cone)
            out["action"] = self.action_loss(b, hidden, None if fl.anchor else t_win)
        return out

    def action_loss(self, b, hidden, t_win=None):
        """L_A against the video features `hidden`; with t_win None, K draws of action time and noise."""
        fl, V = self.cfg.flow, self.cfg.video.views
        n = fl.action_draws if t_win is None else 1     # K draws side by side on the token axis, one video cache
        kvs = self.action.context_kv(hidden, b["frame_tau"], b["state"].repeat(1, n, 1), V, self.P)
        lay = self.action.layout(b["action_tau"], b["action_seg"], b["state_seg"], b["frame_seg"], V, self.P, n)
        ns = b["state_seg"].shape[1]
        a0, seg = b["action"].repeat(1, n, 1), renumber(b["action_seg"], ns, n)
        if t_win is None:
            t_win = shift_time(torch.rand(a0.shape[0], n * ns, device=self.device), fl.time_shift)
        t = gather_segments(t_win, seg)                                          # (B, n K)
        noise = torch.randn_like(a0)
        a_t = t[..., None] * noise + (1 - t[..., None]) * a0
        pred = self.action(a_t, t, lay, kvs, self.chunk_rows(b, b["action_seg"]).repeat(1, n))
        target = noise - a0 if fl.prediction == "v" else a0
        valid = (seg >= 0).float()
        loss = (valid * (pred - target).pow(2).mean(-1)).sum() / valid.sum().clamp(min=1)
        if fl.dct_weight > 0:                           # optional low-frequency DCT loss on the clean estimate
            x_hat = a_t - t[..., None] * pred if fl.prediction == "v" else pred
            loss = loss + fl.dct_weight * dct_loss(x_hat, a0, seg, fl.dct_freqs)
        return loss

    # --- sampling (METHOD.md sections 3 and 6) ---
    def video_velocity(self, b, x, s, cond, text, cone=None):
        """The flow velocity of frames x (B, F, V, P, E) at noise level s, zero on the conditioning frames
        (cond (B, F, 1, 1, 1)), and the per-block features the action tower reads."""
        t = torch.where(cond[..., 0], 0.0, s).expand(x.shape[:-1])
        pred, hidden = self.video_pass(b, x, t, text, cone)
        vel = pred if self.cfg.flow.prediction == "v" else (x - pred) / s
        return torch.where(cond, 0.0, vel), hidden

    def guided_velocity(self, b, x, s, cond, text, cone=None, guidance=1.0):
        """video_velocity with classifier-free guidance on the text: v_empty + guidance (v_text - v_empty),
        where v_empty reads the empty caption's context, the one the length-aware caption drop trains
        (data.caption_drop_prob). [ours] The report does not say whether its video tower samples with
        guidance; 1 (the default) is one pass, without it."""
        vel, hidden = self.video_velocity(b, x, s, cond, text, cone)
        if guidance != 1:
            tokens, ids = text                         # ids (B, ns T'): T' is K_c for Staircase latents
            empty = self.context(self.text.encode([""])[None].expand(ids.shape[0], int(ids.max()) + 1, -1, -1))
            free = self.video_velocity(b, x, s, cond, empty, cone)[0]
            vel = free + guidance * (vel - free)
        return vel, hidden

    def to_anchor(self, b, x, cond, text, cone=None, guidance=1.0):
        """Euler steps of the video schedule from t = 1 down to s*. x (B, F, V, P, E): clean conditioning
        frames (cond), pure noise in the future frames. Returns the future the action tower is shown at
        inference (and, with FlowConfig.own_futures, in training)."""
        fl = self.cfg.flow
        steps = [s for s in schedule(fl.video_steps, fl.time_shift).tolist() if s > fl.anchor_sigma] + [fl.anchor_sigma]
        for s, s2 in zip(steps[:-1], steps[1:]):
            x = x + (s2 - s) * self.guided_velocity(b, x, s, cond, text, cone, guidance)[0]
        return x

    @torch.no_grad()
    def sample(self, batch, text=None, cache=True, to_end=False, generator=None, noise=None, true_future=False, guidance=1.0):
        """Actions for a collated batch whose future frames and actions are placeholders (only the
        conditioning frames tau <= 0, the state, the cameras and the token layout are read).
        Asymmetric anchor: video Euler steps from noise down to s*, one pass at s* whose per-block
        keys/values (and the state token's) are cached, action Euler steps from noise to 0 against the
        cache (cache=False recomputes that pass at every action step: the same actions, slower). Symmetric mode: both
        towers denoise together. `noise` ({"frames": (B, F, V, P, E), "action": (B, K, A)}) replaces the
        starting noise drawn from `generator`. Returns {"action": (B, K, A)} and, with to_end, "frames"
        (B, F, V, H, W, 3). true_future (a diagnostic, anchored only): the batch's future frames are
        real; they are noised to s* in place of the generated ones, isolating the action tower.
        guidance: classifier-free guidance of the video steps on the caption (guided_velocity; 1: off)."""
        b = self.to_device(batch)
        v, fl = self.cfg.video, self.cfg.flow
        if true_future and not fl.anchor:
            raise ValueError("sample(true_future=True) needs the asymmetric anchor (FlowConfig.anchor)")
        text = self.text_context(b["caption"]) if text is None else text
        x0 = patchify(b["frames"], v.patch, v.image_size)
        cond = ((b["frame_seg"] < 0) | (b["frame_tau"] <= 0))[:, :, None, None, None]
        if noise is None:
            at = self.device if generator is None else generator.device        # a CPU generator serves a CUDA model
            noise = {"frames": torch.randn(x0.shape, generator=generator, device=at),
                     "action": torch.randn(b["action"].shape, generator=generator, device=at)}
        x = torch.where(cond, x0, noise["frames"].to(self.device))
        a = noise["action"].to(self.device)
        lay = self.action.layout(b["action_tau"], b["action_seg"], b["state_seg"], b["frame_seg"], v.views, self.P)
        chunk = self.chunk_rows(b, b["action_seg"])
        cone = self.cones(b) if v.cone_sampling and v.sight_cone and v.cross_view else None

        def video_velocity(x, s):
            return self.video_velocity(b, x, s, cond, text, cone)

        def action_velocity(a, s, kvs):
            pred = self.action(a, torch.full(a.shape[:2], s, device=self.device), lay, kvs, chunk)
            return pred if fl.prediction == "v" else (a - pred) / s

        def kv_of(hidden):
            return self.action.context_kv(hidden, b["frame_tau"], b["state"], v.views, self.P)

        steps = schedule(fl.video_steps, fl.time_shift).tolist()
        if not fl.anchor:                                # symmetric: one joint Euler loop
            for s, s2 in zip(steps[:-1], steps[1:]):
                vel, hidden = self.guided_velocity(b, x, s, cond, text, cone, guidance)
                a = a + (s2 - s) * action_velocity(a, s, kv_of(hidden))
                x = x + (s2 - s) * vel
        else:
            if true_future:
                x = torch.where(cond, x0, (1 - fl.anchor_sigma) * x0 + fl.anchor_sigma * x)
            else:
                x = self.to_anchor(b, x, cond, text, cone, guidance)
            kvs = kv_of(video_velocity(x, fl.anchor_sigma)[1]) if cache else None
            asteps = schedule(fl.action_steps, fl.time_shift).tolist()
            for s, s2 in zip(asteps[:-1], asteps[1:]):
                kv = kvs if cache else kv_of(video_velocity(x, fl.anchor_sigma)[1])
                a = a + (s2 - s) * action_velocity(a, s, kv)
            rest = [fl.anchor_sigma] + [s for s in steps if s < fl.anchor_sigma]
            for s, s2 in zip(rest[:-1], rest[1:]) if to_end else ():
                x = x + (s2 - s) * self.guided_velocity(b, x, s, cond, text, cone, guidance)[0]
        out = {"action": a}
        if to_end:
            out["frames"] = unpatchify(x, v.patch)
        return out

    # --- language side: VLM heads (stage 3), Staircase (stage 4), unified-mode context ---
    def keyframes(self, b):
        """The observed keyframe (tau 0) of every window: (n, V, H, W, 3), and each window's (row, slot)."""
        rows, segs = torch.nonzero(b["state_seg"] >= 0, as_tuple=True)
        hit = (b["frame_seg"][rows] == segs[:, None]) & (b["frame_tau"][rows] == 0)
        return b["frames"][rows, hit.float().argmax(1)], rows, segs

    def per_window(self, b, key, rows, segs):
        return [b[key][r][s] for r, s in zip(rows.tolist(), segs.tolist())]

    def text_losses(self, batch):
        """Stage 3 on event windows: L_text's three terms and the reconstructor's language-model loss
        on the reasoning traces ("recon"). [ours] The "next event" the caption head names is the event
        that starts at the observed keyframe (the one the robot executes next, `event_text`), and the
        remaining time is that event's length; data.py's `next_caption` (the event after) is unused."""
        b = self.to_device(batch)
        obs, rows, segs = self.keyframes(b)
        caption = self.per_window(b, "event_text", rows, segs)
        with torch.no_grad():
            target = self.text.encode(caption)
        out = self.vlm.loss(obs, self.per_window(b, "instruction", rows, segs), caption, b["remaining"][rows, segs], target)
        out["recon"] = self.recon.nll(None, self.per_window(b, "reasoning", rows, segs))
        return out

    def latents(self, obs, instruction):
        """Staircase Decoding: (n, C, D_vlm) latents in one parallel pass."""
        cache, p0 = self.stair.prefill(self.vlm, obs, instruction)
        return self.stair(self.vlm, cache, p0)

    def cot_loss(self, batch):
        """Stage 4: L_CoT, the frozen reconstructor rebuilding the trace from the projected latents."""
        b = self.to_device(batch)
        obs, rows, segs = self.keyframes(b)
        z = self.latents(obs, self.per_window(b, "instruction", rows, segs))
        return self.recon.nll(self.prefix(z), self.per_window(b, "reasoning", rows, segs))

    def latent_context(self, batch):
        """Unified mode's third text source: each window's Staircase latents through the VLM's
        project-out head, as the video tower's context (tokens (B, ns C, D_text), window ids)."""
        b = self.to_device(batch)
        obs, rows, segs = self.keyframes(b)
        feats = self.vlm.text_out(self.latents(obs, self.per_window(b, "instruction", rows, segs)))
        return self.context(window_features(feats, rows, segs, b["state_seg"].shape))


# --- parameter counts; `--preset paper` never allocates ---
def count(module):
    return sum(p.numel() for p in module.parameters())


def main(preset: Literal["tiny", "default", "paper"] = "default"):
    """Build a preset on the meta device and print its parameter count per component."""
    with torch.device("meta"):
        m = WallWM(PRESETS[preset])
    rows = [(name, count(getattr(m, name))) for name in PARTS]
    print(f"preset {preset}: {count(m):,} parameters")
    for name, n in rows:
        print(f"  {name:7s} {n:>16,}  {n / 1e9:7.3f} B")
    return dict(rows)


if __name__ == "__main__":
    import tyro
    tyro.cli(main)
