"""The embedded tabletop world: cameras, renderer, tasks, physics, scripted expert, oracle planner.

numpy only. Every stage of the project trains and evaluates first on this world (METHOD.md
sections 2 and 7): two pinhole cameras (a fixed scene camera and a wrist camera that rides on the
gripper), five task families with several instruction templates, four generalization splits,
a phased scripted expert with stochastic speed, pauses, noise, grasp slips and recoveries, and
four-level hierarchical captions with reasoning traces at every event boundary. The last section
adapts Meta-World (an optional extra: `pip install -r requirements-metaworld.txt`) to the same
episode record; data.py and eval.py reach it with `--source metaworld` and `--env metaworld`.

    python env.py table --episodes 5             # tiny: expert success per family x split
    python env.py table --episodes 50            # the README's expert table (10-35 s)
    python env.py show --family put_all --out strip.png   # a frame strip of one expert episode
    (nothing here is distributed; data.py shards episode generation across workers)

Dimension letters: B worlds in a batch, V views, H x W pixels, N boxes, T steps.
"""

import copy
import functools
import math
import os
import zlib
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np

WORLD_VERSION = "tabletop-2"          # 2: the stack test is signed, the bowl test uses the floor's radius

# --- the vocabulary of the world ---
COLOURS = {  # name -> RGB; eight colours, all far from the table's wood tone
    "red": (205, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 215), "yellow": (235, 215, 40),
    "purple": (135, 55, 185), "orange": (245, 135, 25), "cyan": (40, 195, 205), "pink": (245, 125, 180),
}
COLOUR_NAMES = tuple(COLOURS)
BLOCK, BOWL, BUTTON, PAD = 0, 1, 2, 3
KIND_NAMES = ("block", "bowl", "button", "pad")
FAMILIES = ("pick_place", "stack", "push", "press_order", "put_all")
SPLITS = ("seen", "unseen_combos", "paraphrase", "distractors")

# Instruction templates per family. The last N_HELD_TEMPLATES of each list appear only in the
# `paraphrase` split; training data never contains them.
N_HELD_TEMPLATES = 2
TEMPLATES = {
    "pick_place": ["put the {a} block in the {b} bowl", "place the {a} block into the {b} bowl",
                   "pick up the {a} block and drop it in the {b} bowl", "move the {a} block to the {b} bowl",
                   "the {a} block goes inside the {b} bowl", "grab the {a} cube and set it in the {b} bowl"],
    "stack": ["stack the {a} block on the {b} block", "put the {a} block on top of the {b} block",
              "place the {a} block onto the {b} block", "pick up the {a} block and stack it on the {b} block",
              "the {a} block should sit on the {b} block", "build a tower with the {a} cube above the {b} cube"],
    "push": ["push the {a} block to {r}", "slide the {a} block to {r}", "shove the {a} block over to {r}",
             "move the {a} block to {r} by pushing it",
             "nudge the {a} cube until it reaches {r}", "without lifting it, get the {a} block to {r}"],
    "press_order": ["press the {seq} buttons in that order", "push the {seq} buttons in this order",
                    "press {then}", "press the buttons in the order {seq}",
                    "hit the {seq} buttons one after another", "tap {then}"],
    "put_all": ["put all the {a} blocks in the {b} bowl", "place every {a} block into the {b} bowl",
                "move all {a} blocks to the {b} bowl", "collect the {a} blocks in the {b} bowl",
                "each {a} cube belongs in the {b} bowl", "gather up all of the {a} blocks into the {b} bowl"],
}
# (kind, colour) pairs that training instructions never name, per family; `unseen_combos` names one.
HELD_OUT = {
    "pick_place": {("block", "purple"), ("bowl", "cyan")},
    "stack": {("block", "orange"), ("block", "green")},
    "push": {("block", "yellow"), ("pad", "red")},
    "press_order": {("button", "blue"), ("button", "pink")},
    "put_all": {("block", "red"), ("bowl", "purple")},
}
TRAIN_MAX_OBJECTS = 6          # no training scene has more; `distractors` scenes have 7 or 8
EDGES = {  # push targets that are table edges: name -> (region xmin, xmax, ymin, ymax)
    "left edge": (-0.30, -0.19, -0.05, 0.50), "right edge": (0.19, 0.30, -0.05, 0.50),
    "far edge": (-0.30, 0.30, 0.37, 0.50),
}

# --- geometry (metres; table plane z = 0, x right, y away from the scene camera, z up) ---
BLOCK_H = 0.025                # block half size
BOWL_H, BOWL_TOP, BOWL_FLOOR = 0.06, 0.03, 0.006
BOWL_IN = BOWL_H - 0.015         # a block centred within this (per axis) of a bowl's rests on its floor
BUTTON_H, BUTTON_TOP, BUTTON_PRESSED_TOP = 0.03, 0.02, 0.01
PAD_H, PAD_TOP = 0.06, 0.002
FINGER_T, FINGER_Y, FINGER_LOW, FINGER_HIGH = 0.005, 0.012, 0.02, 0.035   # gripper fingers
BODY = (0.065, 0.018, 0.035, 0.055)   # palm half x, half y, z from, z to (relative to the TCP)
SAFE_Z, PUSH_Z = 0.16, 0.03           # travel height and pushing height of the TCP
WORKSPACE = np.array([[-0.28, -0.04, FINGER_LOW], [0.28, 0.48, 0.25]])   # TCP bounds
FOOTPRINT = {BLOCK: 0.036, BOWL: 0.085, BUTTON: 0.043, PAD: 0.085}       # keep-out radius


# --- configuration ---
@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64             # H = W of both views
    max_step: float = 0.02           # metres moved per unit action per step
    aperture_rate: float = 0.15      # gripper aperture change per step (1 = open, 0 = closed)
    slip_prob: float = 0.1           # probability that a grasp slips during the lift (scripted)
    horizon: int = 600               # steps before an episode is cut


@dataclass(frozen=True)
class ExpertConfig:
    speed: tuple = (0.4, 1.0)        # per-event speed factor range (fraction of max_step)
    pause_prob: float = 0.3          # probability of a pause after an event
    pause_steps: tuple = (1, 3)      # pause length range, inclusive
    action_noise: float = 0.03       # Gaussian noise on the xyz action, in action units
    recovery_alpha: float = 0.1      # share of episodes started perturbed near a contact pose


# --- cameras: pinhole, OpenCV axes (x right, y down, z forward), world-from-camera poses ---
# Both cameras only pitch about the world x axis, so a pixel's ray direction is
# (a[u], b[v], e[v]): its x part depends on the column alone and its y, z parts on the row alone.
# The renderer below relies on this to test rays against boxes with per-row and per-column slabs.
@dataclass(frozen=True)
class Camera:
    size: int
    fov_deg: float
    pitch_deg: float                 # angle of the optical axis below the horizontal, towards +y

    @property
    def intrinsics(self):            # (fx, fy, cx, cy) in pixels
        f = (self.size / 2) / math.tan(math.radians(self.fov_deg) / 2)
        c = (self.size - 1) / 2
        return np.array([f, f, c, c], np.float64)

    @property
    def rotation(self):              # columns: camera x, y, z axes in world coordinates
        c, s = math.cos(math.radians(self.pitch_deg)), math.sin(math.radians(self.pitch_deg))
        return np.array([[1, 0, 0], [0, -s, c], [0, -c, -s]], np.float64)

    def rays(self):                  # per-column a (W,), per-row b, e (H,), with camera depth t
        return _rays(self)

    def pose(self, origin):          # 4x4 world-from-camera
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = self.rotation, origin
        return T


@functools.lru_cache(maxsize=16)
def _rays(cam):
    fx, fy, cx, cy = cam.intrinsics
    c, s = math.cos(math.radians(cam.pitch_deg)), math.sin(math.radians(cam.pitch_deg))
    u, v = np.arange(cam.size) - cx, np.arange(cam.size) - cy
    return u / fx, -s * v / fy + c, -c * v / fy - s


SCENE_ORIGIN = np.array([0.0, -0.17, 0.47])
WRIST_OFFSET = np.array([0.0, -0.02, 0.07])   # wrist camera origin relative to the TCP


def make_cameras(size):
    return Camera(size, 55.0, 55.0), Camera(size, 75.0, 80.0)   # scene, wrist


def project(points, intrinsics, pose):
    """World points (..., 3) -> pixel (u, v) (..., 2) and camera depth (...,)."""
    R, t = pose[:3, :3], pose[:3, 3]
    pc = (points - t) @ R                                   # (..., 3) in camera axes
    fx, fy, cx, cy = intrinsics
    return np.stack([fx * pc[..., 0] / pc[..., 2] + cx, fy * pc[..., 1] / pc[..., 2] + cy], -1), pc[..., 2]


def unproject(uv, depth, intrinsics, pose):
    """Pixel (u, v) (..., 2) at camera depth (...,) -> world points (..., 3)."""
    fx, fy, cx, cy = intrinsics
    pc = np.stack([(uv[..., 0] - cx) / fx * depth, (uv[..., 1] - cy) / fy * depth, depth], -1)
    return pc @ pose[:3, :3].T + pose[:3, 3]


# --- renderer: rays against axis-aligned boxes, z-buffered, each box tested only inside its screen rectangle ---
SHADES = (0.68, 0.84, 1.0)           # brightness of a box face hit through its x, y or z slab
TABLE_RGB = np.array([[64, 64, 74], [182, 160, 128], [168, 146, 114]], np.float64)   # floor, wood, dark wood


def _table(cam, origins):
    """The table plane z = 0 seen from origins (B, 3): depth bits << 32 per row (B, H) int64 (the start
    of its depth-buffer keys), and a colour code per pixel (B, H, W) (0 floor, 1-2 a checker of 5 cm
    squares over |x| < 0.35, -0.10 < y < 0.55). A row's rays share y and depth, so only x varies
    along a row, and the code is a lookup on x's square index."""
    a, b, e = (r.astype(np.float32) for r in cam.rays())
    origins = origins.astype(np.float32)
    t = np.where(e < 0, -origins[:, 2, None] / np.minimum(e, -1e-9), np.inf)          # (B, H) ray depth
    y = origins[:, 1, None] + t * b                                                   # (B, H)
    with np.errstate(invalid="ignore"):
        ix = t[..., None] * (20 * a) + (20 * origins[:, 0] + 100)[:, None, None]     # (B, H, W) 20 x + 100
        ix = np.clip(ix, 0, 199).astype(np.intp)                                      # NaN (no hit) -> 0
        iy = np.where((y > -0.10) & (y < 0.55), ((y + 5) * 20).astype(np.intp) & 1, 2)   # parity, 2: off
    code = np.take(_CHECKER, ix + 200 * iy[..., None])        # (intp indices: take is ~6x slower on int32)
    return t.view(np.int32).astype(np.int64) << 32, code


_CHECKER = np.zeros((3, 200), np.int64)   # [row parity or 2 (off the table), 20 x + 100] -> colour code
_CHECKER[:2, 93:107] = 1 + (np.arange(93, 107) + np.arange(2)[:, None]) % 2
_CHECKER = _CHECKER.ravel()


@functools.lru_cache(maxsize=16)
def _fixed_table(cam, origin):        # a fixed camera sees the same table in every world: (1, H), (1, H, W)
    return _table(cam, np.array([origin]))


