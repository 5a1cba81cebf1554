"""Run a function on 2+ real gloo ranks (torch.multiprocessing) and collect what each returns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init: str, fn: Callable, args: tuple, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out[rank] = fn(rank, world, *args)
    finally:
        torch.distributed.destroy_process_group()


def on_ranks(fn: Callable, world: int, tmp: Path, *args) -> list:
    """`fn(rank, world, *args)` on `world` processes of one gloo group; must be a module-level function."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_entry, args=(world, f"file://{tmp / 'pg'}", fn, args, out), nprocs=world, join=True)
        return [out[r] for r in range(world)]
