"""Judging a group of N candidates: one pair per request (what a client of `urt judge` or the chat endpoint
does today) against `Judge.win_rates` (urt.judge: all pairs of the group batched, each candidate's visual
features computed once).

The same N synthetic images and caption, all N(N-1) ordered pairs (both orders), greedy decoding, on urt's
tiny model (random weights; the family's real transformers classes):

* per-request: `Judge.compare_images(caption, a, b)` for each ordered pair, one after the other: every pair
  is encoded, run through the vision tower (both images) and decoded alone;
* batched, no reuse: `Judge.win_rates(..., reuse_visuals=False)`: the pairs batched (`--batch-size` per
  generate call), the tower still run on both images of every pair;
* win_rates: `Judge.win_rates(...)`: batched, and the tower run on N images for the group.

Prints verdicts per second for each, the ratios, and the vision-tower images counted with a forward hook;
the three must give the same verdicts (greedy; checked). The tiny model's default tower is negligible, so
`--vision-depth` / `--vision-width` give it some weight (still far lighter than a real judge's tower).

Run:  python benchmarks/win_rates.py [--n 8 --image-size 224 --max-new-tokens 32 --batch-size 8
      --vision-depth 4 --vision-width 128 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing urt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="candidates in the group")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per generate call (batched modes)")
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of the three modes, interleaved; the median and the best time per mode are reported "
                        "(on a shared CPU the best is the least disturbed)")
    return p


def bundle_for(args):
    from urt.models.loading import ModelBundle
    from urt.models.tiny import load_tiny_tokenizer, tiny_config, tiny_processor
    from urt.models.families import get_family

    tok = load_tiny_tokenizer("qwen2_5_vl")
    cfg = tiny_config("qwen2_5_vl", tok)
    vc = cfg.vision_config
    w = int(args.vision_width)
    vc.depth, vc.hidden_size, vc.intermediate_size, vc.num_heads = int(args.vision_depth), w, 4 * w, max(1, w // 64)
    vc.fullatt_block_indexes = list(range(max(0, vc.depth // 4 - 1), vc.depth, max(1, vc.depth // 4)))
    torch.manual_seed(args.seed)
    model = get_family("qwen2_5_vl").model_cls()._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    processor = tiny_processor("qwen2_5_vl", tok)
    s = int(args.image_size)
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": s * s}
    return ModelBundle(model=model.eval(), processor=processor, family="qwen2_5_vl")


def images(n: int, size: int, seed: int):
    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(seed * 1000 + i)
        out.append(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size)))
    return out


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(int(args.threads))
    from urt.generation import GenerationConfig
    from urt.judge import Judge

    bundle = bundle_for(args)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    judge = Judge(bundle, generation=gen)
    one = Judge(bundle, generation=GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1))
    caption = "a red circle next to a blue square"
    imgs = images(args.n, args.image_size, args.seed)
    counted: list[int] = []
    bundle.model.model.visual.register_forward_hook(
        lambda m, a, kw, out: counted.append(int(kw.get("grid_thw", a[1] if len(a) > 1 else None).shape[0])),
        with_kwargs=True)
    pairs = [(a, b) for a in range(args.n) for b in range(args.n) if a != b]

    judge.win_rates(caption, imgs[:2])  # warm-up: first-call allocations, kernel selection
    out: dict = {"n": args.n, "verdicts": len(pairs), "image_size": args.image_size,
                 "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                 "vision": f"{args.vision_depth}x{args.vision_width}", "threads": args.threads}

    times: dict[str, list[float]] = {"per_request": [], "batched_no_reuse": [], "win_rates": []}
    towers: dict[str, int] = {}
    results: dict = {}
    texts: dict = {}
    for _ in range(max(1, int(args.repeats))):
        counted.clear()
        t = time.perf_counter()
        for a, b in pairs:
            texts[(a, b)] = one.compare_images(caption, imgs[a], imgs[b]).text
        times["per_request"].append(time.perf_counter() - t)
        towers["per_request"] = sum(counted)
        for name, reuse in (("batched_no_reuse", False), ("win_rates", True)):
            counted.clear()
            t = time.perf_counter()
            results[name] = judge.win_rates(caption, imgs, reuse_visuals=reuse)
            times[name].append(time.perf_counter() - t)
            towers[name] = sum(counted)
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"s_median": med, "s_min": min(ts), "s_all": ts, "tower_images": towers[k],
                  "verdicts_per_s": len(pairs) / med, "verdicts_per_s_best": len(pairs) / min(ts)}
    for k in ("win_rates", "batched_no_reuse"):
        out[f"ratio_{k}_vs_per_request"] = out["per_request"]["s_median"] / out[k]["s_median"]
        out[f"ratio_{k}_vs_per_request_best"] = out["per_request"]["s_min"] / out[k]["s_min"]
    r = results["win_rates"]
    shown = {(p.first, p.j if p.first == p.i else p.i): p.verdict.text for p in r.pairs}
    no_reuse = [p.verdict.text for p in results["batched_no_reuse"].pairs]
    out["same_verdicts"] = shown == texts and no_reuse == [p.verdict.text for p in r.pairs]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
