"""Bytes per rank of one training stage, from the model's sizes (urt.plan.model) and the composed config.

The formula (docs/scaling.md writes it out with the numbers of each released size):

    weights      DDP: every parameter x m                 FSDP2: trained shards x m + frozen vision x c
    gradients    trained parameters (their shards) x m
    optimizer    AdamW: 2 x trained parameters (their shards) x m + 4 bytes per trained tensor (step count)
    reference    GRPO with a KL term: DDP a deep copy (every parameter x m); FSDP2 shards x c
    transient    FSDP2: the root unit (embeddings, head) + 2 decoder layers gathered in c, and one layer's
                 unsharded gradients (c) and their fp32 reduce-scatter buffer (GRPO rollout_weights=copy: every
                 parameter x c, all step long; =shard: the shards x c, all step long); DDP generation under
                 autocast: its cache of c copies of every weight
    host         FSDP2 with CPU offload: the trained model's shards (m), gradients and optimizer state live in
                 host memory, not on the GPU (they are still listed under weights / gradients / optimizer);
                 the GPU keeps the frozen replicated tower and a staging copy (m) of the units being gathered
    host at load per node: FSDP2 (a checkpoint) - one rank reads the whole model in the checkpoint's bytes
                 (the others receive it from rank 0 as they shard), plus the ranks' offloaded weight shards;
                 otherwise every rank reads every parameter x m
    activations  T = micro-batch x sequence tokens; per decoder layer and token c x (4h + 2 q + 2 kv + 4 i)
                 elements; checkpointed: L x T x h x c (each layer's input) + one layer's; plus the logits of
                 the predicted positions, micro-batch x predicted x vocab x (c + 4 + 4) (fp32 log-softmax and
                 its gradient)
    KV cache     GRPO generation: batch x G x (prompt + max_new_tokens) x attention layers x 2 x kv heads x
                 head dim x c (+ Qwen3.5's linear-attention states: fp32 value-head x key x value per layer)
    peak         weights + gradients + optimizer + reference - host + max(training pass, generation) + reserve

m: bytes of a master weight (model.dtype: float32 4, bf16 2), c: of the compute dtype (bf16 2 under
bf16-mixed / FSDP2 param_dtype bf16). The reserve (3 GiB on a GPU) covers the CUDA context, NCCL buffers and
allocator fragmentation. Weights, gradients and optimizer state are exact (tests/test_plan.py measures them
on CPU); activations and the KV cache are the dominant terms of transformers' implementation, not a
measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from urt.errors import UrtError
from urt.plan.model import ModelSizes

GiB = 1024 ** 3
RESERVE = 3 * GiB  # CUDA context, NCCL buffers, allocator fragmentation (GPU runs)
SFT_PREDICTED = 4096  # SFT: predicted (target) tokens per sequence at most (a CoT + answer); capped by max_length
PROMPT_TEXT = 512  # the paper templates' text tokens around the visuals


@dataclass
class Setting:
    """How one stage runs, as far as memory goes."""

    stage: str  # sft | grpo
    strategy: str  # single | ddp | fsdp
    world: int
    master: int  # bytes of a master weight
    compute: int  # bytes of the compute dtype
    checkpointing: bool
    micro_batch: int  # sequences per training forward
    seq_len: int  # tokens per sequence in it
    predicted: int  # of them, projected onto the vocabulary
    reference: bool = False
    generations: int = 0  # G (GRPO)
    gen_batch: int = 0  # prompts per generate call
    gen_len: int = 0  # prompt + max_new_tokens
    rollout: str = "auto"  # GRPO's stage.rollout_weights (auto | gather | copy | shard)
    offload: bool = False  # FSDP2 with trainer.strategy.cpu_offload
    ranks_per_node: int = 0  # for the host memory per node (0: world)
    load: int = 0  # bytes per parameter while loading (0: master)
    readers: int = 0  # ranks per node that read the whole checkpoint (0: every rank)
    reserve: int = RESERVE

    @property
    def rollout_mode(self) -> str:
        """The generation weights GRPO uses (urt.stages.grpo.GRPOModule.rollout_mode)."""
        if self.strategy != "fsdp":
            return "gather"
        if self.rollout == "auto":
            return "shard" if self.offload else "gather"
        return self.rollout

    def describe(self) -> str:
        out = f"{self.strategy} x{self.world}{', CPU offload' if self.offload else ''}, " \
              f"{'checkpointed' if self.checkpointing else 'no checkpointing'}, micro-batch {self.micro_batch}"
        return out + (f", generation batch {self.gen_batch}" if self.stage == "grpo" else "")


@dataclass
class Plan:
    """Bytes per rank of one stage under one `Setting`."""

    label: str
    setting: Setting
    weights: int
    gradients: int
    optimizer: int
    reference: int
    transient: int
    activations: int
    activations_checkpointed: int
    activations_full: int
    kv_cache: int
    gpu_bytes: int
    host: int = 0  # of weights + gradients + optimizer, the bytes in host memory (CPU offload)
    host_load: int = 0  # host bytes of a rank that reads the whole model (before sharding)
    host_weights: int = 0  # of `host`, the offloaded weight shards (allocated as the model is sharded)
    host_node_bytes: int | None = None  # a node's host memory, when known (checked by `check`)
    alternatives: list = field(default_factory=list)

    @property
    def static(self) -> int:
        """Bytes on the GPU all step long."""
        return self.weights + self.gradients + self.optimizer + self.reference - self.host

    @property
    def host_per_node(self) -> int:
        return self.host * (self.setting.ranks_per_node or self.setting.world)

    @property
    def host_load_per_node(self) -> int:
        ranks = self.setting.ranks_per_node or self.setting.world
        return self.host_load * (self.setting.readers or ranks) + self.host_weights * ranks

    @property
    def host_peak_per_node(self) -> int:
        return max(self.host_load_per_node, self.host_per_node)

    @property
    def fits_host(self) -> bool:
        return self.host_node_bytes is None or self.host_peak_per_node <= self.host_node_bytes

    @property
    def peak(self) -> int:
        return self.static + self.transient + max(self.activations, self.kv_cache) + self.setting.reserve

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes


def bytes_of(sizes: ModelSizes, s: Setting, label: str = "", gpu_bytes: int = 80 * GiB) -> Plan:
    """The `Plan` of `sizes` under `s` (the formula: the module docstring)."""
    fsdp = s.strategy == "fsdp"
    world = s.world if fsdp else 1
    m, c = s.master, s.compute
    trained = [t for t in sizes.tensors if t.trainable]
    if fsdp:
        weights = sum(t.local_numel(world) * m for t in sizes.tensors if t.sharded) + \
            sum(t.numel * c for t in sizes.tensors if not t.sharded)
        ref = sum(t.local_numel(world) * c if t.sharded else t.numel * c for t in sizes.tensors) if s.reference else 0
    else:
        weights = sizes.count() * m
        ref = sizes.count() * m if s.reference else 0
    grads = sum(t.local_numel(world) * m for t in trained)
    optim = 2 * grads + 4 * len(trained)
    h, L, i = sizes.hidden, sizes.layers, sizes.intermediate
    q, kv = sizes.heads * sizes.head_dim, sizes.kv_heads * sizes.head_dim
    tokens = s.micro_batch * s.seq_len
    per_layer = tokens * (4 * h + 2 * q + 2 * kv + 4 * i) * c
    logits = s.micro_batch * s.predicted * sizes.vocab * (c + 4 + 4)
    act_ckpt = L * tokens * h * c + per_layer + logits
    act_full = L * per_layer + logits
    act = act_ckpt if s.checkpointing else act_full
    layer, root = sizes.unit_numel("decoder."), sizes.unit_numel("root")
    host = host_weights = 0
    if fsdp:
        gathered = (root + 2 * layer) * c
        if s.offload:  # the trained shards, their gradients and AdamW state in host memory
            host_weights = sum(t.local_numel(world) * m for t in sizes.tensors if t.sharded)
            host = host_weights + grads + optim
            gathered += -(-(root + 2 * layer) // world) * m  # the units' shards staged on the GPU
        transient_train = gathered + layer * (c + 4)
        # a generation copy lives through the whole step (refreshed, not rebuilt)
        mode = s.rollout_mode if s.stage == "grpo" else "gather"
        copy = sizes.count() * c if mode == "copy" else \
            sum(t.local_numel(world) * c if t.sharded else t.numel * c for t in sizes.tensors) \
            if mode == "shard" else 0
        transient_gen = gathered + copy if mode != "copy" else copy
        transient_train += copy
    else:
        transient_train, transient_gen = 0, (sizes.count() * c if c < m else 0)  # autocast's weight cache
    kv_cache = 0
    if s.stage == "grpo":
        seqs = s.gen_batch * s.generations
        kv_cache = seqs * s.gen_len * sizes.attention_layers * 2 * kv * c
        kv_cache += seqs * (L - sizes.attention_layers) * (sizes.linear_state * 4 + sizes.linear_conv * c)
        kv_cache += seqs * sizes.vocab * 4 * 2  # a step's fp32 logits and the sampler's copy
    # the larger phase decides the transient too: training pass vs generation
    transient = transient_train if act >= kv_cache else transient_gen
    return Plan(label, s, weights, grads, optim, ref, transient, act, act_ckpt, act_full, kv_cache, gpu_bytes, host,
                sizes.count() * (s.load or m), host_weights)


def candidates(s: Setting) -> list[Setting]:
    """The settings `fit` tries, the configured one first: its strategy then FSDP2, CPU offload as
    configured then on (FSDP2), checkpointing as configured then on, the micro-batch and generation batch as
    configured then halved down to 1."""
    out = []
    strategies = [s.strategy] + (["fsdp"] if s.strategy != "fsdp" and s.world > 1 else [])
    for strategy, offload in [(st, o) for st in strategies
                              for o in (dict.fromkeys([s.offload, True]) if st == "fsdp" else [False])]:
        for ckpt in dict.fromkeys([s.checkpointing, True]):
            micro = s.micro_batch
            while True:
                gen = s.gen_batch
                while True:
                    out.append(replace(s, strategy=strategy, offload=offload, checkpointing=ckpt, micro_batch=micro,
                                       gen_batch=gen))
                    if gen <= 1:
                        break
                    gen = max(1, gen // 2)
                if micro <= 1:
                    break
                micro = max(1, micro // 2)
    return out


def fit(sizes: ModelSizes, s: Setting, label: str, gpu_bytes: int) -> Plan:
    """The plan of the configured setting, with `alternatives` holding the first setting that fits when it
    does not (none when nothing fits)."""
    plan = bytes_of(sizes, s, label, gpu_bytes)
    if not plan.fits:
        for alt in candidates(s)[1:]:
            p = bytes_of(sizes, alt, label, gpu_bytes)
            if p.fits:
                plan.alternatives.append(p)
                break
    return plan


def gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def table(plans: list[Plan]) -> str:
    """The plan as a text table: one row per stage (GiB per rank), and the setting that fits where the
    configured one does not."""
    head = ["stage", "strategy", "weights", "grads", "optim", "ref", "on host", "act ckpt", "act full", "KV cache",
            "transient", "peak", "GPU", "fits"]
    rows = []
    for p in plans:
        strategy = f"{p.setting.strategy} x{p.setting.world}" + (" offload" if p.setting.offload else "")
        rows.append([p.label, strategy, gib(p.weights), gib(p.gradients), gib(p.optimizer), gib(p.reference),
                     gib(p.host), gib(p.activations_checkpointed), gib(p.activations_full),
                     gib(p.kv_cache), gib(p.transient), gib(p.peak), gib(p.gpu_bytes),
                     "yes" if p.fits else "NO"])
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    def line(r):
        return "  ".join(x.ljust(w) if k < 2 else x.rjust(w) for k, (x, w) in enumerate(zip(r, widths)))
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("(GiB per rank; on host: of weights + grads + optim, what CPU offload keeps in host memory; act: "
               "activations of one micro-batch with / without checkpointing; peak: weights + grads + optim + ref "
               "- on host + transient + max(act, KV cache) + 3 GiB reserve)")
    for p in plans:
        s = p.setting
        out.append(f"{p.label}: {s.describe()}" + ("" if p.fits else " -> does not fit")
                   + f"; host memory per node of {s.ranks_per_node or s.world} ranks: {gib(p.host_load_per_node)} GiB "
                     f"while loading" + (f", {gib(p.host_per_node)} GiB offloaded state" if p.host else "")
                   + ("" if p.host_node_bytes is None else f" (node: {gib(p.host_node_bytes)} GiB"
                      + (")" if p.fits_host else ", does not fit)")))
        if not p.fits:
            if p.alternatives:
                a = p.alternatives[0]
                out.append(f"  fits with {a.setting.describe()}: peak {gib(a.peak)} GiB "
                           f"({overrides_for(s, a.setting)})")
            else:
                out.append("  nothing tried fits (FSDP2, checkpointing, micro-batch and generation batch 1): more "
                           "GPUs, or shorter sequences (data.max_length, stage.max_new_tokens)")
    return "\n".join(out)


def overrides_for(old: Setting, new: Setting) -> str:
    """The overrides that turn the configured setting into `new`."""
    ov = []
    if new.strategy != old.strategy:
        ov.append("trainer=fsdp")
    if new.offload != old.offload:
        ov.append(f"trainer.strategy.cpu_offload={str(new.offload).lower()}")
    if new.checkpointing != old.checkpointing:
        ov.append(f"model.gradient_checkpointing={str(new.checkpointing).lower()}")
    if new.micro_batch != old.micro_batch:
        ov.append(f"{'stage.micro_batch_size' if old.stage == 'grpo' else 'data.batch_size'}={new.micro_batch}")
    if new.gen_batch != old.gen_batch:
        ov.append(f"stage.generation_batch_size={new.gen_batch}")
    return " ".join(ov)


def check(plans: list[Plan]) -> None:
    """UrtError with the table when a stage does not fit: naming it and its peak against the GPU, or its
    host memory per node against the node's (where that is known)."""
    bad = [p for p in plans if not p.fits]
    if bad:
        p = bad[0]
        raise UrtError(f"stage {p.label} needs {gib(p.peak)} GiB per rank under {p.setting.describe()}, more than "
                       f"the {gib(p.gpu_bytes)} GiB of a GPU: stopped before loading the model (urt plan; "
                       f"+plan.check=false skips this check)\n{table(plans)}")
    bad = [p for p in plans if not p.fits_host]
    if bad:
        p = bad[0]
        what = "while loading" if p.host_load_per_node >= p.host_per_node else "for the offloaded state"
        raise UrtError(f"stage {p.label} needs {gib(p.host_peak_per_node)} GiB of host memory per node of "
                       f"{p.setting.ranks_per_node or p.setting.world} ranks {what}, more than the node's "
                       f"{gib(p.host_node_bytes)} GiB: stopped before loading the model (fewer ranks per node, or "
                       f"without CPU offload on more nodes; +plan.check=false skips this check)\n{table(plans)}")
