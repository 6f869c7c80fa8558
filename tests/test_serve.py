"""urt.serve (package): the OpenAI-compatible judge server (tiny qwen2_5_vl model, CPU, 127.0.0.1 only).

The official `openai` client talks to it; a bounded concurrent load (64 requests, 8 in flight) must be
answered without errors and be batched; malformed requests get 4xx JSON errors and the server keeps
serving; a failing generation is a 500 for the culprit only. Request -> model input matches
`SampleEncoder(mode="prompt")` token for token for the released prompt layout (Qwen and LLaVA)."""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from urt.data.encode import SampleEncoder
from urt.data.schema import Sample
from urt.models import load_model
from urt.models.tiny import tiny_processor
from urt.prompts import render_text
from urt.serve.cli import register
from urt.serve.errors import RequestError
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
    assert encode_messages(qb, [{"role": "user", "content": "x"}]).meta["assistant_prefix"] == "<think>\n"


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
