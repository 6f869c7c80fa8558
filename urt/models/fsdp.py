"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the urt families: what `trainer=fsdp` applies to the
policy (and to GRPO's reference) of every stage. The strategy that drives it: urt.stages.sharded.

**Units.** One unit per decoder layer of the language model (urt.models.sharding names the class per
family), then the root (the embeddings, the final norm, the LM head and whatever else is trainable). A
unit's parameters live as 1/world shards (DTensors on the data-parallel mesh); its forward and backward
all-gather them in `param_dtype` just for the unit, and backward reduce-scatters its gradients in
`reduce_dtype` (fp32: the sum over ranks is not rounded to bf16).

**The frozen vision tower stays replicated.** The frozen parameters of the vision
tower and the projector (the paper trains the language model only) are `ignored_params`: not sharded, never
gathered, never reduced; they are cast to `param_dtype` (what the unit would compute with anyway). Why:
a sharded tower makes every visual forward a collective, so ranks whose batches hold different numbers of
images and videos (each a separate tower pass), or GRPO's per-rank visual cache, would wait on each other
forever; and the tower is small next to the language model (0.4-0.7B params: ~1 GiB bf16 per rank). A
trainable tower (model.freeze_vision=false) is sharded like the decoder, one unit per vision block; every
rank must then run the same number of visual passes (SFT batches of one medium kind do).

**Activation checkpointing** is transformers' own per decoder layer (`model.gradient_checkpointing=true`,
non-reentrant), which composes with FSDP2: the recomputed forward all-gathers the unit again.

**CPU offload** (`offload=True`, trainer.strategy.cpu_offload): a trained model's fp32 shards, their
gradients and hence the AdamW state live in host memory (FSDP2's `CPUOffloadPolicy`); a unit's shard is
copied to the accelerator for its forward/backward and its reduced gradient copied back, and the optimizer
steps on the CPU. 12-16 bytes per parameter leave the GPU, which is what fits a 27-32B model on 8 x 80 GB.
Frozen models (GRPO's reference, a generation copy) are never offloaded: they compute every pass and are
bf16 already.
"""

from __future__ import annotations

import torch

from urt.errors import UrtError
from urt.models.sharding import DTYPES, layer_classes


def dtype_of(name: str | None):
    if name is None or name == "none":
        return None
    if name not in DTYPES:
        raise UrtError(f"unknown dtype {name!r} for sharded mixed precision; known: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `fully_shard` has been applied to `model` (its root)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model: torch.nn.Module, family: str, part: str) -> list[torch.nn.Module]:
    classes = tuple(layer_classes(family, (part,)))
    return [m for m in model.modules() if isinstance(m, classes)]


def replicated_parameters(model: torch.nn.Module, family: str) -> tuple[list[torch.nn.Module], list]:
    """(the vision blocks, the parameters kept replicated): the frozen ones of the vision tower and the
    projector (why: the module docstring); a trained vision block's are sharded with it."""
    from urt.models.families import get_family

    spec = get_family(family)
    vision = _units(model, family, "vision")
    trained = {id(p) for b in vision for p in b.parameters() if p.requires_grad}
    in_trained = {id(p) for b in vision if any(id(q) in trained for q in b.parameters()) for p in b.parameters()}
    return vision, [p for n, p in model.named_parameters() if not p.requires_grad and id(p) not in in_trained
                    and spec.part_of(n) in ("vision", "projector")]


def shard_model(model: torch.nn.Module, family: str, mesh, *, param_dtype: str | None = "bf16",
                reduce_dtype: str | None = "fp32", reshard_after_forward: bool = True,
                offload: bool = False, master_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Apply FSDP2 to `model` in place (see the module docstring) over the 1-D data-parallel `mesh`;
    returns it. A model already sharded is returned as it is. `offload`: a model with trained parameters
    keeps its shards (and gradients) in host memory; a frozen one ignores it. `master_dtype`: the sharded
    parameters' dtype when the model was loaded in another (its checkpoint's bf16): each unit is cast just
    before it is sharded, so the host never holds the whole model in the wider dtype."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if is_sharded(model):
        return model
    decoder = _units(model, family, "decoder")
    if not decoder:
        names = ", ".join(c.__name__ for c in layer_classes(family, ("decoder",)))
        raise UrtError(f"sharding: the model has no {names} module although model.family={family!r}: FSDP "
                       f"would put every weight in one unit (nothing saved)")
    vision, ignored = replicated_parameters(model, family)
    train_vision = any(p.requires_grad for b in vision for p in b.parameters())
    pdt = dtype_of(param_dtype)
    if pdt is not None:
        # frozen weights are only ever used in param_dtype: store them so (a fully frozen model, GRPO's
        # reference, entirely; a unit keeps one dtype, so a partly trained one keeps its original)
        frozen = all(not p.requires_grad for p in model.parameters())
        for p in (model.parameters() if frozen else ignored):
            p.data = p.data.to(pdt)
    mp = MixedPrecisionPolicy(param_dtype=pdt, reduce_dtype=dtype_of(reduce_dtype))
    trained = any(p.requires_grad for p in model.parameters())
    # pinned host memory makes the per-unit copies asynchronous; there is nothing to pin for on a CPU mesh
    policy = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if offload and trained else OffloadPolicy()
    opts = dict(mesh=mesh, mp_policy=mp, offload_policy=policy, ignored_params=set(ignored) or None)
    keep = {id(p) for p in ignored}

    def cast(unit):  # to the master dtype, one unit at a time (its full copy freed once it is sharded)
        if master_dtype is not None:
            for p in unit.parameters():
                if id(p) not in keep and p.dtype != master_dtype:
                    p.data = p.data.to(master_dtype)

    for block in (vision if train_vision else []):
        cast(block)
        fully_shard(block, reshard_after_forward=reshard_after_forward, **opts)
    for layer in decoder:
        cast(layer)
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **opts)
    # the root's parameters (embeddings, norm, head) are gathered for the whole forward anyway
    cast(model)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **opts)
    return model


