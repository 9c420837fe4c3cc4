"""The calls that reach the kernels: each public op of kernels/, the inputs whose dtype the caller picks, the shapes,
and every way to call it (forward; forward and backward for each set of inputs requiring grad) with the dtypes its
own checks accept. Importing this module imports torch only; the calls import kernels."""

from __future__ import annotations

import itertools

import torch

__all__ = [
    "SHAPES",
    "OPS",
    "CANDIDATE_DTYPES",
    "NETWORK_OUTPUTS",
    "short",
    "calls",
    "run_call",
    "tensors",
    "accepted_dtypes",
    "dtype_cases",
]

# The shapes of z / eps / v / x each op is called with (t is (B,)). The shape reaches the kernels only through the ints
# the launchers pass, which Triton specialises (divisible by 16, or equal to 1: a different binary). For MNIST
# (n = 784·B elements, 784 per sample) n and the per-sample count are always divisible by 16, and only the loss's
# count of partial sums m = ceil(n / 4096) varies: 1 for B <= 5, a multiple of 16 for some B (80 is the first), else
# neither. So these three batches give every binary any MNIST batch gets (n < 2^31, past which n is an i64); the
# odd shape stands for everything else (n = 5043, per-sample 1681, m = 2: nothing divisible by 16).
SHAPES: dict[str, tuple[int, ...]] = {
    "mnist-b1": (1, 1, 28, 28),
    "mnist-b80": (80, 1, 28, 28),
    "mnist-b128": (128, 1, 28, 28),
    "odd": (3, 1, 41, 41),
}

# Floating dtypes offered to every input; the public op's checks decide which it accepts (float64: none today).
CANDIDATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# Inputs that come out of the network: bf16 under autocast while the data, noise and ODE state stay fp32.
NETWORK_OUTPUTS = ("v", "v_cond", "v_uncond")


def short(dt: torch.dtype) -> str:
    return SHORT.get(dt, str(dt).removeprefix("torch."))


# Each public op, its tensor inputs (the ones whose dtype the caller picks) and the inputs that can require grad.
OPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flow_path": (("z", "eps", "t"), ("z", "eps", "t")),
    "flow_matching_loss": (("v", "z", "eps"), ("v", "z", "eps")),
    "euler_step_": (("x", "v"), ()),
    "guided_euler_step_": (("x", "v_cond", "v_uncond"), ()),
}


def _subsets(items: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [c for k in range(len(items) + 1) for c in itertools.combinations(items, k)]


def calls(op: str) -> list[tuple[str, dict]]:
    """(label, how) for every way to call ``op`` that reaches a different launch: forward alone, and forward +
    backward for each non-empty set of inputs requiring grad (and, for flow_path with its target, each choice of
    which outputs the loss reads: an unread output's gradient is None)."""
    _, grads = OPS[op]
    if op == "flow_path":
        forms = [(True, [("x_t", "u"), ("x_t",), ("u",)]), (False, [("x_t",)])]
    else:
        forms = [(None, [("loss",)])]
    out = []
    for with_target, reads in forms:
        name = op if with_target is None else f"{op}(with_target={with_target})"
        out.append((name, {"with_target": with_target, "req": (), "used": ()}))
        for req in _subsets(grads)[1:]:
            for used in reads:
                label = f"{name}, backward: grad of {'+'.join(req)}"
                label += f" from {'+'.join(used)}" if with_target else ""
                out.append((label, {"with_target": with_target, "req": req, "used": used}))
    return out


def run_call(op: str, how: dict, t: dict[str, torch.Tensor]) -> None:
    """Call the public op on the tensors ``t`` (and backward, as ``how`` says)."""
    import kernels

    if op == "flow_path":
        x_t, u = kernels.flow_path(t["z"], t["eps"], t["t"], with_target=how["with_target"])
        outs = {"x_t": x_t, "u": u}
    elif op == "flow_matching_loss":
        outs = {"loss": kernels.flow_matching_loss(t["v"], t["z"], t["eps"])}
    elif op == "euler_step_":
        kernels.euler_step_(t["x"], t["v"], 1e-3)
        return
    elif op == "guided_euler_step_":
        kernels.guided_euler_step_(t["x"], t["v_cond"], t["v_uncond"], 1e-3, 1.5)
        return
    else:  # pragma: no cover - OPS and this function are edited together
        raise KeyError(op)
    used = [outs[name] for name in how["used"]]
    if used:
        torch.autograd.backward(used, [torch.ones_like(o) for o in used])


def tensors(op: str, dtypes: dict[str, torch.dtype], shape, device, req=()) -> dict[str, torch.Tensor]:
    out = {}
    for role in OPS[op][0]:
        s = (shape[0],) if role == "t" else shape
        x = torch.empty(s, device=device, dtype=dtypes[role])  # values never matter: nothing runs on them
        out[role] = x.requires_grad_() if role in req else x
    return out


def accepted_dtypes(op: str) -> dict[str, tuple[torch.dtype, ...]]:
    """Per input of ``op``, the dtypes its public checks accept (one input varied at a time, the rest fp32): a
    ``TypeError`` from ``kernels``' own argument checks means rejected. Runs the reference backend on 2 elements."""
    import kernels

    roles = OPS[op][0]
    out = {}
    for role in roles:
        ok = []
        for dt in CANDIDATE_DTYPES:
            dts = {r: (dt if r == role else torch.float32) for r in roles}
            try:
                with kernels.use_backend("reference"):
                    run_call(op, {"with_target": True, "req": (), "used": ()}, tensors(op, dts, (2, 1), "cpu"))
            except TypeError:
                continue
            ok.append(dt)
        out[role] = tuple(ok)
    return out


def dtype_cases(op: str, mode: str) -> list[dict[str, torch.dtype]]:
    """The dtype assignments ``op`` is compiled for. ``default``: uniform fp32 / bf16 / fp16 (an input that does not
    accept it stays fp32), ``amp`` (network outputs bf16, the rest fp32), and each input alone in each dtype it
    accepts with the rest fp32 (mixing is what changes the code: a load and a store of different widths can get
    different layouts, converted through shared memory). ``all``: every accepted combination (6x the compiles)."""
    acc = accepted_dtypes(op)
    roles = OPS[op][0]
    if mode == "all":
        return [dict(zip(roles, combo)) for combo in itertools.product(*(acc[r] for r in roles))]
    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        cases.append({r: (dt if dt in acc[r] else torch.float32) for r in roles})
    cases.append({r: (torch.bfloat16 if r in NETWORK_OUTPUTS else torch.float32) for r in roles})
    for role in roles:
        for dt in acc[role]:
            cases.append({r: (dt if r == role else torch.float32) for r in roles})
    unique = []
    for c in cases:
        if c not in unique:
            unique.append(c)
    return unique
