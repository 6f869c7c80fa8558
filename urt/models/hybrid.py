"""Qwen3.5's hybrid decoder (gated-DeltaNet linear-attention layers interleaved with full attention):
exact packing, and a cache whose linear-attention states can be selected and repeated per row.

A linear-attention layer carries state along its row: a short causal convolution (the last
`linear_conv_kernel_dim` - 1 inputs) and the gated delta rule's recurrent matrix. transformers' packed
forward (restarting `position_ids`, no attention_mask) isolates the samples of a packed row in the
full-attention layers only; in the linear-attention layers sample k+1 would start from sample k's state
(max |Δlogit| 0.17 on the tiny model). `isolate_packed_samples(model)` hooks every linear-attention
decoder layer so each packed sample starts from a zero state:

* with flash-linear-attention and causal-conv1d installed and the row on CUDA, their variable-length
  paths get the boundaries: `cu_seq_lens_q` (which transformers hands the chunked delta rule as
  `cu_seqlens`) and `seq_idx` (causal_conv1d_fn's per-token sequence index);
* otherwise (CPU, or the torch fallback, which refuses boundaries) the layer runs on the samples laid out
  as a right-padded batch, one row per sample, and its output is gathered back into the packed row. Each
  sample then sees exactly what its own forward sees: its tokens from a zero state, at the same chunk
  offsets; padding comes after every real token, so it cannot reach them.

The boundaries are read where the model reads them for its full-attention layers: the text row of the
position ids each decoder layer gets (a sample starts wherever a position is not its predecessor + 1,
`urt.models.attention.cu_seqlens_from_positions`, computed once per forward). Forwards with an attention
mask, decode steps and rows whose positions do not restart are left as they are (padded batches,
generation, shared prompts); a packed row with a cache is refused (the cache would hold one packed row's
state). `urt.models.load_model` installs the hooks on every model it loads (and
`urt.data.collate.make_collator("packed", bundle)` on one built elsewhere); a model fed packed rows without
them leaks state from sample to sample.

`hybrid_cache(model)` is transformers' DynamicCache for the model with every linear-attention layer a
`LinearStateLayer`: its states can be selected per row (`batch_select_indices`: GRPO's shared prompts) and
repeated (`batch_repeat_interleave`: the shared prefill of rollouts), as the key/value layers' can, and a
multi-token update replaces the states instead of writing into them, so gradients flow back through a
selected state into the prompt pass that made it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionLayer

from urt.errors import UrtError
from urt.models.attention import packed_boundaries

_HOOKED = "_urt_isolates_packed_samples"


def linear_attention_layers(model) -> list:
    """The decoder layers of `model` (any wrapper: peft, Lightning) whose token mixer is linear attention."""
    return [m for m in model.modules() if getattr(m, "block_type", None) == "linear_attention"
            and hasattr(m, "linear_attn")]


def is_hybrid(model) -> bool:
    return bool(linear_attention_layers(model))


@functools.lru_cache(maxsize=1)
def _kernel_packages() -> bool:
    """flash-linear-attention and causal-conv1d both importable (what transformers picks up at import)."""
    return importlib.util.find_spec("fla") is not None and importlib.util.find_spec("causal_conv1d") is not None


def _varlen_kernels(hidden: torch.Tensor) -> bool:
    """Whether this packed row can go to the variable-length kernels: on CUDA, with both packages present
    (transformers' torch fallbacks raise when given boundaries)."""
    return hidden.is_cuda and _kernel_packages()


def _text_positions(kwargs: dict) -> torch.Tensor | None:
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.ndim == 3 and pos.shape[0] == 4:  # text row + mRoPE rows
        pos = pos[0]
    return pos if isinstance(pos, torch.Tensor) and pos.ndim == 2 else None


def _cache_in_use(kwargs: dict) -> bool:
    return any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "cache_params"))


