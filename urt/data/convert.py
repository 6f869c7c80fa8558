"""Converters from the formats users bring into `urt.data.schema.Sample`s, and `urt data convert`.

Design: every format has a reader yielding `Record`s — a Sample whose visuals are still references
(`ImageRef(path|data)`, `VideoRef(path|frames|data)`) — and `materialize(record, root)` loads the
visuals into a `Sample`. The `convert_*` functions chain the two (lazily, one item at a time), or,
with `load_visuals=False`, yield the Records themselves: counts, labels and order of a benchmark
file can be checked without its images/videos.

Formats (`FORMATS`), with their input and label rule (details in each reader's docstring):

| format               | input                                              | label                                   |
|----------------------|----------------------------------------------------|-----------------------------------------|
| sft_json             | official SFT JSON/JSONL (`conversations`, `images`) | `<answer>` of the gpt turn               |
| grpo_json            | official GRPO JSON/JSONL (`problem`, `solution`, `images`/`video`) | `solution`                |
| mix_yaml             | dataset-mixing YAML (`datasets: [{json_path, image_folder, sampling_strategy}]`) | as SFT/GRPO |
| vl_rewardbench       | VL-RewardBench JSON list                           | human_ranking [0,1] -> 1, [1,0] -> 2     |
| genai_bench_image    | GenAI-Bench image rows (parquet/jsonl/json/csv)    | leftvote 1, rightvote 2, tie/bothbad "tie" |
| genai_bench_video    | GenAI-Bench video JSON list                        | as above                                 |
| videogen_rewardbench | VideoGen-RewardBench rows (parquet/jsonl/json/csv) | Overall A 1, B 2, same "tie"             |
| sharegptvideo        | ShareGPTVideo pairwise JSON/JSONL                  | `answer` (Answer N is better / 1|2 / response text) |
| jsonl                | users' own pairs, one object per line (`urt.data.formats.user`) | `label`                  |

Task and fields of the official formats are recovered by inverting the packaged prompt templates
(`urt.data.formats.official`). Visual paths are relative to the folder given (`root` /
`image_folder` / `video_folder`; default: the input file's folder); absolute paths work as is.

Errors: `on_error="raise"` (default) raises a UrtError naming file, item index (and id) and what is
wrong; `on_error="skip"` skips the item and counts it per reason in a `ConvertStats` (a warning is
issued at the end when no stats object was passed, so skips are never silent). A file that cannot
be read at all (not JSON, not a list, missing) is always an error.

The user JSONL format (`--format jsonl`, `convert_jsonl`). One JSON object per line (a .json file holding a list of the same objects works too):

    {"task": "image_generation", "caption": "a red bus", "images": ["a.png", "b.png"], "label": 1}
    {"task": "video_generation", "caption": "a cat jumps", "videos": ["a.mp4", "b.mp4"], "label": "tie"}
    {"task": "image_understanding", "question": "What is shown?", "answers": ["A bus.", "A car."],
     "images": ["ref.jpg"], "label": 2, "cot": "<think>…</think>\\n<answer>Answer 2 is better</answer>"}
    {"task": "video_understanding", "question": "…", "answers": ["…", "…"],
     "videos": [["f0.png", "f1.png", "f2.png"]], "label": 1, "key": "q17", "source": "mine",
     "meta": {"annotator": "x"}}

Fields:
* `task` (required): image_generation | video_generation | image_understanding | video_understanding.
* generation tasks: `caption` and two visuals (candidate 1 then 2);
  understanding tasks: `question`, `answers` [answer 1, answer 2] (or `answer1`/`answer2`) and one
  reference visual.
* image tasks: `images`, a list of image paths; video tasks: `videos`, a list whose entries are an
  encoded video file path (mp4, webm, …) or a list of frame image paths.
  Paths are relative to the folder given (`--root`), default the file's folder; absolute paths work.
* `label` (required): 1 or 2 (the preferred candidate; "1"/"2" accepted) or "tie".
* optional: `cot` (a `<think>…</think>\\n<answer>…</answer>` trace), `key` (default
  `<file stem>-<line index>`), `source` (default the file stem), `meta` (an object, kept as is).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator

from urt.data.formats.benchmarks import (
    GENAI_VOTES,
    VIDEOGEN_OVERALL,
    VL_GROUPS,
    VL_SCHEMES,
    genai_bench_image_records,
    genai_bench_video_records,
    sharegptvideo_records,
    videogen_rewardbench_records,
    vl_rewardbench_group,
    vl_rewardbench_records,
)
from urt.data.formats.common import (
    ConvertStats,
    ImageRef,
    ItemError,
    Record,
    VideoRef,
    check_on_error,
    finish,
    materialize,
)
from urt.data.formats.official import (
    answer_label,
    grpo_records,
    match_prompt,
    mix_records,
    mix_rng,
    read_mix_yaml,
    select_indices,
    sft_records,
)
from urt.data.formats.user import jsonl_records
from urt.data.schema import Sample
from urt.errors import UrtError

__all__ = [
    "FORMATS", "GENAI_VOTES", "VIDEOGEN_OVERALL", "VL_GROUPS", "VL_SCHEMES",
    "ConvertStats", "ImageRef", "ItemError", "Record", "VideoRef",
    "answer_label", "convert", "convert_genai_bench_image", "convert_genai_bench_video",
    "convert_grpo_json", "convert_jsonl", "convert_mix_yaml", "convert_sft_json", "convert_sharegptvideo",
    "convert_videogen_rewardbench", "convert_vl_rewardbench", "match_prompt", "materialize", "mix_rng",
    "read_mix_yaml", "records", "register_convert", "select_indices", "vl_rewardbench_group",
]


# ------------------------------------------------------------------------------------- registry
def _folder_reader(fn):
    def read(src, root, seed, on_error, stats):
        return fn(src, root, on_error=on_error, stats=stats)
    return read


FORMATS: dict[str, Callable] = {
    "sft_json": _folder_reader(sft_records),
    "grpo_json": _folder_reader(grpo_records),
    "mix_yaml": lambda src, root, seed, on_error, stats: mix_records(src, root, seed=seed, on_error=on_error,
                                                                    stats=stats),
    "vl_rewardbench": _folder_reader(vl_rewardbench_records),
    "genai_bench_image": _folder_reader(genai_bench_image_records),
    "genai_bench_video": _folder_reader(genai_bench_video_records),
    "videogen_rewardbench": _folder_reader(videogen_rewardbench_records),
    "sharegptvideo": _folder_reader(sharegptvideo_records),
    "jsonl": _folder_reader(jsonl_records),
}


def records(fmt: str, src: str | Path, *, root: str | Path | None = None, seed: int = 0,
            on_error: str = "raise", stats: ConvertStats | None = None) -> Iterator[Record]:
    """The Records of `src` in format `fmt` (no visuals loaded). `root`: the folder relative visual
    paths resolve against (default: the input file's folder; for mix_yaml: the folder relative
    json_path/image_folder entries resolve against, default the YAML's folder). `seed`: for the
    `random:` strategies of mix_yaml."""
    if fmt not in FORMATS:
        raise UrtError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    check_on_error(on_error)
    p = Path(src)
    if not p.is_file():
        raise UrtError(f"{p}: input file not found")
    if root is not None and not Path(root).is_dir():
        raise UrtError(f"{root}: folder not found")
    return FORMATS[fmt](p, root, seed, on_error, stats if stats is not None else ConvertStats())


def convert(fmt: str, src: str | Path, *, root: str | Path | None = None, seed: int = 0,
            load_visuals: bool = True, on_error: str = "raise", stats: ConvertStats | None = None,
            limit: int | None = None, verify_videos: bool = True) -> Iterator[Sample | Record]:
    """Samples (or, with `load_visuals=False`, Records) of `src` in format `fmt`, lazily, in file
    order. `limit` stops after that many converted items. Skips are counted in `stats` (without
    one, a warning at the end reports them). Video files are checked to open as videos
    (`verify_videos`), not decoded."""
    st = stats if stats is not None else ConvertStats()
    recs = records(fmt, src, root=root, seed=seed, on_error=on_error, stats=st)
    out = finish(recs, load_visuals=load_visuals, on_error=on_error, stats=st, warn=stats is None,
                 verify_videos=verify_videos)
    return itertools.islice(out, limit) if limit is not None else out


def _converter(fmt: str, folder_arg: str, doc: str):
    def fn(path, folder=None, *, load_visuals: bool = True, on_error: str = "raise",
           stats: ConvertStats | None = None, limit: int | None = None, **kw) -> Iterator[Any]:
        return convert(fmt, path, root=folder, load_visuals=load_visuals, on_error=on_error, stats=stats,
                       limit=limit, **kw)
    fn.__name__ = f"convert_{fmt}"
    fn.__qualname__ = fn.__name__
    fn.__doc__ = (f"convert_{fmt}(path, {folder_arg}=None, *, load_visuals=True, on_error='raise', "
                  f"stats=None, limit=None)\n\n{doc}\n\nYields Samples (Records with load_visuals=False); "
                  f"{folder_arg} defaults to the input file's folder.")
    return fn


convert_sft_json = _converter("sft_json", "image_folder", sft_records.__doc__ or
                              "Official SFT JSON/JSONL (see urt.data.formats.official).")
convert_grpo_json = _converter("grpo_json", "image_folder", "Official GRPO JSON/JSONL (see "
                               "urt.data.formats.official).")
convert_vl_rewardbench = _converter("vl_rewardbench", "image_folder", vl_rewardbench_records.__doc__)
convert_genai_bench_image = _converter("genai_bench_image", "image_folder", genai_bench_image_records.__doc__)
convert_genai_bench_video = _converter("genai_bench_video", "video_folder", genai_bench_video_records.__doc__)
convert_videogen_rewardbench = _converter("videogen_rewardbench", "video_folder",
                                          videogen_rewardbench_records.__doc__)
convert_sharegptvideo = _converter("sharegptvideo", "image_folder", sharegptvideo_records.__doc__)
convert_jsonl = _converter("jsonl", "root", "Users' own pairs, one JSON object per line (see module doc).")


def convert_mix_yaml(path, root=None, *, seed: int = 0, load_visuals: bool = True, on_error: str = "raise",
                     stats: ConvertStats | None = None, limit: int | None = None, **kw) -> Iterator[Any]:
    """Dataset-mixing YAML: each dataset's items reduced by its `sampling_strategy` (all, first:N,
    end:N, random:N, random:P%; random ones drawn by `mix_rng(seed, k)`, kept in file order), then
    converted as SFT or GRPO items. Relative paths in the YAML resolve against `root` (default: the
    YAML's folder)."""
    return convert("mix_yaml", path, root=root, seed=seed, load_visuals=load_visuals, on_error=on_error,
                   stats=stats, limit=limit, **kw)


# ------------------------------------------------------------------------------------------ CLI
def register_convert(data_subparsers) -> None:
    """Add `urt data convert` to the `urt data` subparsers."""
    p = data_subparsers.add_parser(
        "convert", help="convert raw data (official JSON/YAML, benchmarks, own JSONL) into shards",
        description="Convert a dataset into WebDataset shards of samples. Formats: " + ", ".join(FORMATS)
                    + ". Relative visual paths resolve against --root (default: the input's folder).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=list(FORMATS), dest="fmt", help="input format")
    p.add_argument("input", help="input file (JSON, JSONL, YAML, parquet or CSV, per format)")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--root", default=None,
                   help="folder relative image/video paths resolve against (default: the input's folder; "
                        "mix_yaml: the folder its relative json_path/image_folder entries resolve against)")
    p.add_argument("--seed", type=int, default=0, help="seed of random sampling strategies (mix_yaml)")
    p.add_argument("--image-format", choices=["png", "jpg"], default="png", help="how images are stored")
    p.add_argument("--video-storage", choices=["frames", "file"], default="frames",
                   help="store videos as frame images or as the encoded file")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad items: stop with an error naming file and item, or skip and count them")
    p.add_argument("--limit", type=int, default=None, help="convert at most N samples")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default 'shard')")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards with the same prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert_cmd)


