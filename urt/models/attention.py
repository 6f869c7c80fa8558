"""Padding-free attention on torch's own flash kernel, for CUDA machines without the flash-attn package.

`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10) runs FlashAttention-2 over variable-length
sequences given by cumulative lengths, exactly what a packed batch needs. Without it, transformers attends
over a packed row with sdpa through a dense (sum of lengths)^2 block-diagonal mask, which falls off the flash
backend and does ~T/L times the attention work (the measured MFU of both: docs/performance.md §MFU on H100
and H200).

`VARLEN` ("urt_varlen") is registered as a transformers attention implementation (`register()`, which
`urt.models.loading.choose_attn_implementation` calls whenever it returns this name), so
`load_model(..., attn_implementation="auto")` picks it on CUDA when flash-attn is missing and torch has the
kernel. The attention function takes the varlen kernel when the call is
padding-free self-attention (no mask, as many queries as keys: training forwards, packed or not, and
unpadded prefills) and hands every other call (padding masks, decoding with a cache) to transformers' sdpa
function unchanged, so results there are sdpa's. Under autocast (bf16-mixed training) the kernel runs in
autocast's dtype, as sdpa would. Where the kernel cannot run (CPU, plain fp32, dropout) the sequences go to
sdpa stacked by length, one call per distinct length (`_grouped_sdpa`), so `VARLEN` is exact on every device.

Sequence boundaries, in order of preference:

* `cu_seq_lens_q` / `cu_seq_lens_k` keyword arguments (what Qwen vision towers pass on their flash path);
* the text `position_ids` transformers hands each attention layer (the packed rule of `urt.data.collate`:
  positions restart at 0 per sample; a boundary wherever a position is not its predecessor + 1, as
  transformers' own packed-sequence detection);
* otherwise each row of the batch is one sequence.

The vision towers of the Qwen families use the variable-length path only under an attn implementation
whose name contains "flash"; otherwise they loop over windows with one sdpa call each, which is
launch-bound. `use_varlen_in_vision` points the vision sub-config at `VISION_VARLEN`, the same function
under a "flash" name, set on the config directly (transformers' setter would try to import flash-attn
kernels for a "flash" name). `load_model` does this under `VARLEN`, and under sdpa for the Qwen towers, whose
windows then share sdpa calls where the kernel cannot run.
"""

from __future__ import annotations

import inspect
import logging
import math

import torch

log = logging.getLogger(__name__)

VARLEN = "urt_varlen"
VISION_VARLEN = "urt_flash_varlen_vision"


def varlen_kernel():
    """torch's `varlen_attn`, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_available(device) -> bool:
    """Whether `VARLEN` can run its kernel on `device` (a CUDA device and a torch that has varlen_attn)."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    return dev.type == "cuda" and varlen_kernel() is not None


def _kernel_options() -> dict:
    """How this torch's varlen_attn spells causality, scale and GQA. Its signature changed between
    releases: 2.10 `is_causal`; 2.11 `window_size=(-1, 0)` and `scale`, and fewer key/value heads than query
    heads are taken natively (measured on an H200: outputs and key/value gradients equal to expanded heads,
    9% faster); later releases add an explicit `enable_gqa`. `gqa` says whether unexpanded heads may be
    passed (2.10 gets them expanded)."""
    fn = varlen_kernel()
    params = inspect.signature(fn).parameters if fn is not None else {}
    return {"is_causal": "is_causal" in params, "window_size": "window_size" in params,
            "scale": "scale" in params, "enable_gqa": "enable_gqa" in params,
            "gqa": "enable_gqa" in params or "window_size" in params}


_OPTIONS: dict | None = None


