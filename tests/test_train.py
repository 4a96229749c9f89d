"""train.py on the tiny preset: exact resume (in process and after SIGKILL), two processes equal one,
stage freezing, the NaN stop, refused checkpoints, and stage 5's three text sources."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

import data
import model as M
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def droot(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    data.generate(out, episodes=8, seed=2, per_shard=8, image_size=32)
    return out


def tiny(droot, run, **kw):
    base = train.PRESETS["tiny"][1]
    return dataclasses.replace(base, run_dir=str(run), data=dataclasses.replace(base.data, root=droot), **kw)


def losses(run, stage):
    recs = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("lr", "step_time", "data_wait", "samples_per_s")}
            for r in recs if r["stage"] == stage]


def weights(path, prefix="model."):
    with safe_open(path, "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def full_run(droot, tmp_path_factory):
    """Every stage and the baseline, 3 steps each."""
    run = tmp_path_factory.mktemp("full")
    rows = train.main(tiny(droot, run))
    return str(run), rows


def test_pipeline_runs_every_stage_and_the_baseline(full_run):
    run, rows = full_run
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[6][0] == 3 + 3 + 3                     # U-Scratch: the tower steps of stages 1, 2 and 5
    assert set(rows[1][2]) == {"video", "contrastive"} and set(rows[3][2]) == {"align", "next", "time", "recon"}
    recs = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert len(recs) == 3 * 5 + 9 and all(r["step_time"] > 0 and r["samples_per_s"] > 0 for r in recs)
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["versions"]["torch"] == torch.__version__ and "commit" in cfg and cfg["config"]["steps"] == [3] * 5
    assert "| 6 chunk-centric baseline" in open(os.path.join(run, "results.md")).read()


def test_each_stage_freezes_what_the_method_says(full_run):
    run, _ = full_run
    w = {s: weights(os.path.join(run, f"stage{s}.safetensors")) for s in range(1, 6)}
    torch.manual_seed(train.PRESETS["tiny"][1].seed)   # the run's initial weights
    w[0] = M.WallWM(M.PRESETS["tiny"]).state_dict()
    method = {1: {"video", "text"}, 2: {"action"}, 3: {"vlm", "recon"}, 4: {"stair", "prefix"}, 5: {"video", "action"}}
    for s in range(1, 6):                              # METHOD.md section 5's table, written out: not train.STAGES
        trains = method[s]
        assert set(train.STAGES[s].trains) == trains
        for part in M.PARTS:
            same = all(torch.equal(w[s][k], w[s - 1][k]) for k in w[s] if k.startswith(part + "."))
            if part in trains:
                assert not same, f"stage {s} should train {part}"
            else:
                assert same, f"stage {s} changed the frozen part {part}"


def test_two_steps_then_resume_equals_four_steps(droot, tmp_path):
    kw = dict(stage=1, steps=(4, 3, 3, 3, 3), save_every=100)
    train.main(tiny(droot, tmp_path / "a", **kw))
    with pytest.raises(train.Stopped, match="stage 1 step 2"):
        train.main(tiny(droot, tmp_path / "b", stop_after=2, **kw))
    assert json.load(open(tmp_path / "b" / "ckpt" / "meta.json"))["step"] == 2
    for other in (dict(kw, steps=(5, 3, 3, 3, 3)), dict(kw, seed=1)):  # another run's settings: refused, nothing written
        with pytest.raises(train.ConfigError, match="steps: the run has .4, 3, 3, 3, 3., this command .5|seed: the run has 0, this command 1"):
            train.main(tiny(droot, tmp_path / "b", resume=True, **other))
    b = tmp_path / "b"
    older = tmp_path / "older"                         # optim.pt from before vectors had their own AdamW group
    shutil.copytree(b, older)
    st = torch.load(older / "ckpt" / "optim.pt", weights_only=True)
    torch.save(dict(st, param_groups=st["param_groups"][:-1]), older / "ckpt" / "optim.pt")
    with pytest.raises(train.CheckpointError, match=r"older: the checkpoint's optim.pt has parameter groups \(size, weight decay\) "
                                                     r"\[\(\d+, 0.01\), \(\d+, 0.01\)\], this code makes \[\(\d+, 0.01\), \(\d+, 0.01\), \(\d+, 0.0\)\]"):
        train.main(tiny(droot, older, resume=True, **kw))
    shutil.copytree(b / "ckpt", b / "ckpt.old")       # what kills mid-save leave: the previous checkpoint, a temporary
    os.makedirs(b / ".ckpt-killed")
    train.main(tiny(droot, b, resume=True, **kw))
    assert not os.path.exists(b / "ckpt.old") and not [n for n in os.listdir(b) if n.startswith(".ckpt-")]
    record = json.load(open(b / "config.json"))         # the run's provenance, and this invocation's
    assert record["config"]["resume"] is False and len(record["resumed"]) == 1 and "commit" in record["resumed"][0]
    assert losses(tmp_path / "a", 1) == losses(tmp_path / "b", 1) and len(losses(tmp_path / "b", 1)) == 4
    wa, wb = weights(tmp_path / "a" / "stage1.safetensors"), weights(tmp_path / "b" / "stage1.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resumed_pipeline_reports_every_stage(droot, tmp_path):
    """Stopped in stage 5 and resumed: the returned rows and results.md cover stages 1-6, with the steps and
    final losses of a run never interrupted; the stages read back from log.jsonl are marked."""
    kw = dict(steps=(1, 1, 1, 1, 3), save_every=100)
    whole = train.main(tiny(droot, tmp_path / "a", **kw))
    with pytest.raises(train.Stopped, match="stage 5 step 2"):
        train.main(tiny(droot, tmp_path / "b", stop_after=2, **kw))
    rows = train.main(tiny(droot, tmp_path / "b", resume=True, **kw))
    assert list(rows) == list(whole) == [1, 2, 3, 4, 5, 6]
    for s in whole:
        assert rows[s][0] == whole[s][0] and rows[s][2].keys() == whole[s][2].keys()
        assert all(abs(rows[s][2][k] - v) < 1e-5 for k, v in whole[s][2].items()), s
    table = open(tmp_path / "b" / "results.md").read()
    assert [line.split()[1] for line in table.splitlines() if "* |" in line] == ["1", "2", "3", "4", "5"]


def cli(droot, run, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "tiny", "--run-dir", str(run), "--data.root", droot, *extra]


def test_sigkill_and_resume_gives_the_same_losses(droot, tmp_path):
    extra = ["--stage", "1", "--steps", "10", "3", "3", "3", "3", "--save-every", "3"]
    subprocess.run(cli(droot, tmp_path / "a", *extra), check=True, capture_output=True, cwd=ROOT, timeout=300)
    proc = subprocess.Popen(cli(droot, tmp_path / "b", *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = tmp_path / "b" / "ckpt" / "meta.json"
    deadline = time.time() + 240
    while not meta.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.load(open(meta))["step"]
    assert 0 < step < 10 and len(losses(tmp_path / "b", 1)) < 10, "the run finished before it could be killed"
    subprocess.run(cli(droot, tmp_path / "b", *extra, "--resume"), check=True, capture_output=True, cwd=ROOT, timeout=300)
    assert losses(tmp_path / "a", 1) == losses(tmp_path / "b", 1)


def test_two_processes_equal_one(droot, tmp_path):
    """The same losses and gradient norms (the all-reduced gradients are the step's mean, not a share
    of it), and a parameter no process computes a gradient for (the Camera RoPE table, with cross-view
    attention off) is skipped by the optimizer as in one process, not decayed."""
    extra = ["--stage", "1", "--steps", "3", "3", "3", "3", "3", "--batch", "4", "--micro", "2", "--model.video.no-cross-view"]
    subprocess.run(cli(droot, tmp_path / "one", *extra), check=True, capture_output=True, cwd=ROOT, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run(torchrun + cli(droot, tmp_path / "two", *extra)[1:], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = losses(tmp_path / "one", 1), losses(tmp_path / "two", 1)
    assert len(one) == len(two) == 3                   # same global batch: 2 micro-batches on one process, 1 on each of two
    for a, b in zip(one, two):
        assert all(abs(a[k] - b[k]) < 1e-5 for k in ("video", "contrastive")), (one, two)
        assert abs(a["grad_norm"] / b["grad_norm"] - 1) < 1e-4, (one, two)
    torch.manual_seed(train.PRESETS["tiny"][1].seed)   # the runs' initial weights
    tiny_cfg = M.PRESETS["tiny"]
    start = M.WallWM(dataclasses.replace(tiny_cfg, video=dataclasses.replace(tiny_cfg.video, cross_view=False))).state_dict()
    for run in ("one", "two"):
        w = weights(tmp_path / run / "stage1.safetensors")
        assert torch.equal(w["video.view_angles"], start["video.view_angles"]), run
        assert not torch.equal(w["video.patch_out.weight"], start["video.patch_out.weight"]), run


def test_nan_in_a_batch_stops_the_run(droot, full_run, tmp_path, monkeypatch):
    real = train.Windows.batch
    calls = []

    def poisoned(self, positions, seed, pack):
        b = real(self, positions, seed, pack)
        calls.append(1)
        if len(calls) == 3:                             # step 1's first micro-batch (two per step)
            b["action"][0, 0, 0] = float("nan")
        return b

    monkeypatch.setattr(train.Windows, "batch", poisoned)
    with pytest.raises(train.NonFiniteLoss, match=r"stage 2 \(action pretraining\) step 1: loss term 'action' is nan"):
        train.main(tiny(droot, tmp_path, stage=2, save_every=1, init_from=full_run[0]))
    assert json.load(open(tmp_path / "ckpt" / "meta.json"))["step"] == 1   # the last good checkpoint survives


def test_damaged_or_foreign_checkpoints_are_refused(full_run, tmp_path):
    run, _ = full_run
    src = os.path.join(run, "stage1.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(src, "rb").read()[:5000])
    with pytest.raises(train.CheckpointError, match="cut.safetensors: not a readable"):
        train.read_weights(str(cut), M.PRESETS["tiny"])
    other = dataclasses.replace(M.PRESETS["tiny"], video=dataclasses.replace(M.PRESETS["tiny"].video, width=96))
    with pytest.raises(train.CheckpointError, match=r"another model config \(video.width: checkpoint 64, this run 96"):
        train.read_weights(src, other)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(src, "pt") as f:                    # a checkpoint written before VideoConfig.cone_sampling existed
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    del cfg["video"]["cone_sampling"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=dict(meta, config=json.dumps(cfg)))
    assert train.read_weights(str(tmp_path / "old.safetensors"), M.PRESETS["tiny"])[4] == M.PRESETS["tiny"]
    for extra, ok in (({"min_event_len": 2}, True), ({"no_such_field": 1}, False)):   # a retired data field, an unknown one
        d = dict(json.loads(meta["data"]), **extra)
        save_file(tensors, str(tmp_path / "d.safetensors"), metadata=dict(meta, data=json.dumps(d)))
        if ok:
            assert train.read_weights(str(tmp_path / "d.safetensors"), M.PRESETS["tiny"])[5] == data.config_from_dict(json.loads(meta["data"]), "")
        else:
            with pytest.raises(data.DataError, match=r"d.safetensors: field 'data' expected DataConfig fields, found unknown \['no_such_field'\]"):
                train.read_weights(str(tmp_path / "d.safetensors"), M.PRESETS["tiny"])


def test_a_stage_from_a_run_with_other_action_targets_is_refused(droot, full_run, tmp_path):
    """--init-from a per-step run with --data.action-offsets: stopped before any step."""
    cfg = tiny(droot, tmp_path, stage=3, init_from=full_run[0])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, action_offsets=True))
    with pytest.raises(train.CheckpointError, match=r"stage2.safetensors: its action tower learned per-step actions, "
                                                      r"this run's data gives offsets"):
        train.main(cfg)
    assert not os.path.exists(tmp_path / "stage3.safetensors")
    # stage 1 trains no action tower: stage 2 may start from it with either targets
    cfg = dataclasses.replace(cfg, stage=2, steps=(3, 1, 3, 3, 3))
    assert train.main(cfg)[2][0] == 1


def test_stage5_text_sources_reach_the_video_tower(droot):
    ds = data.Dataset(droot)
    torch.manual_seed(0)
    m = M.WallWM(M.PRESETS["tiny"])
    windows = train.Windows(ds, "chunk", True, 0)
    b = windows.batch([0, 1], 0, 32)
    seen = {}
    m.video.blocks[0].text.register_forward_hook(lambda mod, args, kw, out: seen.update(ctx=kw["ctx"]), with_kwargs=True)
    flat = lambda key: [t for row in b[key] for t in row]         # noqa: E731
    expect = [m.text.encode(flat("instruction")), m.text.encode(flat("event_text")),
              m.latent_context(b)[0].reshape(2, M.PRESETS["tiny"].vlm.num_latents, -1)]
    assert b["event_text"][0][0] != b["instruction"][0][0]       # the L1 caption at the anchor is not the instruction
    for k in range(3):
        tokens, seg = train.mixed_context(m, b, torch.full((2, 1), k))
        m(b, text=(tokens, seg))
        n = expect[k].shape[1]
        assert torch.allclose(seen["ctx"][:, :n], expect[k].detach(), atol=1e-6)
        assert (seg[:, n:] == -1).all() and (seg[:, :n] == 0).all()


def test_init_from_a_run_on_other_data_is_refused(full_run, tmp_path):
    """Its towers learned states and actions normalised by its own data's statistics."""
    other = str(tmp_path / "data")
    data.generate(other, episodes=8, seed=5, per_shard=8, image_size=32)
    with pytest.raises(train.CheckpointError, match=r"stage1.safetensors: trained on data with other normalisation statistics"):
        train.main(tiny(other, tmp_path / "run", stage=2, init_from=full_run[0]))


