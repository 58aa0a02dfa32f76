"""Training throughput: sslkit's pipeline against lightly's reference pipeline, in one process.

For each objective (SimCLR with the CIFAR ResNet-18, DINO with 2+6 multi-crop, MAE with a small ViT, BYOL with
the CIFAR ResNet-18 and 4096/256 projector and predictor) on Fashion-MNIST at 32 px, two pipelines run alternately
on the identical backbone, heads, batch and data:

- reference: lightly's transforms in a DataLoader over PIL images, lightly's heads and loss, and the plain
  loop of lightly's examples (fp32, NCHW, one forward per crop);
- sslkit: ``sslkit.engine.train`` with the recipe below (in-memory uint8 data, seeded views, bf16 autocast
  where the CPU has native bf16, channels_last for CNNs, grouped multi-crop forward, foreach optimiser).

Reported per pipeline: images/s (source images, steady state), the share of step time spent waiting for
data, peak resident memory, and model-FLOPs utilisation: training FLOPs per image (``torch.utils.flop_counter``)
x images/s over the best matmul rate measured in the same run. Memory is measured twice: during the timed runs
(``peak_rss_gb``, the shared process, so it includes what earlier pipelines left allocated) and with each
pipeline alone in a fresh child process (``peak_rss_gb_alone``, 1 timed step; the table's column, skip it
with ``--no-fresh-memory``). Both include the loader workers.

On a GPU (``--device cuda``) the reference keeps lightly's PIL transforms in DataLoader workers and moves the
views to the GPU (fp32, as in lightly's examples), while sslkit sends uint8 batches to the GPU and makes the
views there (``sslkit.augment.batched``) under bf16 autocast. The GPU figures add the share of the timed window
in which the GPU was busy (NVML's utilisation counter, sampled every 20 ms) and the MFU against a bf16 matmul
measured on the same GPU; results go to ``throughput_cuda.{json,md}``.

    python benchmarks/throughput.py --out bench_out            # all four, about 15-20 minutes on 2 cores
    python benchmarks/throughput.py --objectives simclr --steps 6
    python benchmarks/throughput.py --device cuda --out bench_out   # 60k images, 150 steps, 8 loader workers
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from memory_soak import tree_rss_gb  # benchmarks/ is on sys.path when run as a script
from torch import nn

from sslkit.config import resolve
from sslkit.engine import build_objective, resolve_precision, train
from sslkit.plugins import load_all
from sslkit.registry import DATASETS, ENCODERS

IMAGE_SIZE = 32
MAE_VIT = {"name": "vit_tiny_patch4_32", "depth": 6, "embed_dim": 192, "num_heads": 3}  # a small ViT: patch 4, width 192, depth 6
MAE_DECODER = {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}
DINO_OUT_DIM = 2048
# BYOL's projector and predictor: lightly's BYOLProjectionHead / BYOLPredictionHead defaults and sslkit's BYOL
# defaults (the paper's), 512 -> 4096 -> 256 and 256 -> 4096 -> 256, Linear-BN-ReLU-Linear in both
BYOL_HIDDEN_DIM = 4096
BYOL_OUT_DIM = 256
BYOL_MOMENTUM = (0.99, 1.0)  # target momentum, cosine per step (sslkit's default; lightly's example: 0.996 -> 1)
BYOL_MIN_SCALE = 0.08  # RandomResizedCrop's lower scale, lightly's BYOLView{1,2}Transform default
N_LOCAL = 6
LOCAL_SIZE = 16
KINDS = ("reference", "sslkit", "sslkit_compiled")
OBJECTIVE_NAMES = ("simclr", "dino", "mae", "byol")


class _Poller:
    """Calls ``self._sample()`` every ``interval`` seconds on a background thread while the block runs."""

    interval = 0.05
    enabled = True

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()


class RSSPeak(_Poller):
    """Peak resident memory of this process and its loader workers while the block runs (sampled every 50 ms)."""

    peak = 0.0

    def _sample(self) -> None:
        self.peak = max(self.peak, tree_rss_gb())


class GPUBusy(_Poller):
    """Samples NVML's GPU utilisation (share of time a kernel ran) every 20 ms; ``mean(a, b)`` over a window."""

    interval = 0.02

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.samples: list[tuple[float, float]] = []
        if self.enabled:
            torch.cuda.utilization()  # fails early, with NVML's own message, when pynvml is missing

    def _sample(self) -> None:
        self.samples.append((time.perf_counter(), float(torch.cuda.utilization())))

    def mean(self, start: float, end: float) -> float | None:
        vals = [u for t, u in self.samples if start <= t <= end]
        return sum(vals) / len(vals) / 100 if vals else None