def _options() -> dict:
    global _OPTIONS
    if _OPTIONS is None:
        _OPTIONS = _kernel_options()
    return _OPTIONS


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative lengths as int32, longest length) of the sequences in a (B, T) position tensor read
    row-major: a sequence starts at every row start and wherever a position is not its predecessor + 1."""
    pos = position_ids.reshape(position_ids.shape[0], -1)
    b, t = pos.shape
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    cu = torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


class _Boundaries:
    """Boundaries of the last position tensor seen: every decoder layer of one forward gets the same
    tensor object, so the host sync of the longest length happens once per forward, not once per layer.
    The tensor is held (so its identity cannot be reused by a new one) and its version checked."""

    def __init__(self):
        self.tensor = None
        self.version = None
        self.value = None

    def __call__(self, position_ids: torch.Tensor):
        if position_ids.is_inference():  # no version counter (generate runs under inference_mode): not cached
            return cu_seqlens_from_positions(position_ids)
        if self.tensor is not position_ids or self.version != position_ids._version:
            self.value = cu_seqlens_from_positions(position_ids)
            self.tensor, self.version = position_ids, position_ids._version
        return self.value


# The sample boundaries of a packed row, computed once per forward and shared by every layer (and urt.models.hybrid).
packed_boundaries = _Boundaries()


HALF = (torch.float16, torch.bfloat16)


def kernel_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The half dtype the kernel runs these queries in: their own, or under autocast (bf16-mixed training:
    fp32 weights, and RoPE's fp32 cos/sin promote q and k to fp32) autocast's, as sdpa would; None for plain
    fp32 (the kernel has no fp32 path)."""
    if query.dtype in HALF:
        return query.dtype
    kind = query.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in HALF:
        return torch.get_autocast_dtype(kind)
    return None


_WARNED_FP32 = False


def _kernel_for(query: torch.Tensor):
    """The varlen kernel for these queries, or None (it runs on CUDA, in half precision or under autocast)."""
    global _WARNED_FP32
    if not query.is_cuda:
        return None
    if kernel_dtype(query) is None:
        if not _WARNED_FP32:
            _WARNED_FP32 = True
            log.warning("urt_varlen: fp32 attention on CUDA has no varlen kernel; packed rows run sdpa with a dense "
                        "block-diagonal mask (slow). Train in bf16 or bf16-mixed.")
        return None
    return varlen_kernel()


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _boundaries(query: torch.Tensor, b: int, t: int, kwargs: dict) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 on the query's device, longest) over the flattened (b * t) tokens."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu = cu.to(device=query.device, dtype=torch.int32)
        longest = kwargs.get("max_length_q")
        return cu, int(longest) if longest is not None else int((cu[1:] - cu[:-1]).max().item())
    positions = kwargs.get("position_ids")
    if positions is not None and positions.shape[-1] == t:
        cu, longest = packed_boundaries(positions)
        return cu.to(query.device), longest
    return torch.arange(0, (b + 1) * t, t, device=query.device, dtype=torch.int32), t


