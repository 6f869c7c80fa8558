"""Encode each prompt's visuals once per GRPO rollout step instead of once per completion and pass.

A rollout step scores B prompts × G completions, and every log-prob pass (old policy when μ > 1, the
reference, the policy with grad) feeds all B·G sequences through the model: each pass used to run the
vision tower on the same prompt images G times. With the visual encoder frozen (the default:
`freeze_vision` and `freeze_projector`) its output is a constant of the step, so a `VisualCache` encodes
each distinct prompt's images / videos once (no grad) and every pass feeds the cached features instead
of `pixel_values` / `pixel_values_videos`.

**How the features reach the model.** Through transformers' own entry point for precomputed encoder
outputs, the forward's `mm_encoder_outputs={"image": ..., "video": ...}` argument (transformers 5.x):
the model embeds `input_ids`, scatters the cached features over the image / video placeholder tokens
exactly as it would scatter freshly computed ones, and (Qwen3-VL) injects the cached DeepStack features
at its first LM layers through the same `visual_pos_masks` / `deepstack_visual_embeds` route. Every
other input is unchanged: `input_ids`, `mm_token_type_ids`, the grids, the packed mRoPE `position_ids`
of `PackedCollator` (or, padded, the model's own `get_rope_index` on `input_ids`), so the language
model computes what it computes on the normal path; only the vision forward is skipped.

| family | cached | what is cached |
|---|---|---|
| qwen2_5_vl | images, videos | `pooler_output`: merger output, image order (the tower undoes its window order) |
| qwen3_vl | images, videos | `pooler_output` + the per-layer DeepStack features (both taken by `mm_encoder_outputs`) |
| qwen3_5 | images, videos | `pooler_output` (its LM takes no DeepStack features) |
| llava_onevision | images, videos | projected, anyres-packed image features (with `image_newline`); pooled video |

Falls back to the normal path (the cache is refused by `VisualCache(...)` with a `UrtError`, or
`VisualCache.for_step` returns None, or `inputs_for` leaves the inputs unchanged — each with the reason):

* a trainable vision tower **or projector / merger** (Qwen's `visual.merger`, Qwen3-VL's
  `deepstack_merger_list`, LLaVA-OV's `multi_modal_projector` / `image_newline`): the features then need
  grad and change between updates. Caching the frozen tower's output *before* a trainable projector is
  not offered: `mm_encoder_outputs` takes post-projector features only, and running the projector
  outside the model would re-implement model internals (Qwen2.5-VL's window reordering, Qwen3-VL's
  DeepStack mergers on intermediate blocks, LLaVA-OV's anyres packing) that transformers may change
  silently — not exact by construction.
* LoRA adapters inside the visual encoder (the policy's features would differ from the reference's);
* dropout active in the visual encoder (a module in training mode with dropout > 0: the normal path is
  stochastic);
* a transformers whose forward has no `mm_encoder_outputs`, or a family not in the table;
* `inputs_for` on a model whose visual encoder is not the cache's: a different module whose encoder
  weights (parameters and buffers) are not bitwise equal. The frozen deep-copied reference model of
  `GRPOModule` passes that check (its encoder is a copy of the frozen policy encoder); the LoRA
  reference is the same model with adapters disabled, so the same encoder.

The per-image features equal the normal path's up to float rounding: the tower runs the distinct
prompts' images as one batch rather than the G-fold repeated batch (per-image attention, so only the
summation order of batched matmuls can differ).

urt's encoder gives LLaVA-OV videos as frames (images, as the official code does); the model's own video
input (`pixel_values_videos`) is cached too when a caller builds one.

**What it saves**: about the tower's share of the step × (1 − 1/(G · passes)), passes being the log-prob
passes over the step's sequences (reference, old policy when μ > 1, μ policy passes); measured by
`benchmarks/visual_cache.py` (docs/performance.md §Visual features once per GRPO step).

Sequences are matched to cached entries by their `visual` dict (the object `completion_sequence`
shares between a prompt and its completions), kept alive by the cache so the identity cannot be reused;
a sequence whose visuals are not cached yet is encoded on first use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from urt.data.collate import concat_visual
from urt.data.encode import Encoded
from urt.errors import UrtError
from urt.models.compat import compute_device, warn_once
from urt.models.families import get_family

log = logging.getLogger(__name__)

# Families whose precomputed encoder outputs are exact (see the module docstring's table).
SUPPORTED_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5", "llava_onevision")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")
ENCODER_PARTS = ("vision", "projector")
def hf_model(model):
    """The transformers `...ForConditionalGeneration` model inside a (possibly peft-wrapped) model."""
    from urt.models.loading import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model


def encoder_parameters(model, family: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the visual encoder: vision tower plus projector / merger (LoRA weights inside
    it included)."""
    spec = get_family(family)
    return [(n, p) for n, p in model.named_parameters() if spec.part_of(n) in ENCODER_PARTS]


