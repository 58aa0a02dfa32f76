"""DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers", arXiv:2104.14294).

Self-distillation with no labels. A student (encoder + DINO head) is trained to match the output
distribution of a teacher on different crops of the same image. The teacher is an exponential moving
average (EMA) of the student and gets no gradients. Collapse is avoided by *centering* (subtract a running
mean of the teacher's outputs) and *sharpening* (a low teacher temperature).

Per step, following the paper's Algorithm 1 and the official code (facebookresearch/dino, main_dino.py)::

    t = teacher(global crops)                      # (2, B, K), no gradients
    s = student(all crops)                         # (V, B, K), one forward per resolution
    loss = mean over pairs (i, j), i != j, of  H(softmax((t_i - C) / tau_t), softmax(s_j / tau_s))
    C <- m_c C + (1 - m_c) mean(t)                 # averaged over all ranks
    ... backward, drop the last layer's gradients while it is frozen, optimiser step ...
    teacher <- m teacher + (1 - m) student         # m: cosine from 0.996 to 1 over training

Schedules are functions of the global step, so a run resumed from ``state_dict()`` (which holds the
teacher and the center) continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sslkit.encoders import Encoder
from sslkit.heads import DINOHead, MomentumTeacher
from sslkit.heads.momentum import cosine_momentum
from sslkit.losses.dino import batch_center, dino_loss, dino_loss_from_probs, teacher_entropy, update_center
from sslkit.losses.ibot import ibot_patch_loss_masked, ibot_teacher_probs
from sslkit.losses.sinkhorn import sinkhorn_knopp
from sslkit.objectives.base import Objective, Views, global_rows, sample_seed
from sslkit.registry import OBJECTIVES

__all__ = ["DINO", "DINOConfig", "DINOHead", "batch_center", "dino_loss", "ema_momentum_at", "multicrop_forward",
           "size_groups", "teacher_entropy", "teacher_temp_at", "update_center"]

FREEZE_UNITS = ("epochs", "steps")


# --------------------------------------------------------------------------------------------- schedules


def teacher_temp_at(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Teacher temperature at ``step``: linear from ``start`` to ``end`` over ``warmup_steps``, then ``end``.

    Per step rather than per epoch (the official code steps once per epoch), so short runs warm up smoothly.
    """
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


ema_momentum_at = cosine_momentum  # the teacher's EMA momentum at a step (sslkit.heads.momentum)


