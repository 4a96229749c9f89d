"""model.py on the tiny preset: shapes, masks, one-way coupling, packing, Staircase, sampling, overfitting."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import data
import model as M


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    data.generate(out, episodes=6, seed=5, per_shard=6, image_size=32)
    return data.Dataset(out)


@pytest.fixture(scope="module")
def windows(ds):
    rng = np.random.default_rng(0)
    events = data.episode_events(ds, 0)
    return [data.event_window(ds, events, j, rng) for j in range(4)]


def tiny(**parts):
    """The tiny preset with some sub-configs replaced: tiny(video={"cross_view": False})."""
    cfg = M.PRESETS["tiny"]
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in parts.items()})


def build(cfg=None, seed=0):
    torch.manual_seed(seed)
    return M.WallWM(cfg or M.PRESETS["tiny"])


def trained_like(m):
    """Give the zero-initialised output layers (cross-view outputs, patch and action heads) weights, as
    training would: at init they make many outputs exactly zero, which would let comparisons pass vacuously."""
    with torch.no_grad():
        for layer in [m.video.patch_out, m.action.action_out] + [blk.xview.o for blk in m.video.blocks if blk.xview]:
            layer.weight.normal_(0, 0.1)
    return m


def noised_inputs(m, b, seed=0):
    """Deterministic video-tower inputs for a batch: clean keyframes, future frames at t = 0.5."""
    v = m.cfg.video
    x0 = M.patchify(b["frames"], v.patch, v.image_size)
    g = torch.Generator().manual_seed(seed)
    future = ((b["frame_seg"] >= 0) & (b["frame_tau"] > 0))[:, :, None, None]
    t = torch.where(future, 0.5, 0.0).expand(x0.shape[:-1])
    return t[..., None] * torch.randn(x0.shape, generator=g) + (1 - t[..., None]) * x0, t


# --- shapes and losses on every path ---
@pytest.mark.parametrize("parts", [{}, {"flow": {"anchor": False}}, {"flow": {"prediction": "x", "dct_weight": 1.0}},
                                   {"video": {"tube_mask": True}}, {"video": {"cross_view": False}},
                                   {"video": {"camera_rope": False, "sight_cone": False}}])
def test_losses_and_sampling_shapes(windows, parts):
    m = build(tiny(**parts))
    b = data.collate([[windows[0]], [windows[1], windows[2]]])
    losses = m(b)
    assert set(losses) == {"video", "action"} and all(torch.isfinite(x) and x > 0 for x in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in m.action.parameters() if p.requires_grad)
    m.eval()
    out = m.sample(b, to_end=True)
    assert out["action"].shape == b["action"].shape
    assert out["frames"].shape == (2, b["frames"].shape[1], 2, 16, 16, 3) and out["frames"].dtype == torch.uint8
    v = m.cfg.video                                     # the sampler moves the actions away from their starting noise
    noise = {"frames": torch.randn(M.patchify(b["frames"], v.patch, v.image_size).shape), "action": torch.randn(b["action"].shape)}
    assert (trained_like(m).sample(b, noise=noise)["action"] - noise["action"]).abs().mean() > 0.1


@pytest.mark.parametrize("option, plain", [({"flow": {"prediction": "x", "dct_weight": 1.0}}, {"flow": {"prediction": "x"}}),
                                           ({"video": {"tube_mask": True}}, {})])
def test_training_options_change_the_loss_they_name(windows, option, plain):
    """The DCT term changes L_A and leaves L_V; tube masking changes L_V (and so the features L_A reads)."""
    b = data.collate([[windows[0]], [windows[1], windows[2]]])
    losses = []
    for parts in (option, plain):
        m = trained_like(build(tiny(**parts)))
        torch.manual_seed(1)
        losses.append({k: float(x) for k, x in m(b).items()})
    changed = "action" if "flow" in option else "video"
    assert abs(losses[0][changed] - losses[1][changed]) > 1e-4 * losses[1][changed]
    if changed == "action":
        assert losses[0]["video"] == pytest.approx(losses[1]["video"], rel=1e-6)


def test_language_side_shapes(windows):
    m = build()
    b = data.collate([[windows[0]], [windows[1], windows[2]]])
    tl = m.text_losses(b)
    assert set(tl) == {"align", "next", "time", "recon"} and all(torch.isfinite(x) and x > 0 for x in tl.values())
    assert float(m.cot_loss(b).detach()) > 0
    tokens, seg = m.latent_context(b)
    C = m.cfg.vlm.num_latents
    assert tokens.shape == (2, 2 * C, m.cfg.text.width) and seg.tolist()[0] == [0] * C + [1] * C
    assert tokens[0, C:].abs().sum() == 0                # row 0 has one window: its second slot is empty
    obs = m.keyframes(b)[0]
    pred = m.vlm.predict(obs, ["put the red block in the blue bowl"] * 3, max_len=5)
    assert pred["text"].shape == (3, m.cfg.text.slots, m.cfg.text.width) and pred["ids"].shape[0] == 3
    assert (pred["remaining"] >= 1).all() and len(pred["caption"]) == 3
    with torch.no_grad():                              # the head's output, in steps: 0.5 x remaining_scale
        m.vlm.time_head[-1].weight.zero_()
        m.vlm.time_head[-1].bias.fill_(0.5)
    again = m.vlm.predict(obs, ["put the red block in the blue bowl"] * 3, max_len=5)["remaining"]
    assert torch.allclose(again, torch.full((3,), 0.5 * m.cfg.vlm.remaining_scale))


def test_chunk_windows_unified_mode(ds):
    m = build()
    b = data.collate([[data.chunk_window(ds, 0, 0)], [data.chunk_window(ds, 0, 3)]])
    assert b["frame_tau"][0].tolist() == [-2, -1, 0, 1, 2, 3, 4] and not b["frame_seg"][0, :2].ge(0).any()
    losses = m(b)
    assert all(torch.isfinite(x) for x in losses.values())
    rows = m.chunk_rows(b, b["frame_seg"])               # E_abs row = chunk index + 1, history frames of chunk 3 included
    assert rows[1].tolist() == [4] * 7 and (m.chunk_rows(b, b["action_seg"])[1] == 4).all()
    b["frame_tau"][0, 0] = -5
    with pytest.raises(ValueError, match="tau out of range"):
        m.action.tau_index(b["frame_tau"])


# --- properties of the mechanisms ---
def test_zero_initialised_cross_view_is_absent_at_init(windows):
    with_x, without = build(tiny(video={"cross_view": True})), build(tiny(video={"cross_view": False}))
    missing = without.load_state_dict(with_x.state_dict(), strict=False)
    assert all(".xview." in k for k in missing.unexpected_keys) and missing.unexpected_keys
    b = data.collate([[windows[0]], [windows[1]]])
    x, t = noised_inputs(with_x, b)
    text = with_x.text_context(b["caption"])
    p1, h1 = with_x.video_pass(b, x, t, text, with_x.cones(b))
    p2, h2 = without.video_pass(b, x, t, text, None)
    assert torch.equal(h1[-1], h2[-1])
    with torch.no_grad():                                # a trained (non-zero) gate does change the block
        with_x.video.blocks[0].xview.o.weight.normal_()
    assert not torch.allclose(with_x.video_pass(b, x, t, text, None)[1][0], h1[0])


def test_one_way_coupling(windows):
    m = trained_like(build())
    b = data.collate([[windows[0]], [windows[1]]])
    b2 = dict(b, action=torch.randn_like(b["action"]), state=torch.randn_like(b["state"]))
    seen = []
    hooks = [blk.register_forward_hook(lambda mod, i, o: seen.append(o)) for blk in m.video.blocks]

    def run(batch):                                      # the whole training forward, same noise and times
        seen.clear()
        torch.manual_seed(0)
        out = m(batch)
        return out, list(seen)

    (l1, h1), (l2, h2) = run(b), run(b2)
    assert len(h1) == 2 * len(m.video.blocks) and all(torch.equal(x, y) for x, y in zip(h1, h2))
    assert torch.equal(l1["video"], l2["video"]) and not torch.equal(l1["action"], l2["action"])
    for h in hooks:
        h.remove()
    for p in m.video.parameters():                       # stage 2: video frozen
        p.requires_grad_(False)
    m(b, video=False)["action"].backward()
    assert all(p.grad is None for p in m.video.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.action.parameters())
    m.zero_grad(set_to_none=True)
    for p in m.video.parameters():                       # coupled training: L_A reaches the video tower
        p.requires_grad_(True)
    with torch.no_grad():                                # (through a non-zero output layer, as after training)
        m.action.action_out.weight.normal_()
    m(b, video=False)["action"].backward()
    assert sum(float(p.grad.abs().sum()) for p in m.video.parameters() if p.grad is not None) > 0


def test_packed_events_equal_separate(windows):
    m = trained_like(build())
    w1, w2 = windows[1], windows[2]
    parts = [data.collate([[w]]) for w in (w1, w2)]
    packed = data.collate([[w1, w2]])
    V = m.cfg.video.views

    def run(b, x, t, a, ta):
        text = m.text_context(b["caption"])
        pred, hidden = m.video_pass(b, x, t, text, m.cones(b))
        lay = m.action.layout(b["action_tau"], b["action_seg"], b["state_seg"], b["frame_seg"], V, m.P)
        kvs = m.action.context_kv(hidden, b["frame_tau"], b["state"], V, m.P)
        return pred, m.action(a, ta, lay, kvs, m.chunk_rows(b, b["action_seg"]))

    ins = [noised_inputs(m, b, seed=i) for i, b in enumerate(parts)]
    acts = [torch.randn(b["action"].shape, generator=torch.Generator().manual_seed(9 + i)) for i, b in enumerate(parts)]
    tas = [torch.full(b["action"].shape[:2], 0.3 + 0.2 * i) for i, b in enumerate(parts)]
    sep = [run(b, x, t, a, ta) for b, (x, t), a, ta in zip(parts, ins, acts, tas)]
    pv, pa = run(packed, torch.cat([x for x, _ in ins], 1), torch.cat([t for _, t in ins], 1), torch.cat(acts, 1), torch.cat(tas, 1))
    assert torch.allclose(pv, torch.cat([p for p, _ in sep], 1), atol=1e-5)
    assert torch.allclose(pa, torch.cat([a for _, a in sep], 1), atol=1e-5)


def down_camera(x, h, f, size):
    """A pinhole camera at (x, 0, h) looking straight down (OpenCV axes: z forward = world -z)."""
    pose = torch.eye(4)
    pose[:3, :3] = torch.tensor([[1.0, 0, 0], [0, -1, 0], [0, 0, -1]])
    pose[:3, 3] = torch.tensor([x, 0.0, h])
    return torch.tensor([f, f, (size - 1) / 2, (size - 1) / 2]), pose


def test_sight_cone_mask_geometry():
    size, patch, h = 32, 4, 0.5
    cams = [down_camera(0.0, h, 30.0, size), down_camera(0.25, h, 30.0, size)]
    intr, pose = torch.stack([c[0] for c in cams]), torch.stack([c[1] for c in cams])
    apex, axis, tan = M.patch_cones(intr, pose, size, patch)
    mask = M.sight_cone_mask(apex, axis, tan, 0.5, 0.6)          # the axes meet the table 0.5 to 0.6 m out
    P = (size // patch) ** 2
    assert torch.equal(mask, mask.T) and mask[:P, :P].all() and mask[P:, P:].all()
    # the footprint of each patch on the table z = 0: where its axis meets it, and the cone's radius there
    t_hit = h / -axis[..., 2]
    hit = apex + t_hit[..., None] * axis
    radius = t_hit * tan
    d = (hit[0][:, None, :2] - hit[1][None, :, :2]).norm(dim=-1)
    reach = radius[0][:, None] + radius[1][None]
    cross = mask[:P, P:]
    assert cross[d < 0.7 * reach].all() and cross[d < 0.7 * reach].numel() > 20     # overlapping footprints meet
    assert not cross[d > 1.5 * reach].any()                                           # distant ones never do
    assert 0 < cross.float().mean() < 0.5


def test_patch_cone_axes_project_back_onto_their_patches():
    """Each patch's axis, followed to the table and projected back through the camera, lands on the
    patch's centre pixel; with a pose whose rotation is not symmetric (a tilted, yawed camera), so a
    transposed rotation would miss."""
    size, patch = 32, 4
    intr = torch.tensor([30.0, 28.0, 15.5, 15.5])
    yaw, tilt = math.radians(30), math.radians(20)
    down = torch.tensor([[1.0, 0, 0], [0, -1, 0], [0, 0, -1]])
    rz = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    rx = torch.tensor([[1, 0, 0], [0, math.cos(tilt), -math.sin(tilt)], [0, math.sin(tilt), math.cos(tilt)]])
    pose = torch.eye(4)
    pose[:3, :3], pose[:3, 3] = rz @ rx @ down, torch.tensor([0.1, -0.2, 0.6])
    assert not torch.allclose(pose[:3, :3], pose[:3, :3].T)
    apex, axis, _ = M.patch_cones(intr[None], pose[None], size, patch)         # (1, 1, 3), (1, P, 3)
    hit = apex[0] + (-apex[0, :, 2:] / axis[0, :, 2:]) * axis[0]                # on the table z = 0
    cam = (hit - pose[:3, 3]) @ pose[:3, :3]                                    # world -> camera axes
    u, v = intr[0] * cam[:, 0] / cam[:, 2] + intr[2], intr[1] * cam[:, 1] / cam[:, 2] + intr[3]
    centre = torch.arange(size // patch) * patch + (patch - 1) / 2
    rows, cols = torch.meshgrid(centre, centre, indexing="ij")
    assert torch.allclose(u, cols.flatten(), atol=1e-3) and torch.allclose(v, rows.flatten(), atol=1e-3)


def test_sight_cone_on_the_worlds_cameras(ds):
    m = build(tiny(video={"patch": 4}))
    b = data.collate([[data.chunk_window(ds, 0, 1)]])
    mask = m.cones(b)
    P = m.P
    assert mask.shape == (1, 7, 2 * P, 2 * P) and torch.equal(mask, mask.transpose(-1, -2))
    cross = mask[0, 2, :P, P:]
    assert 0 < cross.float().mean() < 0.9                # the wrist camera sees part of the scene camera's view


def test_sight_cone_reads_no_future_camera_pose(ds):
    """The wrist camera's future poses are the recorded path of the gripper: the mask of a future frame
    must come from the anchor's cameras, or the actions leak into training through it."""
    m = build(tiny(video={"patch": 4}))
    b = data.collate([[data.chunk_window(ds, 0, 1)]])                     # tau -2..4: the anchor is frame 2
    mask = m.cones(b)
    assert all(torch.equal(mask[0, f], mask[0, 2]) for f in range(3, 7))
    moved = dict(b, cam_pose=b["cam_pose"].clone())
    moved["cam_pose"][0, 3:, 1, :3, 3] += torch.tensor([0.2, -0.1, 0.05])  # shift the wrist camera in every future frame
    assert torch.equal(m.cones(moved), mask)
    moved["cam_pose"][0, 2, 1, :3, 3] += torch.tensor([0.2, -0.1, 0.05])   # shifting the anchor's changes the mask
    assert not torch.equal(m.cones(moved)[0, 2], mask[0, 2])


