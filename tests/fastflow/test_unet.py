"""The U-Net: shapes, that its output really depends on t and on the label, and MeanFlow's second time input."""

from __future__ import annotations

import pytest
import torch

from fastflow.config import PRESETS, ModelConfig, TrainConfig, validate
from fastflow.errors import UserError
from fastflow.unet import UNet, count_parameters, time_embedding


def _model(**kw) -> UNet:
    torch.manual_seed(0)
    m = UNet(ModelConfig(**{**PRESETS["tiny"][0], **kw}))
    with torch.no_grad():  # the zero-initialised output layers would hide any dependence
        for p in m.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.1)
    return m.eval()


def test_output_shape_and_dtype():
    m = _model()
    x = torch.randn(5, 1, 28, 28)
    out = m(x, torch.rand(5), torch.tensor([0, 3, 9, 10, 1]))
    assert out.shape == (5, 1, 28, 28) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_output_depends_on_time_and_label():
    m = _model()
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([1, 2, 3, 4])
    base = m(x, torch.full((4,), 0.5), y)
    assert (m(x, torch.full((4,), 0.501), y) - base).abs().max() > 1e-5  # Δt = 1e-3 is resolved
    assert (m(x, torch.full((4,), 0.9), y) - base).abs().max() > 1e-3
    assert (m(x, torch.full((4,), 0.5), torch.tensor([5, 6, 7, 10])) - base).abs().max() > 1e-3
    # samples are independent: changing one label leaves the others' outputs alone (no batch coupling)
    other = m(x, torch.full((4,), 0.5), torch.tensor([9, 2, 3, 4]))
    assert torch.allclose(other[1:], base[1:], atol=1e-6) and not torch.allclose(other[0], base[0])


def test_time_embedding_resolves_the_unit_interval():
    t = torch.linspace(0, 1, 1001)  # steps of 1e-3
    e = time_embedding(t, 64)
    gaps = (e[1:] - e[:-1]).norm(dim=1)
    assert gaps.min() > 0.05  # every 1e-3 step moves the embedding visibly
    assert (e[0] - e[-1]).norm() > 1.0


def test_presets_build_with_expected_sizes():
    assert count_parameters(UNet(ModelConfig(**PRESETS["cpu"][0]))) < count_parameters(UNet(ModelConfig()))
    assert UNet(ModelConfig()).label_emb.num_embeddings == 11  # 10 digits + "no label"


def test_space_to_depth_stem_keeps_the_image_shape_and_each_pixel_its_own_output():
    m = _model(channels=(8, 16), patch=2)
    assert m.conv_in.in_channels == 4 and m.conv_out.out_channels == 4
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    out = m(x, torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 1, 28, 28) and torch.isfinite(out).all()
    # the unfold puts channel k of the 14x14 output at offset (k // 2, k % 2) of each 2x2 block: a change of the
    # output layer's channel 3 moves only the pixels at odd rows and odd columns
    with torch.no_grad():
        m.conv_out.bias[3] += 1.0
    moved = (m(x, torch.rand(3), torch.tensor([0, 5, 10])) - out).abs() > 0.5
    assert moved[:, :, 1::2, 1::2].all() and moved.sum() == 3 * 14 * 14


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(patch=3), "--patch must divide 28"),
        (dict(patch=2, channels=(8, 16, 32)), "3 levels do not fit 14x14"),
        (dict(patch=4, channels=(8, 16)), "2 levels do not fit 7x7"),
    ],
)
def test_levels_that_cannot_be_joined_back_are_refused(kw, message):
    with pytest.raises(UserError, match=message):
        validate(ModelConfig(**kw), TrainConfig())


# -- MeanFlow's second time input ---------------------------------------------------------------------------


def _flow_and_mean_flow() -> tuple[UNet, UNet]:
    """A flow-matching U-Net with every weight non-zero, and a mean-flow U-Net holding its weights (the gap MLP as
    initialised), as ``--init-from`` builds it."""
    flow = _model()
    torch.manual_seed(1)
    mf = UNet(ModelConfig(**{**PRESETS["tiny"][0], "mean_flow": True})).eval()
    missing, unexpected = mf.load_state_dict(flow.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("gap_mlp.") for k in missing), missing
    return flow, mf


def test_mean_flow_unet_from_flow_weights_is_the_flow_field_for_every_s():
    flow, mf = _flow_and_mean_flow()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 5, 9, 10])
    t = torch.tensor([0.0, 0.3, 0.5, 0.9])
    want = flow(x, t, y).detach()
    assert float(want.abs().max()) > 1e-3  # not a trivially zero field
    assert torch.equal(mf(x, t, y), want)  # s = None: s = t
    for s in (t, t + 0.05, torch.ones(4), torch.tensor([1.0, 0.4, 0.6, 0.95])):
        assert torch.equal(mf(x, t, y, s), want), f"s = {s.tolist()}"


def test_the_gap_input_is_wired_and_s_none_means_s_equals_t():
    _, mf = _flow_and_mean_flow()
    with torch.no_grad():
        mf.gap_mlp[2].weight.normal_(0, 0.3)  # as after training: the gap now matters
    x, y, t = torch.randn(3, 1, 28, 28), torch.tensor([2, 3, 4]), torch.full((3,), 0.2)
    at_t = mf(x, t, y, t)
    assert torch.equal(mf(x, t, y), at_t)
    assert (mf(x, t, y, t + 0.5) - at_t).abs().max() > 1e-3
    assert (mf(x, t, y, t + 0.001) - at_t).abs().max() > 1e-6  # a gap of 1e-3 is resolved


def test_a_flow_unet_refuses_a_second_time():
    with pytest.raises(ValueError, match="no second time input"):
        _model()(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([0, 1]), torch.ones(2))


def test_plain_group_norm_matches_the_fused_one():
    _, mf = _flow_and_mean_flow()
    x, y, t, s = torch.randn(3, 1, 28, 28), torch.tensor([2, 3, 10]), torch.rand(3), torch.ones(3)
    with torch.no_grad():
        mf.gap_mlp[2].weight.normal_(0, 0.3)
        for m in mf.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1, 0.2), m.bias.normal_(0, 0.2)
    want = mf(x, t, y, s)
    torch.testing.assert_close(mf(x, t, y, s, plain_norm=True), want, rtol=1e-5, atol=1e-5)
