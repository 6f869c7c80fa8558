"""`urt data inspect`: what is in a set of shards — counts per task, label, source, candidate order
(position bias, METHOD §4), a few samples as text, and a contact-sheet PNG of the first samples.

Counting reads only the json members (no image/video decoding), so it scales to large shard sets; the
contact sheet decodes just the samples it shows.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from urt.data.schema import TASKS, Sample, Video
from urt.data.shards import SkipStats, expected_counts, iter_headers, read_shards, resolve_shards

# Contact-sheet geometry (pixels): each visual is shown in THUMB x THUMB boxes (a video as a strip of
# up to FRAMES_PER_VIDEO frames), PAD between boxes and around rows, CAPTION_H for two caption lines.
THUMB = 128
PAD = 8
CAPTION_H = 30
MIN_WIDTH = 640
FRAMES_PER_VIDEO = 4


@dataclass
class ShardReport:
    shards: list[str]
    total: int = 0
    tasks: Counter = field(default_factory=Counter)
    labels: dict = field(default_factory=lambda: defaultdict(Counter))  # task -> Counter(label)
    sources: Counter = field(default_factory=Counter)
    swapped: dict = field(default_factory=lambda: defaultdict(Counter))  # task -> Counter(bool)
    with_cot: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)  # first few (shard, header)
    stats: SkipStats = field(default_factory=SkipStats)

    def first_rate(self, task: str) -> float | None:
        """Fraction of non-tie pairs of ``task`` whose preferred candidate is shown first (label 1)."""
        c = self.labels.get(task, Counter())
        n = c.get("1", 0) + c.get("2", 0)
        return c.get("1", 0) / n if n else None


def scan(spec, *, examples: int = 4, progress: bool = True, console=None) -> ShardReport:
    """Count tasks, labels, sources and candidate order over all samples (json members only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    urls = resolve_shards(spec)
    expected = expected_counts(urls)
    total = sum(expected.values()) if len(expected) == len(urls) else None
    rep = ShardReport(shards=urls)
    with Progress(TextColumn("scanning {task.fields[n]} shard(s)"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True, disable=not progress) as bar:
        t = bar.add_task("scan", total=total, n=len(urls))
        for shard, h in iter_headers(urls, on_error="skip", stats=rep.stats):
            task, label = h["task"], str(h["label"])
            rep.total += 1
            rep.tasks[task] += 1
            rep.labels[task][label] += 1
            rep.sources[h.get("source") or "(none)"] += 1
            meta = h.get("meta") if isinstance(h.get("meta"), dict) else {}
            rep.swapped[task][bool(meta.get("swapped", False))] += 1
            if h.get("cot"):
                rep.with_cot[task] += 1
            if len(rep.examples) < examples:
                rep.examples.append((shard, h))
            bar.advance(t)
    return rep


def _trunc(text, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def print_report(rep: ShardReport, console) -> None:
    from rich.table import Table

    console.print(f"[bold]{len(rep.shards)} shard(s), {rep.total} sample(s)[/bold]")
    t = Table(title="samples per task and label",
              caption="pref. 1st: share of non-tie pairs whose preferred candidate is shown first (label 1)")
    t.add_column("task", no_wrap=True, min_width=len("video_understanding"))
    for col in ("samples", "label 1", "label 2", "tie", "pref. 1st", "swapped", "CoT"):
        t.add_column(col, justify="right")
    tasks = [x for x in TASKS if x in rep.tasks] + sorted(set(rep.tasks) - set(TASKS))
    for task in tasks:
        c = rep.labels[task]
        rate = rep.first_rate(task)
        t.add_row(task, str(rep.tasks[task]), str(c.get("1", 0)), str(c.get("2", 0)), str(c.get("tie", 0)),
                  "–" if rate is None else f"{100 * rate:.1f}%", str(rep.swapped[task].get(True, 0)),
                  str(rep.with_cot.get(task, 0)))
    t.add_row("all", str(rep.total), *(str(sum(rep.labels[k].get(lab, 0) for k in tasks))
                                         for lab in ("1", "2", "tie")),
              "", str(sum(rep.swapped[k].get(True, 0) for k in tasks)), str(sum(rep.with_cot.values())))
    console.print(t)
    s = Table(title="samples per source")
    s.add_column("source", no_wrap=True)
    s.add_column("samples", justify="right")
    for src, n in rep.sources.most_common():
        s.add_row(src, str(n))
    console.print(s)
    for task in tasks:
        rate = rep.first_rate(task)
        n = rep.labels[task].get("1", 0) + rep.labels[task].get("2", 0)
        if rate is not None and n >= 20 and abs(rate - 0.5) > 0.1:
            console.print(f"[yellow]position bias: in {task} the preferred candidate is shown first in "
                          f"{100 * rate:.1f}% of {n} pairs; present pairs in both orders "
                          f"(Sample.swapped) for training and evaluation[/yellow]")
    if rep.stats.total_skipped:
        console.print(f"[red]problems found:[/red]\n{rep.stats.summary()}")


def _describe_visuals(h: dict) -> str:
    out = []
    for v in h.get("visuals", []):
        if v.get("kind") == "image":
            out.append(f"image {v.get('member')} {v.get('width', '?')}x{v.get('height', '?')}")
        elif "frames" in v:
            out.append(f"video {len(v['frames'])} frames" + (f" @ {v['fps']:.3g} fps" if v.get("fps") else ""))
        else:
            out.append(f"video file {v.get('member')}" + (f" @ {v['fps']:.3g} fps" if v.get("fps") else ""))
    return "; ".join(out)


def print_examples(rep: ShardReport, console, width: int = 160) -> None:
    from rich.markup import escape

    for shard, h in rep.examples:
        console.rule(f"{escape(str(h['key']))}  [dim]{escape(Path(shard).name)}[/dim]")
        console.print(f"task {h['task']}  label {h['label']}  source {escape(str(h.get('source') or '-'))}"
                      f"  swapped {bool((h.get('meta') or {}).get('swapped', False))}")
        if h.get("caption") is not None:
            console.print(f"caption: {escape(_trunc(h['caption'], width))}")
        if h.get("question") is not None:
            console.print(f"question: {escape(_trunc(h['question'], width))}")
            for i, a in enumerate(h.get("answers") or [], 1):
                console.print(f"answer {i}: {escape(_trunc(a, width))}")
        console.print(f"visuals: {escape(_describe_visuals(h))}")
        if h.get("cot"):
            lines = [ln for ln in str(h["cot"]).splitlines() if ln.strip()]
            for ln in lines[:3]:
                console.print(f"  cot| {escape(_trunc(ln, width))}")
            if len(lines) > 3:
                console.print(f"  cot| … ({len(lines) - 3} more lines)")


# ---------------------------------------------------------------------------------- contact sheet
_OUTLINES = ((150, 150, 150), (70, 110, 220), (220, 120, 40))  # per visual: tells strips apart


def _boxes(s: Sample, frames_per_video: int) -> list[tuple[Image.Image, int]]:
    """(thumbnail source, visual index) per box of a sample's row."""
    out: list[tuple[Image.Image, int]] = []
    for vi, v in enumerate(s.visuals):
        if isinstance(v, Video):
            fr = v.frames or []
            if len(fr) > frames_per_video:
                step = (len(fr) - 1) / (frames_per_video - 1) if frames_per_video > 1 else 0
                fr = [fr[round(i * step)] for i in range(frames_per_video)]
            out.extend((f, vi) for f in fr)
        else:
            out.append((v, vi))
    return out


def sheet_size(n_rows: int, max_boxes: int) -> tuple[int, int]:
    """(width, height) of a contact sheet with ``n_rows`` rows and at most ``max_boxes`` thumbnails in
    a row."""
    width = max(MIN_WIDTH, PAD + max_boxes * (THUMB + PAD))
    return width, PAD + n_rows * (THUMB + CAPTION_H + PAD)


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "…", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


def contact_sheet(samples: list[Sample], out_path: str | Path, *,
                  frames_per_video: int = FRAMES_PER_VIDEO) -> tuple[int, int]:
    """Write a PNG with one row per sample: its visuals as thumbnails (videos as a strip of frames)
    and a caption (key, task, label, text excerpt). Returns the sheet's (width, height)."""
    rows = [(s, _boxes(s, frames_per_video)) for s in samples]
    max_boxes = max((len(b) for _, b in rows), default=0)
    w, h = sheet_size(len(rows), max_boxes)
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    y = PAD
    for s, boxes in rows:
        x = PAD
        for img, vi in boxes:
            th = ImageOps.contain(img, (THUMB, THUMB))  # scales small images up, large ones down
            sheet.paste(th, (x + (THUMB - th.width) // 2, y + (THUMB - th.height) // 2))
            draw.rectangle((x - 1, y - 1, x + THUMB, y + THUMB), outline=_OUTLINES[vi % len(_OUTLINES)], width=1)
            x += THUMB + PAD
        text = s.caption if s.caption is not None else (
            f"Q: {s.question} | A1: {s.answers[0]} | A2: {s.answers[1]}")
        line1 = f"{s.key} | {s.task} | label {s.label} | {s.source or '-'}"
        draw.text((PAD, y + THUMB + 2), _fit_text(draw, line1, font, w - 2 * PAD), fill=(0, 0, 0), font=font)
        draw.text((PAD, y + THUMB + 16), _fit_text(draw, " ".join(str(text).split()), font, w - 2 * PAD),
                  fill=(60, 60, 60), font=font)
        y += THUMB + CAPTION_H + PAD
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, format="PNG")
    return w, h


def inspect(spec, *, samples: int = 4, sheet: str | Path | None = None, max_items: int = 48,
            console=None, progress: bool = True, strict: bool = False) -> int:
    """Print counts and examples for the shards ``spec``; optionally write a contact sheet of the first
    ``max_items`` samples. Returns 0, or 1 when ``strict`` and any sample or shard was bad."""
    from rich.console import Console

    from rich.markup import escape

    console = console or Console()
    rep = scan(spec, examples=samples, progress=progress, console=console)
    print_report(rep, console)
    if samples:
        print_examples(rep, console)
    want_sheet = sheet is not None and max_items > 0
    items: list[Sample] = []
    decoded = SkipStats()
    if strict or want_sheet:
        # --strict decodes every sample (the json scan cannot see a visual that does not decode); the sheet
        # alone decodes only the samples it shows. Either way a sample that fails is reported, not dropped.
        stream = read_shards(rep.shards, on_error="skip", stats=decoded, frames=FRAMES_PER_VIDEO,
                             max_pixels=(2 * THUMB) ** 2, video_max_pixels=(2 * THUMB) ** 2)
        for s in stream if strict else itertools.islice(stream, max_items):
            if want_sheet and len(items) < max_items:
                items.append(s)
    if want_sheet:
        w, h = contact_sheet(items, sheet)
        console.print(f"contact sheet: {sheet} ({len(items)} row(s), {w}x{h})")
    visual = {r: n for r, n in decoded.skipped.items() if r not in rep.stats.skipped}
    if visual:  # what only decoding found (the json scan already reported the rest)
        only = SkipStats(ok=decoded.ok, skipped=Counter(visual),
                         examples={r: decoded.examples.get(r, []) for r in visual})
        where = "decoding every sample (--strict)" if strict else "decoding the contact sheet's samples"
        console.print(f"[red]problems found {where}; these samples are left out"
                      f"{' of the sheet' if want_sheet else ''}:[/red]\n{escape(only.summary())}")
    if strict and rep.total == 0:
        console.print(f"[red]no sample in {escape(str(spec))} (--strict)[/red]")
        return 1
    return 1 if strict and (rep.stats.total_skipped or decoded.total_skipped) else 0
