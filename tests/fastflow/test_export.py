"""``fastflow.export``: the exported sampler, run by onnxruntime on the CPU, against fastflow's own sampler on the
same noise, and the command line's refusals.

The models are small U-Nets with every weight perturbed (conv_out and each block's last conv start at zero, so an
unperturbed model's field is zero and any sampler would "agree"); each comparison also checks that most pixels
are strictly inside (0, 1), not clamped, so the agreement is not the clamp's.

Tolerance: fp32 throughout, images in [0, 1]: max |onnxruntime − fastflow.sample| <= 1e-5 (TOL). Observed on a
2-core AMD EPYC (Zen 4, AVX-512; torch 2.14.1, onnxruntime 1.32): 4.8e-7 to 1.8e-6 (AB2 guided at w = 2.5), the two
runtimes' convolutions summing in different orders.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bench.page import seeded_noise
from bench.web import fastflow_sample
from fastflow.checkpoint import load_checkpoint, save_checkpoint
from fastflow.config import ModelConfig, resolve_configs
from fastflow.errors import UserError
from fastflow.export import ExportSpec, build_graph, export_onnx, main, resolve_spec
from fastflow.solvers import SamplerSpec
from fastflow.unet import UNet

TOL = 1e-5
# Two levels (fewer nodes: the unrolled graph exports in seconds); patch 2 as the cpu preset (pixel_unshuffle).
FLOW = ModelConfig(channels=(8, 16), emb_dim=16, groups=4)
MEANFLOW = ModelConfig(channels=(8, 16), emb_dim=16, groups=4, patch=2, mean_flow=True)
LABELS = torch.tensor([3, 0, 9, 1, 7, 7, 4])  # 7 images: an odd batch, a repeated label


def _model(cfg: ModelConfig, seed: int) -> UNet:
    torch.manual_seed(seed)
    model = UNet(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():  # every weight non-zero, the zero-initialised last layers included
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _onnx_images(path, noise: torch.Tensor, labels: torch.Tensor, w: float | None = None) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"noise": noise.numpy(), "labels": labels.numpy()}
    if w is not None:
        feed["w"] = np.array([w], dtype=np.float32)
    (out,) = sess.run(None, feed)
    return torch.from_numpy(out)


def _assert_agree(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape and got.dtype == torch.float32, (name, got.shape, got.dtype)
    inside = ((want > 0) & (want < 1)).float().mean().item()
    assert inside > 0.5, f"{name}: only {inside:.0%} of the pixels are unclamped: a weak comparison"
    err = (got - want).abs()
    what = f"{name}: max |onnxruntime - fastflow.sample| {err.max():.3g} (mean {err.mean():.3g})"
    print(what)  # pytest -s shows the observed errors (docs/export.md quotes them)
    assert err.max() <= TOL, what
    return float(err.max())


@pytest.mark.parametrize(
    "cfg, spec, w",
    [
        (MEANFLOW, ExportSpec(SamplerSpec("meanflow", 2)), None),
        (FLOW, ExportSpec(SamplerSpec("euler", 3)), None),
        # t = 0, 1/3, 2/3: the first step unguided (outside [0.2, 0.7]), the other two guided; AB2's memory too
        (FLOW, ExportSpec(SamplerSpec("ab2", 3, interval=(0.2, 0.7)), guided=True), 2.5),
    ],
    ids=["meanflow-2", "euler-3", "ab2-3-guided"],
)
def test_onnxruntime_matches_fastflow_sample(tmp_path, cfg, spec, w):
    model = _model(cfg, 1)
    path = tmp_path / "s.onnx"
    info = export_onnx(build_graph(model, spec), path)
    assert info["inputs"] == (["noise", "labels", "w"] if w is not None else ["noise", "labels"])
    assert info["opset"] >= 18
    seed = 5
    got = _onnx_images(path, seeded_noise(len(LABELS), seed), LABELS, w)
    want = fastflow_sample(model, LABELS, dataclasses.replace(spec.sampler, guidance=w or 1.0), seed=seed)
    _assert_agree(spec.describe(), got, want)
    if w is not None:  # w is an input, not baked in: another w gives fastflow.sample's images at that w
        got = _onnx_images(path, seeded_noise(len(LABELS), seed), LABELS, 1.5)
        want = fastflow_sample(model, LABELS, dataclasses.replace(spec.sampler, guidance=1.5), seed=seed)
        _assert_agree(f"{spec.describe()} at w 1.5", got, want)


def test_export_command_meanflow_one_jump(tmp_path, cli):
    """The command line on a saved MeanFlow checkpoint (EMA weights): the default sampler is one jump; the file is
    one valid ONNX model (onnx.checker) whose batch is dynamic, and it matches fastflow.sample at two batch sizes."""
    raw, ema = _model(MEANFLOW, 2), _model(MEANFLOW, 3)
    _, tcfg = resolve_configs("tiny", "cpu", train={"objective": "meanflow"})
    save_checkpoint(tmp_path / "mf", raw, MEANFLOW, tcfg, ema, None, 11)
    out = tmp_path / "out" / "mf.onnx"
    p = cli.run([sys.executable, "-m", "fastflow.export", "--checkpoint", str(tmp_path / "mf"), "--out", str(out)])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "meanflow, 1 step, 1 NFE; inputs noise, labels, opset " in lines[0], p.stdout
    assert p.stderr == ""
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["fastflow.sampler"] == "meanflow, 1 step, 1 NFE" and "step 11" in meta["fastflow.checkpoint"]
    for n in (len(LABELS), 1):
        labels = LABELS[:n]
        got = _onnx_images(out, seeded_noise(n, 9), labels)
        _assert_agree(f"one jump, batch {n}", got, fastflow_sample(ema, labels, SamplerSpec("meanflow", 1), seed=9))


@pytest.mark.parametrize(
    "flags, objective, message",
    [
        (["--solver", "meanflow"], "flow", "--solver meanflow needs a checkpoint trained with a meanflow objective"),
        (["--steps", "0"], "flow", "--steps must be in 1..100"),
        (["--steps", "101"], "meanflow", "--steps must be in 1..100"),
        (["--guided"], "meanflow", "--guided: no step of this 1-step grid starts inside --guidance-interval 0.2,0.7"),
        (["--out", "{tmp}/model"], "flow", "is a folder, not a file"),
        (["--checkpoint", "{tmp}/nothing"], "flow", "no such folder"),
    ],
)
def test_refusals_are_one_line(tmp_path, capsys, flags, objective, message):
    cfg = MEANFLOW if objective == "meanflow" else FLOW
    _, tcfg = resolve_configs("tiny", "cpu", train={"objective": objective})
    save_checkpoint(tmp_path / "model", _model(cfg, 0), cfg, tcfg, None, None, 1)
    argv = ["--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "x.onnx")]
    argv += [f.format(tmp=tmp_path) for f in flags]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--guided", "--guidance-interval", "0.7,0.2"], "need 0 <= LO < HI <= 1"),
        (["--solver", "rk4"], "argument --solver: invalid choice: 'rk4' (choose from 'euler', 'ab2', 'meanflow')"),
    ],
)
def test_flags_are_checked_by_argparse(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_resolve_spec_defaults_and_nfe(tmp_path):
    for name, cfg, objective in (("mf", MEANFLOW, "meanflow-distill"), ("flow", FLOW, "flow")):
        _, tcfg = resolve_configs(
            "tiny", "cpu", train={"objective": objective, "init_from": "x" * (objective != "flow")}
        )
        save_checkpoint(tmp_path / name, _model(cfg, 0), cfg, tcfg, None, None, 1)
    mf, flow = (load_checkpoint(tmp_path / n, with_state=False) for n in ("mf", "flow"))
    assert resolve_spec(mf) == ExportSpec(SamplerSpec("meanflow", 1))  # a distilled model too: its U-Net takes s
    assert resolve_spec(flow) == ExportSpec(SamplerSpec("euler", 10))
    assert resolve_spec(mf, "euler", 4).sampler.solver == "euler"  # the ODE solvers run on u(x, t, t)
    # guided in [0.2, 0.7] on 10 steps: t = 0.2 .. 0.7 are 6 steps at 2 NFE, the other 4 at 1
    assert resolve_spec(flow, guided=True).nfe == 16
    assert resolve_spec(flow, "ab2", 4, guided=True, interval=None).nfe == 8
    with pytest.raises(UserError, match="quadratic"):
        resolve_spec(flow, grid="cubic")
    with pytest.raises(UserError, match="rk4: not exportable; the exported samplers are euler, ab2, meanflow"):
        resolve_spec(flow, "rk4")
