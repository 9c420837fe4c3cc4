"""``python -m bench sample``'s rows: one fixed-step Euler sampling call of ``batch`` images per call, eager or
compiled (and on CUDA replayed as a CUDA graph), at each NFE."""

from __future__ import annotations

from collections.abc import Callable

from .train_rows import MODES, training_api

__all__ = ["sample_runner"]


def sample_runner(
    mode: str, batch: int, *, preset: str = "auto", device: str = "auto", seed: int = 0, model: dict | None = None
) -> tuple[Callable[[int], object], dict]:
    """``run(steps)`` draws ``batch`` images with ``steps`` Euler steps (1 NFE each) and returns them
    ([B, 1, 28, 28] fp32 in [0, 1]). The model is a freshly initialised U-Net of the preset's shape (speed does
    not depend on the weights)."""
    import torch

    from fastflow.compile import CompiledSampler
    from fastflow.device import autocast, resolve_amp, resolve_device
    from fastflow.solvers import SamplerSpec, sample
    from fastflow.unet import UNet

    _, resolve_configs = training_api()
    m = MODES[mode]
    dev = resolve_device(device)
    mcfg, cfg = resolve_configs(preset, dev.type, model=model)
    torch.manual_seed(seed)
    model = UNet(mcfg).to(dev).eval().requires_grad_(False)
    if m.channels_last:
        model.to(memory_format=torch.channels_last)
    ctx = autocast(dev, resolve_amp(m.amp, dev))
    labels = torch.arange(batch, device=dev) % 10
    g = torch.Generator(device=dev)
    if m.compile:
        sampler = CompiledSampler(model, ctx=ctx, cuda_graphs=m.cuda_graphs)

        def run(steps: int):
            g.manual_seed(seed)
            return sampler(labels, SamplerSpec("euler", steps), generator=g)[0]
    else:

        def run(steps: int):
            g.manual_seed(seed)
            return sample(model, labels, SamplerSpec("euler", steps), generator=g, ctx=ctx)[0]

    return run, {"preset": cfg.preset, "model": mcfg, "device": dev, "net": model}
