"""Block-wise patch masks for masked image modelling (BEiT, Bao et al. 2022, arXiv:2106.08254, Algorithm 1; the
``MaskingGenerator`` of iBOT and DINOv2).

Rectangles of patches with a random area and aspect ratio are masked until the target count is reached, so the
masked regions are contiguous blocks rather than scattered patches. Randomness comes from torch's global RNG,
which the engine checkpoints, so a resumed run draws the same masks.
"""

from __future__ import annotations

import math

import torch

MIN_BLOCK_PATCHES = 4  # the smallest block (BEiT: 16 at 14x14; 4 suits small grids)
ASPECT_RATIO = (0.3, 1 / 0.3)
MAX_TRIES = 10  # attempts per block before the image keeps what it has


def block_mask(grid: tuple[int, int], num_masked: int) -> torch.Tensor:
    """One (h, w) bool mask with about ``num_masked`` patches in rectangular blocks (never more)."""
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    log_lo, log_hi = math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1])
    count = 0
    while count < num_masked:
        added = 0
        for _ in range(MAX_TRIES):
            room = num_masked - count
            if room < 1:
                break
            area = float(torch.empty(1).uniform_(min(MIN_BLOCK_PATCHES, room), max(MIN_BLOCK_PATCHES, room)))
            aspect = math.exp(float(torch.empty(1).uniform_(log_lo, log_hi)))
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (1 <= bh <= h and 1 <= bw <= w):
                continue
            top = int(torch.randint(0, h - bh + 1, (1,)))
            left = int(torch.randint(0, w - bw + 1, (1,)))
            block = mask[top:top + bh, left:left + bw]
            new = int((~block).sum())
            if 0 < new <= room:
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def block_masks(batch_size: int, grid: tuple[int, int], ratio: tuple[float, float], probability: float) -> torch.Tensor:
    """(batch_size, h*w) bool: each image is masked with ``probability``, its masked share drawn uniformly from
    ``ratio`` (DINOv2: probability 0.5, ratio 0.1-0.5); the others get no masked patch."""
    h, w = grid
    out = torch.zeros(batch_size, h * w, dtype=torch.bool)
    chosen = torch.rand(batch_size) < probability
    shares = torch.empty(batch_size).uniform_(ratio[0], ratio[1])
    for i in torch.nonzero(chosen).flatten().tolist():
        out[i] = block_mask(grid, int(round(float(shares[i]) * h * w))).flatten()
    return out
