"""Convert an original LLaVA-NeXT (LLaVA-OneVision, Qwen2 language model) checkpoint folder, the layout
the released UnifiedReward-7b / UnifiedReward-Think-7b weights are in, into a plain transformers
`LlavaOnevisionForConditionalGeneration` + `LlavaOnevisionProcessor` folder that loads with
`AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` and nothing else.

The source folder holds `config.json` (model_type "llava" / "llava_qwen", architectures
["LlavaQwenForCausalLM"], the Qwen2 text fields plus LLaVA's `mm_*` fields), `*.safetensors` (or a
`model.safetensors.index.json` with its shards), the Qwen2 tokenizer files and optionally
`generation_config.json`.

Weight names (source -> target), first matching rule wins; nothing else is accepted:

    model.vision_tower.vision_tower.vision_model.X  -> model.vision_tower.X          (SigLIP tower)
    model.mm_projector.0.{weight,bias}              -> model.multi_modal_projector.linear_1.*
    model.mm_projector.2.{weight,bias}              -> model.multi_modal_projector.linear_2.*
    model.image_newline                             -> model.image_newline
    model.embed_tokens.X                            -> model.language_model.embed_tokens.X
    model.layers.X                                  -> model.language_model.layers.X
    model.norm.X                                    -> model.language_model.norm.X
    lm_head.X                                       -> lm_head.X
  dropped (never used by LLaVA-NeXT): `*.rotary_emb.inv_freq`, the SigLIP pooling head
  (`...vision_model.head.*`, replaced by Identity in LLaVA-NeXT's SigLipVisionTower) and, when the
  checkpoint still holds the full tower, its last encoder layer (LLaVA-NeXT deletes it at load time).

Vision tower semantics: LLaVA-NeXT's SigLipVisionTower deletes the tower's last encoder layer and takes
`hidden_states[-1]` of what is left (no post-layernorm), ignoring `mm_vision_select_layer`; all 729
patch tokens are kept (SigLIP has no CLS token). The transformers equivalent is a SiglipVisionConfig with
the layers present in the checkpoint (26 for so400m), `vision_feature_layer=-1`,
`vision_feature_select_strategy="full"`, `vision_use_head=False` -- the same choice transformers' own
`convert_llava_onevision_weights_to_hf.py` makes.

Only the model's language-model/projector/tower weights are renamed; values are copied bit for bit
(optionally cast with `dtype`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from urt.errors import UrtError

SOURCE_FORMATS = ("llava_next",)

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# ChatML with a default system turn (LLaVA's `qwen_1_5` conversation, what UnifiedReward-Think-7b was
# trained with). Per message: `<image>\n` per image item and `<video>\n` per video item, in order, then
# the text items. Assistant text is wrapped in {% generation %} so `return_assistant_tokens_mask` works.
CHAT_TEMPLATE = (
    "{%- macro visuals(content) -%}"
    "{%- if content is not string -%}{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}{{- '<image>\\n' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}{{- '<video>\\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro texts(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'text' or ('text' in item and not ('image' in item or 'video' in item)) -%}"
    "{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message.role != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' -}}{{- visuals(message.content) -}}"
    "{%- if message.role == 'assistant' -%}"
    "{%- generation -%}{{- texts(message.content) -}}{{- '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}{{- texts(message.content) -}}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# SigLIP towers LLaVA-NeXT is known to use. `num_hidden_layers` is the full tower as released by Google;
# LLaVA-NeXT drops the last one. Keyed by the last path component of `mm_vision_tower`.
KNOWN_VISION_TOWERS: dict[str, dict[str, int]] = {
    "siglip-so400m-patch14-384": dict(hidden_size=1152, num_attention_heads=16, num_hidden_layers=27,
                                      intermediate_size=4304, patch_size=14, image_size=384),
    "siglip-so400m-patch14-224": dict(hidden_size=1152, num_attention_heads=16, num_hidden_layers=27,
                                      intermediate_size=4304, patch_size=14, image_size=224),
    "siglip-base-patch16-224": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                                    intermediate_size=3072, patch_size=16, image_size=224),
    "siglip-base-patch16-256": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                                    intermediate_size=3072, patch_size=16, image_size=256),
    "siglip-base-patch16-384": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                                    intermediate_size=3072, patch_size=16, image_size=384),
    "siglip-base-patch16-512": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                                    intermediate_size=3072, patch_size=16, image_size=512),
    "siglip-large-patch16-256": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24,
                                     intermediate_size=4096, patch_size=16, image_size=256),
    "siglip-large-patch16-384": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24,
                                     intermediate_size=4096, patch_size=16, image_size=384),
}

SRC_VISION = "model.vision_tower.vision_tower.vision_model."
# (source prefix, target prefix); a rule whose source ends without "." matches the exact key only.
RENAME_RULES: tuple[tuple[str, str], ...] = (
    (SRC_VISION, "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)

# Qwen2 text-config fields carried over from the original config.json when present.
QWEN2_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "vocab_size",
    "tie_word_embeddings", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
    "initializer_range", "bos_token_id", "eos_token_id", "use_cache",
)
REQUIRED_TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

DTYPES = ("float32", "float16", "bfloat16")
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json",)


def map_key(key: str) -> str | None:
    """The target name of an original LLaVA-NeXT weight name, or None when no rule applies."""
    for src, dst in RENAME_RULES:
        if src.endswith("."):
            if key.startswith(src):
                return dst + key[len(src):]
        elif key == src:
            return dst
    return None


# ------------------------------------------------------------------------------------------------------
# reading the source folder


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UrtError(f"missing {path.name} in {path.parent}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UrtError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise UrtError(f"{path}: expected a JSON object")
    return data


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UrtError(f"{index}: no 'weight_map'")
        files = [src / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UrtError(f"{index} lists shards missing from {src}: {', '.join(missing)}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in src.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: only safetensors are supported)" if bins else ""
        raise UrtError(f"missing weights in {src}: no *.safetensors and no model.safetensors.index.json{hint}")
    return files


def _load_weights(files: list[Path]) -> dict[str, Any]:
    from safetensors import safe_open

    state: dict[str, Any] = {}
    where: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in state:
                        raise UrtError(f"weight {key!r} is in both {where[key]} and {path.name}")
                    state[key] = f.get_tensor(key)
                    where[key] = path.name
        except UrtError:
            raise
        except Exception as err:  # safetensors raises its own error types
            raise UrtError(f"cannot read weights from {path}: {err}") from None
    return state


def _check_source_config(cfg: dict, path: Path) -> None:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in ("llava", "llava_qwen"):
        raise UrtError(f"{path}: model_type {model_type!r} is not an original LLaVA-NeXT config "
                       "(expected 'llava' or 'llava_qwen')")
    if archs and not any("Qwen" in a for a in archs):
        raise UrtError(f"{path}: architectures {archs} -- only LLaVA-NeXT with a Qwen2 language model "
                       "(LlavaQwenForCausalLM) is supported")
    for key in REQUIRED_TEXT_FIELDS:
        if key not in cfg:
            raise UrtError(f"{path}: missing text-model field {key!r}")
    projector = cfg.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise UrtError(f"{path}: mm_projector_type {projector!r} is not supported (only 'mlp2x_gelu', "
                       "which LLaVA-OneVision uses)")
    merge = cfg.get("mm_patch_merge_type", "spatial_unpad")
    if merge != "spatial_unpad":
        raise UrtError(f"{path}: mm_patch_merge_type {merge!r} is not supported (only 'spatial_unpad')")
    aspect = cfg.get("image_aspect_ratio", "anyres_max_9")
    if not re.fullmatch(r"anyres_max_\d+", str(aspect)):
        raise UrtError(f"{path}: image_aspect_ratio {aspect!r} is not supported (only 'anyres_max_N')")
    tower = cfg.get("mm_vision_tower")
    if not tower:
        raise UrtError(f"{path}: missing 'mm_vision_tower'")
    if "siglip" not in str(tower).lower():
        raise UrtError(f"{path}: mm_vision_tower {tower!r} is not a SigLIP tower (only SigLIP is supported)")


def _grid_pinpoints(cfg: dict, image_size: int, path: Path) -> list[list[int]]:
    """Original pinpoints are (width, height) pairs, or a "(1x1),...,(6x6)" range in units of the tower's
    image size; transformers wants (height, width) pairs."""
    raw = cfg.get("image_grid_pinpoints")
    if raw is None:
        raise UrtError(f"{path}: missing 'image_grid_pinpoints'")
    if isinstance(raw, str):
        found = re.findall(r"\((\d+)x(\d+)\)", raw)
        if not found:
            raise UrtError(f"{path}: cannot parse image_grid_pinpoints {raw!r}")
        (a0, b0), (a1, b1) = map(int, found[0]), map(int, found[-1])
        pairs = [[i * image_size, j * image_size] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    else:
        try:
            pairs = [[int(w), int(h)] for w, h in raw]
        except (TypeError, ValueError):
            raise UrtError(f"{path}: image_grid_pinpoints must be [[w, h], ...], got {raw!r}") from None
    if not pairs:
        raise UrtError(f"{path}: image_grid_pinpoints is empty")
    return [[h, w] for w, h in pairs]


# ------------------------------------------------------------------------------------------------------
# configs


def _vision_config(cfg: dict, state: dict, vision_heads: int | None, path: Path) -> tuple[dict, list[str]]:
    """SigLIP vision config inferred from the weights; returns it and the source keys to drop."""
    pe = state.get(SRC_VISION + "embeddings.patch_embedding.weight")
    pos = state.get(SRC_VISION + "embeddings.position_embedding.weight")
    if pe is None or pos is None:
        raise UrtError(f"weights lack the SigLIP embeddings ({SRC_VISION}embeddings.patch_embedding.weight / "
                       "position_embedding.weight); not a LLaVA-NeXT SigLIP checkpoint")
    hidden, channels, patch = int(pe.shape[0]), int(pe.shape[1]), int(pe.shape[2])
    side = math.isqrt(int(pos.shape[0]))
    if side * side != int(pos.shape[0]):
        raise UrtError(f"{SRC_VISION}embeddings.position_embedding.weight has {pos.shape[0]} rows, not a square")
    image_size = side * patch  # refined below: the tower's nominal size may not be a multiple of the patch
    layer_re = re.compile(re.escape(SRC_VISION) + r"encoder\.layers\.(\d+)\.")
    layers = sorted({int(m.group(1)) for k in state if (m := layer_re.match(k))})
    if not layers:
        raise UrtError(f"weights have no {SRC_VISION}encoder.layers.*")
    num_layers = layers[-1] + 1
    fc1 = state.get(SRC_VISION + "encoder.layers.0.mlp.fc1.weight")
    if fc1 is None:
        raise UrtError(f"weights lack {SRC_VISION}encoder.layers.0.mlp.fc1.weight")
    intermediate = int(fc1.shape[0])

    tower = str(cfg["mm_vision_tower"])
    known = KNOWN_VISION_TOWERS.get(tower.rstrip("/").split("/")[-1])
    drop = [k for k in state if k.startswith(SRC_VISION + "head.")]
    mismatch = ""
    if known is not None and known["hidden_size"] != hidden:
        # a differently sized tower under a known name: do not trust the table
        mismatch = f", but the weights have hidden size {hidden}, not {known['hidden_size']}"
        known = None
    if vision_heads is None:
        if known is None:
            what = "vision tower" if mismatch else "unknown vision tower"
            raise UrtError(
                f"{path}: {what} mm_vision_tower={tower!r}{mismatch}; the number of SigLIP attention heads "
                f"cannot be read from the weights: pass it (--vision-heads N / vision_heads=N). "
                f"Known towers: {', '.join(KNOWN_VISION_TOWERS)}")
        vision_heads = known["num_attention_heads"]
    if vision_heads <= 0 or hidden % vision_heads:
        raise UrtError(f"vision hidden size {hidden} is not divisible by {vision_heads} heads")
    if known is not None and num_layers == known["num_hidden_layers"]:
        # The full tower was saved: LLaVA-NeXT deletes its last layer when it builds the model.
        last = f"{SRC_VISION}encoder.layers.{num_layers - 1}."
        drop += [k for k in state if k.startswith(last)]
        num_layers -= 1
    # so400m-patch14-384 has 27x27 positions (27*14 = 378): the patch convolution floors, so take the
    # nominal size from the table or the tower name when it gives the same grid.
    named = re.search(r"-(\d+)$", tower.rstrip("/"))
    for nominal in ((known or {}).get("image_size"), int(named.group(1)) if named else None):
        if nominal and nominal // patch == side:
            image_size = nominal
            break
    vision = dict(
        model_type="siglip_vision_model", hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=vision_heads, num_channels=channels,
        image_size=image_size, patch_size=patch, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        attention_dropout=0.0, vision_use_head=False,
    )
    return vision, drop


def _text_config(cfg: dict, state: dict, vocab_rows: int) -> dict:
    text = {k: cfg[k] for k in QWEN2_FIELDS if k in cfg}
    text["model_type"] = "qwen2"
    text["vocab_size"] = vocab_rows
    if text.get("rope_scaling") is None:
        text.pop("rope_scaling", None)
    if text.get("tie_word_embeddings") is None:
        text["tie_word_embeddings"] = "lm_head.weight" not in state
    return text


# ------------------------------------------------------------------------------------------------------
# tokenizer / processor


def _load_tokenizer(src: Path):
    from transformers import AddedToken, Qwen2Tokenizer

    if not (src / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (src / name).is_file():
                raise UrtError(f"missing tokenizer file {name} in {src} (and no tokenizer.json)")
    tok_cfg = _read_json(src / "tokenizer_config.json")
    tok_class = str(tok_cfg.get("tokenizer_class") or "Qwen2Tokenizer")
    if not tok_class.startswith("Qwen2Tokenizer"):
        raise UrtError(f"{src / 'tokenizer_config.json'}: tokenizer_class {tok_class!r}, expected Qwen2Tokenizer")
    try:
        # Not AutoTokenizer: it would follow config.json's model_type "llava" to the wrong class.
        tok = Qwen2Tokenizer.from_pretrained(str(src), image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN)
    except Exception as err:
        raise UrtError(f"cannot load the tokenizer from {src}: {err}") from None
    for name in (IM_START, IM_END):
        if _token_id(tok, name) is None:
            raise UrtError(f"the tokenizer in {src} has no {name} token (added_tokens.json / tokenizer_config.json)")
    # Both placeholders must be single, never-split special tokens (existing ids are kept).
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in (IMAGE_TOKEN, VIDEO_TOKEN)],
                   special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.init_kwargs.pop("local_files_only", None)  # do not bake this session's offline mode into the output
    return tok


def _token_id(tok, token: str) -> int | None:
    tid = tok.convert_tokens_to_ids(token)
    if tid is None or tid == tok.unk_token_id:
        return None
    return int(tid)


def _build_processor(tok, image_size: int, patch: int, pinpoints: list[list[int]], aspect: str):
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )
    from transformers.image_utils import PILImageResampling

    siglip = dict(
        size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        do_convert_rgb=True,
    )
    image_processor = LlavaOnevisionImageProcessor(image_grid_pinpoints=pinpoints, do_pad=True, **siglip)
    video_processor = LlavaOnevisionVideoProcessor(**siglip)
    return LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
        num_image_tokens=(image_size // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN, vision_aspect_ratio=aspect,
    )


def _generation_config(src: Path, tok, im_end: int):
    from transformers import GenerationConfig

    path = src / "generation_config.json"
    if path.is_file():
        try:
            gen = GenerationConfig.from_pretrained(str(src))
        except Exception as err:
            raise UrtError(f"cannot read {path}: {err}") from None
    else:
        gen = GenerationConfig()
    gen.eos_token_id = im_end
    pad = _token_id(tok, tok.pad_token) if tok.pad_token else None
    gen.pad_token_id = pad if pad is not None else _token_id(tok, ENDOFTEXT)
    return gen


# ------------------------------------------------------------------------------------------------------
# conversion


def _resize_rows(t, rows: int):
    """Pad an embedding-like matrix to `rows` rows with copies of its mean row (deterministic)."""
    import torch

    extra = rows - t.shape[0]
    mean = t.float().mean(dim=0, keepdim=True).to(t.dtype)
    return torch.cat([t, mean.expand(extra, -1)], dim=0)


def _dominant_dtype(state: dict):
    """The floating dtype holding most parameters (what the config records when no dtype is asked)."""
    counts: dict[Any, int] = {}
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else None


def _rename(state: dict, drop: list[str]) -> dict:
    dropped = set(drop) | {k for k in state if k.endswith(".rotary_emb.inv_freq")}
    out: dict[str, Any] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        if key in dropped:
            continue
        new = map_key(key)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise UrtError(f"{len(unmapped)} source weights match no rename rule (not a LLaVA-NeXT/OneVision "
                       f"checkpoint?): {', '.join(sorted(unmapped)[:20])}")
    return out


def convert_llava_next(src, out, *, dtype: str | None = None, overwrite: bool = False,
                       vision_heads: int | None = None) -> Path:
    """Convert the original LLaVA-NeXT/OneVision (Qwen2) folder `src` into a transformers
    LLaVA-OneVision folder `out` (model, processor, tokenizer, chat template, generation config).

    dtype: None keeps the source tensors' dtype; otherwise "float32" / "float16" / "bfloat16".
    vision_heads: number of SigLIP attention heads, needed only for towers outside KNOWN_VISION_TOWERS.
    Returns the output path. Raises UrtError for bad input, naming the file or key at fault.
    """
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UrtError(f"source folder {src} does not exist")
    if dtype is not None and dtype not in DTYPES:
        raise UrtError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if out.resolve() == src.resolve():
        raise UrtError(f"output folder {out} is the source folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UrtError(f"output {out} already exists (pass --overwrite to replace it)")

    cfg_path = src / "config.json"
    cfg = _read_json(cfg_path)
    _check_source_config(cfg, cfg_path)
    files = _weight_files(src)
    tok = _load_tokenizer(src)  # before the weights: fail fast on a broken folder
    state = _load_weights(files)

    vision, drop = _vision_config(cfg, state, vision_heads, cfg_path)
    pinpoints = _grid_pinpoints(cfg, vision["image_size"], cfg_path)
    aspect = str(cfg.get("image_aspect_ratio", "anyres_max_9"))

    # Token ids and vocabulary: the embedding matrix is usually padded past the tokenizer (Qwen2-7B:
    # 152064 rows); grow it only when the tokenizer (with <image>/<video>) does not fit.
    embed_key = "model.embed_tokens.weight"
    if embed_key not in state:
        raise UrtError(f"weights lack {embed_key}")
    rows = int(state[embed_key].shape[0])
    if len(tok) > rows:
        new_rows = -(-len(tok) // 64) * 64
        print(f"urt: tokenizer has {len(tok)} tokens > {rows} embedding rows; resizing to {new_rows}",
              file=sys.stderr)
        for key in (embed_key, "lm_head.weight"):
            if key in state:
                state[key] = _resize_rows(state[key], new_rows)
        rows = new_rows
    image_id, video_id, im_end = (_token_id(tok, t) for t in (IMAGE_TOKEN, VIDEO_TOKEN, IM_END))

    text = _text_config(cfg, state, rows)
    target_dtype = getattr(torch, dtype) if dtype else _dominant_dtype(state)
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=image_id, video_token_index=video_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
        multimodal_projector_bias=True, image_grid_pinpoints=pinpoints, vision_aspect_ratio=aspect,
        tie_word_embeddings=bool(text["tie_word_embeddings"]),
    )
    config.dtype = target_dtype
    config.text_config.dtype = target_dtype
    config.vision_config.dtype = target_dtype

    renamed = _rename(state, drop)
    del state
    if dtype is not None:
        renamed = {k: (v.to(target_dtype) if v.is_floating_point() else v) for k, v in renamed.items()}

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = set(expected_shapes)
    tied = {k for k in getattr(model, "_tied_weights_keys", None) or {}} if config.tie_word_embeddings else set()
    missing = sorted(expected - set(renamed) - tied)
    extra = sorted(set(renamed) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights the model needs: {', '.join(missing[:20])}")
        if extra:
            parts.append(f"{len(extra)} renamed weights the model does not have: {', '.join(extra[:20])}")
        raise UrtError(f"checkpoint in {src} does not match the config: " + "; ".join(parts))
    for key in renamed.keys() & tied:
        renamed.pop(key)
    wrong = [f"{k} {tuple(v.shape)} (config wants {expected_shapes[k]})"
             for k, v in renamed.items() if tuple(v.shape) != expected_shapes[k]]
    if wrong:
        raise UrtError(f"{len(wrong)} weights in {src} disagree in shape with {cfg_path.name}: "
                       + "; ".join(wrong[:10]))
    model.load_state_dict(renamed, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq, SigLIP position_ids) stay on meta: they are not saved.
    model.generation_config = _generation_config(src, tok, im_end)
    processor = _build_processor(tok, vision["image_size"], vision["patch_size"], pinpoints, aspect)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------------
# CLI


def _handler(args) -> int:
    path = convert_llava_next(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
                              vision_heads=args.vision_heads)
    print(path)
    return 0


def register_convert(models_subparsers) -> None:
    """Add `convert` to the `urt models` subcommand group."""
    p = models_subparsers.add_parser(
        "convert",
        help="convert an original checkpoint folder into a transformers folder",
        description="Convert an original LLaVA-NeXT/OneVision (Qwen2) checkpoint folder -- the layout of the "
                    "released UnifiedReward(-Think)-7b weights -- into a transformers LLaVA-OneVision folder "
                    "(AutoModelForImageTextToText + AutoProcessor).",
    )
    p.add_argument("--from", dest="source_format", choices=SOURCE_FORMATS, required=True,
                   help="layout of the input folder")
    p.add_argument("src", metavar="IN", help="the original checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep)")
    p.add_argument("--vision-heads", type=int, default=None, metavar="N",
                   help="SigLIP attention heads (only for towers urt does not know)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_handler)
