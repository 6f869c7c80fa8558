"""`urt models convert --from llava_next`: a tiny checkpoint written here in the ORIGINAL LLaVA-NeXT layout
(config.json with LLaVA's field names, safetensors with LLaVA's key names, a Qwen2 tokenizer in the
vocab.json/merges.txt/added_tokens.json form) is converted, then loaded with plain transformers in a
subprocess that never imports urt, and compared with the HF model the weights came from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from urt.errors import UrtError
from urt.models.convert_llava import CHAT_TEMPLATE, convert_llava_next, map_key, register_convert

REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CORPUS = [
    "You are a helpful assistant.",
    "Given a caption and two images generated based on this caption, please analyze in detail.",
    "Image 1 is better. Image 2 is better. Answer 1 is better. Answer 2 is better.",
    "<think>Semantic Consistency: Image 1 (8/10), Image 2 (6/10).</think> <answer>Image 1 is better</answer>",
    "What is shown in this image? A red circle next to a small cat on a table.",
]
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]  # symmetric, so (w,h) vs (h,w) order is moot
TOWER = "local/tiny-siglip-patch14-56"
HEADS = 4
VOCAB_ROWS = 384  # embedding padded past the tokenizer, as Qwen2-7B's 152064 rows are

# The inverse of the converter's mapping, written independently: HF LLaVA-OneVision name prefix ->
# the original LLaVA-NeXT name prefix.
HF_TO_ORIGINAL = [
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.image_newline", "model.image_newline"),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
]


def to_original(key: str) -> str:
    for hf, orig in HF_TO_ORIGINAL:
        if key.startswith(hf):
            return orig + key[len(hf):]
    raise AssertionError(f"no inverse rule for {key}")


def write_tokenizer(d: Path) -> dict[str, int]:
    """A Qwen2 tokenizer in the file form of the released LLaVA folders; returns the added tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    n = len(vocab)
    added = {"<|endoftext|>": n, "<|im_start|>": n + 1, "<|im_end|>": n + 2, "<image>": n + 3}
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (d / "added_tokens.json").write_text(json.dumps(added))
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in added.items()}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }))
    special = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (d / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": {**special, "content": "<|im_end|>"}, "pad_token": {**special, "content": "<|endoftext|>"},
    }))
    return added


def original_config(added: dict[str, int], rows: int) -> dict:
    """config.json with the field names of the released LLaVA-OneVision / UnifiedReward folders."""
    return {
        "_name_or_path": "lmms-lab/llava-onevision-qwen2-7b-ov", "architectures": ["LlavaQwenForCausalLM"],
        "attention_dropout": 0.0, "bos_token_id": added["<|endoftext|>"], "eos_token_id": added["<|im_end|>"],
        "hidden_act": "silu", "hidden_size": 64, "image_aspect_ratio": "anyres_max_9",
        "image_crop_resolution": None, "image_grid_pinpoints": PINPOINTS, "image_split_resolution": None,
        "image_token_index": added["<image>"], "initializer_range": 0.02, "intermediate_size": 128,
        "max_position_embeddings": 512, "max_window_layers": 2, "mm_hidden_size": 64,
        "mm_newline_position": "grid", "mm_patch_merge_type": "spatial_unpad", "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None, "mm_spatial_pool_mode": "bilinear",
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": TOWER, "mm_vision_tower_lr": 2e-06, "model_type": "llava",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "pos_skipping_range": 4096,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512,
        "tie_word_embeddings": False, "tokenizer_model_max_length": 32768, "tokenizer_padding_side": "right",
        "torch_dtype": "float32", "transformers_version": "4.40.0.dev0", "use_cache": True, "use_mm_proj": True,
        "use_pos_skipping": False, "use_sliding_window": False, "vision_tower_pretrained": None,
        "vocab_size": rows,
    }


