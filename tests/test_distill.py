"""`urt distill` against a real chat-completions server on 127.0.0.1 (stdlib http.server in a thread),
spoken to by the official `openai` client; the rule teacher; resume; the CLI."""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from data_fixtures import synthetic_frames, vqa_image, vqa_question
from urt.data.schema import Sample, Video
from urt.data.shards import read_shards, write_shards
from urt.errors import UrtError
from urt.prompts import parse_output, render_text
from urt.rewards import consistency_reward, format_reward
from urt.stages.distill import (
    RESULTS_NAME,
    OpenAITeacher,
    RuleTeacher,
    TeacherResult,
    distill,
    load_results,
)

pytest.importorskip("openai")


# --------------------------------------------------------------------------------------- the server
class FakeChatServer:
    """A chat-completions endpoint. The sample is identified by the exact prompt text (so an
    altered prompt is answered 400 and logged with key None); `behaviours[key]` lists what to do on
    the 1st, 2nd, ... request for that key (the last entry repeats)."""

    def __init__(self, samples: list[Sample], behaviours: dict[str, list[str]] | None = None) -> None:
        self.by_prompt = {render_text("paper", s.task, **s.fields()): s for s in samples}
        assert len(self.by_prompt) == len(samples), "fixture prompts must be unique"
        self.behaviours = behaviours or {}
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.rule = RuleTeacher(seed=7)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the client gave up (timeout)

            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.handle(self, json.loads(raw))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def keys(self) -> list:
        with self.lock:
            return [e["key"] for e in self.log]

    def handle(self, h, body: dict) -> None:
        msgs = body["messages"]
        content = msgs[0]["content"]
        kinds = [c["type"] for c in content]
        texts = [c["text"] for c in content if c["type"] == "text"]
        images = []
        for c in content:
            if c["type"] == "image_url":
                url = c["image_url"]["url"]
                head, b64 = url.split(",", 1)
                img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
                img.load()
                images.append((head, img.convert("RGB")))
        s = self.by_prompt.get(texts[0]) if len(texts) == 1 else None
        key = s.key if s is not None else None
        with self.lock:
            n = sum(1 for e in self.log if e["key"] == key)
            self.log.append({"key": key, "kinds": kinds, "text": texts[0] if texts else None,
                             "images": images, "model": body.get("model"), "role": msgs[0]["role"]})
        if s is None:
            return h._send(400, {"error": {"message": "unknown prompt", "type": "invalid_request_error"}})
        plan = self.behaviours.get(key, ["correct"])
        what = plan[min(n, len(plan) - 1)]
        if what == "sleep":
            self.stop.wait(3.0)  # beyond the client's timeout; bounded
            what = "correct"
        if what in ("429", "500", "400"):
            return h._send(int(what), {"error": {"message": f"canned {what}", "type": "x"}},
                           {"Retry-After": "0"} if what == "429" else None)
        if what == "nochoices":
            return h._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                                 "choices": []})
        text = {
            "correct": lambda: self.rule.write(s),
            "wrong": lambda: self.rule.write(replace(s, label=3 - s.label)),
            "badformat": lambda: "I think Image 1 is better.",
            "empty": lambda: "",
        }[what]()
        h._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": text}}],
                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


# -------------------------------------------------------------------------------------- fixtures
def _gen(i: int, label: int = 1) -> Sample:
    return Sample(f"ig-{i:02d}", "image_generation", label, [vqa_image(2 * i), vqa_image(2 * i + 1)],
                  caption=f"a shape number {i}", source="test")


def mixed_samples() -> list[Sample]:
    q, a, img = vqa_question(3)
    out = [_gen(i, 1 + i % 2) for i in range(11)]
    out += [
        Sample("iu-0", "image_understanding", 2, [img], question=q, answers=("no idea", a), source="test"),
        Sample("vg-0", "video_generation", 1, [Video(frames=synthetic_frames(3, seed=1)),
                                               Video(frames=synthetic_frames(3, seed=9))],
               caption="a red square moves right", source="test"),
        Sample("vu-0", "video_understanding", 2, [Video(frames=synthetic_frames(4, seed=3))],
               question="what moves?", answers=("a blue circle", "a red square"), source="test"),
        Sample("tie-0", "image_generation", "tie", [vqa_image(40), vqa_image(41)], caption="a tie", source="test"),
    ]
    return out


BEHAVIOURS = {
    "ig-02": ["wrong"], "ig-03": ["badformat"], "ig-04": ["empty"], "ig-05": ["429", "correct"],
    "ig-06": ["429", "429", "correct"], "ig-07": ["500"], "ig-08": ["sleep"], "ig-09": ["400"],
    "ig-10": ["nochoices"],
}
EXPECTED = {"ok": 7, "disagrees": 1, "bad_format": 1, "empty": 1, "malformed": 1, "http_4xx": 1,
            "http_5xx": 1, "timeout": 1, "tie": 1}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    write_shards(mixed_samples(), d, maxcount=6)
    return d


