"""The demo's vision pretraining: the stand-in for the pretrained vision encoder every real VLM starts from.

A real Qwen2.5-VL's tower was pretrained (CLIP-style, then with the LM) long before any reward-model
training; the demo's tower is random. Through the 2-layer LM alone it learns colour within the grounding
step but not shape or motion: a captioning run needed ~2,000 steps for 80% shape (docs/demo.md §Findings). With
a direct loss the same tower learns both in a few hundred steps (shape of held-out images 0.39 -> 0.95 in 500 steps
of batch 32 through a linear head on its mean-pooled output tokens; the direction of a clip 0.94 after 100).
So this step trains the tower and its merger (the projector) with one linear head per attribute on the mean of
each visual's output tokens (what the LM reads, wherever the shape sits), from the attributes the demo data
records for every candidate (`meta["attributes"]`): shape and motion by default. Colour is left to the
grounding step, which learns it anyway: a colour head beside the shape head held shape back (held-out shape
0.51 instead of 0.95 after 500 steps). The heads are dropped afterwards and the whole model is saved as an HF
folder for the grounding step to start from; held-out accuracy per attribute (the test shards' visuals,
before and after) goes to `vision.json`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from urt.data.schema import Sample, Video
from urt.demo.data import COLORS, MOTIONS, SHAPES
from urt.errors import UrtError

log = logging.getLogger(__name__)

VOCAB = {"color": COLORS, "shape": SHAPES, "motion": MOTIONS}


def visual_attributes(samples, limit: int | None = None) -> tuple[list, list, Counter]:
    """([(image, attrs)], [(frames, attrs)], counts) from demo samples: every candidate of a generation pair
    (`attributes.candidates`) and the visual of an understanding pair (`attributes.seen`); attrs keep only the
    attributes of VOCAB. At most `limit` images and `limit` clips; an image id seen before is not repeated."""
    images, clips, counts = [], [], Counter()
    seen_ids: set = set()
    for s in samples:
        at = (s.meta or {}).get("attributes") or {}
        per = at.get("candidates") if s.task.endswith("generation") else [at.get("seen")]
        if not per or len(per) != len(s.visuals) or any(not isinstance(a, dict) for a in per):
            raise UrtError(f"sample {s.key!r}: meta['attributes'] names no attributes for each of its "
                           f"{len(s.visuals)} visual(s); vision pretraining needs the demo data (urt.demo.data)")
        ids = (s.meta or {}).get("image_ids") or [None] * len(s.visuals)
        for v, a, i in zip(s.visuals, per, ids):
            a = {k: a[k] for k in VOCAB if k in a}
            bad = {k: x for k, x in a.items() if x not in VOCAB[k]}
            if bad:
                raise UrtError(f"sample {s.key!r}: attribute value(s) {bad} not in {VOCAB}")
            if isinstance(v, Video):
                if limit is None or len(clips) < limit:
                    clips.append((v.frames, a))
                    counts["clips"] += 1
            else:
                key = (i, s.source) if i is not None else None
                if key is not None and key in seen_ids:
                    counts["images_repeated"] += 1
                    continue
                if key is not None:
                    seen_ids.add(key)
                if limit is None or len(images) < limit:
                    images.append((v, a))
                    counts["images"] += 1
        if limit is not None and len(images) >= limit and len(clips) >= limit:
            break
    return images, clips, counts


class _Encoded:
    """One kind of visual (images or clips) encoded once: per-visual patch rows, grids and attribute labels."""

    def __init__(self, processor, items: list, video: bool):
        self.video = video
        self.n = len(items)
        if not items:
            self.pixels = self.grids = None
            self.labels = {}
            return
        if video:
            out = processor.video_processor(videos=[np.stack([np.asarray(f.convert("RGB")) for f in fr])
                                                    for fr, _ in items],
                                            return_tensors="pt", do_sample_frames=False)
            pixels, grids = out["pixel_values_videos"], out["video_grid_thw"]
        else:
            out = processor.image_processor(images=[im.convert("RGB") for im, _ in items], return_tensors="pt")
            pixels, grids = out["pixel_values"], out["image_grid_thw"]
        rows = grids.prod(-1)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), rows.cumsum(0)])
        self.pixels, self.grids = pixels, grids
        # -100: attribute not known for this visual (e.g. motion of an image)
        self.labels = {k: torch.tensor([VOCAB[k].index(a[k]) if k in a else -100 for _, a in items])
                       for k in VOCAB}

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pv = torch.cat([self.pixels[self.offsets[i]:self.offsets[i + 1]] for i in idx])
        return pv, self.grids[idx]


def _pooled(model, video: bool, pixels: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """The mean of each visual's output tokens (after the merger: what the LM reads), [n, hidden]."""
    fn = model.get_video_features if video else model.get_image_features
    out = fn(pixels, grids)
    per = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack([t.mean(0) for t in per])


