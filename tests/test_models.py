"""urt.models: families, tiny offline models (all four families), chat templates, loading errors,
attention choice, freezing, LoRA, saving to plain HF folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from urt.errors import UrtError
from urt.models import (
    FAMILIES,
    ModelBundle,
    build_tiny,
    choose_attn_implementation,
    family_from_config,
    get_family,
    load_model,
    save_pretrained,
)
from urt.models import bundle as bundle_mod
from urt.models import loading as loading_mod
from urt.models.tokenizer import BPE_FILE, CORPUS_FILE, bpe_to_json, load_tiny_tokenizer, train_bpe

ALL = list(FAMILIES)
QWEN = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]
# Image side giving 16 tokens (Qwen) / one base crop (LLaVA-OV); video frame side.
IMAGE_SIDE = {"qwen2_5_vl": 112, "qwen3_vl": 128, "qwen3_5": 128, "llava_onevision": 56}
FRAME_SIDE = {"qwen2_5_vl": 56, "qwen3_vl": 64, "qwen3_5": 64, "llava_onevision": 56}

_CACHE: dict[str, ModelBundle] = {}


def tiny(family: str) -> ModelBundle:
    """One seed-0 tiny model per family for the whole module (tests must not modify it)."""
    if family not in _CACHE:
        _CACHE[family] = build_tiny(family, seed=0)
    return _CACHE[family]


def _images(n: int, side: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _frames(side: int, n: int = 4, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def make_inputs(processor, family: str, kind: str):
    """Processor inputs for a user turn with 1 image / 2 images / a 4-frame video and an answer."""
    if kind == "video":
        items = [{"type": "video"}]
    else:
        items = [{"type": "image"}] * (1 if kind == "one" else 2)
    msgs = [
        {"role": "user", "content": items + [{"type": "text", "text": "Which is better?"}]},
        {"role": "assistant", "content": "<think>ok</think><answer>Image 1 is better</answer>"},
    ]
    text = processor.apply_chat_template(msgs, tokenize=False)
    kw = {}
    if kind == "video":
        kw["videos"] = [_frames(FRAME_SIDE[family])]
        if family != "llava_onevision":
            from transformers.video_utils import VideoMetadata

            kw["video_metadata"] = [VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])]
    else:
        kw["images"] = _images(1 if kind == "one" else 2, IMAGE_SIDE[family])
    return processor(text=[text], return_tensors="pt", **kw)


# ------------------------------------------------------------------------------------------ families


def test_registry_and_specs():
    assert set(FAMILIES) == {"llava_onevision", "qwen2_5_vl", "qwen3_vl", "qwen3_5"}
    assert get_family("llava_onevision").prompt_set == "paper"
    assert get_family("qwen2_5_vl").prompt_set == "paper"
    assert get_family("qwen3_vl").prompt_set == "qwen3"
    assert get_family("qwen3_5").prompt_set == "qwen3"
    assert "CodeGoat24/UnifiedReward-Think-7b" in get_family("llava_onevision").hub_ids
    assert all(spec.supported for spec in FAMILIES.values())  # transformers 5.24 has all four
    assert all(spec.packing_safe for spec in FAMILIES.values())  # qwen3_5 through urt.models.hybrid


def test_unknown_family_lists_known():
    with pytest.raises(UrtError) as err:
        get_family("qwen9")
    msg = str(err.value)
    assert "qwen9" in msg and all(f in msg for f in ALL)
    with pytest.raises(UrtError, match="llava_onevision"):
        load_model("tiny", "nope")
    with pytest.raises(UrtError, match="needs a family"):
        load_model("tiny")


@pytest.mark.parametrize("family", ALL)
def test_parts_cover_the_real_module_names(family):
    model = tiny(family).model
    spec = get_family(family)
    parts = {}
    for name, p in model.named_parameters():
        parts.setdefault(spec.part_of(name), 0)
        parts[spec.part_of(name)] += p.numel()
    assert set(parts) == {"vision", "projector", "language"}, parts
    assert sum(parts.values()) < 2_000_000


# ------------------------------------------------------------------------------------------ tokenizer


def test_committed_tokenizer_rebuilds_identically():
    assert BPE_FILE.stat().st_size + CORPUS_FILE.stat().st_size < 300_000
    rebuilt = bpe_to_json(train_bpe(CORPUS_FILE.read_text(encoding="utf-8")))
    assert rebuilt == BPE_FILE.read_text(encoding="utf-8")


def test_tiny_tokenizer_tokens():
    tok = load_tiny_tokenizer("qwen2_5_vl")
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert 2000 < len(tok) < 2100
    for t in ("<|image_pad|>", "<|video_pad|>", "<image>", "<video>", "<think>", "</answer>"):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    text = "<think>Image 1: 9/10</think><answer>Image 1 is better</answer>"
    ids = tok(text).input_ids
    # the tags are ordinary added tokens: skipping special tokens keeps them (the reward parses them)
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


USER = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
VIDEO_USER = [{"type": "video"}, {"type": "text", "text": "Describe."}]
VS = "<|vision_start|><|image_pad|><|vision_end|>"
VV = "<|vision_start|><|video_pad|><|vision_end|>"
SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.mark.parametrize(
    "family, expected",
    [
        ("qwen2_5_vl", SYS + f"<|im_start|>user\n{VS}{VS}Compare.<|im_end|>\n<|im_start|>assistant\n"),
        ("qwen3_vl", f"<|im_start|>user\n{VS}{VS}Compare.<|im_end|>\n<|im_start|>assistant\n"),
        ("qwen3_5", f"<|im_start|>user\n{VS}{VS}Compare.<|im_end|>\n<|im_start|>assistant\n<think>\n"),
        ("llava_onevision", SYS + "<|im_start|>user\n<image>\n<image>\nCompare.<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_chat_template_generation_prompt(family, expected):
    tok = load_tiny_tokenizer(family)
    msgs = [{"role": "user", "content": USER}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected


@pytest.mark.parametrize(
    "family, expected",
    [
        ("qwen2_5_vl", SYS + f"<|im_start|>user\n{VV}Describe.<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
        ("qwen3_vl", f"<|im_start|>user\n{VV}Describe.<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
        ("qwen3_5", f"<|im_start|>user\n{VV}Describe.<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
        ("llava_onevision", SYS + "<|im_start|>user\n<video>\nDescribe.<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
    ],
)
def test_chat_template_video_and_assistant(family, expected):
    tok = load_tiny_tokenizer(family)
    msgs = [{"role": "user", "content": VIDEO_USER}, {"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == expected


def test_chat_template_system_and_string_content():
    msgs = [{"role": "system", "content": "Judge."}, {"role": "user", "content": "Hi"}]
    want = "<|im_start|>system\nJudge.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    for family in ALL:
        assert load_tiny_tokenizer(family).apply_chat_template(msgs, tokenize=False) == want, family
    no_think = load_tiny_tokenizer("qwen3_5").apply_chat_template(
        msgs[1:], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    vid = load_tiny_tokenizer("qwen2_5_vl").apply_chat_template(
        [{"role": "user", "content": USER}], tokenize=False, add_vision_id=True
    )
    assert f"Picture 1: {VS}Picture 2: {VS}Compare." in vid


# ------------------------------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("kind", ["one", "two", "video"])
def test_tiny_forward_finite_loss(family, kind):
    bundle = tiny(family)
    enc = make_inputs(bundle.processor, family, kind)
    pad_id = bundle.model.config.image_token_id if family != "llava_onevision" else None
    if kind != "video":
        n_img = int((enc["input_ids"] == (pad_id or bundle.model.config.image_token_index)).sum())
        assert n_img >= 16 * (1 if kind == "one" else 2)
    with torch.no_grad():
        out = bundle.model(**enc, labels=enc["input_ids"].clone())
    assert torch.isfinite(out.loss)
    assert out.logits.shape[:2] == enc["input_ids"].shape


def test_same_seed_same_weights_and_vision_init():
    a = build_tiny("qwen2_5_vl", seed=0).model.state_dict()
    b = tiny("qwen2_5_vl").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = build_tiny("qwen2_5_vl", seed=1).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)
    d = build_tiny("qwen2_5_vl", seed=0, vision_init_std=0.1).model.state_dict()
    w = "model.visual.blocks.0.attn.qkv.weight"
    assert abs(float(d[w].std()) - 0.1) < 0.01 and float(a[w].std()) < 0.05
    assert torch.equal(d["model.visual.merger.mlp.0.weight"], a["model.visual.merger.mlp.0.weight"])
    assert torch.equal(d["lm_head.weight"], a["lm_head.weight"])


# ------------------------------------------------------------------------------------------ round trip

CHILD = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.video_utils import VideoMetadata

    spec = json.loads(sys.argv[1])
    out = {}
    for family, folder in spec["folders"].items():
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        proc = AutoProcessor.from_pretrained(folder)
        side = spec["image_side"][family]
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(2)]
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                 {"type": "text", "text": "Which is better?"}]},
                {"role": "assistant", "content": "<think>ok</think><answer>Image 1 is better</answer>"}]
        text = proc.apply_chat_template(msgs, tokenize=False)
        enc = proc(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        gen_msgs = msgs[:1]
        prompt = proc.apply_chat_template(gen_msgs, tokenize=False, add_generation_prompt=True)
        genc = proc(text=[prompt], images=images, return_tensors="pt")
        gen = model.generate(**genc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        out[family] = {"input_ids": enc["input_ids"], "logits": logits, "n_new": gen.shape[1] - genc["input_ids"].shape[1],
                       "model_class": type(model).__name__, "processor_class": type(proc).__name__}
    assert not any(m == "urt" or m.startswith("urt.") for m in sys.modules), "urt was imported"
    torch.save(out, spec["result"])
    """
)


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """`urt models tiny` for every family, then ONE subprocess (plain transformers, no urt) that loads
    each folder, computes logits on a 2-image input and generates 4 tokens."""
    from urt.cli import main

    root = tmp_path_factory.mktemp("tiny")
    folders = {}
    for family in ALL:
        folders[family] = str(root / family)
        assert main(["models", "tiny", "--family", family, "--out", folders[family], "--seed", "0"]) == 0
    result = root / "result.pt"
    spec = {"folders": folders, "image_side": IMAGE_SIDE, "result": str(result)}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], cwd=root, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folders, torch.load(result, weights_only=False)