def test_sight_cone_mask_is_fp32_geometry_under_bf16_autocast(ds):
    """train.py runs the losses under bf16 autocast on CUDA; the cones' matmuls must not follow it
    (in bf16 about 3% of the default preset's cross-view pairs flipped). CPU autocast shows the same."""
    m = build(M.PRESETS["default"])
    b = data.collate([[data.chunk_window(ds, 0, 1)], [data.chunk_window(ds, 1, 2)]])
    ref = m.cones(b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(m.cones(b), ref)


def test_cone_sampling_masks_cross_view_attention_as_in_training(ds):
    """With cone_sampling the sampler's video passes use the training mask: the actions change, and a
    band so wide that every pair of cones meets (an all-true mask) gives back the unmasked sampler."""
    b = data.collate([[data.chunk_window(ds, 0, 1)]])
    def run(**video):
        m = trained_like(build(tiny(video={"patch": 4, **video}))).eval()
        return m.sample(b, generator=torch.Generator().manual_seed(0))["action"]
    plain = run()
    assert not torch.allclose(run(cone_sampling=True), plain, atol=1e-4)
    assert torch.allclose(run(cone_sampling=True, cone_band=(0.05, 1e6), cone_widen=1e3), plain, atol=1e-5)


def test_rope_rotates_each_pair_by_its_angle():
    """apply_rope's three-op form is the rotation of each pair (x_j, x_{j + dh/2}), read as the complex
    number x_j + i x_{j + dh/2}, by e^{i angle_j}; so a query-key product depends on the positions'
    difference only."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)                                             # (B, H, N, dh)
    ang = M.rope_angles(torch.arange(5).expand(2, 5), 4)                    # (B, N, dh/2)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones_like(ang), ang)[:, None]
    assert torch.allclose(M.apply_rope(x, M.rotary(ang)), torch.cat([z.real, z.imag], -1), atol=1e-6)
    q, k = torch.randn(2, 1, 1, 1, 8)

    def score(pq, pk):
        rot = [M.rotary(M.rope_angles(torch.tensor([[p]]), 4)) for p in (pq, pk)]
        return (M.apply_rope(q, rot[0]) * M.apply_rope(k, rot[1])).sum()
    assert torch.allclose(score(2, 5), score(6, 9), atol=1e-5)
    assert not torch.allclose(score(2, 5), score(2, 6), atol=1e-3)


def test_camera_rope_depends_on_relative_view_rotation(windows):
    m = trained_like(build())
    b = data.collate([[windows[0]]])
    x, t = noised_inputs(m, b)
    text = m.text_context(b["caption"])
    ref = m.video_pass(b, x, t, text, None)[0]
    with torch.no_grad():
        m.video.view_angles += torch.randn(1, m.video.view_angles.shape[1])   # the same rotation for every camera
    assert torch.allclose(m.video_pass(b, x, t, text, None)[0], ref, atol=1e-5)
    with torch.no_grad():
        m.video.view_angles[1] += 0.7                                          # one camera turns relative to the other
    assert not torch.allclose(m.video_pass(b, x, t, text, None)[0], ref, atol=1e-3)


def test_staircase_one_pass_equals_position_by_position(windows):
    m = build()
    m.stair.init_from(m.vlm)
    obs = m.keyframes(data.collate([[windows[0]], [windows[1]]]))[0]
    instr = ["put the red block in the blue bowl", "press yellow then blue"]
    cache, p0 = m.stair.prefill(m.vlm, obs, instr)
    calls = []
    hooks = [blk.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[1])) for blk in m.stair.upper]
    one = m.stair(m.vlm, cache, p0)
    C = m.cfg.vlm.num_latents
    assert calls == [C] * len(m.stair.upper)             # every upper layer once, over all C latents at once
    for h in hooks:
        h.remove()
    ref = m.stair.reference(m.vlm, cache, p0)
    assert one.shape == (2, C, m.cfg.vlm.width) and torch.allclose(one, ref, atol=1e-5)
    assert not torch.allclose(one[:, 1], one[:, 2])      # positions differ (their embeddings)
    chain = M.serial_chain(m.vlm, cache, p0, m.stair.start, C)
    assert chain.shape == one.shape and not torch.allclose(chain, one)


def test_staircase_is_gradient_continuous(windows):
    m = build()
    for p in m.vlm.parameters():                         # stage 4: the VLM is frozen ...
        p.requires_grad_(False)
    obs = m.keyframes(data.collate([[windows[0]]]))[0]
    x, valid, pos = m.vlm.prompt(obs, ["stack the green block"])
    x = x.detach().requires_grad_(True)                  # ... yet its input embeddings receive gradient
    cache = m.vlm.run(x, valid, pos, m.vlm.layers)[1]
    z = m.stair(m.vlm, cache, pos[:, -1:] + 1)
    m.recon.nll(m.prefix(z), ["pressed: yellow; next: press blue"]).backward()
    assert x.grad is not None and x.grad.abs().sum(-1).gt(0).all()
    assert m.stair.pos.grad.abs().sum() > 0 and m.prefix[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("prediction, anchor", [("v", True), ("x", True), ("x", False), ("v", False)])
def test_samplers_follow_the_straight_path_of_a_perfect_prediction(windows, prediction, anchor):
    """x_t = t noise + (1 - t) x0: a tower that always predicts the true x0 (x-prediction) or the
    constant velocity noise - x0 (v-prediction) keeps every Euler step on that line, so the sampler
    must return exactly the recorded actions and frames (here on the tiny preset's schedules)."""
    m = build(tiny(flow={"prediction": prediction, "anchor": anchor})).eval()
    b = data.collate([[windows[0]], [windows[1], windows[2]]])
    v = m.cfg.video
    x0 = M.patchify(b["frames"], v.patch, v.image_size)
    g = torch.Generator().manual_seed(0)
    noise = {"frames": torch.randn(x0.shape, generator=g), "action": torch.randn(b["action"].shape, generator=g)}
    pass_of = m.video_pass
    m.video_pass = lambda *a: (x0 if prediction == "x" else noise["frames"] - x0, pass_of(*a)[1])
    m.action.forward = lambda a, *_: b["action"] if prediction == "x" else noise["action"] - b["action"]
    out = m.sample(b, noise=noise, to_end=True)
    assert torch.allclose(out["action"], b["action"], atol=1e-5)
    diff = out["frames"].int() - M.unpatchify(x0, v.patch).int()   # the frames at the tower's size (block means
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.05   # of 2 x 2 pixels: some sit on a rounding tie)


def test_cached_and_uncached_sampling_agree(windows):
    m = trained_like(build()).eval()
    b = data.collate([[windows[0]], [windows[1], windows[2]]])
    a1 = m.sample(b, cache=True, generator=torch.Generator().manual_seed(3))["action"]
    a2 = m.sample(b, cache=False, generator=torch.Generator().manual_seed(3))["action"]
    a3 = m.sample(b, cache=True, generator=torch.Generator().manual_seed(4))["action"]
    noise = torch.randn(b["action"].shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a1, a2, atol=1e-6) and not torch.allclose(a1, a3) and not torch.allclose(a1, noise, atol=0.1)
    passes = []
    m.video.register_forward_hook(lambda mod, i, o: passes.append(1))
    m.sample(b, cache=True)
    fl = m.cfg.flow
    down = sum(s > fl.anchor_sigma for s in M.schedule(fl.video_steps, fl.time_shift).tolist())
    assert len(passes) == down + 1                       # Euler steps down to s*, then the one cached pass
    passes.clear()
    m.sample(b, cache=False)
    assert len(passes) == down + fl.action_steps


def test_greedy_caption_matches_teacher_forcing(windows):
    m = build()
    obs = m.keyframes(data.collate([[windows[0]]]))[0]
    pred = m.vlm.predict(obs, ["push the blue block"], max_len=12)
    ids = pred["ids"][0]
    n = int((ids != M.EOS).cumprod(0).sum())                # bytes before the first EOS
    caption = torch.cat([ids[:n], torch.tensor([M.EOS])])[None]
    logits = {}
    m.vlm.lm_head.register_forward_hook(lambda mod, i, o: logits.setdefault("x", o))
    m.vlm.loss(obs, ["push the blue block"], caption, torch.tensor([5.0]), torch.zeros(1, m.cfg.text.slots, m.cfg.text.width))
    assert torch.equal(logits["x"][0, :n + 1].argmax(-1)[:n], ids[:n])


def test_contrastive_loss():
    keys = ["a", "a", "b", "b"]
    same = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])[:, None]
    assert float(M.contrastive_loss(same, keys, 0.1)) < 0.01
    assert float(M.contrastive_loss(same.flip(0), ["a", "b", "a", "b"], 0.1)) > 5
    with pytest.raises(ValueError, match="paraphrase"):
        M.contrastive_loss(same, ["a", "b", "c", "d"], 0.1)