def _labels(cam, origins, lo, hi):
    """origins (B, 3); boxes lo, hi (B, N, 3) (empty where lo == hi) -> (B, H, W) int32 indices into
    `_palette` (what each pixel sees).

    Per box, the column slab (x) gives an interval of ray depth per column and the row slabs (y, z)
    one per row (the cameras only pitch, see Camera); a pixel hits the box where the intervals overlap,
    and a depth buffer keeps the nearest hit. Each box is tested only inside the screen rectangle of
    its projected corners, so the cost follows the pixels a box covers rather than the whole image.
    """
    B, N, S = lo.shape[0], lo.shape[1], cam.size
    # screen rectangles from the projected corners (the whole image when a corner is behind the camera)
    bits = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], np.float64)
    corners = lo[:, :, None] + (hi - lo)[:, :, None] * bits                # (B, N, 8, 3)
    pc = (corners - origins[:, None, None]) @ cam.rotation                 # camera axes
    fx, fy, cx, cy = cam.intrinsics
    behind = (pc[..., 2] < 1e-3).any(-1)
    z = np.maximum(pc[..., 2], 1e-3)
    u, v = fx * pc[..., 0] / z + cx, fy * pc[..., 1] / z + cy
    c0 = np.where(behind, 0, np.clip(np.floor(u.min(-1)), 0, S)).astype(int)
    c1 = np.where(behind, S, np.clip(np.ceil(u.max(-1)) + 1, 0, S)).astype(int)
    r0 = np.where(behind, 0, np.clip(np.floor(v.min(-1)), 0, S)).astype(int)
    r1 = np.where(behind, S, np.clip(np.ceil(v.max(-1)) + 1, 0, S)).astype(int)
    live = (hi > lo).all(-1) & (c1 > c0) & (r1 > r0)
    # All boxes at once: every pixel of every box's window as one flat list, and a scatter-min of
    # the key (depth bits << 32 | label) per pixel, which is a depth buffer that also keeps the label.
    # Positive float32 depths order like their int32 bit patterns. Labels index one flat palette:
    # world b's box n seen through face f is (3 N + 3) b + 3 n + f, and its table 3 N + code; the
    # buffer starts as the table, and on equal depth the lower label (a box) wins.
    base = (3 * N + 3) * np.arange(B, dtype=np.int64)                               # (B,)
    fixed = (origins == origins[0]).all()
    depth, code = _fixed_table(cam, tuple(origins[0].tolist())) if fixed else _table(cam, origins)
    key = ((depth + (base + 3 * N)[:, None])[..., None] + code).ravel()             # (B H W,)
    # The live boxes (k = b N + n) and their windows' rows and columns, each as one flat list.
    k = np.flatnonzero(live)
    world, label = k // N, base[k // N] + 3 * (k % N)                               # (K,); label of face 0
    o, lo, hi = origins[world], lo.reshape(-1, 3)[k], hi.reshape(-1, 3)[k]          # (K, 3)
    h, w, r0, c0 = (r1 - r0).ravel()[k], (c1 - c0).ravel()[k], r0.ravel()[k], c0.ravel()[k]
    rbox, cbox = np.repeat(np.arange(len(k)), h), np.repeat(np.arange(len(k)), w)   # (R,), (C,): whose
    row = r0[rbox] + np.arange(len(rbox)) - (np.cumsum(h) - h)[rbox]
    col = c0[cbox] + np.arange(len(cbox)) - (np.cumsum(w) - w)[cbox]
    a, b, e = cam.rays()
    with np.errstate(divide="ignore", invalid="ignore"):
        def slab(i, box, inv):       # ray depths where the rays with these inverse directions cross slab i
            t1, t2 = (lo[box, i] - o[box, i]) * inv, (hi[box, i] - o[box, i]) * inv
            return np.minimum(t1, t2).astype(np.float32), np.maximum(t1, t2).astype(np.float32)
        cn, cf = slab(0, cbox, (1 / a)[col])                                        # (C,)
        yn, yf = slab(1, rbox, (1 / b)[row])                                        # (R,)
        zn, zf = slab(2, rbox, (1 / e)[row])
    rn, rf = np.maximum(np.maximum(yn, zn), 1e-6), np.minimum(yf, zf)     # only in front of the camera
    keep = rn < rf                                                         # other rows cannot hit
    rbox, row, rn, rf, face = rbox[keep], row[keep], rn[keep], rf[keep], np.where(zn >= yn, 2, 1)[keep]
    # A hit's depth is where it enters the box, the later of its x slab and its row's y, z slabs,
    # and its face is that slab's. So each slab's entry gets a key of its own, and a pixel's key is
    # the larger of its column's and its row's; TIE ranks the x face first on equal depth (then is
    # cleared), as in "x face where cn >= rn". A negative cn (bits < 0) never wins, as rn > 0.
    TIE = np.int64(1 << 31)
    col_key = (cn.view(np.int32).astype(np.int64) << 32) | (label[cbox] + TIE)
    row_key = (rn.view(np.int32).astype(np.int64) << 32) | (label[rbox] + face)
    # Then the pixels, row after row: `kc` is each pixel's entry in the column list (its row's first
    # column entry, plus its place in the row), and a row's values spread over its pixels with
    # np.repeat (several times faster than gathering them by row).
    wr = w[rbox]                                                                    # (R,) pixels per row
    first = (np.cumsum(w) - w)[rbox] - (np.cumsum(wr) - wr)                         # column entry - pixel
    kc = np.arange(wr.sum()) + np.repeat(first, wr)                                 # (P,)
    near = np.maximum(cn[kc], np.repeat(rn, wr))
    hit = np.flatnonzero(near < np.minimum(cf[kc], np.repeat(rf, wr)))
    rid, kc = np.repeat(np.arange(len(rbox)), wr)[hit], kc[hit]                     # the hits' rows
    pix = ((world[rbox] * S + row) * S)[rid] + col[kc]                             # (b S + row) S + column
    np.minimum.at(key, pix, np.maximum(col_key[kc], row_key[rid]) & ~TIE)
    return key.view(np.int32)[0::2].reshape(B, S, S)    # little-endian int64: the low int32 is the label


def _palette(rgb):
    """rgb (B, N, 3) -> (B (3 N + 3), 3) uint8: each box's three shaded faces, then the table's colours."""
    B, N = rgb.shape[:2]
    palette = np.concatenate([(rgb[:, :, None] * np.array(SHADES)[:, None]).reshape(B, 3 * N, 3),
                              np.broadcast_to(TABLE_RGB, (B, 3, 3))], 1)               # (B, 3 N + 3, 3)
    return np.clip(palette, 0, 255).astype(np.uint8).reshape(-1, 3)


def _colour(palette, labels):             # (...) labels -> (..., 3) uint8
    return np.take(palette, labels.astype(np.intp, copy=False), axis=0)


def render(cam, origins, lo, hi, rgb):
    """origins (B, 3); boxes lo, hi (B, N, 3) (empty where lo == hi); rgb (B, N, 3) -> uint8 (B, H, W, 3)."""
    return _colour(_palette(rgb), _labels(cam, origins, lo, hi))


# --- tasks: scenes, instructions and sub-goals for every family and split ---
@dataclass
class Task:
    family: str
    split: str
    seed: int
    instruction: str
    template: int                    # index into TEMPLATES[family]
    kinds: np.ndarray                # (O,) object kinds
    colours: list                    # (O,) colour names
    pos: np.ndarray                  # (O, 3) blocks: centre; others: centre of the base on the table
    subgoals: list                   # ("place", obj, target) | ("push", obj, region name) | ("press", obj)
    named: list                      # (kind, colour) of every object the instruction names
    gripper_start: np.ndarray        # (3,) TCP
    recovery_start: bool = False     # started perturbed near a contact pose (recovery augmentation)


def name_of(task, i):
    return f"{task.colours[i]} {KIND_NAMES[task.kinds[i]]}"


def _place_objects(rng, kinds, push_path=None):
    """Rejection-sample non-overlapping positions; None when this draw does not fit."""
    pos = np.zeros((len(kinds), 3))
    for i, k in enumerate(kinds):
        for _ in range(200):
            xy = rng.uniform([-0.19, 0.05], [0.19, 0.35])
            if all(np.hypot(*(xy - pos[j, :2])) > FOOTPRINT[k] + FOOTPRINT[kinds[j]] + 0.01 for j in range(i)):
                break
        else:
            return None
        pos[i] = (*xy, BLOCK_H if k == BLOCK else 0.0)
    return pos


def region_name(task, region):
    return f"{task.colours[1]} pad" if region == "pad" else region


def _push_region(task_pos, region, pad_index):
    if region in EDGES:
        return EDGES[region]
    x, y = task_pos[pad_index, :2]
    m = PAD_H - 0.025
    return (x - m, x + m, y - m, y + m)


def push_target(pos, region):        # the point a pushed block is aimed at, and the region test
    xmin, xmax, ymin, ymax = region
    x, y = pos[:2]
    if xmax - xmin < 0.2 and ymax - ymin < 0.2:                # a pad: its centre
        return np.array([(xmin + xmax) / 2, (ymin + ymax) / 2])
    return np.array([np.clip(x, xmin + 0.04, xmax - 0.04), np.clip(y, ymin + 0.04, ymax - 0.04)])


def in_region(xy, region):
    return region[0] < xy[0] < region[1] and region[2] < xy[1] < region[3]


def make_task(family, split, seed, recovery_alpha=0.0):
    """A task of `family` in `split`, deterministic from `seed` (METHOD.md section 2, splits)."""
    if family not in FAMILIES or split not in SPLITS:
        raise ValueError(f"make_task: family must be one of {FAMILIES} and split one of {SPLITS}, "
                         f"found {family!r}, {split!r}")
    rng = np.random.default_rng([seed, FAMILIES.index(family), SPLITS.index(split)])
    n_templates = len(TEMPLATES[family]) - N_HELD_TEMPLATES
    for _ in range(1000):
        t = _draw_task(rng, family, split, seed)
        if t is None:
            continue
        held = [c for c in t.named if c in HELD_OUT[family]]
        if (split == "unseen_combos") != bool(held):
            continue
        n = len(t.kinds)
        if (split == "distractors") != (n > TRAIN_MAX_OBJECTS):
            continue
        t.template = int(rng.integers(n_templates, len(TEMPLATES[family]))) if split == "paraphrase" \
            else int(rng.integers(n_templates))
        t.instruction = _instruction(t)
        if rng.random() < recovery_alpha:
            _perturb_start(rng, t)
        return t
    raise RuntimeError(f"make_task: no valid {family}/{split} scene for seed {seed}")


