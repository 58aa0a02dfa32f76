"""Which arithmetic a run uses: bf16 autocast where it is faster, fp32 elsewhere, and the Fabric that applies it."""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

BF16_MIN_SPEEDUP = 1.15  # bf16 autocast is chosen on a CPU only when it is at least this much faster than fp32
CPU_BF16_ENV = "SSLKIT_CPU_BF16"  # "1" / "0" skips the probe (set by the first probe, so DDP children agree)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX); a precondition, not a promise of speed."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _best_seconds(fn, reps: int = 3) -> float:  # noqa: ANN001
    fn()  # warm-up: kernel selection, allocation
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def cpu_bf16_speedup() -> float:
    """How much faster bf16 runs than fp32 on this CPU: the geometric mean over a 3x3 convolution (oneDNN,
    channels_last) and a 1024x1024 matmul, each timed at its best of 3 (about 0.2 s in all).

    Measured, because the instruction set does not tell: on 2 AMD Zen 5 cores bf16 matmuls run at 2.3x fp32 (MKL's
    fp32 is slow there); on a 2-core Intel Xeon with AVX512-BF16 but no AMX, fp32 matmuls ran at 296 GFLOP/s and
    bf16 at 165, and a narrow ResNet's training step was 5% faster in fp32.
    """
    if not cpu_has_native_bf16():
        return 0.0
    with torch.no_grad():
        def conv(dtype: torch.dtype):
            x = torch.randn(64, 64, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(64, 64, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
            return lambda: torch.nn.functional.conv2d(x, w, padding=1)

        def mm(dtype: torch.dtype):
            a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
            return lambda: a @ b

        ratios = [_best_seconds(make(torch.float32)) / _best_seconds(make(torch.bfloat16)) for make in (conv, mm)]
    return math.sqrt(ratios[0] * ratios[1])


def cpu_prefers_bf16() -> bool:
    """bf16 autocast on this CPU? ``$SSLKIT_CPU_BF16`` (1/0) if set, else :func:`cpu_bf16_speedup` >= 1.15."""
    env = os.environ.get(CPU_BF16_ENV)
    if env in ("0", "1"):
        return env == "1"
    choice = cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    os.environ[CPU_BF16_ENV] = "1" if choice else "0"  # processes started from here (DDP) make the same choice
    return choice


def resolve_precision(cfg: DictConfig) -> str:
    """``trainer.precision`` resolved. ``auto``: bf16 autocast on GPU, and on a CPU where bf16 measures faster than
    fp32 (:func:`cpu_prefers_bf16`), else fp32."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu or cpu_prefers_bf16() else "32-true"


def make_fabric(cfg: DictConfig):  # noqa: ANN201 - lightning_fabric.Fabric
    """Lightning Fabric for the recipe's devices, nodes, strategy and resolved precision. ``fsdp``: Fabric's FSDP2
    strategy (:func:`sslkit.engine.fsdp.fsdp_strategy`) on any accelerator, CPUs (gloo) included."""
    from lightning_fabric import Fabric

    t = cfg.trainer
    strategy = t.strategy
    if strategy == "fsdp":
        from sslkit.engine.fsdp import fsdp_strategy

        strategy = fsdp_strategy()
    return Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
                  precision=resolve_precision(cfg))