def test_overfitting_one_batch_lowers_each_flow_loss_tenfold(windows):
    m = build(tiny(flow={"action_draws": 1}))
    b = data.collate([[windows[0]], [windows[1]]])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)

    def losses():
        torch.manual_seed(1)                             # one batch, one draw of noise and time: pure overfitting
        return m(b)

    first = {k: float(v) for k, v in losses().items()}
    for _ in range(80):
        opt.zero_grad()
        sum(losses().values()).backward()
        opt.step()
    last = {k: float(v) for k, v in losses().items()}
    assert all(last[k] * 10 <= first[k] for k in first), (first, last)


def test_paper_preset_builds_on_meta(capsys):
    counts = M.main("paper")
    out = capsys.readouterr().out
    assert "preset paper" in out and "video" in out
    assert 5e9 < counts["video"] < 8e9 and 8e9 < counts["vlm"] < 10e9 and 0.6e9 < counts["recon"] < 1e9
    with torch.device("meta"):
        m = M.WallWM(M.PRESETS["paper"])
    assert len(m.video.blocks) == len(m.action.blocks) == 30 and m.video.blocks[0].xview.heads == 24


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="video.image_size 16 is not a multiple of video.patch 5"):
        M.WallWM(tiny(video={"patch": 5}))
    with pytest.raises(ValueError, match="^ModelConfig: video.width 7 is not a multiple of video.heads 2$"):
        M.WallWM(tiny(video={"width": 7}))
    with pytest.raises(ValueError, match="relay_depth"):
        M.WallWM(tiny(vlm={"relay_depth": 4}))


