"""Helpers for multi-process gloo tests on CPU."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Success: leave without the interpreter's teardown. With torch 2.14.1, a process that imported
    # torch.distributed.nn and ran gloo collectives sometimes aborts at exit ("terminate called without an
    # active exception") after the test has passed, which mp.spawn would report as a failed rank.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes; raises if any fails."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
