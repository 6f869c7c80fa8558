"""GRPO log-prob passes with and without the per-step visual cache (urt.rl.visual_cache).

One rollout step's scoring work for B prompts × G completions, timed both ways on the same model and the
same sequences:

* normal: the reference forward (no grad) and the policy forward + backward over the B·G sequences in
  micro-batches, each pass running the vision tower on every sequence's pixels (G times per prompt);
* cached: `VisualCache.for_step` encodes the B prompts' visuals once (timed, included), then the same
  passes are fed the cached features (`sequence_logprobs(..., visual_cache=cache)`).

Models (random weights, the family's real transformers classes, urt's tiny tokenizer; vision tower and
projector frozen, a frozen deep-copied reference as in GRPOModule):

* `--preset tiny` (default, CPU): the family's tiny model (urt.models.tiny) with a heavier vision tower
  (`--vision-depth`, `--vision-width`; the tiny default tower of depth 2 / width 64 on 16-token images
  is negligible) and a 2-layer, 128-wide language model: a vision-heavy case. `--lm-depth` /
  `--lm-width` (qwen2_5_vl) grow the language model, e.g. 8 × 384 to bring the tower's share of the
  FLOPs to about a 3B/7B model's;
* `--preset 3b` (qwen2_5_vl, a GPU): Qwen2.5-VL-3B-sized — vision tower 32 × 1280 (670M parameters,
  window attention, full attention every 8th block), language model 36 × 2048 (GQA 16/2, MLP 11008);
  the vocabulary is the tiny tokenizer's (2k), so the LM head is small.

Each prompt holds two synthetic images of `--image-size`² pixels (an image-generation pair with the paper's
prompt). Prints seconds per step, the speed-up, the vision tower's share of the normal path (time inside
the tower's forward, measured with device-synchronised hooks), tower calls, and the largest log-prob
difference between the two paths.

Run:  python benchmarks/visual_cache.py [--family qwen2_5_vl --prompts 2 --generations 8 --image-size 224
      --vision-depth 8 --vision-width 256 --completion 64 --micro-batch 8 --collate packed --repeats 2]
      python benchmarks/visual_cache.py --preset 3b --device cuda --dtype bfloat16 --image-size 448 \
          --completion 512 --micro-batch 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing urt


# Qwen2.5-VL-3B's sizes (its config.json), vocabulary excepted.
QWEN2_5_VL_3B = dict(
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
    text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                      "mrope_section": [16, 24, 24]}),
)


def build(family: str, preset: str, depth: int, width: int, image_size: int, device: str, dtype: torch.dtype,
          lm_depth: int | None = None, lm_width: int | None = None):
    """(bundle, reference model) for `preset` (see the module docstring), with a processor whose pixel
    budget admits `image_size`² images."""
    from urt.models.loading import ModelBundle, set_trainable
    from urt.models.tiny import load_tiny_tokenizer, tiny_config, tiny_processor

    tok = load_tiny_tokenizer(family)
    cfg = tiny_config(family, tok)
    vc = cfg.vision_config
    if preset == "3b":
        if family != "qwen2_5_vl" or lm_depth or lm_width:
            raise SystemExit("--preset 3b is Qwen2.5-VL-3B-sized: use --family qwen2_5_vl, no --lm-* flags")
        for k, v in QWEN2_5_VL_3B["vision"].items():
            setattr(vc, k, v)
        for k, v in QWEN2_5_VL_3B["text"].items():
            setattr(cfg.text_config, k, v)
        cfg.text_config.head_dim = 2048 // 16
        cfg.text_config.layer_types = ["full_attention"] * cfg.text_config.num_hidden_layers
    elif (lm_depth or lm_width) and family != "qwen2_5_vl":
        raise SystemExit("--lm-depth / --lm-width: qwen2_5_vl only (the other tiny families keep their 2 x 128 LM)")
    elif family == "llava_onevision":
        vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size = depth, width, 4 * width
        vc.num_attention_heads = max(1, width // 64)
    else:
        vc.depth, vc.hidden_size, vc.intermediate_size, vc.num_heads = depth, width, 4 * width, max(1, width // 64)
        if family == "qwen2_5_vl":
            if lm_depth or lm_width:  # a wider / deeper LM: head_dim 64, GQA to 2 KV heads, MLP ~5.3 x width
                w = int(lm_width or cfg.text_config.hidden_size)
                tc = cfg.text_config
                tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim = w, w // 64, 2, 64
                tc.intermediate_size = 64 * round(16 * w / 3 / 64)
                tc.num_hidden_layers = int(lm_depth or tc.num_hidden_layers)
                tc.layer_types = ["full_attention"] * tc.num_hidden_layers
                tc.rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}
                vc.out_hidden_size = w
            vc.fullatt_block_indexes = list(range(max(0, depth // 4 - 1), depth, max(1, depth // 4)))
        elif family == "qwen3_vl":
            vc.deepstack_visual_indexes = [0, depth // 2] if depth > 2 else [0]
    with torch.device(device):
        model = type_for(family)._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    set_trainable(model, family, vision=False, projector=False, language=True)
    processor = tiny_processor(family, tok)
    if family != "llava_onevision":
        processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": image_size * image_size}
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return ModelBundle(model=model.train(), processor=processor, family=family), ref


def type_for(family: str):
    from urt.models.families import get_family

    return get_family(family).model_cls()


def image(seed: int, size: int):
    """A synthetic RGB image: smooth random colour blobs (deterministic by seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((size, size), Image.BILINEAR)


def rollout(bundle, n_prompts: int, G: int, image_size: int, completion: int, seed: int = 0):
    from urt.data.encode import SampleEncoder
    from urt.data.schema import Sample
    from urt.rl.logprobs import completion_sequence

    enc = SampleEncoder(bundle.processor, bundle.family, mode="prompt")
    prompts = [enc(Sample(f"p{j}", "image_generation", 1, [image(2 * j, image_size), image(2 * j + 1, image_size)],
                          caption=f"picture {j}", source="bench")) for j in range(n_prompts)]
    gen = torch.Generator().manual_seed(seed)
    vocab = len(bundle.tokenizer)
    seqs = []
    for p in prompts:
        for g in range(G):
            n = int(torch.randint(completion // 2, completion + 1, (1,), generator=gen))
            seqs.append(completion_sequence(p, torch.randint(10, vocab - 100, (n,), generator=gen).tolist(), g))
    return prompts, seqs


class TowerClock:
    """Wall time spent inside the vision tower's forward (device-synchronised) and the number of calls."""

    def __init__(self, model, family, sync):
        inner = model.model
        tower = inner.vision_tower if family == "llava_onevision" else inner.visual
        self.sync, self.seconds, self.calls, self._t = sync, 0.0, 0, 0.0
        tower.register_forward_pre_hook(self._start)
        tower.register_forward_hook(self._stop)

    def _start(self, *args):
        self.sync()
        self._t = time.perf_counter()

    def _stop(self, *args):
        self.sync()
        self.seconds += time.perf_counter() - self._t
        self.calls += 1

    def reset(self):
        self.seconds, self.calls = 0.0, 0


def step(policy, ref, collate, seqs, micro: int, cache=None):
    """The GRPO step's scoring work: reference log-probs, then policy forward + backward."""
    from urt.rl.logprobs import sequence_logprobs

    ref_lp = []
    with torch.no_grad():
        for s in range(0, len(seqs), micro):
            lp, _ = sequence_logprobs(ref, collate, seqs[s:s + micro], visual_cache=cache)
            ref_lp += [x.detach() for x in lp]
    pol_lp = []
    for s in range(0, len(seqs), micro):
        lp, _ = sequence_logprobs(policy, collate, seqs[s:s + micro], visual_cache=cache)
        loss = sum(x.sum() for x in lp) / len(seqs)
        loss.backward()
        pol_lp += [x.detach() for x in lp]
    policy.zero_grad(set_to_none=True)
    return ref_lp, pol_lp


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl", "qwen3_5", "llava_onevision"])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "3b"])
    ap.add_argument("--prompts", type=int, default=2, help="B prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--image-size", type=int, default=224, help="square images, 2 per prompt (Qwen: pixels per side)")
    ap.add_argument("--vision-depth", type=int, default=8)
    ap.add_argument("--vision-width", type=int, default=256)
    ap.add_argument("--lm-depth", type=int, default=None, help="tiny preset, qwen2_5_vl: LM layers (default 2)")
    ap.add_argument("--lm-width", type=int, default=None, help="tiny preset, qwen2_5_vl: LM width (default 128)")
    ap.add_argument("--completion", type=int, default=64, help="completion tokens (uniform in [n/2, n])")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--collate", default="packed", choices=["packed", "padded"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    from urt.data.collate import make_collator
    from urt.rl.visual_cache import VisualCache

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bundle, ref = build(args.family, args.preset, args.vision_depth, args.vision_width, args.image_size,
                        args.device, dtype, args.lm_depth, args.lm_width)
    policy = bundle.model
    collate = make_collator(args.collate, bundle)
    prompts, seqs = rollout(bundle, args.prompts, args.generations, args.image_size, args.completion)
    clocks = [TowerClock(policy, args.family, sync), TowerClock(ref, args.family, sync)]

    n_vis = sum(int(len(p.visual.get("image_grid_thw", p.visual.get("image_sizes", [])))) for p in prompts)
    vis_tokens = sum(int((p.mm_token_type_ids > 0).sum()) if p.mm_token_type_ids is not None else 0 for p in prompts)
    n_params = lambda m, vis: sum(p.numel() for n, p in m.named_parameters()  # noqa: E731
                                  if (("visual" in n or "vision_tower" in n) == vis))
    print(f"family {args.family}  device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{args.threads} threads)  dtype {args.dtype}  collate {type(collate).__name__}")
    vc = policy.config.vision_config
    depth = getattr(vc, "depth", getattr(vc, "num_hidden_layers", None))
    print(f"preset {args.preset}; vision tower: depth {depth}, width {vc.hidden_size}, "
          f"{n_params(policy, True) / 1e6:.2f}M "
          f"params; language model {n_params(policy, False) / 1e6:.2f}M params")
    print(f"B={args.prompts} prompts x G={args.generations} completions, {n_vis} images of {args.image_size}px "
          f"({vis_tokens // max(1, args.prompts) if vis_tokens else '?'} visual tokens per prompt), "
          f"{sum(len(s) for s in seqs)} tokens in {len(seqs)} sequences, micro-batch {args.micro_batch}")

    def timed(use_cache: bool):
        for c in clocks:
            c.reset()
        sync()
        t0 = time.perf_counter()
        cache = VisualCache.for_step(policy, args.family, prompts) if use_cache else None
        out = step(policy, ref, collate, seqs, args.micro_batch, cache)
        sync()
        return time.perf_counter() - t0, sum(c.seconds for c in clocks), sum(c.calls for c in clocks), out, cache

    timed(False), timed(True)  # warm-up
    rows = {False: [], True: []}
    outs = {}
    for _ in range(args.repeats):
        for use in (False, True):
            t, tower, calls, out, cache = timed(use)
            rows[use].append((t, tower, calls))
            outs[use] = out
    diff = max(float((a - b).abs().max()) for k in (0, 1) for a, b in zip(outs[False][k], outs[True][k]))
    med = {u: statistics.median(r[0] for r in rows[u]) for u in rows}
    tower = {u: statistics.median(r[1] for r in rows[u]) for u in rows}
    calls = {u: rows[u][-1][2] for u in rows}
    print(f"{'':8s} {'s/step':>8s} {'tower s':>8s} {'tower %':>8s} {'tower calls':>12s}")
    for u, name in ((False, "normal"), (True, "cached")):
        print(f"{name:8s} {med[u]:8.3f} {tower[u]:8.3f} {100 * tower[u] / med[u]:7.1f}% {calls[u]:12d}")
    print(f"speed-up (normal / cached): {med[False] / med[True]:.2f}x   vision-tower share of the normal path: "
          f"{100 * tower[False] / med[False]:.1f}%   bound if the tower were free: "
          f"{med[False] / max(1e-9, med[False] - tower[False]):.2f}x")
    print(f"max |log-prob difference| cached vs normal: {diff:.2e}")


if __name__ == "__main__":
    main()