@pytest.mark.parametrize("where", [True, False])
def test_action_tower_knows_where_a_video_token_sits(windows, where):
    """Cross-attention is blind to the order of its keys, so without the (view, row, column) code the
    action tower cannot tell two video frames apart whose patches trade places; with it, it can."""
    m = trained_like(build(tiny(action={"video_where": where}))).eval()
    b = m.to_device(data.collate([[windows[0]]]))
    v = m.cfg.video
    with torch.no_grad():
        x, t = noised_inputs(m, b)
        _, hidden = m.video_pass(b, x, t, m.text_context(b["caption"]), None)
        assert hidden[0].dim() == 5                                  # (B, F, V, P, D)
        swap = torch.randperm(m.P, generator=torch.Generator().manual_seed(0))
        lay = m.action.layout(b["action_tau"], b["action_seg"], b["state_seg"], b["frame_seg"], v.views, m.P)
        a = torch.randn(b["action"].shape, generator=torch.Generator().manual_seed(1))
        tt = torch.full(a.shape[:2], 0.5)
        chunk = m.chunk_rows(b, b["action_seg"])
        outs = [m.action(a, tt, lay, m.action.context_kv(h, b["frame_tau"], b["state"], v.views, m.P), chunk)
                for h in (hidden, [h[:, :, :, swap] for h in hidden])]
    assert torch.allclose(outs[0], outs[1], atol=1e-5) != where