@pytest.mark.parametrize("family", ALL)
def test_tiny_folder_reloads_without_urt(family, reloaded):
    folders, results = reloaded
    res = results[family]
    spec = get_family(family)
    assert res["model_class"] == spec.model_class
    assert res["processor_class"] == spec.processor_class
    assert res["n_new"] == 4
    assert family_from_config(folders[family]) == family
    bundle = tiny(family)
    enc = make_inputs(bundle.processor, family, "two")
    assert torch.equal(enc["input_ids"], res["input_ids"])
    with torch.no_grad():
        logits = bundle.model(**enc).logits
    torch.testing.assert_close(logits, res["logits"], atol=1e-5, rtol=0)


def test_load_model_from_tiny_folder(reloaded):
    folders, _ = reloaded
    bundle = load_model(folders["qwen3_vl"])
    assert bundle.family == "qwen3_vl"
    assert type(bundle.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert bundle.model.config._attn_implementation == "sdpa"
    with pytest.raises(UrtError, match="qwen3_vl checkpoint"):
        load_model(folders["qwen3_vl"], "qwen2_5_vl")


# ------------------------------------------------------------------------------------------ errors


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UrtError, match="config.json"):
        load_model(str(tmp_path))
    with pytest.raises(UrtError, match="config.json"):
        family_from_config(tmp_path)