def _accuracy(model, heads, enc: _Encoded, batch_size: int = 100) -> dict[str, float]:
    hits, totals = Counter(), Counter()
    with torch.no_grad():
        for lo in range(0, enc.n, batch_size):
            idx = list(range(lo, min(enc.n, lo + batch_size)))
            f = _pooled(model, enc.video, *enc.batch(idx))
            for k, head in heads.items():
                y = enc.labels[k][idx]
                m = y != -100
                if m.any():
                    hits[k] += int((head(f).argmax(-1)[m] == y[m]).sum())
                    totals[k] += int(m.sum())
    return {k: round(hits[k] / totals[k], 4) for k in totals}


def pretrain_vision(bundle, train_shards, out_dir, *, test_shards=None, steps: int = 300, batch_size: int = 32,
                    lr: float = 2e-3, limit: int | None = 2000, frames: int = 4, seed: int = 0,
                    attributes: dict[str, int] | None = None, progress: bool = True) -> dict:
    """Train `bundle`'s vision tower and merger with attribute heads on the demo's visuals (module docstring)
    for `steps` steps, each one batch of images and one of clips. `attributes` maps each attribute trained to
    the step its head joins at (default: shape and motion from the start, colour from 2/3 of the way). Writes
    `out_dir/hf/final` (the whole model) and `out_dir/vision.json` (settings, loss curve, held-out accuracy per
    attribute before and after)."""
    from urt.data.shards import read_shards
    from urt.models.loading import part_parameters, save_pretrained

    if steps < 1 or batch_size < 1:
        raise UrtError(f"vision pretraining needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    if attributes is None:
        attributes = {"shape": 0, "motion": 0, "color": 2 * steps // 3}
    elif isinstance(attributes, (list, tuple)):  # a plain list: every head from the start
        attributes = {k: 0 for k in attributes}
    attributes = dict(attributes)
    bad = [a for a in attributes if a not in VOCAB]
    if bad or not attributes:
        raise UrtError(f"vision pretraining attributes must be some of {list(VOCAB)} (each with the step its head "
                       f"joins at), got {attributes}")
    out = Path(out_dir)
    model, family = bundle.model, bundle.family
    t0 = time.perf_counter()
    images, clips, counts = visual_attributes(read_shards(train_shards, frames=frames), limit)
    if not images and not clips:
        raise UrtError(f"{train_shards}: no visuals to pretrain the vision tower on")
    train = [_Encoded(bundle.processor, images, False), _Encoded(bundle.processor, clips, True)]
    test = []
    if test_shards:
        t_images, t_clips, _ = visual_attributes(read_shards(test_shards, frames=frames))
        test = [_Encoded(bundle.processor, t_images, False), _Encoded(bundle.processor, t_clips, True)]
    log.info("vision pretraining on %s (encoded in %.1f s)", dict(counts), time.perf_counter() - t0)

    torch.manual_seed(seed)
    first = next(e for e in train if e.n)
    width = _pooled(model, first.video, *first.batch([0])).shape[-1]  # what the LM reads, per token
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(VOCAB[k])) for k in attributes})
    tower = [p for part in ("vision", "projector") for _, p in part_parameters(model, family, part)]
    was = [p.requires_grad for p in tower]
    for p in tower:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([*tower, *heads.parameters()], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # short warm-up
    before = {("clip_" if e.video else "image_") + k: v for e in test if e.n
              for k, v in _accuracy(model, heads, e).items()}
    rng = random.Random(seed)
    curve = []
    model.train()
    steps_iter = range(1, steps + 1)
    if progress:
        from rich.progress import track

        steps_iter = track(steps_iter, total=steps, description="vision pretraining", transient=True)
    for step in steps_iter:
        loss = torch.zeros(())
        for enc in train:
            active = [k for k in heads if enc.n and step > attributes[k] and (enc.labels[k] != -100).any()]
            if not active:  # no visuals of this kind, or none of the heads on now labels them (images: motion)
                continue
            idx = rng.sample(range(enc.n), min(batch_size, enc.n))
            f = _pooled(model, enc.video, *enc.batch(idx))
            for k in active:
                y = enc.labels[k][idx]
                if (y != -100).any():
                    loss = loss + torch.nn.functional.cross_entropy(heads[k](f), y, ignore_index=-100)
        curve.append(round(loss.item(), 4))
        if not loss.requires_grad:  # no head has joined yet
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    after = {("clip_" if e.video else "image_") + k: v for e in test if e.n
             for k, v in _accuracy(model, heads, e).items()}
    for p, w in zip(tower, was):
        p.requires_grad_(w)
    save_pretrained(bundle, out / "hf" / "final")
    report = {"settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "limit": limit, "frames": frames,
                           "seed": seed, "attributes": attributes},
              "visuals": dict(counts), "loss": curve, "heldout_before": before, "heldout_after": after,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "vision.json").write_text(json.dumps(report, indent=2))
    return report
