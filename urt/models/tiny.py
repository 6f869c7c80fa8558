"""Tiny random models of each family, built offline from the real transformers config, model and
processor classes (for tests, the CPU demo and smoke runs). Sizes: docs/environment.md §Tiny models;
each model has about 1-1.5M parameters and an image costs 16 tokens:

| family | image size for 16 tokens | video |
|---|---|---|
| qwen2_5_vl | 112x112 (patch 14, merge 2) | 56x56 frames: 4 frames -> 8 tokens |
| qwen3_vl, qwen3_5 | 128x128 (patch 16, merge 2) | 64x64 frames: 4 frames -> 8 tokens (+ timestamps) |
| llava_onevision | 56x56 crop = 16 tokens (+1 newline token when several images); one 112x112 image goes through anyres (5 crops) | 56x56 frames, pooled |

A random vision tower at HF's default init (std 0.02) is effectively blind: its features barely differ
between images. Pass `vision_init_std` (e.g. 0.1) to re-initialise the tower's weights so that images
are distinguishable (docs/demo.md §Pitfalls, pitfall 1).
"""

from __future__ import annotations

import torch

from urt.models.families import get_family
from urt.models.tokenizer import load_tiny_tokenizer

_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def _token_ids(tok) -> dict[str, int]:
    ids = dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    return ids


def _special_ids(tok) -> dict[str, int]:
    return dict(
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )


def tiny_config(family: str, tok):
    """The transformers config of the tiny model of `family` for tokenizer `tok`."""
    import transformers as tf

    get_family(family)
    vocab = len(tok)
    special = _special_ids(tok)
    if family == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(
            text_config=dict(
                _TEXT,
                vocab_size=vocab,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
                **special,
            ),
            vision_config=dict(
                depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                fullatt_block_indexes=[1], tokens_per_second=2,
            ),
            **_token_ids(tok),
        )
    elif family == "qwen3_vl":
        cfg = tf.Qwen3VLConfig(
            text_config=dict(
                _TEXT,
                vocab_size=vocab,
                head_dim=32,
                rope_parameters={
                    "rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True,
                },
                **special,
            ),
            vision_config=dict(
                depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                deepstack_visual_indexes=[0],
            ),
            **_token_ids(tok),
        )
    elif family == "qwen3_5":
        text = dict(_TEXT, num_hidden_layers=4)
        cfg = tf.Qwen3_5Config(
            text_config=dict(
                text,
                vocab_size=vocab,
                head_dim=32,
                layer_types=["linear_attention"] * 3 + ["full_attention"],
                linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_conv_kernel_dim=4,
                rope_parameters={
                    "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25,
                    "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                },
                **special,
            ),
            vision_config=dict(
                depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                deepstack_visual_indexes=[],
            ),
            **_token_ids(tok),
        )
    elif family == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, image_size=56, patch_size=14,
            ),
            text_config=dict(_TEXT, model_type="qwen2", vocab_size=vocab, rope_theta=1e6, **special),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            video_token_index=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]],
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    else:  # pragma: no cover - get_family raised already
        raise AssertionError(family)
    for key, value in special.items():
        setattr(cfg, key, value)
    cfg.tie_word_embeddings = False
    return cfg


def tiny_processor(family: str, tok=None):
    """The real HF processor class of `family`, with small pixel budgets and the tiny tokenizer."""
    import transformers as tf

    get_family(family)
    tok = tok if tok is not None else load_tiny_tokenizer(family)
    template = tok.chat_template
    if family == "qwen2_5_vl":
        size = {"shortest_edge": 28 * 28, "longest_edge": 224 * 224}
        common = dict(patch_size=14, temporal_patch_size=2, merge_size=2, size=size)
        ip = tf.Qwen2VLImageProcessor(**common)
        vp = tf.Qwen2VLVideoProcessor(**common, do_sample_frames=False, cap_pixels_per_frame=True)
        return tf.Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=template)
    if family in ("qwen3_vl", "qwen3_5"):
        mean = std = [0.5, 0.5, 0.5]
        ip = tf.Qwen2VLImageProcessor(
            patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std,
            size={"shortest_edge": 32 * 32, "longest_edge": 256 * 256},
        )
        vp = tf.Qwen3VLVideoProcessor(
            patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std,
            size={"shortest_edge": 32 * 32, "longest_edge": 16 * 128 * 128}, do_sample_frames=False,
            cap_pixels_per_frame=True,
        )
        return tf.Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=template)
    # llava_onevision
    mean = std = [0.5, 0.5, 0.5]
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    ip = tf.LlavaOnevisionImageProcessor(
        size={"height": 56, "width": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=pinpoints, image_mean=mean, image_std=std,
    )
    vp = tf.LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56}, image_mean=mean, image_std=std)
    return tf.LlavaOnevisionProcessor(
        image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=template,
        num_image_tokens=16, vision_feature_select_strategy="full",
    )


def _vision_module(model, family: str):
    inner = model.model
    return inner.vision_tower if family == "llava_onevision" else inner.visual


@torch.no_grad()
def reinit_vision(model, family: str, std: float, generator: torch.Generator | None = None) -> None:
    """Re-draw the vision tower's weight matrices (linear, conv, embeddings) from N(0, std²) and zero
    their biases; norms keep their HF init. The projector is not touched."""
    vision = _vision_module(model, family)
    spec = get_family(family)
    prefix = "model.vision_tower." if family == "llava_onevision" else "model.visual."
    for name, module in vision.named_modules():
        full = prefix + name + "."
        if spec.part_of(full) != "vision":
            continue  # the merger (projector) inside model.visual
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)):
            module.weight.normal_(0.0, std, generator=generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def build_tiny(family: str, *, seed: int = 0, attn_implementation: str = "auto", vision_init_std: float | None = None):
    """A randomly initialised tiny model of `family` plus its processor, as a ModelBundle.
    Same seed -> identical weights. The global torch RNG is left untouched."""
    from urt.models.bundle import ModelBundle, choose_attn_implementation

    spec = get_family(family)
    model_cls = spec.model_cls()
    tok = load_tiny_tokenizer(family)
    cfg = tiny_config(family, tok)
    attn = choose_attn_implementation(attn_implementation, "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(cfg, attn_implementation=attn, dtype=torch.float32)
        if vision_init_std is not None:
            gen = torch.Generator().manual_seed(seed + 1)
            reinit_vision(model, family, float(vision_init_std), gen)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.bos_token_id = None
    model.eval()
    return ModelBundle(model=model, processor=tiny_processor(family, tok), family=family)