def place_unsharded(model: torch.nn.Module, device) -> None:
    """Move what FSDP2 does not manage (buffers, the replicated frozen tower) to `device`, leaving the
    shards where they are: an offloaded model's `.to(device)` would pull its host shards onto the GPU."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if not isinstance(p, DTensor) and p.device != torch.device(device):
                    p.data = p.data.to(device)
            for name, b in module.named_buffers(recurse=False):
                if b is not None:
                    module._buffers[name] = b.to(device)


def freeze_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy (GRPO's reference without the sharded strategy): eval mode, no gradients."""
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def full_state_dict(model: torch.nn.Module) -> dict:
    """The full (unsharded) state dict of a sharded `model`, gathered parameter by parameter onto rank 0's
    CPU (ranks > 0 get {}); a collective, every rank calls it. No rank holds more than one full parameter
    on its accelerator at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank stores of `t` (its shard for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


class plain_class:
    """Context in which a sharded model presents its transformers class: `fully_shard` swaps the class for a
    `FSDP<Name>` subclass, and transformers' save_pretrained finds the checkpoint key renames (the
    original format of Qwen-VL checkpoints, `model.layers.*` vs `model.language_model.layers.*`) by class
    name. Only for saving a state dict gathered elsewhere: no forward runs inside."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.cls = model, type(model)

    def __enter__(self):
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.model, FSDPModule):
            self.model.__class__ = next(c for c in self.cls.__mro__[1:]
                                        if issubclass(c, torch.nn.Module) and not issubclass(c, FSDPModule))
        return self.model

    def __exit__(self, *exc):
        self.model.__class__ = self.cls
        return False


def generation_copy(model: torch.nn.Module, dtype: str | None = "bf16") -> torch.nn.Module:
    """A frozen, unsharded copy of `model` (made before it is sharded) in `dtype` for generating rollouts
    without collectives (rollout_weights=copy): 2 bytes per parameter on every rank (bf16), refreshed from the
    shards by `refresh_generation_copy` (the alternative to gathering one layer at a time during generation)."""
    import copy

    out = copy.deepcopy(model).eval().requires_grad_(False)
    pdt = dtype_of(dtype)
    if has_meta(out):  # a policy built on the meta device: allocated here, filled by the refresh
        out = out.to_empty(device="cpu")
    if pdt is not None:
        for p in out.parameters():
            p.data = p.data.to(pdt)
    return out


