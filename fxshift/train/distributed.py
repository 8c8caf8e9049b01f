"""Switching a model's structure in the middle of DistributedDataParallel training.

How ranks agree (`apply_synced`): every rank runs the pipeline on its own replica (the replicas
hold the same weights, as DDP keeps them), the ranks compare a fingerprint of the resulting
structure (module types, state names, shapes, dtypes and the generated forward code) and fail
with an FxshiftError naming the first difference, and then every parameter and buffer is
broadcast from one source rank. So the ranks end with bitwise-identical weights whatever the
numerics of the decomposition on each rank (thread counts, BLAS, GPU models), and the structure
check proves, at run time and every time, that the pipeline chose the same structure everywhere.
Rank choices that depend on weight values ("vbmf", "energy:τ") agree as long as the weights do;
the check catches it if they do not. Running the pipeline on every rank costs no extra wall time
(the ranks work in parallel) and needs no pickled modules.

`rewrap` puts the new module into DistributedDataParallel with the options of the old wrapper.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..context import synced_planning
from ..errors import FxshiftError
from ..pipeline import Pass, apply
from .optim import unwrap_model

__all__ = ["apply_synced", "broadcast_state", "structure_fingerprint", "rewrap", "ddp_options", "is_distributed",
           "max_state_difference", "unwrap_model"]

_MIB = 1024 * 1024
_DDP_DEFAULT_BUCKET_MB = 25


def is_distributed(process_group: Any = None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _source_rank(src: Optional[int], process_group: Any) -> int:
    """The global rank to broadcast from: `src`, or the group's first rank."""
    if src is not None:
        return src
    return dist.get_global_rank(process_group, 0) if process_group is not None else 0


def structure_fingerprint(module: nn.Module) -> list[tuple]:
    """What must be equal on every rank: module types, state names/shapes/dtypes, forward code."""
    entries: list[tuple] = [("module", name, f"{type(m).__module__}.{type(m).__qualname__}")
                            for name, m in module.named_modules()]
    entries += [("state", name, tuple(t.shape), str(t.dtype)) for name, t in module.state_dict().items()]
    entries += [("param", name, bool(p.requires_grad)) for name, p in module.named_parameters()]
    if isinstance(module, fx.GraphModule):
        entries.append(("code", module.code))
    return entries


def _first_difference(a: list[tuple], b: list[tuple]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x[:3]!r} vs {y[:3]!r}"
    return f"{len(a)} vs {len(b)} entries"


@torch.no_grad()
def broadcast_state(module: nn.Module, src: Optional[int] = None, process_group: Any = None) -> None:
    """Overwrite every parameter and buffer of `module` with rank `src`'s (in place)."""
    source = _source_rank(src, process_group)
    for tensor in module.state_dict(keep_vars=True).values():
        if isinstance(tensor, torch.Tensor):
            dist.broadcast(tensor.data, source, group=process_group)


@torch.no_grad()
def max_state_difference(module: nn.Module, src: Optional[int] = None, process_group: Any = None, *,
                         buffers: bool = True) -> float:
    """The largest |x − x_src| over every parameter (and buffer, unless buffers=False) and every
    rank: 0.0 when the ranks agree bitwise. A collective: every rank of the group must call it.

    (Under DDP, BatchNorm running statistics differ between ranks after a training forward pass
    until the next forward broadcasts them again: compare parameters only there.)"""
    source = _source_rank(src, process_group)
    worst = 0.0
    device = torch.device("cpu")
    tensors = module.state_dict().values() if buffers else [p.detach() for p in module.parameters()]
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            continue
        device = tensor.device
        theirs = tensor.detach().clone()
        dist.broadcast(theirs, source, group=process_group)
        diff = (tensor.double() - theirs.double()).abs().max() if tensor.is_floating_point() else \
            (tensor != theirs).any().double()
        worst = max(worst, float(diff))
    on_device = dist.get_backend(process_group) == "nccl"
    result = torch.tensor([worst], dtype=torch.float64, device=device if on_device else "cpu")
    dist.all_reduce(result, op=dist.ReduceOp.MAX, group=process_group)
    return float(result.item())


