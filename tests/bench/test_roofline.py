"""bench/roofline/ on the CPU: the counts against closed forms and known graphs, the launch rule on examples
whose count is known, the bound's choice of limit, the CUDA event parsing on stub events, and the command line."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

from bench import roofline as rl
from bench.roofline import counting, inductor, launches, measured, model


def test_flops_of_a_conv_and_a_linear_equal_the_closed_form():
    b, cin, cout, k, side = 2, 3, 5, 3, 8
    conv = nn.Conv2d(cin, cout, k, padding=1)
    x = torch.randn(b, cin, side, side, requires_grad=True)
    fwd = 2 * b * cout * side * side * cin * k * k  # one multiply-add per weight per output pixel
    total, per_op = rl.count_flops(lambda: conv(x).sum().backward())
    assert per_op["aten.convolution"] == fwd
    assert total == 3 * fwd  # backward: the input's gradient and the weight's, each as many as the forward

    lin = nn.Linear(7, 11)
    x = torch.randn(4, 7, requires_grad=True)
    total, _ = rl.count_flops(lambda: lin(x).sum().backward())
    assert total == 3 * 2 * 4 * 7 * 11

    with counting.fake("cpu"):  # the same count on fake tensors, as the tool counts
        conv_f = nn.Conv2d(cin, cout, k, padding=1)
        xf = torch.randn(b, cin, side, side, requires_grad=True)
        assert rl.count_flops(lambda: conv_f(xf).sum().backward())[0] == 3 * fwd


def test_train_flops_are_three_forwards_less_the_input_gradients_nothing_needs():
    train2, _, fwd2 = counting.flops("tiny", 2, "none")
    train4, _, fwd4 = counting.flops("tiny", 4, "none")
    assert train4 == 2 * train2 and fwd4 == 2 * fwd2
    # backward = 2 forwards (each layer's input and weight gradients), less the input gradients of the first
    # convolution (x_t needs none) and of the time MLP's first linear (the sinusoidal features need none)
    cfg = counting.model_config("tiny")  # channels (8, 16, 16), emb_dim 32
    conv_in = 2 * 2 * cfg.channels[0] * 28 * 28 * 1 * 9
    time_linear = 2 * 2 * cfg.emb_dim * cfg.emb_dim
    assert train2 == 3 * fwd2 - conv_in - time_linear


def test_saved_bytes_of_a_known_graph():
    x = torch.randn(3, 5, requires_grad=True)
    w = nn.Parameter(torch.randn(3, 5))

    def graph():
        y = x.exp()  # saves its output y
        z = y.sin()  # saves its input: y again, one storage
        h = y.bfloat16()  # a cast saves nothing
        return (z * w).sum() + (h * h).sum()  # saves z and w (w excluded), h (bf16: 2 bytes an element)

    total, by_dtype = rl.saved_tensor_bytes(graph, exclude=[w])
    assert by_dtype == {"float32": 2 * 15 * 4, "bfloat16": 15 * 2}
    assert total == 15 * 4 * 2 + 15 * 2


def test_the_loss_forward_saves_what_the_whole_step_saves():
    """The saved bytes come from the forward of the step's loss (run.loss): the same as around the whole step."""
    with counting.fake("cpu") as mode:
        model, run = counting.fake_model(mode, counting.model_config("tiny"), "bf16", "cpu")
        ins = counting.inputs(3)
        params = list(model.parameters())
        loss_only = rl.saved_tensor_bytes(lambda: run.loss(*ins), exclude=[*params, *ins])
        whole = rl.saved_tensor_bytes(lambda: run(*ins), exclude=[*params, *ins])
    assert loss_only == whole and loss_only[0] > 0
    assert set(loss_only[1]) >= {"bfloat16"}  # bf16 autocast: convolution inputs saved in bf16


def test_launch_rule_on_small_examples():
    x = torch.randn(4, 3)
    # view, reshape, t: no kernel; mul (its wrapped scalar's copy counts instead of it, once), contiguous's copy, add
    c = rl.count_launches(lambda: (x.view(12) * 2).reshape(3, 4).t().contiguous() + 1)
    assert (c.launches, c.ops, c.library) == (3, 3, 0)
    assert c.by_name == {"aten::mul": 1, "aten::clone": 1, "aten::add": 1}
    ts = [torch.randn(3) for _ in range(3)]
    c = rl.count_launches(lambda: torch._foreach_add_(ts, 1.0))  # one multi-tensor launch; a CPU runs 3 adds
    assert (c.launches, c.ops) == (1, 3)
    conv, xi = nn.Conv2d(2, 2, 3), torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        c = rl.count_launches(lambda: conv(xi))  # conv2d -> ... -> the one op that runs it
    assert (c.launches, c.library) == (1, 1)


