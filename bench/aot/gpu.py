"""On a CUDA machine: every variant launched once through the same calls, and the driver's figures of each kernel
Triton compiled compared with the AOT row of the same compile hash (``--check-gpu``)."""

from __future__ import annotations

import torch

from .calls import OPS, SHAPES, calls, dtype_cases, run_call, short, tensors
from .compiling import PROBE_MAXNREG, probe_variant, spill_probe
from .table import fmt_map, fmt_spec
from .variants import enumerate_variants, find_jit_functions

__all__ = ["check_gpu"]


def check_gpu(rows: list[dict], mode: str = "default") -> list[str]:
    """Launch every variant once on the current CUDA device through the same calls, then compare each kernel Triton
    compiled (its JIT cache) with the AOT row of the same compile hash: the driver's ``n_regs`` with the registers,
    its ``n_spills`` (local memory per thread / 4) with (stack frame + local) / 4. Then the same for the spill
    probe (a kernel held to 24 registers, launched directly), so a driver figure that does not mean what the AOT
    one does shows up even though no real variant spills. Returns the report's lines; one that starts with
    ``MISMATCH``, ``MISSING`` or ``FAILED`` is a failure."""
    import kernels

    major, minor = torch.cuda.get_device_capability()
    cap = 10 * major + minor
    by_hash = {r["hash"]: r for r in rows if r["target"] == f"sm_{cap}" and "error" not in r}
    launched, failed = 0, []
    for op in OPS:
        for dts in dtype_cases(op, mode):
            for shape in SHAPES.values():
                for label, how in calls(op):
                    try:
                        with kernels.use_backend("triton"):
                            run_call(op, how, tensors(op, dts, shape, "cuda", how["req"]))
                        torch.cuda.synchronize()
                        launched += 1
                    except Exception as e:  # keep going: every other variant is still worth its comparison
                        failed.append(f"FAILED {label} {fmt_map({k: short(d) for k, d in dts.items()})} {shape}: {e}")
    report, seen = [], set()

    def compare(what: str, ck, row: dict) -> None:
        ck._init_handles()
        aot = (row["registers"], (row["stack_frame_bytes"] + row["cubin_local_bytes"]) // 4)
        ok = (ck.n_regs, ck.n_spills) == aot
        report.append(
            f"{'ok' if ok else 'MISMATCH'} {what} {fmt_map(row['constexprs'])} {fmt_map(row['dtypes'])} "
            f"{fmt_spec(row['specialization'])}: driver n_regs {ck.n_regs} n_spills {ck.n_spills}, "
            f"AOT {aot[0]} / {aot[1]}"
        )

    for name, fn in find_jit_functions().items():
        for caches in fn.device_caches.values():
            for ck in caches[0].values():
                what = f"{name} {ck.hash[:12]}"
                if ck.hash not in by_hash:
                    report.append(f"MISSING {what}: launched on the GPU but no AOT row has its compile hash")
                    continue
                seen.add(ck.hash)
                compare(what, ck, by_hash[ck.hash])
    for h, r in by_hash.items():
        if h not in seen:
            report.append(f"MISSING {r['kernel']} {h[:12]}: an AOT row the GPU run never compiled")
    report += failed
    report.append(f"{launched} calls launched; {len(seen)} of {len(by_hash)} AOT rows for sm_{cap} matched by hash")

    variants, _ = enumerate_variants(mode)
    probe = spill_probe(variants, cap)
    v = probe_variant(variants)
    args = [torch.empty_like(a, device="cuda") if isinstance(a, torch.Tensor) else a for a in v.args]
    try:
        ck = v.fn[(1,)](*args, **v.kwargs, maxnreg=PROBE_MAXNREG)  # one program: only its registers matter
        torch.cuda.synchronize()
    except Exception as e:
        report.append(f"FAILED spill probe launch: {type(e).__name__}: {e}")
        return report
    if "error" in probe or ck.hash != probe["hash"]:
        report.append(f"MISSING spill probe: the GPU compiled {ck.hash[:12]}, the AOT probe {probe}")
    else:
        compare(f"spill probe (maxnreg {PROBE_MAXNREG}) {v.kernel}", ck, probe)
    return report