def size_groups(views: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` runs of consecutive views with the same (h, w), e.g. 2x224 + 10x96 -> [(0,2),(2,12)]."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


def multicrop_forward(encoder: nn.Module, head: nn.Module, views: Sequence[torch.Tensor],
                      return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Encode crops with one encoder pass per resolution, then one head pass over all crops.

    Args:
        views: V tensors (B, 3, h_v, w_v); consecutive views of equal size are batched together.
        return_features: also return the encoder features of the first size group (the global crops).

    Returns:
        (V, B, K) head outputs, in the order of ``views``; with ``return_features`` also the (G, B, D)
        encoder features of the first G views (those of the first crop size).
    """
    feats = [encoder(torch.cat(list(views[a:b]), dim=0)) for a, b in size_groups(views)]  # each (n_g * B, D)
    out = head(torch.cat(feats, dim=0))  # (V * B, K)
    out = out.reshape(len(views), views[0].shape[0], -1)
    if return_features:
        return out, feats[0].reshape(-1, views[0].shape[0], feats[0].shape[-1])
    return out


# --------------------------------------------------------------------------------------------- objective


@dataclass
class DINOConfig:
    name: str = "dino"
    # Head. K=65536 is the paper's ViT-S/ImageNet value; small data and models train faster and just as
    # well with 4096-16384 (the head is then a small part of the cost). Larger K helps a little at scale.
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3  # linear layers before the weight-normalised last layer
    head_use_bn: bool = False  # BatchNorm in the head MLP; official: off for ViTs (and it slows them)
    # True fixes the last layer's norm to 1: more stable. False improves ViT-S slightly but can be unstable,
    # especially with large models (official advice).
    norm_last_layer: bool = True
    # The last layer gets no updates for this long at the start: it stabilises early training. Official: 1
    # epoch; raise it if the loss diverges early, 0 to disable.
    freeze_last_layer: float = 1.0
    freeze_last_layer_unit: str = "epochs"  # epochs | steps
    # Temperatures. The student's 0.1 is rarely changed. The teacher's final temperature above 0.07 is
    # unstable (official advice); 0.04 throughout is the safe default if 0.07 collapses.
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0
    teacher_temp: float = 0.07  # teacher temperature after the warmup
    warmup_teacher_temp_epochs: float = 30.0  # linear warmup per step over this many epochs (paper: 30 of 300)
    # Teacher EMA momentum, cosine from `momentum_teacher` to `momentum_teacher_end` over all steps. 0.996
    # suits batch 1024; with small batches (256) use a higher start such as 0.9995 (official advice); short
    # runs on small data often need a *lower* start (e.g. 0.99) for the teacher to move at all.
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    center_momentum: float = 0.9  # EMA of the teacher's batch mean used for centering
    num_global_views: int = 2  # leading views that are global crops (teacher input); multicrop makes 2
    # The official teacher is built without stochastic depth (drop_path) even when the student has it.
    teacher_stochastic_depth: bool = False
    # KoLeo regulariser (DINOv2, Oquab et al. 2023; Sablayrolles et al. 2019) on the student's encoder features
    # of each global crop: -mean log(distance to the nearest other image in the batch) of the L2-normalised
    # features, which spreads them evenly and helps nearest-neighbour retrieval. DINOv2 uses 0.1; 0 = off.
    koleo_weight: float = 0.0
    # Teacher targets: "center" (DINO: subtract a running mean, then sharpen) or "sinkhorn_knopp" (DINOv2:
    # balanced assignments over the global batch, `sinkhorn_iterations` normalisations).
    centering: str = "center"
    sinkhorn_iterations: int = 3
    # iBOT's masked-patch loss (Zhou et al. 2022; DINOv2): a share `ibot_mask_probability` of the student's global
    # crops has blocks of patches (a share drawn from `ibot_mask_ratio`) replaced by the mask token, and the
    # student's patch outputs there match the teacher's on the unmasked crop. Weight 0 = off (DINOv2: 1.0).
    # Needs a ViT encoder.
    ibot_weight: float = 0.0
    ibot_mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])
    ibot_mask_probability: float = 0.5
    ibot_separate_head: bool = False  # a head of its own for the patch tokens (DINOv2 ViT-g) or DINO's head


@OBJECTIVES.register("dino", config=DINOConfig,
                     help="DINO: self-distillation with an EMA teacher, centering and multi-crop (Caron et al. 2021)")
class DINO(Objective):
    """DINO objective: student encoder + head, EMA teacher, center buffer.

    ``views`` are the multi-crop pipeline's output: ``num_global_views`` global crops (B, 3, H, H), then the
    local crops (B, 3, h, h). ``forward(views, step)`` returns ``{"loss", "teacher_temp", "teacher_momentum",
    "teacher_entropy"}``.

    Example:
        >>> obj = DINO(ENCODERS.build("vit_tiny_patch4_32", depth=2), DINOConfig(out_dim=1024))
        >>> obj.setup_schedule(steps_per_epoch=100, total_steps=1000)
        >>> out = obj([torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 4, step=0)
    """

    Config = DINOConfig
    views = Views(num_global=2, locals=True)

    @classmethod
    def required_views(cls, cfg: DINOConfig) -> Views:
        return Views(num_global=cfg.num_global_views, locals=True)

    def __init__(self, encoder: Encoder, cfg: DINOConfig) -> None:
        super().__init__(encoder, cfg)
        _validate(cfg)
        self.head = DINOHead(encoder.dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                             cfg.head_layers, cfg.head_use_bn, cfg.norm_last_layer)
        # Teacher: same architecture and initial weights; updated only by EMA, never by gradients.
        if cfg.ibot_weight > 0:
            if not getattr(encoder, "is_vit", False):
                raise ValueError("objective.ibot_weight > 0 masks patch tokens and needs a ViT encoder")
            encoder.enable_mask_token()
            if cfg.ibot_separate_head:
                self.ibot_head = DINOHead(encoder.dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                                          cfg.head_layers, cfg.head_use_bn, cfg.norm_last_layer)
            self.register_buffer("patch_center", torch.zeros(1, cfg.out_dim))  # iBOT's own center
        # Teacher: same architecture and initial weights; updated only by EMA, never by gradients.
        self.teacher = MomentumTeacher(self.students(), cfg.momentum_teacher, cfg.momentum_teacher_end,
                                       stochastic_depth=cfg.teacher_stochastic_depth)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # (1, K), in state_dict for exact resume
        if cfg.koleo_weight > 0:
            from lightly.loss import KoLeoLoss

            self.koleo = KoLeoLoss()

    # ----- schedules (pure functions of the global step)

    @property
    def freeze_last_layer_steps(self) -> int:
        c = self.cfg
        per = self.steps_per_epoch if c.freeze_last_layer_unit == "epochs" else 1
        return int(round(c.freeze_last_layer * per))

    def teacher_temp(self, step: int) -> float:
        warmup = int(round(self.cfg.warmup_teacher_temp_epochs * self.steps_per_epoch))
        return teacher_temp_at(step, warmup, self.cfg.warmup_teacher_temp, self.cfg.teacher_temp)

    def momentum(self, step: int) -> float:
        return self.teacher.momentum(step, self.total_steps)

    def students(self) -> dict[str, nn.Module]:
        """The modules the teacher averages, by the teacher's names for them."""
        extra = {"ibot_head": self.ibot_head} if hasattr(self, "ibot_head") else {}
        return {"encoder": self.encoder, "head": self.head, **extra}

    def teacher_probs(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        """Teacher targets (..., K) -> distributions: centred and sharpened, or Sinkhorn-Knopp balanced."""
        if self.cfg.centering == "sinkhorn_knopp":
            flat = logits.reshape(-1, logits.shape[-1])
            return sinkhorn_knopp(flat, temp, self.cfg.sinkhorn_iterations).reshape(logits.shape)
        return ibot_teacher_probs(logits, center, temp)

    # ----- training step

    def forward(self, views: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        n_global = self.cfg.num_global_views
        if len(views) < n_global or len(size_groups(views[:n_global])) != 1:
            raise ValueError(f"DINO expects {n_global} same-size global views first, got sizes "
                             f"{[tuple(v.shape[-2:]) for v in views]}. Use augment.name=multicrop.")
        if self.cfg.ibot_weight > 0:
            return self.forward_ibot(views, step)
        with torch.no_grad():
            t_out = multicrop_forward(self.teacher["encoder"], self.teacher["head"], views[:n_global])  # (2, B, K)
        s_out, s_feats = multicrop_forward(self.encoder, self.head, views, return_features=True)  # (V, B, K)
        temp = self.teacher_temp(step)
        if self.cfg.centering == "sinkhorn_knopp":
            loss = dino_loss_from_probs(self.teacher_probs(t_out, self.center, temp), s_out, self.cfg.student_temp)
        else:
            loss = dino_loss(t_out, s_out, self.center, temp, self.cfg.student_temp)
        return self._finish(loss, t_out, s_feats[:n_global], step, temp)

    def forward_ibot(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """DINO on the class tokens plus iBOT on masked patch tokens of the global crops (DINOv2's recipe)."""
        n, c = self.cfg.num_global_views, self.cfg
        B = views[0].shape[0]
        xg = torch.cat(views[:n], dim=0)  # (n B, 3, H, W)
        grid = self.encoder.patch_grid(*xg.shape[-2:])
        masks = self.ibot_masks(n, B, grid, step).to(xg.device)  # (n B, L)
        t_enc = self.teacher["encoder"]
        s_ibot = getattr(self, "ibot_head", self.head)
        t_ibot = self.teacher["ibot_head"] if "ibot_head" in self.teacher else self.teacher["head"]
        with torch.no_grad():
            t_tok = t_enc.forward_tokens(xg)  # the teacher sees the crops unmasked
            t_out = self.teacher["head"](t_enc.pool_tokens(t_tok, grid)).reshape(n, B, -1)  # (n, B, K)
            t_patch = t_ibot(t_tok.patches[masks])  # (M, K): the teacher's view of the masked patches
        s_tok = self.encoder.forward_tokens(xg, mask=masks)
        s_feats = self.encoder.pool_tokens(s_tok, grid)  # (n B, D)
        s_out = [self.head(s_feats).reshape(n, B, -1)]
        if len(views) > n:
            s_out.append(multicrop_forward(self.encoder, self.head, views[n:]))  # (V - n, B, K)
        s_patch = s_ibot(s_tok.patches[masks])  # (M, K)
        temp = self.teacher_temp(step)
        loss = dino_loss_from_probs(self.teacher_probs(t_out, self.center, temp), torch.cat(s_out), c.student_temp)
        ibot = ibot_patch_loss_masked(self.teacher_probs(t_patch, self.patch_center, temp), s_patch, masks,
                                      c.student_temp)
        if self.training and c.centering == "center":  # mean over the global batch's masked patches (any count per rank)
            self.patch_center.copy_(update_center(self.patch_center, t_patch.unsqueeze(0), c.center_momentum))
        out = self._finish(loss + c.ibot_weight * ibot, t_out, s_feats.reshape(n, B, -1), step, temp)
        return {**out, "ibot": ibot.detach(), "masked_share": masks.float().mean()}

    def ibot_masks(self, num_views: int, batch_size: int, grid: tuple[int, int], step: int) -> torch.Tensor:
        """(num_views B, L) bool block masks for this rank's global crops, view-major like the crops.

        Each crop's mask comes from its own seed (:func:`~sslkit.objectives.base.sample_seed` of the run's seed,
        the step and the crop's index in the global batch), so a crop is masked alike however the batch is split
        over processes, and a resumed run masks as the original did. The global RNG is left as it was.
        """
        from sslkit.augment.masking import block_masks

        c = self.cfg
        offset, total = global_rows(batch_size)
        rows = []
        with torch.random.fork_rng(devices=[]):  # block_masks draws from the global CPU RNG
            for v in range(num_views):
                for j in range(batch_size):
                    torch.default_generator.manual_seed(sample_seed(self.seed, step, v * total + offset + j))
                    rows.append(block_masks(1, grid, tuple(c.ibot_mask_ratio), c.ibot_mask_probability))
        return torch.cat(rows)  # (num_views B, L)

    def _finish(self, loss: torch.Tensor, t_out: torch.Tensor, global_feats: torch.Tensor, step: int,
                temp: float) -> dict[str, torch.Tensor]:
        """Center update, KoLeo and the scalars to log, shared by both forward paths."""
        entropy = teacher_entropy(t_out, self.center, temp)
        if self.training and self.cfg.centering == "center":  # after the loss: this step used the previous center
            self.center.copy_(update_center(self.center, t_out, self.cfg.center_momentum))
        scalar = lambda x: torch.tensor(x, device=loss.device)  # noqa: E731
        out = {"teacher_temp": scalar(temp), "teacher_momentum": scalar(self.momentum(step)),
               "teacher_entropy": entropy}
        if self.cfg.koleo_weight > 0:
            koleo = sum(self.koleo(f.float()) for f in global_feats)  # per global crop, as in DINOv2
            out["koleo"] = koleo.detach()
            loss = loss + self.cfg.koleo_weight * koleo
        return {"loss": loss, **out}

    def on_after_backward(self, step: int) -> None:
        """While frozen, drop the last layer's gradients (None, so AdamW's weight decay skips it too)."""
        if step < self.freeze_last_layer_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def eval_encoder(self) -> Encoder:
        return self.teacher["encoder"]


def _validate(cfg: DINOConfig) -> None:
    positive = {"out_dim": cfg.out_dim, "head_hidden_dim": cfg.head_hidden_dim,
                "head_bottleneck_dim": cfg.head_bottleneck_dim, "student_temp": cfg.student_temp,
                "teacher_temp": cfg.teacher_temp, "warmup_teacher_temp": cfg.warmup_teacher_temp,
                "num_global_views": cfg.num_global_views}
    if cfg.koleo_weight < 0:
        raise ValueError(f"objective.koleo_weight must be >= 0 (0 = off, DINOv2 uses 0.1), got {cfg.koleo_weight}")
    for k, v in positive.items():
        if v <= 0:
            raise ValueError(f"objective.{k} must be > 0, got {v}")
    if cfg.centering not in ("center", "sinkhorn_knopp"):
        raise ValueError(f"objective.centering must be 'center' or 'sinkhorn_knopp', got {cfg.centering!r}")
    if cfg.sinkhorn_iterations < 1 or cfg.ibot_weight < 0 or not 0 <= cfg.ibot_mask_probability <= 1:
        raise ValueError("objective.sinkhorn_iterations must be >= 1, ibot_weight >= 0 and ibot_mask_probability "
                         "in [0, 1]")
    lo, hi = (list(cfg.ibot_mask_ratio) + [None, None])[:2]
    if len(cfg.ibot_mask_ratio) != 2 or not 0 <= lo <= hi < 1:
        raise ValueError(f"objective.ibot_mask_ratio must be [lo, hi] with 0 <= lo <= hi < 1, got {cfg.ibot_mask_ratio}")
    if cfg.freeze_last_layer_unit not in FREEZE_UNITS:
        raise ValueError(f"objective.freeze_last_layer_unit must be one of {FREEZE_UNITS}, "
                         f"got {cfg.freeze_last_layer_unit!r}")
    for k in ("momentum_teacher", "momentum_teacher_end", "center_momentum"):
        if not 0.0 <= getattr(cfg, k) <= 1.0:
            raise ValueError(f"objective.{k} must be in [0, 1], got {getattr(cfg, k)}")
    if cfg.freeze_last_layer < 0 or cfg.warmup_teacher_temp_epochs < 0:
        raise ValueError("objective.freeze_last_layer and objective.warmup_teacher_temp_epochs must be >= 0")
