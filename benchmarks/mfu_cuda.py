#!/usr/bin/env python
"""MFU of urt's SFT step and GRPO update on a Qwen2.5-VL-3B-sized random model, and a packed-vs-padded
logits check (for a CUDA machine; `--device cpu --tiny` runs the same logic on a tiny model).

What is timed (CUDA events after warm-up, one packed padding-free batch built with urt's
`PackedCollator` / `model_inputs`; bf16; gradient checkpointing on unless --no-grad-ckpt):

* SFT step: forward, assistant-token cross-entropy (fp32, only the supervised positions are projected onto
  the vocabulary, as `urt.stages.sft` does with `selected_logits`), backward, grad-norm clip 1.0, AdamW step.
* GRPO update: the frozen reference's forward (log-probs of the completion tokens), the policy's forward,
  `urt.rl.objective.policy_loss` (paper defaults: k3 KL, beta 0.04, paper aggregation, one update per
  batch), backward, grad-norm clip 1.0, AdamW step. Generation and rewards are not part of it.

Gradient checkpointing is transformers' own (non-reentrant). Its `enable_input_require_grads` hooks make
the vision tower's patch-embedding output require grad, so a frozen tower is recomputed and
back-propagated every step (docs/performance.md §MFU on H100 and H200); the script removes
those hooks (`drop_input_grad_hooks`); --hf-input-grads keeps them (what `urt.models.load_model` does
today). --profile DIR writes a torch.profiler table of one step per phase.

The model: transformers' `Qwen2_5_VLForConditionalGeneration` from a `Qwen2_5_VLConfig` with the numbers
of Qwen2.5-VL-3B-Instruct (LM 2048 hidden, 36 layers, 16 heads, 2 KV heads, 11008 MLP, vocab 151936, tied
embeddings; vision 32 blocks of 1280, 16 heads, MLP 3420, window 112, full attention in blocks
7/15/23/31), initialised at random directly on the device (no download). The vision tower and projector
are frozen, as the paper trains the language model only (`--train-vision` trains them too). Token ids
come from urt's committed offline tokenizer (`urt.models.tokenizer`): prompts are the paper's
image-generation template rendered through the Qwen2.5-VL chat template with two images; each image is
synthetic, given in the image processor's output layout (a 448x448 image = 32x32 patches of
3*2*14*14 normalised values = 256 image tokens after the 2x2 merge), so image tokens are real vision-tower
outputs. Completions / CoT targets are random ordinary tokens.

FLOPs are counted analytically (multiply-add = 2 FLOPs; `lm_forward_flops`, `attention_flops`,
`vision_forward_flops` below):

    LM forward   = 2 * P_layer * n_layers * T                      (decoder matmuls, all T packed tokens)
                 + n_layers * sum_s 4 * n_heads * head_dim * L_s(L_s+1)/2   (causal QK^T and PV, per sequence)
                 + 2 * hidden * vocab * K                          (lm_head on the K positions whose logits are used)
    P_layer      = hidden*(n_heads*hd) + 2*hidden*(n_kv*hd) + (n_heads*hd)*hidden + 3*hidden*intermediate
    training     = 3 * forward (backward = 2 * forward)   -> the familiar 6*N*T plus attention terms
    vision fwd   = 2 * (patch_embed + P_block * depth) * patches + 2 * P_merger * patches/4
                 + per block 4 * heads * hd * sum_units n_unit^2  (non-causal; units = the 112px windows, or
                   the whole image in the full-attention blocks), counted forward-only when frozen
    SFT step     = 3 * LM_fwd(K = supervised positions) + vision_fwd
    GRPO update  = LM_fwd(K = completion positions) + vision_fwd                  (reference)
                 + 3 * LM_fwd(K = completion positions) + vision_fwd              (policy)

The attention terms use each packed sequence's own length L_s, not the packed total T: that is the work a
padding-free kernel must do (sdpa without flash-attn actually computes the dense T x T block-diagonal
mask, which this does not credit). Embedding lookups, norms, activations, RoPE, softmax, the loss and the
optimizer are not counted (conventional). MFU excludes the recomputation of gradient checkpointing
(model FLOPs); HFU adds it (one more decoder forward per training forward). MFU = model FLOPs per step /
step time / the GPU's dense bf16 peak (table below by device name, or --peak-tflops).

Attention (--attn auto, as urt's `load_model`): flash_attention_2 when flash-attn is importable, else
`urt_varlen` (torch's own varlen flash kernel, `urt.models.attention`; the vision tower then runs one varlen
call per block), else sdpa. --compile-regions torch.compiles the RMSNorm and MLP modules as
`load_model(compile_regions=True)` does.

The packed-vs-padded check runs the same sequences (with images) packed (one row, per-sample mRoPE
positions, no attention mask) and right-padded (attention mask), for flash_attention_2 when importable,
urt_varlen when this torch has the kernel, and sdpa, and reports max |delta logit| and max |delta log-prob|
of the next tokens. The tolerance is absolute 1e-4 in fp32. In bf16 (8-bit significand, unit roundoff 2^-8) packed and padded runs go through different
kernels and matmul shapes, so their rounding differs and compounds over the 36 layers: the tolerance is
4x the measured noise floor between two equally correct runs (padded batch vs each sequence alone,
unpadded) plus 2^-5 of the largest |logit| (4 bf16 steps at that magnitude, for when the floor happens to
be 0). A packing bug (attention across samples, shifted positions)
moves logits by the order of the logits themselves; a negative control (the packed row with one running
position row, so samples attend to earlier samples) must exceed the tolerance, or the check is reported as
not sensitive enough (FAIL).

Run (repository root on PYTHONPATH or not; urt need not be installed; only torch, transformers and urt's
own code are needed):

    python benchmarks/mfu_cuda.py                      # 3B, attention auto, grad ckpt on
    python benchmarks/mfu_cuda.py --no-grad-ckpt --compile-regions     # the configuration that meets the targets
    python benchmarks/mfu_cuda.py --attn sdpa --phases sft             # the dense-mask baseline
    python benchmarks/mfu_cuda.py --device cpu --tiny --layers 1     # logic check on CPU (fp32)

The last stdout line is one JSON object with every figure (also written to --json-out).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import os
import platform
import random
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _import_urt():
    """urt's model / collate / loss pieces, importable without lightning, hydra, webdataset, wandb, av,
    rich or peft. `urt.data.schema` (pulled in by the collator) imports PIL at module level for its type
    names only; on a machine without Pillow a placeholder module stands in while urt is imported (the
    collators never touch PIL) and is removed again."""
    if not _module_exists("urt"):
        sys.path.insert(0, str(REPO_ROOT))
    # transformers' own optional-dependency probes run before any placeholder exists
    importlib.import_module("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    stub = None
    if not _module_exists("PIL"):
        stub = types.ModuleType("PIL")
        stub.__spec__ = importlib.machinery.ModuleSpec("PIL", None)
        image = types.ModuleType("PIL.Image")
        image.__spec__ = importlib.machinery.ModuleSpec("PIL.Image", None)
        image.Image = type("Image", (), {})
        stub.Image = image
        sys.modules["PIL"], sys.modules["PIL.Image"] = stub, image
    try:
        from urt.data import collate, encode
        from urt.models import attention, loading, tokenizer
        from urt.prompts import render_text
        from urt.rl import objective
    finally:
        if stub is not None:
            sys.modules.pop("PIL", None)
            sys.modules.pop("PIL.Image", None)
    return types.SimpleNamespace(
        PackedCollator=collate.PackedCollator, PaddedCollator=collate.PaddedCollator,
        model_inputs=collate.model_inputs, Encoded=encode.Encoded, IGNORE_INDEX=encode.IGNORE_INDEX,
        choose_attn_implementation=loading.choose_attn_implementation, attention=attention,
        compile_regions=loading.compile_model_regions,
        load_tiny_tokenizer=tokenizer.load_tiny_tokenizer, render_text=render_text,
        policy_loss=objective.policy_loss, group_advantages=objective.group_advantages,
        completion_mask=objective.completion_mask)


U = _import_urt()
FAMILY = "qwen2_5_vl"
TARGETS = {"sft": 0.40, "grpo": 0.30}

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets. First match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_tflops_for(device_name: str) -> float | None:
    name = device_name.upper()
    for key, value in PEAK_BF16_TFLOPS:
        if all(part in name for part in key.split()):
            return value
    return None


# ------------------------------------------------------------------------------------------- configs

QWEN2_5_VL_3B_TEXT = dict(
    hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
    hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
    max_window_layers=70, attention_dropout=0.0, initializer_range=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN2_5_VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, out_hidden_size=2048,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu",
)


def _token_ids(tok) -> dict:
    c = tok.convert_tokens_to_ids
    return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))


def model_config(tok, *, tiny: bool = False, layers: int | None = None, vision_layers: int | None = None):
    """Qwen2.5-VL-3B-Instruct's architecture (or urt's tiny test config with `tiny`), with the offline
    tokenizer's special-token ids (every id stays inside the 151936-row vocabulary)."""
    if tiny:
        from urt.models.tiny import tiny_config

        cfg = tiny_config(FAMILY, tok)
    else:
        special = dict(eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=dict(QWEN2_5_VL_3B_TEXT, **special), vision_config=dict(QWEN2_5_VL_3B_VISION),
            tie_word_embeddings=True, **_token_ids(tok))
        for k, v in special.items():
            setattr(cfg, k, v)
    if layers is not None:
        cfg.text_config.num_hidden_layers = int(layers)
        if hasattr(cfg.text_config, "layer_types") and cfg.text_config.layer_types is not None:
            cfg.text_config.layer_types = cfg.text_config.layer_types[: int(layers)]
    if vision_layers is not None:
        v = cfg.vision_config
        v.depth = int(vision_layers)
        full = [i for i in v.fullatt_block_indexes if i < v.depth]
        v.fullatt_block_indexes = full or [v.depth - 1]
    cfg.use_cache = False
    cfg.text_config.use_cache = False
    return cfg