def test_step_launches_do_not_depend_on_the_batch():
    cpu = torch.device("cpu")
    launches._LAUNCHES.clear()
    a = rl.step_launches("tiny", "none", cpu, 2)
    launches._LAUNCHES.clear()
    b = rl.step_launches("tiny", "none", cpu, 5)
    assert (a[0].launches, a[0].ops, a[1].launches) == (b[0].launches, b[0].ops, b[1].launches)
    assert a[0].by_name["aten::_fused_adamw_"] == 1 and a[0].ops > a[0].launches  # EMA's foreach: per tensor on CPU
    assert a[0].library > 0 and a[1].launches < a[0].launches


def test_cuda_events_are_counted_from_device_activity():
    ev = lambda name, dev, ann=False: types.SimpleNamespace(name=name, device_type=dev, is_user_annotation=ann)  # noqa: E731
    events = [
        ev("aten::conv2d", "DeviceType.CPU"),
        ev("cudaLaunchKernel", "DeviceType.CPU"),
        ev("cudaLaunchKernel", "DeviceType.CPU"),
        ev("sm90_xmma_fprop_implicit_gemm_bf16", "DeviceType.CUDA"),
        ev("vectorized_elementwise_kernel", "DeviceType.CUDA"),
        ev("Memset (Device)", "DeviceType.CUDA"),
        ev("## step ##", "DeviceType.CUDA", ann=True),
    ]
    c = rl.device_launches(events)
    assert (c.launches, c.host_calls, c.library, c.source) == (3, 2, 1, "cuda-activity")


def test_the_bound_names_the_limit_that_binds():
    peak = dict(peak_flops=100.0, bandwidth=10.0, launch_s=1.0)
    assert rl.bound(8, 1000.0, 10.0, 1, **peak)["binds"] == "compute"  # 10 s against 1 s and 1 s
    assert rl.bound(8, 100.0, 1000.0, 1, **peak)["binds"] == "memory"
    r = rl.bound(8, 100.0, 10.0, 40, **peak)
    assert r["binds"] == "launches" and r["bound_images_per_s"] == pytest.approx(8 / 40)
    assert (r["t_compute_s"], r["t_memory_s"], r["t_launch_s"]) == (1.0, 1.0, 40.0)
    # the GPU's floor per kernel: 50 kernels x 1 s against 40 launches x 1 s
    r = rl.bound(8, 100.0, 10.0, 40, **peak, kernels=50, kernel_s=1.0)
    assert r["binds"] == "kernels" and r["t_kernel_s"] == 50.0 and r["bound_images_per_s"] == pytest.approx(8 / 50)
    assert rl.bound(8, 1000.0, 10.0, 1, **peak)["t_kernel_s"] == 0  # no floor unless one is given (a CPU)


def test_mode_counts_follow_the_step_mode():
    eager = rl.LaunchCount(500, 900, 100, {}, "cpu-profile")
    comp = rl.LaunchCount(300, 300, 70, {}, "inductor")
    assert model.mode_launches("eager", eager, comp) == (500, "cpu-profile")
    assert model.mode_launches("eager", eager, comp, cpu=True)[0] == 900
    assert model.mode_launches("compile", eager, comp)[0] == 300  # each compiled kernel launched by the host
    assert model.mode_launches("cudagraphs", eager, comp)[0] == 1  # one graph launch
    assert model.mode_launches("compile", eager, None)[0] == 100  # assumed: the library calls
    assert model.mode_kernels("eager", eager, comp)[0] == 500
    assert model.mode_kernels("compile", eager, comp)[0] == model.mode_kernels("cudagraphs", eager, comp)[0] == 300
    assert model.mode_kernels("cudagraphs", eager, None)[0] == 100


def test_count_call_reads_inductors_wrapper():
    code = """
def triton_poi_fused_0(): pass
def call(args):
    # Topologically Sorted Source Nodes: [], Original ATen: [aten.convolution_backward]
    triton_poi_fused_0.run(buf0, buf1, 16, stream=raw_stream0)
    buf2 = extern_kernels.convolution(buf1, arg0_1, stride=(1, 1))
    extern_kernels.mm(buf2, arg1_1, out=buf3)
    buf4 = torch.ops.aten.convolution_backward.default(buf3, buf1, arg0_1, [8], (1, 1), (1, 1), (1, 1), False, (0, 0), 1, [True, True, True])
    buf5 = torch.ops.aten.convolution_backward.default(buf3, buf1, arg0_1, [8], (1, 1), (1, 1), (1, 1), False, (0, 0), 1, [False, True, True])
    torch.ops.aten._foreach_lerp_.Scalar([arg2_1], [buf6], 0.1)
    triton_red_fused_1.run(buf6, buf7, 1, 8192, stream=raw_stream0)
    return (buf7, )
"""
    c = inductor.count_call(code)
    assert c["triton"] == 2 and c["extern"] == {"convolution": 1, "mm": 1}
    assert c["fallback"] == {"convolution_backward": 2, "_foreach_lerp_": 1}
    assert c["kernels"] == 2 + 2 + 3 + 2 + 1  # a convolution backward: one kernel per gradient it computes