def matmul_peak_gflops(device: torch.device = torch.device("cpu"), reps: int = 5) -> dict[str, float]:
    """Best measured GFLOP/s of a square matmul in fp32 and bf16 (MKL/oneDNN on CPU, cuBLAS on GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - t)
        out[str(dtype).replace("torch.", "")] = 2 * n**3 / best / 1e9
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- recipes


def sslkit_recipe(objective: str, batch: int, steps: int, workers: int, out_dir: str, device: str = "cpu",
                  compile: bool = False) -> dict:
    base = {"name": f"bench_{objective}", "output_dir": out_dir,
            "data": {"name": "fashion_mnist", "batch_size": batch, "num_workers": workers},
            "optim": {"name": "adamw", "lr": 1e-3, "warmup_epochs": 0, "foreach": True},
            "trainer": {"max_steps": steps, "checkpoint_every_steps": 0, "log_every_steps": 1000, "compile": compile,
                        "accelerator": "gpu" if device == "cuda" else "cpu", "devices": 1, "progress": False},
            "eval": {"final_knn": False}}
    if objective == "simclr":
        base.update(augment={"name": "simclr", "image_size": IMAGE_SIZE}, encoder={"name": "resnet18_cifar"},
                    objective={"name": "simclr", "proj_hidden_dim": 512, "proj_out_dim": 128})
    elif objective == "dino":
        base.update(augment={"name": "multicrop", "image_size": IMAGE_SIZE, "local_size": LOCAL_SIZE,
                             "num_local": N_LOCAL, "preset": "small"},
                    encoder={"name": "resnet18_cifar"},
                    objective={"name": "dino", "out_dim": DINO_OUT_DIM, "head_hidden_dim": 512,
                               "head_bottleneck_dim": 64, "head_use_bn": True})
    elif objective == "mae":
        base.update(augment={"name": "mae", "image_size": IMAGE_SIZE}, encoder=dict(MAE_VIT),
                    objective={"name": "mae", **MAE_DECODER})
    elif objective == "byol":
        # BYOL's two asymmetric views (solarisation p=0.2 on the second) are multi-crop with no local crops
        base.update(augment={"name": "multicrop", "image_size": IMAGE_SIZE, "num_local": 0, "preset": "small",
                             "global_scale": [BYOL_MIN_SCALE, 1.0], "solarize_p": 0.2},
                    encoder={"name": "resnet18_cifar"},
                    objective={"name": "byol", "proj_hidden_dim": BYOL_HIDDEN_DIM, "proj_out_dim": BYOL_OUT_DIM,
                               "pred_hidden_dim": BYOL_HIDDEN_DIM, "momentum_start": BYOL_MOMENTUM[0],
                               "momentum_end": BYOL_MOMENTUM[1]})
    return base


# ------------------------------------------------------------------------------------ lightly reference


class PILDataset(torch.utils.data.Dataset):
    """uint8 tensors -> PIL images -> lightly transform (as lightly's examples do with torchvision datasets)."""

    def __init__(self, images: torch.Tensor, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from torchvision.transforms.functional import to_pil_image

        return self.transform(to_pil_image(self.images[i])), 0


def reference_setup(objective: str, images: torch.Tensor, batch: int, workers: int,
                    device: torch.device = torch.device("cpu"), total_steps: int = 1000):
    """lightly's example pipeline for ``objective``: (loader, model, optimiser, step function).

    ``total_steps`` sets the length of BYOL's per-step momentum schedule (the other objectives ignore it).
    """
    from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import (
        BYOLPredictionHead,
        BYOLProjectionHead,
        DINOProjectionHead,
        MAEDecoderTIMM,
        MaskedVisionTransformerTIMM,
        SimCLRProjectionHead,
    )
    from lightly.models.utils import (
        deactivate_requires_grad,
        get_at_index,
        patchify,
        random_token_mask,
        repeat_token,
        set_at_index,
        update_momentum,
    )
    from lightly.transforms import DINOTransform, MAETransform, SimCLRTransform
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    load_all()
    if objective == "simclr":
        transform = SimCLRTransform(input_size=IMAGE_SIZE, gaussian_blur=0.0, cj_strength=0.5)
        backbone = ENCODERS.build("resnet18_cifar")
        model = nn.ModuleDict({"backbone": backbone, "head": SimCLRProjectionHead(512, 512, 128)})
        criterion = NTXentLoss(temperature=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.06)

        def step(views):
            x0, x1 = views
            z0 = model["head"](model["backbone"](x0))
            z1 = model["head"](model["backbone"](x1))
            return criterion(z0, z1)
    elif objective == "dino":
        transform = DINOTransform(global_crop_size=IMAGE_SIZE, local_crop_size=LOCAL_SIZE, n_local_views=N_LOCAL,
                                  gaussian_blur=(0.0, 0.0, 0.0))
        def head():
            return DINOProjectionHead(512, 512, 64, DINO_OUT_DIM, batch_norm=True, freeze_last_layer=1)

        student = nn.ModuleDict({"backbone": ENCODERS.build("resnet18_cifar"), "head": head()})
        # lightly's example copies the backbone and builds a second head (its weight-normed head cannot be deep-copied)
        teacher = nn.ModuleDict({"backbone": copy.deepcopy(student["backbone"]), "head": head()})
        teacher["head"].load_state_dict(student["head"].state_dict())
        deactivate_requires_grad(teacher)
        model = nn.ModuleDict({"student": student, "teacher": teacher})
        criterion = DINOLoss(output_dim=DINO_OUT_DIM, warmup_teacher_temp_epochs=5)
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)

        def step(views):
            update_momentum(student, teacher, m=0.996)
            with torch.no_grad():
                t_out = [teacher["head"](teacher["backbone"](v)) for v in views[:2]]
            s_out = [student["head"](student["backbone"](v)) for v in views]
            return criterion(t_out, s_out, epoch=0)
    elif objective == "mae":
        transform = MAETransform(input_size=IMAGE_SIZE)
        vit = ENCODERS.build(MAE_VIT["name"], **{k: v for k, v in MAE_VIT.items() if k != "name"}).model
        backbone = MaskedVisionTransformerTIMM(vit=vit)
        decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=4,
                                 embed_dim=MAE_VIT["embed_dim"], decoder_embed_dim=MAE_DECODER["decoder_dim"],
                                 decoder_depth=MAE_DECODER["decoder_depth"],
                                 decoder_num_heads=MAE_DECODER["decoder_heads"])
        model = nn.ModuleDict({"backbone": backbone, "decoder": decoder})
        opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4)
        mask_ratio = 0.75

        def step(views):
            x = views[0]
            b = x.shape[0]
            idx_keep, idx_mask = random_token_mask((b, backbone.sequence_length), mask_ratio, device=x.device)
            x_encoded = backbone.encode(images=x, idx_keep=idx_keep)  # (B, 1 + K, D), visible tokens only
            x_decode = decoder.embed(x_encoded)
            x_masked = repeat_token(decoder.mask_token, (b, backbone.sequence_length))
            x_masked = set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
            x_pred = decoder.predict(get_at_index(decoder.decode(x_masked), idx_mask))
            target = get_at_index(patchify(x, 4), idx_mask - 1)
            return nn.functional.mse_loss(x_pred, target)
    elif objective == "byol":
        # lightly's examples/pytorch/byol.py: online backbone + projection + prediction head; deep-copied momentum
        # backbone + projection head with requires_grad off; one forward per view and network; symmetric loss
        view = {"input_size": IMAGE_SIZE, "min_scale": BYOL_MIN_SCALE, "gaussian_blur": 0.0}  # no blur, as sslkit's
        transform = BYOLTransform(view_1_transform=BYOLView1Transform(**view),  # "small" preset at 32 px
                                  view_2_transform=BYOLView2Transform(**view, solarization_prob=0.2))
        online = nn.ModuleDict({"backbone": ENCODERS.build("resnet18_cifar"),
                                "projection_head": BYOLProjectionHead(512, BYOL_HIDDEN_DIM, BYOL_OUT_DIM),
                                "prediction_head": BYOLPredictionHead(BYOL_OUT_DIM, BYOL_HIDDEN_DIM, BYOL_OUT_DIM)})
        momentum = nn.ModuleDict({"backbone": copy.deepcopy(online["backbone"]),
                                  "projection_head": copy.deepcopy(online["projection_head"])})
        deactivate_requires_grad(momentum)
        model = nn.ModuleDict({"online": online, "momentum": momentum})
        criterion = NegativeCosineSimilarity()
        opt = torch.optim.SGD(online.parameters(), lr=0.06)
        counter = {"step": 0}

        def forward(x):
            return online["prediction_head"](online["projection_head"](online["backbone"](x).flatten(start_dim=1)))

        def forward_momentum(x):  # no torch.no_grad in lightly's example: its weights simply need no gradient
            return momentum["projection_head"](momentum["backbone"](x).flatten(start_dim=1)).detach()

        def step(views):
            m = cosine_schedule(counter["step"], total_steps, *BYOL_MOMENTUM)
            counter["step"] += 1
            update_momentum(online["backbone"], momentum["backbone"], m=m)
            update_momentum(online["projection_head"], momentum["projection_head"], m=m)
            x0, x1 = views
            p0, z0 = forward(x0), forward_momentum(x0)
            p1, z1 = forward(x1), forward_momentum(x1)
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))
    else:
        raise ValueError(objective)

    model.to(device)
    loader = torch.utils.data.DataLoader(PILDataset(images, transform), batch_size=batch, shuffle=True,
                                         drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    return loader, model, opt, step


def run_reference(objective: str, images: torch.Tensor, batch: int, steps: int, workers: int,
                  device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader, model, opt, step = reference_setup(objective, images, batch, workers, device, total_steps=steps + 2)
    model.train()
    with RSSPeak() as mem, GPUBusy(device) as busy:
        m = _reference_loop(loader, model, opt, step, batch, steps, device)
    window = m.pop("window")
    if device.type == "cuda":
        m["gpu_busy_share"] = busy.mean(*window)
        m["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return {**m, "peak_rss_gb": mem.peak}


def _reference_loop(loader, model, opt, step, batch: int, steps: int, device: torch.device) -> dict:
    it = iter(loader)
    times, waits = [], []
    start = 0.0
    for i in range(steps + 2):
        t0 = time.perf_counter()
        views, _ = next(it)
        views = [v.to(device) for v in views]  # as lightly's examples do
        t1 = time.perf_counter()
        loss = step(views)
        loss.backward()
        opt.step()
        opt.zero_grad()
        _sync(device)  # per-step timing; lightly's examples sync at least once per step too (loss logging)
        t2 = time.perf_counter()
        if i == 2:
            start = t0
        if i >= 2:  # the same warm-up exclusion as the engine's steady-state figure
            times.append(t2 - t0)
            waits.append(t1 - t0)
    total = sum(times)
    return {"images_per_s": batch * steps / total, "data_wait_share": sum(waits) / total,
            "precision": "32-true", "final_loss": float(loss.detach()), "window": (start, time.perf_counter())}


def run_sslkit(objective: str, batch: int, steps: int, workers: int, device: torch.device,
               compile: bool = False) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(sslkit_recipe(objective, batch, steps + 2, workers, tmp, device.type, compile))
        t = time.perf_counter()
        with RSSPeak() as mem, GPUBusy(device) as busy:
            result = train(cfg)
            end = time.perf_counter()
        wall = end - t
        summary = json.loads((result.run_dir / "summary.json").read_text())
    out = {"images_per_s": summary["steady_images_per_s"], "data_wait_share": summary["data_wait_share"],
           "peak_rss_gb": mem.peak, "precision": summary["precision"], "final_loss": summary["final_loss"],
           "wall_s": wall}
    if compile:  # torch.compile's one-off cost: the first step's time, outside the steady window
        out["compile_s"] = summary["first_step_seconds"]
    if device.type == "cuda":
        # the engine's steady window (after its warm-up steps) ends just before train() returns
        steady_s = batch * steps / summary["steady_images_per_s"] if summary["steady_images_per_s"] else 0.0
        out["gpu_busy_share"] = busy.mean(end - steady_s, end)
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def reference_images(n: int) -> torch.Tensor:
    """The first ``n`` Fashion-MNIST training images (uint8) that lightly's reference pipeline trains on."""
    return DATASETS.build("fashion_mnist", split="train").images[:n]


def run_pipeline(kind: str, objective: str, images: torch.Tensor | None, batch: int, steps: int, workers: int,
                 device: torch.device) -> dict:
    """One measurement of ``kind`` (``reference``, ``sslkit`` or ``sslkit_compiled``; only the first uses ``images``)."""
    if kind == "reference":
        return run_reference(objective, images, batch, steps, workers, device)
    return run_sslkit(objective, batch, steps, 0 if device.type == "cuda" else workers, device,
                      compile=kind == "sslkit_compiled")


def peak_rss_alone(kind: str, objective: str, args: argparse.Namespace) -> float | None:
    """Peak RSS (GB, loader workers included) of ``kind`` run alone in a fresh Python process, 1 timed step."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", kind, "--objectives", objective,
           "--device", args.device, "--batch", str(args.batch), "--workers", str(args.workers),
           "--images", str(args.images)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{objective}] memory probe of {kind} failed (exit {proc.returncode}); its column falls back to the "
              f"shared process's figure:\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_gb"]


def train_flops_per_image(objective: str, batch: int = 8) -> float:
    """fwd+bwd FLOPs of one sslkit training step per source image (flop_counter counts matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = resolve(sslkit_recipe(objective, batch, 1, 0, tempfile.gettempdir()))
    obj = build_objective(cfg)
    obj.setup_schedule(100, 1000)
    from sslkit.engine import build_pipeline

    pipe = build_pipeline(cfg)
    imgs = DATASETS.build("fashion_mnist", split="test").images[:batch]
    per = [pipe(im) for im in imgs]
    views = [torch.stack([p[v] for p in per]) for v in range(len(per[0]))]
    with FlopCounterMode(display=False) as fc:
        obj(views, 0)["loss"].backward()
    return fc.get_total_flops() / batch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVE_NAMES), choices=OBJECTIVE_NAMES)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per measurement, after 2 warm-up steps (default 5 on CPU, 150 on GPU)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of reference and sslkit")
    ap.add_argument("--workers", type=int, default=None, help="reference loader workers (default 2 on CPU, 8 on GPU)")
    ap.add_argument("--images", type=int, default=None,
                    help="Fashion-MNIST training images used (default 10000 on CPU, 60000 on GPU: no epoch end)")
    ap.add_argument("--compile", action="store_true",
                    help="also time sslkit with trainer.compile=true (torch.compile); its compile time is reported "
                         "separately and the steady images/s excludes it")
    ap.add_argument("--no-fresh-memory", dest="fresh_memory", action="store_false",
                    help="skip measuring each pipeline's peak RSS alone in a fresh process (saves one short run each)")
    ap.add_argument("--memory-probe", choices=KINDS, default=None, help=argparse.SUPPRESS)  # peak_rss_alone's child
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to PyTorch (check nvidia-smi and the torch build)")
    args.steps = args.steps or (150 if cuda else 5)
    args.workers = args.workers if args.workers is not None else (8 if cuda else 2)
    args.images = args.images or (60000 if cuda else 10000)
    device = torch.device(args.device)

    load_all()
    torch.manual_seed(0)
    if args.memory_probe:  # a child of peak_rss_alone: one pipeline in this fresh process, JSON on the last line
        # only lightly's loop reads these images; sslkit's engine loads its own data, so they stay out of its figure
        images = reference_images(args.images) if args.memory_probe == "reference" else None
        m = run_pipeline(args.memory_probe, args.objectives[0], images, args.batch, 1, args.workers, device)
        print(json.dumps({"peak_rss_gb": m["peak_rss_gb"]}))
        return 0
    images = reference_images(args.images)
    peaks = matmul_peak_gflops(device)
    machine = {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
               "matmul_peak_gflops": peaks}
    results = {"machine": machine, "settings": vars(args), "objectives": {}}
    for obj in args.objectives:
        flops = train_flops_per_image(obj)
        rounds = []
        kinds = KINDS if args.compile else KINDS[:2]
        for r in range(args.rounds):
            rounds.append({k: run_pipeline(k, obj, images, args.batch, args.steps, args.workers, device)
                           for k in kinds})
            ref, ours = rounds[-1]["reference"], rounds[-1]["sslkit"]
            if args.compile:
                print(f"[{obj} round {r}] sslkit compiled {rounds[-1]['sslkit_compiled']['images_per_s']:.1f} img/s "
                      f"(compile {rounds[-1]['sslkit_compiled']['compile_s']:.0f} s)", flush=True)
            busy = (f"   GPU busy {100 * (ref.get('gpu_busy_share') or 0):.0f}% / "
                    f"{100 * (ours.get('gpu_busy_share') or 0):.0f}%") if cuda else ""
            print(f"[{obj} round {r}] lightly {ref['images_per_s']:.1f} img/s   sslkit {ours['images_per_s']:.1f} img/s"
                  f"{busy}", flush=True)
        best = {k: max((rd[k] for rd in rounds), key=lambda m: m["images_per_s"]) for k in kinds}
        for k, m in best.items():
            if args.fresh_memory:
                m["peak_rss_gb_alone"] = peak_rss_alone(k, obj, args)
            peak = peaks["bfloat16"] if m["precision"].startswith("bf16") else max(peaks.values())
            m["train_gflop_per_image"] = flops / 1e9
            m["mfu_vs_best_matmul"] = flops * m["images_per_s"] / (peak * 1e9)
        results["objectives"][obj] = {"best": best, "rounds": rounds,
                                      "speedup": best["sslkit"]["images_per_s"] / best["reference"]["images_per_s"]}
        if args.compile:
            results["objectives"][obj]["speedup_compiled"] = (best["sslkit_compiled"]["images_per_s"]
                                                              / best["reference"]["images_per_s"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_cuda" if cuda else "throughput"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    gpu_cols = " GPU busy | peak GPU GB |" if cuda else ""
    lines = [f"Device: {machine['device']}, torch {torch.__version__}, batch {args.batch}, {args.steps} timed steps, "
             f"best of {args.rounds} alternations.\n",
             f"| objective | pipeline | images/s | speed-up | data wait | peak RSS GB{' (alone)' * args.fresh_memory} "
             "| GFLOP/img | MFU | precision |"
             + gpu_cols,
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else "")]
    for obj, r in results["objectives"].items():
        for k in r["best"]:
            m = r["best"][k]
            sp = {"reference": "1.00x", "sslkit": f"{r['speedup']:.2f}x",
                  "sslkit_compiled": f"{r.get('speedup_compiled', 0):.2f}x"}[k]
            name = {"reference": "lightly", "sslkit": "sslkit",
                    "sslkit_compiled": f"sslkit + torch.compile ({m.get('compile_s', 0):.0f} s to compile)"}[k]
            alone = m.get("peak_rss_gb_alone")  # None: not measured, or its probe failed
            rss = f"{m['peak_rss_gb']:.2f}" if alone is None else f"{alone:.2f}"
            if alone is None and args.fresh_memory:
                rss += " (shared process)"
            row = (f"| {obj} | {name} | {m['images_per_s']:.1f} | {sp} | "
                   f"{100 * (m['data_wait_share'] or 0):.1f}% | {rss} | "
                   f"{m['train_gflop_per_image']:.2f} | {100 * m['mfu_vs_best_matmul']:.0f}% | {m['precision']} |")
            if cuda:
                b = m.get("gpu_busy_share")
                row += f" {'n/a' if b is None else f'{100 * b:.0f}%'} | {m.get('peak_gpu_gb', 0):.2f} |"
            lines.append(row)
    lines.append(f"\nmatmul peak measured: fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s; "
                 f"sslkit precision {'bf16-mixed' if cuda else resolve_precision(resolve({}))} by default on this "
                 f"{'GPU' if cuda else 'machine'}.")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
