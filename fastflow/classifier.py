"""A small CNN that judges generated digits; trained once on MNIST's training set and cached.

Its 128-wide penultimate layer doubles as the feature space for FID (:mod:`fastflow.evaluate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .data import load_mnist
from .errors import UserError
from .io import atomic_save, atomic_write_json

__all__ = ["Classifier", "train_classifier", "load_or_train_classifier", "classifier_accuracy"]


class Classifier(nn.Module):
    """conv(1→32) → pool → conv(32→64) → pool → fc(3136→128) → fc(128→10), on inputs in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (B, 128), for x of shape (B, 1, 28, 28) in [0, 1]."""
        x = (x - 0.1307) / 0.3081  # MNIST's mean and std
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, 32, 14, 14]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 64, 7, 7]
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _as_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.unsqueeze(1).float() / 255.0  # [N, 1, 28, 28] in [0, 1]


@torch.no_grad()
def classifier_accuracy(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Share of ``images`` ([N, 1, 28, 28] in [0, 1]) classified as ``labels``."""
    clf.eval()
    hits = 0
    for i in range(0, len(images), batch):
        hits += int((clf(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
    return hits / len(images)


def train_classifier(data_root: str | Path, epochs: int = 3, subset: int = 0, seed: int = 0, verbose: bool = True):
    """Train on the training set (shifts of up to 2 pixels as augmentation); returns (model, test accuracy)."""
    torch.manual_seed(seed)
    train, test = load_mnist(data_root, True, verbose), load_mnist(data_root, False, verbose)
    x, y = _as_unit(train.images), train.labels
    if subset:
        x, y = x[:subset], y[:subset]
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // 128):
            idx = perm[i * 128 : (i + 1) * 128]
            xb = x[idx]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(clf(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"classifier: epoch {epoch + 1}/{epochs}, loss {loss.item():.4f}")
    acc = classifier_accuracy(clf, _as_unit(test.images), test.labels)
    return clf.eval(), acc


def load_or_train_classifier(
    data_root: str | Path, cache: str | Path | None = None, verbose: bool = True, **kw
) -> tuple[Classifier, float]:
    """The cached classifier in ``cache`` (default ``<data_root>/classifier``), trained on first use."""
    cache = Path(cache) if cache else Path(data_root) / "classifier"
    wpath, mpath = cache / "classifier.safetensors", cache / "classifier.json"
    if wpath.exists() and mpath.exists():
        try:
            clf = Classifier()
            clf.load_state_dict(load_file(str(wpath)))
            meta = json.loads(mpath.read_text())
            return clf.eval(), float(meta["test_accuracy"])
        except Exception as e:  # a damaged cache is rebuilt, not trusted
            if verbose:
                print(f"classifier cache {cache} unreadable ({type(e).__name__}); retraining")
    if verbose:
        print(f"classifier: training on MNIST (cached in {cache} afterwards)")
    clf, acc = train_classifier(data_root, verbose=verbose, **kw)
    if acc < 0.98 and not kw.get("subset"):
        raise UserError(f"the judging classifier reached only {acc:.2%} on the MNIST test set (need 98%)")
    state = {k: v.contiguous() for k, v in clf.state_dict().items()}
    atomic_save(wpath, lambda tmp: save_file(state, tmp))
    atomic_write_json(mpath, {"test_accuracy": acc, **{k: v for k, v in kw.items()}})
    if verbose:
        print(f"classifier: {acc:.2%} on the MNIST test set")
    return clf, acc
