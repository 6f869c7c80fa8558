"""Data throughput: WebDataset shards through RewardDataModule vs a plain JSON list + image files.

Builds N samples (image generation / image understanding pairs from easy-vqa images, a few video
understanding samples with synthetic mp4 videos), writes them (a) as shards (`write_shards`) and (b) in
the user JSON-lines format of `urt.data.convert` with image/video files beside it, then times one pass
(samples/s, worker start-up included) for each worker count:

* shards: `RewardDataModule(...).train_dataloader()` (read, decode, sample frames, encode, collate);
* json:   a map-style torch Dataset that reads the records once and loads each item's files in
          `__getitem__` (`materialize`, video decoding with the same frame sampling), then the same
          SampleEncoder and collator in a DataLoader.

Run:  python benchmarks/data_throughput.py [--samples 400 --videos 16 --workers 0,1,2 --batch-size 8]
(needs easy-vqa; the model is the tiny random one of --family, so this measures the data path only).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # data_fixtures: easy-vqa images and synthetic videos


def build_samples(n: int, n_videos: int):
    from data_fixtures import _vqa, mp4_bytes, vqa_image
    from urt.data.schema import Sample, Video

    paths, qs, ans, ids = _vqa()
    rng = random.Random(0)
    answers = sorted(set(ans))
    out = []
    for i in range(n - n_videos):
        label = 1 + rng.randrange(2)
        if i % 2 == 0:
            out.append(Sample(f"ig-{i}", "image_generation", label, [vqa_image(i % 500), vqa_image((i + 1) % 500)],
                              caption=f"a picture number {i}", source="bench"))
        else:
            from PIL import Image

            img = Image.open(paths[ids[i]]).convert("RGB")
            wrong = rng.choice([a for a in answers if a != ans[i]])
            pair = (ans[i], wrong) if label == 1 else (wrong, ans[i])
            out.append(Sample(f"iu-{i}", "image_understanding", label, [img], question=qs[i], answers=pair,
                              source="bench"))
    for j in range(n_videos):
        out.append(Sample(f"vu-{j}", "video_understanding", 1 + j % 2,
                          [Video(data=mp4_bytes(24, 8.0, seed=j), fps=8.0)], question="what moves?",
                          answers=("a red square", "a blue circle"), source="bench"))
    random.Random(1).shuffle(out)
    return out


def write_json(samples, root: Path) -> Path:
    from urt.data.schema import Video

    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "vid").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples:
        item = {"task": s.task, "label": s.label, "key": s.key, "source": s.source}
        if s.caption is not None:
            item["caption"] = s.caption
        else:
            item["question"], item["answers"] = s.question, list(s.answers)
        files = []
        for k, v in enumerate(s.visuals):
            if isinstance(v, Video):
                name = f"vid/{s.key}-{k}.mp4"
                (root / name).write_bytes(v.data)
            else:
                name = f"img/{s.key}-{k}.png"
                v.save(root / name)
            files.append(name)
        item["videos" if s.task.startswith("video") else "images"] = files
        lines.append(json.dumps(item))
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class JsonPairs(Dataset):
    """The JSON+files baseline: records parsed once, files loaded per item."""

    def __init__(self, path: Path, encoder, load_opts: dict):
        from urt.data.convert import records

        self.records = list(records("jsonl", path))
        self.encoder = encoder
        self.opts = load_opts

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from urt.data.formats.common import materialize
        from urt.data.schema import Video
        from urt.data.video import decode_video, fit_pixels

        s = materialize(self.records[i], verify_videos=False)
        o = self.opts
        visuals = []
        for v in s.visuals:
            if isinstance(v, Video):
                frames, fps = decode_video(v.data, frames=o["frames"], frame_sampling=o["frame_sampling"],
                                           fps=o["fps"], max_frames=o["max_frames"], min_pixels=o["video_min_pixels"],
                                           max_pixels=o["video_max_pixels"])
                visuals.append(Video(frames=frames, fps=fps))
            else:
                visuals.append(fit_pixels(v, o["min_pixels"], o["max_pixels"]))
        s.visuals = visuals
        return self.encoder(s)


def timed(iterable, n_expected: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for batch in iterable:
        n += len(batch["keys"])
    dt = time.perf_counter() - t0
    if n != n_expected:
        raise SystemExit(f"expected {n_expected} samples, got {n}")
    return dt, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--videos", type=int, default=16, help="how many of the samples are video understanding")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--family", default="qwen2_5_vl")
    ap.add_argument("--collate", default="padded", choices=("padded", "packed"))
    ap.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    ap.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    args = ap.parse_args(argv)

    from urt.data.collate import make_collator
    from urt.data.datamodule import RewardDataModule
    from urt.data.shards import write_shards
    from urt.models import load_model

    workers = [int(w) for w in args.workers.split(",")]
    root = Path(args.dir or tempfile.mkdtemp(prefix="urt-bench-"))
    t0 = time.perf_counter()
    samples = build_samples(args.samples, args.videos)
    write_shards(samples, root / "shards", maxcount=args.shard_size, overwrite=True)
    jpath = write_json(samples, root / "json")
    print(f"wrote {len(samples)} samples ({args.videos} videos) to {root} in {time.perf_counter() - t0:.1f}s")

    bundle = load_model("tiny", args.family)
    rows = []
    for w in workers:
        dm = RewardDataModule(train_shards=[str(root / "shards")], batch_size=args.batch_size, collate=args.collate,
                              num_workers=w, order="keep", target="answer", shuffle_buffer=100, bundle=bundle,
                              on_error="raise")
        dt_s, n = timed(dm.train_dataloader(), len(samples))
        ds = JsonPairs(jpath, dm.encoder, dm.load_opts)
        collator = make_collator(args.collate, bundle)
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=w, collate_fn=collator)
        dt_j, _ = timed(loader, len(samples))
        rows.append((w, n / dt_s, n / dt_j))

    print(f"\n{args.family}, {args.collate}, batch {args.batch_size}, {len(samples)} samples per pass")
    print(f"{'workers':>7} | {'shards (samples/s)':>18} | {'json+files (samples/s)':>22} | {'shards/json':>11}")
    print("-" * 68)
    for w, s, j in rows:
        print(f"{w:>7} | {s:>18.1f} | {j:>22.1f} | {s / j:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
