"""Ranking groups from easy-vqa's held-out images, for checking `urt rank` with the demo's judge.

Each group is a caption "a {colour} {shape}" and N test images: one that matches it and N-1 of other colour /
shape combinations, each a different one (the demo's image-generation pairs widened to a group; most differ
in both colour and shape), all at random positions, the match recorded as `expected`. `urt rank` then
reports how often the judge ranks it first (a k-way tie at the top counting 1/k) against chance (1/N):

    python -m urt.demo.rank runs/rank-evqa --groups 50 --n 6
    urt rank runs/rank-evqa/groups.jsonl --out runs/rank-evqa/out --model runs/demo/grpo/hf/final \
        --max-new-tokens 160 --batch-size 50 --groups-per-batch 8
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from urt.demo.data import image_attributes, load_image
from urt.errors import UrtError


def build_rank_groups(out_dir: str | Path, *, groups: int = 50, n: int = 6, split: str = "test", seed: int = 0,
                      image_size: int = 112) -> Path:
    """Write `groups` groups of `n` easy-vqa `split` images (PNG files under out_dir/images) and
    out_dir/groups.jsonl; returns the JSONL's path. Same arguments, same files."""
    if n < 2 or groups < 1:
        raise UrtError(f"need groups >= 1 and n >= 2, got groups={groups}, n={n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    attrs, _ = image_attributes(split)
    ids = sorted(attrs)
    by: dict[tuple[str, str], list[int]] = {}
    for k in ids:
        by.setdefault((attrs[k]["color"], attrs[k]["shape"]), []).append(k)
    rng = random.Random(seed)
    lines = []
    for g in range(groups):
        i = rng.choice(ids)
        at = attrs[i]
        # the N-1 others differ in colour, shape or both, each from a different (colour, shape) when possible
        wrong = [cs for cs in by if cs != (at["color"], at["shape"])]
        rng.shuffle(wrong)
        if len(wrong) < n - 1:
            raise UrtError(f"only {len(wrong)} other colour/shape combinations in easy-vqa {split}; n={n} is too many")
        cands = [i] + [rng.choice(by[cs]) for cs in wrong[:n - 1]]
        rng.shuffle(cands)
        names = []
        for c in cands:
            name = f"images/{split}-{c}.png"
            if not (out / name).exists():
                load_image(split, c).resize((image_size, image_size), Image.BICUBIC).save(out / name)
            names.append(name)
        lines.append({"key": f"evqa-{split}-rank-{g:04d}", "caption": f"a {at['color']} {at['shape']}",
                      "images": names, "expected": cands.index(i), "meta": {"image_ids": cands}})
    path = out / "groups.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write ranking groups of easy-vqa test images (see the module docstring).")
    p.add_argument("out", help="output folder (groups.jsonl and images/)")
    p.add_argument("--groups", type=int, default=50)
    p.add_argument("--n", type=int, default=6, help="candidates per group")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=112, help="the demo's image size (conf/demo/default.yaml)")
    a = p.parse_args(argv)
    print(build_rank_groups(a.out, groups=a.groups, n=a.n, split=a.split, seed=a.seed, image_size=a.image_size))


if __name__ == "__main__":
    main()
