"""A tiny offline tokenizer for the tiny random models (no hub download needed).

A byte-level BPE (vocab 2048, the Qwen2 pre-tokenizer regex) trained once on a small committed corpus
(`assets/tiny_tokenizer/corpus.txt`: the UnifiedReward-Think prompt templates, the method notes of the time
and synthetic judgement text) and committed as `assets/tiny_tokenizer/bpe.json`. `load_tiny_tokenizer(family)`
wraps it in transformers' `Qwen2Tokenizer` with the Qwen special tokens, `<image>`/`<video>` for LLaVA, the
`<think>`/`<answer>` tags as ordinary added tokens, and a chat template that renders like the family's
real one.

Rebuild the committed BPE from the committed corpus (deterministic):
    python -m urt.models.tokenizer --rebuild
Regenerate the corpus itself from a folder of prompt templates (`<dir>/<set>/<task>.txt`) and text files of notes
(the committed corpus used the paper, qwen3 and implicit sets and the method notes now in docs/method.md; other
inputs give another tokenizer):
    python -m urt.models.tokenizer --regen-corpus PROMPT_DIR --notes NOTES.md ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from urt.errors import UrtError

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"
CORPUS_FILE = ASSET_DIR / "corpus.txt"
BPE_FILE = ASSET_DIR / "bpe.json"
VOCAB_SIZE = 2048

# Same regex as transformers/models/qwen2/tokenization_qwen2.py (PRETOKENIZE_REGEX); copied so the
# committed asset does not depend on the installed transformers version.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
]
# Plain added tokens (not special: decoding with skip_special_tokens keeps them, as the reward needs).
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

DEFAULT_SYSTEM = "You are a helpful assistant."

# --------------------------------------------------------------------------------------------------
# Chat templates. Written for urt after the behaviour of the released ones (see each comment).
# A content item is a dict with "type" in {"text", "image", "video"} (or an "image"/"image_url"/"video"
# key, as HF accepts); content may also be a plain string.

_QWEN_ITEM = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ counts.image ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ counts.video ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item.text -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set counts = namespace(image=0, video=0) -%}"
)

# Qwen2-VL / Qwen2.5-VL: a default system turn when the first message is not a system message.
QWEN2_5_VL_TEMPLATE = (
    _QWEN_ITEM
    + "{%- for message in messages -%}"
    "{%- if loop.first and message.role != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' -}}{{- render(message.content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3-VL (Instruct): no default system turn; otherwise the same rendering.
QWEN3_VL_TEMPLATE = (
    _QWEN_ITEM
    + "{%- for message in messages -%}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' -}}{{- render(message.content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3.5: like Qwen3-VL, but it is a thinking model: the generation prompt opens the think block
# (`<think>\n`) unless `enable_thinking=False`, which inserts an empty one (`<think>\n\n</think>\n\n`).
QWEN3_5_TEMPLATE = (
    _QWEN_ITEM
    + "{%- for message in messages -%}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' -}}{{- render(message.content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# LLaVA-OneVision as UnifiedReward-Think-7b expects (LLaVA's `qwen_1_5` conversation = ChatML with a
# default system turn): per message, `<image>\n` per image item and `<video>\n` per video item (in
# order), then the text items.
LLAVA_ONEVISION_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}{{- '<image>\\n' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}{{- '<video>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for item in content -%}"
    "{%- if item.type == 'text' or ('text' in item and not ('image' in item or 'video' in item)) -%}"
    "{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message.role != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' -}}{{- render(message.content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CHAT_TEMPLATES = {
    "llava_onevision": LLAVA_ONEVISION_TEMPLATE,
    "qwen2_5_vl": QWEN2_5_VL_TEMPLATE,
    "qwen3_vl": QWEN3_VL_TEMPLATE,
    "qwen3_5": QWEN3_5_TEMPLATE,
}


def chat_template_for(family: str) -> str:
    try:
        return CHAT_TEMPLATES[family]
    except KeyError:
        raise UrtError(
            f"no tiny chat template for family {family!r}; known: {', '.join(sorted(CHAT_TEMPLATES))}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Corpus and training


def _synthetic_text(seed: int = 0, n: int = 400) -> str:
    """Judgement-like text with the words, digits and answer strings the tiny models see."""
    rng = random.Random(seed)
    colours = "red green blue yellow orange purple pink brown black white gray teal".split()
    shapes = "circle square rectangle triangle star cross heart ellipse hexagon pentagon".split()
    objects = (
        "cat dog bird horse car bicycle tree house river mountain flower boat person child city "
        "street table chair cup book lamp window door garden beach forest cloud sky sun moon"
    ).split()
    dims = ["Semantic Consistency", "Aesthetics", "Authenticity", "Accuracy", "Helpfulness",
            "Relevance", "Clarity", "Completeness", "Motion Quality", "Temporal Consistency"]
    verdicts = ["Image 1 is better", "Image 2 is better", "Video 1 is better", "Video 2 is better",
                "Answer 1 is better", "Answer 2 is better"]
    lines = []
    for _ in range(n):
        c, s, o = rng.choice(colours), rng.choice(shapes), rng.choice(objects)
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        d = rng.choice(dims)
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"Caption: a {c} {s} next to a {o}.")
        elif kind == 1:
            lines.append(f"Question: What color is the {s}? Answer: {c}. Is there a {o}? yes / no")
        elif kind == 2:
            lines.append(f"{d}: Image 1 ({a}/10) - the {c} {s} is clear; Image 2 ({b}/10) - the {o} is blurry.")
        else:
            lines.append(f"<think>Total score: Image 1: {a * 3}, Image 2: {b * 3}.</think>\n"
                         f"<answer>{rng.choice(verdicts)}</answer>")
    return "\n".join(lines) + "\n"


def make_corpus(prompt_dir: str | Path, notes: list[str | Path] = ()) -> str:
    """The training corpus: every `<set>/<task>.txt` template under prompt_dir (sorted), the notes
    files, and synthetic judgement text (seeded). Deterministic for fixed inputs."""
    prompt_dir = Path(prompt_dir)
    files = sorted(prompt_dir.glob("*/*.txt"))
    if not files:
        raise UrtError(f"no prompt templates (<set>/<task>.txt) under {prompt_dir}")
    parts = [p.read_text(encoding="utf-8") for p in files]
    parts += [Path(p).read_text(encoding="utf-8") for p in notes]
    parts.append(_synthetic_text())
    return "\n".join(parts)


def train_bpe(corpus: str, vocab_size: int = VOCAB_SIZE):
    """Train the byte-level BPE (a `tokenizers.Tokenizer`) on the corpus, one document per line."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.split("\n"), trainer)
    return tok


