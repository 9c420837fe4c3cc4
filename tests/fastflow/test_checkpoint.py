"""Checkpoint sets in-process: round trip, a crash at every point of a save (and of the save after it), the
manifest's checks, atomic writes, and the writability check. The SIGKILL versions run in test_resume.py."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from faults import SAVE_POINTS

import fastflow.checkpoint as ck
from fastflow.checkpoint import MANIFEST, build_model, load_checkpoint, save_checkpoint
from fastflow.config import ModelConfig
from fastflow.errors import UserError
from fastflow.io import atomic_save, atomic_write_text, check_writable
from fastflow.unet import UNet

CFG = ModelConfig(channels=(4, 8), emb_dim=8, groups=2)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the fault point runs (except atomic_save's temp-file cleanup)."""


def _model(step: int) -> UNet:
    torch.manual_seed(step)
    return UNet(CFG)


def _save(d, step: int) -> None:
    m = _model(step)
    save_checkpoint(d, m, CFG, None, _model(step + 1000), {"step": step, "x": torch.full((3,), float(step))}, step)


def _crash_at(monkeypatch, point: str | None, step: int | None):
    def fault(p, s):
        if p == point and s == step:
            raise Killed(p)

    monkeypatch.setattr(ck, "fault", fault)


def _loaded_step(d) -> int:
    c = load_checkpoint(d)
    assert c.state["step"] == c.step  # never parts of two sets
    expect = _model(c.step).state_dict()
    assert all(torch.equal(c.weights[k], expect[k]) for k in expect)
    return c.step


def test_round_trip(tmp_path):
    _save(tmp_path, 7)
    c = load_checkpoint(tmp_path)
    assert c.step == 7 and c.model_cfg == CFG and c.path == tmp_path
    m = build_model(c, use_ema=False)
    for k, v in _model(7).state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
    ema = build_model(c)  # EMA weights where saved
    for k, v in _model(1007).state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)


# Every point for the first crash; for the second, one of each kind (the cross product takes 40 s for nothing new).
@pytest.mark.parametrize(
    "second", ["ckpt.previous.swapping", "ckpt.model.safetensors.tmp", "ckpt.state.pt", "ckpt.manifest.json.tmp"]
)
@pytest.mark.parametrize("first", SAVE_POINTS)
def test_crash_anywhere_in_two_saves_loads_the_newest_complete_set(tmp_path, monkeypatch, first, second):
    """Saves at steps 1 and 2 complete; the save of 3 crashes at ``first``; the next save (of 4, by a run that
    resumed) crashes at ``second``; then a save of 5 completes. After each, the newest complete set loads."""
    _crash_at(monkeypatch, None, None)
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    newest, top_complete = 2, True
    for step, point in ((3, first), (4, second)):
        _crash_at(monkeypatch, point, step)
        if not top_complete and point.startswith("ckpt.previous."):
            _save(tmp_path, step)  # an incomplete top-level set leaves previous/ alone: those points never come
            newest, top_complete = step, True
        else:
            with pytest.raises(Killed):
                _save(tmp_path, step)
            # the top-level set is still complete if the crash came before the first part's rename, or after all
            untouched = ("ckpt.begin", "ckpt.model.safetensors.tmp", "ckpt.manifest.json")
            top_complete = point in untouched or point.startswith("ckpt.previous.")
            if point == "ckpt.manifest.json":  # the crash came after the manifest landed: the set is complete
                newest = step
        assert _loaded_step(tmp_path) == newest, (step, point)
    _crash_at(monkeypatch, None, None)
    _save(tmp_path, 5)
    assert _loaded_step(tmp_path) == 5
    assert (tmp_path / "previous").is_dir() and not (tmp_path / "previous.tmp").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_first_save_crash_is_no_checkpoint(tmp_path, monkeypatch):
    _crash_at(monkeypatch, "ckpt.state.pt.tmp", 1)
    with pytest.raises(Killed):
        _save(tmp_path, 1)
    with pytest.raises(UserError, match="no manifest.json"):
        load_checkpoint(tmp_path)


