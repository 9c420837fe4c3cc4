"""EMA of the weights against its closed form; checkpoints and sampling use the EMA weights by default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastflow.checkpoint import build_model, load_checkpoint, load_pretrained, save_checkpoint
from fastflow.config import ModelConfig
from fastflow.ema import EMA, ema_decay_at
from fastflow.unet import UNet


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))


def _targets(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(k)]


def _run(ema: EMA, model: Toy, targets) -> None:
    for j, p in enumerate(targets, start=1):
        with torch.no_grad():
            model.p.copy_(p)
            model.count.fill_(j)
        ema.update(model)


def test_decay_schedule():
    assert ema_decay_at(0, 0.999, 0) == ema_decay_at(5000, 0.999, 0) == 0.999
    assert ema_decay_at(0, 0.999, 100) == pytest.approx(1 / 100)
    assert ema_decay_at(50, 0.999, 100) == pytest.approx(51 / 150)
    assert ema_decay_at(10**7, 0.999, 100) == 0.999
    ds = [ema_decay_at(k, 0.99, 10) for k in range(2000)]
    assert all(a <= b for a, b in zip(ds, ds[1:])) and max(ds) == 0.99


@pytest.mark.parametrize("k", [1, 7, 40])
def test_constant_decay_closed_form(k):
    """No warm-up, decay d: θ_k = d^k θ_0 + (1 − d) Σ_{j=1..k} d^{k−j} p_j."""
    d = 0.9
    model = Toy()
    theta0 = model.p.detach().clone()
    ema = EMA(model, decay=d, warmup=0)
    ps = _targets(k)
    _run(ema, model, ps)
    want = d**k * theta0 + (1 - d) * sum(d ** (k - j) * p for j, p in enumerate(ps, start=1))
    torch.testing.assert_close(ema.shadow.p.detach(), want, atol=1e-12, rtol=1e-12)
    assert ema.updates == k
    assert float(ema.shadow.count) == k, "buffers are copied, not averaged"


def test_warmup_closed_form():
    """warm-up 2: update j (0-based) uses d_j = min(d, (1 + j)/(2 + j)), so while that is below d the EMA is
    the plain mean of θ_0, p_1, …, p_k; after that it decays geometrically at d."""
    d = 0.9  # (1 + j)/(2 + j) < 0.9 for j ≤ 7: the first 8 updates are running means
    model = Toy()
    theta0 = model.p.detach().clone()
    ema = EMA(model, decay=d, warmup=2)
    ps = _targets(12)
    _run(ema, model, ps[:8])
    torch.testing.assert_close(ema.shadow.p.detach(), torch.stack([theta0, *ps[:8]]).mean(0), atol=1e-12, rtol=1e-12)
    mean8 = ema.shadow.p.detach().clone()
    _run(ema, model, ps[8:])
    want = d**4 * mean8 + (1 - d) * sum(d ** (4 - j) * p for j, p in enumerate(ps[8:], start=1))
    torch.testing.assert_close(ema.shadow.p.detach(), want, atol=1e-12, rtol=1e-12)


def test_ema_leaves_the_model_alone():
    model = Toy()
    ema = EMA(model, decay=0.5, warmup=0)
    assert not any(p.requires_grad for p in ema.shadow.parameters())
    with torch.no_grad():
        model.p.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(model.p.detach(), torch.full((3,), 3.0, dtype=torch.float64))
    assert model.p.requires_grad


def _tiny_unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    net = UNet(ModelConfig(channels=(8, 16, 16), emb_dim=32, groups=4))
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net


def test_checkpoint_samples_with_ema_by_default(tmp_path):
    raw, ema = _tiny_unet(0), _tiny_unet(1)
    save_checkpoint(tmp_path / "ck", raw, raw.cfg, ema=ema, step=3)
    ck = load_checkpoint(tmp_path / "ck", with_state=False)
    for name, w in build_model(ck).state_dict().items():
        torch.testing.assert_close(w, ema.state_dict()[name], atol=0, rtol=0)
    for name, w in build_model(ck, use_ema=False).state_dict().items():
        torch.testing.assert_close(w, raw.state_dict()[name], atol=0, rtol=0)
    for name, w in load_pretrained(tmp_path / "ck").state_dict().items():
        torch.testing.assert_close(w, ema.state_dict()[name], atol=0, rtol=0)


def test_sample_cli_uses_ema_unless_told(tmp_path):
    """``python -m fastflow.sample`` draws with the EMA weights; ``--no-ema`` with the raw ones."""
    from fastflow.sample import main
    from fastflow.solvers import SamplerSpec, sample

    raw, ema = _tiny_unet(0), _tiny_unet(1)
    save_checkpoint(tmp_path / "ck", raw, raw.cfg, ema=ema, step=3)
    common = [
        "--checkpoint",
        str(tmp_path / "ck"),
        "--digits",
        "2,5",
        "--per-digit",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--amp",
        "none",  # compared with fp32 sampling below (the default, auto, may pick bf16)
    ]
    assert main([*common, "--out", str(tmp_path / "a.png"), "--save-tensor", str(tmp_path / "a.pt")]) == 0
    assert main([*common, "--no-ema", "--out", str(tmp_path / "b.png"), "--save-tensor", str(tmp_path / "b.pt")]) == 0
    a = torch.load(tmp_path / "a.pt", weights_only=True)["images"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["images"]
    labels = torch.tensor([2, 2, 5, 5])
    for net, got in ((ema, a), (raw, b)):
        with torch.no_grad():
            want, _ = sample(net.eval(), labels, SamplerSpec(steps=2), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(a, b)