def bpe_to_json(tok) -> str:
    """The committed form: vocab and merges only, sorted and indented for stable diffs."""
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return json.dumps({"vocab": model["vocab"], "merges": merges}, ensure_ascii=False, indent=0) + "\n"


def rebuild(corpus_file: Path = CORPUS_FILE, out_file: Path = BPE_FILE) -> Path:
    out_file.write_text(bpe_to_json(train_bpe(corpus_file.read_text(encoding="utf-8"))), encoding="utf-8")
    return out_file


def _load_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    if not BPE_FILE.is_file():
        raise UrtError(f"tiny tokenizer asset missing: {BPE_FILE} (run python -m urt.models.tokenizer --rebuild)")
    data = json.loads(BPE_FILE.read_text(encoding="utf-8"))
    return data["vocab"], [tuple(m.split(" ")) for m in data["merges"]]


def _tokenizer_class(family: str):
    """Qwen2Tokenizer, except Qwen3.5: transformers' AutoTokenizer maps model_type qwen3_5 to
    Qwen3_5Tokenizer whatever tokenizer_config.json says, so the tiny model uses it too (same BPE; its
    pre-tokenizer regex differs only on combining marks) and a saved folder reloads as the same class."""
    import transformers

    if family == "qwen3_5" and hasattr(transformers, "Qwen3_5Tokenizer"):
        return transformers.Qwen3_5Tokenizer
    return transformers.Qwen2Tokenizer


def load_tiny_tokenizer(family: str):
    """The committed tiny BPE as a tokenizers-backed `transformers.Qwen2Tokenizer` (`Qwen3_5Tokenizer`
    for qwen3_5) with eos `<|im_end|>`, pad `<|endoftext|>`, the special tokens and the family's chat
    template."""
    template = chat_template_for(family)
    vocab, merges = _load_bpe()
    tok = _tokenizer_class(family)(
        vocab=dict(vocab), merges=list(merges), eos_token="<|im_end|>", pad_token=ENDOFTEXT, unk_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok.add_tokens(list(TAG_TOKENS))
    tok.chat_template = template
    if family == "llava_onevision":
        tok.image_token = "<image>"
        tok.video_token = "<video>"
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m urt.models.tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--rebuild", action="store_true", help=f"retrain {BPE_FILE.name} from {CORPUS_FILE.name}")
    parser.add_argument("--regen-corpus", metavar="PROMPT_DIR", help="rewrite corpus.txt from these templates")
    parser.add_argument("--notes", nargs="*", default=[], help="extra text files for --regen-corpus")
    args = parser.parse_args(argv)
    if not (args.rebuild or args.regen_corpus):
        parser.print_help()
        return 1
    if args.regen_corpus:
        CORPUS_FILE.write_text(make_corpus(args.regen_corpus, args.notes), encoding="utf-8")
        print(CORPUS_FILE)
    if args.rebuild:
        print(rebuild())
    return 0


if __name__ == "__main__":
    sys.exit(main())
