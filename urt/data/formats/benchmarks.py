"""Benchmark and public pairwise formats (docs/method.md §Evaluation).

| format               | rows                                                     | label                        |
|----------------------|----------------------------------------------------------|------------------------------|
| vl_rewardbench       | JSON list: id, query, response[2], image, human_ranking… | human_ranking[0]==0 -> 1, [1,0] -> 2 |
| genai_bench_image    | parquet/jsonl/json/csv: prompt, left_image, right_image, vote_type | leftvote 1, rightvote 2, tievote/bothbad_vote "tie" |
| genai_bench_video    | JSON list: id, prompt, video_left, video_right, vote_type | as above                     |
| videogen_rewardbench | parquet/jsonl/json/csv: prompt, path_A, path_B, Overall   | A 1, B 2, same "tie"         |
| sharegptvideo        | JSON list/jsonl: prompt, images[frames], responses[2], answer | see `_sharegpt_label`    |

Ties keep the original vote in meta["vote"]. Keys: the row's id when it has one (VL-RewardBench,
GenAI-Bench video), else `<format>-<row index>`. Other scalar columns are kept in meta.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from urt.data.formats.common import (
    ConvertStats,
    ItemError,
    Record,
    drive,
    folder_of,
    image_ref,
    iter_json_list,
    iter_rows,
    require,
    scalar_meta,
    video_ref,
)
from urt.data.formats.official import iter_items

# ----------------------------------------------------------------------------------- VL-RewardBench
VL_GROUPS = ("general", "hallucination", "reasoning")
VL_SCHEMES = ("official", "official_script")
_HALLUCINATION_PREFIXES = ("hallucination_pair", "RLAIF", "RLHF")
_REASONING_PREFIXES = ("mathverse", "mmmu")


def vl_rewardbench_group(item_id: str, scheme: str = "official") -> str:
    """Category of a VL-RewardBench item from its id prefix (docs/method.md §Evaluation).

    official: hallucination = hallucination_pair (POVID) + RLAIF + RLHF, reasoning = mathverse + mmmu,
    general = everything else (wildvision and the rest). official_script: as the official eval script
    counted, with the POVID `hallucination_pair` items in general."""
    if scheme not in VL_SCHEMES:
        raise ValueError(f"unknown grouping scheme {scheme!r}; known: {', '.join(VL_SCHEMES)}")
    s = str(item_id)
    if s.startswith(_REASONING_PREFIXES):
        return "reasoning"
    if s.startswith("hallucination_pair"):
        return "hallucination" if scheme == "official" else "general"
    if s.startswith(_HALLUCINATION_PREFIXES):
        return "hallucination"
    return "general"


def vl_rewardbench_records(path, image_folder=None, *, on_error="raise", stats: ConvertStats
                           ) -> Iterator[Record]:
    """VL-RewardBench (image understanding). Label: `human_ranking` ranks the two responses (0 =
    best), so [0, 1] -> response[0] preferred -> 1 and [1, 0] -> 2; anything else is an error.
    Key = id; the real file repeats 25 ids (different response pairs for one reasoning question),
    so the n-th occurrence (n >= 2) of an id gets the key `<id>#<n>`; meta["id"] is the raw id.
    meta: group (official grouping), group_official_script, human_ranking, models, judge, rationale,
    ground_truth, query_source, index. source = query_source (or "vl_rewardbench" when empty)."""
    folder = folder_of(path, image_folder)
    seen: Counter = Counter()
    taken: dict[str, int] = {}  # key -> index of the item that has it

    def parse(index: int, it: Any) -> Record:
        item_id = require(it, "id", (str, int))
        query = require(it, "query", str)
        resp = require(it, "response", list)
        if len(resp) != 2 or not all(isinstance(r, str) for r in resp):
            raise ItemError("missing field", f"'response' must be a list of 2 strings, got "
                                             f"{len(resp)} item(s)")
        hr = require(it, "human_ranking", list)
        if sorted(x for x in hr if isinstance(x, int) and not isinstance(x, bool)) != [0, 1] or len(hr) != 2:
            raise ItemError("bad label", f"human_ranking must be [0, 1] or [1, 0], got {hr!r}")
        label = 1 if hr[0] == 0 else 2
        image = image_ref(require(it, "image", str), folder)
        seen[item_id] += 1
        n = seen[item_id]
        key = str(item_id if n == 1 else f"{item_id}#{n}")
        if key in taken:
            raise ItemError("duplicate key", f"key {key!r} is already the key of item {taken[key]} (repeated ids "
                                             f"are keyed '<id>#<n>' from their 2nd occurrence on, so an id that "
                                             f"itself reads '<id>#<n>' can collide: rename one of the two)")
        taken[key] = index
        src = it.get("query_source") or ""
        meta = {
            "benchmark": "vl_rewardbench", "id": item_id, "index": index,
            "group": vl_rewardbench_group(item_id, "official"),
            "group_official_script": vl_rewardbench_group(item_id, "official_script"),
            "human_ranking": list(hr), "query_source": src,
        }
        for k in ("models", "judge", "rationale", "ground_truth"):
            if k in it:
                meta[k] = it[k]
        return Record(key, "image_understanding", label, [image], question=query,
                      answers=(resp[0], resp[1]), source=src or "vl_rewardbench", meta=meta)

    return drive(iter_json_list(path), parse, path, on_error=on_error, stats=stats,
                 ident=lambda it: it.get("id"))


# ------------------------------------------------------------------------------------ GenAI-Bench
GENAI_VOTES = {"leftvote": 1, "rightvote": 2, "tievote": "tie", "bothbad_vote": "tie"}


def _vote(v: Any) -> Any:
    if not isinstance(v, str) or v.strip() not in GENAI_VOTES:
        raise ItemError("bad label", f"unknown vote_type {v!r}; expected one of "
                                     f"{', '.join(GENAI_VOTES)}")
    return GENAI_VOTES[v.strip()]


def _row_key(fmt: str, row: dict, index: int) -> tuple[str, Any]:
    for k in ("id", "question_id", "key"):
        if isinstance(row, dict) and row.get(k) not in (None, ""):
            return str(row[k]), row[k]
    return f"{fmt}-{index:07d}", None


def genai_bench_video_records(path, video_folder=None, *, on_error="raise", stats: ConvertStats
                              ) -> Iterator[Record]:
    """GenAI-Bench video (video generation): `video_left` is candidate 1, `video_right` candidate
    2; videos are encoded files relative to the video folder. Key = str(id)."""
    folder = folder_of(path, video_folder)
    keys: set[str] = set()

    def parse(index: int, it: Any) -> Record:
        item_id = require(it, "id", (int, str))
        prompt = require(it, "prompt", str)
        vote = it.get("vote_type") if isinstance(it, dict) else None
        if vote is None:
            raise ItemError("missing field", "missing field 'vote_type'")
        label = _vote(vote)
        left = video_ref(require(it, "video_left", str), folder, "video_left")
        right = video_ref(require(it, "video_right", str), folder, "video_right")
        key = str(item_id)
        if key in keys:
            raise ItemError("duplicate key", f"duplicate id {item_id!r}")
        keys.add(key)
        meta = {"benchmark": "genai_bench_video", "id": item_id, "index": index, "vote": vote}
        return Record(key, "video_generation", label, [left, right], caption=prompt,
                      source="genai_bench_video", meta=meta)

    return drive(iter_rows(path), parse, path, on_error=on_error, stats=stats,
                 ident=lambda it: it.get("id"))


def genai_bench_image_records(path, image_folder=None, *, on_error="raise", stats: ConvertStats
                              ) -> Iterator[Record]:
    """GenAI-Bench image (image generation), rows exported from the HF dataset (config
    image_generation) to parquet (images embedded as {"bytes", "path"}), jsonl/json or csv (images
    as paths relative to the image folder). `left_image` is candidate 1."""
    folder = folder_of(path, image_folder)

    def parse(index: int, it: Any) -> Record:
        prompt = require(it, "prompt", str)
        vote = it.get("vote_type")
        if vote is None:
            raise ItemError("missing field", "missing field 'vote_type'")
        label = _vote(vote)
        for k in ("left_image", "right_image"):
            if it.get(k) in (None, ""):
                raise ItemError("missing field", f"missing field {k!r}")
        left = image_ref(it["left_image"], folder, "left_image")
        right = image_ref(it["right_image"], folder, "right_image")
        key, ident = _row_key("genai_image", it, index)
        meta = {"benchmark": "genai_bench_image", "index": index, "vote": vote,
                **scalar_meta(it, ("prompt", "vote_type", "left_image", "right_image"))}
        return Record(key, "image_generation", label, [left, right], caption=prompt,
                      source="genai_bench_image", meta=meta)

    return drive(iter_rows(path), parse, path, on_error=on_error, stats=stats,
                 ident=lambda it: _row_key("genai_image", it, 0)[1])


# ------------------------------------------------------------------------------ VideoGen-RewardBench
VIDEOGEN_OVERALL = {"a": 1, "b": 2, "same": "tie"}


def videogen_rewardbench_records(path, video_folder=None, *, on_error="raise", stats: ConvertStats
                                 ) -> Iterator[Record]:
    """VideoGen-RewardBench (video generation), rows from the HF dataset (split eval) as
    parquet/jsonl/json/csv: `path_A` is candidate 1, `path_B` candidate 2, `Overall` A -> 1, B -> 2,
    same -> "tie" (case-insensitive; the original in meta["vote"]). Other columns (model names,
    VQ/MQ/TA votes) are kept in meta."""
    folder = folder_of(path, video_folder)

    def parse(index: int, it: Any) -> Record:
        prompt = require(it, "prompt", str)
        overall = it.get("Overall")
        if overall is None:
            raise ItemError("missing field", "missing field 'Overall'")
        if not isinstance(overall, str) or overall.strip().lower() not in VIDEOGEN_OVERALL:
            raise ItemError("bad label", f"unknown Overall {overall!r}; expected A, B or same")
        label = VIDEOGEN_OVERALL[overall.strip().lower()]
        a = video_ref(require(it, "path_A", (str, dict)), folder, "path_A")
        b = video_ref(require(it, "path_B", (str, dict)), folder, "path_B")
        key, _ = _row_key("videogen", it, index)
        meta = {"benchmark": "videogen_rewardbench", "index": index, "vote": overall,
                **scalar_meta(it, ("prompt", "path_A", "path_B", "Overall"))}
        return Record(key, "video_generation", label, [a, b], caption=prompt,
                      source="videogen_rewardbench", meta=meta)

    return drive(iter_rows(path), parse, path, on_error=on_error, stats=stats,
                 ident=lambda it: _row_key("videogen", it, 0)[1])


# ------------------------------------------------------------------------------- ShareGPTVideo
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_N = re.compile(r"^answer\s*([12])(?:\s+is\s+better)?$")


def _sharegpt_label(answer: Any, responses: list[str]) -> int:
    """The `answer` of a ShareGPTVideo pair names the preferred response. The method leaves its
    encoding open, so the unambiguous forms are accepted:

    * "Answer 1 is better" / "Answer 2 is better" (optionally in <answer> tags, case-insensitive,
      final period ignored; "Answer 1" alone too) -> 1 / 2;
    * the integers 1 / 2 (or "1" / "2"): 1-based, matching "Answer N";
    * the full text of one of the two responses -> that response.

    0 is rejected (it would mean a 0-based index, which cannot be told from 1-based 1)."""
    if isinstance(answer, bool):
        raise ItemError("bad label", f"answer must name response 1 or 2, got {answer!r}")
    if isinstance(answer, int):
        if answer in (1, 2):
            return answer
        raise ItemError("bad label", f"answer {answer!r} out of range: expected 1 or 2 (1-based; 0 is "
                                     f"rejected as ambiguous)")
    if not isinstance(answer, str):
        raise ItemError("bad label", f"answer must be a string or 1/2, got {type(answer).__name__}")
    m = _ANSWER_TAG.search(answer)
    s = (m.group(1) if m else answer).strip()
    norm = s.rstrip(".").strip().lower()
    if norm in ("1", "2"):
        return int(norm)
    am = _ANSWER_N.match(norm)
    if am:
        return int(am.group(1))
    hits = [i + 1 for i, r in enumerate(responses) if r.strip() == s]
    if len(hits) == 1:
        return hits[0]
    if len(hits) == 2:
        raise ItemError("bad label", "answer equals both responses (identical responses)")
    raise ItemError("bad label", f"answer {s[:60]!r} is neither 'Answer 1/2 is better', 1/2, nor the "
                                 f"text of one of the responses")


def sharegptvideo_records(path, image_folder=None, *, on_error="raise", stats: ConvertStats
                          ) -> Iterator[Record]:
    """ShareGPTVideo pairwise (video understanding): `images` are the frames of the one reference
    video (8 in the official data; any count >= 1 accepted) or `video` an encoded file; `prompt` is
    the question, `responses` the two answers. Label: see `_sharegpt_label`."""
    folder = folder_of(path, image_folder)
    stem = Path(path).stem

    def parse(index: int, it: Any) -> Record:
        question = require(it, "prompt", str)
        resp = require(it, "responses", list)
        if len(resp) != 2 or not all(isinstance(r, str) for r in resp):
            raise ItemError("missing field", f"'responses' must be a list of 2 strings, got {len(resp)} "
                                             f"item(s)")
        if "answer" not in it or it["answer"] is None:
            raise ItemError("missing field", "missing field 'answer'")
        label = _sharegpt_label(it["answer"], resp)
        if it.get("images"):
            frames = require(it, "images", list)
            video = video_ref(frames, folder, "images")
        elif it.get("video"):
            video = video_ref(require(it, "video", str), folder, "video")
        else:
            raise ItemError("missing field", "missing field 'images' (frame paths) or 'video'")
        key, ident = _row_key(stem, it, index)
        meta = {"format": "sharegptvideo", "index": index, "answer": it["answer"]}
        if ident is not None:
            meta["id"] = ident
        if video.frames is not None:
            meta["n_frames"] = len(video.frames)
        return Record(key, "video_understanding", label, [video], question=question,
                      answers=(resp[0], resp[1]), source="sharegptvideo", meta=meta)

    return drive(iter_items(path), parse, path, on_error=on_error, stats=stats,
                 ident=lambda it: _row_key("", it, 0)[1])
