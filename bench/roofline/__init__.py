"""``python -m bench roofline``: an upper bound on train-step and sampler images/s per preset and batch size, from
counted FLOPs, the least bytes moved, the host's launches and the GPU's kernels of a step, against a table of device
peaks (or, for ``--device cpu``, this machine's peaks measured by a probe). Every GPU figure it prints is a
prediction, labelled as such; ``--measured`` joins rows measured on a GPU and shows measured ÷ bound.

What is counted, and how:

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around one eager train step (the step's own code: loss,
  ``torch.autograd.grad``, AdamW, EMA) and around one network evaluation (a forward at batch B; a guided sampler
  evaluation is one forward at 2B), run on fake tensors (``FakeTensorMode``: shapes only, no data, so 2048 x the
  original U-Net costs a second). flop_counter counts convolutions and matrix products (forward and backward); it
  does not count elementwise ops, GroupNorm, the embedding lookup, AdamW or the EMA. Those are left out, not
  estimated: they are memory traffic, which the bytes term bounds (AdamW and EMA are in it by formula).
- Least bytes of a train step: weights read once (P x 4 bytes, fp32 parameters), gradients written once, AdamW
  (parameters, exp_avg and exp_avg_sq read and written, gradients read: 7 x 4P), the EMA (shadow read and written,
  parameters read: 3 x 4P), the saved activations written once in the forward and read once in the backward, and
  the inputs z, eps [B, 1, 28, 28] fp32, t [B] fp32, y [B] int64 read once. Saved activations are measured, not
  assumed: ``torch.autograd.graph.saved_tensors_hooks`` records every tensor the forward of the step's loss saves
  for the backward, deduplicated by storage, parameters and inputs left out (counted above), in the precision the
  step runs under the target device's autocast policy (bf16 autocast on CUDA keeps GroupNorm and upsampling
  outputs fp32, on a CPU bf16: measured per device type, on fake tensors of that type). A sampler evaluation: the
  weights, x, t, y in and v out (its activations need not leave the chip: no lower bound is known for them).
- Launches: one eager train step (and one forward) profiled with ``torch.profiler`` on real tensors. On a CPU,
  :func:`count_launches`'s rule (its docstring) counts the aten ops that would launch a device kernel; on a CUDA
  device the profiler's CUDA activity is counted directly (kernels, memcpy and memset on the device). Which count
  a row used is in its ``launch_source``.

The bound: images/s = B / max(FLOPs / peak FLOP/s, bytes / peak bandwidth, launches x seconds per launch, kernels
x seconds per kernel), per step mode, and the term that is largest names the limit that binds. Launches are the
host's (each costs :data:`~peaks.GPU_LAUNCH_S` of dispatch), kernels the GPU's: a step's kernels run one after
another on the device, each for at least :data:`~peaks.GPU_KERNEL_S` however little it does (an assumption, stated;
0 on a CPU). ``eager``: the launches of one eager step, as many kernels. ``compile``: the compiled step's kernels,
each also a host launch; ``cudagraphs``: the same kernels, one host launch (the graph). The compiled step's kernels
are counted on this CPU from the code Inductor writes for a CUDA device (``inductor``: its docstring says how and
where that differs from ``torch.compile``; ``--no-inductor-count`` assumes the eager step's convolution and matmul
library calls instead, a lower bound), or with ``--count-compiled`` on a CUDA machine by running the compiled step.
Each term is meant as a lower bound of the time it stands for (datasheet peaks, least bytes, launch counts that are
lower bounds, assumed costs per launch and per kernel kept low), so the bound is an upper bound on images/s, with
one soft spot beyond the assumed costs: the compiled step's kernel count is an estimate, not a lower bound. On a CUDA machine the seconds per
launch are measured (a one-element add: a lower bound). On a CPU, which runs the terms one after another rather
than overlapped, the max is all the more a bound.

``--measured`` joins rows that ``python -m bench train|sample`` measured on a GPU (bench/results/train-*.json,
sample-*.json) and prints, per joined row, measured ÷ bound and what the measurement implies: the measured step
time over the counted host launches (an eager step's cost per launch: host-bound) and over the GPU kernels (a
CUDA-graph step's cost per kernel); the rows go to ``roofline-<device>-measured.json``. The bound stays the
prediction it is; the joined figures are the GPU's, measured.

Memory that fits (GPUs): weights, gradients, AdamW's two moments and the EMA (5 x 4P) plus the saved activations
and the inputs: an estimate (no allocator slack, cuDNN workspace or the transient gradients of the backward), used
with 10% of the device's memory held back; the largest power-of-two batch under it gets its own rows.

``--device cpu``: a probe measures this machine's peaks (conv and GEMM FLOP/s through the libraries the step uses,
copy bandwidth, per-op dispatch time) next to the theoretical peak from ISA x FMA units x clock, then times the
default CPU train step (the ``cpu`` preset at batch 24, one thread: one of the default run's two single-thread
processes at global batch 48) and prints its achieved FLOP/s as a share of the probed peak, and from one profiled
step the share of its time spent in convolutions and matmuls. CPU timings on a shared machine are noisy: medians,
with the process CPU time and the load average next to them.

Modules, one job each: ``peaks`` (device peaks and the per-launch and per-kernel assumptions), ``counting`` (FLOPs,
saved tensors, bytes), ``launches`` (eager launch counts), ``inductor`` (the compiled step's kernels, counted on a
CPU), ``probe`` (this machine's peaks, the default CPU step), ``model`` (the bound and the rows), ``measured`` (the
join), ``tables`` (the text; :func:`roofline_section` for docs/results.md), ``cli`` (the flags:
:class:`RooflineSettings`).
"""

from __future__ import annotations

from .cli import RooflineSettings, build_parser, main
from .counting import Counts, count_flops, counts, saved_tensor_bytes
from .inductor import count_inductor_kernels
from .launches import LaunchCount, count_cuda_launches, count_launches, device_launches, step_launches
from .measured import join_measured, load_measured
from .model import bound, build_rows
from .peaks import GPU_KERNEL_S, GPU_LAUNCH_S, GPU_PEAKS, Peak
from .probe import probe_cpu, theoretical_cpu_peak
from .tables import compact_table, measured_table, roofline_section, roofline_table

__all__ = [
    "Peak",
    "GPU_PEAKS",
    "GPU_LAUNCH_S",
    "GPU_KERNEL_S",
    "Counts",
    "LaunchCount",
    "count_flops",
    "saved_tensor_bytes",
    "counts",
    "count_launches",
    "count_cuda_launches",
    "device_launches",
    "step_launches",
    "count_inductor_kernels",
    "bound",
    "build_rows",
    "load_measured",
    "join_measured",
    "probe_cpu",
    "theoretical_cpu_peak",
    "roofline_table",
    "measured_table",
    "compact_table",
    "roofline_section",
    "RooflineSettings",
    "build_parser",
    "main",
]
