"""Untrusted checkpoint files: loading never runs code from them, and a broken or foreign file is refused with one
line naming it. The attacker controls the whole folder, so each doctored part gets a manifest that matches it:
the hash check cannot be what saves us."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

from fastflow.checkpoint import MANIFEST, build_model, load_checkpoint
from fastflow.errors import UserError


class Payload:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _rewrite_manifest(d):
    man = json.loads((d / MANIFEST).read_text())
    man["files"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in man["files"]}
    (d / MANIFEST).write_text(json.dumps(man))


@pytest.fixture
def ckpt(tiny_run, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_run / "model", d)
    return d


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


@pytest.fixture(scope="module")
def payloads(tmp_path_factory, cli):
    """The same code-running payload as a torch zip file and as a plain pickle, and the marker file it creates."""
    d = tmp_path_factory.mktemp("payloads")
    marker = d / "pwned"
    payload = Payload(f"touch {marker}")
    files = {"zip": d / "zip.pt", "pickle": d / "plain.pkl"}
    torch.save({"step": 3, "optimizer": payload}, files["zip"])
    files["pickle"].write_bytes(pickle.dumps(payload))
    # The payloads are real: the unsafe loaders run them (in a child, so that this process stays clean).
    check = (
        "import pickle, sys, torch; torch.load(sys.argv[1], weights_only=False); "
        f"assert {str(marker)!r} and __import__('os').path.exists({str(marker)!r}); __import__('os').unlink({str(marker)!r}); "
        "pickle.load(open(sys.argv[2], 'rb'))"
    )
    p = cli.run([sys.executable, "-c", check, str(files["zip"]), str(files["pickle"])])
    assert p.returncode == 0, p.stderr
    assert marker.exists(), "the pickle payload should run under pickle.load"
    marker.unlink()
    return marker, files


@pytest.mark.parametrize("kind", ["zip", "pickle"])
def test_code_in_state_pt_does_not_run_and_is_refused(ckpt, tmp_path, kind, payloads, cli, mnist_root):
    marker, files = payloads
    shutil.copy(files[kind], ckpt / "state.pt")
    _rewrite_manifest(ckpt)
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}

    with pytest.raises(UserError, match=r"state\.pt: refused"):  # in-process
        load_checkpoint(ckpt)
    assert not marker.exists()

    # Through the real command line: --resume reads state.pt.
    cmd = [
        sys.executable,
        "-m",
        "fastflow.train",
        "--preset",
        "tiny",
        "--subset",
        "128",
        "--max-steps",
        "6",
        "--amp",
        "none",
    ]
    cmd += [
        "--device",
        "cpu",
        "--data-root",
        str(mnist_root),
        "--model-dir",
        str(ckpt),
        "--result-dir",
        str(tmp_path / "r"),
    ]
    p = cli.run([*cmd, "--resume"], timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    line = _one_line(p.stderr)
    assert "state.pt: refused" in line and str(ckpt) in line
    assert not marker.exists(), "the payload ran"
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("part", ["model.safetensors", "ema.safetensors", "config.json"])
def test_pickle_payload_in_other_parts_is_refused(ckpt, part, payloads):
    marker, files = payloads
    shutil.copy(files["zip"], ckpt / part)
    _rewrite_manifest(ckpt)
    with pytest.raises(UserError, match=part.replace(".", r"\.")) as e:
        load_checkpoint(ckpt)
    assert "\n" not in str(e.value)
    assert not marker.exists()


CASES = {
    # name: (how to damage the folder, rewrite the manifest to match?, key phrase)
    "truncated safetensors": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), False, "model.safetensors does not match manifest.json"),
    "truncated safetensors, matching manifest": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), True, "model.safetensors: not a readable safetensors file"),
    "one flipped byte": (lambda d: _flip(d / "ema.safetensors", 4000), False, "ema.safetensors does not match manifest.json"),
    "corrupt header, matching manifest": (lambda d: _flip(d / "model.safetensors", 12), True, "model.safetensors: not a readable safetensors file"),
    "empty safetensors file": (lambda d: (d / "model.safetensors").write_bytes(b""), True, "model.safetensors: not a readable safetensors file"),
    "a PNG named model.safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500)), True, "model.safetensors: not a readable safetensors file"),
    "foreign safetensors (another network)": (lambda d: save_file({"fc.weight": torch.zeros(3, 3)}, str(d / "model.safetensors")), True, "weights do not match its config.json"),
    "truncated state.pt, matching manifest": (lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:3000]), True, "state.pt: refused"),
    "state.pt of another program": (lambda d: torch.save([1, 2, 3], d / "state.pt"), True, "state.pt: not a fastflow training state"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{oops"), True, "config.json: unreadable model config"),
    "manifest.json not JSON": (lambda d: (d / MANIFEST).write_text("\x00\x01"), False, "manifest.json is not JSON"),
}  # fmt: skip


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", list(CASES))
def test_broken_or_foreign_files_are_refused_in_one_line(ckpt, name):
    damage, rewrite, phrase = CASES[name]
    damage(ckpt)
    if rewrite:
        _rewrite_manifest(ckpt)
    with pytest.raises(UserError) as e:
        build_model(load_checkpoint(ckpt))
    msg = str(e.value)
    assert phrase in msg and "\n" not in msg, msg
    assert str(ckpt) in msg


def test_sample_cli_refuses_a_truncated_checkpoint_in_one_line(ckpt, tmp_path, cli):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "grid.png"
    p = cli.run(
        [sys.executable, "-m", "fastflow.sample", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu"],
        timeout=300,
    )
    assert p.returncode == 2
    line = _one_line(p.stderr)
    assert f"checkpoint {ckpt}: model.safetensors does not match manifest.json" in line
    assert not out.exists()