def _convert_cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from urt.data.shards import write_shards

    if args.limit is not None and args.limit < 0:
        raise UrtError(f"--limit must be >= 0, got {args.limit}")
    stats = ConvertStats()
    samples = convert(args.fmt, args.input, root=args.root, seed=args.seed, on_error=args.on_error,
                      stats=stats, limit=args.limit)
    console = Console(stderr=True)
    progress = Progress(SpinnerColumn(), TextColumn("[bold]converting[/] {task.description}"),
                        MofNCompleteColumn() if args.limit else TextColumn("{task.completed} samples"),
                        BarColumn() if args.limit else TextColumn(""),
                        TextColumn("skipped {task.fields[skipped]}"), TimeElapsedColumn(),
                        console=console, disable=args.no_progress, transient=False)

    def counted(it):
        for s in it:
            yield s
            progress.update(tid, advance=1, skipped=stats.n_skipped)

    with progress:
        tid = progress.add_task(Path(args.input).name, total=args.limit, skipped=0)
        paths = write_shards(counted(samples), args.out, prefix=args.prefix, maxcount=args.maxcount,
                             image_format=args.image_format, video_storage=args.video_storage,
                             overwrite=args.overwrite)
        progress.update(tid, skipped=stats.n_skipped)

    out = Console()
    out.print(f"{args.fmt}: {args.input}: {stats.read} item(s) read, {stats.converted} samples written in "
              f"{len(paths)} shard(s) to {args.out}", soft_wrap=True, highlight=False)
    table = Table()
    table.add_column("task")
    table.add_column("label")
    table.add_column("samples", justify="right")
    for (task, label), n in sorted(stats.by_label.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        table.add_row(task, str(label), str(n))
    out.print(table)
    if stats.skipped:
        out.print(f"skipped: {stats.n_skipped} item(s)", highlight=False)
        st = Table()
        st.add_column("reason")
        st.add_column("items", justify="right")
        st.add_column("first example")
        for reason, n in sorted(stats.skipped.items()):
            st.add_row(reason, str(n), stats.examples.get(reason, [""])[0])
        out.print(st)
    else:
        out.print("skipped: 0")
    if stats.converted == 0:
        out.print("no samples converted", style="bold red")
        return 1
    return 0
