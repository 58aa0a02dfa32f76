"""View pipelines by name, all in :data:`sslkit.registry.AUGMENTATIONS`.

A pipeline maps one uint8 image ``(3, H, W)`` to a list of float views (normalised). ``view_sizes``
gives each view's side length so objectives can group same-size views into one forward pass.
"""

from sslkit.augment import (
    mae,  # noqa: F401
    multicrop,  # noqa: F401
    simclr,  # noqa: F401  (registration)
)
from sslkit.augment.base import ViewPipeline, eval_transform

__all__ = ["ViewPipeline", "eval_transform"]