# --------------------------------------------------------------------------------------------- FLOPs

@dataclass(frozen=True)
class LMDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, text_cfg) -> "LMDims":
        hd = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        return cls(text_cfg.hidden_size, text_cfg.num_hidden_layers, text_cfg.num_attention_heads,
                   text_cfg.num_key_value_heads, hd, text_cfg.intermediate_size, text_cfg.vocab_size)

    @property
    def layer_matmul_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate


@dataclass(frozen=True)
class VisionDims:
    hidden: int
    depth: int
    heads: int
    intermediate: int
    patch: int
    temporal_patch: int
    merge: int
    in_channels: int
    out_hidden: int
    window: int
    full_blocks: tuple[int, ...]

    @classmethod
    def from_config(cls, v) -> "VisionDims":
        return cls(v.hidden_size, v.depth, v.num_heads, v.intermediate_size, v.patch_size, v.temporal_patch_size,
                   v.spatial_merge_size, getattr(v, "in_channels", getattr(v, "in_chans", 3)), v.out_hidden_size,
                   v.window_size, tuple(v.fullatt_block_indexes))

    @property
    def patch_embed_params(self) -> int:
        return self.in_channels * self.temporal_patch * self.patch ** 2 * self.hidden

    @property
    def block_matmul_params(self) -> int:
        h = self.hidden
        return h * 3 * h + h * h + 3 * h * self.intermediate  # qkv, proj, gated MLP

    @property
    def merger_matmul_params(self) -> int:
        m = self.hidden * self.merge ** 2
        return m * m + m * self.out_hidden


