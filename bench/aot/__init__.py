"""``python -m bench aot``: every Triton kernel in kernels/ compiled to a cubin for real GPU targets, no GPU needed.

    python -m bench aot [--targets sm_80,sm_90] [--dtypes default|all] [--out FILE.json] [--markdown] [--doc FILE.md]
                        [--jobs N] [--cache-dir DIR] [--check-gpu]

Triton's interpreter (how CI runs the kernels) accepts programs a real target rejects and says nothing of registers
or spills. Triton's own LLVM and its bundled ``ptxas`` build a cubin on a CPU-only machine, so this compiles each
kernel variant for each target and reads what the hardware would get.

**Which variants.** Not a hand-written list: the public ops (``kernels.flow_path``, ``flow_matching_loss``,
``euler_step_``, ``guided_euler_step_``) are called on CPU tensors, forward and backward through autograd for every
set of inputs that can require grad, with every launch of a ``@triton.jit`` kernel recorded instead of run
(``JITFunction.run`` is replaced in this process only). Each recorded launch goes through Triton's own binder
(``create_function_from_signature`` + ``JITFunction._pack_args``, what ``JITFunction.run`` does before it compiles),
so the signature, the constexprs (``BLOCK``, ``WRITE_U``, ``HAS_GU``/``WRITE_DEPS``, ``GUIDED``, ...), the integer
and pointer specialisations (divisible by 16, equal to 1) and the options (``num_warps``) are exactly those a GPU
launch of the same call would compile. Dtypes come from the public ops' own checks: each input takes each dtype the
op accepts for it (``x`` of the Euler ops is fp32 only; the rest fp32, bf16, fp16), and the outputs take what the
launchers allocate. Shapes (:data:`SHAPES`): MNIST batches of 1, 80 and 128, which between them give every binary
any MNIST batch gets, and an odd (3, 1, 41, 41) with no int divisible by 16. ``--dtypes default`` compiles
uniform dtypes (every input fp32, bf16 or fp16 where accepted), ``amp`` (the network's output v in bf16, the rest
fp32: training and sampling under autocast) and each input alone in bf16 or fp16 with the rest fp32; ``--dtypes
all`` every combination the ops accept (6x the compiles). A kernel that is never launched and never called from a
launched kernel is reported as uncovered (exit status 1).

**Registers and spills.** Without a GPU Triton's ``CompiledKernel`` has no ``n_regs``/``n_spills`` (the driver fills
them when it loads the cubin). Triton itself runs ``ptxas -v`` to make the cubin and throws the log away; this tool
keeps it: ``subprocess.run`` inside ``triton.backends.nvidia.compiler`` is wrapped (here only) so the log of the very
ptxas run that wrote the cubin is parsed (registers, stack frame, spill stores and loads). No second ptxas run with
flags copied by hand (Triton 3.8 adds ``--regAllocOptLevel=2``, 3.6 does not: a copy would drift). The log is stored
next to the kernel in Triton's cache (``aot-ptxas.json``), so a warm run reads it back; a cached kernel without one
is recompiled once. Cross-checks, in every row: the SHA-256 of the cubin in Triton's cache equals that of the file
the logged ptxas run wrote, and ``cuobjdump -res-usage`` (bundled with Triton) reads the same REG and STACK from
it. And a spill probe (:func:`spill_probe`: the widest kernel held to 24 registers) must show spills, so that the
zeros mean something. Shared memory and warps come from the kernel's metadata (``shared`` is the dynamic shared
memory Triton asks for at launch).

Rows go to ``bench/results/kernels-aot.json`` (``--out``), one per kernel variant and target; ``--markdown`` prints
:func:`aot_table`, ``--doc`` writes docs/kernels-aot.md; :func:`aot_section` (:func:`summary_table`: per kernel ×
target) is docs/results.md's compact form. Triton's cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``; ``--cache-dir``) makes a second run quick. ``--check-gpu`` (CUDA only) launches every variant
once through the same calls and compares the driver's ``n_regs`` and ``n_spills`` with the AOT rows of the local
GPU's arch, matched by Triton's compile hash.

The modules, one job each: ``targets`` (sm_XX and their limits), ``calls`` (the public ops, shapes and dtype cases),
``variants`` (the kernels, the recorded launches, Triton's binder), ``compiling`` (the cubins, ptxas' figures, the
spill probe), ``table`` (the markdown, the JSON layout, the checks), ``gpu`` (``--check-gpu``), ``cli`` (the flags:
:class:`AotSettings`). Imports torch, triton, kernels, and fastflow for its settings and atomic writes (torch, numpy,
safetensors, tqdm, matplotlib and torchvision: a GPU machine's stock python has them). Importing this package imports
neither triton nor kernels; :func:`main` sets ``TRITON_INTERPRET=0`` before anything imports them.
"""

from __future__ import annotations

import os
import sys

from .calls import OPS, SHAPES, accepted_dtypes, dtype_cases
from .compiling import PROBE_MAXNREG, compile_all, spill_probe
from .table import aot_section, aot_table, label, problems, summary_table, write_doc
from .targets import LIMITS, TARGETS
from .variants import Variant, coverage, enumerate_variants, find_jit_functions

__all__ = [
    "TARGETS",
    "LIMITS",
    "SHAPES",
    "OPS",
    "PROBE_MAXNREG",
    "Variant",
    "accepted_dtypes",
    "dtype_cases",
    "find_jit_functions",
    "enumerate_variants",
    "coverage",
    "compile_all",
    "spill_probe",
    "aot_table",
    "summary_table",
    "aot_section",
    "write_doc",
    "label",
    "problems",
    "build_parser",
    "main",
]


def _real_kernels() -> None:
    """Real JITFunctions, not the interpreter's: @triton.jit decides when triton is imported, and kernels reads
    ``TRITON_INTERPRET`` when it is imported (through fastflow, by the command line's settings). A process that
    already imported triton with ``TRITON_INTERPRET=1`` gets a clear error from :func:`find_jit_functions`."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"


def build_parser():
    """The parser of ``python -m bench aot`` (:class:`cli.AotSettings`). Leaves ``TRITON_INTERPRET`` alone (docs/cli.md
    is made in processes that run the kernels in Triton's interpreter)."""
    from .cli import build_parser

    return build_parser()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench aot``: see the module docstring; the exit status is 1 when :func:`problems` finds any."""
    _real_kernels()
    from .cli import main

    return main(argv)
