"""The collectives a GRPO step needs across data-parallel ranks, each a no-op on one process.

Every rank runs the same step on its own prompts: the same number of optimizer steps and the same
collectives in the same order, whatever its share of kept sequences (none included). Micro-batches
accumulate without the strategy's gradient sync (else one all-reduce each, and a hang as soon as the ranks'
micro-batch counts differ); `sync_gradients` then has DDP all-reduce once per optimizer step, the loss
weights having divided by the global counts."""

from __future__ import annotations

import contextlib

import torch


def distributed() -> bool:
    """Whether this process is one of several data-parallel ranks (an initialised process group > 1)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if distributed() else 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced in place over the ranks (sum or max); `t` itself on one process."""
    if distributed():
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(t, op=ops[op])
    return t


def max_over_ranks(n: int, device: torch.device) -> int:
    """`n` maxed over the ranks (a collective)."""
    if not distributed():
        return int(n)
    return int(all_reduce(torch.tensor([float(n)], device=device), "max").item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """`flag` or'ed over the ranks, so every rank stops together (a collective)."""
    if not distributed():
        return bool(flag)
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0], device=device), "max").item() > 0)


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's, ...]; [obj] on one process (a collective)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def no_grad_sync(trainer):
    """Context in which backward passes accumulate local gradients only: the strategy's
    `block_backward_sync` (DDP's `no_sync`); nothing to block on one device."""
    strategy = trainer.strategy if trainer is not None else None
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


def sync_gradients(module, loss: float, bad: bool, reduce: bool = True) -> tuple[float, bool]:
    """Average the accumulated gradients of a LightningModule's trainable parameters over the ranks (in
    place) and return (the loss summed over the ranks, whether any rank saw a non-finite loss). On one
    process: (loss, bad), nothing moves.

    One small collective first carries the loss and the non-finite flag (on a non-finite loss every rank
    stops there, before any gradient moves). Then one backward pass *with* DDP's sync of a zero that
    touches every trainable parameter: its gradient adds nothing, but it fires DDP's hooks, so DDP's
    reducer all-reduces the accumulated gradients in its buckets as it would after a plain backward
    (bucketed, comm hooks honoured; with `gradient_as_bucket_view` the gradients then live in those
    buckets and accumulate there, no second copy). DDP divides by the world size: the caller's loss
    weights multiply by it. Every trainable parameter ends with a gradient (zero where no rank's
    sequences reached it), on every rank, also on one without sequences. `reduce=False` (FSDP2, whose
    backward passes reduce-scatter as they go): only the loss and the flag."""
    if not distributed():
        return loss, bad
    head = all_reduce(torch.tensor([loss, 1.0 if bad else 0.0], dtype=torch.float64, device=module.device))
    if bool(head[1] > 0):
        return float(head[0]), True
    if not reduce:  # sharded (FSDP2): every backward already reduce-scattered its gradients
        return float(head[0]), False
    params = [p for p in module.parameters() if p.requires_grad]  # exactly the parameters DDP reduces
    zero = sum(p.reshape(-1)[0].float() for p in params) * 0.0
    module.manual_backward(zero)  # outside `no_grad_sync`: DDP all-reduces now
    return float(head[0]), False