def _draw_task(rng, family, split, seed):
    pick = lambda n, exclude=(): list(rng.choice([c for c in COLOUR_NAMES if c not in exclude], n, replace=False))
    extra = int(rng.integers(7, 9)) if split == "distractors" else None
    if split == "unseen_combos":       # force one held-out combination onto a named object
        forced = sorted(HELD_OUT[family])[int(rng.integers(len(HELD_OUT[family])))]
    else:
        forced = None

    def colour_for(kind, default):
        return forced[1] if forced and forced[0] == kind else default

    if family in ("pick_place", "stack", "put_all"):
        n_main = int(rng.integers(2, 4)) if family == "put_all" else 1
        a = colour_for("block", pick(1)[0])
        target_kind = BLOCK if family == "stack" else BOWL
        b = pick(1, exclude=(a,) if family == "stack" else ())[0]
        if forced and forced[0] == KIND_NAMES[target_kind] and family != "stack":
            b = forced[1]
        if forced and family == "stack" and forced[1] == a and rng.random() < 0.5:  # either role
            a, b = b, a
        kinds, colours = [BLOCK] * n_main + [target_kind], [a] * n_main + [b]
        subgoals = [("place", i, n_main) for i in range(n_main)]
        named = [("block", a), (KIND_NAMES[target_kind], b)]
    elif family == "push":
        a = colour_for("block", pick(1)[0])
        use_pad = (forced is not None and forced[0] == "pad") or rng.random() < 0.5
        kinds, colours, named = [BLOCK], [a], [("block", a)]
        if use_pad:
            b = colour_for("pad", pick(1)[0])
            kinds, colours, named = kinds + [PAD], colours + [b], named + [("pad", b)]
            region = "pad"
        else:
            region = list(EDGES)[int(rng.integers(len(EDGES)))]
        subgoals = [("push", 0, region)]
    else:  # press_order
        n_buttons, n_seq = int(rng.integers(3, 5)), int(rng.integers(2, 4))
        cols = pick(n_buttons)
        if forced:
            cols = [c for c in cols if c != forced[1]][: n_buttons - 1]
            cols.insert(int(rng.integers(n_seq)), forced[1])     # the held-out button is pressed
        kinds, colours = [BUTTON] * n_buttons, cols
        subgoals = [("press", i) for i in range(n_seq)]
        named = [("button", c) for c in cols[:n_seq]]
    # distractors: other objects whose (kind, colour) never repeats a named one
    n_total = extra if extra else len(kinds) + int(rng.integers(1, 3))
    if not extra and n_total > TRAIN_MAX_OBJECTS:
        n_total = TRAIN_MAX_OBJECTS
    while len(kinds) < n_total:
        k = int(rng.choice([BLOCK, BLOCK, BOWL]))
        c = pick(1, exclude=[colours[i] for i in range(len(kinds)) if kinds[i] == k])[0]
        kinds.append(k)
        colours.append(c)
    kinds = np.array(kinds)
    pos = _place_objects(rng, kinds)
    if pos is None:
        return None
    gripper = np.array([rng.uniform(-0.1, 0.1), rng.uniform(-0.02, 0.06), SAFE_Z])
    t = Task(family, split, seed, "", 0, kinds, colours, pos, subgoals, named, gripper)
    if family == "push" and not _push_ok(t):
        return None
    return t


def _push_ok(t):
    """The block is outside its region, far enough, and nothing lies along the push path."""
    _, obj, region = t.subgoals[0]
    region = _push_region(t.pos, region, 1)
    start = t.pos[obj, :2]
    goal = push_target(t.pos[obj], region)
    if in_region(start, region) or np.hypot(*(goal - start)) < 0.08:
        return False
    d = (goal - start) / np.hypot(*(goal - start))
    a, b = start - d * 0.09, goal
    for j in range(len(t.kinds)):
        if j == obj or t.kinds[j] == PAD:
            continue
        p = t.pos[j, :2]
        s = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1)
        if np.hypot(*(p - (a + s * (b - a)))) < FOOTPRINT[t.kinds[j]] + 0.05:
            return False
    return True


def _instruction(t):
    tpl = TEMPLATES[t.family][t.template]
    if t.family == "press_order":
        seq = [t.colours[g[1]] for g in t.subgoals]
        listed = ", ".join(seq[:-1]) + " and " + seq[-1]
        then = ", then ".join(f"the {c} button" for c in seq)
        return tpl.format(seq=listed, then=then)
    if t.family == "push":
        _, obj, region = t.subgoals[0]
        return tpl.format(a=t.colours[obj], r="the " + region_name(t, region))
    obj, target = t.subgoals[0][1], t.subgoals[0][2]
    return tpl.format(a=t.colours[obj], b=t.colours[target])


def _perturb_start(rng, t):
    """Recovery augmentation: start near the nominal contact pose of the first contact-rich event."""
    g = t.subgoals[0]
    if g[0] == "place":
        p = t.pos[g[1]] + [*rng.normal(0, 0.008, 2), rng.uniform(0.005, 0.03)]
    elif g[0] == "press":
        p = np.array([*t.pos[g[1], :2] + rng.normal(0, 0.008, 2), rng.uniform(0.05, 0.08)])
    else:
        return
    t.gripper_start = np.clip(p, WORKSPACE[0], WORKSPACE[1])
    t.recovery_start = True


# --- one world: state and physics (kinematic; the gripper carries, pushes and presses) ---
# The gripper as three boxes: two fingers centred at -+(2 BLOCK_H aperture + FINGER_T) along x from
# the TCP, then the palm around the TCP; centre - GRIPPER_LO and centre + GRIPPER_HI bound them.
GRIPPER_SIDE = np.array([[-1.0, 0, 0], [1, 0, 0], [0, 0, 0]])
GRIPPER_LO = np.array([[FINGER_T, FINGER_Y, FINGER_LOW]] * 2 + [[BODY[0], BODY[1], -BODY[2]]])
GRIPPER_HI = np.array([[FINGER_T, FINGER_Y, FINGER_HIGH]] * 2 + [[BODY[0], BODY[1], BODY[3]]])
GRIPPER_RGB = np.array([(70, 70, 76), (70, 70, 76), (110, 110, 118)], np.float64)


def gripper_boxes(tcp, aperture):
    """TCPs (..., 3) and apertures (...) -> lo, hi (..., 3, 3): the two fingers, then the palm."""
    centre = tcp[..., None, :] + (2 * BLOCK_H * np.asarray(aperture) + FINGER_T)[..., None, None] * GRIPPER_SIDE
    return centre - GRIPPER_LO, centre + GRIPPER_HI


class World:
    def __init__(self, task, cfg):
        self.task, self.cfg = task, cfg
        self.rng = np.random.default_rng([task.seed, 11, FAMILIES.index(task.family), SPLITS.index(task.split)])
        self.kinds, self.pos = task.kinds, task.pos.copy()
        self.blocks, self.buttons = np.flatnonzero(task.kinds == BLOCK), np.flatnonzero(task.kinds == BUTTON)
        self.pressed, self.press_log = np.zeros(len(task.kinds), bool), []
        self.tcp, self.aperture, self.held = task.gripper_start.astype(np.float64).copy(), 1.0, -1
        self.slip_z, self.slips = None, 0
        self.regions = {k: _push_region(task.pos, g[2], 1) for k, g in enumerate(task.subgoals) if g[0] == "push"}
        self.push_start = {k: task.pos[g[1], :2].copy() for k, g in enumerate(task.subgoals) if g[0] == "push"}
        self.latch = np.zeros(len(task.subgoals))
        self.progress = self._progress()
        self.layout = self._box_layout()

    def state(self):
        return np.array([*self.tcp, self.aperture], np.float32)

    def step(self, action):
        new = np.minimum(np.maximum(self.tcp + action[:3] * self.cfg.max_step, WORKSPACE[0]), WORKSPACE[1])
        delta, self.tcp = new - self.tcp, new
        prev, rate = self.aperture, self.cfg.aperture_rate
        a = prev + min(max((0.0 if action[3] > 0 else 1.0) - prev, -rate), rate)
        self.aperture = max(a, 0.5) if self.held >= 0 else a       # fingers rest on a held block
        if self.held < 0 and prev > 0.5 >= self.aperture:          # closing past a block's width
            i = self._block_between_fingers()
            if i >= 0:
                self.held, self.aperture = i, 0.5
                slip = self.rng.random() < self.cfg.slip_prob        # scripted slip during the lift
                self.slip_z = self.tcp[2] + self.rng.uniform(0.02, 0.05) if slip else None
        if self.held >= 0 and self.aperture > 0.55:                 # opening lets go
            self._drop(self.held)
        if self.held >= 0:
            self.pos[self.held] = self.tcp
            if self.slip_z is not None and self.tcp[2] > self.slip_z:
                self.pos[self.held, :2] += np.clip(self.rng.normal(0, 0.005, 2), -0.01, 0.01)
                self._drop(self.held)
                self.slips += 1
        elif np.abs(delta[:2]).max() > 0:
            self._push(delta)
        self._press()
        self.progress = self._progress()

    def _block_between_fingers(self):
        d = np.abs(self.pos - self.tcp)
        ok = (self.kinds == BLOCK) & (d[:, 0] < 0.012) & (d[:, 1] < 0.012) & (d[:, 2] < 0.015)
        return int(np.flatnonzero(ok)[np.argmin(d[ok].sum(1))]) if ok.any() else -1

    def support(self, xy, exclude):
        """Height of the surface under a block centred at xy (table, bowl floor, pad, block top)."""
        z = 0.0
        for j, k in enumerate(self.kinds):
            dx, dy = abs(xy[0] - self.pos[j, 0]), abs(xy[1] - self.pos[j, 1])
            if j == exclude or j == self.held:
                continue
            if k == BLOCK and dx < BLOCK_H and dy < BLOCK_H:
                z = max(z, self.pos[j, 2] + BLOCK_H)
            elif k == BOWL and dx < BOWL_IN and dy < BOWL_IN:
                z = max(z, BOWL_FLOOR)
            elif k == PAD and dx < PAD_H and dy < PAD_H:
                z = max(z, PAD_TOP)
        return z

    def _drop(self, i):
        self.held, self.slip_z = -1, None
        self.pos[i, 2] = self.support(self.pos[i, :2], i) + BLOCK_H

    def finger_boxes(self):           # lo, hi (2, 3): the two fingers around the TCP
        lo, hi = gripper_boxes(self.tcp, self.aperture)
        return lo[:2], hi[:2]

    def _push(self, delta):           # a block a finger overlaps moves with the gripper (sticky push)
        lo_b, hi_b = self.pos[self.blocks] - BLOCK_H, self.pos[self.blocks] + BLOCK_H
        lo, hi = self.finger_boxes()
        touched = ((lo[:, None] < hi_b) & (hi[:, None] > lo_b)).all(2).any(0)
        for j in self.blocks[touched]:
            self.pos[j, :2] = np.clip(self.pos[j, :2] + delta[:2], WORKSPACE[0, :2], WORKSPACE[1, :2])
            self.pos[j, 2] = self.support(self.pos[j, :2], j) + BLOCK_H

    def _press(self):
        for j in self.buttons[~self.pressed[self.buttons]]:
            near = np.abs(self.tcp[:2] - self.pos[j, :2]).max() < BUTTON_H - 0.005
            if near and self.tcp[2] - FINGER_LOW <= BUTTON_TOP + 0.002:
                self.pressed[j] = True
                self.press_log.append(int(j))

    # --- task progress: 0-100, partial credit per sub-step (METHOD.md section 7's rubric) ---
    def subgoal_done(self, k):
        g = self.task.subgoals[k]
        if g[0] == "press":
            seq = [h[1] for h in self.task.subgoals]
            return len(self.press_log) > k and self.press_log[: k + 1] == seq[: k + 1]
        if g[0] == "push":
            return in_region(self.pos[g[1], :2], self.regions[k])
        obj, tgt = g[1], g[2]
        if self.held in (obj, tgt):
            return False
        d = np.abs(self.pos[obj] - self.pos[tgt])
        if self.kinds[tgt] == BOWL:               # where support() puts it on the floor, or on a pile there
            return d[0] < BOWL_IN and d[1] < BOWL_IN and self.pos[obj, 2] < BOWL_FLOOR + 6 * BLOCK_H
        above = self.pos[obj, 2] - self.pos[tgt, 2]     # signed: the target on the named block is not a stack
        return d[0] < 0.015 and d[1] < 0.015 and abs(above - 2 * BLOCK_H) < 0.005

    def _progress(self):
        credit = []
        for k, g in enumerate(self.task.subgoals):
            if self.subgoal_done(k):
                credit.append(1.0)
                continue
            if g[0] == "place":              # grasped 0.25, lifted 0.5, over the target 0.75; lost on a drop
                if self.held == g[1]:
                    over = np.abs(self.tcp[:2] - self.pos[g[2], :2]).max() < 0.02
                    self.latch[k] = max(self.latch[k], 0.25 + 0.25 * (self.tcp[2] > 0.09) + 0.25 * over)
                else:
                    self.latch[k] = 0.0
            elif g[0] == "push":             # moved 0.25, halfway 0.5
                x = self.pos[g[1], :2]
                goal = push_target(self.pos[g[1]], self.regions[k])
                start = np.hypot(*(goal - self.push_start[k]))
                moved = 0.25 * (np.hypot(*(x - self.push_start[k])) > 0.01) + 0.25 * (np.hypot(*(goal - x)) < start / 2)
                self.latch[k] = max(self.latch[k], moved)
            credit.append(self.latch[k])
        return 100.0 * float(sum(credit) / len(credit))     # credits are multiples of 1/4: sums are exact

    @property
    def success(self):
        return all(self.subgoal_done(k) for k in range(len(self.task.subgoals)))

    def _box_layout(self):
        """Each object's render boxes as offsets from its position (bowls also get a darker skin 0.5 mm
        above the top inside the rim; a pressed button sinks and lights up): the arrays boxes() reads."""
        rows = []                     # (owner, lo offset, hi offset, rgb, hi offset and rgb when pressed)
        for j, k in enumerate(self.kinds):
            col = np.array(COLOURS[self.task.colours[j]], np.float64)
            if k == BLOCK:
                rows.append((j, [-BLOCK_H] * 3, [BLOCK_H] * 3, col, [BLOCK_H] * 3, col))
            elif k == BOWL:
                r = BOWL_H - 0.012
                rows.append((j, [-BOWL_H, -BOWL_H, 0], [BOWL_H, BOWL_H, BOWL_TOP], col, [BOWL_H, BOWL_H, BOWL_TOP], col))
                rows.append((j, [-r, -r, BOWL_TOP], [r, r, BOWL_TOP + 0.0005], 0.6 * col, [r, r, BOWL_TOP + 0.0005], 0.6 * col))
            elif k == BUTTON:
                rows.append((j, [-BUTTON_H, -BUTTON_H, 0], [BUTTON_H, BUTTON_H, BUTTON_TOP], 0.75 * col,
                             [BUTTON_H, BUTTON_H, BUTTON_PRESSED_TOP], 0.45 * col + 0.55 * 255))
            else:
                c = 0.6 * col + 0.4 * TABLE_RGB[1]
                rows.append((j, [-PAD_H, -PAD_H, 0], [PAD_H, PAD_H, PAD_TOP], c, [PAD_H, PAD_H, PAD_TOP], c))
        return tuple(np.array(x, np.float64) if i else np.array(x) for i, x in enumerate(zip(*rows)))

    def boxes(self):
        """The objects' render boxes: lo, hi (N, 3), rgb (N, 3) (the gripper's come from gripper_boxes)."""
        owner, lo, hi, rgb, hi_pressed, rgb_pressed = self.layout
        pressed, pos = self.pressed[owner][:, None], self.pos[owner]
        return pos + lo, pos + np.where(pressed, hi_pressed, hi), np.where(pressed, rgb_pressed, rgb)