def _rewrite_manifest(d):
    man = json.loads((d / MANIFEST).read_text())
    man["files"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in man["files"]}
    (d / MANIFEST).write_text(json.dumps(man))


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "model.safetensors does not match manifest.json"),
        (lambda d: (d / "state.pt").unlink(), "state.pt is missing"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "manifest.json is not JSON"),
        (lambda d: (d / MANIFEST).write_text('{"format": "x"}'), "not a fastflow-checkpoint-1 manifest"),
        # a manifest naming a file outside the set (path traversal) is not a manifest
        (lambda d: (d / MANIFEST).write_text(json.dumps({"format": ck.FORMAT, "step": 1, "files": {"../x": "0" * 64, "model.safetensors": "0" * 64, "config.json": "0" * 64}})), "not a fastflow-checkpoint-1 manifest"),
    ],
)  # fmt: skip
def test_damaged_set_without_previous_is_refused_naming_the_file(tmp_path, damage, phrase):
    _save(tmp_path, 1)
    damage(tmp_path)
    with pytest.raises(UserError, match=phrase) as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


def test_damaged_set_falls_back_to_previous(tmp_path, capsys):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    assert _loaded_step(tmp_path) == 1
    assert "using the complete set in" in capsys.readouterr().err


def test_consistent_but_broken_parts_are_refused(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    _rewrite_manifest(tmp_path)
    with pytest.raises(UserError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path)


def test_config_that_does_not_fit_the_weights(tmp_path):
    _save(tmp_path, 1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["channels"] = [4, 16]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _rewrite_manifest(tmp_path)
    with pytest.raises(UserError, match=r"model.safetensors weights do not match its config.json \(.*another shape"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "model",
    [{"channels": "abc"}, {"channels": [4, 8, 8, 8]}, {"emb_dim": -1}, {"bogus": 1}, [1, 2], {"mean_flow": 1}],
)
def test_invalid_model_config_is_one_line(tmp_path, model):
    _save(tmp_path, 1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"] = model if isinstance(model, list) else {**cfg["model"], **model}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _rewrite_manifest(tmp_path)
    with pytest.raises(UserError, match="config.json") as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


def test_a_checkpoint_from_before_meanflow_loads_as_flow_matching(tmp_path):
    """config.json without ``mean_flow`` (model) and ``objective`` (train), as every checkpoint written before
    MeanFlow: a flow-matching U-Net, objective ``flow``. The objective is recorded from then on."""
    from fastflow.config import TrainConfig

    save_checkpoint(tmp_path, _model(1), CFG, TrainConfig(objective="meanflow"), None, None, 1)
    assert load_checkpoint(tmp_path).objective == "meanflow"  # as recorded (a flow U-Net, but what was asked)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"].pop("mean_flow") is False and cfg["train"].pop("objective") == "meanflow"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _rewrite_manifest(tmp_path)
    c = load_checkpoint(tmp_path)
    assert c.model_cfg == CFG and not c.model_cfg.mean_flow and c.objective == "flow"
    assert all(torch.equal(build_model(c).state_dict()[k], v) for k, v in _model(1).state_dict().items())
    mf = UNet(ModelConfig(channels=(4, 8), emb_dim=8, groups=2, mean_flow=True))
    save_checkpoint(tmp_path, mf, mf.cfg, None, None, None, 2)  # weights only: the U-Net says which
    assert load_checkpoint(tmp_path).objective == "meanflow"
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["mean_flow"] = False  # the gap MLP's weights without the flag: refused like any other mismatch
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _rewrite_manifest(tmp_path)
    with pytest.raises(UserError, match=r"weights do not match its config.json \(.*unexpected \(e.g. gap_mlp"):
        load_checkpoint(tmp_path)


def test_nothing_is_touched_when_serialising_fails(tmp_path):
    _save(tmp_path, 1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(Exception):  # noqa: B017 - any error from pickling
        save_checkpoint(tmp_path, _model(2), CFG, None, None, {"bad": lambda: 0}, 2)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_atomic_save_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise Killed

    with pytest.raises(Killed):
        atomic_save(target, write)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_check_writable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    check_writable(tmp_path / "new" / "deeper", "--x", kind="dir")
    check_writable(f, "--x", kind="file")
    check_writable(f, "--x")
    for path, kind, phrase in [
        (f / "sub", "dir", "is a file, not a folder"),
        (f / "a.png", "file", "is a file, not a folder"),
        (f, "dir", "is a file, not a folder"),
        (tmp_path, "file", "is a folder, not a file"),
    ]:
        with pytest.raises(UserError, match=phrase):
            check_writable(path, "--x", kind=kind)