def attention_flops(layers: int, heads: int, head_dim: int, seq_lens, *, causal: bool = True) -> int:
    """Forward FLOPs of QK^T and PV over independent sequences: per layer, per sequence of length L,
    2 matmuls x 2 FLOPs x heads x head_dim x (L(L+1)/2 causal score entries, or L^2)."""
    entries = sum(n * (n + 1) // 2 if causal else n * n for n in seq_lens)
    return layers * 4 * heads * head_dim * entries


def lm_forward_flops(d: LMDims, seq_lens, logit_positions: int) -> dict:
    """LM forward FLOPs of a packed batch: decoder matmuls on every token, per-sequence causal attention,
    lm_head on `logit_positions` positions."""
    tokens = sum(seq_lens)
    dec = 2 * d.layer_matmul_params * d.layers * tokens
    attn = attention_flops(d.layers, d.heads, d.head_dim, seq_lens, causal=True)
    head = 2 * d.hidden * d.vocab * int(logit_positions)
    return {"decoder_matmul": dec, "attention": attn, "lm_head": head, "total": dec + attn + head}


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def vision_forward_flops(v: VisionDims, grids) -> dict:
    """Vision tower + merger forward FLOPs for images/videos with grids (t, h, w) in patches. Window
    blocks attend within windows of `window` pixels (window/patch/merge merged units a side); full blocks
    attend over each frame."""
    patches = sum(t * h * w for t, h, w in grids)
    matmul = 2 * (v.patch_embed_params + v.block_matmul_params * v.depth) * patches
    merger = 2 * v.merger_matmul_params * patches // v.merge ** 2
    hd = v.hidden // v.heads
    units = max(1, v.window // v.patch // v.merge)
    win_sq = full_sq = 0
    for t, h, w in grids:
        full_sq += t * (h * w) ** 2
        for ch in _chunks(h // v.merge, units):
            for cw in _chunks(w // v.merge, units):
                win_sq += t * (ch * cw * v.merge ** 2) ** 2
    n_full = len([i for i in v.full_blocks if i < v.depth])
    attn = 4 * v.heads * hd * (n_full * full_sq + (v.depth - n_full) * win_sq)
    return {"matmul": matmul + merger, "attention": attn, "total": matmul + merger + attn, "patches": patches}


def matmul_params_of_model(model) -> dict:
    """Weights of every Linear / Conv in the instantiated model by part, to cross-check the analytic
    counts above (biases excluded)."""
    out = {"lm_layers": 0, "lm_head": 0, "vision": 0, "other": 0}
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.Conv2d)):
            continue
        n = mod.weight.numel()
        if ".language_model.layers." in f".{name}" or name.startswith("language_model.layers."):
            out["lm_layers"] += n
        elif name == "lm_head":
            out["lm_head"] += n
        elif ".visual." in f".{name}":
            out["vision"] += n
        else:
            out["other"] += n
    return out


def check_flop_model(model, lm: LMDims, vis: VisionDims) -> None:
    got = matmul_params_of_model(model)
    want_lm = lm.layer_matmul_params * lm.layers
    want_vis = vis.patch_embed_params + vis.block_matmul_params * vis.depth + vis.merger_matmul_params
    if got["lm_layers"] != want_lm or got["vision"] != want_vis or got["lm_head"] != lm.hidden * lm.vocab:
        raise SystemExit(f"FLOP model does not match the instantiated model: {got} vs lm_layers={want_lm}, "
                         f"vision={want_vis}, lm_head={lm.hidden * lm.vocab}")


# ----------------------------------------------------------------------------------------- sequences

CAPTION = "a red circle next to a blue square on a wooden table, photographed in soft morning light"


class Builder:
    """Hand-built `Encoded` samples, exactly as `SampleEncoder` lays them out for Qwen2.5-VL: the rendered
    chat prompt with each `<|image_pad|>` expanded to the image's merged-patch count, mm_token_type_ids 1
    on image tokens, labels on the target and its closing `<|im_end|>`."""

    def __init__(self, tok, cfg, image_size: int, seed: int = 0):
        self.tok = tok
        v = cfg.vision_config
        if image_size % (v.patch_size * v.spatial_merge_size):
            raise SystemExit(f"--image-size must be a multiple of {v.patch_size * v.spatial_merge_size}")
        g = image_size // v.patch_size
        self.grid = (1, g, g)
        self.patch_dim = getattr(v, "in_channels", 3) * v.temporal_patch_size * v.patch_size ** 2
        self.tokens_per_image = g * g // v.spatial_merge_size ** 2
        self.image_id = cfg.image_token_id
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self.newline = tok("\n", add_special_tokens=False)["input_ids"]
        user = U.render_text("paper", "image_generation", caption=CAPTION)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": user}]}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = []
        for i in tok(text, add_special_tokens=False)["input_ids"]:
            ids += [i] * (self.tokens_per_image if i == self.image_id else 1)
        self.prompt_ids = torch.tensor(ids, dtype=torch.long)
        special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
        self.ordinary = torch.tensor([i for i in range(len(tok)) if i not in special], dtype=torch.long)
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.numel())

    def _random_tokens(self, n: int) -> torch.Tensor:
        return self.ordinary[torch.randint(len(self.ordinary), (n,), generator=self.gen)]

    def visual(self) -> dict:
        n = self.grid[0] * self.grid[1] * self.grid[2]
        pix = torch.randn(2 * n, self.patch_dim, generator=self.gen)  # two normalised synthetic images
        return {"pixel_values": pix, "image_grid_thw": torch.tensor([self.grid, self.grid], dtype=torch.long)}

    def prompt(self, key: str):
        ids = self.prompt_ids.clone()
        return U.Encoded(key=key, task="image_generation", label=1, input_ids=ids,
                         labels=torch.full_like(ids, U.IGNORE_INDEX), visual=self.visual(),
                         mm_token_type_ids=(ids == self.image_id).long(), prompt_length=len(ids))

    def sft_sample(self, key: str, length: int):
        """Prompt + CoT target (random tokens) + `<|im_end|>` + newline, `length` tokens in all."""
        p = self.prompt(key)
        n_target = length - self.prompt_len - 1 - len(self.newline)
        if n_target < 1:
            raise SystemExit(f"sequence length {length} leaves no room for a target after the "
                             f"{self.prompt_len}-token prompt; raise --seq-len or lower --image-size")
        target = torch.cat([self._random_tokens(n_target), torch.tensor([self.im_end])])
        ids = torch.cat([p.input_ids, target, torch.tensor(self.newline, dtype=torch.long)])
        labels = torch.full_like(ids, U.IGNORE_INDEX)
        labels[self.prompt_len:self.prompt_len + len(target)] = target
        mm = torch.cat([p.mm_token_type_ids, torch.zeros(len(ids) - self.prompt_len, dtype=torch.long)])
        return U.Encoded(key=key, task=p.task, label=1, input_ids=ids, labels=labels, visual=p.visual,
                         mm_token_type_ids=mm, prompt_length=self.prompt_len)

    def completion(self, prompt, n: int, index: int):
        """prompt + n completion tokens ending in EOS, labelled as `urt.rl.logprobs.completion_sequence`."""
        comp = torch.cat([self._random_tokens(n - 1), torch.tensor([self.im_end])])
        L = len(prompt)
        return U.Encoded(key=f"{prompt.key}#{index}", task=prompt.task, label=prompt.label,
                         input_ids=torch.cat([prompt.input_ids, comp]),
                         labels=torch.cat([torch.full((L,), U.IGNORE_INDEX, dtype=torch.long), comp]),
                         visual=prompt.visual,
                         mm_token_type_ids=torch.cat([prompt.mm_token_type_ids, torch.zeros(n, dtype=torch.long)]),
                         prompt_length=L)


def sft_batch(b: Builder, seq_len: int, batch_tokens: int, rng: random.Random) -> list:
    """Samples of lengths drawn uniformly from [max(prompt+16, seq_len/2), seq_len] until batch_tokens."""
    lo = min(seq_len, max(b.prompt_len + 16, seq_len // 2))
    out, total = [], 0
    while True:
        n = rng.randint(lo, seq_len)
        if total + n > batch_tokens:
            rest = batch_tokens - total
            if rest >= b.prompt_len + 16:
                out.append(b.sft_sample(f"sft-{len(out)}", rest))
            break
        out.append(b.sft_sample(f"sft-{len(out)}", n))
        total += n
    if not out:
        raise SystemExit(f"--batch-tokens {batch_tokens} holds no sample of >= {lo} tokens")
    return out


def grpo_batch(b: Builder, seq_len: int, batch_tokens: int, group: int, rng: random.Random) -> list:
    """Whole groups of `group` completions of one prompt (lengths uniform in [1/4, 1] of the room
    seq_len - prompt leaves) while they fit into batch_tokens."""
    room = seq_len - b.prompt_len
    if room < 8:
        raise SystemExit(f"--seq-len {seq_len} leaves no room for completions after the {b.prompt_len}-token prompt")
    out, total, g = [], 0, 0
    while True:
        lens = [rng.randint(max(4, room // 4), room) for _ in range(group)]
        if total + sum(lens) + group * b.prompt_len > batch_tokens:
            break
        prompt = b.prompt(f"prompt-{g}")
        out += [b.completion(prompt, n, i) for i, n in enumerate(lens)]
        total += sum(lens) + group * b.prompt_len
        g += 1
    if not out:
        raise SystemExit(f"--batch-tokens {batch_tokens} holds no group of {group} sequences of up to {seq_len} tokens")
    return out


# ------------------------------------------------------------------------------------------- forward

def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: positions whose next label is supervised (as `urt.data.encode.supervised_mask`)."""
    nxt = labels[:, 1:] != U.IGNORE_INDEX
    return torch.cat([nxt, torch.zeros_like(nxt[:, :1])], dim=1)


def to_device(batch: dict, device, dtype) -> dict:
    return {k: (v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
                if torch.is_tensor(v) else v) for k, v in batch.items()}


def selected_logits(model, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
    """Logits of the `keep` positions only ((K, V)): the decoder once, then lm_head on the kept rows, as
    urt's SFT and GRPO stages do with `logits_to_keep=<bool mask>` (spelled out here so that it does not
    depend on the transformers version's logits_to_keep handling)."""
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    return model.lm_head(hidden[keep])


@dataclass
class Prepared:
    inputs: dict
    labels: torch.Tensor
    keep: torch.Tensor
    targets: torch.Tensor
    seq_lens: list
    grids: list
    supervised: int
    label_counts: list  # supervised labels per sequence, in order (the packed row's per-sample split)
    comp_rows: torch.Tensor | None = None  # GRPO: (N, Tc) completion labels, IGNORE_INDEX padded


def prepare(collate, seqs, device, dtype, *, completions: bool = False) -> Prepared:
    batch = collate(seqs)
    inputs = to_device(U.model_inputs(batch), device, dtype)
    labels = batch["labels"].to(device)
    keep = supervised_mask(labels)
    grids = [tuple(int(x) for x in g) for g in batch["image_grid_thw"].tolist()]
    counts = [int((s.labels[1:] != U.IGNORE_INDEX).sum()) for s in seqs]
    comp = None
    if completions:
        comp = pad_rows([s.labels[s.prompt_length:] for s in seqs], value=U.IGNORE_INDEX).to(device)
    p = Prepared(inputs, labels, keep, labels[:, 1:][keep[:, :-1]], list(batch["seq_lens"]), grids,
                 int(keep.sum()), counts, comp)
    if sum(counts) != p.supervised:
        raise SystemExit(f"supervised positions {p.supervised} != per-sequence label counts {sum(counts)}")
    return p


def drop_input_grad_hooks(model) -> None:
    """Undo `enable_input_require_grads`, which transformers' activation checkpointing calls: it hooks the
    input embeddings of every sub-model, the vision tower's patch_embed included, so that a frozen vision
    tower still records its autograd graph and is recomputed and back-propagated (input gradients only)
    every step. Nothing here needs the hooks: the LM embedding is trainable, so the decoder's checkpointed
    inputs require grad anyway, and a frozen tower needs no backward."""
    hooks = list(getattr(model, "_require_grads_hooks", None) or [])
    if getattr(model, "_require_grads_hook", None) is not None and model._require_grads_hook not in hooks:
        hooks.append(model._require_grads_hook)
    for h in hooks:
        h.remove()
    model._require_grads_hooks = []
    if hasattr(model, "_require_grads_hook"):
        del model._require_grads_hook


def autocast_ctx(device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sft_step(model, opt, params, p: Prepared, ctx) -> float:
    with ctx:
        logits = selected_logits(model, p.inputs, p.keep)
    loss = F.cross_entropy(logits.float(), p.targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _per_seq_logp(model, p: Prepared, ctx) -> list:
    with ctx:
        logits = selected_logits(model, p.inputs, p.keep)
    logp = logits.float().log_softmax(-1).gather(-1, p.targets[:, None]).squeeze(-1)
    return list(logp.split(p.label_counts))  # as urt.rl.logprobs.sequence_logprobs


def pad_rows(rows, value=0.0) -> torch.Tensor:
    width = max(int(r.shape[0]) for r in rows)
    return torch.stack([F.pad(r, (0, width - int(r.shape[0])), value=value) for r in rows])


def grpo_update(model, ref_model, opt, params, p: Prepared, advantages, eos_id: int, ctx) -> float:
    with torch.no_grad():
        ref = pad_rows(_per_seq_logp(ref_model, p, ctx))
    logp = pad_rows(_per_seq_logp(model, p, ctx))
    comp = p.comp_rows
    mask = U.completion_mask(comp, eos_id) * (comp != U.IGNORE_INDEX)
    loss, _ = U.policy_loss(logp, advantages, mask, ref_logp=ref, beta=0.04, kl_estimator="k3",
                            aggregation="paper")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


# ------------------------------------------------------------------------------------------- timing

class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        """Seconds of one call of fn (CUDA events on a GPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def profile_step(name: str, step, device, out_dir: str) -> None:
    """Top operators of one step by device and by host time (torch.profiler) into out_dir/<name>_profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    ka = prof.key_averages()
    parts = []
    if device.type == "cuda":
        parts.append(ka.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    parts.append(ka.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=90))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, f"{name}_profile.txt").write_text("\n\n".join(parts))


def run_phase(name, step, timer, warmup: int, steps: int, device, profile_dir: str | None = None) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = [timer.time(step) for _ in range(steps)]
    if profile_dir:
        profile_step(name, step, device, profile_dir)
    out = {"step_time_s": statistics.median(times), "step_time_mean_s": statistics.fmean(times),
           "step_times_s": [round(t, 5) for t in times]}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return out


def matmul_ceiling(device, n: int = 8192, reps: int = 10) -> float | None:
    """Measured bf16 TFLOP/s of one n^3 matmul (context for the spec peak)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    timer = Timer(device)
    t = timer.time(lambda: [a @ b for _ in range(reps)])
    return 2 * n ** 3 * reps / t / 1e12


def fmt_flops(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


@torch.no_grad()
def time_vision(model, p: "Prepared", timer, ctx, reps: int = 2) -> float:
    """Seconds of one vision-tower + merger forward over the batch's images (context for the step time)."""
    run = lambda: model.model.get_image_features(p.inputs["pixel_values"], p.inputs["image_grid_thw"])  # noqa: E731
    with ctx:
        run()
        return statistics.median(timer.time(run) for _ in range(reps))


# ----------------------------------------------------------------------------- packed vs padded check

def set_attn(model, impl: str) -> None:
    """Switch the model's attention; under urt's varlen implementation the vision tower too
    (`urt.models.attention.use_varlen_in_vision`)."""
    if impl == U.attention.VARLEN:
        U.attention.register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # pragma: no cover - older transformers
        for cfg in (model.config, model.config.text_config, model.config.vision_config):
            cfg._attn_implementation = impl
    U.attention.use_varlen_in_vision(model)


def _full_logits(model, collate, seqs, device, dtype, ctx, *, broken: bool = False):
    batch = collate(seqs)
    inputs = to_device(U.model_inputs(batch), device, dtype)
    if broken:  # negative control: one running text position over the packed row -> samples see each other
        pos = inputs["position_ids"].clone()
        pos[0, 0] = torch.arange(pos.shape[-1], device=pos.device)
        inputs["position_ids"] = pos
    with ctx:
        logits = model(**inputs, use_cache=False).logits
    ids = batch["input_ids"].to(device)
    rows = []
    off = 0
    for i, n in enumerate(batch["seq_lens"]):
        if ids.shape[0] == 1:  # packed
            lg, tok = logits[0, off:off + n], ids[0, off:off + n]
            off += n
        else:
            lg, tok = logits[i, :n], ids[i, :n]
        logp = lg[:-1].float().log_softmax(-1).gather(-1, tok[1:, None]).squeeze(-1)
        rows.append((lg.float(), logp))
    return rows


def _max_diff(a, b) -> tuple[float, float]:
    dl = max(float((x[0] - y[0]).abs().max()) for x, y in zip(a, b))
    dp = max(float((x[1] - y[1]).abs().max()) for x, y in zip(a, b))
    return dl, dp


@torch.no_grad()
def packed_vs_padded(model, seqs, impls, device, dtype, ctx, pad_id: int) -> dict:
    packed = U.PackedCollator(FAMILY, model.config, pad_id)
    padded = U.PaddedCollator(pad_id)
    was_training = model.training
    model.eval()
    results: dict = {}
    try:
        for impl in impls:
            if impl == "flash_attention_2" and not (device.type == "cuda" and _module_exists("flash_attn")):
                results[impl] = {"skipped": "flash_attn is not importable" if device.type == "cuda" else "needs CUDA"}
                continue
            if impl == U.attention.VARLEN and not U.attention.varlen_available(device):
                results[impl] = {"skipped": "needs CUDA and a torch with torch.nn.attention.varlen"}
                continue
            set_attn(model, impl)
            ref = _full_logits(model, padded, seqs, device, dtype, ctx)
            got = _full_logits(model, packed, seqs, device, dtype, ctx)
            singles = [r for s in seqs for r in _full_logits(model, padded, [s], device, dtype, ctx)]
            bad = _full_logits(model, packed, seqs, device, dtype, ctx, broken=True)
            dlogit, dlogp = _max_diff(got, ref)
            floor_logit, floor_logp = _max_diff(singles, ref)
            neg_logit, neg_logp = _max_diff(bad, ref)
            scale = max(float(x[0].abs().max()) for x in ref)
            if dtype == torch.float32:
                tol_logit = tol_logp = 1e-4
                rule = "fp32: absolute 1e-4"
            else:
                # bf16 values near x are spaced up to 2^-7 * x apart: 2^-5 * max|logit| is 4 such steps
                tol_logit = 4 * floor_logit + scale * 2 ** -5
                tol_logp = 4 * floor_logp + scale * 2 ** -5
                rule = ("bf16: 4 x noise floor (padded batch vs each sequence alone) + 2^-5 x max|logit| "
                        f"({scale:.3g}; 4 bf16 steps)")
            ok = dlogit <= tol_logit and dlogp <= tol_logp
            sensitive = neg_logit > tol_logit
            results[impl] = {
                "max_abs_dlogit": dlogit, "max_abs_dlogp": dlogp, "tol_logit": tol_logit, "tol_logp": tol_logp,
                "noise_floor_dlogit": floor_logit, "noise_floor_dlogp": floor_logp,
                "negative_control_dlogit": neg_logit, "negative_control_dlogp": neg_logp,
                "max_abs_logit": scale, "tolerance_rule": rule, "sequences": [len(s) for s in seqs],
                "pass": bool(ok and sensitive),
                "reason": "ok" if ok and sensitive else ("packed differs from padded beyond tolerance" if not ok
                                                         else "negative control within tolerance: not sensitive"),
            }
    finally:
        model.train(was_training)
    return results


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--tiny", action="store_true", help="urt's tiny Qwen2.5-VL test config instead of 3B")
    ap.add_argument("--layers", type=int, default=None, help="LM decoder layers (shrink for a quick check)")
    ap.add_argument("--vision-layers", type=int, default=None, help="vision blocks (default: the config's)")
    ap.add_argument("--seq-len", type=int, default=None, help="longest packed sequence (default 2048; tiny 640)")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="tokens in the packed batch (default 16384; tiny 2560)")
    ap.add_argument("--image-size", type=int, default=None, help="square image side in pixels (default 448; tiny 112)")
    ap.add_argument("--group-size", type=int, default=4, help="GRPO completions per prompt (default 4)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per phase (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per phase first (default 2)")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    ap.add_argument("--attn", default="auto", choices=["auto", "flash_attention_2", "urt_varlen", "sdpa"],
                    help="attention for the timed phases (auto, as urt's load_model: flash_attention_2 on CUDA when "
                         "importable, else urt_varlen (torch's own varlen flash kernel) when this torch has it, "
                         "else sdpa)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "bf16-mixed"],
                    help="bf16: bf16 weights and optimizer state; bf16-mixed: fp32 weights + bf16 autocast "
                         "(urt's trainer=gpu); only with --dtype bf16")
    ap.add_argument("--train-vision", action="store_true", help="train the vision tower and projector too")
    ap.add_argument("--hf-input-grads", action="store_true",
                    help="keep the input-embedding require-grad hooks transformers' gradient checkpointing installs "
                         "(the frozen vision tower is then recomputed and back-propagated: what urt's load_model "
                         "does today); by default they are removed")
    ap.add_argument("--compile-regions", action="store_true",
                    help="torch.compile the RMSNorm and MLP modules (urt.models.loading.compile_model_regions)")
    ap.add_argument("--phases", default="check,sft,grpo", help="comma list of check, sft, grpo")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None, help="also write the JSON result here")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after timing, profile one step per phase with torch.profiler into DIR/<phase>_profile.txt")
    return ap.parse_args(argv)


def _p(*a):
    print(*a, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; run with --device cpu --tiny for a logic check")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    precision = args.precision if dtype == torch.bfloat16 else "fp32"
    seq_len = args.seq_len or (640 if args.tiny else 2048)
    batch_tokens = args.batch_tokens or (2560 if args.tiny else 16384)
    image_size = args.image_size or (112 if args.tiny else 448)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    grad_ckpt = not args.no_grad_ckpt
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tok = U.load_tiny_tokenizer(FAMILY)
    cfg = model_config(tok, tiny=args.tiny, layers=args.layers, vision_layers=args.vision_layers)
    attn = U.choose_attn_implementation(args.attn, device)
    lm, vis = LMDims.from_config(cfg.text_config), VisionDims.from_config(cfg.vision_config)
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = int(tok.pad_token_id)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops if args.peak_tflops else (peak_tflops_for(device_name) if device.type == "cuda" else None)
    peak_source = "--peak-tflops" if args.peak_tflops else ("table" if peak else "unknown")
    ckpt_note = " (frozen vision tower back-propagated: --hf-input-grads)" if args.hf_input_grads and grad_ckpt else ""
    _p(f"device {device_name} | dtype {str(dtype).replace('torch.', '')} ({precision}) | attention {attn} | "
       f"grad ckpt {'on' if grad_ckpt else 'off'}{ckpt_note} | peak bf16 {peak or '?'} TFLOP/s ({peak_source})")
    varlen = U.attention.varlen_kernel()
    varlen_sig = str(inspect.signature(varlen)) if varlen is not None else None
    _p(f"torch {torch.__version__} | transformers {transformers.__version__} | torch varlen_attn "
       f"{'available' if varlen is not None else 'missing'}")

    # --- model, directly on the device
    t0 = time.perf_counter()
    init_dtype = torch.float32 if precision in ("bf16-mixed", "fp32") else torch.bfloat16
    with torch.device(device):
        try:
            model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
                cfg, dtype=init_dtype, attn_implementation=attn)
        except TypeError:  # pragma: no cover - transformers without the `dtype` keyword
            model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
                cfg, torch_dtype=init_dtype, attn_implementation=attn)
    U.attention.use_varlen_in_vision(model)
    check_flop_model(model, lm, vis)
    compiled = U.compile_regions(model) if args.compile_regions else []
    if compiled:
        _p(f"compiled {len(compiled)} RMSNorm / MLP modules (torch.compile, dynamic shapes)")
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    for p in model.model.visual.parameters():
        p.requires_grad_(bool(args.train_vision))
    if grad_ckpt:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vision_backward = grad_ckpt and bool(args.hf_input_grads) and not args.train_vision
    if grad_ckpt and not args.hf_input_grads:
        drop_input_grad_hooks(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                            **({"fused": True} if fused else {}))
    if device.type == "cuda":
        torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    _p(f"model: {n_params / 1e9:.3f}B parameters ({n_vis / 1e9:.3f}B vision), tied embeddings {tied}, "
       f"{sum(p.numel() for p in params) / 1e9:.3f}B trainable; LM {lm.layers} layers, vision {vis.depth} blocks; "
       f"init {init_s:.1f}s")
    ctx = autocast_ctx(device, precision)
    result: dict = {
        "device": str(device), "device_name": device_name, "torch": torch.__version__,
        "transformers": transformers.__version__, "attn_implementation": attn, "varlen_attn_signature": varlen_sig,
        "dtype": str(dtype).replace("torch.", ""), "precision": precision, "grad_ckpt": grad_ckpt,
        "vision_backward": vision_backward or bool(args.train_vision), "train_vision": bool(args.train_vision),
        "tiny": bool(args.tiny), "compiled_modules": len(compiled),
        "model": {"params": n_params, "vision_params": n_vis, "trainable_params": sum(p.numel() for p in params),
                  "tied_embeddings": tied, "lm": asdict(lm),
                  "vision": {**asdict(vis), "full_blocks": list(vis.full_blocks)}},
        "seq_len": seq_len, "batch_tokens": batch_tokens, "image_size": image_size,
        "peak_tflops": peak, "peak_source": peak_source, "targets_mfu": TARGETS, "init_s": round(init_s, 2),
    }
    result["matmul_ceiling_tflops"] = matmul_ceiling(device) if phases & {"sft", "grpo"} else None
    if result["matmul_ceiling_tflops"]:
        _p(f"measured 8192^3 bf16 matmul: {result['matmul_ceiling_tflops']:.0f} TFLOP/s")

    builder = Builder(tok, cfg, image_size, seed=args.seed)
    rng = random.Random(args.seed)
    packed = U.PackedCollator(FAMILY, model.config, pad_id)
    timer = Timer(device)
    vis_mult = 3 if args.train_vision else 1

    def summarise(name, timing, flops_model, flops_hw, tokens, extra):
        t = timing["step_time_s"]
        out = {**timing, **extra, "tokens": tokens, "tokens_per_s": tokens / t,
               "model_flops_per_step": flops_model, "hardware_flops_per_step": flops_hw,
               "tflops": flops_model / t / 1e12, "hw_tflops": flops_hw / t / 1e12}
        out["mfu"] = out["tflops"] / peak if peak else None
        out["hfu"] = out["hw_tflops"] / peak if peak else None
        out["target"] = TARGETS[name]
        out["meets_target"] = None if out["mfu"] is None else out["mfu"] >= TARGETS[name]
        return out

    def recompute_flops(seq_lens):
        if not grad_ckpt:
            return 0
        f = lm_forward_flops(lm, seq_lens, 0)
        return f["decoder_matmul"] + f["attention"]

    # --- packed vs padded
    if "check" in phases:
        seqs = sft_batch(builder, min(seq_len, 1536), 3 * min(seq_len, 1536), random.Random(args.seed + 1))[:3]
        impls = ["flash_attention_2", U.attention.VARLEN, "sdpa"]
        t0 = time.perf_counter()
        check = packed_vs_padded(model, seqs, impls, device, dtype, ctx, pad_id)
        set_attn(model, attn)
        result["check"] = check
        ran = [v for v in check.values() if "pass" in v]
        result["check_pass"] = bool(ran) and all(v["pass"] for v in ran)
        _p(f"\npacked vs padded ({len(seqs)} sequences {[len(s) for s in seqs]}, {time.perf_counter() - t0:.1f}s):")
        for impl, r in check.items():
            if "skipped" in r:
                _p(f"  {impl:18s} skipped: {r['skipped']}")
                continue
            _p(f"  {impl:18s} {'PASS' if r['pass'] else 'FAIL'}  max|dlogit| {r['max_abs_dlogit']:.3g} (tol "
               f"{r['tol_logit']:.3g})  max|dlogp| {r['max_abs_dlogp']:.3g} (tol {r['tol_logp']:.3g})  "
               f"noise floor {r['noise_floor_dlogit']:.3g}  negative control {r['negative_control_dlogit']:.3g}")
            _p(f"  {'':18s} tolerance: {r['tolerance_rule']}; {r['reason']}")

    # --- SFT step
    if "sft" in phases:
        seqs = sft_batch(builder, seq_len, batch_tokens, rng)
        p = prepare(packed, seqs, device, dtype)
        f_lm = lm_forward_flops(lm, p.seq_lens, p.supervised)
        f_vis = vision_forward_flops(vis, p.grids)
        flops = 3 * f_lm["total"] + vis_mult * f_vis["total"]
        try:
            timing = run_phase("sft", lambda: sft_step(model, opt, params, p, ctx), timer, args.warmup, args.steps,
                               device, args.profile)
            result["sft"] = summarise("sft", timing, flops, flops + recompute_flops(p.seq_lens), sum(p.seq_lens), {
                "sequences": len(seqs), "images": len(p.grids), "supervised_tokens": p.supervised,
                "vision_forward_s": time_vision(model, p, timer, ctx),
                "flops": {"lm_forward": f_lm, "vision_forward": f_vis}})
        except torch.cuda.OutOfMemoryError as err:
            result["sft"] = {"error": f"CUDA out of memory: {str(err).splitlines()[0]}"}
        del p
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # --- GRPO update
    if "grpo" in phases:
        G = args.group_size
        seqs = grpo_batch(builder, seq_len, batch_tokens, G, rng)
        p = prepare(packed, seqs, device, dtype, completions=True)
        gen = torch.Generator().manual_seed(args.seed)
        rewards = torch.randint(0, 3, (len(seqs),), generator=gen).float()
        adv = U.group_advantages(rewards, G, "paper").to(device)
        ref_model = copy.deepcopy(model)
        ref_model.requires_grad_(False)
        ref_model.eval()
        if grad_ckpt:
            (getattr(ref_model, "activation_checkpointing_disable", None) or ref_model.gradient_checkpointing_disable)()
        f_lm = lm_forward_flops(lm, p.seq_lens, p.supervised)
        f_vis = vision_forward_flops(vis, p.grids)
        flops = (f_lm["total"] + f_vis["total"]) + (3 * f_lm["total"] + vis_mult * f_vis["total"])
        try:
            timing = run_phase("grpo", lambda: grpo_update(model, ref_model, opt, params, p, adv, eos_id, ctx), timer,
                               args.warmup, args.steps, device, args.profile)
            result["grpo"] = summarise("grpo", timing, flops, flops + recompute_flops(p.seq_lens), sum(p.seq_lens), {
                "sequences": len(seqs), "groups": len(seqs) // G, "group_size": G, "images": len(p.grids),
                "completion_tokens": p.supervised,
                "flops": {"lm_forward": f_lm, "vision_forward": f_vis}})
        except torch.cuda.OutOfMemoryError as err:
            result["grpo"] = {"error": f"CUDA out of memory: {str(err).splitlines()[0]}"}
        del ref_model, p

    # --- report
    _p("")
    _p(f"{'phase':6s} {'seqs':>5s} {'tokens':>7s} {'step ms':>9s} {'tokens/s':>10s} {'model FLOP':>11s} "
       f"{'TFLOP/s':>8s} {'MFU':>7s} {'HFU':>7s} {'target':>7s} {'mem GiB':>8s}")
    for name in ("sft", "grpo"):
        r = result.get(name)
        if r is None:
            continue
        if "error" in r:
            _p(f"{name:6s} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        hfu = f"{100 * r['hfu']:.1f}%" if r["hfu"] is not None else "n/a"
        _p(f"{name:6s} {r['sequences']:5d} {r['tokens']:7d} {1e3 * r['step_time_s']:9.1f} {r['tokens_per_s']:10.0f} "
           f"{fmt_flops(r['model_flops_per_step']):>11s} {r['tflops']:8.1f} {mfu:>7s} {hfu:>7s} "
           f"{100 * r['target']:6.0f}% {r.get('peak_mem_gib', float('nan')):8.1f}")
    if isinstance(result.get("sft"), dict) and "vision_forward_s" in result["sft"]:
        r = result["sft"]
        _p(f"(SFT batch: {r['images']} images, vision tower forward alone {1e3 * r['vision_forward_s']:.1f} ms = "
           f"{100 * r['vision_forward_s'] / r['step_time_s']:.0f}% of the step)")
    _p("MFU: model FLOPs (6N per token + per-sequence causal attention + lm_head on used positions; frozen vision "
       "forward-only; grad-ckpt recompute excluded) / step time / peak; HFU adds the recompute.")
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