def test_join_measured_implies_the_cost_per_launch_and_per_kernel():
    row = dict(preset="tiny", batch=32, amp="bf16", mode="eager", kind="train", bound_images_per_s=4000.0,
               launches=500, kernels=500, memory_estimate_bytes=2**30)  # fmt: skip
    sample = {**row, "kind": "sample", "mode": "cudagraphs", "launches": 1, "kernels": 200}
    runs = [
        dict(suite="train", mode="eager-bf16", batch=32, preset="tiny", images_per_s=1000.0, cpu_s=0.03, file="t"),
        dict(
            suite="sample",
            mode="compile-bf16-cudagraphs",
            batch=32,
            preset="tiny",
            images_per_s=400.0,
            nfe=10,
            cpu_s=0.004,
            file="s",
        ),  # fmt: skip
    ]
    measured.join_measured([row, sample], runs)
    (m,) = row["measured"]
    assert m["ratio"] == pytest.approx(0.25) and m["step_s"] == pytest.approx(0.032)
    assert m["per_launch_s"] == pytest.approx(0.032 / 500) and m["host_cpu_s"] == pytest.approx(0.03)
    (s,) = sample["measured"]
    assert s["images_per_s"] == pytest.approx(4000.0)  # image evaluations: images/s x NFE
    assert s["step_s"] == pytest.approx(32 / 4000) and s["per_kernel_s"] == pytest.approx(32 / 4000 / 200)
    assert s["per_launch_s"] is None and s["host_cpu_s"] == pytest.approx(0.0004)  # one graph launch


def test_theoretical_cpu_peak():
    zen4 = dict(vendor="AuthenticAMD", family=25, flags={"avx512_bf16"}, mhz=2000.0)
    native, avx2 = rl.theoretical_cpu_peak("AVX512", **zen4), rl.theoretical_cpu_peak("AVX2", **zen4)
    assert native["fp32_flop_per_cycle"] == avx2["fp32_flop_per_cycle"] == 32  # Zen 4: 2 x 256-bit FMA pipes
    assert native["bf16"] == 2 * native["fp32"] == 2 * 32 * 2e9 and avx2["bf16"] is None
    intel = rl.theoretical_cpu_peak("AVX512", vendor="GenuineIntel", family=6, flags=set(), mhz=1000.0)
    assert intel["fp32_flop_per_cycle"] == 64 and intel["bf16"] is None


def test_bench_modes_map_to_step_modes():
    assert measured.bench_mode("compile-bf16-cudagraphs") == ("cudagraphs", "bf16")
    assert measured.bench_mode("compile") == ("compile", "none")
    assert measured.bench_mode("eager-fp32-channels-last") == ("eager", "none")
    assert measured.bench_mode("seed-baseline") is None


COLUMNS = ("GFLOP", "least MB", "launches", "compute ms", "memory ms", "launch ms", "binds", "epoch s")