def test_true_future_sampling_reads_the_batch_future_frames(windows):
    """Plain sampling ignores the batch's future frames (placeholders); the true_future diagnostic reads them."""
    m = trained_like(build()).eval()
    b = data.collate([[windows[0]]])
    future = (b["frame_tau"] > 0)[:, :, None, None, None, None]
    other = dict(b, frames=torch.where(future, 255 - b["frames"], b["frames"]))
    run = lambda batch, tf: m.sample(batch, generator=torch.Generator().manual_seed(0), true_future=tf)["action"]
    assert torch.equal(run(b, False), run(other, False))
    assert not torch.allclose(run(b, True), run(other, True), atol=1e-4)


def test_guidance_extrapolates_from_the_empty_caption(windows):
    """guided_velocity at scale g is v_empty + g (v_caption - v_empty), v_empty read with the empty
    caption of every packed window (what the caption drop trains); 1 is the plain pass. Sampling with
    guidance moves the actions; guidance 1 is plain sampling."""
    m = trained_like(build()).eval()
    b = m.to_device(data.collate([[windows[0], windows[1]], [windows[2]]]))
    x = noised_inputs(m, b)[0]
    cond = ((b["frame_seg"] < 0) | (b["frame_tau"] <= 0))[:, :, None, None, None]       # as WallWM.sample
    text, empty = m.text_context(b["caption"]), m.text_context([[""] * len(row) for row in b["caption"]])
    with torch.no_grad():
        v_text, v_empty = (m.video_velocity(b, x, 0.5, cond, t)[0] for t in (text, empty))
        for g in (0.0, 1.0, 3.0):
            assert torch.allclose(m.guided_velocity(b, x, 0.5, cond, text, guidance=g)[0], v_empty + g * (v_text - v_empty), atol=1e-5)
        latents = m.context(torch.randn(2, 2, 3, m.cfg.text.width))       # 3 tokens per window (K_c), not text.slots
        v_lat = m.video_velocity(b, x, 0.5, cond, latents)[0]
        assert torch.allclose(m.guided_velocity(b, x, 0.5, cond, latents, guidance=3.0)[0], v_empty + 3 * (v_lat - v_empty), atol=1e-5)
    run = lambda g, **k: m.sample(b, generator=torch.Generator().manual_seed(0), guidance=g, to_end=True, **k)
    assert (run(0.0)["frames"].int() - run(1.0, text=empty)["frames"].int()).abs().max() <= 1   # steps read the empty caption
    assert not torch.allclose(run(1.0)["action"], run(3.0)["action"], atol=1e-4)