def reference_model(image_id: int, video_id: int, rows: int):
    """The HF model whose weights the original-layout checkpoint is written from. LLaVA-NeXT takes
    hidden_states[-1] of the (already truncated) SigLIP tower without its head: vision_feature_layer=-1."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=HEADS, image_size=56, patch_size=14,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=rows, rope_theta=1e6,
                         max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False),
        image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_token_index=image_id, video_token_index=video_id, vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, dtype=torch.float32,
                                                                attn_implementation="eager")
    with torch.no_grad():  # random, not init-default (zeros/ones), so that every weight is checked
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_original(d: Path, model, added: dict[str, int], *, rows: int, extra: dict | None = None) -> dict:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    write_tokenizer(d)
    state = {to_original(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:rows].clone()
    state["lm_head.weight"] = state["lm_head.weight"][:rows].clone()
    # Old checkpoints carry rotary buffers; LLaVA never uses them.
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    state.update(extra or {})
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(d / name), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (d / "config.json").write_text(json.dumps(original_config(added, rows), indent=2))
    (d / "generation_config.json").write_text(json.dumps({
        "_from_model_config": True, "bos_token_id": added["<|endoftext|>"],
        "eos_token_id": added["<|endoftext|>"], "transformers_version": "4.40.0.dev0"}))
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_llava")
    probe = root / "probe"
    probe.mkdir()
    added = write_tokenizer(probe)
    image_id, video_id = added["<image>"], added["<image>"] + 1  # <video> is added after <image>
    model = reference_model(image_id, video_id, VOCAB_ROWS)
    src = root / "orig"
    state = write_original(src, model, added, rows=VOCAB_ROWS)
    out = convert_llava_next(src, root / "hf", vision_heads=HEADS)
    return dict(root=root, src=src, out=out, model=model, added=added, state=state,
                image_id=image_id, video_id=video_id)


CHECK = textwrap.dedent(r"""
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    out, dump = sys.argv[1], sys.argv[2]
    assert "urt" not in sys.modules
    model = AutoModelForImageTextToText.from_pretrained(out, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(out)
    rng = np.random.default_rng(0)
    img = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                        {"type": "text", "text": "Which is better?"}]}]
    res = {"class": type(model).__name__, "processor": type(proc).__name__,
           "tokenizer": type(proc.tokenizer).__name__,
           "image_token_id": proc.image_token_id, "video_token_id": proc.video_token_id,
           "cfg_image": model.config.image_token_id, "cfg_video": model.config.video_token_id,
           "eos": model.generation_config.eos_token_id,
           "im_end": proc.tokenizer.convert_tokens_to_ids("<|im_end|>"),
           "text_one": proc.apply_chat_template(one, add_generation_prompt=True),
           "text_two_tok": proc.tokenizer.apply_chat_template(two, add_generation_prompt=False, tokenize=False),
           "size": {"height": proc.image_processor.size.height, "width": proc.image_processor.size.width},
           "mean": list(proc.image_processor.image_mean),
           "pinpoints": proc.image_processor.image_grid_pinpoints, "num_image_tokens": proc.num_image_tokens}
    batches = {}
    with torch.no_grad():
        for name, msgs, images in (("one", one, [[img(84, 112)]]), ("two", two, [[img(56, 56), img(70, 40)]])):
            text = proc.apply_chat_template(msgs, add_generation_prompt=True)
            enc = proc(images=images, text=text, return_tensors="pt")
            logits = model(**enc).logits
            batches[name] = {"inputs": dict(enc), "logits": logits}
            res["n_image_tokens_" + name] = int((enc["input_ids"] == proc.image_token_id).sum())
    torch.save({"batches": batches, "state": model.state_dict()}, dump)
    print(json.dumps(res))
