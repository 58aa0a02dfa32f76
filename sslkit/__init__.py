"""sslkit: self-supervised pretraining for computer vision.

SimCLR, DINO, MAE, BYOL, VICReg, Barlow Twins and MoCo v3 (and objectives from plug-in modules) share one engine
(:mod:`sslkit.engine`), one augmentation registry (:mod:`sslkit.augment`) and one encoder registry
(:mod:`sslkit.encoders`), built from losses (:mod:`sslkit.losses`) and heads (:mod:`sslkit.heads`). Evaluation on
frozen features lives in :mod:`sslkit.eval`.
"""

__version__ = "0.1.0"

# sslkit's own architectures (sslkit_resnet_cifar, ...) are registered with timm on import, so weights written by
# `sslkit export --format timm` load with the one-line timm.create_model(..., pretrained=True, ...) call.
from sslkit.encoders import timm_models as _timm_models  # noqa: E402, F401
