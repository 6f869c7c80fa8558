"""urt.serve (package): the OpenAI-compatible judge server (tiny qwen2_5_vl model, CPU, 127.0.0.1 only).

The official `openai` client talks to it; a bounded concurrent load (64 requests, 8 in flight) must be
answered without errors and be batched; malformed requests get 4xx JSON errors and the server keeps
serving; a failing generation is a 500 for the culprit only. Request -> model input matches
`SampleEncoder(mode="prompt")` token for token for the released prompt layout (Qwen and LLaVA).

Safe exposure (#33): API keys (none / wrong / right, from a key file; the `openai` client's `api_key=`),
media paths only inside `--media-root` (`..`, outside, symlinks out, FIFOs and directories refused), every
per-request limit just under and just over, per-key concurrency (429 for one key while another's requests
succeed), and the refusal to serve a non-loopback host without a key under `--require-key`."""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from urt.data.encode import SampleEncoder
from urt.data.video import encode_video
from urt.data.schema import Sample
from urt.models import load_model
from urt.errors import UrtError
from urt.models.tiny import tiny_processor
from urt.prompts import render_text
from urt.serve.auth import collect_keys, is_loopback, read_key_file
from urt.serve.cli import register
from urt.serve.errors import RequestError
from urt.serve.limits import Limits
from urt.serve.media import MediaReader
from urt.serve.request import encode_messages
from urt.serve.server import JudgeServer

openai = pytest.importorskip("openai")

MAX_TOKENS = 8
CAPTION = "a red cube on a blue table"


def png(color, size=(64, 48)) -> Image.Image:
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # some structure, so the two images differ beyond colour
        img.putpixel((x, x % size[1]), (255 - color[0], 255 - color[1], 255 - color[2]))
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


IMG1, IMG2 = png((200, 20, 20)), png((20, 20, 200))


def pair_messages(caption: str = CAPTION) -> list[dict]:
    """The official client's image-generation request: two image_url parts, then the paper prompt."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMG1)}},
        {"type": "image_url", "image_url": {"url": data_url(IMG2)}},
        {"type": "text", "text": render_text("paper", "image_generation", caption=caption)},
    ]}]


@pytest.fixture(scope="module")
def bundle():
    return load_model("tiny", "qwen2_5_vl")


@pytest.fixture(scope="module")
def server(bundle):
    srv = JudgeServer(bundle, model_name="urt-tiny", max_batch_size=8, batch_wait_ms=20, max_new_tokens=MAX_TOKENS)
    srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def post_raw(url: str, body: bytes | str, path: str = "/v1/chat/completions", headers: dict | None = None):
    """(status, parsed JSON) of one POST, errors included."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        data = body.encode() if isinstance(body, str) else body
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read().decode())
    finally:
        conn.close()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, json.loads(resp.read().decode())


def assert_completion(data: dict, model: str, n: int = 1) -> None:
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-") and isinstance(data["created"], int)
    assert data["model"] == model
    assert len(data["choices"]) == n
    for i, ch in enumerate(data["choices"]):
        assert ch["index"] == i
        assert ch["message"]["role"] == "assistant" and isinstance(ch["message"]["content"], str)
        assert ch["finish_reason"] in ("stop", "length")
    u = data["usage"]
    assert u["prompt_tokens"] > 0 and 0 <= u["completion_tokens"] <= n * MAX_TOKENS
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


# ------------------------------------------------------------------------------- openai client