def _teacher(url: str, **kw) -> OpenAITeacher:
    opts = dict(model="teacher-x", api_key="sk-test", concurrency=4, timeout=0.6, max_retries=2,
                backoff_base=0.01, backoff_max=0.05)
    opts.update(kw)
    return OpenAITeacher(url, **opts)


def _wait_teacher_threads(limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end and any(t.name.startswith("teacher") for t in threading.enumerate()):
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ tests
def test_openai_teacher_against_server(shard_dir, tmp_path):
    samples = list(read_shards(shard_dir))
    by_key = {s.key: s for s in samples}
    out = tmp_path / "out"
    with FakeChatServer(samples, BEHAVIOURS) as srv:
        report = distill(iter(samples), _teacher(srv.url), out, progress=False, batch_size=5, shard_maxcount=4)
        log = list(srv.log)

    assert report.counts == EXPECTED
    assert report.total == 15 and report.kept == 7 and report.sent == 14 and report.resumed == 0

    # what the server received: known prompts only (byte-exact), images first, decodable PNG data URLs
    assert None not in [e["key"] for e in log]
    n = {k: sum(1 for e in log if e["key"] == k) for k in by_key}
    assert n["tie-0"] == 0                         # ties are never sent
    assert n["ig-05"] == 2 and n["ig-06"] == 3     # 429 retried until success
    assert n["ig-07"] == 3 and n["ig-08"] == 3     # 5xx / timeout: 1 + max_retries attempts
    assert n["ig-09"] == 1                         # other 4xx: not retried
    assert n["ig-00"] == 1 and n["ig-03"] == 1 and n["ig-04"] == 1
    for e in log:
        s = by_key[e["key"]]
        assert e["text"] == render_text("paper", s.task, **s.fields())
        assert e["model"] == "teacher-x" and e["role"] == "user"
        assert e["kinds"] == ["image_url"] * len(e["images"]) + ["text"]
        want = [f for v in s.visuals for f in (v.frames if isinstance(v, Video) else [v])]
        assert len(e["images"]) == len(want) == {"image_generation": 2, "image_understanding": 1,
                                                 "video_generation": 6, "video_understanding": 4}[s.task]
        for (head, got), ref in zip(e["images"], want):
            assert head == "data:image/png;base64"
            assert got.tobytes() == ref.convert("RGB").tobytes()  # lossless, in order

    # results.jsonl: one line per sent key, with reasons
    recs = load_results(out / RESULTS_NAME)
    assert len((out / RESULTS_NAME).read_text().splitlines()) == 14
    assert recs["ig-07"]["status"] == "http_5xx" and "500" in recs["ig-07"]["reason"]
    assert recs["ig-08"]["status"] == "timeout" and recs["ig-08"]["attempts"] == 3
    assert recs["ig-04"]["status"] == "empty" and recs["ig-10"]["status"] == "malformed"
    assert recs["ig-05"]["attempts"] == 2

    # shards: exactly the kept samples, cot set to the teacher text, source order
    kept = list(read_shards(out))
    assert [s.key for s in kept] == ["ig-00", "ig-01", "ig-05", "ig-06", "iu-0", "vg-0", "vu-0"]
    assert len(report.shards) == 2
    for s in kept:
        assert s.cot == recs[s.key]["text"]
        j = parse_output(s.cot, s.task)
        assert j.format_ok and j.winner == by_key[s.key].label
    saved = json.loads((out / "report.json").read_text())
    assert saved["counts"] == EXPECTED and saved["kept"] == 7

    # without agreement the disagreeing (well-formatted) trace is kept too; nothing is re-sent
    with FakeChatServer(samples, BEHAVIOURS) as srv2:
        r2 = distill(iter(samples), _teacher(srv2.url), out, require_agreement=False, progress=False)
        assert srv2.log == []
    assert r2.kept == 8 and r2.resumed == 14 and r2.sent == 0 and r2.counts == EXPECTED
    assert "ig-02" in {s.key for s in read_shards(out)}


class _Interrupting:
    """Wraps a teacher; raises KeyboardInterrupt (like Ctrl-C) after `after` results."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.n = inner, after, 0
        self.name, self.concurrency = inner.name, inner.concurrency

    def judge(self, samples, on_result=None):
        def cb(r: TeacherResult) -> None:
            on_result(r)
            self.n += 1
            if self.n >= self.after:
                raise KeyboardInterrupt

        return self.inner.judge(samples, on_result=cb)


def test_resume_after_interrupt_sends_only_missing(tmp_path):
    samples = [_gen(i, 1 + (i % 2)) for i in range(12)]
    keys = [s.key for s in samples]
    out = tmp_path / "out"
    with FakeChatServer(samples) as srv:
        with pytest.raises(KeyboardInterrupt):
            distill(iter(samples), _Interrupting(_teacher(srv.url, concurrency=2), after=5), out,
                    progress=False, batch_size=4)
        _wait_teacher_threads()
        assert not (out / "report.json").exists()  # an interrupted run reports nothing
        first = load_results(out / RESULTS_NAME)
        assert len(first) == 5 and len((out / RESULTS_NAME).read_text().splitlines()) == 5
        before = len(srv.log)
        report = distill(iter(samples), _teacher(srv.url), out, progress=False, batch_size=4)
        second = srv.keys()[before:]
    assert sorted(second) == sorted(k for k in keys if k not in first)  # each missing key once, no others
    assert report.resumed == 5 and report.sent == 7 and report.kept == 12 and report.counts == {"ok": 12}
    kept = list(read_shards(out))
    assert [s.key for s in kept] == keys
    recs = load_results(out / RESULTS_NAME)
    assert all(s.cot == recs[s.key]["text"] for s in kept)


def test_unreachable_server_is_recorded(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    samples = [_gen(i) for i in range(3)]
    t0 = time.monotonic()
    report = distill(iter(samples), _teacher(f"http://127.0.0.1:{port}/v1", max_retries=1), tmp_path / "o",
                     progress=False)
    assert time.monotonic() - t0 < 20
    assert report.counts == {"unreachable": 3} and report.kept == 0 and report.shards == []
    recs = load_results(tmp_path / "o" / RESULTS_NAME)
    assert {r["status"] for r in recs.values()} == {"unreachable"} and all(r["attempts"] == 2 for r in recs.values())
    # --retry-failed re-sends transient failures; plain resume does not
    assert distill(iter(samples), RuleTeacher(), tmp_path / "o", progress=False).sent == 0
    r = distill(iter(samples), RuleTeacher(), tmp_path / "o", progress=False, retry_failed=True)
    assert r.sent == 3 and r.kept == 3


def _attr_samples() -> list[Sample]:
    q, a, img = vqa_question(5)
    frames = synthetic_frames(3)
    gen_attrs = {"asks": {"color": "red", "shape": "circle"},
                 "candidates": [{"color": "red", "shape": "circle"}, {"colour": "blue", "shape": "circle"}]}
    und_attrs = {"seen": {"color": "green", "shape": "triangle"}, "asks": "shape"}
    out = []
    for label in (1, 2):
        for attrs in (None, True):
            m = lambda d: {"attributes": d} if attrs else {}  # noqa: E731
            out += [
                Sample(f"ig{label}{attrs}", "image_generation", label, [vqa_image(0), vqa_image(1)],
                       caption="a red circle", meta=m(gen_attrs)),
                Sample(f"vg{label}{attrs}", "video_generation", label, [Video(frames=frames), Video(frames=frames)],
                       caption="a red circle: it moves", meta=m(gen_attrs)),
                Sample(f"iu{label}{attrs}", "image_understanding", label, [img], question=q, answers=(a, "no"),
                       meta=m(und_attrs)),
                Sample(f"vu{label}{attrs}", "video_understanding", label, [Video(frames=frames)],
                       question="Total score: what moves?", answers=("x", "y"), meta=m(und_attrs)),
            ]
    return out


def test_rule_teacher_traces_parse_and_agree():
    samples = _attr_samples()
    for seed in range(5):
        t = RuleTeacher(seed=seed)
        for s, r in zip(samples, t.judge(samples)):
            assert r.status == "ok" and r.key == s.key
            j = parse_output(r.text, s.task)
            assert j.format_ok and j.winner == s.label, r.text
            assert len(j.dimensions) == 3
            for k in (1, 2):
                assert j.totals[k] == sum(d[k] for d in j.dimensions), r.text
            assert j.totals[s.label] > j.totals[3 - s.label]
            assert consistency_reward(r.text) == 1.0
            noun = {"image_generation": "Image", "video_generation": "Video"}.get(s.task, "Answer")
            assert f"<answer>{noun} {s.label} is better</answer>" in r.text
    t = RuleTeacher()
    assert t.write(samples[0]) == t.write(samples[0])  # deterministic per (seed, key)
    with_attrs = t.write(samples[1 * 4])  # ig1True: label 1, attributes given
    assert "Image 1 shows a red circle" in with_attrs and "Image 2 shows a blue circle" in with_attrs
    assert "colour does not match (blue, not red)" in with_attrs and "the caption asks for a red circle" in with_attrs.lower()
    und = t.write(samples[4 + 2])
    assert "The image shows a green triangle" in und and "asks about the shape" in und
    # attributes that contradict the label are not stated (the verdict must follow the description)
    contra = replace(samples[4], label=2)
    assert "shows a red circle" not in t.write(contra) and parse_output(t.write(contra)).winner == 2
    tie = replace(samples[0], label="tie")
    assert t.judge([tie])[0].status == "bad_input"


def test_rule_teacher_chain_style_checks_each_attribute_then_scores_then_verdict():
    """The demo's chain CoT: what is asked (copied from the prompt), then per candidate what it shows, one
    check per asked attribute, a score from the checks and a verdict; the answer follows candidate 2's
    verdict. Every step depends on the few tokens before it."""
    samples = _attr_samples()
    t = RuleTeacher(style="chain")
    ig = t.write(samples[4])  # ig1True: caption "a red circle", candidates red circle / blue circle
    assert ig == ("<think>\nThe caption asks for a red circle.\n"
                  "Image 1 shows a red circle: red vs red yes, circle vs circle yes, so Image 1 (10/10) matches.\n"
                  "Image 2 shows a blue circle: blue vs red no, circle vs circle yes, so Image 2 (5/10) does not "
                  "match.\n</think>\n<answer>Image 1 is better</answer>")
    assert format_reward(ig) == 1.0 and parse_output(ig, "image_generation").winner == 1
    # attributes that contradict the label: the full style's generic rationale, never a chain that disagrees
    contra = replace(samples[4], label=2)
    assert "red vs red yes" not in t.write(contra) and parse_output(t.write(contra)).winner == 2
    und = Sample("u1", "image_understanding", 2, [vqa_image(0)], question="what shape is it?",
                 answers=("circle", "triangle"), meta={"attributes": {"seen": {"color": "green", "shape": "triangle"},
                                                                      "asks": "shape"}})
    assert t.write(und).split("\n")[1:5] == [
        "Answer 1 says circle. Answer 2 says triangle.",
        "The question asks about the shape. The image shows a green triangle, so the correct answer says triangle.",
        "Answer 1 says circle: circle vs triangle no, so Answer 1 (1/10) does not fit.",
        "Answer 2 says triangle: triangle vs triangle yes, so Answer 2 (10/10) fits."]
    yes_no = replace(und, question="is there a red shape?", answers=("yes", "no"),
                     meta={"attributes": {"seen": {"color": "green", "shape": "triangle"}, "asks": "color",
                                          "asks_value": "red"}})
    assert t.write(yes_no).split("\n")[1:3] == [
        "Answer 1 says yes. Answer 2 says no.",
        "The question checks for red. The image shows a green triangle: green vs red no, so the correct answer says no."]
    assert t.chain(replace(yes_no, label=1), 1) is None  # "yes" is wrong here: no chain for that label
    with pytest.raises(UrtError, match="style"):
        RuleTeacher(style="terse")


def test_distill_rule_teacher_all_tasks_and_cli(tmp_path, shard_dir):
    from urt.stages.cli import register

    parser = argparse.ArgumentParser(prog="urt")
    register(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    out = tmp_path / "rule"
    assert run("distill", "--shards", str(shard_dir), "--out", str(out), "--no-progress") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"] == {"ok": 14, "tie": 1} and rep["kept"] == 14 and rep["teacher"] == "rule"
    kept = list(read_shards(out))
    assert len(kept) == 14 and {s.task for s in kept} == {"image_generation", "image_understanding",
                                                          "video_generation", "video_understanding"}
    for s in kept:
        j = parse_output(s.cot, s.task)
        assert j.format_ok and j.winner == s.label and consistency_reward(s.cot) == 1.0

    # --tasks and --limit, then resume through the CLI with the openai teacher
    samples = list(read_shards(shard_dir))
    out2 = tmp_path / "oa"
    with FakeChatServer(samples) as srv:
        common = ["distill", "--shards", str(shard_dir), "--out", str(out2), "--teacher", "openai",
                  "--base-url", srv.url, "--model", "m", "--timeout", "5", "--no-progress",
                  "--tasks", "image_generation", "video_generation"]
        assert run(*common, "--limit", "4", "distill.concurrency=2") == 0
        first = srv.keys()
        assert len(first) == 4 and all(k.startswith(("ig", "vg")) for k in first)
        assert run(*common) == 0
        second = srv.keys()[4:]
    assert sorted(second) == sorted({s.key for s in samples if s.task in ("image_generation", "video_generation")
                                     and s.label != "tie"} - set(first))
    rep = json.loads((out2 / "report.json").read_text())
    assert rep["counts"] == {"ok": 12, "tie": 1} and rep["resumed"] == 4 and rep["sent"] == 8
    assert len(list(read_shards(out2))) == 12
