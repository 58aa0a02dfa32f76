"""sslkit: self-supervised pretraining for computer vision.

SimCLR, DINO, MAE, BYOL, VICReg, Barlow Twins and MoCo v3 (and objectives from plug-in modules) share one engine
(:mod:`sslkit.engine`), one augmentation registry (:mod:`sslkit.augment`) and one encoder registry
(:mod:`sslkit.encoders`), built from losses (:mod:`sslkit.losses`) and heads (:mod:`sslkit.heads`). Evaluation on
frozen features lives in :mod:`sslkit.eval`.
"""

__version__ = "0.1.0"
