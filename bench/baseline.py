"""The seed project's input pipeline, the ``seed-baseline`` train rows' loader: torchvision's MNIST dataset (or
synthetic pixels through the same per-image work), ToTensor and scaling to [-1, 1] per image in a worker process,
shuffled by a DataLoader."""

from __future__ import annotations

__all__ = ["baseline_batches"]


class _SyntheticImages:
    """The seed loop's dataset on synthetic pixels: per item a PIL image from the uint8 array and the transform,
    the work ``torchvision.datasets.MNIST.__getitem__`` does per image (a TensorDataset of ready tensors would
    skip it and flatter the baseline)."""

    def __init__(self, arrays, transform):
        self.images, self.labels, self.transform = arrays.images, arrays.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i].numpy())), int(self.labels[i])


def baseline_batches(data_root: str, batch: int, seed: int, num_workers: int, arrays=None):
    """The seed project's input pipeline: torchvision's MNIST dataset (or, with ``arrays``, synthetic pixels
    through the same per-image work), ToTensor + scaling to [-1, 1] per image in a worker process, shuffled by
    a DataLoader."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    tf = torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize((0.5,), (0.5,))]
    )
    if arrays is None:
        from fastflow.data import ensure_mnist

        ensure_mnist(data_root, verbose=False)
        ds = torchvision.datasets.MNIST(data_root, train=True, download=False, transform=tf)
    else:
        ds = _SyntheticImages(arrays, tf)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        generator=g,
        persistent_workers=num_workers > 0,
    )
    while True:
        yield from loader
