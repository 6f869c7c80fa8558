import argparse
import io

import pytest
from PIL import Image
from rich.console import Console

from data_fixtures import mp4_bytes, synthetic_frames, vqa_image
from urt.data import cli as data_cli
from urt.data.inspect import CAPTION_H, PAD, THUMB, contact_sheet, inspect, scan, sheet_size
from urt.data.schema import Sample, Video
from urt.data.shards import write_shards


def _table_rows(text):
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.strip().startswith("│")]


def _samples():
    out = [Sample("vg0", "video_generation", 2,
                  [Video(frames=synthetic_frames(6), fps=4.0), Video(data=mp4_bytes(10, 5.0), fps=5.0)],
                  caption="a red square", source="synthetic", cot="<think>\nline one\nline two\n</think>\n"
                  "<answer>Video 2 is better</answer>")]
    for i in range(20):  # biased: the preferred answer is first in 18 of 20
        out.append(Sample(f"iu{i}", "image_understanding", 1 if i < 18 else 2, [vqa_image(i)],
                          question=f"what shape is it? {i}", answers=("a circle", "a square"), source="vlrb",
                          meta={"swapped": i % 5 == 0}))
    for i in range(6):
        out.append(Sample(f"ig{i}", "image_generation", "tie" if i == 5 else 1 + i % 2,
                          [vqa_image(i), vqa_image(i + 1)], caption="x" * 500, source="genai"))
    out.append(Sample("vu0", "video_understanding", 1, [Video(frames=synthetic_frames(3), fps=1.0)],
                      question="q?", answers=("yes", "no"), source="synthetic"))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(_samples(), d, maxcount=10, video_storage="file")
    return d


def test_scan_counts(shards):
    rep = scan(shards, progress=False)
    assert rep.total == 28 and len(rep.shards) == 3
    assert rep.tasks == {"image_understanding": 20, "image_generation": 6, "video_generation": 1,
                         "video_understanding": 1}
    assert rep.labels["image_understanding"] == {"1": 18, "2": 2}
    assert rep.labels["image_generation"] == {"1": 3, "2": 2, "tie": 1}
    assert rep.first_rate("image_understanding") == pytest.approx(0.9)
    assert rep.swapped["image_understanding"][True] == 4
    assert rep.sources == {"vlrb": 20, "genai": 6, "synthetic": 2}
    assert rep.with_cot == {"video_generation": 1}


def test_inspect_prints_and_writes_sheet(shards, tmp_path):
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    out = tmp_path / "sheet.png"
    assert inspect(str(shards), samples=2, sheet=out, max_items=5, console=console, progress=False) == 0
    text = buf.getvalue()
    assert "3 shard(s), 28 sample(s)" in text
    rows = {cells[0]: cells[1:] for cells in _table_rows(text)}
    assert rows["image_understanding"] == ["20", "18", "2", "0", "90.0%", "4", "0"]
    assert rows["image_generation"] == ["6", "3", "2", "1", "60.0%", "0", "0"]
    assert rows["all"] == ["28", "22", "5", "1", "", "4", "1"]
    assert rows["vlrb"] == ["20"] and rows["genai"] == ["6"]
    assert "position bias: in image_understanding the preferred candidate is shown first in 90.0% of 20" in text
    assert "vlrb" in text and "cot| <think>" in text and "cot| line one" in text and "(2 more lines)" in text
    img = Image.open(out)
    # rows: vg0 (two videos as 4-frame strips = 8 thumbnails), iu0..iu3 (1 each)
    assert img.size == sheet_size(5, 8) == (PAD + 8 * (THUMB + PAD), PAD + 5 * (THUMB + CAPTION_H + PAD))
    assert f"contact sheet: {out} (5 row(s), {img.size[0]}x{img.size[1]})" in text


def test_cli_inspect(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    parser = argparse.ArgumentParser(prog="urt")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    sheet = tmp_path / "s.png"
    args = parser.parse_args(["data", "inspect", str(shards / "*.tar"), "--samples", "1", "--sheet", str(sheet),
                              "--max-items", "2", "--no-progress", "--strict"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "28 sample(s)" in out and "image_generation" in out
    assert Image.open(sheet).size == sheet_size(2, 8)


def test_inspect_reports_problems(tmp_path):
    write_shards(_samples()[:3], tmp_path)
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    buf = io.StringIO()
    rc = inspect(tmp_path, samples=0, console=Console(file=buf, width=200), progress=False, strict=True)
    # the cut falls inside a tar header: tarfile ends quietly, index.json reveals the 2 lost samples
    assert rc == 1 and "problems found" in buf.getvalue() and "missing_samples: 2" in buf.getvalue()
    assert inspect(tmp_path, samples=0, console=Console(file=io.StringIO()), progress=False) == 0


def test_contact_sheet_minimum_width(tmp_path):
    s = Sample("k", "image_understanding", 1, [Image.new("RGB", (300, 20), "red")], question="q" * 400,
               answers=("a", "b"))
    assert contact_sheet([s], tmp_path / "x.png") == sheet_size(1, 1) == (640, PAD + THUMB + CAPTION_H + PAD)


# ---------------------------------------------------------------------------------------------- issue #31
def _with_bad_image(d):
    from data_fixtures import raw_sample, write_raw_shard

    d.mkdir()
    write_raw_shard(d / "shard-000000.tar", [raw_sample("good"), raw_sample("bad", {"v1.png": b"not a png"})])
    return d


@pytest.mark.parametrize("sheet", [False, True])
def test_strict_decodes_every_visual(tmp_path, capsys, monkeypatch, sheet):
    """#31.6: an image that does not decode fails --strict (with or without --sheet), named with its shard
    and key; the sheet says which sample it left out. Not an `<_io.BytesIO object …>` (#31.11)."""
    from urt.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    d = _with_bad_image(tmp_path / "d")
    extra = ["--sheet", str(tmp_path / "s.png")] if sheet else []
    assert main(["data", "inspect", str(d), "--no-progress", "--samples", "0", *extra]) == 0
    assert main(["data", "inspect", str(d), "--no-progress", "--samples", "0", "--strict", *extra]) == 1
    out = capsys.readouterr().out
    assert "corrupt_image: 1" in out and "shard-000000.tar:bad" in out and "left out" in out
    assert "BytesIO" not in out and "not an image format PIL can read" in out


def test_strict_on_an_empty_conversion_fails_without_a_traceback(tmp_path, capsys):
    from urt.cli import main

    write_shards([], tmp_path)  # what convert writes when nothing converted: index.json only
    assert main(["data", "inspect", str(tmp_path), "--no-progress"]) == 0
    assert "0 shard(s), 0 sample(s)" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path), "--no-progress", "--strict"]) == 1
    assert "no sample in" in capsys.readouterr().out
