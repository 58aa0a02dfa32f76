"""FSDP2 (``fully_shard``) for the ViT objectives, and distributed checkpoints that reshard.

What ``trainer.strategy: fsdp`` runs on (:func:`fsdp_strategy` gives Lightning Fabric the strategy; the engine's
checkpoints go through :func:`save_sharded` and :func:`load_sharded`):

- :func:`shard_objective` shards every transformer block of every ViT inside an objective (the student and a
  DINO teacher alike), then each ViT encoder (its patch embedding, tokens and norm), then the objective itself.
  An encoder is its own unit, with ``forward_tokens`` registered as a forward method, so that objectives may call
  either, and the engine's health checks can run it outside the objective's forward (every rank together). It works on CPU with gloo, and a step is a data-parallel step:
  each rank's gradients are averaged, and the DINO center is all-reduced by the objective as under DDP. The
  teacher's EMA runs on the local shards (teacher and student shards have the same layout). Create the optimiser
  after sharding: the parameters become DTensors.
- :func:`save_sharded` writes ``torch.distributed.checkpoint`` (DCP) files into a temporary folder, renames it to
  ``dcp-step<N>`` and then atomically replaces the pointer file ``last_dcp.json``: a reader, or a run killed while
  writing, sees the previous checkpoint or the new one.
- :func:`load_sharded` restores a checkpoint on any world size (DCP reshards on load: 2 processes to 1, 1 to 2).
- :func:`read_full_state` reads one into plain tensors in a single process, with no process group, for export
  and evaluation.

DCP's ``.metadata`` file is a pickle; it is read with an unpickler that only builds DCP's own metadata classes, so a
tampered checkpoint cannot run code (the tensor files are read by torch with ``weights_only=True``).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from sslkit.run import RunError, atomic_write_bytes

POINTER = "last_dcp.json"
_DIR = re.compile(r"^dcp-step\d{9}$")
_SAFE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.", "torch.distributed.tensor.")
_SAFE_GLOBALS = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str",
                                            "bytes", "bool", "slice", "getattr")} | {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch", "memory_format"), ("torch", "layout"), ("torch", "dtype"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


def vit_blocks(objective: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every ViT inside ``objective`` (anything with a ``blocks`` list of modules)."""
    found: list[nn.Module] = []
    for m in objective.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList):
            found += list(blocks)
    return found


