import time

import pytest

from sslkit.config import resolve
from sslkit.engine import train


@pytest.mark.ddp
def test_one_rank_raising_ends_both_processes_in_bounded_time(tiny_recipe, monkeypatch):
    monkeypatch.setenv("SSLKIT_PLUGINS", "tests.faults.conftest")  # registers faulty_simclr in the workers
    cfg = resolve(tiny_recipe(objective={"name": "faulty_simclr", "raise_on_rank": 1, "raise_at_step": 1},
                              trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}))
    t0 = time.time()
    with pytest.raises(Exception, match="injected failure on rank 1 at step 1"):
        train(cfg)
    # Rank 0 was blocked in the gradient all-reduce; it must not wait for the collective's 30-minute timeout.
    assert time.time() - t0 < 120