def has_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers())


@torch.no_grad()
def broadcast_from_rank0(model: torch.nn.Module, full: dict | None, device) -> None:
    """Give a sharded `model` rank 0's weights: ranks that built it on the meta device allocate it on
    `device` first; rank 0's full state dict (`full`, taken before sharding; None elsewhere) is broadcast
    tensor by tensor into every rank's shards (cast to their dtype), then every buffer (non-persistent ones
    such as rotary frequencies are not in a state dict). A collective: every rank calls it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if has_meta(model):
        model.to_empty(device=device)
    set_model_state_dict(model, full if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    group_device = torch.device("cpu") if dist.get_backend() == "gloo" else device
    for b in model.buffers():
        t = b.to(group_device)
        dist.broadcast(t, src=0)
        b.copy_(t)


def frozen_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model`'s structure and buffers whose parameters are on the meta device (no
    memory): made before `model` is sharded, sharded like it, then given its values from the sharded model
    by `materialize_from` (each rank copies its own shards). GRPO's reference and the sharded generation
    copy are built so under the sharded strategy: no rank ever holds a second full copy of the weights in
    host memory (a deep copy of a 32B fp32 model is 133 GB per rank)."""
    import copy

    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


@torch.no_grad()
def materialize_from(skeleton: torch.nn.Module, sharded: torch.nn.Module, device) -> None:
    """Allocate a sharded `frozen_skeleton` on `device` and fill it with `sharded`'s current values: its
    shards rank by rank (`refresh_sharded_copy`, no collective), its replicated parameters and buffers
    whole."""
    skeleton.to_empty(device=device)
    refresh_sharded_copy(skeleton, sharded, replicated=True)
    mine = dict(sharded.named_buffers())
    for name, b in skeleton.named_buffers():
        b.copy_(mine[name].to(b.device, b.dtype))


@torch.no_grad()
def refresh_generation_copy(copy: torch.nn.Module, sharded: torch.nn.Module) -> None:
    """Overwrite `copy`'s weights with the sharded model's current ones, one parameter gathered at a time (a
    collective: every rank calls it; no rank holds more than one full fp32 parameter at once)."""
    mine = dict(sharded.named_parameters())
    for name, p in copy.named_parameters():
        p.copy_(full_tensor(mine[name].detach()).to(p.device, p.dtype))
    bufs = dict(sharded.named_buffers())
    for name, b in copy.named_buffers():  # the same on every rank (a copy of a meta-built policy has none)
        b.copy_(bufs[name].to(b.device, b.dtype))


@torch.no_grad()
def refresh_sharded_copy(copy: torch.nn.Module, sharded: torch.nn.Module, replicated: bool = False) -> None:
    """Overwrite a sharded copy's shards with the sharded model's current ones: both are sharded over the
    same mesh with the same units, so each rank copies its own shard (host to accelerator for an offloaded
    model, cast to the copy's dtype) and no collective runs. The replicated (frozen, never trained)
    parameters are copied only with `replicated`."""
    from torch.distributed.tensor import DTensor

    mine = dict(sharded.named_parameters())
    for name, p in copy.named_parameters():
        src = mine[name]
        if not replicated and not isinstance(p, DTensor) and not src.requires_grad:
            continue
        if isinstance(p, DTensor) != isinstance(src, DTensor) or \
                (isinstance(p, DTensor) and (p.placements != src.placements or p.shape != src.shape)):
            raise UrtError(f"sharded generation copy: {name} is not sharded like the policy's "
                           f"({type(p).__name__} vs {type(src).__name__}); shard both with the same units")
        dst, val = (p.to_local(), src.to_local()) if isinstance(p, DTensor) else (p, src)
        dst.copy_(val.detach().to(dst.device, dst.dtype, non_blocking=True))