def _before(layer, args, kwargs):
    """Decoder-layer pre-hook: a packed row's samples get zero linear-attention states (module docstring)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    pos = _text_positions(kwargs)
    layer.__dict__.pop("_urt_unpack", None)
    if (hidden is None or pos is None or kwargs.get("attention_mask") is not None or hidden.shape[1] < 2
            or pos.shape[-1] != hidden.shape[1]):  # decode steps, padded batches: nothing packed
        return None
    b, t = pos.shape
    cu, longest = packed_boundaries(pos)  # every layer of a forward gets the same tensor: one host sync per forward
    n = cu.numel() - 1
    if n == b:  # every row is one sequence: nothing to isolate
        return None
    if _cache_in_use(kwargs):
        raise UrtError("a packed row (position ids restarting within a row) cannot run with a cache: the hybrid "
                       "model's linear-attention state would be one packed row's; run packed batches with "
                       "use_cache=False")
    cu = cu.to(hidden.device)
    if b == 1 and _varlen_kernels(hidden):
        lengths = (cu[1:] - cu[:-1]).long()
        seq_idx = torch.repeat_interleave(torch.arange(n, device=hidden.device, dtype=torch.int32), lengths)
        return args, dict(kwargs, cu_seq_lens_q=cu.long(), seq_idx=seq_idx[None])
    # one right-padded row per sample: flat token k of sample j sits at (j, k - start_j)
    starts, lengths = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    col = torch.arange(longest, device=hidden.device)
    valid = col[None, :] < lengths[:, None]  # (n, longest)
    flat = (starts[:, None] + col[None, :])[valid]  # the packed token of each valid slot, in packed order
    rows = hidden.new_zeros(n, longest, hidden.shape[-1])
    rows[valid] = hidden.reshape(b * t, -1)[flat]
    layer.__dict__["_urt_unpack"] = (valid, b, t)
    args = (rows, *args[1:]) if args else args
    kwargs = dict(kwargs) if args else dict(kwargs, hidden_states=rows)
    # position ids and rotary embeddings are unused by a linear-attention layer; the mask stays None
    return args, kwargs


def _after(layer, args, kwargs, output):
    """Decoder-layer forward hook: the per-sample rows back into the packed row."""
    unpack = layer.__dict__.pop("_urt_unpack", None)
    if unpack is None:
        return None
    valid, b, t = unpack
    out = output[0] if isinstance(output, tuple) else output
    packed = out[valid].reshape(b, t, out.shape[-1])  # valid slots in row-major order are the packed order
    return (packed, *output[1:]) if isinstance(output, tuple) else packed


def isolate_packed_samples(model) -> int:
    """Hook every linear-attention decoder layer of `model` so packed samples start from zero states
    (module docstring). Idempotent; a deep copy keeps the hooks. Returns the number of hooked layers."""
    layers = linear_attention_layers(model)
    for layer in layers:
        if not getattr(layer, _HOOKED, False):
            layer.register_forward_pre_hook(_before, with_kwargs=True)
            layer.register_forward_hook(_after, with_kwargs=True)
            setattr(layer, _HOOKED, True)
    return len(layers)


# ------------------------------------------------------------------------------------------ cache


class LinearStateLayer(LinearAttentionLayer):
    """transformers' LinearAttentionLayer with per-row selection and repetition of its convolution and
    recurrent states (what `DynamicLayer.batch_select_indices` / `batch_repeat_interleave` do to keys and
    values). Multi-token updates assign new state tensors instead of copying into the old ones: the old
    ones may be saved for backward (the chunked delta rule multiplies by its initial state), and a view of
    the whole input is not kept. Single-token decode steps still update the convolution window in place
    (transformers' causal_conv1d_update), outside autograd."""

    def _each(self, fn) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = fn(self.conv_states[i])
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each(lambda s: s[indices.to(s.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each(lambda s: s.repeat_interleave(repeats, dim=0))

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None,
                          **kwargs) -> torch.Tensor:
        if self.record_past:  # speculative decoding's rollback: transformers' own bookkeeping
            return super().update_conv_state(conv_states, state_idx, conv_kernel_size, **kwargs)
        if not self.is_conv_states_initialized[state_idx]:
            self.lazy_initialization(conv_states=conv_states, state_idx=state_idx, conv_kernel_size=conv_kernel_size)
        k = self.conv_kernel_size[state_idx]
        if self.has_previous_state[state_idx]:
            full = torch.cat([self.conv_states[state_idx], conv_states], dim=-1)
        else:  # prefill: zeros before the first token, as the causal convolution's own padding
            full = torch.nn.functional.pad(conv_states, (max(0, k - conv_states.shape[-1]), 0))
            self.has_previous_state[state_idx] = True
        self.conv_states[state_idx] = full[..., -k:].clone(memory_format=torch.contiguous_format)
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        if not self.is_recurrent_states_initialized[state_idx]:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        self.recurrent_states[state_idx] = recurrent_states
        return recurrent_states


def hybrid_cache(model, full_attention_layer=None):
    """A DynamicCache for a hybrid `model` with `LinearStateLayer`s for its linear-attention layers and
    `full_attention_layer()` (default DynamicLayer) for its full-attention ones; None when the model has no
    linear-attention layer or other layer kinds (sliding windows, hybrid layers), which this does not
    handle (transformers then builds its own cache)."""
    config = getattr(model, "config", None)
    if config is None or not is_hybrid(model):
        return None
    try:
        cache = DynamicCache(config=config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    kinds = {type(layer) for layer in cache.layers}
    if not cache.layers or not kinds <= {DynamicLayer, LinearAttentionLayer}:
        return None
    make = full_attention_layer or DynamicLayer
    cache.layers = [LinearStateLayer() if type(layer) is LinearAttentionLayer else make() for layer in cache.layers]
    return cache
