"""Checkpoints: ``model.safetensors`` (+ ``ema.safetensors``) + ``config.json`` + ``state.pt`` + ``manifest.json``.

Every part is written atomically (temporary file, fsync, rename) and the manifest, written last, records the
step and a SHA-256 of each part, so a set that a kill left half-written is detected. Before a new set is
written, the current complete one is hard-linked into ``previous/`` (no copy), and loading falls back to it.

Why this survives a SIGKILL at any instant (tests/fastflow/test_resume.py kills at each point named by
:func:`~fastflow.io.fault`):

- ``previous/`` is replaced only by a rename of a fully linked ``previous.tmp/``; while it is being rebuilt the
  top-level set is still complete (nothing in it has been touched yet).
- Parts are replaced by rename, so ``previous/``'s hard links keep the old contents; the top-level set is
  incomplete (hash mismatch) from the first part written until the manifest lands, and during that whole window
  ``previous/`` holds the last complete set.
- A save that starts while the top-level set is incomplete (a resumed run after such a kill) leaves
  ``previous/`` alone: it still holds the newest complete set.

Loading never runs code from a file: weights go through safetensors, the training state through
``torch.load(weights_only=True)``, the rest is JSON. Each part is read once into memory, checked against the
manifest's hash, and parsed from those same bytes, so a writer racing the reader cannot slip in another file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import ModelConfig, model_config_from_dict
from .errors import UserError
from .io import atomic_save, fault, remove_stale_temps
from .unet import UNet

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_pretrained",
    "build_model",
    "init_checkpoint",
    "load_start",
    "check_resumable",
    "kept_note",
    "load_for_resume",
    "load_weights_into",
    "Checkpoint",
    "find_complete",
    "has_checkpoint",
    "own_folder",
]

MANIFEST = "manifest.json"
PARTS = ("model.safetensors", "ema.safetensors", "config.json", "state.pt")
REQUIRED = ("model.safetensors", "config.json")
FORMAT = "fastflow-checkpoint-1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write(path: Path, data: bytes, point: str, step: int) -> None:
    """Atomically write ``data``; ``point`` names the fault hooks (temporary file written, then renamed)."""

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)
        fault(f"{point}.tmp", step)  # the temporary file is complete but not yet renamed

    atomic_save(path, write)
    fault(point, step)


# -- saving ----------------------------------------------------------------------------------------------------


def _keep_previous(d: Path, step: int) -> None:
    """Hard-link the current complete set into ``d/previous`` (swapped in atomically by rename)."""
    try:
        man, _ = _read_set(d)
    except _Incomplete:
        return  # d is mid-save (a kill); previous/ already holds the newest complete set: keep it
    tmp, prev, old = d / "previous.tmp", d / "previous", d / "previous.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in [*man["files"], MANIFEST]:
        try:
            os.link(d / name, tmp / name)
        except OSError:  # a file system without hard links: copy
            shutil.copy2(d / name, tmp / name)
    fault("ckpt.previous.linked", step)
    shutil.rmtree(old, ignore_errors=True)
    if prev.exists():
        os.replace(prev, old)
    fault("ckpt.previous.swapping", step)  # previous/ is briefly absent; the top-level set is still complete
    os.replace(tmp, prev)
    shutil.rmtree(old, ignore_errors=True)
    fault("ckpt.previous.done", step)


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    train_cfg=None,
    ema: torch.nn.Module | None = None,
    state: dict | None = None,
    step: int = 0,
) -> Path:
    """Write a complete checkpoint set into ``directory``; the previous complete set moves to ``previous/``.

    Call from one process only (rank 0): concurrent writers to one folder are not supported.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Serialise everything before touching the folder: an error here leaves the saved set as it was.
    blobs = {"model.safetensors": save_safetensors(_state_dict_cpu(model), metadata={"format": FORMAT})}
    if ema is not None:
        blobs["ema.safetensors"] = save_safetensors(_state_dict_cpu(ema), metadata={"format": FORMAT})
    config = {
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(train_cfg) if train_cfg is not None else None,
        "step": step,
    }
    blobs["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    if state is not None:
        blobs["state.pt"] = _torch_bytes(state)
    manifest = {
        "format": FORMAT,
        "step": step,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
    }

    remove_stale_temps(d, [*PARTS, MANIFEST])
    fault("ckpt.begin", step)
    _keep_previous(d, step)
    for name, data in blobs.items():
        _write(d / name, data, f"ckpt.{name}", step)
    for name in PARTS:  # a part this set does not have (e.g. EMA switched off) must not linger
        if name not in blobs and (d / name).exists():
            (d / name).unlink()
    _write(d / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), "ckpt.manifest.json", step)
    return d