def test_openai_client_image_pair_and_text_only(server, client):
    r = client.chat.completions.create(model="urt-tiny", messages=pair_messages(), max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert r.object == "chat.completion" and r.model == "urt-tiny"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    # 2 images x 16 tokens each at 112x112 (64x48 is resized up to the tiny processor's minimum)
    assert r.usage.prompt_tokens > 32
    assert r.usage.completion_tokens <= MAX_TOKENS
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == MAX_TOKENS

    t = client.chat.completions.create(
        model="urt-tiny", max_completion_tokens=MAX_TOKENS,
        messages=[{"role": "system", "content": "You judge."}, {"role": "user", "content": "Which is better?"}])
    assert isinstance(t.choices[0].message.content, str)
    assert t.usage.prompt_tokens < r.usage.prompt_tokens

    # greedy is deterministic, n copies, sampling with a seed is reproducible
    again = client.chat.completions.create(model="urt-tiny", messages=pair_messages(), max_tokens=MAX_TOKENS)
    assert again.choices[0].message.content == r.choices[0].message.content
    s = client.chat.completions.create(model="urt-tiny", messages=pair_messages(), max_tokens=MAX_TOKENS,
                                       temperature=1.0, top_p=0.9, n=2, seed=7)
    s2 = client.chat.completions.create(model="urt-tiny", messages=pair_messages(), max_tokens=MAX_TOKENS,
                                        temperature=1.0, top_p=0.9, n=2, seed=7)
    assert len(s.choices) == 2 and [c.message.content for c in s.choices] == [c.message.content for c in s2.choices]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["urt-tiny"]
    assert get_json(server.url + "/health") == (200, {"status": "ok"})
    status, m = get_json(server.url + "/v1/models/urt-tiny")
    assert status == 200 and m["id"] == "urt-tiny"


# ------------------------------------------------------------------------------- load


def test_concurrent_load_is_batched(server):
    n_requests, in_flight = 64, 8
    before = server.stats()

    def one(i: int):
        msgs = pair_messages(f"caption {i}") if i % 2 else [{"role": "user", "content": f"question {i}?"}]
        body = json.dumps({"model": "urt-tiny", "messages": msgs, "max_tokens": MAX_TOKENS})
        return post_raw(server.url, body)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        futures = [pool.submit(one, i) for i in range(n_requests)]
        results = [f.result(timeout=120) for f in futures]
    elapsed = time.perf_counter() - t0

    errors = [(s, d) for s, d in results if s != 200]
    assert not errors, errors[:3]
    for _, data in results:
        assert_completion(data, "urt-tiny")
    after = server.stats()
    sizes = after["batch_sizes"][len(before["batch_sizes"]):]
    assert sum(sizes) == n_requests
    assert max(sizes) > 1, f"no batching happened: {sizes}"
    assert max(sizes) <= server.max_batch_size
    print(f"\nload: {n_requests} requests, {in_flight} in flight: {elapsed:.2f} s, "
          f"{n_requests / elapsed:.1f} req/s, {len(sizes)} batches, mean batch {sum(sizes) / len(sizes):.2f}, "
          f"max {max(sizes)}")


# ------------------------------------------------------------------------------- errors


BAD_REQUESTS = {
    "bad_json": ('{"model": "urt-tiny", "messages": [', 400),
    "not_an_object": ("[1, 2]", 400),
    "missing_messages": ({"model": "urt-tiny"}, 400),
    "empty_messages": ({"messages": []}, 400),
    "bad_role": ({"messages": [{"role": "tool", "content": "x"}]}, 400),
    "http_image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, {"type": "text", "text": "x"}]}]},
        400),
    "bad_base64": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!not-base64@@"}}]}]}, 400),
    "base64_not_an_image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}
    ]}]}, 400),
    "unsupported_part": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
                         400),
    "stream": ({"messages": [{"role": "user", "content": "x"}], "stream": True}, 400),
    "n_too_big": ({"messages": [{"role": "user", "content": "x"}], "n": 1000}, 400),
    "bad_temperature": ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400),
    "bad_max_tokens": ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400),
    "unknown_model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_malformed_requests_get_4xx(server, name):
    body, want = BAD_REQUESTS[name]
    status, data = post_raw(server.url, body if isinstance(body, str) else json.dumps(body))
    assert status == want
    err = data["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"


def test_server_survives_bad_requests(server, client):
    for body, _ in BAD_REQUESTS.values():
        post_raw(server.url, body if isinstance(body, str) else json.dumps(body))
    assert post_raw(server.url, b"", path="/nowhere")[0] == 404
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # no Content-Length
    conn.putrequest("POST", "/v1/chat/completions")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]["message"]
    conn.close()
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model="urt-tiny", messages=[{"role": "user", "content": "x"}], stream=True)
    r = client.chat.completions.create(model="urt-tiny", messages=pair_messages(), max_tokens=MAX_TOKENS)
    assert isinstance(r.choices[0].message.content, str)
    assert get_json(server.url + "/health")[1] == {"status": "ok"}


