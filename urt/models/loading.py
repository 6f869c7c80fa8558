"""One way in: `load_model` gives a ModelBundle (model, processor, family) from "tiny", a local
checkpoint folder or a hub id, with the attention implementation chosen, parts frozen, optional
gradient checkpointing and LoRA. `save_pretrained` writes a plain HF folder (LoRA merged) that loads
with `AutoModelForImageTextToText` / `AutoProcessor` and no urt."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from urt.errors import UrtError
from urt.models import attention
from urt.models.bundle import ModelBundle, choose_attn_implementation, resolve_device
from urt.models.families import (
    FamilySpec,
    family_from_config,
    family_from_model_type,
    get_family,
    known_families,
)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DEFAULT_LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PARTS = ("vision", "projector", "language")


# Module classes whose forward is a chain of element-wise and reduction ops between matmuls (norms, gated
# MLPs): compiled, each becomes a few fused kernels instead of a dozen memory-bound passes.
COMPILE_REGION_SUFFIXES = ("RMSNorm", "MLP")


def compile_model_regions(model) -> list[str]:
    """Regional torch.compile: compile every RMSNorm and MLP module of `model` in place (dynamic shapes, so
    packed batches of any length reuse one graph). Attention stays eager: its varlen call reads sequence
    boundaries on the host. Returns the names of the compiled modules."""
    names = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith(COMPILE_REGION_SUFFIXES):
            module.compile(dynamic=True)
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------- dtype


def _resolve_dtype(dtype):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype if dtype is not None else "auto"
    name = str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise UrtError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return value


# ---------------------------------------------------------------------------------------------- parts


def part_parameters(model, family: str, part: str):
    """(name, parameter) pairs of one part: "vision", "projector", "language" (or "other")."""
    spec = get_family(family)
    for name, param in model.named_parameters():
        if spec.part_of(name) == part:
            yield name, param


def set_trainable(model, family: str, *, vision: bool, projector: bool, language: bool) -> dict[str, int]:
    """requires_grad per part; returns the number of trainable parameters per part."""
    flags = {"vision": vision, "projector": projector, "language": language, "other": language}
    spec = get_family(family)
    counts = {p: 0 for p in flags}
    for name, param in model.named_parameters():
        part = spec.part_of(name)
        param.requires_grad_(flags[part])
        if flags[part]:
            counts[part] += param.numel()
    return counts


def trainable_summary(model, family: str) -> dict[str, tuple[int, int]]:
    """part -> (trainable, total) parameter counts."""
    spec = get_family(family)
    out: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = "lora" if "lora_" in name else spec.part_of(name)
        row = out.setdefault(part, [0, 0])
        row[1] += param.numel()
        if param.requires_grad:
            row[0] += param.numel()
    return {k: (v[0], v[1]) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- lora


def lora_target_regex(family: str, projections=DEFAULT_LORA_PROJECTIONS) -> str:
    """peft target_modules regex: the language model's attention projections only (never the vision
    tower, whose SigLIP attention in LLaVA-OV uses the same q/k/v names)."""
    names = "|".join(re.escape(p) for p in projections)
    return get_family(family).lora_target_regex.format(names=names)


def apply_lora(model, family: str, lora: dict):
    from peft import LoraConfig, get_peft_model

    known = {"r", "alpha", "lora_alpha", "dropout", "lora_dropout", "target_modules", "bias"}
    unknown = set(lora) - known
    if unknown:
        raise UrtError(f"unknown LoRA option(s) {sorted(unknown)}; known: {sorted(known)}")
    r = int(lora.get("r", 8))
    targets = lora.get("target_modules")
    if targets is None:
        target = lora_target_regex(family)
    elif isinstance(targets, str):
        target = targets  # a user regex, used as given
    else:
        target = lora_target_regex(family, tuple(targets))
    cfg = LoraConfig(
        r=r,
        lora_alpha=lora.get("alpha", lora.get("lora_alpha", 2 * r)),
        lora_dropout=float(lora.get("dropout", lora.get("lora_dropout", 0.0))),
        target_modules=target,
        bias=lora.get("bias", "none"),
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as err:
        raise UrtError(f"LoRA target_modules {target!r} matched nothing in the {family} model: {err}") from None


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


# ---------------------------------------------------------------------------------------------- load


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or os.sep in name.strip("/").replace("/", "", 1)
        or (os.altsep is not None and os.altsep in name)
        or name.count("/") > 1
    )


def _check_local_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise UrtError(f"{folder}: config.json not found; is this a Hugging Face checkpoint folder?")
    if not any((folder / f).is_file() for f in WEIGHT_FILES) and not list(folder.glob("*.safetensors")):
        raise UrtError(
            f"{folder}: no model weights found (expected model.safetensors, model.safetensors.index.json "
            f"or pytorch_model.bin)"
        )
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise UrtError(f"{path}: cannot read {name} as JSON ({err})") from None


def _hub_error(name: str, err: Exception) -> UrtError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in ("", "0")
    how = " (offline mode: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)" if offline else ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UrtError(
        f"model {name!r} could not be reached or found on the Hugging Face hub{how} and is not a local "
        f"folder; check the id, your network and HF_TOKEN, or pass a local checkpoint folder [{type(err).__name__}: {first[:200]}]"
    )


def _hub_family(name: str, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except UrtError:
        raise
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
        if "model_type" in str(err) and ("llava_qwen" in str(err) or "Unrecognized" in str(err)):
            try:
                from huggingface_hub import hf_hub_download

                raw = json.loads(Path(hf_hub_download(name, "config.json")).read_text())
                return family_from_model_type(raw.get("model_type"), raw.get("architectures"), source=name)
            except UrtError:
                raise
            except Exception:  # noqa: BLE001
                pass
        raise _hub_error(name, err) from None
    return family_from_model_type(getattr(cfg, "model_type", None), getattr(cfg, "architectures", None), source=name)


def _from_pretrained(source: str, spec: FamilySpec, *, attn: str, dtype, trust_remote_code: bool, hub: bool,
                     meta: bool = False):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        if meta:  # the architecture only, no weight read: they arrive from rank 0 (urt.stages.sharded)
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                stored = getattr(config, "dtype", None) if dtype == "auto" else dtype  # what rank 0 reads
                model = AutoModelForImageTextToText.from_config(
                    config, attn_implementation=attn, trust_remote_code=trust_remote_code,
                    **({"dtype": stored} if isinstance(stored, torch.dtype) else {}))
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                source, attn_implementation=attn, dtype=dtype, trust_remote_code=trust_remote_code
            )
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except UrtError:
        raise
    except ImportError:
        raise  # e.g. flash_attention_2 requested without flash_attn: the message says what to install
    except Exception as err:  # noqa: BLE001
        if hub:
            raise _hub_error(source, err) from None
        raise UrtError(f"{source}: cannot load the {spec.name} checkpoint: {type(err).__name__}: {err}") from None
    return model, processor


def load_model(
    name_or_path: str,
    family: str | None = None,
    *,
    attn_implementation: str = "auto",
    dtype="auto",
    device: str | torch.device = "auto",
    freeze_vision: bool = True,
    freeze_projector: bool = True,
    freeze_language: bool = False,
    gradient_checkpointing: bool = False,
    lora: dict | None = None,
    compile_regions: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    vision_init_std: float | None = None,
    meta: bool = False,
) -> ModelBundle:
    """Load a model + processor.

    name_or_path: "tiny" (a random tiny model of `family`, see urt.models.tiny; `seed` and
    `vision_init_std` apply only there), a local checkpoint folder (family from config.json unless
    given) or a hub id. Freezing sets requires_grad per part (vision tower / projector / language model
    incl. lm_head). `lora` (dict: r, alpha, dropout, target_modules) wraps the model with peft; the
    default targets are the language model's q/k/v/o projections; base weights are then frozen except
    the vision tower / projector when their freeze flag is False. `compile_regions` torch.compiles the
    RMSNorm and MLP modules (`compile_model_regions`; on an H200 with a 3B model it took the SFT step from
    38% to 45% MFU). `meta`: build a checkpoint's architecture on the meta device without reading its
    weights (the sharded strategy's ranks other than each node's first, which receive them from rank 0).
    """
    if family is not None:
        get_family(family)
    device = resolve_device(device)
    attn = choose_attn_implementation(attn_implementation, device)
    torch_dtype = _resolve_dtype(dtype)
    name = str(name_or_path)

    if name == "tiny":
        if family is None:
            raise UrtError(f"name_or_path 'tiny' needs a family; known families: {known_families()}")
        from urt.models.tiny import build_tiny

        # flash-attention needs the final device and a half dtype: build with sdpa, switch after moving.
        build_attn = "sdpa" if attn.startswith("flash") else attn
        bundle = build_tiny(family, seed=seed, attn_implementation=build_attn, vision_init_std=vision_init_std)
        model, processor = bundle.model, bundle.processor
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
        if build_attn != attn:
            model = model.to(device)
            model.set_attn_implementation(attn)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            _check_local_folder(path)
            inferred = family_from_config(path)
            if family is not None and family != inferred:
                raise UrtError(
                    f"{path / 'config.json'} is a {inferred} checkpoint, but family {family!r} was requested"
                )
            family = inferred
            model, processor = _from_pretrained(
                str(path), get_family(family), attn=attn, dtype=torch_dtype,
                trust_remote_code=trust_remote_code, hub=False, meta=meta,
            )
        elif path.exists():
            raise UrtError(f"{path}: is a file, expected a checkpoint folder or a hub id")
        elif _looks_like_path(name):
            raise UrtError(f"{path}: checkpoint folder not found")
        else:
            inferred = _hub_family(name, trust_remote_code)
            if family is not None and family != inferred:
                raise UrtError(f"hub model {name!r} is a {inferred} checkpoint, but family {family!r} was requested")
            family = inferred
            model, processor = _from_pretrained(
                name, get_family(family), attn=attn, dtype=torch_dtype,
                trust_remote_code=trust_remote_code, hub=True, meta=meta,
            )

    if not any(p.is_meta for p in model.parameters()):
        model = model.to(device)
    if attn in (attention.VARLEN, "sdpa"):
        attention.use_varlen_in_vision(model)
    # a hybrid model's packed rows must not carry linear-attention state from one sample into the next,
    # whoever packs them (the hooks leave unpacked and cached forwards alone); a no-op for other families
    from urt.models.hybrid import isolate_packed_samples

    isolate_packed_samples(model)
    set_trainable(
        model, family, vision=not freeze_vision, projector=not freeze_projector, language=not freeze_language
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        # transformers also hooks every sub-model's input embeddings to require grad (needed only by reentrant
        # checkpointing): with a frozen vision tower that back-propagates through the whole tower every step
        # (measured on an H100 with a 3B model: the SFT step took 5.7 s instead of 2.8 s). Non-reentrant
        # checkpointing gets parameter gradients without it, LoRA included.
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()
    if lora:
        model = apply_lora(model, family, dict(lora))
        # peft froze every base weight; give back the parts the caller wants fully trained.
        spec = get_family(family)
        for pname, param in model.named_parameters():
            if "lora_" in pname:
                continue
            part = spec.part_of(pname)
            if (part == "vision" and not freeze_vision) or (part == "projector" and not freeze_projector):
                param.requires_grad_(True)
    if compile_regions:
        if not compile_model_regions(model):
            raise UrtError(f"compile_regions: no RMSNorm or MLP module found in the {family} model")
    return ModelBundle(model=model, processor=processor, family=family)


# ---------------------------------------------------------------------------------------------- save


def merged_model(model, *, in_place: bool = False):
    """The plain transformers model: LoRA merged into the base weights (on a copy unless in_place)."""
    if not is_peft_model(model):
        return model
    target = model if in_place else copy.deepcopy(model)
    return target.merge_and_unload()


def save_pretrained(bundle: ModelBundle, out_dir: str | Path, *, merge_in_place: bool = False) -> Path:
    """Write a plain HF folder (config, safetensors weights, processor, tokenizer, chat template) that
    `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` load without urt.
    A LoRA model is merged first (on a copy, unless merge_in_place)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = merged_model(bundle.model, in_place=merge_in_place)
    was_cache = getattr(model.config, "use_cache", None)
    if was_cache is False:
        model.config.use_cache = True  # a saved checkpoint is for inference by default
    try:
        model.save_pretrained(out)
    finally:
        if was_cache is False:
            model.config.use_cache = False
    bundle.processor.save_pretrained(out)
    return out