def test_dct_loss_averages_over_the_windows_that_exist():
    """A row with one window beside a row with two: the empty slot must not dilute the mean."""
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(2, 10, 4, generator=g), torch.randn(2, 10, 4, generator=g)
    seg = torch.tensor([[0] * 6 + [-1] * 4, [0] * 5 + [1] * 5])
    per_window = []
    for row, lo, hi in ((0, 0, 6), (1, 0, 5), (1, 5, 10)):
        one = torch.zeros(1, hi - lo, dtype=torch.long)
        c = M.dct_coefficients(x[row:row + 1, lo:hi], one, 3) - M.dct_coefficients(target[row:row + 1, lo:hi], one, 3)
        per_window.append(c.pow(2).mean())
    assert torch.allclose(M.dct_loss(x, target, seg, 3), torch.stack(per_window).mean(), atol=1e-6)
    assert M.dct_loss(x, target, seg, 3) > 0.01
    K = 6                                              # DCT-II by its definition: sum_k x_k cos(pi (k + 1/2) j / K) / K
    k, j = torch.arange(K).float()[:, None], torch.arange(3).float()[None]
    want = (torch.cos(torch.pi * (k + 0.5) * j / K)[:, :, None] * x[0, :K, None, :]).sum(0) / K      # (3, A)
    assert torch.allclose(M.dct_coefficients(x[:1, :K], torch.zeros(1, K, dtype=torch.long), 3)[0, 0], want, atol=1e-6)


