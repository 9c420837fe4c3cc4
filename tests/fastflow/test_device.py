"""Precision per machine: ``--amp auto`` on a CPU is measured, not read from /proc/cpuinfo alone."""

from __future__ import annotations

import subprocess
import sys

import torch

from fastflow.device import describe_amp, resolve_amp

PROBE = (
    "import torch; from fastflow.device import resolve_amp, describe_amp; d = torch.device('cpu'); "
    "a = resolve_amp('auto', d); print(a, '|', describe_amp('auto', a, d))"
)


def test_auto_amp_is_fp32_on_a_cpu_held_to_avx2(cli_env):
    """oneDNN and ATen held to AVX2 emulate bf16 (7x slower than fp32 here) while /proc/cpuinfo still lists
    avx512_bf16 on a bigger CPU: the measured choice must be fp32 there, on any machine."""
    env = dict(cli_env, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    p = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    dtype, line = (s.strip() for s in p.stdout.strip().split("|"))
    assert dtype == "None" and line.startswith("fp32 (auto: "), p.stdout


def test_explicit_amp_is_obeyed():
    cpu = torch.device("cpu")
    assert resolve_amp("none", cpu) is None and resolve_amp("bf16", cpu) is torch.bfloat16
    assert describe_amp("bf16", torch.bfloat16, cpu) == "bf16"