# --- the batched environment: one call advances and renders many worlds ---
class TabletopEnv:
    """A batch of worlds. `observe()` and `step(action)` work on all worlds or on a subset `idx`."""
    views = ("scene", "wrist")

    def __init__(self, tasks, cfg=WorldConfig()):
        self.cfg, self.tasks = cfg, list(tasks)
        self.worlds = [World(t, cfg) for t in self.tasks]
        self.cameras = make_cameras(cfg.image_size)
        self.intrinsics = np.stack([c.intrinsics for c in self.cameras]).astype(np.float32)   # (V, 4)

    def __len__(self):
        return len(self.worlds)

    def reset_world(self, i, task):
        self.tasks[i], self.worlds[i] = task, World(task, self.cfg)

    def step(self, action, idx=None, render=True):
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        action = np.asarray(action)
        if action.shape != (len(idx), 4) or not np.issubdtype(action.dtype, np.number):
            raise ValueError(f"TabletopEnv.step: action must be a numeric array of shape ({len(idx)}, 4) "
                             f"(dx, dy, dz, grip), found {action.dtype} {action.shape}")
        bad = ~np.isfinite(action).all(1)
        if bad.any():
            raise ValueError(f"TabletopEnv.step: action has NaN or inf for world(s) {idx[bad].tolist()}")
        action = np.clip(action.astype(np.float64), -1, 1)
        for i, a in zip(idx, action):
            self.worlds[i].step(a)
        return self.observe(idx, render)

    def cam_poses(self, idx):          # (b, V, 4, 4)
        scene, wrist = self.cameras
        poses = np.repeat(np.stack([scene.pose(SCENE_ORIGIN), wrist.pose(np.zeros(3))])[None], len(idx), 0)
        poses[:, 1, :3, 3] = np.array([self.worlds[i].tcp for i in idx]) + WRIST_OFFSET   # rides on the TCP
        return poses.astype(np.float32)

    def observe(self, idx=None, render=True):
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        obs = {"state": np.stack([self.worlds[i].state() for i in idx]), "cam_pose": self.cam_poses(idx),
               "intrinsics": self.intrinsics,
               "progress": np.array([self.worlds[i].progress for i in idx], np.float32),
               "success": np.array([self.worlds[i].success for i in idx])}
        if render:
            obs["frames"] = self.render(idx)
        return obs

    def render(self, idx):
        """(b, V, H, W, 3) uint8: the scene and wrist views of worlds idx."""
        parts = [self.worlds[i].boxes() for i in idx]
        n = max(len(p[0]) for p in parts)
        lo, hi, rgb = (np.zeros((len(idx), n + 3, 3)) for _ in range(3))      # padding: empty boxes
        for b, (l, h, c) in enumerate(parts):
            lo[b, :len(l)], hi[b, :len(l)], rgb[b, :len(l)] = l, h, c
        # the gripper after every object (on equal depth the lower box index wins, so the order matters)
        tcp = np.array([self.worlds[i].tcp for i in idx])
        lo[:, n:], hi[:, n:] = gripper_boxes(tcp, [self.worlds[i].aperture for i in idx])
        rgb[:, n:] = GRIPPER_RGB
        hi_w = hi.copy()
        hi_w[:, -1] = lo[:, -1]                                               # the palm hides from its own camera
        scene, wrist = self.cameras
        labels = np.empty((len(idx), 2, scene.size, scene.size), np.intp)     # (b, V, H, W)
        labels[:, 0] = _labels(scene, np.broadcast_to(SCENE_ORIGIN, tcp.shape), lo, hi)
        labels[:, 1] = _labels(wrist, tcp + WRIST_OFFSET, lo, hi_w)
        return _colour(_palette(rgb), labels)


# --- the scripted expert's planner, which is also the oracle planner ---
# One function of the world's state names the event to execute next, so the expert is closed
# loop and the same answer serves as the "person or agent" that names the next event (METHOD.md
# section 6) during event-mode evaluation of a learned policy.
SKILLS = ("reach", "align", "close", "lift", "move", "lower", "release", "retreat", "press", "push")
L1_TEXTS = {  # caption form -> templates; the first is canonical (reasoning traces, the oracle)
    "reach": ["reach the {o}", "move above the {o}", "go to the {o}"],
    "align": ["lower onto the {o}", "align the gripper with the {o}", "descend to the {o}"],
    "close": ["close the gripper on the {o}", "grasp the {o}", "grip the {o}"],
    "close_empty": ["close the gripper", "shut the gripper", "close the fingers"],
    "lift": ["lift the {o}", "raise the {o}", "pick up the {o}"],
    "move": ["move the {o} over the {t}", "carry the {o} to the {t}", "bring the {o} above the {t}"],
    "lower": ["lower the {o} onto the {t}", "set the {o} down on the {t}", "bring the {o} down to the {t}"],
    "lower_behind": ["lower the gripper behind the {o}", "descend behind the {o}", "drop down behind the {o}"],
    "release": ["release the {o}", "let go of the {o}", "open the gripper to drop the {o}"],
    "release_empty": ["open the gripper", "open the fingers", "let the gripper open"],
    "retreat": ["raise the gripper", "move the gripper up", "lift the empty gripper"],
    "press": ["press the {o}", "push down on the {o}", "press down the {o}"],
    "push": ["push the {o} to the {t}", "slide the {o} to the {t}", "shove the {o} toward the {t}"],
}
L2_OF = {"reach": "approach", "align": "approach", "retreat": "approach", "close": "grasp", "lift": "grasp",
         "move": "transport", "lower": "place", "release": "place", "press": "press", "push": "push"}
L2_TEXTS = {"approach": "approach the {o}", "grasp": "grasp the {o}", "transport": "transport the {o} to the {t}",
            "place": "place the {o} on the {t}", "press": "press the {o}", "push": "push the {o} to the {t}"}


@dataclass
class Plan:
    form: str                        # key of L1_TEXTS
    obj: int                         # object acted on, or -1
    subgoal: int

    @property
    def skill(self):
        return self.form.split("_")[0]


def place_z(w, tgt, obj):            # TCP height from which the held block obj is released onto tgt
    return w.support(w.pos[tgt, :2], obj) + BLOCK_H + 0.01


def pre_push(w, k):                  # (block xy, push direction, TCP xy behind the block)
    x = w.pos[w.task.subgoals[k][1], :2]
    d = push_target(w.pos[w.task.subgoals[k][1]], w.regions[k]) - x
    d = d / max(np.hypot(*d), 1e-9)
    return x, d, x - 0.075 * d


def plan_next(w):
    """The event the expert executes next from this state, or None when the task is done."""
    open_ = [k for k in range(len(w.task.subgoals)) if not w.subgoal_done(k)]
    if not open_:
        return None
    k, g = open_[0], w.task.subgoals[open_[0]]
    p, high = w.tcp, w.tcp[2] > SAFE_Z - 0.01
    near = lambda xy, tol: np.hypot(*(p[:2] - xy)) < tol
    if g[0] == "press":
        if near(w.pos[g[1], :2], 0.02):
            return Plan("press", g[1], k)
        return Plan("reach", g[1], k) if high else Plan("retreat", -1, k)
    if g[0] == "push":
        x, d, pre = pre_push(w, k)
        rel = p[:2] - x
        behind = np.dot(rel, d) < -0.03 and abs(d[0] * rel[1] - d[1] * rel[0]) < 0.015
        if p[2] < PUSH_Z + 0.01 and behind and w.aperture < 0.05:
            return Plan("push", g[1], k)
        if near(pre, 0.02) and p[2] > PUSH_Z + 0.005:
            return Plan("close_empty", -1, k) if w.aperture > 0.05 else Plan("lower_behind", g[1], k)
        return Plan("reach", g[1], k) if high else Plan("retreat", -1, k)
    obj, tgt = g[1], g[2]
    if w.held == obj:
        if near(w.pos[tgt, :2], 0.02):
            return Plan("lower", obj, k) if p[2] > place_z(w, tgt, obj) + 0.008 else Plan("release", obj, k)
        return Plan("move", obj, k) if high else Plan("lift", obj, k)
    if w.held >= 0 or w.aperture < 0.95:
        return Plan("release_empty", -1, k)
    if near(w.pos[obj, :2], 0.025):
        return Plan("close", obj, k) if np.linalg.norm(p - w.pos[obj]) < 0.006 else Plan("align", obj, k)
    return Plan("reach", obj, k) if high else Plan("retreat", -1, k)