def test_tube_is_a_window_co_visible_at_the_anchor(ds):
    """Tube masking hides a k x k window of patches that another view can all see, judged at the
    anchor frame (tau 0), not at the first history frame; the same window in every frame. A hand-made
    cone mask: at the anchor only the 2 x 2 window at (1, 1) of each view sees the other view; at
    frame 0 (history) only the window at (2, 2)."""
    m = build(tiny(video={"patch": 4, "tube_mask": True}))
    b = m.to_device(data.collate([[data.chunk_window(ds, 0, 1)]]))               # tau -2..4: the anchor is frame 2
    P, F_ = m.P, b["frame_tau"].shape[1]
    def window(r, c):
        w = torch.zeros(4, 4, dtype=torch.bool)
        w[r:r + 2, c:c + 2] = True
        return w.flatten()
    cone = torch.zeros(1, F_, 2 * P, 2 * P, dtype=torch.bool)
    cone[0, :, :P, :P] = cone[0, :, P:, P:] = True                                # own view
    for f, w in ((2, window(1, 1)), (0, window(2, 2))):
        cone[0, f, :P, P:] = cone[0, f, P:, :P] = w[:, None] & w[None]
    torch.manual_seed(0)
    views = set()
    for _ in range(10):
        tube = m.tube(b, cone)[0]                                                 # (F, V, P)
        view = int(tube[2].any(-1).int().argmax())
        views.add(view)
        assert torch.equal(tube[:, view], window(1, 1).expand(F_, -1)) and not tube[:, 1 - view].any()
    assert views == {0, 1}