def _encoder_buffers(model, family: str) -> list[tuple[str, torch.Tensor]]:
    spec = get_family(family)
    return [(n, b) for n, b in model.named_buffers() if spec.part_of(n) in ENCODER_PARTS]


def _encoder_modules(model, family: str) -> list[tuple[str, torch.nn.Module]]:
    spec = get_family(family)
    return [(n, m) for n, m in model.named_modules() if n and spec.part_of(n + ".") in ENCODER_PARTS]


def _active_dropout(model, family: str) -> str | None:
    """The first encoder module that drops out in its current mode (None: the encoder is deterministic)."""
    cfg = getattr(hf_model(model).config, "vision_config", None)
    config_p = max(float(getattr(cfg, k, 0.0) or 0.0) for k in ("attention_dropout", "hidden_dropout", "dropout"))
    for name, m in _encoder_modules(model, family):
        if not m.training:
            continue
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return f"{name} (p={m.p})"
        if config_p > 0:
            return f"{name} (vision_config dropout {config_p})"
    return None


def cache_blocker(model, family: str, *, inference: bool = False) -> str | None:
    """Why the visual features of `model` cannot be cached for a rollout step (None: they can). With
    `inference` (a judge's no-grad generation, `VisualCache(..., inference=True)`) trainable weights and
    LoRA are no obstacle: nothing takes a gradient and the weights do not change while the cache lives."""
    if family not in SUPPORTED_FAMILIES:
        return f"family {family!r} has no visual cache (supported: {', '.join(SUPPORTED_FAMILIES)})"
    from urt.models.compat import forward_takes

    if not forward_takes(hf_model(model), "mm_encoder_outputs"):
        import transformers

        return (f"the installed transformers {transformers.__version__} has no `mm_encoder_outputs` argument in "
                f"{type(hf_model(model)).__name__}.forward")
    params = encoder_parameters(model, family)
    lora = [n for n, _ in params if "lora_" in n]
    if lora and not inference:
        return f"LoRA adapters inside the visual encoder (e.g. {lora[0]})"
    trainable = [n for n, p in params if p.requires_grad]
    if trainable and not inference:
        return (f"the visual encoder is trainable ({len(trainable)} tensors, e.g. {trainable[0]}): its features "
                f"need grad and change between updates (freeze_vision and freeze_projector must be true)")
    drop = _active_dropout(model, family)
    if drop is not None:
        return f"dropout is active in the visual encoder ({drop})"
    return None


def item_counts(family: str, visual: dict) -> tuple[int, int]:
    """(images, videos) of one sample's processor outputs."""
    if family in QWEN_FAMILIES:
        n_img = int(visual["image_grid_thw"].shape[0]) if "pixel_values" in visual else 0
        n_vid = int(visual["video_grid_thw"].shape[0]) if "pixel_values_videos" in visual else 0
    else:  # llava_onevision
        n_img = int(visual["image_sizes"].shape[0]) if "pixel_values" in visual else 0
        n_vid = int(visual["pixel_values_videos"].shape[0]) if "pixel_values_videos" in visual else 0
    return n_img, n_vid


def _item_shape(family: str, visual: dict, modality: str, k: int) -> tuple:
    """What fixes the size of the k-th image / video's features: its grid (Qwen) or its image size and,
    for LLaVA-OV, how many images the prompt has (one image gets anyres crops, several the base view)."""
    if family in QWEN_FAMILIES:
        grid = visual["image_grid_thw" if modality == "image" else "video_grid_thw"]
        return tuple(int(x) for x in grid[k].tolist())
    if modality == "image":
        return tuple(int(x) for x in visual["image_sizes"][k].tolist()) + (int(visual["image_sizes"].shape[0]) > 1,)
    return tuple(visual["pixel_values_videos"][k].shape)