def test_missing_weights_and_bad_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(UrtError, match="model.safetensors"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UrtError, match=r"config\.json"):
        family_from_config(tmp_path)


def test_unknown_model_type_and_llava_next_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UrtError, match="bert.*known families"):
        family_from_config(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "architectures": ["LlavaQwenForCausalLM"]})
    )
    with pytest.raises(UrtError, match="urt models convert --from llava_next IN --out OUT"):
        family_from_config(tmp_path)


def test_missing_local_folder(tmp_path):
    with pytest.raises(UrtError, match="not found"):
        load_model(str(tmp_path / "nope" / "ckpt"))


def test_offline_hub_id_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "urt-test-nobody/definitely-not-a-model-123"
    with pytest.raises(UrtError) as err:
        load_model(name)
    assert name in str(err.value) and "could not be reached or found" in str(err.value)
    assert err.value.__cause__ is None  # no network stack trace chained


# ------------------------------------------------------------------------------------------ attention


def test_choose_attn_implementation(monkeypatch):
    monkeypatch.setattr(bundle_mod, "_flash_attn_available", lambda: True)
    assert choose_attn_implementation("auto", "cuda") == "flash_attention_2"
    assert choose_attn_implementation("auto", torch.device("cuda", 0)) == "flash_attention_2"
    assert choose_attn_implementation("auto", "cpu") == "sdpa"
    monkeypatch.setattr(bundle_mod, "_flash_attn_available", lambda: False)
    # no flash-attn: torch's own varlen flash kernel where this torch has it, sdpa otherwise
    monkeypatch.setattr(loading_mod.attention, "varlen_available", lambda device: True)
    assert choose_attn_implementation("auto", "cuda:0") == "urt_varlen"
    assert choose_attn_implementation("auto", "cpu") == "sdpa"
    monkeypatch.setattr(loading_mod.attention, "varlen_available", lambda device: False)
    assert choose_attn_implementation("auto", "cuda:0") == "sdpa"
    assert choose_attn_implementation(None, "cpu") == "sdpa"
    assert choose_attn_implementation("eager", "cuda") == "eager"
    assert choose_attn_implementation("flash_attention_2", "cpu") == "flash_attention_2"


