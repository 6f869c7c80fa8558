"""Batches of `Encoded` samples: padded (any family; left padding for generation) or packed
(padding-free: one row, per-sample positions; every family).

Packing is exact only when every sample sees positions that restart at 0 and attends only to itself:

* `position_ids` restart per sample. transformers then builds a block-diagonal causal mask from
  them (sdpa/eager) or cu_seqlens (flash-attention), provided the batch has **no attention_mask** and
  the forward runs with `use_cache=False` (a cache silently disables the packed mask; docs/environment.md §Packed inputs).
* Qwen families take `(4, 1, T)` position ids: row 0 the text positions (what the mask is built from),
  rows 1-3 each sample's own mRoPE (temporal, height, width) positions, computed by the family's own
  `get_rope_index` on that sample alone (`rope_positions`). Running `get_rope_index` over the packed
  row, or using plain arange positions, is the peer bug (verl#2958, AReaL#217): vision tokens of later
  samples get shifted positions and samples attend to each other.
* Each sample's first label is -100, so no token is predicted across a boundary.

* Hybrid linear-attention models (qwen3_5): each sample's linear-attention layers start from a zero state.
  transformers' packed forward does not do that (the recurrent and convolution states run on from one
  sample into the next); `urt.models.hybrid.isolate_packed_samples(model)` hooks those layers so they do,
  and `make_collator("packed", bundle)` installs it on the bundle's model. A model fed packed rows
  without it leaks state between samples.

A family with `spec.packing_safe=False` is refused by `PackedCollator` and padded by
`make_collator("packed", ...)` with a warning (none today).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Sequence

import torch

from urt.data.encode import IGNORE_INDEX, QWEN_FAMILIES, Encoded
from urt.errors import UrtError
from urt.models.attention import VARLEN
from urt.models.families import get_family

log = logging.getLogger(__name__)

# Batch keys that are not model inputs (see `model_inputs`).
META_KEYS = ("keys", "tasks", "labels_judgement", "seq_lens", "cu_seqlens", "max_seqlen", "prompt_lengths",
             "labels")
# The transformers class whose get_rope_index each Qwen family uses.
_ROPE_CLASS = {
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel"),
    "qwen3_vl": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel"),
    "qwen3_5": ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5Model"),
}


def _check_batch(batch: Sequence[Encoded]) -> None:
    if not batch:
        raise UrtError("cannot collate an empty batch")
    for e in batch:
        if not isinstance(e, Encoded):
            raise UrtError(f"collators take Encoded samples (urt.data.encode), got {type(e).__name__}")
    has_mm = {e.mm_token_type_ids is not None for e in batch}
    if len(has_mm) > 1:
        keys = [e.key for e in batch if e.mm_token_type_ids is None]
        raise UrtError(f"samples {keys} have no mm_token_type_ids but others do: were they encoded for another "
                       f"family?")


def concat_visual(batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    """Each visual tensor concatenated over the batch in sample order (the model consumes visual
    features in the order their placeholders appear in the flattened batch). LLaVA-OV's 5-d
    `pixel_values` (images, crops, C, H, W) are zero-padded on the crop dim to the largest crop
    count, as its image processor does; the model reads each image's crops via `image_sizes` /
    `batch_num_images`."""
    keys: list[str] = []
    for e in batch:
        keys += [k for k in e.visual if k not in keys]
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        parts = [e.visual[k] for e in batch if k in e.visual]
        if k == "pixel_values" and parts[0].dim() == 5:
            crops = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, crops - p.shape[1])) for p in parts]
        try:
            out[k] = torch.cat(parts, dim=0)
        except RuntimeError as err:
            raise UrtError(f"cannot concatenate visual tensor {k!r} across samples "
                           f"{[e.key for e in batch if k in e.visual]}: {err}") from None
    return out


def _meta(batch: Sequence[Encoded]) -> dict[str, Any]:
    return {
        "keys": [e.key for e in batch],
        "tasks": [e.task for e in batch],
        "labels_judgement": [e.label for e in batch],
        "prompt_lengths": [e.prompt_length for e in batch],
        "seq_lens": [len(e) for e in batch],
    }


def model_inputs(batch: dict, *, labels: bool = False) -> dict[str, Any]:
    """The keyword arguments for the model's forward from a collated batch (drops keys, tasks, …;
    `labels` only when asked: HF models then compute their own shifted loss)."""
    out = {k: v for k, v in batch.items() if k not in META_KEYS}
    if labels:
        out["labels"] = batch["labels"]
    return out


class PaddedCollator:
    """Pad to the longest sample. Right padding for training and scoring; left padding for
    `generate` (new tokens then follow every prompt directly). Returns `input_ids`, `attention_mask`,
    `labels` (-100 on pads), `mm_token_type_ids` (Qwen; 0 on pads), the visual tensors concatenated in
    sample order, and `keys`, `tasks`, `labels_judgement`, `prompt_lengths`, `seq_lens`."""

    def __init__(self, pad_token_id: int, *, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise UrtError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_token_id is None or isinstance(pad_token_id, bool) or int(pad_token_id) < 0:
            raise UrtError(f"pad_token_id must be a token id, got {pad_token_id!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def _pad(self, seqs: list[torch.Tensor], value: int, width: int) -> torch.Tensor:
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            if self.padding_side == "right":
                out[i, : len(s)] = s
            else:
                out[i, width - len(s):] = s
        return out

    def __call__(self, batch: list[Encoded]) -> dict:
        _check_batch(batch)
        width = max(len(e) for e in batch)
        ones = [torch.ones(len(e), dtype=torch.long) for e in batch]
        out: dict[str, Any] = {
            "input_ids": self._pad([e.input_ids for e in batch], self.pad_token_id, width),
            "attention_mask": self._pad(ones, 0, width),
            "labels": self._pad([e.labels for e in batch], IGNORE_INDEX, width),
        }
        if batch[0].mm_token_type_ids is not None:
            out["mm_token_type_ids"] = self._pad([e.mm_token_type_ids for e in batch], 0, width)
        out.update(concat_visual(batch))
        out.update(_meta(batch))
        return out


class RopeIndex:
    """A weight-free stand-in for a Qwen family's `...Model`, holding only its config, that borrows
    the family's own `get_rope_index` / `get_vision_position_ids` from transformers (those methods use
    nothing but `self.config` and each other). Module-level and holding only the config, so it pickles
    into DataLoader workers."""

    def __init__(self, family: str, config):
        if family not in _ROPE_CLASS:
            raise UrtError(f"family {family!r} has no mRoPE index; mRoPE families: {', '.join(_ROPE_CLASS)}")
        self.family = family
        self.config = config

    def _impl(self):
        module, name = _ROPE_CLASS[self.family]
        return getattr(importlib.import_module(module), name)

    def get_vision_position_ids(self, *args, **kwargs):
        return self._impl().get_vision_position_ids(self, *args, **kwargs)

    def get_rope_index(self, *args, **kwargs):
        return self._impl().get_rope_index(self, *args, **kwargs)

    def __call__(self, enc: Encoded) -> torch.LongTensor:
        if enc.mm_token_type_ids is None:
            raise UrtError(f"sample {enc.key!r}: no mm_token_type_ids; it was not encoded by a Qwen processor")
        v = enc.visual
        pos, _ = self.get_rope_index(
            enc.input_ids[None],
            mm_token_type_ids=enc.mm_token_type_ids[None],
            image_grid_thw=v.get("image_grid_thw"),
            video_grid_thw=v.get("video_grid_thw"),
            second_per_grid_ts=v.get("second_per_grid_ts"),
            attention_mask=None,
        )
        return pos[:, 0].long()


def rope_positions(family: str, config, enc: Encoded) -> torch.LongTensor:
    """(3, L) mRoPE position rows (temporal, height, width) of one sample, exactly as the model
    computes them for that sample alone, without model weights."""
    return RopeIndex(family, config)(enc)


class PackedCollator:
    """Concatenate the batch into one row without padding (see the module docstring). Returns
    `input_ids` (1, T), `labels` (1, T) with each sample's first label -100, `position_ids` ((4, 1, T)
    for Qwen families: text row + mRoPE rows, per sample; (1, T) for llava_onevision), no
    attention_mask, `mm_token_type_ids` (1, T) (Qwen), the visual tensors concatenated in sample
    order, `seq_lens`, `cu_seqlens` ((n+1,) int32), `max_seqlen`, and the per-sample metadata. Run
    the model with `use_cache=False` (and, for qwen3_5, with `urt.models.hybrid.isolate_packed_samples`
    installed: `make_collator` does it)."""

    def __init__(self, family: str, config, pad_token_id: int):
        spec = get_family(family)
        if not spec.packing_safe:
            raise UrtError(
                f"family {family!r} cannot be packed: {spec.notes or 'packed samples are not isolated'}; "
                f"use padding (PaddedCollator, or data collator 'padded')"
            )
        self.family = family
        self.config = config
        self.pad_token_id = pad_token_id
        self.rope = RopeIndex(family, config) if family in QWEN_FAMILIES else None

    def __call__(self, batch: list[Encoded]) -> dict:
        _check_batch(batch)
        lens = [len(e) for e in batch]
        input_ids = torch.cat([e.input_ids for e in batch])[None]
        labels = []
        for e in batch:
            lab = e.labels.clone()
            lab[0] = IGNORE_INDEX
            labels.append(lab)
        text_pos = torch.cat([torch.arange(n, dtype=torch.long) for n in lens])
        out: dict[str, Any] = {"input_ids": input_ids, "labels": torch.cat(labels)[None]}
        if self.rope is not None:
            if batch[0].mm_token_type_ids is None:
                raise UrtError(f"samples {[e.key for e in batch]} have no mm_token_type_ids; a {self.family} "
                               f"batch needs them (encode with the family's processor)")
            mrope = torch.cat([self.rope(e) for e in batch], dim=1)
            out["position_ids"] = torch.cat([text_pos[None], mrope], dim=0)[:, None, :]
            out["mm_token_type_ids"] = torch.cat([e.mm_token_type_ids for e in batch])[None]
        else:
            out["position_ids"] = text_pos[None]
        out.update(concat_visual(batch))
        out.update(_meta(batch))
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        out["cu_seqlens"] = cu
        out["max_seqlen"] = max(lens)
        return out


_WARNED: set[str] = set()


def pad_id(bundle) -> int:
    pad = getattr(bundle.tokenizer, "pad_token_id", None)
    if pad is None:
        cfg = bundle.model.config
        pad = getattr(cfg, "pad_token_id", None) or getattr(getattr(cfg, "text_config", None), "pad_token_id", None)
    if pad is None:
        raise UrtError(f"the {bundle.family} tokenizer has no pad token; set tokenizer.pad_token")
    return int(pad)


def packing_pays(bundle) -> bool:
    """Whether packing is the faster layout for this model: only with variable-length kernels (flash-attn's,
    or torch's own under `urt.models.attention.VARLEN`). With sdpa/eager, transformers attends over a packed
    row through a dense block-diagonal mask, (sum of lengths)^2 instead of the sum of squares: measured on CPU
    (benchmarks/grpo_vs_trl.py), a packed GRPO step was 2x slower than the padded one with identical
    log-probs."""
    impl = str(getattr(getattr(bundle.model, "config", None), "_attn_implementation", None) or "")
    return impl.startswith("flash") or impl == VARLEN


def make_collator(kind: str, bundle, *, padding_side: str = "right"):
    """"padded" -> PaddedCollator; "packed" -> PackedCollator (for a hybrid linear-attention model, with
    `urt.models.hybrid.isolate_packed_samples` installed on `bundle.model`), or (for a family whose packing
    leaks, `spec.packing_safe=False`) a warning, once per family, and a right/`padding_side`
    PaddedCollator; "auto" -> packed under flash-attention, padded otherwise (`packing_pays`)."""
    if kind == "auto":
        kind = "packed" if packing_pays(bundle) else "padded"
    if kind == "padded":
        return PaddedCollator(pad_id(bundle), padding_side=padding_side)
    if kind != "packed":
        raise UrtError(f"unknown collator kind {kind!r}; use 'auto', 'padded' or 'packed'")
    spec = bundle.spec
    if not spec.packing_safe:
        if bundle.family not in _WARNED:
            _WARNED.add(bundle.family)
            log.warning("family %s cannot be packed (%s); padding instead", bundle.family,
                        spec.notes or "packed samples are not isolated")
        return PaddedCollator(pad_id(bundle), padding_side=padding_side)
    from urt.models.hybrid import isolate_packed_samples

    isolate_packed_samples(bundle.model)  # a no-op for models without linear-attention layers
    return PackedCollator(bundle.family, bundle.model.config, pad_id(bundle))