def caption(w, plan, variant=0):
    """(text, meaning) of an L1 event; meaning = {skill, object, target} as plain names."""
    g = w.task.subgoals[plan.subgoal]
    o = name_of(w.task, plan.obj) if plan.obj >= 0 else ""
    t = (name_of(w.task, g[2]) if g[0] == "place" else region_name(w.task, g[2]) if g[0] == "push" else "")
    if plan.skill in ("reach", "align", "close", "lift", "press", "retreat"):
        t = ""
    text = L1_TEXTS[plan.form][variant % len(L1_TEXTS[plan.form])].format(o=o, t=t)
    return text, {"skill": plan.skill, "object": o, "target": t}


def oracle_next_event(w):
    """The L1 caption of the event the expert would execute next from this state (or None)."""
    plan = plan_next(w)
    return None if plan is None else dict(zip(("text", "meaning"), caption(w, plan)))


def reasoning_trace(w, plan):
    """A short textual reasoning trace: scene facts; status; what comes next."""
    task, g = w.task, w.task.subgoals[plan.subgoal]
    if g[0] == "press":
        seq = [task.colours[h[1]] for h in task.subgoals]
        done = [task.colours[j] for j in w.press_log] or ["none"]
        facts, status = "order: " + ", ".join(seq), "pressed: " + ", ".join(done)
    else:
        obj = g[1]
        if g[0] == "push":
            goal = push_target(w.pos[obj], w.regions[plan.subgoal])
            facts = f"{name_of(task, obj)} {100 * np.hypot(*(goal - w.pos[obj, :2])):.0f} cm from {region_name(task, g[2])}"
        else:
            dx, dy = w.pos[obj, :2] - w.pos[g[2], :2]
            rel = ("left of" if dx < 0 else "right of") if abs(dx) > abs(dy) else ("in front of" if dy < 0 else "behind")
            facts = f"{name_of(task, obj)} {rel} {name_of(task, g[2])}"
            if task.family == "put_all":
                left = sum(not w.subgoal_done(k) for k in range(len(task.subgoals)))
                facts += f"; {left} {task.colours[obj]} blocks left"
        status = "holding: " + (name_of(task, w.held) if w.held >= 0 else "nothing")
    return f"{facts}; {status}; next: {caption(w, plan)[0]}"


# --- the scripted expert: phased controllers with stochastic speed, pauses and noise ---
@dataclass
class Event:
    plan: Plan
    start: int
    speed: float
    variant: int
    recovery: str                    # "" or the kind of recovery ("slip", "start")
    anchor: np.ndarray               # TCP at the event's start
    fine: int = -1                   # first step of the final fine adjustment (reach and move)
    motion_end: int = -1             # first step of the trailing pause
    end: int = -1
    pause_left: int = 0


def _norm(v):                         # np.linalg.norm's own formula for a vector, without its overhead
    return math.sqrt(v.dot(v))


class Expert:
    """Drives a batch of worlds; records events, captions and reasoning traces per world."""

    def __init__(self, env, cfg=ExpertConfig()):
        self.env, self.cfg = env, cfg
        self.rng, self.events, self.traces, self.recovering, self.slips_seen, self.t = ([None] * len(env) for _ in range(6))
        for i in range(len(env)):
            self.reset_world(i)

    def reset_world(self, i):
        task = self.env.worlds[i].task
        self.rng[i] = np.random.default_rng([task.seed, 23, FAMILIES.index(task.family), SPLITS.index(task.split)])
        self.events[i], self.traces[i], self.slips_seen[i], self.t[i] = [], [], 0, 0
        self.recovering[i] = "start" if task.recovery_start else ""

    def goal(self, w, ev):
        """Where the TCP should go during this event (recomputed from the state every step)."""
        s, g = ev.plan.skill, w.task.subgoals[ev.plan.subgoal]
        if s == "reach":
            xy = pre_push(w, ev.plan.subgoal)[2] if g[0] == "push" else w.pos[ev.plan.obj, :2]
            return np.array([*xy, SAFE_Z])
        if s in ("lift", "retreat"):
            return np.array([*ev.anchor[:2], SAFE_Z])
        if s == "align":
            return w.pos[ev.plan.obj].copy()
        if s == "move":
            return np.array([*w.pos[g[2], :2], SAFE_Z])
        if s == "lower":
            if g[0] == "push":
                return np.array([*pre_push(w, ev.plan.subgoal)[2], PUSH_Z])
            return np.array([*w.pos[g[2], :2], place_z(w, g[2], g[1])])
        if s == "press":
            return np.array([*w.pos[ev.plan.obj, :2], BUTTON_TOP + FINGER_LOW - 0.004])
        if s == "push":
            x = w.pos[ev.plan.obj]
            return np.array([*(w.tcp[:2] + push_target(x, w.regions[ev.plan.subgoal]) - x[:2]), PUSH_Z])
        return ev.anchor.copy()                                   # close, release: hold still

    def finished(self, w, ev, goal, t):
        s = ev.plan.skill
        if t - ev.start >= 80:                                     # a stuck event ends and re-plans
            return True
        if s == "close":
            return w.held >= 0 or w.aperture <= 0.0
        if s == "release":
            return w.aperture >= 1.0
        if s == "press":
            return bool(w.pressed[ev.plan.obj])
        if s == "push":
            return w.subgoal_done(ev.plan.subgoal)
        return _norm(goal - w.tcp) < 0.003

    def act(self, idx=None):
        """Actions (b, 4) for worlds idx; opens and closes events as they finish."""
        idx = range(len(self.env)) if idx is None else idx
        return np.stack([self._act_one(i) for i in idx])

    def _act_one(self, i):
        w, rng, evs, t = self.env.worlds[i], self.rng[i], self.events[i], self.t[i]
        self.t[i] += 1
        if w.slips > self.slips_seen[i]:
            self.slips_seen[i], self.recovering[i] = w.slips, "slip"
        ev = evs[-1] if evs and evs[-1].end < 0 else None
        if ev is not None and ev.pause_left == 0 and ev.motion_end < 0 and self.finished(w, ev, self.goal(w, ev), t):
            ev.motion_end = t
            if rng.random() < self.cfg.pause_prob:
                ev.pause_left = int(rng.integers(self.cfg.pause_steps[0], self.cfg.pause_steps[1] + 1))
        if ev is not None and ev.motion_end >= 0 and ev.pause_left == 0:
            ev.end, ev = t, None
            if self.recovering[i] and (w.held >= 0 or w.task.subgoals[0][0] != "place"):
                self.recovering[i] = ""
        grip_keep = 1.0 if w.aperture < 0.5 else -1.0
        if ev is None:
            plan = plan_next(w)
            if plan is None:
                return np.array([0, 0, 0, grip_keep])
            ev = Event(plan, t, float(rng.uniform(*self.cfg.speed)), int(rng.integers(3)), self.recovering[i], w.tcp.copy())
            evs.append(ev)
            self.traces[i].append({"frame": t, "text": reasoning_trace(w, plan)})
        grip = {"close": 1.0, "lift": 1.0, "move": 1.0, "push": 1.0, "release": -1.0}.get(ev.plan.skill, grip_keep)
        if ev.plan.skill == "lower":
            grip = 1.0
        if ev.pause_left > 0:                                      # a pause: hold still
            ev.pause_left -= 1
            return np.array([0, 0, 0, grip])
        goal = self.goal(w, ev)
        if ev.fine < 0 and ev.plan.skill in ("reach", "move") and np.hypot(*(goal - w.tcp)[:2]) < 0.02:
            ev.fine = t
        step = (goal - w.tcp) / self.env.cfg.max_step
        n = _norm(step)
        if n > ev.speed:
            step *= ev.speed / n
        step = step + rng.normal(0, self.cfg.action_noise, 3)
        return np.minimum(np.maximum(np.append(step, grip), -1), 1)

    def captions(self, i, T):
        """Four nested caption levels for world i's episode of T actions (intervals [start, end))."""
        w, evs = self.env.worlds[i], self.events[i]
        task = w.task
        if evs and evs[-1].end < 0:
            evs[-1].end = T
            evs[-1].motion_end = T if evs[-1].motion_end < 0 else evs[-1].motion_end
        L1, L0, L2 = [], [], []
        for ev in evs:
            text, meaning = caption(w, ev.plan, ev.variant)
            L1.append({"start": ev.start, "end": ev.end, "text": text, **meaning, "recovery": ev.recovery})
            canon = caption(w, ev.plan)[0]
            prefix = {"slip": "re-grasp after slip: ", "start": "recover from a perturbed start: "}.get(ev.recovery, "")
            cuts = [(ev.start, prefix + canon)]
            if ev.start + 2 <= ev.fine <= ev.motion_end - 2:
                cuts.append((ev.fine, prefix + "fine-adjust: " + canon))
            if ev.motion_end < ev.end:
                cuts.append((ev.motion_end, "pause"))
            for (s, txt), e in zip(cuts, [c[0] for c in cuts[1:]] + [ev.end]):
                L0.append({"start": s, "end": e, "text": txt, **meaning})
            g = task.subgoals[ev.plan.subgoal]
            l2 = "grasp" if ev.recovery == "slip" and g[0] == "place" else L2_OF[ev.plan.skill]
            o = name_of(task, g[1])
            tgt = name_of(task, g[2]) if g[0] == "place" else region_name(task, g[2]) if g[0] == "push" else ""
            if L2 and L2[-1]["_key"] == (ev.plan.subgoal, l2):
                L2[-1]["end"] = ev.end
            else:
                L2.append({"start": ev.start, "end": ev.end, "text": L2_TEXTS[l2].format(o=o, t=tgt),
                           "skill": l2, "object": o, "target": tgt if l2 in ("transport", "place", "push") else "",
                           "_key": (ev.plan.subgoal, l2)})
        for c in L2:
            del c["_key"]
        g0 = task.subgoals[0]
        target = name_of(task, g0[2]) if g0[0] == "place" else region_name(task, g0[2]) if g0[0] == "push" else ""
        L3 = [{"start": 0, "end": T, "text": task.instruction, "skill": task.family,
               "object": name_of(task, g0[1]), "target": target}]
        return {"L3": L3, "L2": L2, "L1": L1, "L0": L0}


def lookahead(actions, shots, k_p):
    """An expert lookahead's actions (L, 4) float32 and its observations after actions k_p, 2 k_p, ..., L
    (shots: {actions taken: a one-world observation}; None: no observations, for a caller that needs
    only the length)."""
    if shots is None:
        return np.stack(actions).astype(np.float32), None
    L = len(actions)
    rows = np.minimum(np.arange(1, math.ceil(L / k_p) + 1) * k_p, L)
    return np.stack(actions).astype(np.float32), [{k: shots[r][k][0] for k in ("frames", "cam_pose", "state")} for r in rows]