def test_internal_failure_is_500_for_the_culprit_only(bundle):
    from urt.generation import generate

    tok = bundle.tokenizer

    def flaky(b, prompts, cfg, **kw):
        if any("POISON" in tok.decode(p.input_ids) for p in prompts):
            raise RuntimeError("boom: poisoned prompt")
        return generate(b, prompts, cfg, **kw)

    with JudgeServer(bundle, model_name="m", batch_wait_ms=300, max_new_tokens=4, generate_fn=flaky) as srv:
        words = ["fine one", "POISON", "fine two", "fine three"]
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(post_raw, srv.url, json.dumps({"messages": [{"role": "user", "content": w}]}))
                       for w in words]
            results = [f.result(timeout=60) for f in futures]
        statuses = [s for s, _ in results]
        assert statuses == [200, 500, 200, 200]
        assert "boom: poisoned prompt" in results[1][1]["error"]["message"]
        assert results[1][1]["error"]["type"] == "server_error"
        status, data = post_raw(srv.url, json.dumps({"messages": [{"role": "user", "content": "after"}]}))
        assert status == 200 and isinstance(data["choices"][0]["message"]["content"], str)
        assert srv.stats()["server_errors"] == 1
        url = srv.url
    with pytest.raises(urllib.error.URLError):  # shut down: nothing listens any more
        urllib.request.urlopen(url + "/health", timeout=5)


# ------------------------------------------------------------------------------- request -> model input


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_request_encoding_matches_sample_encoder(family):
    """The official client's request encodes to exactly the tokens urt's dataset path gives the same
    judgement (image pair + paper prompt)."""
    processor = tiny_processor(family)
    b = SimpleNamespace(family=family, processor=processor)
    enc = encode_messages(b, pair_messages(), key="r")
    sample = Sample("s", "image_generation", 1, [IMG1, IMG2], caption=CAPTION)
    ref = SampleEncoder(processor, family, template_set="paper", mode="prompt")(sample)
    assert torch.equal(enc.input_ids, ref.input_ids)
    assert enc.prompt_length == len(enc) and int((enc.labels != -100).sum()) == 0
    assert sorted(enc.visual) == sorted(ref.visual)
    for k in ref.visual:
        assert torch.equal(enc.visual[k], ref.visual[k]), k
    if family == "llava_onevision":
        text = processor.tokenizer.decode(enc.input_ids)
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
        assert enc.mm_token_type_ids is None
    else:
        assert torch.equal(enc.mm_token_type_ids, ref.mm_token_type_ids)


def test_request_encoding_frames_and_errors():
    processor = tiny_processor("llava_onevision")
    b = SimpleNamespace(family="llava_onevision", processor=processor)
    frames = [{"type": "image_url", "image_url": {"url": data_url(png((10 * i, 0, 0)))}} for i in range(4)]
    enc = encode_messages(b, [{"role": "user", "content": [*frames, {"type": "text", "text": "video?"}]}])
    assert enc.meta["n_images"] == 4
    with pytest.raises(RequestError, match="only accepted in user"):
        encode_messages(b, [{"role": "assistant", "content": frames[:1]}])
    with pytest.raises(RequestError, match="not an image"):
        encode_messages(b, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}])
    qb = SimpleNamespace(family="qwen3_5", processor=tiny_processor("qwen3_5"))
    served = encode_messages(qb, [{"role": "user", "content": "x"}])  # as released checkpoints are served
    assert served.meta["assistant_prefix"] == ""
    assert qb.processor.tokenizer.decode(served.input_ids).endswith("assistant\n<think>\n\n</think>\n\n")