def _grouped_sdpa(module, query, key, value, cu: torch.Tensor, causal: bool, **kwargs):
    """Attention within each sequence of the flattened (b * t) tokens without the varlen kernel: sequences of
    equal length are stacked into one sdpa batch, one sdpa call per distinct length. A vision tower's windows
    (a handful of lengths) then take a few calls per block instead of one per window, and nothing attends
    through a dense (b * t)^2 block-diagonal mask. Exact: each sequence sees only itself, as in the kernel."""
    b, hq, t, d = query.shape
    flat = [x.transpose(0, 1).reshape(x.shape[1], b * t, d) for x in (query, key, value)]  # (H, b*t, D)
    starts, lengths = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    starts, lengths = starts[lengths > 0], lengths[lengths > 0]  # an empty window attends to nothing
    distinct = torch.unique(lengths)
    if distinct.numel() == 1:  # one length: the sequences tile the tokens, a view stacks them
        n, length = lengths.numel(), int(distinct)
        q, k, v = (x.view(x.shape[0], n, length, d).transpose(0, 1) for x in flat)
        out, _ = _sdpa(module, q, k, v, None, is_causal=causal, **kwargs)  # (n, length, Hq, D)
        return out.reshape(b, t, hq, d), None
    pieces, order = [], []
    for length in distinct.tolist():
        idx = starts[lengths == length][:, None] + torch.arange(length, device=cu.device)  # (n, length)
        q, k, v = (x[:, idx].transpose(0, 1) for x in flat)  # (n, H, length, D)
        out, _ = _sdpa(module, q, k, v, None, is_causal=causal, **kwargs)
        pieces.append(out.reshape(-1, hq, d))
        order.append(idx.reshape(-1))
    out = torch.cat(pieces)[torch.argsort(torch.cat(order))]
    return out.reshape(b, t, hq, d), None


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention interface: query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D) -> ((B, Tq, Hq, D),
    None). See the module docstring for when the varlen kernel runs."""
    b, hq, tq, d = query.shape
    tk, hkv = key.shape[2], key.shape[1]
    if attention_mask is not None or tq != tk:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    cu, max_len = _boundaries(query, b, tq, kwargs)
    kernel = _kernel_for(query)
    if kernel is None or (dropout and module.training):
        # no mask came from transformers (`_varlen_mask`): sequences within a row need an explicit one here
        if cu.numel() - 1 == b:
            return _sdpa(module, query, key, value, None, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, **kwargs)
        return _grouped_sdpa(module, query, key, value, cu, causal, dropout=dropout, scaling=scaling, **kwargs)
    dtype = kernel_dtype(query) or query.dtype
    q = query.transpose(1, 2).reshape(b * tq, hq, d).to(dtype)
    k = key.transpose(1, 2).reshape(b * tk, hkv, d).to(dtype)
    v = value.transpose(1, 2).reshape(b * tk, hkv, d).to(dtype)
    opts = _options()
    call = {}
    if hkv != hq:
        if opts["enable_gqa"]:
            call["enable_gqa"] = True
        elif not opts["gqa"]:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
    if scaling is not None and not math.isclose(scaling, d ** -0.5):
        if opts["scale"]:
            call["scale"] = scaling
        else:
            q = q * (scaling * math.sqrt(d))
    if causal:
        if opts["window_size"]:
            call["window_size"] = (-1, 0)
        else:
            call["is_causal"] = True
    out = kernel(q, k, v, cu, cu, max_len, max_len, **call)
    return out.reshape(b, tq, hq, d), None


def _varlen_mask(*args, **kwargs):
    """Mask for `VARLEN` layers: None for padding-free self-attention (the varlen kernel needs no mask and a
    dense packed mask would cost (sum of lengths)^2 memory), sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    try:
        bound = inspect.signature(sdpa_mask).bind(*args, **kwargs).arguments
    except TypeError:  # a transformers whose sdpa_mask takes other arguments: the keywords given decide
        bound = kwargs
    q_len = bound.get("q_length")
    if q_len is None and bound.get("cache_position") is not None:
        q_len = bound["cache_position"].shape[0]
    offsets = (bound.get("q_offset", 0) or 0, bound.get("kv_offset", 0) or 0)
    if bound.get("attention_mask") is None and q_len == bound.get("kv_length") and offsets == (0, 0):
        return None
    return sdpa_mask(*args, **kwargs)


_REGISTERED = False


def register() -> None:
    """Make `VARLEN` and `VISION_VARLEN` known to transformers (attention function and mask)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name in (VARLEN, VISION_VARLEN):
        AttentionInterface.register(name, varlen_attention_forward)
        AttentionMaskInterface.register(name, _varlen_mask)
    _REGISTERED = True


def use_varlen_in_vision(model) -> bool:
    """Point a Qwen vision tower at `VISION_VARLEN` so it runs one varlen call per block instead of one
    sdpa call per window (under `VARLEN`, or under sdpa for the Qwen towers: where the kernel cannot run,
    windows of one length share an sdpa call, `_grouped_sdpa`). Returns whether a vision sub-config was
    switched."""
    cfg = getattr(model, "config", None)
    vision_cfg = getattr(cfg, "vision_config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    windowed = str(getattr(vision_cfg, "model_type", "")).startswith("qwen")
    if vision_cfg is None or not (impl == VARLEN or (impl == "sdpa" and windowed)):
        return False
    register()
    # the config's own setter, not the model's set_attn_implementation: that one would look for flash-attn
    # kernels because of the "flash" in the name
    vision_cfg._attn_implementation = VISION_VARLEN
    return True