def expert_future(w, steps=None, limit=80, k_p=1, frames=True):
    """What a scripted expert started at world w would do; w is left untouched (the expert acts on a
    copy). steps None: its next event, up to the end of the event's motion, at least 1 and at most
    `limit` actions; otherwise exactly `steps` actions. Returns its actions (L, 4) and the
    observations (frames, cam_pose, state) after every k_p-th action and after the last: the future frames
    tau = 1..ceil(L / k_p) of a window anchored at w (frames False: None, and nothing is rendered).
    These are data.event_window's rows when no step of the event is pruned. Training also prunes
    quasi-static steps inside an event (here only the trailing pause is left out) and splits events
    longer than the maximum evenly (here they are cut at `limit`). A diagnostic: evaluation's `_told` modes give a policy these frames in place of its
    own video."""
    env = TabletopEnv([w.task], w.cfg)
    env.worlds[0] = copy.deepcopy(w)
    expert, actions, shots = Expert(env), [], {}
    while len(actions) < (limit if steps is None else steps):
        a = expert.act([0])
        evs = expert.events[0]
        if steps is None and actions and (not evs or evs[0].motion_end >= 0):
            break                                                 # a's step belongs to what comes next
        actions.append(a[0])
        obs = env.step(a, [0], render=frames and len(actions) % k_p == 0)
        if len(actions) % k_p == 0:
            shots[len(actions)] = obs
    if frames and len(actions) % k_p:
        shots[len(actions)] = env.observe([0])
    return lookahead(actions, shots if frames else None, k_p)


# --- episodes: the expert's rollouts in the project's episode record (METHOD.md section 8) ---
@dataclass
class Episode:
    frames: np.ndarray               # (T+1, V, H, W, 3) uint8; frame t is observed before action t
    state: np.ndarray                # (T+1, 4) float32: TCP x, y, z, gripper aperture
    action: np.ndarray               # (T, 4) float32: dx, dy, dz, grip in [-1, 1]
    intrinsics: np.ndarray           # (V, 4) float32: fx, fy, cx, cy
    cam_pose: np.ndarray             # (T+1, V, 4, 4) float32: world-from-camera
    labels: dict                     # per-frame int32 (T+1,): skill, l1, l2, subgoal, recovery, held
    progress: np.ndarray             # (T+1,) float32, 0-100
    meta: dict = field(default_factory=dict)


def run_expert(tasks, world_cfg=WorldConfig(), expert_cfg=ExpertConfig(), render=True, batch=32):
    """Roll the expert out on every task, `batch` worlds stepping together; a world that finishes
    takes the next task, so the batch stays full. Returns one Episode per task, in order."""
    tasks, episodes = list(tasks), [None] * len(tasks)
    if not tasks:
        return episodes
    slots = list(range(min(batch, len(tasks))))              # slots[b] = index of the task world b runs
    env = TabletopEnv([tasks[k] for k in slots], world_cfg)
    expert, rec = Expert(env, expert_cfg), [None] * len(slots)

    def begin(b):
        obs = env.observe([b], render=render)
        rec[b] = {k: [v[0]] for k, v in obs.items() if k != "intrinsics"} | {"held": [False], "action": []}

    def finish(b):                                           # True when slot b has a new task to run
        episodes[slots[b]] = _episode(env, expert, b, rec[b])
        nxt = max(slots) + 1
        if nxt >= len(tasks):
            slots[b] = -1
            return False
        slots[b] = nxt
        env.reset_world(b, tasks[nxt])
        expert.reset_world(b)
        begin(b)
        return True

    for b in range(len(slots)):
        begin(b)
    active = [b for b in range(len(slots)) if not env.worlds[b].success or finish(b)]
    while active:
        act = expert.act(active)
        obs = env.step(act, active, render=render)
        for j, b in enumerate(active):
            rec[b]["action"].append(act[j])
            rec[b]["held"].append(env.worlds[b].held >= 0)
            for k in obs:
                if k != "intrinsics":
                    rec[b][k].append(obs[k][j])
        active = [b for b in active if not (env.worlds[b].success or expert.t[b] >= world_cfg.horizon) or finish(b)]
    return episodes


def _episode(env, expert, b, rec):
    w, actions, T = env.worlds[b], rec["action"], len(rec["action"])
    caps = expert.captions(b, T)
    labels = {k: np.zeros(T + 1, np.int32) for k in ("skill", "l1", "l2", "subgoal", "recovery")}
    for level, key in (("L1", "l1"), ("L2", "l2")):
        for n, c in enumerate(caps[level]):
            labels[key][c["start"]:c["end"]] = n
    for ev, c in zip(expert.events[b], caps["L1"]):
        sl = slice(ev.start, ev.end)
        labels["skill"][sl], labels["subgoal"][sl], labels["recovery"][sl] = SKILLS.index(ev.plan.skill), ev.plan.subgoal, bool(ev.recovery)
    for k in labels:                                             # the last frame follows the last action
        labels[k][T] = labels[k][T - 1] if T else 0
    state = np.stack(rec["state"])
    labels["held"] = np.array(rec["held"], np.int32)
    task = w.task
    meta = {"instruction": task.instruction, "family": task.family, "split": task.split, "seed": task.seed,
            "world_version": WORLD_VERSION, "template": task.template, "success": bool(w.success),
            "recovery_start": task.recovery_start, "slips": w.slips, "captions": caps,
            "reasoning": expert.traces[b], "named": [list(c) for c in task.named],
            "views": list(env.views), "image_size": env.cfg.image_size}
    return Episode(np.stack(rec["frames"]) if "frames" in rec else None, state,
                   np.array(actions, np.float32).reshape(T, 4), env.intrinsics.copy(), np.stack(rec["cam_pose"]),
                   labels, np.array(rec["progress"], np.float32), meta)


# --- pictures (standard library only): eval.py reuses save_png for its strips ---
def save_png(path, image):
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    image = np.ascontiguousarray(image, np.uint8)
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))
    chunk = lambda tag, data: struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def episode_strip(ep, n=8, scale=2):
    """Views stacked vertically, n frames evenly spaced along the episode side by side."""
    T = len(ep.frames) - 1
    cols = [np.concatenate(list(ep.frames[t]), 0) for t in np.linspace(0, T, n).round().astype(int)]
    strip = np.concatenate(cols, 1)
    return strip.repeat(scale, 0).repeat(scale, 1)


# --- command line: the expert's table and a picture ---
def expert_table(episodes, seed=0, families=FAMILIES, splits=SPLITS, world=WorldConfig(), expert=ExpertConfig()):
    """Expert success and mean progress and length per family x split, without rendering."""
    rows = []
    for fam in families:
        for split in splits:
            tasks = [make_task(fam, split, seed + s, expert.recovery_alpha) for s in range(episodes)]
            eps = run_expert(tasks, world, expert, render=False)
            rows.append({"family": fam, "split": split, "episodes": episodes,
                         "success": float(np.mean([e.meta["success"] for e in eps])),
                         "progress": float(np.mean([e.progress[-1] for e in eps])),
                         "length": float(np.mean([len(e.action) for e in eps])),
                         "slips": int(sum(e.meta["slips"] for e in eps)),
                         "recovery_starts": int(sum(e.meta["recovery_start"] for e in eps))})
    return rows


