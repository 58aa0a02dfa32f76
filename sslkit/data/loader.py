"""Deterministic, resumable loading of augmented views.

Every sample's augmentation is seeded from (seed, epoch, position in the epoch), and the order of an
epoch is a permutation drawn from (seed, epoch). So the views a step sees do not depend on the number
of workers, and a run resumed mid-epoch sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

_SEED_MIX = 1_000_003  # spreads (seed, epoch) pairs apart before seeding a generator


class ViewDataset(Dataset):
    """Wraps an image dataset; item ``(index, sample_seed)`` -> ``(list of views, label)``.

    With ``pipeline=None`` the item is ``(uint8 image, label)``: the views are made later, on the device,
    by the batched backend (:mod:`sslkit.augment.batched`).
    """

    def __init__(self, dataset: Dataset, pipeline: Callable[[torch.Tensor], list[torch.Tensor]] | None) -> None:
        self.dataset = dataset
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> tuple[list[torch.Tensor], int]:
        index, sample_seed = item
        image, label = self.dataset[index]
        if self.pipeline is None:
            return image, label
        # fork_rng keeps the caller's RNG untouched when this runs in the main process (num_workers=0).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            views = self.pipeline(image)
        return views, label


def batch_generator(seed: int, epoch: int, batch_in_epoch: int, rank: int) -> torch.Generator:
    """The generator the batched backend draws one batch's view parameters from: a function of the batch's
    place in training, so a resumed run draws the same views."""
    return torch.Generator().manual_seed(((seed * _SEED_MIX + epoch) * _SEED_MIX + batch_in_epoch) * 4099 + rank)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of ``(index, sample_seed)`` for this rank, starting at ``start_batch``.

    Each epoch is a permutation of the dataset drawn from (seed, epoch), or the dataset's own ``order(generator)``;
    the tail that does not fill a whole global batch is dropped, and rank r takes every world-th batch-sized slice
    of the permutation.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 order: Callable[[torch.Generator], torch.Tensor] | None = None) -> None:
        if batch_size * world_size > num_items:
            raise ValueError(
                f"the global batch ({batch_size} x {world_size} devices) is larger than the dataset ({num_items} "
                "images): lower data.batch_size or use more data."
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.order = order  # a dataset's own epoch order (streaming shards), else a uniform permutation
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.num_items // (self.batch_size * self.world_size) - self.start_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * _SEED_MIX + self.epoch)
        perm = self.order(g) if self.order is not None else torch.randperm(self.num_items, generator=g)
        seeds = torch.randint(0, 2**62, (self.num_items,), generator=g)
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            lo = b * global_batch + self.rank * self.batch_size
            pos = range(lo, lo + self.batch_size)
            yield [(int(perm[p]), int(seeds[p])) for p in pos]
