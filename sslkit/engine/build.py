"""What a run is made of, from the recipe: objective (encoder + heads), view pipeline, optimiser, clipping."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from sslkit.config import ConfigError, section_kwargs
from sslkit.plugins import load_all
from sslkit.registry import AUGMENTATIONS, ENCODERS, OBJECTIVES


def build_objective(cfg: DictConfig) -> torch.nn.Module:
    """Encoder + objective from the recipe (no data, no devices)."""
    load_all()
    encoder = ENCODERS.build(cfg.encoder.name, **section_kwargs(cfg.encoder))
    entry = OBJECTIVES.get(cfg.objective.name)
    obj_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(entry.config), cfg.objective))
    objective = entry.factory(encoder=encoder, cfg=obj_cfg)
    objective.seed = int(cfg.seed)  # masks drawn from (seed, step, sample) agree across processes and resumes
    return objective


def build_pipeline(cfg: DictConfig):  # noqa: ANN201 - a ViewPipeline
    load_all()
    return AUGMENTATIONS.build(cfg.augment.name, **section_kwargs(cfg.augment))


def augment_backend(cfg: DictConfig, dataset) -> str:  # noqa: ANN001
    """``data.augment_backend`` resolved: ``auto`` is batched for in-memory (same-size) datasets whose pipeline
    the batched backend can translate, per-image otherwise."""
    choice = cfg.data.augment_backend
    in_memory = hasattr(getattr(dataset, "dataset", dataset), "images")
    if choice == "batched" and not in_memory:
        raise ConfigError("data.augment_backend=batched needs same-size in-memory images (fashion_mnist, cifar, "
                          "synthetic); use per_image for image folders.")
    if choice == "auto":
        return "batched" if in_memory and batched_views(cfg) is not None else "per_image"
    return choice


def batched_views(cfg: DictConfig):  # noqa: ANN201 - a BatchedPipeline or None
    """The batched twin of the recipe's pipeline, or None when its transforms have no batched form."""
    from sslkit.augment.batched import batched_pipeline

    try:
        return batched_pipeline(cfg.augment.name, **section_kwargs(cfg.augment))
    except (ValueError, AssertionError):
        return None


def build_optimizer(cfg: DictConfig, objective: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW / SGD / LARS with no weight decay on biases, 1-d parameters (norms) and the objective's tokens."""
    from timm.optim import Lars, param_groups_weight_decay

    groups = param_groups_weight_decay(objective, cfg.optim.weight_decay,
                                       no_weight_decay_list=objective.no_weight_decay())
    for g in groups:
        g["wd_mult"] = 1.0 if g["weight_decay"] > 0 else 0.0
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), foreach=o.foreach)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, foreach=o.foreach)
    if o.name == "lars":
        return Lars(groups, lr=lr, momentum=o.momentum)
    raise ValueError(f"unknown optimiser {o.name!r}")


def clip_per_param(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Official DINO clipping: scale each parameter's gradient to norm <= ``max_norm`` separately."""
    for p in params:
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def clip_and_norm(fabric, cfg: DictConfig, model, optimizer, params: list[torch.nn.Parameter]) -> torch.Tensor:  # noqa: ANN001
    """Clip as the recipe says and return the total gradient norm (before clipping)."""
    if cfg.optim.clip_grad and cfg.optim.clip_mode == "norm":
        return fabric.clip_gradients(model, optimizer, max_norm=cfg.optim.clip_grad, error_if_nonfinite=False)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
    if cfg.optim.clip_grad:
        clip_per_param(params, cfg.optim.clip_grad)
    return norm