@dataclass
class _Entry:
    """The cached encoder outputs of one sample's visuals: per image / video, its features (tokens, D) and,
    Qwen3-VL, its DeepStack features (one (tokens, D) per LM layer they are added at)."""

    visual: dict  # kept alive: its id() is the lookup key
    images: list[torch.Tensor] = field(default_factory=list)
    videos: list[torch.Tensor] = field(default_factory=list)
    image_deepstack: list[list[torch.Tensor]] = field(default_factory=list)
    video_deepstack: list[list[torch.Tensor]] = field(default_factory=list)


class VisualCache:
    """The visual encoder outputs of one model for the prompts of one rollout step (see the module
    docstring). `VisualCache(model, family, prompts)` encodes the distinct visuals of `prompts` now
    (`batch_size` samples per encoder call, no grad) and raises a UrtError when the model's features
    cannot be cached; `VisualCache.for_step` returns None (and logs why) instead. `inputs_for(model, seqs,
    inputs)` turns the model inputs of a collated batch of `seqs` into inputs that use the cache."""

    def __init__(self, model, family: str, prompts: Sequence[Encoded] = (), *, batch_size: int = 8,
                 inference: bool = False):
        reason = cache_blocker(model, family, inference=inference)
        if reason is not None:
            raise UrtError(f"cannot cache the visual features of this {family} model: {reason}; run the log-prob "
                           f"passes without a VisualCache")
        if int(batch_size) < 1:
            raise UrtError(f"VisualCache batch_size must be >= 1, got {batch_size!r}")
        self.family = family
        self.model = model
        self.inference = bool(inference)
        self.batch_size = int(batch_size)
        self._params = [p for _, p in encoder_parameters(model, family)]
        self._entries: dict[int, _Entry] = {}
        self._same: dict[int, tuple[Any, str | None]] = {}  # id(model) -> (model, why not the same encoder)
        self._out_cls: dict[str, type] = {}
        self.encoded = 0  # samples whose visuals went through the encoder
        self.composed = 0  # samples whose features were assembled from cached ones (`compose`)
        self.lookups = 0  # sequences served from the cache
        self.fallbacks = 0  # batches run on the normal path (the reason was logged)
        self.add(prompts)

    @classmethod
    def for_step(cls, model, family: str, prompts: Sequence[Encoded], *, batch_size: int = 8) -> VisualCache | None:
        """A cache of `prompts`' visuals, or None (the reason logged once) when the model's visual features
        cannot be cached: the log-prob passes then run the vision tower as usual."""
        reason = cache_blocker(model, family)
        if reason is not None:
            warn_once(f"visual features are not cached ({family}): {reason}; the vision tower runs in every "
                       f"log-prob pass")
            return None
        return cls(model, family, prompts, batch_size=batch_size)

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------------------------ encoding
    def add(self, samples: Sequence[Encoded]) -> None:
        """Encode the visuals of `samples` that are not cached yet (each distinct `visual` dict once)."""
        todo: list[Encoded] = []
        seen: set[int] = set()
        for e in samples:
            k = id(e.visual)
            if not e.visual or k in self._entries or k in seen:
                continue
            if not any(p in e.visual for p in PIXEL_KEYS):
                continue
            seen.add(k)
            todo.append(e)
        # inference_mode(False): cached tensors must be usable in a later autograd pass even when the first
        # user of the cache runs under torch.inference_mode()
        with torch.inference_mode(False), torch.no_grad():
            for s in range(0, len(todo), self.batch_size):
                self._encode(todo[s:s + self.batch_size])

    def _move(self, visual: dict) -> dict:
        p = self._params[0] if self._params else next(self.model.parameters())
        out = {}
        for k, v in visual.items():
            if isinstance(v, torch.Tensor):
                cast = v.is_floating_point() and k.startswith("pixel_values")
                v = v.to(device=compute_device(p), dtype=p.dtype) if cast else v.to(compute_device(p))
            out[k] = v
        return out

    def _encode(self, chunk: list[Encoded]) -> None:
        inner = hf_model(self.model).model
        vis = self._move(concat_visual(chunk))
        counts = [item_counts(self.family, e.visual) for e in chunk]
        entries = [_Entry(visual=e.visual) for e in chunk]
        if "pixel_values" in vis:
            if self.family in QWEN_FAMILIES:
                out = inner.get_image_features(vis["pixel_values"], vis["image_grid_thw"], return_dict=True)
            else:
                out = inner.get_image_features(vis["pixel_values"], vis["image_sizes"],
                                               batch_num_images=vis.get("batch_num_images"), return_dict=True)
            feats, deep = self._split(out, sum(c[0] for c in counts), "image")
            self._spread(entries, [c[0] for c in counts], feats, deep, "images", "image_deepstack")
        if "pixel_values_videos" in vis:
            if self.family in QWEN_FAMILIES:
                out = inner.get_video_features(vis["pixel_values_videos"], vis["video_grid_thw"], return_dict=True)
            else:
                out = inner.get_video_features(vis["pixel_values_videos"], return_dict=True)
            feats, deep = self._split(out, sum(c[1] for c in counts), "video")
            self._spread(entries, [c[1] for c in counts], feats, deep, "videos", "video_deepstack")
        for e, entry in zip(chunk, entries):
            self._entries[id(e.visual)] = entry
        self.encoded += len(chunk)

    def _split(self, out, n: int, modality: str) -> tuple[list[torch.Tensor], list[list[torch.Tensor]] | None]:
        """Per-item features (and per-item DeepStack features) of an encoder output over n items."""
        self._out_cls[modality] = type(out)
        pooled = out.pooler_output
        if isinstance(pooled, torch.Tensor):  # llava_onevision videos: (videos, tokens, D)
            feats = [x.detach() for x in pooled.unbind(0)]
        else:
            feats = [x.detach() for x in pooled]
        if len(feats) != n:
            raise UrtError(f"the {self.family} {modality} encoder returned {len(feats)} feature blocks for {n} "
                           f"{modality}s")
        deep = getattr(out, "deepstack_features", None)
        per_item = None
        if deep:
            per_item = [[layer[i].detach() for layer in deep] for i in range(n)]
        return feats, per_item

    @staticmethod
    def _spread(entries, counts, feats, deep, attr, deep_attr) -> None:
        at = 0
        for entry, n in zip(entries, counts):
            getattr(entry, attr).extend(feats[at:at + n])
            if deep is not None:
                getattr(entry, deep_attr).extend(deep[at:at + n])
            at += n

    def items(self, sample: Encoded) -> tuple[int, int]:
        """(images, videos) the cached entry of `sample` holds (encoding it first if needed)."""
        self.add([sample])
        entry = self._entries.get(id(sample.visual))
        return (0, 0) if entry is None else (len(entry.images), len(entry.videos))

    def compose(self, target: Encoded, images: Sequence[tuple[Encoded, int]] = (),
                videos: Sequence[tuple[Encoded, int]] = ()) -> None:
        """Feed `target`'s visuals from features already cached for other samples, without running the
        encoder: its k-th image is image `images[k][1]` of sample `images[k][0]` (likewise videos). A judge
        comparing N candidates pairwise encodes each candidate once and composes every pair from them.
        Exact where an item's features depend on that item only (per-image attention in the Qwen towers;
        LLaVA-OV's multi-image base view): the grids / image sizes of `target` must equal the sources'
        (checked: a mismatch raises instead of scattering another item's features)."""
        if id(target.visual) in self._entries:
            return
        self.add([src for src, _ in (*images, *videos)])
        entry = _Entry(visual=target.visual)
        want = item_counts(self.family, target.visual)
        if (len(images), len(videos)) != want:
            raise UrtError(f"compose {target.key!r}: it has {want[0]} images and {want[1]} videos, but "
                           f"{len(images)} images and {len(videos)} videos were given")
        for modality, items, attr, deep_attr in (("image", images, "images", "image_deepstack"),
                                                 ("video", videos, "videos", "video_deepstack")):
            for k, (src, idx) in enumerate(items):
                have = self._entries.get(id(src.visual))
                if have is None or not 0 <= idx < len(getattr(have, attr)):
                    raise UrtError(f"compose {target.key!r}: sample {src.key!r} has no cached {modality} {idx}")
                if _item_shape(self.family, target.visual, modality, k) != _item_shape(
                        self.family, src.visual, modality, idx):
                    raise UrtError(f"compose {target.key!r}: its {modality} {k} is not the same size as {modality} "
                                   f"{idx} of {src.key!r}; the cached features cannot stand in for it")
                getattr(entry, attr).append(getattr(have, attr)[idx])
                if getattr(have, deep_attr):
                    getattr(entry, deep_attr).append(getattr(have, deep_attr)[idx])
        self._entries[id(target.visual)] = entry
        self.composed += 1

    # ------------------------------------------------------------------------------------ use
    def usable_for(self, model) -> str | None:
        """Why this cache cannot feed `model` (None: it can): `cache_blocker`, or a visual encoder that is
        neither the cache's own nor a bitwise-equal copy of it."""
        if hf_model(model) is hf_model(self.model):
            if self.inference:
                drop = _active_dropout(model, self.family)
                return None if drop is None else f"dropout is active in the visual encoder ({drop})"
            trainable = any(p.requires_grad for p in self._params)
            if trainable or any("lora_" in n for n, _ in encoder_parameters(model, self.family)):
                return cache_blocker(model, self.family) or "the visual encoder changed since the cache was built"
            drop = _active_dropout(model, self.family)
            return None if drop is None else f"dropout is active in the visual encoder ({drop})"
        reason = cache_blocker(model, self.family, inference=self.inference)
        if reason is not None:
            return reason
        key = id(model)
        if key not in self._same:
            self._same[key] = (model, self._different_encoder(model))
        return self._same[key][1]

    def _different_encoder(self, model) -> str | None:
        ours = dict(encoder_parameters(self.model, self.family))
        ours.update(_encoder_buffers(self.model, self.family))
        theirs = dict(encoder_parameters(model, self.family))
        theirs.update(_encoder_buffers(model, self.family))
        if ours.keys() != theirs.keys():
            return "its visual encoder has different parameters than the one the cache was built with"
        for name, a in ours.items():
            b = theirs[name]
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b):
                return f"its visual encoder differs from the one the cache was built with ({name})"
        return None

    def encoder_outputs(self, seqs: Sequence[Encoded]) -> dict[str, Any]:
        """`mm_encoder_outputs` for a batch of `seqs` collated in this order (visuals not cached yet are
        encoded first): every image, then every video, in the order their placeholders appear."""
        self.add(seqs)
        images, videos, img_deep, vid_deep = [], [], [], []
        for e in seqs:
            if not e.visual or not any(p in e.visual for p in PIXEL_KEYS):
                continue
            entry = self._entries[id(e.visual)]
            images += entry.images
            videos += entry.videos
            img_deep += entry.image_deepstack
            vid_deep += entry.video_deepstack
            self.lookups += 1
        out: dict[str, Any] = {}
        if images:
            out["image"] = self._output("image", images, img_deep)
        if videos:
            out["video"] = self._output("video", videos, vid_deep)
        return out

    def _output(self, modality: str, feats: list[torch.Tensor], deep: list[list[torch.Tensor]]):
        cls = self._out_cls[modality]
        if self.family == "llava_onevision" and modality == "video":
            # the model flattens (videos, tokens, D) to (videos*tokens, D): one row keeps per-video lengths free
            return cls(pooler_output=torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])[None])
        kw: dict[str, Any] = {"pooler_output": tuple(feats)}
        if deep:
            layers = len(deep[0])
            kw["deepstack_features"] = [tuple(d[layer] for d in deep) for layer in range(layers)]
        return cls(**kw)

    def inputs_for(self, model, seqs: Sequence[Encoded], inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` (the model inputs of `seqs` collated in this order, e.g. `model_inputs(collate(seqs))`)
        with the pixel tensors replaced by the cached `mm_encoder_outputs`; unchanged (the reason logged
        once, `fallbacks` counted) when the cache cannot feed `model` (see `usable_for`)."""
        if not any(k in inputs for k in PIXEL_KEYS):
            return inputs  # a text-only batch: nothing to skip
        reason = self.usable_for(model)
        if reason is not None:
            self.fallbacks += 1
            warn_once(f"visual cache not used for a {type(hf_model(model)).__name__} pass: {reason}; running its "
                       f"vision tower")
            return inputs
        out = {k: v for k, v in inputs.items() if k not in PIXEL_KEYS}
        out["mm_encoder_outputs"] = self.encoder_outputs(seqs)
        return out
