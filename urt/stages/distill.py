"""Stage 1 data: distil teacher chains of thought into SFT shards (docs/method.md §Cold start).

A *teacher* judges samples and writes paper-format CoT (`<think>…</think>\\n<answer>…</answer>`):

* :class:`OpenAITeacher` — any chat-completions server (OpenAI's GPT-4o as in the paper, or a local
  vLLM/SGLang server) given the visuals as base64 data URLs before the filled CoT prompt text;
* :class:`RuleTeacher` — no model: writes a CoT from the known label (and, when present, the known
  attributes in ``meta["attributes"]``) so that the verdict is a local consequence of the description
  (docs/demo.md §The chain): state what each candidate shows, what the caption/question asks, match or
  mismatch, then the scores.

Both have one interface, ``teacher.judge(samples, on_result=None) -> list[TeacherResult]``.

:func:`distill` keeps the traces with a valid format (the paper's format regex) and, by default, an
answer agreeing with the human label, and writes the kept samples (``cot`` set) as shards. It is
resumable: every result is appended to ``out_dir/results.jsonl`` (flushed line by line as it
arrives); a rerun skips the keys already recorded there (they are never sent again) and rewrites the
shards from ``results.jsonl`` + the source samples, so nothing finished is lost by a crash or Ctrl-C.

``meta["attributes"]`` (optional, used by RuleTeacher only), e.g. for easy-vqa-derived pairs::

    generation:     {"asks": {"color": "red", "shape": "circle"},
                     "candidates": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "circle"}]}
    understanding:  {"seen": {"color": "blue", "shape": "circle"}, "asks": "shape"}

("colour" is accepted for "color"; any other attribute names are stated as they are.)
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from PIL import Image

from urt.data.schema import GENERATION_TASKS, TASKS, Sample, Video
from urt.errors import UrtError
from urt.prompts import answer_string, render_text
from urt.rewards import accuracy_reward, format_reward

RESULTS_NAME = "results.jsonl"
REPORT_NAME = "report.json"

# Teacher-level outcomes besides "ok" (a text came back). distill() further splits "ok" into
# ok / bad_format / disagrees.
TRANSIENT = ("timeout", "unreachable", "rate_limited", "http_5xx")
REASONS_ORDER = ("ok", "disagrees", "bad_format", "empty", "malformed", "http_4xx", "rate_limited",
                 "http_5xx", "timeout", "unreachable", "bad_input", "error", "tie", "duplicate_key")


@dataclass
class TeacherResult:
    """One teacher judgement: ``status`` "ok" with ``text``, or a failure reason (``timeout``,
    ``unreachable``, ``http_4xx``, ``http_5xx``, ``rate_limited``, ``empty``, ``malformed``,
    ``bad_input``, ``error``) with ``reason`` the detail. ``attempts``: requests made."""

    key: str
    status: str
    text: str | None = None
    reason: str = ""
    attempts: int = 1


OnResult = Callable[[TeacherResult], None]


class Teacher(Protocol):
    name: str

    def judge(self, samples: list[Sample], on_result: OnResult | None = None) -> list[TeacherResult]:
        """Judge every sample (results in input order). ``on_result`` is called in the caller's thread
        with each result as soon as it is available (before judge returns)."""
        ...


# ------------------------------------------------------------------------------------------ OpenAI
def _png_or_jpeg(img: Image.Image, fmt: str, quality: int = 95) -> str:
    buf = io.BytesIO()
    img = img.convert("RGB")
    if fmt == "png":
        img.save(buf, format="PNG")
        mime = "image/png"
    else:
        img.save(buf, format="JPEG", quality=quality)
        mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _api_key(api_key: str | None) -> str:
    for k in (api_key, os.environ.get("URT_TEACHER_API_KEY"), os.environ.get("OPENAI_API_KEY")):
        if k:
            return k
    # Local servers (vLLM, SGLang) accept any key; OpenAI answers 401, recorded as http_4xx.
    return "EMPTY"


class OpenAITeacher:
    """A teacher behind an OpenAI-compatible chat-completions endpoint (the official ``openai`` client).

    Each sample becomes one user message: its visuals as ``image_url`` items (base64 data URLs; a video
    is its frames, several images, video 1's before video 2's) followed by the filled CoT prompt text
    (``urt.prompts.render_text(template_set, task, ...)``, byte-exact). Requests run on a thread pool
    of ``concurrency``; the client's own retries are off and ours retry connection errors, timeouts,
    429 and 5xx with exponential backoff and jitter (``backoff_base * 2**attempt`` capped at
    ``backoff_max``, times a uniform factor in [0.5, 1.5); a 429's Retry-After is honoured up to
    ``backoff_max``); other 4xx are final. The API key comes from ``api_key``, else
    $URT_TEACHER_API_KEY, else $OPENAI_API_KEY (else "EMPTY", for local servers)."""

    name = "openai"

    def __init__(self, base_url: str | None = None, model: str = "gpt-4o", api_key: str | None = None, *,
                 template_set: str = "paper", concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 5, backoff_base: float = 1.0, backoff_max: float = 30.0,
                 temperature: float | None = None, max_tokens: int | None = 2048, image_format: str = "png",
                 frames: int = 8, max_pixels: int | None = None, extra_body: dict | None = None,
                 seed: int = 0, client: Any = None) -> None:
        if concurrency < 1:
            raise UrtError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise UrtError(f"max_retries must be >= 0, got {max_retries}")
        if image_format == "jpg":
            image_format = "jpeg"
        if image_format not in ("png", "jpeg"):
            raise UrtError(f"image_format must be png or jpeg, got {image_format!r}")
        self.base_url, self.model = base_url, model
        self.template_set = template_set
        self.concurrency, self.timeout, self.max_retries = int(concurrency), float(timeout), int(max_retries)
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.image_format, self.frames, self.max_pixels = image_format, frames, max_pixels
        self.extra_body = dict(extra_body or {})
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        if client is None:
            from openai import OpenAI

            client = OpenAI(base_url=base_url, api_key=_api_key(api_key), timeout=self.timeout, max_retries=0)
        self.client = client

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAITeacher(base_url={self.base_url!r}, model={self.model!r})"

    # ---- request building
    def _images(self, sample: Sample) -> list[Image.Image]:
        out: list[Image.Image] = []
        for i, v in enumerate(sample.visuals):
            if isinstance(v, Video):
                if v.frames is not None:
                    out.extend(v.frames)
                else:
                    from urt.data.video import decode_video

                    out.extend(decode_video(v.data, where=f"sample {sample.key!r} video {i + 1}",
                                            frames=self.frames)[0])
            else:
                out.append(v)
        if self.max_pixels:
            from urt.data.video import fit_pixels

            out = [fit_pixels(im, max_pixels=self.max_pixels) for im in out]
        return out

    def prompt_text(self, sample: Sample) -> str:
        return render_text(self.template_set, sample.task, **sample.fields())

    def messages(self, sample: Sample) -> list[dict]:
        content: list[dict] = [
            {"type": "image_url", "image_url": {"url": _png_or_jpeg(im, self.image_format)}}
            for im in self._images(sample)
        ]
        content.append({"type": "text", "text": self.prompt_text(sample)})
        return [{"role": "user", "content": content}]

    # ---- one sample, with retries
    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        with self._rng_lock:
            jitter = 0.5 + self._rng.random()
        delay = min(self.backoff_max, self.backoff_base * (2 ** attempt)) * jitter
        if retry_after is not None:
            delay = max(delay, min(self.backoff_max, retry_after))
        return delay

    def _one(self, sample: Sample, stop: threading.Event) -> TeacherResult:
        import openai

        key = sample.key
        try:
            messages = self.messages(sample)
        except UrtError as err:
            return TeacherResult(key, "bad_input", reason=str(err), attempts=0)
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        attempt = 0
        while True:
            retry_after = None
            try:
                resp = self.client.chat.completions.create(**kwargs)
            except openai.APITimeoutError as err:
                status, detail, retry = "timeout", f"no response within {self.timeout:g}s ({err})", True
            except openai.APIConnectionError as err:
                cause = err.__cause__ or err
                status, detail, retry = "unreachable", f"{type(cause).__name__}: {cause}", True
            except openai.APIStatusError as err:
                code = err.status_code
                detail = f"HTTP {code}: {str(err)[:300]}"
                if code == 429:
                    status, retry = "rate_limited", True
                    try:
                        retry_after = float(err.response.headers.get("retry-after"))
                    except (TypeError, ValueError, AttributeError):
                        retry_after = None
                elif code >= 500:
                    status, retry = "http_5xx", True
                else:
                    status, retry = "http_4xx", False
            except openai.APIResponseValidationError as err:
                status, detail, retry = "malformed", f"response not understood: {str(err)[:300]}", False
            except Exception as err:  # e.g. a 200 whose body is not JSON
                status, detail, retry = "malformed", f"{type(err).__name__}: {str(err)[:300]}", False
            else:
                return self._read(key, resp, attempt + 1)
            if not retry or attempt >= self.max_retries or stop.is_set():
                return TeacherResult(key, status, reason=detail, attempts=attempt + 1)
            if stop.wait(self._backoff(attempt, retry_after)):
                return TeacherResult(key, status, reason=detail + " (interrupted)", attempts=attempt + 1)
            attempt += 1

    @staticmethod
    def _read(key: str, resp: Any, attempts: int) -> TeacherResult:
        choices = getattr(resp, "choices", None)
        if not choices:
            return TeacherResult(key, "malformed", reason=f"no choices in response: {str(resp)[:200]}",
                                 attempts=attempts)
        msg = getattr(choices[0], "message", None)
        if msg is None:
            return TeacherResult(key, "malformed", reason="choice without a message", attempts=attempts)
        text = getattr(msg, "content", None)
        if not isinstance(text, str) or not text.strip():
            why = getattr(choices[0], "finish_reason", None)
            return TeacherResult(key, "empty", reason=f"empty content (finish_reason={why})", attempts=attempts)
        return TeacherResult(key, "ok", text=text, attempts=attempts)

    # ---- many samples
    def judge(self, samples: list[Sample], on_result: OnResult | None = None) -> list[TeacherResult]:
        results: list[TeacherResult | None] = [None] * len(samples)
        if not samples:
            return []
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(samples)), thread_name_prefix="teacher")
        try:
            futures = {pool.submit(self._one, s, stop): i for i, s in enumerate(samples)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    r = fut.result()
                except Exception as err:  # a bug in request building must not lose the batch
                    r = TeacherResult(samples[i].key, "error", reason=f"{type(err).__name__}: {err}")
                results[i] = r
                if on_result is not None:
                    on_result(r)
        except BaseException:
            stop.set()  # pending backoffs end now; queued requests are cancelled
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return results  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------- rule
DIMENSIONS = {
    "image_generation": ("Semantic consistency", "Aesthetics", "Authenticity"),
    "video_generation": ("Semantic consistency", "Temporal coherence", "Authenticity"),
    "image_understanding": ("Semantic accuracy", "Correctness", "Clarity"),
    "video_understanding": ("Semantic accuracy", "Correctness", "Clarity"),
}
_CHAIN_SCORE = (10, 5, 2, 1)  # chain style: score by the number of failed checks
NOUN = {"image_generation": "Image", "video_generation": "Video",
         "image_understanding": "Answer", "video_understanding": "Answer"}
_GENERIC_GOOD = {
    "Aesthetics": ("balanced composition and clean colours", "clear layout with pleasing contrast",
                   "well-framed subject with harmonious colours"),
    "Temporal coherence": ("smooth, consistent motion across frames", "stable subject with logical motion",
                           "frames follow each other without jumps"),
    "Authenticity": ("clean shapes and plausible detail", "crisp edges and consistent rendering",
                     "convincing detail without artifacts"),
    "Clarity": ("short and clearly worded", "direct and easy to read", "fluent and unambiguous"),
}
_GENERIC_WEAK = {
    "Aesthetics": ("composition is plainer", "colours are less balanced", "layout is less pleasing"),
    "Temporal coherence": ("motion is less consistent", "some frames jump", "motion is less smooth"),
    "Authenticity": ("detail is less convincing", "rendering is less consistent", "some artifacts visible"),
    "Clarity": ("less direct wording", "harder to read", "less fluent"),
}


def _attr_key(name: str) -> str:
    return "color" if name == "colour" else name


def _describe(attrs: dict | None) -> str | None:
    """'a red circle' from {"color": "red", "shape": "circle"}; other attributes as 'k v'."""
    if not isinstance(attrs, dict) or not attrs:
        return None
    a = {_attr_key(str(k)): v for k, v in attrs.items() if v is not None}
    words = [str(a[k]) for k in ("size", "color") if k in a]
    noun = str(a.get("shape") or a.get("object") or "shape")
    extra = [f"{k} {v}" for k, v in a.items() if k not in ("size", "color", "shape", "object", "motion")]
    text = " ".join(words + [noun]) + (f" moving {a['motion']}" if a.get("motion") else "")
    art = "an" if text[:1].lower() in "aeiou" else "a"
    return f"{art} {text}" + (f" ({', '.join(extra)})" if extra else "")


def _clean(text: str) -> str:
    """One line, no tags, no characters that could end the dimension line early."""
    return " ".join(str(text).replace("<", "(").replace(">", ")").split())


TEACHER_STYLES = ("full", "chain")


class RuleTeacher:
    """A teacher without a model: paper-format CoT that agrees with the known label.

    Scores are drawn from a per-sample RNG (``seed`` and the sample key, so reruns and resumes give
    the same text): on the first (content) dimension the preferred candidate gets 8–10 and the other
    1–4 (understanding: also on Correctness, 7–10 vs 1–5); the other dimensions 5–9 each; the preferred
    candidate's total is always strictly higher. ``dimensions`` keeps only the first N dimensions (the
    content one first), for shorter traces.
    Rationales state the attributes seen, what the caption/question asks and match/mismatch when
    ``meta["attributes"]`` gives them (see the module docstring), and generic text otherwise. Tie labels
    cannot be written in CoT mode and are returned as ``bad_input``.

    ``style="chain"`` (the CPU demo's, see ``chain``) writes a reasoning chain in which every step is a
    function of the few tokens just before it — what a model learning from scratch can pick up in
    minutes; samples without usable attributes get the full style."""

    name = "rule"

    def __init__(self, template_set: str = "paper", seed: int = 0, dimensions: int | None = None,
                 style: str = "full") -> None:
        if style not in TEACHER_STYLES:
            raise UrtError(f"RuleTeacher style must be one of {TEACHER_STYLES}, got {style!r}")
        if template_set != "paper":
            raise UrtError(f"RuleTeacher writes the paper layout only; template_set {template_set!r} is not "
                           "supported")
        if dimensions is not None and int(dimensions) < 1:
            raise UrtError(f"dimensions must be >= 1 (or None: all of the task's), got {dimensions}")
        self.template_set, self.seed, self.style = template_set, seed, style
        self.dimensions = None if dimensions is None else int(dimensions)

    def judge(self, samples: list[Sample], on_result: OnResult | None = None) -> list[TeacherResult]:
        out = []
        for s in samples:
            if s.label not in (1, 2):
                r = TeacherResult(s.key, "bad_input", reason=f"label {s.label!r}: CoT mode has no tie", attempts=0)
            else:
                r = TeacherResult(s.key, "ok", text=self.write(s))
            out.append(r)
            if on_result is not None:
                on_result(r)
        return out

    # ---- scores
    def _scores(self, rng: random.Random, win: int, n_dims: int, task: str) -> list[tuple[int, int]]:
        lose = 3 - win
        for _ in range(100):
            rows = []
            for d in range(n_dims):
                if d == 0:
                    sc = {win: rng.randint(8, 10), lose: rng.randint(1, 4)}
                elif d == 1 and task not in GENERATION_TASKS:  # correctness follows the label too
                    sc = {win: rng.randint(7, 10), lose: rng.randint(1, 5)}
                else:
                    sc = {win: rng.randint(5, 9), lose: rng.randint(5, 9)}
                rows.append((sc[1], sc[2]))
            t = [sum(r[0] for r in rows), sum(r[1] for r in rows)]
            if t[win - 1] > t[lose - 1]:
                return rows
        rows = [((9, 3) if win == 1 else (3, 9))] + [(7, 7)] * (n_dims - 1)  # pragma: no cover
        return rows

    # ---- rationales
    def _content_rationales(self, s: Sample, win: int) -> tuple[str | None, list[str]]:
        """(description preamble or None, [rationale for candidate 1, for candidate 2])."""
        attrs = s.meta.get("attributes") if isinstance(s.meta, dict) else None
        attrs = attrs if isinstance(attrs, dict) else {}
        noun = NOUN[s.task]
        if s.task in GENERATION_TASKS:
            asks = attrs.get("asks")
            cands = attrs.get("candidates")
            asks_text = _describe(asks) if isinstance(asks, dict) else None
            caption = _clean(s.caption or "")
            usable = isinstance(cands, (list, tuple)) and len(cands) == 2 and all(isinstance(c, dict) for c in cands)
            if usable and isinstance(asks, dict) and asks:
                # attributes that contradict the label (the preferred candidate matches fewer asked
                # attributes) would make the verdict inconsistent with the description: not used
                hits = [sum(str({_attr_key(a): v for a, v in c.items()}.get(_attr_key(a), "")).lower()
                            == str(v).lower() for a, v in asks.items()) for c in cands]
                usable = hits[win - 1] >= hits[2 - win]
            if usable:
                seen = [_describe(c) or "an unclear subject" for c in cands]
                want = asks_text or f"'{caption}'"
                pre = (f"{noun} 1 shows {seen[0]}. {noun} 2 shows {seen[1]}. "
                       f"The caption asks for {want}.")
                rats = []
                for k in (1, 2):
                    c = {_attr_key(a): v for a, v in cands[k - 1].items()}
                    if isinstance(asks, dict) and asks:
                        parts = []
                        for a, v in asks.items():
                            a = _attr_key(a)
                            got = c.get(a)
                            name = "colour" if a == "color" else a
                            if got is None:
                                parts.append(f"{name} not visible")
                            elif str(got).lower() == str(v).lower():
                                parts.append(f"{name} matches ({got})")
                            else:
                                parts.append(f"{name} does not match ({got}, not {v})")
                        rats.append(f"shows {seen[k - 1]}, " + ", ".join(parts))
                    else:
                        rats.append(f"shows {seen[k - 1]}, which "
                                    + ("matches the caption" if k == win else "does not match the caption"))
                return pre, rats
            rats = [f"content {'closely follows' if k == win else 'departs from'} the caption '{caption}'"
                    for k in (1, 2)]
            return None, rats
        # understanding
        question = _clean(s.question or "")
        seen = _describe(attrs.get("seen")) if isinstance(attrs.get("seen"), dict) else None
        asks = attrs.get("asks")
        answers = [_clean(a) for a in s.answers]
        visual = "video" if s.task.startswith("video") else "image"
        if seen:
            asked = f" about the {('colour' if _attr_key(str(asks)) == 'color' else asks)}" if isinstance(asks, str) else ""
            pre = f"The {visual} shows {seen}. The question asks{asked}: '{question}'."
            # the colon above is inside the preamble line, which has no scores, so parsers skip it
            pre = pre.replace(":", ",")
            rats = []
            for k in (1, 2):
                fits = "fits" if k == win else "does not fit"
                rats.append(f"'{answers[k - 1]}' {fits} what the {visual} shows ({seen})")
            return pre, rats
        rats = [f"'{answers[k - 1]}' {'matches' if k == win else 'does not match'} the {visual} content "
                f"asked about in '{question}'" for k in (1, 2)]
        return None, rats

    def chain(self, s: Sample, win: int | None = None) -> list[str] | None:
        """The chain style's reasoning lines; None without usable attributes. Every step is computed from
        the few tokens just before it (what a model learning from scratch can do): what is asked (copied
        from the prompt; for understanding, both answers first), what a candidate shows, one check per asked
        attribute ("teal vs brown no"), the candidate's score from its checks, its verdict; the answer then
        follows candidate 2's verdict."""
        attrs = s.meta.get("attributes") if isinstance(s.meta, dict) else None
        if not isinstance(attrs, dict):
            return None
        asks = attrs.get("asks")
        if s.task in GENERATION_TASKS:
            cands = attrs.get("candidates")
            if not (isinstance(asks, dict) and asks and isinstance(cands, (list, tuple)) and len(cands) == 2
                    and all(isinstance(c, dict) for c in cands)):
                return None
            want = {_attr_key(a): str(v).lower() for a, v in asks.items()}
            noun = NOUN[s.task]
            lines = [f"The caption asks for {_describe(asks)}."]
            verdicts = []
            for k, c in enumerate(cands, 1):
                got = {_attr_key(a): str(v).lower() for a, v in c.items()}
                checks = [(got.get(a, "unclear"), v) for a, v in want.items()]
                wrong = sum(g != v for g, v in checks)
                verdicts.append(wrong == 0)
                lines.append(f"{noun} {k} shows {_describe(c)}: "
                             + ", ".join(f"{g} vs {v} {'yes' if g == v else 'no'}" for g, v in checks)
                             + f", so {noun} {k} ({_CHAIN_SCORE[min(wrong, 3)]}/10) "
                             + ("matches." if wrong == 0 else "does not match."))
        else:
            seen = attrs.get("seen")
            if not isinstance(seen, dict) or not isinstance(asks, str):
                return None
            seen = {_attr_key(a): str(v).lower() for a, v in seen.items()}
            asked = _attr_key(asks)
            visual = "video" if s.task.startswith("video") else "image"
            # the answers first, straight after the prompt's field lines: copied from there before the chain
            # has written a value of its own (later, "so the correct answer says brown" was copied instead of
            # the field under long prompts), and the checks below then copy from this line
            said = [_clean(a).lower() for a in s.answers]
            lines = [" ".join(f"Answer {k} says {a}." for k, a in enumerate(said, 1))]
            value = attrs.get("asks_value")
            if value is not None:  # a yes/no question about one attribute value
                value = str(value).lower()
                truth = "yes" if seen.get(asked) == value else "no"
                lines.append(f"The question checks for {value}. The {visual} shows {_describe(seen)}: "
                             f"{seen.get(asked)} vs {value} {truth}, so the correct answer says {truth}.")
            else:
                truth = seen.get(asked)
                if truth is None:
                    return None
                about = "colour" if asked == "color" else asked
                lines.append(f"The question asks about the {about}. The {visual} shows {_describe(seen)}, "
                             f"so the correct answer says {truth}.")
            verdicts = []
            for k, a in enumerate(said, 1):
                verdicts.append(a == truth)
                lines.append(f"Answer {k} says {a}: {a} vs {truth} {'yes' if a == truth else 'no'}, so Answer {k} "
                             f"({_CHAIN_SCORE[0] if a == truth else _CHAIN_SCORE[3]}/10) "
                             + ("fits." if a == truth else "does not fit."))
        if win is not None and not (verdicts[win - 1] and not verdicts[2 - win]):
            return None  # attributes that do not single out the label: no consistent chain
        return lines

    def write(self, s: Sample) -> str:
        if s.label not in (1, 2):
            raise UrtError(f"sample {s.key!r}: label {s.label!r} has no CoT verdict")
        win = int(s.label)
        body = self.chain(s, win) if self.style == "chain" else None
        if body is not None:
            return "\n".join(["<think>", *body, "</think>", f"<answer>{answer_string(s.task, win)}</answer>"])
        rng = random.Random(f"{self.seed}:{s.key}")
        dims = DIMENSIONS[s.task][: self.dimensions]  # a shorter CoT (the demo's): the first N dimensions
        noun = NOUN[s.task]
        rows = self._scores(rng, win, len(dims), s.task)
        pre, content = self._content_rationales(s, win)
        lines = ["<think>"]
        if pre:
            lines.append(pre)
        for d, (name, (a, b)) in enumerate(zip(dims, rows), 1):
            if d == 1:
                r1, r2 = content
            else:
                r = []
                for k, sc in ((1, a), (2, b)):
                    pool = _GENERIC_GOOD.get(name) if sc >= 7 else _GENERIC_WEAK.get(name)
                    if name == "Correctness":
                        r.append("logically and factually right" if k == win else "contradicts the visual content")
                    else:
                        r.append(rng.choice(pool or ("adequate",)))
                r1, r2 = r
            lines.append(f"{d}. {name}: {noun} 1 ({a}/10) - {r1}; {noun} 2 ({b}/10) - {r2}")
        lines.append("Total score:")
        for k in (1, 2):
            sc = [r[k - 1] for r in rows]
            lines.append(f"{noun} {k}: {'+'.join(map(str, sc))}={sum(sc)}")
        lines.append("</think>")
        lines.append(f"<answer>{answer_string(s.task, win)}</answer>")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ distill
@dataclass
class DistillReport:
    """What a distillation produced. ``counts``: per outcome over every sample of this pass (resumed
    ones included): ok, disagrees, bad_format, empty, malformed, http_4xx, rate_limited, http_5xx,
    timeout, unreachable, bad_input, error, tie (skipped), duplicate_key (skipped). ``kept`` are the
    samples written to ``shards``; ``sent`` were judged in this run, ``resumed`` came from
    results.jsonl."""

    counts: dict = field(default_factory=dict)
    per_task: dict = field(default_factory=dict)
    total: int = 0
    kept: int = 0
    sent: int = 0
    resumed: int = 0
    shards: list = field(default_factory=list)
    require_agreement: bool = True
    teacher: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def classify(text: str | None, task: str, label) -> str:
    """ok / bad_format / disagrees for a teacher text (paper format regex, exact answer string)."""
    if not isinstance(text, str) or format_reward(text) != 1.0:
        return "bad_format"
    if label not in (1, 2) or accuracy_reward(text, answer_string(task, int(label))) != 1.0:
        return "disagrees"
    return "ok"


def load_results(path: str | Path) -> dict[str, dict]:
    """{key: record} from a results.jsonl (the last record of a key wins; a torn last line from a
    crash is ignored)."""
    out: dict[str, dict] = {}
    p = Path(path)
    if not p.exists():
        return out
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                out[rec["key"]] = rec
    return out


def _sort_counts(c: Counter) -> dict:
    known = [k for k in REASONS_ORDER if c.get(k)]
    return {k: c[k] for k in known + sorted(k for k in c if k not in REASONS_ORDER and c[k])}


def print_report(report: DistillReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    console.print(f"distill ({report.teacher}): kept {report.kept} of {report.total}"
                  + ("" if report.require_agreement else " (agreement not required)"))
    t = Table()
    t.add_column("outcome")
    t.add_column("count", justify="right")
    t.add_column("share", justify="right")
    for k, v in report.counts.items():
        t.add_row(k, str(v), f"{100.0 * v / max(1, report.total):.1f}%")
    console.print(t)
    console.print(f"sent {report.sent}, resumed {report.resumed}, {len(report.shards)} shard(s), "
                  f"{report.seconds:.1f}s")


def distill(samples_iter: Iterable[Sample], teacher: Teacher, out_dir: str | Path, *,
            require_agreement: bool = True, shard_maxcount: int = 1000, progress: bool = True,
            resume: bool = True, retry_failed: bool = False, tasks: Sequence[str] | None = None,
            limit: int | None = None, batch_size: int | None = None, total: int | None = None,
            prefix: str = "shard", image_format: str = "png", console=None) -> DistillReport:
    """Judge every sample with ``teacher``, keep the valid (and, with ``require_agreement``, agreeing)
    traces and write the kept samples, ``cot`` set, as shards in ``out_dir`` (``<prefix>-*.tar``).

    Resumable: each result is appended to ``out_dir/results.jsonl`` and flushed as it arrives. With
    ``resume`` (default) keys already recorded are not sent again (with ``retry_failed`` also the ones
    whose recorded outcome is transient — timeout, unreachable, rate_limited, http_5xx — are re-sent);
    without it results.jsonl is started afresh. The shards are rewritten from results.jsonl and the
    source samples on every run. Tie-labelled samples are skipped (CoT mode has no tie) and counted.
    ``tasks`` keeps only those tasks; ``limit`` stops after that many (non-filtered) source samples.
    The report is printed (``progress``) and saved as ``out_dir/report.json``."""
    if tasks:
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise UrtError(f"unknown task(s) {bad}; known tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 0:
        raise UrtError(f"limit must be >= 0, got {limit}")
    from urt.data.shards import write_shards

    t0 = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    if resume:
        done = load_results(results_path)
        if retry_failed:
            done = {k: r for k, r in done.items() if r.get("status") not in TRANSIENT}
        # A crash can leave a torn last line: make sure appends start on a new line.
        if results_path.exists() and results_path.stat().st_size:
            with open(results_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                with open(results_path, "ab") as f:
                    f.write(b"\n")
    else:
        done = {}
        results_path.unlink(missing_ok=True)
    # A stale manifest/report would describe shards this run rewrites: until it completes, the
    # directory has neither (an interrupted run leaves partial shards and a complete results.jsonl).
    for stale in (out / REPORT_NAME, out / "index.json"):
        stale.unlink(missing_ok=True)
    bs = int(batch_size or max(1, 4 * int(getattr(teacher, "concurrency", 8))))
    teacher_name = getattr(teacher, "name", type(teacher).__name__)
    if getattr(teacher, "model", None):
        teacher_name += f":{teacher.model}"

    counts: Counter = Counter()
    per_task: dict[str, Counter] = {}
    stats = {"total": 0, "kept": 0, "sent": 0, "resumed": 0}
    lock = threading.Lock()

    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[info]}"), console=console or Console(stderr=True),
                       transient=False)
        bar_task = bar.add_task("distill", total=total, info="")

    def tick() -> None:
        if bar is not None:
            bar.update(bar_task, advance=1, info=" ".join(f"{k}={v}" for k, v in _sort_counts(counts).items()))

    def count(task: str, status: str) -> None:
        counts[status] += 1
        per_task.setdefault(task, Counter())[status] += 1

    def keeps(rec: dict) -> bool:
        return rec.get("status") == "ok" or (rec.get("status") == "disagrees" and not require_agreement)

    def record(f, s: Sample, r: TeacherResult) -> dict:
        status = classify(r.text, s.task, s.label) if r.status == "ok" else r.status
        rec = {"key": s.key, "task": s.task, "label": s.label, "status": status, "reason": r.reason,
               "text": r.text, "attempts": r.attempts, "teacher": teacher_name}
        with lock:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
        return rec

    def kept_sample(s: Sample, rec: dict) -> Sample | None:
        if not keeps(rec):
            return None
        stats["kept"] += 1
        return replace(s, cot=rec["text"])

    def run_batch(f, batch: list[Sample]) -> dict[str, dict]:
        by_key = {s.key: s for s in batch}
        new: dict[str, dict] = {}

        def on_result(r: TeacherResult) -> None:
            s = by_key.get(r.key)
            if s is None or r.key in new:
                return
            new[r.key] = record(f, s, r)
            stats["sent"] += 1
            count(s.task, new[r.key]["status"])
            tick()

        results = teacher.judge(batch, on_result=on_result)
        for r in results or ():  # teachers that do not call on_result
            if r is not None:
                on_result(r)
        for s in batch:
            if s.key not in new:
                on_result(TeacherResult(s.key, "error", reason="teacher returned no result"))
        return new

    def flush(f, queue: list):
        """Judge the unjudged samples of ``queue`` ([(sample, record or None)]) and yield the kept
        ones in source order."""
        new = run_batch(f, [s for s, rec in queue if rec is None]) if any(r is None for _, r in queue) else {}
        for s, rec in queue:
            k = kept_sample(s, rec if rec is not None else new[s.key])
            if k is not None:
                yield k

    def kept_stream(f):
        seen: set[str] = set()
        queue: list = []  # (sample, resumed record or None), in source order
        n_new = 0
        n = 0
        for s in samples_iter:
            if tasks and s.task not in tasks:
                continue
            if limit is not None and n >= limit:
                break
            n += 1
            stats["total"] += 1
            if s.key in seen:
                count(s.task, "duplicate_key")
                tick()
                continue
            seen.add(s.key)
            if s.label not in (1, 2):
                count(s.task, "tie")
                tick()
                continue
            rec = done.get(s.key)
            if rec is not None:
                stats["resumed"] += 1
                if rec.get("status") in ("ok", "disagrees", "bad_format"):
                    # judged again from the text: the label may have changed since
                    rec = dict(rec, status=classify(rec.get("text"), s.task, s.label))
                count(s.task, rec["status"])
                tick()
                if not keeps(rec):
                    continue
            else:
                n_new += 1
            queue.append((s, rec))
            if n_new >= bs or len(queue) >= 4 * bs:
                yield from flush(f, queue)
                queue, n_new = [], 0
        if queue:
            yield from flush(f, queue)

    if bar is not None:
        bar.start()
    try:
        with open(results_path, "a", encoding="utf-8") as f:
            shards = write_shards(kept_stream(f), out, prefix=prefix, maxcount=shard_maxcount,
                                  image_format=image_format, overwrite=True)
    finally:
        if bar is not None:
            bar.stop()

    report = DistillReport(counts=_sort_counts(counts), per_task={t: _sort_counts(c) for t, c in per_task.items()},
                           total=stats["total"], kept=stats["kept"], sent=stats["sent"], resumed=stats["resumed"],
                           shards=[str(p) for p in shards], require_agreement=require_agreement,
                           teacher=teacher_name, seconds=round(time.monotonic() - t0, 3))
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    if progress:
        print_report(report, console)
    return report


# The keyword options each teacher takes (its constructor's, less the test hook `client`).
TEACHER_OPTIONS = {
    "rule": ("template_set", "seed", "dimensions", "style"),
    "openai": ("base_url", "model", "api_key", "template_set", "concurrency", "timeout", "max_retries",
               "backoff_base", "backoff_max", "temperature", "max_tokens", "image_format", "frames", "max_pixels",
               "extra_body", "seed"),
}


def make_teacher(kind: str, **opts: Any) -> Teacher:
    """A teacher by name ("rule" or "openai") from keyword options (unknown options for the kind are
    an error, None values are dropped so defaults apply)."""
    opts = {k: v for k, v in opts.items() if v is not None}
    if kind not in TEACHER_OPTIONS:
        raise UrtError(f"unknown teacher {kind!r}; known: {', '.join(TEACHER_OPTIONS)}")
    cls: Any = RuleTeacher if kind == "rule" else OpenAITeacher
    unknown = sorted(set(opts) - set(TEACHER_OPTIONS[kind]))
    if unknown:
        raise UrtError(f"teacher {kind!r} does not take option(s) {unknown}")
    return cls(**opts)


# ------------------------------------------------------------------------------------------ command
# cfg.distill settings that drive the run rather than the teacher (conf/distill/*.yaml declares them all).
RUN_SETTINGS = ("teacher", "shards", "out_dir", "tasks", "limit", "progress", "resume", "retry_failed", "batch_size",
                "require_agreement", "shard_maxcount")


def run_distill(cfg) -> DistillReport:
    """Distil `cfg.distill` (conf/distill/<teacher>.yaml, composed as `+distill=<teacher>`): judge the samples of
    `distill.shards` with the teacher `distill.teacher` and write the kept ones to `distill.out_dir`. What
    `urt distill` and a pipeline's distill step both run. Every other `distill.*` setting is a teacher
    option (`frames` also decodes the input videos), and one the teacher does not take is an error naming it."""
    from omegaconf import OmegaConf

    from urt.data.shards import SkipStats, iter_headers, read_shards

    if cfg.get("distill") is None:
        raise UrtError("no `distill` settings in the config: compose it with +distill=rule (or openai)")
    conf = OmegaConf.to_container(cfg.distill, resolve=True)
    run = {k: conf.pop(k, None) for k in RUN_SETTINGS}
    kind = run["teacher"]
    if kind not in TEACHER_OPTIONS:
        raise UrtError(f"distill.teacher={kind!r} is not a teacher; known: {', '.join(TEACHER_OPTIONS)}")
    for key in ("shards", "out_dir"):
        if not run[key]:
            raise UrtError(f"distill.{key} is not set (urt distill: --{'out' if key == 'out_dir' else key})")
    src, out = Path(str(run["shards"])), Path(str(run["out_dir"]))
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise UrtError(f"distill.out_dir must not be the input shard directory distill.shards={src} (its shards "
                       "are rewritten)")
    frames = int(conf.get("frames") or 8)
    if "frames" not in TEACHER_OPTIONS[kind]:
        conf.pop("frames", None)  # the rule teacher reads no pixels: frames only decodes the input
    unknown = sorted(set(conf) - set(TEACHER_OPTIONS[kind]))
    if unknown:
        raise UrtError(f"teacher {kind!r} does not take " + ", ".join(f"distill.{k}" for k in unknown)
                       + f" (its options: {', '.join(TEACHER_OPTIONS[kind])})")
    teacher = make_teacher(kind, **conf)

    tasks, limit, progress = run["tasks"] or None, run["limit"], run["progress"] is not False
    total = None
    if progress:  # the bar's length; a quiet run skips this pass over the shard headers
        total = sum(1 for _, h in iter_headers(str(src), on_error="skip") if not tasks or h.get("task") in tasks)
        if limit is not None:
            total = min(total, limit)
    stats = SkipStats()
    samples = read_shards(str(src), on_error="skip", stats=stats, frames=frames)
    report = distill(samples, teacher, out, require_agreement=run["require_agreement"] is not False,
                     shard_maxcount=int(run["shard_maxcount"] or 1000), progress=progress,
                     resume=run["resume"] is not False, retry_failed=bool(run["retry_failed"]), tasks=tasks,
                     limit=limit, batch_size=run["batch_size"], total=total)
    if stats.total_skipped:
        print(f"urt distill: unreadable input samples skipped: {stats.summary()}")
    if not progress:  # distill() printed its table otherwise
        print(f"kept {report.kept} of {report.total}: " + ", ".join(f"{k}={v}" for k, v in report.counts.items()))
    return report