# -- ownership -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def own_folder(directory: str | Path) -> Iterator[None]:
    """Hold ``directory`` for one training run: a second run on the same folder gets a one-line
    :class:`UserError` instead of silently overwriting this one's checkpoints.

    An exclusive ``flock`` on the folder itself (no lock file: a refused or failed run changes nothing in it).
    The kernel drops the lock when the process ends, however it ends, so a killed run never leaves the folder
    stuck. (Where ``fcntl`` does not exist, nothing is locked.)
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(
                f"--model-dir {d}: another training run is using it; wait for it to end or pass another --model-dir"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


# -- loading ---------------------------------------------------------------------------------------------------


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint set, complete or not (its own or a ``previous/`` one)."""
    d = Path(directory)
    return (d / MANIFEST).exists() or (d / "previous").exists()


class _Incomplete(Exception):
    """Why a folder does not hold a complete set (one line, names the file)."""


def _read_set(d: Path) -> tuple[dict, dict[str, bytes]]:
    """The manifest of ``d`` and the bytes of every part it lists, each checked against its SHA-256."""
    mpath = d / MANIFEST
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise _Incomplete(f"no {MANIFEST}") from None
    except OSError as e:
        raise _Incomplete(f"{MANIFEST} is unreadable ({e.strerror})") from None
    try:
        man = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _Incomplete(f"{MANIFEST} is not JSON (damaged)") from None
    ok = (
        isinstance(man, dict)
        and man.get("format") == FORMAT
        and isinstance(man.get("step"), int)
        and isinstance(man.get("files"), dict)
        and all(n in man["files"] for n in REQUIRED)
        and all(n in PARTS and isinstance(h, str) and _HEX64.fullmatch(h) for n, h in man["files"].items())
    )
    if not ok:
        raise _Incomplete(f"{MANIFEST} is not a {FORMAT} manifest")
    blobs = {}
    for name, digest in man["files"].items():
        try:
            data = (d / name).read_bytes()
        except FileNotFoundError:
            raise _Incomplete(f"{name} is missing (listed in {MANIFEST})") from None
        except OSError as e:
            raise _Incomplete(f"{name} is unreadable ({e.strerror})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise _Incomplete(f"{name} does not match {MANIFEST} (truncated, or changed after saving)")
        blobs[name] = data
    return man, blobs


def find_complete(directory: str | Path) -> tuple[Path, dict, dict[str, bytes]]:
    """The newest complete set under ``directory`` (itself, else ``previous/``): its folder, manifest and the
    verified bytes of each part. Raises :class:`UserError` naming what is wrong when there is none."""
    d = Path(directory)
    if not d.exists():
        raise UserError(f"checkpoint {d}: no such folder")
    if not d.is_dir():
        raise UserError(f"checkpoint {d}: not a folder (pass the folder that holds model.safetensors)")
    try:
        man, blobs = _read_set(d)
        return d, man, blobs
    except _Incomplete as e:
        why = str(e)
    prev = d / "previous"
    if prev.is_dir():
        try:
            man, blobs = _read_set(prev)
        except _Incomplete:
            pass
        else:
            print(
                f"warning: checkpoint {d} is incomplete ({why}); using the complete set in {prev} (step {man['step']})",
                file=sys.stderr,
            )
            return prev, man, blobs
    if why == f"no {MANIFEST}":
        if not any((d / n).exists() for n in PARTS):
            raise UserError(
                f"checkpoint {d}: no checkpoint here (no {MANIFEST}, no model.safetensors); train first or pass the right --checkpoint"
            )
        raise UserError(
            f"checkpoint {d}: no {MANIFEST}, so not a complete checkpoint (an interrupted first save, or not a fastflow checkpoint)"
        )
    tail = "; previous/ holds no complete set either" if prev.exists() else "; no previous/ set to fall back on"
    raise UserError(f"checkpoint {d}: {why}{tail}")


@dataclasses.dataclass
class Checkpoint:
    path: Path
    model_cfg: ModelConfig
    config: dict
    weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor] | None
    state: dict | None
    step: int

    @property
    def state_path(self) -> Path:
        """The file that holds the training state (named in error messages)."""
        return self.path / "state.pt"

    @property
    def objective(self) -> str:
        """The training objective recorded in config.json (``flow`` or ``meanflow``). Checkpoints from before
        the setting existed, and weights saved without a training config, say it through the U-Net's inputs."""
        train = self.config.get("train")
        recorded = train.get("objective") if isinstance(train, dict) else None
        if isinstance(recorded, str):
            return recorded
        return "meanflow" if self.model_cfg.mean_flow else "flow"