def shard_objective(objective: nn.Module, mesh=None) -> nn.Module:  # noqa: ANN001 - a DeviceMesh or None
    """Shard ``objective`` in place with FSDP2, one unit per transformer block plus the rest; returns it.

    Raises ``ValueError`` when the objective holds no ViT: FSDP is for the ViT objectives, and a CNN's
    BatchNorm statistics would need their own handling.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = vit_blocks(objective)
    if not blocks:
        raise ValueError(f"{type(objective).__name__} holds no ViT blocks to shard; trainer.strategy=fsdp is for "
                         "the ViT objectives. Use ddp for CNN encoders.")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    from torch.distributed.fsdp import register_fsdp_forward_method

    for encoder in [m for m in objective.modules() if m is not objective and getattr(m, "is_vit", False)]:
        fully_shard(encoder, mesh=mesh)  # an sslkit Encoder: objectives call its forward and forward_tokens
        register_fsdp_forward_method(encoder, "forward_tokens")
    fully_shard(objective, mesh=mesh)
    return objective


def _parallelize(objective: nn.Module, mesh) -> nn.Module:  # noqa: ANN001 - a 2-d DeviceMesh
    return shard_objective(objective, mesh["data_parallel"])


def fsdp_strategy():  # noqa: ANN201 - a lightning_fabric ModelParallelStrategy
    """Fabric's FSDP2 strategy for sslkit: every process is a data-parallel replica (no tensor parallelism), and
    ``fabric.setup_module`` shards the objective with :func:`shard_objective`."""
    from lightning_fabric.strategies import ModelParallelStrategy

    class DataParallelFSDP(ModelParallelStrategy):
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes  # every process: one data shard
            self._tensor_parallel_size = 1
            super().setup_environment()

    return DataParallelFSDP(parallelize_fn=_parallelize)


def full_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded objective's whole state (parameters and buffers) as plain CPU tensors on rank 0, ``{}`` on the
    other ranks. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        plain_torch = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout
                                                        | torch.memory_format)
        if module.startswith(_SAFE_MODULES) or (module, name) in _SAFE_GLOBALS or plain_torch:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, with its metadata pickle restricted to DCP's own classes."""

    def read_metadata(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - a DCP Metadata
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise RunError(f"refusing to read checkpoint metadata {path}: {e}. Use the run's previous "
                           "checkpoint.") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save_sharded(ckpt_dir: Path, step: int, objective: nn.Module, optimizer: torch.optim.Optimizer,
                 meta: dict[str, Any], prune: bool = True) -> Path:
    """Write the sharded objective and optimiser (every rank calls this) and ``meta`` (rank 0's plain values:
    step, epoch, recipe, ...) as ``ckpt_dir/dcp-step<step>``; returns that folder. ``prune``: delete the folder the
    pointer named before; the engine passes False and calls :func:`prune_sharded` once its own ``last.ckpt``
    names the new folder, so a run killed in between still resumes from a complete checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"dcp-step{step:09d}"
    tmp = ckpt_dir / f".{final.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a run killed while writing left it
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(objective, optimizer)
    dcp.save({"objective": model_state, "optimizer": optim_state}, checkpoint_id=tmp, no_dist=not _distributed())
    if _rank() == 0:
        atomic_write_bytes(tmp / "meta.json", json.dumps({"step": step, **meta}).encode())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        previous = latest_sharded(ckpt_dir) if (ckpt_dir / POINTER).exists() else None
        atomic_write_bytes(ckpt_dir / POINTER, json.dumps({"last": final.name}).encode())
        if prune and previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
    _barrier()
    return final


def prune_sharded(ckpt_dir: Path, keep: str) -> None:
    """Delete every ``dcp-step<N>`` folder (and left-over temporary one) in ``ckpt_dir`` but ``keep`` (rank 0); with
    no folder to keep (an unsharded checkpoint replaced them), the pointer file too."""
    if not keep:
        (Path(ckpt_dir) / POINTER).unlink(missing_ok=True)
    for p in Path(ckpt_dir).iterdir():
        name = p.name.removeprefix(".").removesuffix(".tmp")
        if p.name != keep and _DIR.match(name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def sharded_dir(ckpt_dir: Path, name: Any) -> Path:
    """``ckpt_dir/name`` for a checkpoint's (untrusted) ``sharded`` entry: only a ``dcp-step<N>`` folder there."""
    if not isinstance(name, str) or not _DIR.match(name) or not (Path(ckpt_dir) / name).is_dir():
        raise RunError(f"the checkpoint in {ckpt_dir} names {name!r} as its sharded state, not a dcp-step<N> folder "
                       "there. Use the run's previous checkpoint.")
    return Path(ckpt_dir) / name


def latest_sharded(ckpt_dir: Path) -> Path:
    """The folder ``last_dcp.json`` names; the pointer is untrusted, so only a ``dcp-step<N>`` name inside
    ``ckpt_dir`` is accepted."""
    pointer = Path(ckpt_dir) / POINTER
    try:
        name = json.loads(pointer.read_text())["last"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"cannot read {pointer}: {e}. It names the last sharded checkpoint; the run has none.") from None
    if not isinstance(name, str) or not _DIR.match(name) or not (Path(ckpt_dir) / name).is_dir():
        raise RunError(f"{pointer} names {name!r}, not a dcp-step<N> folder in {ckpt_dir}.")
    return Path(ckpt_dir) / name


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {Path(path) / 'meta.json'}: {e}.") from None
    if not isinstance(meta, dict):
        raise RunError(f"{Path(path) / 'meta.json'} is not a JSON object.")
    return meta


def load_sharded(path: Path, objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore a sharded (or unsharded) objective and optimiser from ``path`` on this world size; returns the meta."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    reader = SafeReader(path)
    reader.read_metadata()  # refuse a tampered checkpoint with a clear error, before DCP wraps it in its own
    model_state, optim_state = get_state_dict(objective, optimizer)
    state = {"objective": model_state, "optimizer": optim_state}
    dcp.load(state, storage_reader=reader, no_dist=not _distributed())
    set_state_dict(objective, optimizer, model_state_dict=state["objective"], optim_state_dict=state["optimizer"])
    return read_meta(path)


def read_full_state(path: Path) -> dict[str, Any]:
    """A checkpoint as plain tensors, read in this process alone (no process group): ``{"objective": state dict,
    "optimizer": DCP's optimiser state (keyed by parameter name), "meta": ...}``. For export and evaluation."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = SafeReader(path)
    reader.read_metadata()  # refuse a tampered checkpoint with a clear error, before DCP wraps it in its own
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return {"objective": state.get("objective", {}), "optimizer": state.get("optimizer", {}), "meta": read_meta(path)}
