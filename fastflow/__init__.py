"""fastflow: conditional flow matching on MNIST, built for speed.

>>> import fastflow
>>> model = fastflow.load_pretrained("model", device="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import kernels as _kernels

if not getattr(_kernels, "IS_FASTFLOW_KERNELS", False):  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the 'kernels' package imported from {getattr(_kernels, '__file__', '?')} is not fastflow's own "
        "(Hugging Face's 'kernels' uses the same name): uninstall it (pip uninstall kernels) or reinstall fastflow"
    )

from .checkpoint import load_pretrained  # noqa: E402
from .config import ModelConfig, TrainConfig  # noqa: E402
from .unet import UNet  # noqa: E402

__all__ = ["load_pretrained", "ModelConfig", "TrainConfig", "UNet"]
__version__ = "0.1.0"