def apply_synced(pipeline: Pass | Sequence[Pass], model: nn.Module, example_inputs: Any = None, *,
                 process_group: Any = None, src: Optional[int] = None, **apply_kwargs: Any) -> fx.GraphModule:
    """fxshift.apply on every rank, with the structure checked equal and the weights broadcast.

    Args:
        pipeline, model, example_inputs, apply_kwargs: as for fxshift.apply (a DDP wrapper is
            looked through; the model is not changed).
        process_group: the group whose ranks must agree (default: the default group).
        src: the global rank whose weights every rank takes (default: the group's first rank).

    Outside a process group (or in one of a single rank) this is fxshift.apply. Inside one, a
    pass given a Budget plans on rank `src` alone (its latency timings included) and every rank
    receives that plan, so measurement noise cannot make the ranks choose differently.

    Raises:
        FxshiftError on every rank when the ranks' structures differ (naming the first
        difference), for example when a value-dependent rank rule chose different ranks.
    """
    base = unwrap_model(model)
    if not is_distributed(process_group):
        return apply(pipeline, base, example_inputs, **apply_kwargs)
    source = _source_rank(src, process_group)
    with synced_planning(process_group, source):  # Budget plans are made on `source` and broadcast
        gm = apply(pipeline, base, example_inputs, **apply_kwargs)
    mine = structure_fingerprint(gm)
    everyone: list[Any] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(everyone, mine, group=process_group)
    group_src = dist.get_group_rank(process_group, source) if process_group is not None else source
    reference = everyone[group_src]
    for rank, theirs in enumerate(everyone):
        if theirs != reference:
            raise FxshiftError(
                f"the pipeline built different structures on ranks {group_src} and {rank} of the process group "
                f"(first difference: {_first_difference(reference, theirs)}); the ranks must hold the same weights "
                "before the switch, and value-dependent ranks ('vbmf', 'energy:…') can differ across hardware: "
                "give fixed ranks (a fraction, an int or a dict by layer) instead. (A Budget's plan is already "
                f"made on rank {source} alone and broadcast, so a difference here comes from a per-layer rule.)")
    broadcast_state(gm, source, process_group)
    return gm


def ddp_options(ddp: DistributedDataParallel) -> dict[str, Any]:
    """The constructor options of an existing DistributedDataParallel wrapper (those this torch
    version's constructor accepts), to wrap another module the same way."""
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    options: dict[str, Any] = {
        "device_ids": ddp.device_ids,
        "output_device": ddp.output_device,
        "dim": ddp.dim,
        "process_group": ddp.process_group,
        "find_unused_parameters": ddp.find_unused_parameters,
        "gradient_as_bucket_view": ddp.gradient_as_bucket_view,
        "static_graph": bool(getattr(ddp, "static_graph", False)),
    }
    if "forward_sync_buffers" in accepted:
        options["forward_sync_buffers"] = ddp.forward_sync_buffers
    else:
        options["broadcast_buffers"] = ddp.broadcast_buffers
    for name in ("mixed_precision", "skip_all_reduce_unused_params", "batched_grad_copy"):
        if hasattr(ddp, name):
            options[name] = getattr(ddp, name)
    config = getattr(ddp, "_bucket_config", None)
    if config is not None and getattr(config, "per_bucket_bytes_caps", ()):
        options["bucket_cap_mb_list"] = [c / _MIB for c in config.per_bucket_bytes_caps]
    elif getattr(ddp, "bucket_bytes_cap", None) and ddp.bucket_bytes_cap != _DDP_DEFAULT_BUCKET_MB * _MIB:
        options["bucket_cap_mb"] = ddp.bucket_bytes_cap / _MIB
    return {k: v for k, v in options.items() if k in accepted}


def rewrap(ddp: DistributedDataParallel, module: nn.Module, **overrides: Any) -> DistributedDataParallel:
    """`module` in a DistributedDataParallel built with `ddp`'s options (`overrides` win), with
    `ddp`'s communication hooks registered again (unless mixed precision installed its own).

    A collective: every rank of the wrapper's process group must call it. DDP's constructor
    checks that parameter shapes agree across ranks and broadcasts rank 0's state.
    """
    options = {**ddp_options(ddp), **overrides}
    wrapped = DistributedDataParallel(module, **options)
    if options.get("mixed_precision") is None:
        for hook, state in getattr(ddp, "_comm_hooks", ()):
            wrapped.register_comm_hook(state, hook)
    return wrapped