def _parse_weights(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        weights = load_safetensors(data)
    except Exception as e:  # safetensors raises several types for a bad header; all mean "not ours"
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    if not weights:
        raise UserError(f"{path}: holds no tensors")
    return weights


def _first_line(e: BaseException, n: int = 160) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:n]


def _load_error(e: BaseException) -> str:
    """The informative line of a ``torch.load(weights_only=True)`` refusal (its first line is a generic note)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        return "it holds more than tensors and plain values: " + text.split(marker, 1)[1].strip().splitlines()[0][:160]
    if "PytorchStreamReader" in text or isinstance(e, EOFError):
        return "truncated or damaged: not a complete torch file"
    return _first_line(e)


def _check_fits(d: Path, cfg: ModelConfig, parts: dict[str, dict[str, torch.Tensor] | None]) -> None:
    """Every weights file has exactly the tensors (names, shapes) of ``UNet(cfg)``: a one-line error otherwise."""
    with torch.device("meta"):  # shapes only, no memory
        want = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    for name, weights in parts.items():
        if weights is None:
            continue
        got = {k: tuple(v.shape) for k, v in weights.items()}
        if got == want:
            continue
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        shapes = [f"{k} {got[k]} not {want[k]}" for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
        what = "; ".join(
            x
            for x in (
                f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
                f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else "",
            )
            if x
        )
        raise UserError(f"checkpoint {d}: {name} weights do not match its config.json ({what})")


_BOOLS = ("mean_flow",)  # the ModelConfig fields that are switches; every other one but channels is an int > 0


def _check_model_cfg(path: Path, cfg: ModelConfig) -> None:
    skip = ("channels", *_BOOLS)
    ints = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}
    bad = [k for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    bad += [k for k in _BOOLS if not isinstance(getattr(cfg, k), bool)]
    ch = cfg.channels
    if not ch or len(ch) > 3 or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in ch):
        bad.append("channels")
    if bad:
        raise UserError(f"{path}: invalid model config ({', '.join(f'{k}={getattr(cfg, k)!r}' for k in bad)})")


def load_checkpoint(directory: str | Path, with_state: bool = True) -> Checkpoint:
    """Read a checkpoint without running any code from it; every problem is a one-line :class:`UserError`."""
    d, man, blobs = find_complete(directory)
    cpath = d / "config.json"
    try:
        config = json.loads(blobs["config.json"])
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise ValueError("no 'model' section")
        model_cfg = model_config_from_dict(config["model"])
    except UserError as e:
        raise UserError(f"{cpath}: {e}") from None
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{cpath}: unreadable model config ({_first_line(e)})") from None
    _check_model_cfg(cpath, model_cfg)
    weights = _parse_weights(d / "model.safetensors", blobs["model.safetensors"])
    ema = _parse_weights(d / "ema.safetensors", blobs["ema.safetensors"]) if "ema.safetensors" in blobs else None
    _check_fits(d, model_cfg, {"model.safetensors": weights, "ema.safetensors": ema})
    state = None
    if with_state and "state.pt" in blobs:
        spath = d / "state.pt"
        try:
            with warnings.catch_warnings():  # e.g. "pickle protocol 4": the refusal below is the message
                warnings.simplefilter("ignore")
                state = torch.load(io.BytesIO(blobs["state.pt"]), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for a forbidden global, RuntimeError for a bad zip, ...
            raise UserError(f"{spath}: refused ({_load_error(e)})") from None
        if not isinstance(state, dict):
            raise UserError(f"{spath}: not a fastflow training state (a {type(state).__name__}, not a dict)")
    return Checkpoint(d, model_cfg, config, weights, ema, state, int(man["step"]))


def load_weights_into(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path, what: str = "weights"
) -> None:
    """``module.load_state_dict(weights, strict=True)``, a mismatch being a one-line :class:`UserError`."""
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise UserError(f"checkpoint {path}: {what} do not match its config.json ({detail[:200]})") from None


def init_checkpoint(init_from: str) -> tuple[Checkpoint, ModelConfig] | None:
    """``--init-from DIR``: the checkpoint in DIR and the model config of the run that starts from it (DIR's, with
    the mean-flow gap input); None without ``--init-from``. Every problem with DIR is a one-line UserError naming
    the flag."""
    if not init_from:
        return None
    try:
        ck = load_checkpoint(init_from, with_state=False)
    except UserError as e:
        raise UserError(f"--init-from: {e}") from None
    return ck, dataclasses.replace(ck.model_cfg, mean_flow=True)


def load_start(model: torch.nn.Module, ck: Checkpoint) -> str:
    """``--init-from``: ``ck``'s EMA weights (its raw ones if it has none) into ``model``, whose config is ``ck``'s
    plus the gap input. A flow-matching checkpoint lacks only the gap MLP, which keeps ``model``'s initialisation
    (last layer zero: the model starts as ``ck``'s field for every s). Returns which weights, for the start line."""
    which = "EMA" if ck.ema_weights is not None else "raw"
    weights = ck.ema_weights if ck.ema_weights is not None else ck.weights
    if not ck.model_cfg.mean_flow:
        weights = {**{k: v for k, v in model.state_dict().items() if k.startswith("gap_mlp.")}, **weights}
    load_weights_into(model, weights, ck.path, f"{which} weights")
    return f"{which} weights of {ck.path} (step {ck.step}, objective {ck.objective})"


def load_for_resume(
    directory: Path, model: torch.nn.Module, ema: torch.nn.Module | None, model_cfg: ModelConfig, train_cfg, keys
) -> Checkpoint | None:
    """``--resume``: the checkpoint in ``directory`` with its weights loaded into ``model`` (and the EMA's into
    ``ema``), after :func:`check_resumable`; None where there is none. Its ``state`` is for the trainer to load."""
    if not has_checkpoint(directory):
        return None
    ck = load_checkpoint(directory)
    check_resumable(ck, model_cfg, train_cfg.objective, keys, train_cfg.ema_decay)
    load_weights_into(model, ck.weights, ck.path)
    if ema is not None:
        load_weights_into(ema, ck.ema_weights, ck.path, "EMA weights")
    return ck


def kept_note(model_dir: Path, last_good: int | None) -> str:
    """What is left on disk when a run stops with an error: the last checkpoint it wrote or resumed from, or the
    folder as it was."""
    if last_good is not None:
        return f"last good checkpoint: {model_dir} (step {last_good}), left as it was"
    if has_checkpoint(model_dir):
        return f"this run wrote no checkpoint; {model_dir} is left as it was"
    return "no checkpoint was written"


def check_resumable(ck: Checkpoint, model_cfg: ModelConfig, objective: str, state_keys, ema_decay: float) -> dict:
    """The training state of ``ck`` if a run of ``model_cfg`` (trained with ``objective``, keeping an EMA if
    ``ema_decay`` > 0) can continue it; otherwise a one-line :class:`UserError` saying what differs."""

    def show(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    if ck.model_cfg != model_cfg:
        diff = ", ".join(
            f"objective {ck.objective} (flags: {objective})"
            if f.name == "mean_flow"  # not a flag: --objective sets it
            else f"{f.name} {show(getattr(ck.model_cfg, f.name))} (flags: {show(getattr(model_cfg, f.name))})"
            for f in dataclasses.fields(ModelConfig)
            if getattr(ck.model_cfg, f.name) != getattr(model_cfg, f.name)
        )
        raise UserError(f"--resume: {ck.path} holds another model: {diff}; pass the same --preset and model flags")
    st, spath = ck.state, ck.state_path
    if st is None:
        raise UserError(f"--resume: {ck.path} has no training state ({spath.name}); it can be sampled, not resumed")
    missing = [k for k in state_keys if k not in st]
    if missing:
        raise UserError(f"--resume: {spath}: not a fastflow training state (no {', '.join(missing)})")
    if ema_decay > 0 and ck.ema_weights is None:
        raise UserError(f"--resume: {ck.path} has no EMA weights but --ema-decay is {ema_decay}")
    return st


def build_model(ckpt: Checkpoint, use_ema: bool = True) -> UNet:
    """A UNet from ``ckpt``'s config with its (EMA, where saved) weights; a shape mismatch is a UserError."""
    model = UNet(ckpt.model_cfg)
    ema = use_ema and ckpt.ema_weights is not None
    load_weights_into(model, ckpt.ema_weights if ema else ckpt.weights, ckpt.path, "EMA weights" if ema else "weights")
    return model


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> UNet:
    """A ready model (eval mode, on ``device``) from a checkpoint folder; EMA weights where saved."""
    ckpt = load_checkpoint(path, with_state=False)
    return build_model(ckpt, use_ema).to(device).eval()
