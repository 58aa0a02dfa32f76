"""sslkit: self-supervised pretraining for computer vision.

SimCLR, DINO and MAE share one engine (:mod:`sslkit.engine`), one augmentation registry
(:mod:`sslkit.augment`) and one encoder registry (:mod:`sslkit.encoders`). Evaluation on frozen
features lives in :mod:`sslkit.eval`.
"""

__version__ = "0.1.0"