def test_eager_attention_passes_through():
    bundle = load_model("tiny", "qwen2_5_vl", attn_implementation="eager")
    assert bundle.model.config._attn_implementation == "eager"


# ------------------------------------------------------------------------------------------ freezing


def _grad_parts(bundle):
    spec = get_family(bundle.family)
    out = {}
    for name, p in bundle.model.named_parameters():
        part = "lora" if "lora_" in name else spec.part_of(name)
        out.setdefault(part, set()).add(p.requires_grad)
    return out


@pytest.mark.parametrize("family", ["llava_onevision", "qwen3_vl"])
def test_freezing_flags(family):
    default = _grad_parts(load_model("tiny", family))
    assert default == {"vision": {False}, "projector": {False}, "language": {True}}
    proj = _grad_parts(load_model("tiny", family, freeze_projector=False, freeze_language=True))
    assert proj == {"vision": {False}, "projector": {True}, "language": {False}}
    full = _grad_parts(load_model("tiny", family, freeze_vision=False, freeze_projector=False))
    assert full == {"vision": {True}, "projector": {True}, "language": {True}}


def test_gradient_checkpointing_trains():
    bundle = load_model("tiny", "qwen2_5_vl", gradient_checkpointing=True)
    assert bundle.model.is_gradient_checkpointing
    bundle.model.train()
    enc = make_inputs(bundle.processor, "qwen2_5_vl", "one")
    loss = bundle.model(**enc, labels=enc["input_ids"].clone(), use_cache=False).loss
    loss.backward()
    grads = [p.grad for n, p in bundle.model.named_parameters() if n.startswith("model.language_model.")]
    assert all(g is not None for g in grads)
    assert all(p.grad is None for n, p in bundle.model.named_parameters() if n.startswith("model.visual."))
    # the frozen vision tower is not part of the backward graph at all (transformers' input-grad hook on its
    # patch embedding would make every step back-propagate through it)
    seen = []
    h = bundle.model.model.visual.patch_embed.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        bundle.model(**enc, labels=enc["input_ids"].clone(), use_cache=False)
    finally:
        h.remove()
    assert seen == [False]


