"""Several processes: the process group, FSDP2 sharding, full state dicts.

`crosschip train --nproc N` re-launches the same command under
`python -m torch.distributed.run --nproc-per-node N` (plus any multi-node rendezvous flags;
`launch.py`, which imports no torch). Each worker binds one device of the backend, joins the
process group on the backend's collective library (gloo, nccl, hccl) and shards the model
with FSDP2 `fully_shard`, one unit per block. Checkpoints hold full tensors, gathered here,
so they resume on any number of processes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from crosschip.backends import Backend
from crosschip.errors import CrosschipError
from crosschip.train.launch import in_torchrun


@dataclass
class Dist:
    """This process's place in the job; rank 0 of 1 when not distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    collective_delay_s: float = 0.0
    """Emulated slow interconnect: extra seconds per collective."""
    local_world: int = 1
    """Processes on this host (torchrun's LOCAL_WORLD_SIZE)."""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over processes, in place; on one process only the emulated delay applies."""
        if self.collective_delay_s:
            time.sleep(self.collective_delay_s)
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process (JSON-able scalars only: decisions, paths)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(backend: Backend) -> Dist:
    """Join the process group when launched by torchrun, else a single-process Dist."""
    delay = backend.emulated_collective_delay_s
    if not in_torchrun():
        return Dist(collective_delay_s=delay)
    if backend.dist_backend is None:
        raise CrosschipError(f"{backend.spec} has no collective backend; it cannot train with several processes")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend.set_device(local_rank)
    # torchrun's env:// store outlives a restart of the worker group (--max-restarts), and
    # the process group's keys in it are the same every attempt: a restarted rank could read
    # a dead peer's address and fail to connect ("Gloo connectFullMesh failed ... Connection
    # refused"; 3 of 5 restarts here; pytorch/pytorch#167288). Each attempt gets its own keys.
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"crosschip/attempt_{attempt}", store)
    dist.init_process_group(backend.dist_backend, store=store, rank=rank, world_size=world)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, delay, local_world)


def shutdown(d: Dist) -> None:
    """End the process group. The barrier first: without it gloo workers that finish at
    slightly different times abort at exit ("terminate called without an active exception")."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_model(model: nn.Module, mp_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: one `fully_shard` unit per block (and the MTP block), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    if getattr(model, "mtp", None) is not None:
        fully_shard(model.mtp, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # The trainer calls these instead of forward (it needs the hidden states for MTP); the
    # root's unshard/reshard hooks must run around them too.
    from torch.distributed.fsdp import register_fsdp_forward_method

    for method in ("hidden", "logits", "mtp_logits"):
        register_fsdp_forward_method(model, method)
    return model


# Optimizer group options that describe the implementation, not the state: a checkpoint from
# a fused single-process run must load into a foreach sharded one.
_IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")


def full_model_state(model: nn.Module, distributed: bool) -> dict[str, Tensor]:
    """The full (unsharded) model state dict on the CPU; a collective when distributed."""
    if not distributed:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in msd.items()}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """FQN of each optimizer parameter, in the optimizer's own index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full model state and FQN-keyed optimizer state {"state": {fqn: {...}}, "param_groups": [...]}.

    An optimizer that has not stepped yet has empty state; it is saved empty (asking the
    distributed API for it would run a zero step that changes AdamW's step count).
    """
    msd = full_model_state(model, distributed)
    names = _param_names(model, optimizer)
    if distributed and optimizer.state:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        state = {
            fqn: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in s.items()}
            for fqn, s in osd["state"].items()
        }
    else:
        sd = optimizer.state_dict()
        state = {names[i]: {k: v.detach().cpu().clone() for k, v in s.items()} for i, s in sd["state"].items()}
    groups, i = [], 0
    for group in optimizer.param_groups:
        opts = {k: v for k, v in group.items() if k != "params" and k not in _IMPL_KEYS}
        groups.append({**opts, "params": names[i : i + len(group["params"])]})
        i += len(group["params"])
    return msd, {"state": state, "param_groups": groups}


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict[str, Tensor], osd: dict[str, Any], distributed: bool
) -> None:
    """Load full state dicts (held by every process) into a plain or FSDP2-sharded model."""
    names = _param_names(model, optimizer)
    for group, saved in zip(optimizer.param_groups, osd["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params" and k not in _IMPL_KEYS})
    if not distributed:
        model.load_state_dict(msd, strict=True)
        index = {n: i for i, n in enumerate(names)}
        sd = optimizer.state_dict()
        sd["state"] = {index[fqn]: dict(s) for fqn, s in osd["state"].items()}
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=opts)
    optimizer.state.clear()
    if osd["state"]:
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