def main(argv=None):
    import argparse                  # not tyro: the world stays numpy and standard library only
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="expert success per family x split (markdown)")
    t.add_argument("--episodes", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("show", help="save a PNG strip of one expert episode")
    s.add_argument("--family", default="pick_place", choices=FAMILIES)
    s.add_argument("--split", default="seen", choices=SPLITS)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--out", default="episode.png")
    args = ap.parse_args(argv)
    if args.cmd == "table":
        rows = expert_table(args.episodes, args.seed)
        print("| family | split | episodes | success | progress | mean length | slips | recovery starts |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['family']} | {r['split']} | {r['episodes']} | {r['success']:.2f} | {r['progress']:.1f} "
                  f"| {r['length']:.0f} | {r['slips']} | {r['recovery_starts']} |")
        worst = min(r["success"] for r in rows)
        print(f"\nlowest success over all cells: {worst:.2f}")
    else:
        task = make_task(args.family, args.split, args.seed)
        ep = run_expert([task], WorldConfig(image_size=args.size))[0]
        save_png(args.out, episode_strip(ep))
        print(f"{task.instruction!r}: {len(ep.action)} steps, success {ep.meta['success']}; wrote {args.out}")


if __name__ == "__main__":
    main()


# --- Meta-World (optional extra) ---
# Meta-World v3 (MuJoCo, Yu et al. 2019; the `metaworld` package 3.1.1) as an external benchmark:
# its scripted expert recorded in the episode record above, so data.py, train.py and eval.py take
# it unchanged. Install: `pip install -r requirements-metaworld.txt`; metaworld and mujoco are
# imported only inside these functions. Headless rendering goes through EGL (Mesa's llvmpipe on
# a CPU, Debian `libegl1`) unless MUJOCO_GL says otherwise (`osmesa` needs `libosmesa6`).
#
# Frame: Meta-World's own world frame, in metres: the table top is z = 0, z up, y away from the
# robot's base, x to its right. Cameras follow METHOD.md section 8 (OpenCV axes, world-from-camera
# poses). Action: (dx, dy, dz, grip) in [-1, 1], as in the embedded world (grip > 0 closes); a
# unit moves the hand's mocap target 1 cm (SawyerXYZEnv.action_scale = 1/100). State: hand
# (x, y, z), the finger opening (1 open, 0 closed), then the goal (x, y, z) for tasks whose goal
# cannot be seen (pick-place), zeros else, so that every task has the same S = 7.
MW_VERSION = "metaworld-3.1.1"
MW_INSTALL = "pip install -r requirements-metaworld.txt"
MW_TASKS = ("assembly", "bin-picking", "hammer", "shelf-place", "basketball", "drawer-open",
            "button-press-topdown", "window-open", "pick-place")
MW_HIDDEN_GOAL = ("pick-place",)      # the goal is an invisible site: it goes into the state
MW_STATE_DIM = 7
MW_CONFIGS = 50                       # configurations per MT1(task, seed) (metaworld's _N_GOALS)
MW_EVAL_SEED = 1000                   # evaluation: the 50 configurations of MT1(task, seed=1000)
MW_NOISE = 0.1                        # std of the Gaussian noise on the expert's xyz action (action units)
# Cameras (names in Meta-World's sawyer model): the scene camera `corner4` looks at the table from
# the robot's right; like every `corner` camera its up axis points down, so its image is rotated by
# 180 degrees (and its pose with it). `gripperPOV` rides on the hand and looks straight down.
MW_CAMERAS = (("corner4", True), ("gripperPOV", False))   # (name, rotate 180 degrees): scene, wrist

# Event vocabulary shared by the nine tasks; each skill names its caption form (the embedded
# world's L1_TEXTS where the meaning is the same, so captions and paraphrases are shared) and its
# L2 subtask: MW_SKILLS[skill] = (caption form, L2 subtask).
MW_L1_TEXTS = {
    "strike": ["hit the {t} with the {o}", "drive the {t} in with the {o}", "hammer the {t} with the {o}"],
    "pull": ["pull the {o} back", "pull the {o} toward the robot", "draw the {o} out"],
    "open": ["slide the {o} open", "push the {o} to the side", "slide the {o} to the right"],
}
MW_SKILLS = {"reach": ("reach", "approach"), "descend": ("align", "approach"), "grasp": ("close", "grasp"),
             "lift": ("lift", "grasp"), "transport": ("move", "transport"), "place": ("lower", "place"),
             "push": ("push", "push"), "strike": ("strike", "strike"), "pull": ("pull", "pull"),
             "press": ("press", "press"), "open": ("open", "open")}
MW_SKILL_NAMES = tuple(MW_SKILLS)
MW_OBJECTS = {"assembly": ("nut", "peg"), "bin-picking": ("cube", "blue bin"), "hammer": ("hammer", "nail"),
              "shelf-place": ("block", "shelf"), "basketball": ("ball", "hoop"), "drawer-open": ("drawer handle", ""),
              "button-press-topdown": ("button", ""), "window-open": ("window handle", ""), "pick-place": ("puck", "goal")}
MW_INSTRUCTIONS = {   # L3: paraphrases of each task, written for this project
    "assembly": ["put the nut on the peg", "place the ring over the peg", "assemble the nut onto the peg",
                 "pick up the nut and drop it onto the peg"],
    "bin-picking": ["put the cube in the blue bin", "move the cube from the red bin to the blue bin",
                    "pick the cube out of the red bin and place it in the blue one", "transfer the cube to the blue bin"],
    "hammer": ["hammer the nail in", "drive the nail in with the hammer", "pick up the hammer and hit the nail",
               "use the hammer to push the nail into the wall"],
    "shelf-place": ["put the block on the shelf", "place the blue block onto the shelf",
                    "pick up the block and set it on the shelf", "move the block onto the shelf"],
    "basketball": ["dunk the ball into the hoop", "put the ball in the basket",
                   "pick up the ball and drop it through the hoop", "score a basket with the ball"],
    "drawer-open": ["open the drawer", "pull the drawer open", "slide the drawer out", "pull out the drawer"],
    "button-press-topdown": ["press the button from the top", "push the button down", "press down on the button",
                             "push the button from above"],
    "window-open": ["open the window", "slide the window open", "push the window open to the right",
                    "open the sliding window"],
    "pick-place": ["pick up the puck and place it at the goal", "move the puck to the goal position",
                   "put the puck at the target", "carry the puck to the goal"],
}


def _metaworld():
    """(metaworld, mujoco, the expert policies by environment name), or an error naming the extra."""
    os.environ.setdefault("MUJOCO_GL", "egl")          # read by mujoco at import: headless rendering
    try:
        import metaworld
        import mujoco
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as e:
        raise ImportError(f"Meta-World is an optional extra ({e}); install it with `{MW_INSTALL}`; headless "
                          f"rendering needs libegl1 (MUJOCO_GL=egl) or libosmesa6 (MUJOCO_GL=osmesa)") from None
    return metaworld, mujoco, ENV_POLICY_MAP


# The expert's phase. Meta-World's scripted policies choose a target position by a chain of tests
# on the observation, but do not say which test fired. Each function below repeats that chain for
# one task, with the same offsets and thresholds (read from metaworld/policies/
# sawyer_<task>_v3_policy.py, `_desired_pos`, version 3.1.1), and names each branch with a skill.
# A descent during which the policy's grip command closes the fingers is the grasp.
def _xy(a, b):
    return math.hypot(a[0] - b[0], a[1] - b[1])


def _down(grip):
    return "grasp" if grip > 0 else "descend"


def _phase_assembly(o, grip):
    hand, nut, peg = o[:3], o[4:7] + (-0.02, 0, 0), o[-3:] + (0.12, 0, 0.14)
    if _xy(hand, nut) > 0.02:
        return "reach"
    if _xy(hand, peg) <= 0.02:
        return "place"
    if abs(hand[2] - nut[2]) > 0.05:
        return _down(grip)
    return "lift" if abs(hand[2] - peg[2]) > 0.04 else "transport"


def _phase_bin_picking(o, grip):
    hand, cube = o[:3], o[4:7] + (0, 0, 0.03)
    cube[1] = min(max(cube[1], 0.675), 0.725)             # the policy aims at the bin's middle in y
    if _xy(hand, cube) > 0.02:
        return "reach"
    if abs(hand[2] - cube[2]) > 0.01:
        return _down(grip)
    if _xy(hand, (0.12, 0.7)) > 0.02:                     # the blue bin's centre
        return "lift" if hand[2] < 0.15 else "transport"
    return "place"


def _phase_hammer(o, grip):
    hand, handle, nail = o[:3], o[4:7] + (-0.04, 0, -0.01), (0.05, 0.71, 0.16)
    if _xy(hand, handle) > 0.04:
        return "reach"
    if abs(hand[2] - handle[2]) > 0.05 and handle[2] < 0.03:
        return _down(grip)
    return "lift" if math.hypot(hand[0] - nail[0], hand[2] - nail[2]) > 0.02 else "strike"


def _phase_shelf_place(o, grip):
    hand, block, shelf_x = o[:3], o[4:7] + (-0.005, 0, 0.015), o[-3]
    if _xy(hand, block) > 0.04:
        return "reach"
    if abs(hand[2] - block[2]) > 0.04:
        return _down(grip)
    if abs(hand[0] - shelf_x) > 0.02:
        return "transport"
    return "lift" if hand[2] < 0.30 else "push"


def _phase_basketball(o, grip):
    hand, ball = o[:3], o[4:7] + (0, 0, 0.01)
    if _xy(hand, ball) > 0.04:
        return "reach"
    if abs(hand[2] - ball[2]) > 0.025:
        return _down(grip)
    return "lift" if abs(ball[2] - 0.35) > 0.025 else "transport"    # 0.35: the hoop's height


def _phase_drawer_open(o, grip):
    hand, handle = o[:3], o[4:7] + (0, 0, -0.02)
    if _xy(hand, handle) > 0.06:
        return "reach"
    return "descend" if abs(hand[2] - handle[2]) > 0.04 else "pull"


def _phase_button_press_topdown(o, grip):
    return "reach" if _xy(o[:3], o[4:7]) > 0.04 else "press"


def _phase_window_open(o, grip):
    hand, handle = o[:3], o[4:7] + (-0.03, -0.03, -0.08)
    if _xy(hand, handle) > 0.04:
        return "reach"
    return "descend" if abs(hand[2] - handle[2]) > 0.02 else "open"


def _phase_pick_place(o, grip):
    hand, puck = o[:3], o[4:7] + (-0.005, 0, 0)
    if _xy(hand, puck) > 0.02:
        return "reach"
    if abs(hand[2] - puck[2]) > 0.05 and puck[2] < 0.04:
        return _down(grip)
    return "grasp" if o[3] > 0.73 else "transport"        # the policy waits for the fingers to close


MW_PHASES = {"assembly": _phase_assembly, "bin-picking": _phase_bin_picking, "hammer": _phase_hammer,
             "shelf-place": _phase_shelf_place, "basketball": _phase_basketball, "drawer-open": _phase_drawer_open,
             "button-press-topdown": _phase_button_press_topdown, "window-open": _phase_window_open,
             "pick-place": _phase_pick_place}


def mw_caption(task, skill, variant=0):
    """(text, meaning) of a Meta-World L1 event, like caption() for the embedded world."""
    form = MW_SKILLS[skill][0]
    o, t = MW_OBJECTS[task]
    t = "" if skill in ("reach", "descend", "grasp", "lift", "press", "pull", "open") else t
    texts = L1_TEXTS.get(form) or MW_L1_TEXTS[form]
    return texts[variant % len(texts)].format(o=o, t=t), {"skill": skill, "object": o, "target": t}


def phase_runs(phases, flicker=3):
    """Per-step phases -> runs [(phase, start, end)]; a run shorter than `flicker` steps between two runs
    of the same phase (the action noise crossing a threshold and back) joins them."""
    runs = []
    for t, p in enumerate(phases):
        if runs and runs[-1][0] == p:
            runs[-1][2] = t + 1
        else:
            runs.append([p, t, t + 1])
        if len(runs) >= 3 and runs[-1][0] == runs[-3][0] and runs[-2][2] - runs[-2][1] < flicker:
            runs[-3][2] = runs[-1][2]
            del runs[-2:]
    return [tuple(r) for r in runs]


@dataclass
class MWTask:
    """One Meta-World configuration: configuration `index` of MT1(task, seed)."""
    family: str                       # the task, e.g. "pick-place"
    seed: int
    index: int
    split: str = "train"              # "train" or "held_out" (seed MW_EVAL_SEED)
    template: int = 0                 # index into MW_INSTRUCTIONS[family]

    @property
    def instruction(self):
        return MW_INSTRUCTIONS[self.family][self.template]


def mw_tasks(task, seed, n, split="train", first=0):
    """n configurations of a task from MT1(task, seed + k // 50), k = first .. first + n - 1."""
    if task not in MW_TASKS:
        raise ValueError(f"Meta-World task expected one of {MW_TASKS}, found {task!r}")
    last = seed + (first + n - 1) // MW_CONFIGS
    if split == "train" and n > 0 and seed <= MW_EVAL_SEED <= last:
        raise ValueError(f"Meta-World training configurations from MT1 seeds {seed}..{last} would include the "
                         f"evaluation seed {MW_EVAL_SEED}; use a seed range clear of it")
    return [MWTask(task, seed + k // MW_CONFIGS, k % MW_CONFIGS, split, k % len(MW_INSTRUCTIONS[task]))
            for k in range(first, first + n)]


@functools.lru_cache(maxsize=32)
def _mt1(task, seed):
    metaworld, _, _ = _metaworld()
    return metaworld.MT1(f"{task}-v3", seed=seed)


class MetaWorldEnv:
    """A batch of Meta-World configurations with the TabletopEnv interface: observe(), step(action),
    render(); plus the scripted expert (expert_action) and its phase. Fast CPU rendering: shadows,
    anti-aliasing, reflections, skybox and sites off, and one renderer per task, reused for every
    frame and every configuration of that task (they share meshes and materials; tested)."""
    views = ("scene", "wrist")

    def __init__(self, tasks, image_size=64):
        _, self.mujoco, self.expert_policies = _metaworld()
        self.size, n = image_size, len(tasks)
        self.tasks, self.envs, self.policies, self.obs, self.success = list(tasks), [None] * n, [None] * n, [None] * n, [False] * n
        self.renderers, self.cam_ids = {}, {}
        self.option = self.mujoco.MjvOption()
        self.option.sitegroup[:] = 0                                           # goal and marker sites stay hidden
        for i, tk in enumerate(self.tasks):
            self.reset_world(i, tk)
        # The cameras come from Meta-World's shared sawyer model: the same field of view in every task.
        fovy = self.envs[0].model.cam_fovy[self.cam_ids[self.tasks[0].family]]   # vertical, degrees
        f = (image_size / 2) / np.tan(np.radians(fovy) / 2)                    # square pixels: fx = fy
        c = (image_size - 1) / 2                                               # pixel centres at integers
        self.intrinsics = np.stack([f, f, np.full(len(f), c), np.full(len(f), c)], 1).astype(np.float32)   # (V, 4)

    def __len__(self):
        return len(self.envs)

    def reset_world(self, i, task=None):
        """Start configuration i again, or start `task` in its place."""
        mj, tk = self.mujoco, task or self.tasks[i]
        if task is not None:
            if self.envs[i] is None or self.tasks[i].family != tk.family:
                self.envs[i] = _mt1(tk.family, tk.seed).train_classes[f"{tk.family}-v3"]()
                self.policies[i] = self.expert_policies[f"{tk.family}-v3"]()
            self.envs[i].set_task(_mt1(tk.family, tk.seed).train_tasks[tk.index])
            self.tasks[i] = tk
        if tk.family not in self.cam_ids:
            self.cam_ids[tk.family] = [mj.mj_name2id(self.envs[i].model, mj.mjtObj.mjOBJ_CAMERA, c) for c, _ in MW_CAMERAS]
        self.obs[i], _ = self.envs[i].reset()
        self.success[i] = False

    def renderer(self, i):
        """The renderer of configuration i's task, made at its first frame."""
        mj, family = self.mujoco, self.tasks[i].family
        if family not in self.renderers:
            m = self.envs[i].model
            m.vis.quality.shadowsize, m.vis.quality.offsamples = 0, 0         # no shadow map, no multisampling
            r = mj.Renderer(m, self.size, self.size)
            for flag in (mj.mjtRndFlag.mjRND_SHADOW, mj.mjtRndFlag.mjRND_REFLECTION, mj.mjtRndFlag.mjRND_SKYBOX):
                r.scene.flags[flag] = False
            self.renderers[family] = r
        return self.renderers[family]

    def close(self):
        for r in self.renderers.values():
            r.close()
        self.renderers = {}

    def state(self, i):
        o, s = self.obs[i], np.zeros(MW_STATE_DIM, np.float32)
        s[:4] = o[:4]                                                          # hand xyz, finger opening
        if self.tasks[i].family in MW_HIDDEN_GOAL:
            s[4:] = o[-3:]
        return s

    def cam_poses(self, idx):
        """(b, V, 4, 4) world-from-camera, OpenCV axes. MuJoCo's camera frame has x right, y up and
        looks along -z (MuJoCo docs, "camera" element), so OpenCV's axes are (x, -y, -z); a view rotated
        by 180 degrees in the image negates x and y once more."""
        out = np.zeros((len(idx), len(MW_CAMERAS), 4, 4), np.float32)
        for j, i in enumerate(idx):
            d = self.envs[i].data
            for v, (cam, (_, rotate)) in enumerate(zip(self.cam_ids[self.tasks[i].family], MW_CAMERAS)):
                flip = np.array([-1.0, 1, -1]) if rotate else np.array([1.0, -1, -1])
                out[j, v, :3, :3] = d.cam_xmat[cam].reshape(3, 3) * flip       # columns: camera axes in the world
                out[j, v, :3, 3], out[j, v, 3, 3] = d.cam_xpos[cam], 1
        return out

    def render(self, idx):
        """(b, V, H, W, 3) uint8."""
        out = np.zeros((len(idx), len(MW_CAMERAS), self.size, self.size, 3), np.uint8)
        for j, i in enumerate(idx):
            r = self.renderer(i)
            for v, (cam, (_, rotate)) in enumerate(zip(self.cam_ids[self.tasks[i].family], MW_CAMERAS)):
                r.update_scene(self.envs[i].data, camera=cam, scene_option=self.option)
                img = r.render()
                out[j, v] = img[::-1, ::-1] if rotate else img
        return out

    def observe(self, idx=None, render=True):
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        obs = {"state": np.stack([self.state(i) for i in idx]), "cam_pose": self.cam_poses(idx),
               "intrinsics": self.intrinsics, "success": np.array([self.success[i] for i in idx]),
               "progress": np.array([100.0 * self.success[i] for i in idx], np.float32)}
        if render:
            obs["frames"] = self.render(idx)
        return obs

    def step(self, action, idx=None, render=True):
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        action = np.asarray(action, np.float64)
        if action.shape != (len(idx), 4) or not np.isfinite(action).all():
            raise ValueError(f"MetaWorldEnv.step: action must be finite, of shape ({len(idx)}, 4), found {action.shape}")
        for i, a in zip(idx, np.clip(action, -1, 1)):
            self.obs[i], _, _, _, info = self.envs[i].step(a)
            self.success[i] = self.success[i] or bool(info["success"])
        return self.observe(idx, render)

    def expert_action(self, i):
        """The scripted policy's action (4,) for configuration i, clipped to [-1, 1], and its phase."""
        with warnings.catch_warnings():          # the policies warn whenever a command exceeds 1; it is clipped
            warnings.simplefilter("ignore")
            a = np.clip(self.policies[i].get_action(self.obs[i]), -1, 1)
        return a, MW_PHASES[self.tasks[i].family](self.obs[i], a[3])

    def oracle_next_event(self, i):
        """The canonical L1 caption of the expert's current phase: the oracle planner for event mode."""
        text, meaning = mw_caption(self.tasks[i].family, self.expert_action(i)[1])
        return {"text": text, "meaning": meaning}

    def expert_future(self, i, steps=None, limit=32, k_p=1, frames=True):
        """expert_future (above) for configuration i: what the scripted expert, without noise, would do
        from its current state. steps None: to the end of its current phase (the event the oracle
        names), at least 1 and at most `limit` actions; otherwise exactly `steps`. Returns its actions
        (L, 4) and the observations (frames, cam_pose, state) after every k_p-th action and after the
        last (frames False: None, and nothing is rendered). Configuration i is left as it was: MuJoCo's
        whole integration state (mj_getState, which the MuJoCo docs say suffices for an exact
        continuation) and the attributes that Meta-World's step() changes are saved first and put back
        after (tested: the rollout goes on bit for bit)."""
        e, mj = self.envs[i], self.mujoco
        kind = mj.mjtState.mjSTATE_INTEGRATION
        saved = np.empty(mj.mj_stateSize(e.model, kind))
        mj.mj_getState(e.model, e.data, saved, kind)
        attrs = {k: copy.deepcopy(getattr(e, k)) for k in ("curr_path_length", "_prev_obs", "_last_stable_obs",
                                                           "_did_see_sim_exception")}
        obs, success = self.obs[i].copy(), self.success[i]
        n = min(limit if steps is None else steps, e.max_path_length - e.curr_path_length)
        if n < 1:
            raise ValueError(f"MetaWorldEnv.expert_future: configuration {i} is at step {e.curr_path_length} of "
                             f"Meta-World's {e.max_path_length}; no lookahead fits")
        try:
            actions, shots, first = [], {}, None
            while len(actions) < n:
                a, phase = self.expert_action(i)
                first = first or phase
                if steps is None and phase != first:
                    break                                         # a's step belongs to the next event
                actions.append(a)
                o = self.step(a[None], [i], render=frames and len(actions) % k_p == 0)
                if len(actions) % k_p == 0:
                    shots[len(actions)] = o
            if frames and len(actions) % k_p:
                shots[len(actions)] = self.observe([i])
        finally:
            mj.mj_setState(e.model, e.data, saved, kind)
            mj.mj_forward(e.model, e.data)                        # positions, sites, sensors from the state
            mj.mj_setState(e.model, e.data, saved, kind)          # forward's solver rewrote the warm start
            for site in e._target_site_config:                    # as Meta-World's step() re-places them
                e._set_pos_site(*site)
            for k, v in attrs.items():
                setattr(e, k, v)
            self.obs[i], self.success[i] = obs, success
        return lookahead(actions, shots if frames else None, k_p)


HELD_SKILLS = ("lift", "transport", "place", "push", "strike")   # phases that carry the object


def run_metaworld_expert(tasks, image_size=64, noise=MW_NOISE, horizon=300, attempts=1, render=True):
    """The scripted expert on each configuration, with clipped Gaussian noise on its xyz action, until
    the first success or `horizon` steps. A failed configuration is tried again with other noise, up to
    `attempts` times. Returns one Episode per task (meta["success"] says whether it succeeded)."""
    tasks, episodes = list(tasks), []
    if not tasks:
        return episodes
    env = MetaWorldEnv(tasks[:1], image_size)
    try:
        for tk in tasks:
            for attempt in range(attempts):
                env.reset_world(0, tk)
                rng = np.random.default_rng([tk.seed, MW_TASKS.index(tk.family), tk.index, attempt, 29])
                o = env.observe([0], render)
                rec = {k: [o[k][0]] for k in ("state", "cam_pose", "frames") if k in o} | {"action": [], "clean": [], "phase": []}
                while not env.success[0] and len(rec["action"]) < horizon:
                    clean, phase = env.expert_action(0)
                    act = clean.copy()
                    act[:3] = np.clip(act[:3] + rng.normal(0, noise, 3), -1, 1)
                    o = env.step(act[None], [0], render)
                    for k, v in (("action", act), ("clean", clean), ("phase", phase)):
                        rec[k].append(v)
                    for k in ("state", "cam_pose", "frames"):
                        if k in o:
                            rec[k].append(o[k][0])
                if env.success[0]:
                    break
            episodes.append(_mw_episode(tk, env, rec, attempt, noise))
    finally:
        env.close()
    return episodes


def _mw_episode(tk, env, rec, attempt, noise):
    """Captions at four levels from the expert's phases (L1 = phase runs), labels and metadata."""
    T, (obj, target) = len(rec["action"]), MW_OBJECTS[tk.family]
    runs = phase_runs(rec["phase"])
    rng = np.random.default_rng([tk.seed, tk.index, attempt, 31])
    clean = np.array(rec["clean"]).reshape(T, 4)
    L1, L0, L2, traces = [], [], [], []
    labels = {k: np.zeros(T + 1, np.int32) for k in ("skill", "l1", "l2", "subgoal", "recovery", "held")}
    for n, (skill, s, e) in enumerate(runs):
        text, meaning = mw_caption(tk.family, skill, int(rng.integers(3)))
        canon = mw_caption(tk.family, skill)[0]
        L1.append({"start": s, "end": e, "text": text, **meaning, "recovery": ""})
        slow = np.flatnonzero(np.abs(clean[s:e, :3]).max(1) < 0.3)            # L0: the controller's final approach
        cut = s + int(slow[0]) if len(slow) else e
        parts = [(s, cut, canon), (cut, e, "fine-adjust: " + canon)] if s + 2 <= cut <= e - 2 else [(s, e, canon)]
        L0 += [{"start": a, "end": b, "text": txt, **meaning} for a, b, txt in parts]
        l2 = MW_SKILLS[skill][1]
        if L2 and L2[-1]["skill"] == l2:
            L2[-1]["end"] = e
        else:
            tgt = target if l2 in ("transport", "place", "push") else ""
            L2.append({"start": s, "end": e, "skill": l2, "object": obj, "target": tgt,
                       "text": L2_TEXTS[l2].format(o=obj, t=tgt) if l2 in L2_TEXTS else canon})
        done = [r[0] for r in runs[max(0, n - 2):n]] or ["nothing"]
        grip = "closed" if rec["state"][s][3] < 0.6 else "open"
        traces.append({"frame": s, "text": f"{tk.family}; done: {', '.join(done)}; gripper {grip}; next: {canon}"})
        labels["skill"][s:e], labels["l1"][s:e], labels["l2"][s:e] = MW_SKILL_NAMES.index(skill), n, len(L2) - 1
        labels["held"][s:e] = skill in HELD_SKILLS
    for k in labels:                                             # the last frame follows the last action
        labels[k][T] = labels[k][T - 1] if T else 0
    L3 = [{"start": 0, "end": T, "text": tk.instruction, "skill": tk.family, "object": obj, "target": target}]
    success = bool(env.success[0])
    meta = {"instruction": tk.instruction, "family": tk.family, "split": tk.split, "seed": tk.seed, "config": tk.index,
            "world_version": MW_VERSION, "template": tk.template, "success": success, "attempt": attempt,
            "noise": noise, "recovery_start": False, "slips": 0, "phases": list(rec["phase"]),
            "captions": {"L3": L3, "L2": L2, "L1": L1, "L0": L0}, "reasoning": traces,
            "views": list(MetaWorldEnv.views), "cameras": [c for c, _ in MW_CAMERAS], "image_size": env.size}
    progress = np.zeros(T + 1, np.float32)
    progress[-1] = 100.0 * success
    return Episode(np.stack(rec["frames"]) if "frames" in rec else None, np.stack(rec["state"]),
                   np.array(rec["action"], np.float32).reshape(T, 4), env.intrinsics.copy(), np.stack(rec["cam_pose"]),
                   labels, progress, meta)