""")


def test_converted_folder_loads_plainly_and_matches_source(tiny):
    out: Path = tiny["out"]
    dump = tiny["root"] / "dump.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", CHECK, str(out), str(dump)], capture_output=True, text=True,
                          env=env, cwd=str(tiny["root"]), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["class"] == "LlavaOnevisionForConditionalGeneration"
    assert res["processor"] == "LlavaOnevisionProcessor"
    assert res["image_token_id"] == res["cfg_image"] == tiny["image_id"]
    assert res["video_token_id"] == res["cfg_video"] == tiny["video_id"]
    assert res["eos"] == res["im_end"] == tiny["added"]["<|im_end|>"]  # source said <|endoftext|>
    assert res["size"] == {"height": 56, "width": 56}
    assert res["mean"] == [0.5, 0.5, 0.5]
    assert res["pinpoints"] == [[h, w] for w, h in PINPOINTS]  # LLaVA-NeXT lists (w, h), transformers (h, w)
    assert res["num_image_tokens"] == 16
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert res["text_one"] == (system + "<|im_start|>user\n<image>\nWhat is shown in this image?<|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert res["text_two_tok"] == system + "<|im_start|>user\n<image>\n<image>\nWhich is better?<|im_end|>\n"
    # anyres for one image (base 16 + unpadded grid with newlines); base-only 16+1 each for two images
    assert res["n_image_tokens_one"] > 17
    assert res["n_image_tokens_two"] == 2 * 17

    dumped = torch.load(dump, weights_only=False)
    ref = tiny["model"]
    ref_state = ref.state_dict()
    assert set(dumped["state"]) == set(ref_state)
    for key, value in ref_state.items():
        assert dumped["state"][key].dtype == torch.float32, key
        assert torch.equal(dumped["state"][key], value), key
    with torch.no_grad():
        for name, batch in dumped["batches"].items():
            logits = ref(**batch["inputs"]).logits
            assert logits.shape == batch["logits"].shape
            torch.testing.assert_close(batch["logits"], logits, atol=1e-5, rtol=0, msg=name)


def test_saved_weights_are_the_source_tensors(tiny):
    from transformers import LlavaOnevisionForConditionalGeneration

    # (save_pretrained writes transformers' legacy key names; compare what a load gives back)
    loaded = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny["out"]).state_dict()
    src = {k: v for k, v in tiny["state"].items() if not k.endswith("inv_freq")}
    assert len(loaded) == len(src)
    for key, value in loaded.items():  # names through the test's own inverse table, not the converter's
        assert torch.equal(value, src[to_original(key)]), key
    assert all(map_key(to_original(k)) == k for k in loaded)
    cfg = json.loads((tiny["out"] / "config.json").read_text())
    assert cfg["model_type"] == "llava_onevision"
    assert cfg["vision_feature_layer"] == -1 and cfg["vision_feature_select_strategy"] == "full"
    assert cfg["vision_config"]["num_hidden_layers"] == 2 and cfg["vision_config"]["vision_use_head"] is False
    assert cfg["vision_config"]["num_attention_heads"] == HEADS and cfg["vision_config"]["image_size"] == 56
    assert cfg["text_config"]["vocab_size"] == VOCAB_ROWS


def test_chat_template_renders_chatml(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["out"])
    assert tok.chat_template == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<answer>Image 1 is better</answer>"}]}]
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        system + "<|im_start|>user\n<image>\n<image>\nQ?<|im_end|>\n"
        "<|im_start|>assistant\n<answer>Image 1 is better</answer><|im_end|>\n")
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(own, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # the assistant turn is marked for training masks ({% generation %})
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(marked) == "<answer>Image 1 is better</answer><|im_end|>"
    # <image>/<video> are single tokens
    ids = tok("<image>\n<video>\n").input_ids
    assert ids[0] == tiny["image_id"] and ids[2] == tiny["video_id"]


def test_resizes_embeddings_when_tokenizer_does_not_fit(tiny, tmp_path):
    added = tiny["added"]
    rows = added["<image>"] + 1  # tokenizer incl. <image> fills the matrix exactly; <video> does not fit
    state = write_original(tmp_path / "orig", tiny["model"], added, rows=rows)
    out = convert_llava_next(tmp_path / "orig", tmp_path / "hf", vision_heads=HEADS, dtype="bfloat16")
    from transformers import LlavaOnevisionForConditionalGeneration

    loaded = LlavaOnevisionForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    emb, head = loaded["model.language_model.embed_tokens.weight"], loaded["lm_head.weight"]
    assert emb.shape[0] == head.shape[0] == 384 and emb.dtype == torch.bfloat16
    assert torch.equal(emb[:rows], state["model.embed_tokens.weight"].to(torch.bfloat16))
    assert torch.equal(head[:rows], state["lm_head.weight"].to(torch.bfloat16))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == 384 and cfg["video_token_index"] == rows


def test_cli(tiny, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="urt")
    models = parser.add_subparsers(dest="command").add_parser("models").add_subparsers(dest="models_command")
    register_convert(models)
    out = tmp_path / "cli_out"
    args = parser.parse_args(["models", "convert", "--from", "llava_next", str(tiny["src"]), "--out", str(out),
                              "--vision-heads", str(HEADS), "--dtype", "float16"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["text_config"]["dtype"] == "float16"
    with pytest.raises(UrtError, match="already exists"):
        args.func(args)
    args.overwrite = True
    assert args.func(args) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["models", "convert", "--from", "llava", str(tiny["src"]), "--out", str(out)])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_files(tiny, tmp_path):
    d = _copy(tiny["src"], tmp_path / "a")
    (d / "config.json").unlink()
    with pytest.raises(UrtError, match="config.json"):
        convert_llava_next(d, tmp_path / "o1", vision_heads=HEADS)

    d = _copy(tiny["src"], tmp_path / "b")
    for f in d.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(UrtError, match=r"missing weights.*safetensors"):
        convert_llava_next(d, tmp_path / "o2", vision_heads=HEADS)

    d = _copy(tiny["src"], tmp_path / "c")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UrtError, match="model-00002-of-00002.safetensors"):
        convert_llava_next(d, tmp_path / "o3", vision_heads=HEADS)

    d = _copy(tiny["src"], tmp_path / "d")
    (d / "merges.txt").unlink()
    with pytest.raises(UrtError, match="merges.txt"):
        convert_llava_next(d, tmp_path / "o4", vision_heads=HEADS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "d"]


def test_unknown_vision_tower_needs_heads(tiny, tmp_path):
    with pytest.raises(UrtError, match=r"config\.json.*local/tiny-siglip-patch14-56.*--vision-heads"):
        convert_llava_next(tiny["src"], tmp_path / "o")
    # a known name whose size does not match the weights is not trusted either
    d = _copy(tiny["src"], tmp_path / "k")
    cfg = json.loads((d / "config.json").read_text())
    cfg["mm_vision_tower"] = "google/siglip-so400m-patch14-384"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UrtError, match=r"hidden size 64, not 1152.*--vision-heads"):
        convert_llava_next(d, tmp_path / "o")
    with pytest.raises(UrtError, match="not divisible"):
        convert_llava_next(d, tmp_path / "o", vision_heads=5)


def test_known_tower_config_from_weights():
    """The released so400m tower: heads from the table, sizes from the weights; a checkpoint that still
    holds all 27 layers gets the last one dropped, as LLaVA-NeXT does at load time."""
    from urt.models.convert_llava import SRC_VISION, _vision_config

    def state(layers):
        meta = dict(device="meta")
        s = {SRC_VISION + "embeddings.patch_embedding.weight": torch.empty(1152, 3, 14, 14, **meta),
             SRC_VISION + "embeddings.position_embedding.weight": torch.empty(729, 1152, **meta),
             SRC_VISION + "head.probe": torch.empty(1, 1, 1152, **meta)}
        for i in range(layers):
            s[SRC_VISION + f"encoder.layers.{i}.mlp.fc1.weight"] = torch.empty(4304, 1152, **meta)
        return s

    cfg = {"mm_vision_tower": "google/siglip-so400m-patch14-384"}
    vision, drop = _vision_config(cfg, state(26), None, Path("config.json"))
    assert (vision["num_attention_heads"], vision["num_hidden_layers"], vision["image_size"],
            vision["intermediate_size"], vision["patch_size"]) == (16, 26, 384, 4304, 14)
    assert drop == [SRC_VISION + "head.probe"]
    vision, drop = _vision_config(cfg, state(27), None, Path("config.json"))
    assert vision["num_hidden_layers"] == 26
    assert SRC_VISION + "encoder.layers.26.mlp.fc1.weight" in drop


def test_unmapped_and_missing_keys(tiny, tmp_path):
    stray = {"model.vision_resampler.weight": torch.zeros(2)}
    write_original(tmp_path / "x", tiny["model"], tiny["added"], rows=VOCAB_ROWS, extra=stray)
    with pytest.raises(UrtError, match="model.vision_resampler.weight"):
        convert_llava_next(tmp_path / "x", tmp_path / "o", vision_heads=HEADS)

    # a mapped name the model does not have (a third text layer) and a missing one (no final norm)
    d = _copy(tiny["src"], tmp_path / "y")
    from safetensors.torch import load_file, save_file

    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"]["model.norm.weight"]
    data = load_file(str(shard))
    data["model.layers.7.mlp.up_proj.weight"] = torch.zeros(128, 64)
    data.pop("model.norm.weight")
    save_file(data, str(shard), metadata={"format": "pt"})
    with pytest.raises(UrtError, match=r"model\.language_model\.norm\.weight.*model\.language_model\.layers\.7"):
        convert_llava_next(d, tmp_path / "o", vision_heads=HEADS)
    assert not (tmp_path / "o").exists()


def test_shape_mismatch_names_the_key(tiny, tmp_path):
    d = _copy(tiny["src"], tmp_path / "s")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UrtError, match=r"config\.json.*model\.language_model\.layers\.0\.mlp\.\w+_proj\.weight"):
        convert_llava_next(d, tmp_path / "o", vision_heads=HEADS)


def test_rejects_non_llava_config(tiny, tmp_path):
    d = _copy(tiny["src"], tmp_path / "z")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llava_onevision"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UrtError, match=r"config\.json.*model_type 'llava_onevision'"):
        convert_llava_next(d, tmp_path / "o", vision_heads=HEADS)