def test_cli_on_a_gpu_table(tmp_path, capsys):
    measured = tmp_path / "train-cuda.json"
    row = dict(suite="train", mode="eager-bf16", batch=2, preset="tiny", channels=[8, 16, 16], images_per_s=100.0,
               status="ok", device_name="NVIDIA A100-SXM4-40GB", nfe=None)  # fmt: skip
    measured.write_text(json.dumps({"rows": [row]}))
    out = tmp_path / "roofline.json"
    rc = rl.main(["roofline", "--preset", "tiny", "--batch-sizes", "2,4", "--device", "a100", "--out", str(out),
                  "--no-inductor-count", "--measured", str(measured)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    for col in (*COLUMNS, "bound img/s", "bound img·NFE/s", "measured ÷ bound", "kernels", "kernel ms"):
        assert col in text, col
    assert "µs per launch" in text and "bound against measurement" in text
    assert "a prediction: not run on a GPU" in text and "launches" in text
    rows = json.loads(out.read_text())["rows"]
    keys = {(r["kind"], r["batch"], r["mode"], r["amp"]) for r in rows}
    assert {("train", b, m, "bf16") for b in (2, 4) for m in ("eager", "compile", "cudagraphs")} <= keys
    assert any(r.get("largest_fit") for r in rows)  # the largest batch whose memory estimate fits 40 GB
    for r in rows:
        assert r["binds"] in ("compute", "memory", "launches", "kernels") and r["bound_images_per_s"] > 0
        assert r["flops"] > 0 and r["bytes"] > 0 and r["launches"] >= 1
        if r["mode"] == "cudagraphs":
            assert r["launches"] == 1
    joined = [r for r in rows if r.get("measured")]
    assert len(joined) == 1 and joined[0]["mode"] == "eager" and joined[0]["batch"] == 2
    m = joined[0]["measured"][0]
    assert m["ratio"] == pytest.approx(100.0 / joined[0]["bound_images_per_s"])
    assert m["per_launch_s"] == pytest.approx(2 / 100.0 / joined[0]["launches"])
    assert rl.roofline_table(rows) in text and rl.measured_table(rows) in text
    for r in rows:  # the GPU's floor: the eager launches as kernels, or (not counted: --no-inductor-count) the
        assert r["kernel_s"] > 0 and r["t_kernel_s"] == pytest.approx(r["kernels"] * r["kernel_s"])  # library calls
        assert r["kernels"] == (r["eager_launches"] if r["mode"] == "eager" else r["library_calls"])
    assert rl.compact_table(json.loads(out.read_text())).count("\n") == 1 + len(joined)  # the joined rows


def test_roofline_section_has_a_table_per_file(tmp_path):
    doc = {"device": "a100", "torch": "2.x", "peak": {"name": "A100", "launch_s": 5e-6, "kernel_s": 2e-6}, "rows": [
        dict(kind="train", batch=32, amp="bf16", mode="eager", bound_images_per_s=1000.0, binds="launches",
             prediction=True, counted_on="cpu")]}  # fmt: skip
    (tmp_path / "roofline-a100.json").write_text(json.dumps(doc))
    (tmp_path / "roofline-cpu-avx2.json").write_text(json.dumps({**doc, "device": "cpu"}))
    text = rl.roofline_section(tmp_path)
    assert text.count("| kind | amp | mode | 32 |") == 2 and "a prediction for A100" in text
    assert "| train | bf16 | eager | 1,000 launches |" in text
    assert "`roofline-cpu-avx2.json`: this CPU's peaks" in text
    assert "No roofline runs" in rl.roofline_section(tmp_path / "none")


@pytest.mark.slow
def test_inductor_counts_the_kernels_of_the_tiny_step():
    """Inductor's CUDA code for the tiny preset's compiled step and forward, written on this CPU: each of its
    convolutions one cuDNN call (and one backward in the step), each linear layer one cuBLAS call in the forward,
    and Triton kernels for the rest (about 80 s on 2 cores)."""
    from fastflow.unet import UNet

    net = UNet(counting.model_config("tiny"))
    convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    linears = sum(isinstance(m, nn.Linear) for m in net.modules())
    c = rl.count_inductor_kernels("tiny", 2, "none")
    train, fwd = c["train"], c["forward"]
    assert train["extern"]["convolution"] == fwd["extern"]["convolution"] == convs
    assert train["fallback"]["convolution_backward"] == convs and "convolution_backward" not in fwd["fallback"]
    assert fwd["extern"].get("addmm", 0) + fwd["extern"].get("mm", 0) == linears  # fp32: mm, the bias fused
    assert 0 < fwd["triton"] < train["triton"]
    for k in (train, fwd):
        assert k["kernels"] >= k["triton"] + sum(k["extern"].values()) + sum(k["fallback"].values())


def test_cli_on_this_cpu_prints_the_probe_and_the_default_steps_share(tmp_path, capsys):
    out = tmp_path / "roofline-cpu.json"
    rc = rl.main(["roofline", "--preset", "tiny", "--batch-sizes", "2,4", "--device", "cpu", "--quick-probe",
                  "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    for col in COLUMNS:
        assert col in text, col
    for what in ("theoretical per thread", "conv fp32", "gemm fp32", "copy bandwidth", "eager dispatch",
                 "probed peak", "default CPU train step", "of the probed"):  # fmt: skip
        assert what in text, what
    data = json.loads(out.read_text())
    probe, step = data["probe"], data["default_step"]
    assert probe["peak"]["fp32"] > 0 and probe["measured"]["copy_bytes_per_s"] > 0
    assert probe["isa"] == torch.backends.cpu.get_cpu_capability()
    assert step["batch"] == 24 and step["threads"] == 1 and 0 < step["share_of_probed"] < 1.5
    assert all(r["mode"] == "eager" and not r["prediction"] for r in data["rows"])
