"""Checkpoints: ``model.safetensors`` (+ ``ema.safetensors``) + ``config.json`` + ``state.pt`` + ``manifest.json``.

Every part is written atomically (temporary file, fsync, rename) and the manifest, written last, records the
step and a SHA-256 of each part, so a set that a kill left half-written is detected. Before a new set is
written, the current complete one is hard-linked into ``previous/`` (no copy), and loading falls back to it.

Loading never runs code from a file: weights go through safetensors, the training state through
``torch.load(weights_only=True)``, the rest is JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, model_config_from_dict
from .errors import UserError
from .io import atomic_save, atomic_write_json
from .unet import UNet

__all__ = ["save_checkpoint", "load_checkpoint", "load_pretrained", "Checkpoint", "find_complete"]

MANIFEST = "manifest.json"
PARTS = ("model.safetensors", "ema.safetensors", "config.json", "state.pt")
FORMAT = "fastflow-checkpoint-1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _is_complete(d: Path) -> dict | None:
    """The manifest of ``d`` if every part it lists is there with the recorded hash, else None."""
    try:
        man = json.loads((d / MANIFEST).read_text())
        if man.get("format") != FORMAT:
            return None
        for name, digest in man["files"].items():
            if _sha256(d / name) != digest:
                return None
        return man
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _keep_previous(d: Path) -> None:
    """Hard-link the current complete set into ``d/previous`` (swapped in atomically by rename)."""
    man = _is_complete(d)
    if man is None:
        return
    tmp, prev, old = d / "previous.tmp", d / "previous", d / "previous.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in [*man["files"], MANIFEST]:
        try:
            os.link(d / name, tmp / name)
        except OSError:  # a file system without hard links: copy
            shutil.copy2(d / name, tmp / name)
    shutil.rmtree(old, ignore_errors=True)
    if prev.exists():
        os.replace(prev, old)
    os.replace(tmp, prev)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    train_cfg=None,
    ema: torch.nn.Module | None = None,
    state: dict | None = None,
    step: int = 0,
) -> Path:
    """Write a complete checkpoint set into ``directory``; the previous complete set moves to ``previous/``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _keep_previous(d)
    written = {}

    def part(name, write):
        atomic_save(d / name, write)
        written[name] = _sha256(d / name)

    part("model.safetensors", lambda p: save_file(_state_dict_cpu(model), p, metadata={"format": FORMAT}))
    if ema is not None:
        part("ema.safetensors", lambda p: save_file(_state_dict_cpu(ema), p, metadata={"format": FORMAT}))
    elif (d / "ema.safetensors").exists():
        (d / "ema.safetensors").unlink()
    config = {
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(train_cfg) if train_cfg is not None else None,
        "step": step,
    }
    part("config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    if state is not None:
        part("state.pt", lambda p: torch.save(state, p))
    atomic_write_json(d / MANIFEST, {"format": FORMAT, "step": step, "files": written})
    return d


def find_complete(directory: str | Path) -> tuple[Path, dict]:
    """The newest complete set under ``directory`` (itself, else ``previous/``), with its manifest."""
    d = Path(directory)
    if not d.exists():
        raise UserError(f"checkpoint {d}: no such folder")
    if not d.is_dir():
        raise UserError(f"checkpoint {d}: not a folder (pass the folder that holds model.safetensors)")
    for cand in (d, d / "previous", d / "previous.tmp"):
        man = _is_complete(cand)
        if man is not None:
            if cand != d:
                print(f"warning: {d} holds an incomplete checkpoint; using the complete one in {cand} (step {man['step']})")
            return cand, man
    if not (d / MANIFEST).exists() and not (d / "model.safetensors").exists():
        raise UserError(f"checkpoint {d}: no model.safetensors or {MANIFEST} (train first, or pass the right --checkpoint)")
    raise UserError(f"checkpoint {d}: damaged (a file does not match {d / MANIFEST}) and no complete previous set")


@dataclasses.dataclass
class Checkpoint:
    path: Path
    model_cfg: ModelConfig
    config: dict
    weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor] | None
    state: dict | None
    step: int


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def load_checkpoint(directory: str | Path, with_state: bool = True) -> Checkpoint:
    """Read a checkpoint without running any code from it."""
    d, man = find_complete(directory)
    try:
        config = json.loads((d / "config.json").read_text())
        model_cfg = model_config_from_dict(config["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{d / 'config.json'}: unreadable model config ({type(e).__name__}: {e})") from None
    weights = _load_weights(d / "model.safetensors")
    ema = _load_weights(d / "ema.safetensors") if "ema.safetensors" in man["files"] else None
    state = None
    if with_state and "state.pt" in man["files"]:
        try:
            state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            raise UserError(f"{d / 'state.pt'}: refused ({str(e).splitlines()[0][:160]})") from None
    return Checkpoint(d, model_cfg, config, weights, ema, state, int(man["step"]))


def build_model(ckpt: Checkpoint, use_ema: bool = True) -> UNet:
    """A UNet from ``ckpt``'s config with its (EMA, where saved) weights; a shape mismatch is a UserError."""
    model = UNet(ckpt.model_cfg)
    weights = ckpt.ema_weights if (use_ema and ckpt.ema_weights is not None) else ckpt.weights
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:160]
        raise UserError(f"checkpoint {ckpt.path}: weights do not match its config.json ({first})") from None
    return model


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> UNet:
    """A ready model (eval mode, on ``device``) from a checkpoint folder; EMA weights where saved."""
    ckpt = load_checkpoint(path, with_state=False)
    return build_model(ckpt, use_ema).to(device).eval()
