import os

import pytest
import torch

# Two cores on CI: keep each test process at the machine's size and make runs reproducible.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_recipe(tmp_path):
    """A recipe that trains in seconds: synthetic 32-px shapes, 2-block ViT, SimCLR."""

    def make(**sections):
        raw = {
            "name": "tiny",
            "output_dir": str(tmp_path / "runs"),
            "data": {"name": "synthetic", "args": {"num_samples": 64, "image_size": 32}, "batch_size": 16,
                     "num_workers": 0},
            "augment": {"name": "simclr", "image_size": 32},
            "encoder": {"name": "vit_tiny_patch4_32", "depth": 2, "embed_dim": 64, "num_heads": 2},
            "objective": {"name": "simclr", "proj_hidden_dim": 64, "proj_out_dim": 32},
            "optim": {"name": "adamw", "lr": 1e-3, "warmup_epochs": 1},
            "trainer": {"epochs": 2, "progress": False, "log_every_steps": 1, "checkpoint_every_steps": 3},
            "eval": {"final_knn": False},
        }
        for k, v in sections.items():
            raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
        return raw

    return make