def test_every_hidden_matrix_of_the_towers_goes_to_muon():
    """Every Linear weight inside a tower block, cross-view attention included, is a hidden matrix:
    Muon's. The AdamW share is input/output layers, embeddings, tables and vectors."""
    torch.manual_seed(0)
    m = M.WallWM(M.PRESETS["tiny"])
    opt = train.make_optimizer(m, ("text", "video", "action"), train.OptimConfig(), verbose=False)
    muon_ids = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    blocks = [(n, mod.weight) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)
              and (n.startswith("video.blocks.") or n.startswith("action.blocks."))]
    assert any(".xview." in n for n, _ in blocks) and len(blocks) > 20
    assert [n for n, w in blocks if id(w) not in muon_ids] == []
    adamw = {id(p) for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert id(m.video.view_angles) in adamw and id(m.video.patch_in.weight) in adamw and id(m.action.blocks[0].mod) in adamw
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    vectors = [n for n, p in m.named_parameters() if p.ndim < 2 and n.split(".")[0] in ("text", "video", "action")]
    assert len(vectors) > 20 and [n for n in vectors if decay[id(dict(m.named_parameters())[n])] != 0.0] == []
    assert decay[id(m.video.patch_in.weight)] == decay[id(m.action.blocks[0].mod)] == train.OptimConfig().weight_decay
    assert len(decay) == sum(p.numel() > 0 for n in ("text", "video", "action") for p in getattr(m, n).parameters())


def test_training_on_an_existing_dataset_says_when_data_would_make_another(tmp_path, capsys):
    """A root that already holds a dataset is trained on as it is; if --data describes another one (a
    40-episode directory under the tiny preset's 8), a note names the difference."""
    root = str(tmp_path / "d")
    data.generate(root, episodes=3, per_shard=16, image_size=32)
    capsys.readouterr()
    same = train.DataSpec(root=root, episodes=3, image_size=32)
    assert len(train.ensure_data(same, 0, 1)) == 3 and "note:" not in capsys.readouterr().out
    before = {f: os.path.getmtime(os.path.join(root, f)) for f in os.listdir(root) if f.startswith("shard-")}
    assert len(train.ensure_data(dataclasses.replace(same, episodes=5, image_size=64), 0, 1)) == 3
    assert {f: os.path.getmtime(os.path.join(root, f)) for f in before} == before          # nothing regenerated
    out = capsys.readouterr().out
    assert "note: training on the dataset already in" in out and "image_size 32, expected 64; 3 episodes, expected 5" in out


def test_bad_settings_are_refused_before_anything_is_written(droot, tmp_path):
    """A model that cannot be built, or --resume where no run was started, is refused naming the value or
    the file, and leaves no run directory behind."""
    bad = dataclasses.replace(train.PRESETS["tiny"][1].model, video=dataclasses.replace(train.PRESETS["tiny"][1].model.video, width=7))
    with pytest.raises(train.ConfigError, match="video.width 7 is not a multiple of video.heads 2"):
        train.main(tiny(droot, tmp_path / "w7", model=bad))
    with pytest.raises(train.CheckpointError, match=r"nothing/config.json: missing; --resume continues a run"):
        train.main(tiny(droot, tmp_path / "nothing", resume=True))
    assert not os.path.exists(tmp_path / "w7") and not os.path.exists(tmp_path / "nothing")


def test_the_main_job_prints_the_closed_loop_and_claims_tables(droot, tmp_path, monkeypatch):
    """`python train.py` ends with the closed-loop table, the paired table and the report's suites
    beside ours, in results.md too (the rollouts are faked here: eval.py's tests cover them)."""
    import env as world
    import eval as E
    cell = lambda p: {"success": 0.0, "success_ci": (0.0, 1.0), "progress": sum(p) / len(p), "progress_ci": (0.0, 1.0),   # noqa: E731
                      "episodes": len(p), "per_episode": {"progress": p, "success": [False] * len(p)}}
    fake = {m: {(f, s): cell([10.0 * (m == "event_oracle")]) for f in world.FAMILIES for s in world.SPLITS} for m in E.MODES}
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: fake)
    train.main(tiny(droot, tmp_path / "r", steps=(1,) * 5, eval_episodes=1))
    text = open(tmp_path / "r" / "results.md").read()
    assert "closed loop, 1 episodes per cell" in text and "paired against the baseline" in text
    assert "| Reasoning | press_order, put_all; seen | 71.6 / 59.5 / 56.4 | 10.0 [10.0, 10.0] |" in text