def test_register_cli():
    parser = argparse.ArgumentParser(prog="urt")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["serve", "--model", "tiny", "--family", "qwen2_5_vl", "--port", "0",
                              "--max-batch-size", "4", "--max-new-tokens", "16"])
    assert args.func.__name__ == "_cmd_serve"
    assert (args.host, args.port, args.max_batch_size, args.max_new_tokens) == ("127.0.0.1", 0, 4, 16)


def test_finish_reason_and_token_counts_from_completion_ids(bundle):
    """usage.completion_tokens and finish_reason come from each Completion's ids / finish_reason."""
    from urt.generation import Completion

    def fixed(b, prompts, cfg, **kw):
        return [[Completion("done", [11, 12, 13], "stop"), Completion("cut", [7] * cfg.max_new_tokens, "length")]
                for _ in prompts]

    with JudgeServer(bundle, model_name="m", max_new_tokens=4, generate_fn=fixed) as srv:
        status, data = post_raw(srv.url, json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}))
    assert status == 200
    assert [(c["message"]["content"], c["finish_reason"]) for c in data["choices"]] == [("done", "stop"),
                                                                                      ("cut", "length")]
    assert data["usage"]["completion_tokens"] == 3 + 4
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 7


# ------------------------------------------------------------------------------- safe exposure (#33)


KEY_A, KEY_B = "urt-test-key-alpha-0123456789", "urt-test-key-beta-9876543210"
TEXT = [{"role": "user", "content": "Which is better?"}]