def test_motion_weight_changes_only_the_weight_of_moving_patches(windows):
    """VideoConfig.motion_weight: with every future frame equal to its keyframe nothing moves and L_V is
    unchanged; with the recorded future it changes. Moving patches exist only among the future frames."""
    b = data.collate([[windows[0], windows[1]]])
    key = M.keyframe_index(b["frame_tau"], b["frame_seg"])
    still = dict(b, frames=b["frames"][torch.arange(1)[:, None], key])          # each frame replaced by its keyframe

    def loss(w, batch):
        m = trained_like(build(tiny(video={"motion_weight": w}))).train()
        torch.manual_seed(3)
        return m(batch, action=False)["video"]
    assert torch.equal(loss(4.0, still), loss(0.0, still))
    assert not torch.allclose(loss(4.0, b), loss(0.0, b))
    x0 = M.patchify(b["frames"], M.PRESETS["tiny"].video.patch, M.PRESETS["tiny"].video.image_size)
    moving = (x0 - x0[torch.arange(1)[:, None], key]).abs().amax(-1) > M.PRESETS["tiny"].video.motion_eps
    future = ((b["frame_seg"] >= 0) & (b["frame_tau"] > 0))[:, :, None, None]
    assert (moving & future).any() and not (moving & ~future).any()        # keyframes never move


def test_own_futures_train_the_action_tower_on_generated_frames(windows):
    """With own_futures = 1 the action loss reads the video tower's own samples, never the recorded future
    frames (changing them changes nothing); with 0 it reads the recorded ones; evaluation mode never samples.
    The one pass with gradient sees exactly the sampler's frames at exactly s*."""
    b = data.collate([[windows[0], windows[1]]])
    future = (b["frame_tau"] > 0)[:, :, None, None, None, None]
    other = dict(b, frames=torch.where(future, 255 - b["frames"], b["frames"]))

    def loss(own, batch, train=True, calls=None):
        m = trained_like(build(tiny(flow={"own_futures": own}))).train(train)
        if calls is not None:                          # record every video pass: (x, t, gradient on)
            inner = m.video_pass
            m.video_pass = lambda b_, x, t, *a: calls.append((x, t, torch.is_grad_enabled())) or inner(b_, x, t, *a)
        torch.manual_seed(1)
        return m, m(batch, video=False)["action"]
    assert torch.equal(loss(1.0, b)[1], loss(1.0, other)[1])
    assert not torch.allclose(loss(0.0, b)[1], loss(0.0, other)[1])
    assert not torch.allclose(loss(1.0, b, train=False)[1], loss(1.0, other, train=False)[1])

    calls = []
    m, _ = loss(1.0, b, calls=calls)
    fl = m.cfg.flow
    assert [g for *_, g in calls] == [False] * (len(calls) - 1) + [True] and len(calls) > 2   # sampler, then the pass
    x, t, _ = calls[-1]
    fut = future[..., 0, 0].expand(t.shape)
    assert torch.all(t[fut] == fl.anchor_sigma) and torch.all(t[~fut] == 0)
    x0 = M.patchify(b["frames"], m.cfg.video.patch, m.cfg.video.image_size)
    start = calls[0][0]                                 # the sampler's first input: keyframes and its noise
    cond = ~future[..., 0]
    with torch.no_grad():
        again = m.to_anchor(b, start, cond, m.text_context(b["caption"]))
    assert torch.equal(start[cond.expand_as(start)], x0[cond.expand_as(x0)]) and torch.allclose(x, again)
    with pytest.raises(ValueError, match="own_futures"):
        build(tiny(flow={"own_futures": 0.5, "anchor": False}))


def test_keyframe_channels_pass_each_windows_keyframe_through(windows):
    # x-prediction with the output layer at its zero init: every future patch is predicted as its own
    # window's keyframe patch (two windows packed in one row), except where a tube hides that patch
    m = build(tiny(flow={"prediction": "x"}))
    assert m.video.key_residual and not build().video.key_residual          # v-prediction: channels only
    b = data.collate([[windows[1], windows[2]]])
    x, t = noised_inputs(m, b)
    t = t.clone()
    seg, tau = b["frame_seg"][0], b["frame_tau"][0]
    second_key = int(torch.nonzero((seg == 1) & (tau == 0))[0])
    t[0, second_key, 1, 2] = 1.0                                            # a tube over view 1, patch 2
    pred, _ = m.video_pass(b, x, t, m.text_context(b["caption"]), None)
    x0 = M.patchify(b["frames"], m.cfg.video.patch, m.cfg.video.image_size)
    for f in torch.nonzero((seg >= 0) & (tau > 0))[:, 0].tolist():
        k = int(torch.nonzero((seg == seg[f]) & (tau == 0))[0])
        want = x0[0, k].clone()
        if k == second_key:
            want[1, 2] = 0
        assert torch.equal(pred[0, f], want)
