"""GRPO rollout generation, side by side: B prompts x G samples each, the ways urt.generation can run it.

* `hf`: the prompts repeated G times in one left-padded batch and HF's own sampling (`do_sample=True`,
  torch.multinomial each step): what urt did before the shared prefill;
* `repeated`: urt.generation.generate with `shared_prefill=False` (prompts repeated, inverse-CDF draw);
* `shared`: each prompt encoded once, its KV cache repeated G times (HF's DynamicCache, concatenated at
  every step; for qwen3_5 with its linear-attention states, `urt.models.hybrid.hybrid_cache`), inverse-CDF
  draw;
* `preallocated`: urt.generation.generate as GRPO and rejection sampling call it: `shared` with the KV
  cache in buffers sized once for the batch's final length (urt.generation.PreallocatedLayer).

All three sample from the same distribution; `repeated` and `shared` compute the same logits up to float
rounding and so give the same completions but where a draw lands within that rounding of a CDF boundary
(counted here); `shared` and `preallocated` do the same arithmetic (asserted). Model: the family's tiny model (urt.models.tiny: real transformers classes, random weights, urt's
2k-token tokenizer), image-generation prompts under the paper template with two synthetic images of
`--image-size` px; the random model rarely stops, so every completion runs to `--max-new-tokens`.
Prints seconds per rollout batch (median of `--repeats`), each side's speed-up over `hf`, and urt's default
(`preallocated`) over `repeated` (for qwen3_5 the path before its hybrid cache could be repeated).

Run:  python benchmarks/rollout_generation.py [--family qwen2_5_vl --prompts 4 -G 8 --max-new-tokens 128
      --image-size 112 --repeats 3 --threads 2]   (--family qwen3_5: the hybrid linear-attention model)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing urt

SIDES = ("hf", "repeated", "shared", "preallocated")


def image(seed: int, size: int):
    """A synthetic RGB image: smooth random colour blobs (deterministic by seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)


def prompts_for(bundle, n: int, size: int) -> list:
    from urt.data.encode import SampleEncoder
    from urt.data.schema import Sample

    enc = SampleEncoder(bundle.processor, bundle.family, mode="prompt")
    return [enc(Sample(f"p{j}", "image_generation", 1, [image(2 * j, size), image(2 * j + 1, size)],
                       caption=f"picture {j}", source="bench")) for j in range(n)]


def hf_sampling(bundle, prompts, G: int, max_new_tokens: int, seed: int) -> None:
    """The former path: every prompt G times in the batch, HF's multinomial sampling."""
    from transformers import LogitsProcessorList

    from urt.data.collate import make_collator, model_inputs
    from urt.generation import SuppressTokens, stop_token_ids, vision_token_ids

    collate = make_collator("padded", bundle, padding_side="left")
    inputs = model_inputs(collate([p for p in prompts for _ in range(G)]))
    torch.manual_seed(seed)
    with torch.inference_mode():
        bundle.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=0, num_beams=1, eos_token_id=stop_token_ids(bundle),
                              pad_token_id=collate.pad_token_id,
                              logits_processor=LogitsProcessorList([SuppressTokens(vision_token_ids(bundle))]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl", "llava_onevision", "qwen3_5"])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("-G", "--generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from urt.generation import GenerationConfig, generate
    from urt.models import build_tiny

    bundle = build_tiny(args.family, seed=0)
    bundle.model.eval()
    prompts = prompts_for(bundle, args.prompts, args.image_size)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, num_return_sequences=args.generations,
                           batch_size=args.prompts, seed=0)
    runs = {
        "hf": lambda: hf_sampling(bundle, prompts, args.generations, args.max_new_tokens, 0),
        "repeated": lambda: generate(bundle, prompts, GenerationConfig(**{**cfg.__dict__, "shared_prefill": False,
                                                                          "preallocate": False})),
        "shared": lambda: generate(bundle, prompts, GenerationConfig(**{**cfg.__dict__, "preallocate": False})),
        "preallocated": lambda: generate(bundle, prompts, cfg),
    }
    # The two urt sides compute the same logits up to float rounding (~5e-7 on this model: a batch of 4 prompts
    # vs 32 rows), so a draw landing that close to a CDF boundary can split a long completion; count them.
    shared = runs["shared"]()
    pairs = [(a, b) for ra, rb in zip(runs["repeated"](), shared) for a, b in zip(ra, rb)]
    same = sum(a == b for a, b in pairs)
    if same < 0.9 * len(pairs):
        raise SystemExit(f"shared prefill changed {len(pairs) - same} of {len(pairs)} completions: more than rounding")
    if runs["preallocated"]() != shared:
        raise SystemExit("the preallocated KV cache changed completions: it must only move where keys/values live")
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every side alike
        for side in SIDES:
            t = time.perf_counter()
            runs[side]()
            times[side].append(time.perf_counter() - t)
    base = statistics.median(times["hf"])
    print(f"{args.family}: {args.prompts} prompts x {args.generations} samples, {args.max_new_tokens} new tokens, "
          f"{len(prompts[0])}-token prompts, {args.threads} thread(s)")
    for side in SIDES:
        m = statistics.median(times[side])
        print(f"  {side:12s} {m:7.3f} s per rollout batch   x{base / m:.2f}")
    print(f"  repeated and shared: {same} of {len(pairs)} completions identical; shared and preallocated: all")
    ratio = statistics.median(times["repeated"]) / statistics.median(times["preallocated"])
    print(f"  urt's default (preallocated) over repeated: x{ratio:.2f}")


if __name__ == "__main__":
    main()