def call(url: str, method: str = "POST", path: str = "/v1/chat/completions", body=None, key: str | None = None,
         headers: dict | None = None):
    """(status, response headers, parsed JSON) of one request; `key` is sent as a Bearer token."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if not isinstance(body, (bytes, type(None))):
        body = (body if isinstance(body, str) else json.dumps(body)).encode()
    try:
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read().decode())
    finally:
        conn.close()


def chat(messages=None, **fields) -> dict:
    return {"messages": messages or TEXT, "max_tokens": 1, **fields}


def visual_msg(*urls: str, kind: str = "image_url", text: str = "ok?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": kind, kind: {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


def video_url(n_frames: int, size=(32, 32)) -> str:
    frames = [Image.new("RGB", size, (30 * i % 256, 60, 90)) for i in range(n_frames)]
    return "data:video/mp4;base64," + base64.b64encode(encode_video(frames, fps=8)).decode("ascii")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def assert_refused(result, status: int, limit: str, value) -> None:
    got, _, data = result
    assert got == status, data
    msg = data["error"]["message"]
    assert f"{limit}={value}" in msg and "--" in msg, msg


@pytest.fixture(scope="module")
def keyed(bundle, tmp_path_factory):
    """A server whose keys come from a key file (a comment, a blank line, padded lines)."""
    key_file = tmp_path_factory.mktemp("keys") / "judge.keys"
    key_file.write_text(f"# judge keys\n\n{KEY_A}\n  {KEY_B}  \n")
    keys = collect_keys(files=[key_file], environ={})
    assert keys == [KEY_A, KEY_B]
    srv = JudgeServer(bundle, model_name="urt-tiny", max_new_tokens=2, api_keys=keys,
                      limits=Limits(max_concurrent_per_key=2))
    srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()


def test_api_key_required_everywhere_but_health(keyed):
    url = keyed.url
    assert call(url, "GET", "/health")[::2] == (200, {"status": "ok"})
    assert call(url, "GET", "/health", key="wrong")[0] == 200
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat()),
                               ("GET", "/nowhere", None), ("POST", "/v1/models", b"{}")]:
        for key in (None, "wrong", KEY_A + "x", KEY_A[:-1]):
            status, headers, data = call(url, method, path, body, key=key)
            assert status == 401, (method, path, key, data)
            assert data["error"]["code"] == "invalid_api_key" and headers["WWW-Authenticate"].startswith("Bearer")
            assert KEY_A not in json.dumps(data) and KEY_B not in json.dumps(data)
    for header in (f"Basic {KEY_A}", KEY_A, "Bearer "):
        assert call(url, body=chat(), headers={"Authorization": header})[0] == 401
    for key in (KEY_A, KEY_B):
        status, _, data = call(url, body=chat(), key=key)
        assert status == 200 and data["usage"]["completion_tokens"] == 1
    models = call(url, "GET", "/v1/models", headers={"Authorization": f"bearer {KEY_B}"})[2]
    assert models["data"][0]["id"] == "urt-tiny"
    assert keyed.stats()["unauthorized"] >= 16


def test_openai_client_api_key(keyed):
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY_B, max_retries=0, timeout=60)
    r = good.chat.completions.create(model="urt-tiny", messages=TEXT, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 2
    assert [m.id for m in good.models.list().data] == ["urt-tiny"]
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-not-this-one", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        bad.chat.completions.create(model="urt-tiny", messages=TEXT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_concurrency_per_key_429_while_other_keys_are_served(keyed):
    """Two of key A's requests held in flight (body half sent): A's third gets 429 + Retry-After, key B is
    still answered, and A is answered again once its requests complete."""
    host, port = keyed.url.removeprefix("http://").split(":")
    body = json.dumps(chat()).encode()
    held = []
    for _ in range(2):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Authorization", f"Bearer {KEY_A}"), ("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))):
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(body[:10])
        held.append(conn)
    deadline = time.monotonic() + 10
    while keyed.stats()["in_flight"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert keyed.stats()["in_flight"] == 2

    status, headers, data = call(keyed.url, body=chat(), key=KEY_A)
    assert status == 429 and headers["Retry-After"] == "1"
    assert "max_concurrent_per_key=2" in data["error"]["message"]
    client_a = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY_A, max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError, match="--max-concurrent-per-key"):
        client_a.chat.completions.create(model="urt-tiny", messages=TEXT, max_tokens=1)
    client_b = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY_B, max_retries=0, timeout=60)
    with ThreadPoolExecutor(max_workers=2) as pool:  # B at its own limit, in parallel with A's held two
        outs = list(pool.map(lambda _: client_b.chat.completions.create(model="urt-tiny", messages=TEXT,
                                                                         max_tokens=1), range(2)))
    assert all(o.choices[0].message.content is not None for o in outs)

    for conn in held:
        conn.send(body[10:])
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["object"] == "chat.completion"
        conn.close()
    deadline = time.monotonic() + 10
    while keyed.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client_a.chat.completions.create(model="urt-tiny", messages=TEXT, max_tokens=1).choices
    assert keyed.stats()["rate_limited"] == 2


def test_key_sources_and_their_errors(tmp_path, capsys):
    from urt.cli import main

    assert collect_keys(["k1"], environ={"URT_API_KEY": " k2, ,k3,k1 "}) == ["k1", "k2", "k3"]
    empty = tmp_path / "empty.keys"
    empty.write_text("# no key yet\n\n   \n")
    with pytest.raises(UrtError, match="holds no key"):
        read_key_file(empty)
    with pytest.raises(UrtError, match="not found"):
        read_key_file(tmp_path / "missing.keys")
    with pytest.raises(UrtError, match="--api-key"):
        collect_keys(["has space"], environ={})
    for bad in (empty, tmp_path / "missing.keys"):  # the CLI stops before loading the model
        assert main(["serve", "--model", "tiny", "--family", "qwen2_5_vl", "--api-key-file", str(bad)]) == 2
        assert capsys.readouterr().err.startswith(f"urt: error: API key file {str(bad)!r}")


def test_non_loopback_host_needs_a_key(bundle, monkeypatch, capsys):
    """Nothing binds a non-loopback address here: --require-key refuses before the model loads, and the
    warning path is stopped at the model load."""
    import urt.models
    from urt.cli import main

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3"))
    monkeypatch.delenv("URT_API_KEY", raising=False)
    base = ["serve", "--model", "tiny", "--family", "qwen2_5_vl", "--host", "0.0.0.0", "--port", "0"]
    assert main(base + ["--require-key"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("urt: error: --host 0.0.0.0 is reachable from other machines") and "--require-key" in err

    def stop(*args, **kwargs):
        raise UrtError("stopped at the model load")

    monkeypatch.setattr(urt.models, "load_model", stop)
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "urt serve: WARNING: --host 0.0.0.0" in err and "stopped at the model load" in err
    monkeypatch.setenv("URT_API_KEY", KEY_A)  # a key: neither error nor warning
    assert main(base + ["--require-key"]) == 2
    assert "WARNING" not in (err := capsys.readouterr().err) and "stopped at the model load" in err
    with pytest.raises(UrtError, match="--require-key"):
        JudgeServer(bundle, host="0.0.0.0", require_key=True).start()


def test_media_paths_only_inside_the_root(bundle, server, tmp_path):
    root, outside = tmp_path / "media", tmp_path / "secret.png"
    (root / "sub").mkdir(parents=True)
    IMG1.save(outside)
    IMG1.save(root / "a.png")
    IMG2.save(root / "sub" / "b c.png")
    (root / "link_in.png").symlink_to(root / "a.png")
    (root / "link_out.png").symlink_to(outside)
    (root / "dir_out").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(root / "pipe.png")
    cases = {
        str(root / "a.png"): 200,
        (root / "a.png").as_uri(): 200,
        (root / "sub" / "b c.png").as_uri(): 200,  # percent-encoded
        str(root / "link_in.png"): 200,  # a symlink that stays inside the root
        str(root / "sub" / ".." / "a.png"): 403,
        (root / "sub").as_uri() + "/%2e%2e/a.png": 403,
        str(outside): 403,
        str(root / "link_out.png"): 403,
        str(root / "dir_out" / "secret.png"): 403,
        str(root / "pipe.png"): 400,
        str(root / "sub"): 400,
        str(root): 400,
        str(root / "missing.png"): 400,
        "media/a.png": 400,  # relative
        "file://otherhost" + str(root / "a.png"): 400,
    }
    with JudgeServer(bundle, model_name="m", max_new_tokens=1, media_roots=[root]) as srv:
        t0 = time.perf_counter()
        for url, want in cases.items():
            status, _, data = call(srv.url, body=chat(visual_msg(url)))
            assert status == want, (url, data)
            if want != 200:
                assert data["error"]["param"] == "messages[0].content[0].image_url", data
        assert time.perf_counter() - t0 < 30  # the FIFO did not hang the open
        assert call(srv.url, body=chat(visual_msg(video_url(3), kind="video_url")))[0] == 200
    with pytest.raises(RequestError, match="swapped in") as refused:  # a symlink met on the walk: not followed
        MediaReader._open_below(root, ("link_in.png",), "link_in.png", "image_url")
    assert refused.value.status == 403
    status, _, data = call(server.url, body=chat(visual_msg(str(root / "a.png"))))  # no media root
    assert status == 400 and "no --media-root" in data["error"]["message"]
    assert call(server.url, body=chat(visual_msg(data_url(IMG1))))[0] == 200


def test_media_bytes_limit_just_under_and_over(bundle, tmp_path):
    raw = png_bytes(IMG1)
    (tmp_path / "exact.png").write_bytes(raw)
    (tmp_path / "over.png").write_bytes(raw + b"\0")
    b64 = "data:image/png;base64," + base64.b64encode(raw).decode()
    b64_over = "data:image/png;base64," + base64.b64encode(raw + b"\0").decode()
    with JudgeServer(bundle, model_name="m", max_new_tokens=1, media_roots=[tmp_path],
                     limits=Limits(max_media_bytes=len(raw))) as srv:
        assert call(srv.url, body=chat(visual_msg(str(tmp_path / "exact.png"))))[0] == 200
        assert call(srv.url, body=chat(visual_msg(b64)))[0] == 200
        assert_refused(call(srv.url, body=chat(visual_msg(str(tmp_path / "over.png")))), 413, "max_media_bytes",
                       len(raw))
        assert_refused(call(srv.url, body=chat(visual_msg(b64_over))), 413, "max_media_bytes", len(raw))
        assert call(srv.url, body=chat())[0] == 200


def test_request_limits_just_under_and_over(bundle):
    small = data_url(png((9, 9, 9), size=(8, 8)))
    words = " ".join(["judge"] * 40)
    prompt_tokens = len(encode_messages(bundle, [{"role": "user", "content": words}]))
    lim = Limits(max_images=2, max_videos=1, max_pixels=2 * 64 * 48, max_video_frames=6, video_frames=4, max_n=2,
                 max_tokens=3, max_body_bytes=100_000, max_prompt_tokens=prompt_tokens)
    with JudgeServer(bundle, model_name="m", max_new_tokens=1, limits=lim) as srv:
        url = srv.url

        def ok(body):
            status, _, data = call(url, body=body)
            assert status == 200, data
            return data

        # images per request / total pixels (two 64x48 images are exactly max_pixels)
        ok(chat(visual_msg(small, small)))
        assert_refused(call(url, body=chat(visual_msg(small, small, small))), 400, "max_images", 2)
        ok(chat(visual_msg(data_url(IMG1), data_url(IMG2))))
        assert_refused(call(url, body=chat(visual_msg(data_url(IMG1), data_url(png((1, 2, 3), size=(64, 49)))))),
                       413, "max_pixels", 2 * 64 * 48)
        # videos per request / frames per video / pixels of the kept frames (4 x 48x48 > 6144)
        data = ok(chat(visual_msg(video_url(6), kind="video_url")))
        assert data["usage"]["prompt_tokens"] > 8
        assert_refused(call(url, body=chat(visual_msg(video_url(2), video_url(2), kind="video_url"))), 400,
                       "max_videos", 1)
        assert_refused(call(url, body=chat(visual_msg(video_url(7), kind="video_url"))), 413, "max_video_frames", 6)
        assert_refused(call(url, body=chat(visual_msg(video_url(5, size=(48, 48)), kind="video_url"))), 413,
                       "max_pixels", 2 * 64 * 48)
        # prompt tokens
        ok(chat([{"role": "user", "content": words}]))
        assert_refused(call(url, body=chat([{"role": "user", "content": words + " judge"}])), 400,
                       "max_prompt_tokens", prompt_tokens)
        # n and max_tokens / max_completion_tokens
        assert len(ok(chat(n=2, max_tokens=3))["choices"]) == 2
        assert_refused(call(url, body=chat(n=3)), 400, "max_n", 2)
        assert_refused(call(url, body=chat(max_tokens=4)), 400, "max_tokens", 3)
        assert_refused(call(url, body={"messages": TEXT, "max_completion_tokens": 4}), 400, "max_tokens", 3)
        # body bytes: the same request padded to exactly the limit, then one byte more
        body = json.dumps(chat()).encode()
        ok(body + b" " * (lim.max_body_bytes - len(body)))
        assert_refused(call(url, body=body + b" " * (lim.max_body_bytes + 1 - len(body))), 413, "max_body_bytes",
                       lim.max_body_bytes)
        assert srv.stats()["client_errors"] == 10
        ok(chat(visual_msg(small)))  # still serving


def test_video_url_encodes_for_qwen_and_llava():
    url = video_url(7)
    for family in ("qwen2_5_vl", "llava_onevision"):
        b = SimpleNamespace(family=family, processor=tiny_processor(family))
        enc = encode_messages(b, visual_msg(url, kind="video_url", text="video?"), limits=Limits(video_frames=4))
        if family == "llava_onevision":  # frames as images, as the official video scripts send them
            assert enc.meta["n_images"] == 4 and enc.visual["pixel_values"].shape[0] == 4
        else:
            assert enc.meta["n_videos"] == 1 and "pixel_values_videos" in enc.visual
            assert int((enc.mm_token_type_ids == 2).sum()) > 0
    with pytest.raises(RequestError, match="not a video"):
        encode_messages(b, visual_msg("data:image/png;base64,aGk=", kind="video_url"))


# ------------------------------------------------------------------------------- issue #31: one long request
LONG = 3500  # new tokens the tiny model takes ~10 s to write on one CPU thread


def _send_and_leave(url: str, body: dict, after_s: float) -> None:
    """A client that sends a request and disconnects without reading the answer."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(after_s)


