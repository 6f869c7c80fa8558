"""`POST /v1/rewards`: a group of N candidates in, per-candidate win rates out (urt.judge.group), for a
generator's trainer calling the judge every RL step, as Pref-GRPO calls its judge server.

Request (JSON):

    {"caption": "a red apple on a table",            # image / video generation
     "images": ["data:image/png;base64,...", ...],   # or "videos": [...]: N >= 2 data URLs or paths
     "both_orders": true, "pairs_per_candidate": null, "ties": "half", "mode": "cot",
     "max_tokens": 1024, "temperature": 0, "top_p": 1, "seed": 0, "return_text": false}

    {"question": "What colour is the car?", "image": "data:image/png;base64,...",   # or "video": ...
     "answers": ["red", "blue", ...], ...}

A candidate or reference is a URL string or `{"url": ...}`: a base64 data URL, or a path under the
server's `--media-root` (urt.serve.media: the same rules as chat requests); the request's candidates share
its pixel budget (`--max-pixels`), their number is at most `--max-candidates`.

Response: `win_rates`, `ranking` (best first), `advantages` (the win rates normalised within the group as
urt's GRPO does: (r − mean) / (unbiased std + 1e-4)), `wins` / `losses` / `ties` / `unparsable` / `decided`,
`position_consistency`, `intransitive_triples`, `pairs` (each verdict: candidates `i`, `j`, `first` shown,
`winner`, the parsed verdict; its text only with `return_text`), `usage.verdicts`.

Concurrent groups are batched: the `RewardBatcher` worker takes the oldest queued group and the queued
groups with the same settings (up to `max_groups` groups, waiting at most `batch_wait_s` for them) and judges
all their pairs in one `Judge.judge_groups` call, each candidate's visual features computed once.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from urt.errors import UrtError
from urt.serve.batching import QueueWorker
from urt.serve.errors import RequestError
from urt.serve.limits import Limits
from urt.serve.media import MediaReader, PixelBudget
from urt.serve.request import parse_sampling


_FIELDS = {"model", "caption", "images", "videos", "question", "answers", "image", "video", "both_orders",
           "pairs_per_candidate", "ties", "mode", "max_tokens", "max_completion_tokens", "temperature", "top_p",
           "seed", "n", "return_text", "user"}


@dataclass(frozen=True)
class RewardOptions:
    """What a batch of groups must share: the judging and sampling settings."""

    mode: str
    both_orders: bool
    pairs_per_candidate: int | None
    ties: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None

    def key(self) -> tuple:
        if self.temperature == 0.0:  # greedy ignores top_p and the seed
            return (self.mode, self.both_orders, self.pairs_per_candidate, self.ties, self.max_tokens, 0.0)
        return dataclasses.astuple(self)


def _url(x, where: str):
    if isinstance(x, dict):
        x = x.get("url")
    if not isinstance(x, str) or not x:
        raise RequestError(f"{where} must be a URL string (a data URL or a path under --media-root) or "
                           f"{{\"url\": ...}}", param=where)
    return x


def parse_group(body: Any, *, limits: Limits, media: MediaReader, default_max_tokens: int, default_temperature: float,
                default_top_p: float, default_seed: int | None, key: str = "request"):
    """(Group fields, RewardOptions, return_text) of a /v1/rewards body; RequestError (4xx) for anything wrong.
    Counts are checked before any visual is decoded."""
    from urt.data.schema import Video
    from urt.judge.group import TIE_POLICIES

    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; /v1/rewards takes "
                           f"{', '.join(sorted(_FIELDS))}", param=unknown[0])
    kinds = [k for k in ("images", "videos", "answers") if body.get(k) is not None]
    if len(kinds) != 1:
        raise RequestError("give exactly one of 'images', 'videos' (with 'caption') or 'answers' (with 'question' "
                           "and 'image' or 'video')", param="images")
    kind = kinds[0]
    cands = body[kind]
    if not isinstance(cands, list) or len(cands) < 2:
        raise RequestError(f"'{kind}' must be a list of at least 2 candidates", param=kind)
    if len(cands) > limits.max_candidates:
        raise limits.refuse("max_candidates", f"'{kind}' has {len(cands)} candidates", param=kind)
    text_field = "question" if kind == "answers" else "caption"
    prompt = body.get(text_field)
    if not isinstance(prompt, str):
        raise RequestError(f"'{kind}' need '{text_field}' (a string)", param=text_field)
    other = "caption" if kind == "answers" else "question"
    if body.get(other) is not None:
        raise RequestError(f"'{other}' does not go with '{kind}'", param=other)
    both = body.get("both_orders", True)
    if not isinstance(both, bool):
        raise RequestError("'both_orders' must be true or false", param="both_orders")
    ppc = body.get("pairs_per_candidate")
    if ppc is not None and (isinstance(ppc, bool) or not isinstance(ppc, int) or ppc < 1):
        raise RequestError("'pairs_per_candidate' must be a positive integer or null", param="pairs_per_candidate")
    ties = body.get("ties", "half")
    if ties not in TIE_POLICIES:
        raise RequestError(f"'ties' must be one of {', '.join(TIE_POLICIES)}, got {ties!r}", param="ties")
    mode = body.get("mode", "cot")
    if mode not in ("cot", "implicit"):
        raise RequestError(f"'mode' must be 'cot' or 'implicit', got {mode!r}", param="mode")
    ret = body.get("return_text", False)
    if not isinstance(ret, bool):
        raise RequestError("'return_text' must be true or false", param="return_text")
    sampling = parse_sampling(body, default_max_tokens=default_max_tokens, default_temperature=default_temperature,
                              default_top_p=default_top_p, default_seed=default_seed, limits=limits)
    if sampling.n != 1:
        raise RequestError("'n' is not supported by /v1/rewards (one verdict per pair and order)", param="n")
    opts = RewardOptions(mode=mode, both_orders=both, pairs_per_candidate=ppc, ties=ties,
                         max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                         seed=sampling.seed)

    budget = PixelBudget(limits)

    def clip(url, where):
        c = media.video(url, where, budget)
        return Video(frames=list(c.frames), fps=c.fps)

    fields: dict[str, Any] = {"kind": kind, "key": key}
    if kind == "answers":
        refs = [k for k in ("image", "video") if body.get(k) is not None]
        if len(refs) != 1:
            raise RequestError("'answers' need exactly one of 'image' or 'video' (what the question is about)",
                               param="image")
        if not all(isinstance(a, str) for a in cands):
            raise RequestError("'answers' must be strings", param="answers")
        ref = refs[0]
        fields["reference"] = (media.image(_url(body[ref], ref), ref, budget) if ref == "image"
                               else clip(_url(body[ref], ref), ref))
        fields.update(question=prompt, candidates=list(cands))
    else:
        for other_ref in ("image", "video"):
            if body.get(other_ref) is not None:
                raise RequestError(f"'{other_ref}' (a reference) goes with 'answers', not '{kind}'", param=other_ref)
        loaded = []
        for i, c in enumerate(cands):
            where = f"{kind}[{i}]"
            url = _url(c, where)
            loaded.append(media.image(url, where, budget) if kind == "images" else clip(url, where))
        fields.update(caption=prompt, candidates=loaded)
    return fields, opts, ret


@dataclass
class RewardJob:
    group: Any  # urt.judge.core.Group
    opts: RewardOptions
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None  # GroupResult
    error: BaseException | None = None


class RewardBatcher(QueueWorker):
    """Queue + worker thread judging groups (see the module docstring): groups with the same options share
    one `judge_groups` call. `model_lock` serialises the model with the chat batcher; `encode_lock` the
    processor with the HTTP threads."""

    thread_name = "urt-serve-rewards"
    queued_what = "reward groups"

    def __init__(self, bundle, *, model_lock: threading.Lock, encode_lock: threading.Lock, max_groups: int = 8,
                 batch_wait_s: float = 0.01, max_queue: int = 1024, max_prompt_tokens: int | None = None,
                 batch_size: int = 8):
        super().__init__(max_batch=max_groups, batch_wait_s=batch_wait_s, max_queue=max_queue)
        self.bundle = bundle
        self.model_lock = model_lock
        self.encode_lock = encode_lock
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = int(batch_size)
        self._judges: dict[str, Any] = {}

    def judge(self, mode: str):
        from urt.judge.core import Judge

        if mode not in self._judges:
            self._judges[mode] = Judge(self.bundle, mode=mode)
        return self._judges[mode]

    def group(self, fields: dict):
        from urt.judge.core import Group

        return Group(**fields)

    def submit(self, group, opts: RewardOptions) -> RewardJob:
        return self._enqueue(RewardJob(group=group, opts=opts))

    def batch_key(self, job: RewardJob):
        return job.opts.key()

    def process(self, batch: list[RewardJob]) -> None:
        for job, res in zip(batch, self._judge(batch)):
            job.result = res

    def failure(self, err: BaseException) -> BaseException:
        if isinstance(err, UrtError) and not isinstance(err, RequestError):
            return RequestError(f"cannot judge this group: {err}", param="group")
        return err

    def _judge(self, batch: list[RewardJob]):
        from urt.generation import GenerationConfig

        o = batch[0].opts
        judge = self.judge(o.mode)
        judge.generation = GenerationConfig(max_new_tokens=o.max_tokens, temperature=o.temperature, top_p=o.top_p,
                                            seed=int(o.seed or 0) % (2 ** 63), batch_size=self.batch_size)
        groups = [j.group for j in batch]
        with self.encode_lock:
            prepared = judge.encode_groups(groups, both_orders=o.both_orders, pairs_per_candidate=o.pairs_per_candidate)
        if self.max_prompt_tokens is not None:
            longest = max(len(e) for e in prepared.encoded)
            if longest > self.max_prompt_tokens:
                raise RequestError(f"a pair prompt is {longest} tokens, over this server's limit max_prompt_tokens="
                                   f"{self.max_prompt_tokens} (--max-prompt-tokens)", code="context_length_exceeded")
        with self.model_lock:
            return judge.judge_encoded(prepared, ties=o.ties)


def response(result, *, model: str, rid: str, return_text: bool) -> dict:
    from urt.judge.group import advantages

    d = result.to_dict(text=return_text)
    d.pop("meta", None)
    return {"id": rid, "object": "rewards", "created": int(time.time()), "model": model, **d,
            "advantages": advantages(result.win_rates), "usage": {"verdicts": len(result.pairs)}}
