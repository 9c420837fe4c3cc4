"""Device peaks: a GPU's datasheet figures, the host's seconds per eager launch, and the GPU's seconds per kernel
(both assumptions where no GPU is present: stated, and replaced by what a measurement implies when one is joined)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Peak", "GPU_LAUNCH_S", "GPU_KERNEL_S", "GPU_PEAKS", "DEVICES", "gpu_key", "cuda_name"]


@dataclass(frozen=True)
class Peak:
    """A device's peaks. ``flops``: dense FLOP/s per precision (``bf16``, ``tf32``, ``fp32``); ``bandwidth``:
    memory bytes/s; ``memory``: bytes; ``launch_s``: host seconds per eager kernel launch; ``kernel_s``: the least
    GPU seconds one kernel of a step takes, however little it does (0: no such floor, a CPU); ``source``: where
    the figures come from."""

    name: str
    flops: dict
    bandwidth: float
    memory: float
    launch_s: float
    source: str
    launch_source: str = ""
    kernel_s: float = 0.0
    kernel_source: str = ""


# Host seconds per kernel launch of eager PyTorch on CUDA: dispatch through the op's Python and C++ layers plus
# cudaLaunchKernel. 5 us is an assumption (PyTorch's eager overhead is commonly put at a few to 10 us per op;
# cudaLaunchKernel alone is 2-4 us); `--device` on a CUDA machine measures this host's figure and prints it. An
# H200 VM measured far more: eager steps of the original preset took 25.5-26.5 ms (fp32, batch 32 and 128) for
# 571 launches counted on the CPU, ~45 us a launch (`--measured` prints what each joined row implies).
GPU_LAUNCH_S = 5e-6
_LAUNCH_NOTE = "an assumption: eager PyTorch dispatch + cudaLaunchKernel; on a CUDA machine the tool measures its own"
# GPU seconds per kernel, however small: a step's kernels run one after another on the GPU (eager, compiled, and
# replayed from a CUDA graph alike), and each costs its launch latency on the device plus the ramp-up and tail of a
# grid, a few us for the small kernels of this U-Net at MNIST size. 2 us is an assumption (kept low, so that the
# bound stays a bound); the H200's CUDA-graph step implies more (`--measured`).
GPU_KERNEL_S = 2e-6
_KERNEL_NOTE = "an assumption: a small kernel's GPU time, back to back in one stream"
GPU_PEAKS: dict[str, Peak] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4): BF16 312 TFLOP/s dense (624 with sparsity), TF32 156, FP32 19.5;
    # 40 GB HBM2 at 1,555 GB/s.
    "a100": Peak(
        "A100 40GB SXM", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 1555e9, 40e9, GPU_LAUNCH_S,
        "NVIDIA A100 datasheet (SXM4 40GB)", _LAUNCH_NOTE, GPU_KERNEL_S, _KERNEL_NOTE,
    ),
    # Same datasheet, A100 80GB SXM: the same compute, 80 GB HBM2e at 2,039 GB/s.
    "a100-80gb": Peak(
        "A100 80GB SXM", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 2039e9, 80e9, GPU_LAUNCH_S,
        "NVIDIA A100 datasheet (SXM4 80GB)", _LAUNCH_NOTE, GPU_KERNEL_S, _KERNEL_NOTE,
    ),
    # NVIDIA H100 datasheet (SXM5): BF16 989 TFLOP/s dense (1,979 with sparsity), TF32 495 (989 sparse), FP32 67;
    # 80 GB HBM3 at 3.35 TB/s.
    "h100-sxm": Peak(
        "H100 SXM", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}, 3350e9, 80e9, GPU_LAUNCH_S,
        "NVIDIA H100 datasheet (SXM5)", _LAUNCH_NOTE, GPU_KERNEL_S, _KERNEL_NOTE,
    ),
    # NVIDIA H200 datasheet (SXM): compute as H100 SXM; 141 GB HBM3e at 4.8 TB/s.
    "h200": Peak(
        "H200 SXM", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}, 4800e9, 141e9, GPU_LAUNCH_S,
        "NVIDIA H200 datasheet (SXM)", _LAUNCH_NOTE, GPU_KERNEL_S, _KERNEL_NOTE,
    ),
}  # fmt: skip
DEVICES = (*GPU_PEAKS, "cpu", "cuda")


def cuda_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def gpu_key(name: str) -> str | None:
    """The :data:`GPU_PEAKS` key of a CUDA device name (``torch.cuda.get_device_name``), or None."""
    n = name.lower()
    if "h200" in n:
        return "h200"
    if "h100" in n and "pcie" not in n:
        return "h100-sxm"
    if "a100" in n and "pcie" not in n:
        return "a100-80gb" if "80" in n else "a100"
    return None