# ------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("family", ["llava_onevision", "qwen3_5"])
def test_lora_targets_language_projections_only(family):
    bundle = load_model("tiny", family, lora={"r": 4, "alpha": 8})
    lora_modules = [n for n, _ in bundle.model.named_modules() if n.endswith(".lora_A")]
    assert lora_modules
    for name in lora_modules:
        assert ".language_model.layers." in name and ".self_attn." in name, name
        assert name.split(".self_attn.")[1].split(".")[0] in {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any("vision_tower" in n or "visual" in n for n in lora_modules)
    parts = _grad_parts(bundle)
    assert parts["lora"] == {True}
    assert parts["language"] == parts["vision"] == parts["projector"] == {False}
    if family == "qwen3_5":  # only the full-attention layer has q/k/v/o projections
        assert {n.split(".layers.")[1].split(".")[0] for n in lora_modules} == {"3"}


def test_lora_with_trainable_projector():
    bundle = load_model("tiny", "qwen2_5_vl", lora={"r": 2}, freeze_projector=False)
    parts = _grad_parts(bundle)
    assert parts["projector"] == {True} and parts["vision"] == {False} and parts["language"] == {False}
    with pytest.raises(UrtError, match="unknown LoRA option"):
        load_model("tiny", "qwen2_5_vl", lora={"rank": 2})


def test_lora_save_merges(tmp_path):
    bundle = load_model("tiny", "llava_onevision", lora={"r": 4})
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    enc = make_inputs(bundle.processor, "llava_onevision", "one")
    bundle.model.eval()
    with torch.no_grad():
        want = bundle.model(**enc).logits
        base = tiny("llava_onevision").model(**enc).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter does something
    out = save_pretrained(bundle, tmp_path / "merged")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or k.startswith("base_model") for k in keys)
    reloaded = load_model(str(out))
    assert reloaded.family == "llava_onevision"
    with torch.no_grad():
        got = reloaded.model(**enc).logits
    # merging W + BA changes float rounding: equal up to ~1e-5 (observed), not bit-exact
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the in-memory bundle is still a LoRA model (merge happened on a copy)
    assert any("lora_A" in n for n, _ in bundle.model.named_parameters())


def test_dtype_option():
    bundle = load_model("tiny", "qwen2_5_vl", dtype="bfloat16")
    assert bundle.model.dtype == torch.bfloat16
    with pytest.raises(UrtError, match="dtype"):
        load_model("tiny", "qwen2_5_vl", dtype="float13")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_list(capsys):
    from urt.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for spec in FAMILIES.values():
        assert spec.name in out and spec.model_class in out
    assert "CodeGoat24/UnifiedReward-Think-qwen3vl-8b" in out


def test_cli_tiny_refuses_non_empty_folder(tmp_path, capsys):
    from urt.cli import main

    (tmp_path / "x").write_text("x")
    assert main(["models", "tiny", "--family", "qwen2_5_vl", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_hf_llava_1_5_is_not_mistaken_for_llava_next(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]})
    )
    with pytest.raises(UrtError, match="not a known family"):
        family_from_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_qwen"}))
    with pytest.raises(UrtError, match="urt models convert"):
        family_from_config(tmp_path)


def test_gradient_checkpointing_with_lora():
    bundle = load_model("tiny", "qwen3_vl", gradient_checkpointing=True, lora={"r": 2})
    bundle.model.train()
    enc = make_inputs(bundle.processor, "qwen3_vl", "one")
    bundle.model(**enc, labels=enc["input_ids"].clone(), use_cache=False).loss.backward()
    grads = {n: p.grad for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert any(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.slow
def test_compile_regions_same_logits():
    """load_model(compile_regions=True): the RMSNorm and MLP modules of both towers are compiled and a
    packed forward gives eager's logits (torch.compile on CPU: ~30 s)."""
    from test_data_collate import encoded
    from urt.data.collate import make_collator, model_inputs

    eager = load_model("tiny", "qwen2_5_vl", device="cpu")
    compiled = load_model("tiny", "qwen2_5_vl", device="cpu", compile_regions=True)
    names = [n for n, m in compiled.model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert any(n.startswith("model.language_model.") and n.endswith(".mlp") for n in names)
    assert any(n.startswith("model.visual.") and n.endswith(".norm1") for n in names)
    assert "model.language_model.norm" in names
    batch = model_inputs(make_collator("packed", eager)(encoded("qwen2_5_vl")))
    with torch.no_grad():
        want = eager.model(**batch, use_cache=False).logits
        got = compiled.model(**batch, use_cache=False).logits
    assert (got - want).abs().max().item() <= 1e-4
