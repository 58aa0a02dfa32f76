"""Where an MAE training step's time goes on this machine: a torch.profiler breakdown behind the MFU figure.

MAE's model-FLOPs utilisation in ``benchmarks/throughput.py`` is below the CNN objectives'. This runs sslkit's MAE
step (the throughput benchmark's small ViT: 192-d, 6 blocks, patch 4, 32 px, 75% masking, batch 256, bf16
autocast and the attention kernel as the engine picks them) under ``torch.profiler`` and groups self CPU time by
kind of operator. For the matrix products it also reports the rate they run at (FLOPs from
``torch.utils.flop_counter``, over their profiled time) against the best bf16 matmul of the same run.

Outputs: ``OUT/mae_profile.json`` and ``OUT/mae_profile.md``.

    python benchmarks/mae_profile.py --out bench_out
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from throughput import MAE_DECODER, MAE_VIT, matmul_peak_gflops  # benchmarks/ is on sys.path as a script

from sslkit.config import resolve
from sslkit.encoders import fused_attention_wanted, set_fused_attention
from sslkit.engine import build_objective

GROUPS = [  # (group, regex over aten op names); first match wins
    ("matmul (linear, mm, bmm, attention)", r"aten::(addmm|mm|bmm|matmul|linear|_scaled_dot_product|baddbmm|"
                                            r"_flash_attention|_efficient_attention)"),
    ("layer norm", r"layer_norm"),
    ("gelu / softmax", r"gelu|softmax"),
    ("gather / index / mask", r"gather|index|scatter|argsort|sort|masked|take"),
    ("dtype casts and copies", r"aten::(to|_to_copy|copy_|contiguous|clone)$"),
    ("optimizer (foreach)", r"_foreach"),
    ("elementwise and reductions", r"aten::(add|mul|sub|div|pow|mean|sum|sqrt|rsqrt|exp|var|neg|where|fill|zero|"
                                   r"ones|zeros|empty|cat|stack|addcmul|addcdiv|lerp|square|abs|clamp|"
                                   r"native_dropout|dropout|threshold)"),
    ("views and reshapes", r"aten::(view|reshape|permute|transpose|expand|unsqueeze|squeeze|flatten|unflatten|"
                           r"select|slice|split|chunk|narrow|as_strided|t|_unsafe_view|unbind|alias|detach)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="profiled steps (after 2 warm-up steps)")
    return p.parse_args(argv)


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve({"augment": {"name": "mae", "image_size": 32}, "encoder": dict(MAE_VIT),
                   "objective": {"name": "mae", **MAE_DECODER}, "optim": {"name": "adamw", "betas": [0.9, 0.95]}})
    torch.manual_seed(0)
    mae = build_objective(cfg)
    set_fused_attention(mae, fused_attention_wanted("auto", "cpu", bf16=True))  # as the engine: math on CPU bf16
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)
    x = torch.randn(args.batch, 3, 32, 32)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mae([x], 0)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(2):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops_per_step = counter.get_total_flops()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_s = (time.perf_counter() - t0) / args.steps
    peak = matmul_peak_gflops()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        totals[group_of(evt.key)] = totals.get(group_of(evt.key), 0.0) + evt.self_cpu_time_total / 1e6
    profiled = sum(totals.values())
    shares = {g: round(v / profiled, 4) for g, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    mm_s = totals.get(GROUPS[0][0], 0.0) / args.steps  # seconds per step in matrix products
    achieved = flops_per_step / step_s / 1e9
    result = {"benchmark": "mae_profile", "batch": args.batch, "model": MAE_VIT, "decoder": MAE_DECODER,
              "threads": torch.get_num_threads(), "step_seconds": round(step_s, 4),
              "images_per_s": round(args.batch / step_s, 1), "train_gflop_per_step": round(flops_per_step / 1e9, 2),
              "achieved_gflops": round(achieved, 1), "matmul_peak_gflops": {k: round(v) for k, v in peak.items()},
              "mfu_vs_bf16_peak": round(achieved / peak["bfloat16"], 3),
              "matmul_seconds_per_step": round(mm_s, 4),
              "matmul_rate_gflops": round(flops_per_step / max(mm_s, 1e-9) / 1e9, 1),
              "self_time_share": shares}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mae_profile.json").write_text(json.dumps(result, indent=2))
    lines = [f"MAE step, batch {args.batch}, bf16 autocast, {torch.get_num_threads()} threads: {step_s * 1e3:.0f} ms "
             f"({args.batch / step_s:.0f} images/s), {achieved:.0f} GFLOP/s = {result['mfu_vs_bf16_peak']:.0%} of the "
             f"measured bf16 matmul peak ({peak['bfloat16']:.0f} GFLOP/s). The matrix products alone run at "
             f"{result['matmul_rate_gflops']:.0f} GFLOP/s.", "", "| operator kind | share of self CPU time |",
             "|---|---|"]
    lines += [f"| {g} | {v:.1%} |" for g, v in shares.items()]
    (out / "mae_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