def _wait_for(cond, limit_s: float = 10.0) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_disconnected_client_has_its_generation_stopped(bundle, torch_one_thread):
    """#31.4: a client that leaves mid-generation frees the worker at once (today its ~10 s generation ran
    to the end while the next request waited behind it)."""
    with JudgeServer(bundle, model_name="m", max_new_tokens=1, limits=Limits(max_tokens=4000)) as srv:
        _send_and_leave(srv.url, chat(max_tokens=LONG), after_s=0.5)
        assert _wait_for(lambda: srv.stats()["cancelled"] == 1, 5.0), srv.stats()
        t0 = time.monotonic()
        status, _, data = call(srv.url, body=chat(max_tokens=2))
        assert status == 200 and time.monotonic() - t0 < 4.0, (time.monotonic() - t0, srv.stats())


def test_each_request_is_bounded_in_time(bundle, torch_one_thread):
    """#31.4: past --max-request-seconds the generation is stopped and the request gets a 504 naming the
    limit; the default prompt cap is the model's context length (a ~500k-token text is a 400 at once)."""
    with JudgeServer(bundle, model_name="m", max_new_tokens=1,
                     limits=Limits(max_tokens=4000, max_request_seconds=1)) as srv:
        assert srv.limits.max_prompt_tokens == bundle.model.config.get_text_config().max_position_embeddings
        t0 = time.monotonic()
        status, _, data = call(srv.url, body=chat(max_tokens=LONG))
        took = time.monotonic() - t0
        assert status == 504 and data["error"]["code"] == "timeout" and "--max-request-seconds" in \
            data["error"]["message"] and took < 4.0, (status, data, took)
        assert srv.stats()["timed_out"] == 1
        status, _, _ = call(srv.url, body=chat(max_tokens=2))  # the worker is free again
        assert status == 200
        t0 = time.monotonic()
        status, _, data = call(srv.url, body=chat([{"role": "user", "content": "judge " * 300_000}]))
        assert status == 400 and data["error"]["code"] == "context_length_exceeded"


def test_cli_frames_default_from_the_exported_model(tmp_path, capsys):
    """#31.10: `urt serve` keeps as many frames per video as the model was trained with (urt.json)."""
    from urt.models.preprocessing import write_export_record

    write_export_record(tmp_path, step=1, preprocessing={"frames": 4})
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(["serve", "--model", str(tmp_path)])
    assert args.video_frames is None
    from urt.models.preprocessing import exported_frames

    assert exported_frames(str(tmp_path)) == 4 and exported_frames("tiny") == 8
