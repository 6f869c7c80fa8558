"""`POST /v1/rewards` (urt.serve.rewards): a group in, win rates out; tiny qwen2_5_vl, CPU, 127.0.0.1 only.

32 concurrent groups answered without errors and batched; the answer equals `Judge.win_rates` on the same
model; malformed groups get 4xx naming the problem and the server keeps serving; paths only under
--media-root; the `openai` client's generic `post` reaches it."""

from __future__ import annotations

import base64
import http.client
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from urt.generation import GenerationConfig
from urt.judge import Judge
from urt.models import load_model
from urt.serve.limits import Limits
from urt.serve.server import JudgeServer

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores

MAX_TOKENS = 3


def img(seed: int, size=(56, 56)) -> Image.Image:
    im = Image.new("RGB", size, ((seed * 70) % 256, (seed * 130) % 256, (seed * 30 + 60) % 256))
    for x in range(0, size[0], 7):
        im.putpixel((x, (x * seed) % size[1]), (255, 255, 255))
    return im


def data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def post(url: str, body, path: str = "/v1/rewards"):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read().decode())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def bundle():
    return load_model("tiny", "qwen2_5_vl")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    for i in range(3):
        img(i).save(d / f"c{i}.png")
    return d


@pytest.fixture(scope="module")
def server(bundle, media):
    srv = JudgeServer(bundle, model_name="urt-tiny", max_batch_size=8, batch_wait_ms=30, max_new_tokens=MAX_TOKENS,
                      media_roots=[media], limits=Limits(max_candidates=6))
    srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()


def group(k: int, n: int = 3) -> dict:
    return {"caption": f"a shape number {k}", "images": [data_url(img(k + c)) for c in range(n)]}


def test_32_concurrent_groups_then_bad_groups_then_alive(server):
    # socketserver's default listen backlog (5) reset ~4% of the connections of a 96-client burst
    assert server._httpd.request_queue_size >= 32
    bodies = [group(k) for k in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda b: post(server.url, b), bodies))
    assert [s for s, _ in answers] == [200] * 32
    for _, d in answers:
        assert d["object"] == "rewards" and d["model"] == "urt-tiny" and d["id"].startswith("rwd-")
        assert len(d["win_rates"]) == 3 and sorted(d["ranking"]) == [0, 1, 2] and len(d["advantages"]) == 3
        assert d["usage"]["verdicts"] == 6 and len(d["pairs"]) == 6
        assert all("text" not in p["verdict"] for p in d["pairs"])  # return_text is off by default
        assert sum(d["decided"]) + sum(d["unparsable"]) == 12
    stats = server.stats()
    assert sum(stats["reward_batches"]) == 32 and max(stats["reward_batches"]) > 1  # concurrent groups batched

    bad = {
        "not an object": ([1, 2], "JSON object"),
        "no candidates": ({"caption": "x"}, "exactly one of 'images'"),
        "one candidate": ({"caption": "x", "images": [data_url(img(0))]}, "at least 2"),
        "too many": ({"caption": "x", "images": [data_url(img(0))] * 7}, "max_candidates=6"),
        "no caption": ({"images": [data_url(img(0))] * 2}, "'caption'"),
        "bad data url": ({"caption": "x", "images": ["data:image/png;base64,!!!", data_url(img(0))]}, "images[0]"),
        "not an image": ({"caption": "x", "images": ["data:image/png;base64," + base64.b64encode(b"no").decode(),
                                                     data_url(img(0))]}, "cannot decode image"),
        "network url": ({"caption": "x", "images": ["https://example.com/a.png", data_url(img(0))]}, "network"),
        "bad ties": ({**group(0), "ties": "thirds"}, "'ties'"),
        "bad budget": ({**group(0), "pairs_per_candidate": 0}, "pairs_per_candidate"),
        "n": ({**group(0), "n": 2}, "'n'"),
        "unknown field": ({**group(0), "candidates": []}, "unknown field"),
        "answers without reference": ({"question": "q", "answers": ["a", "b"]}, "'image' or 'video'"),
        "wrong model": ({**group(0), "model": "other"}, "not served here"),
    }
    for name, (body, reason) in bad.items():
        status, d = post(server.url, body)
        assert 400 <= status < 500, name
        assert reason in d["error"]["message"], (name, d)
    status, d = post(server.url, b"{not json")
    assert status == 400 and "invalid JSON" in d["error"]["message"]

    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    status, d = post(server.url, group(99))
    assert status == 200 and len(d["win_rates"]) == 3


def test_answer_equals_judge_win_rates(server, bundle):
    body = {**group(5, n=4), "return_text": True}
    status, d = post(server.url, body)
    assert status == 200
    judge = Judge(bundle, generation=GenerationConfig(max_new_tokens=MAX_TOKENS))
    local = judge.win_rates(body["caption"], [img(5 + c) for c in range(4)])
    assert d["win_rates"] == local.win_rates and d["ranking"] == local.ranking
    assert [p["verdict"]["text"] for p in d["pairs"]] == [p.verdict.text for p in local.pairs]
    assert d["position_consistency"] == local.position_consistency
    assert d["intransitive_triples"] == local.intransitive_triples


def test_paths_under_media_root_and_answers(server, media, tmp_path):
    status, d = post(server.url, {"caption": "c", "images": [str(media / f"c{i}.png") for i in range(3)]})
    assert status == 200 and len(d["win_rates"]) == 3
    outside = tmp_path / "x.png"
    img(1).save(outside)
    status, d = post(server.url, {"caption": "c", "images": [str(outside), str(media / "c0.png")]})
    assert status == 403 and "images[0]" in d["error"]["message"]
    status, d = post(server.url, {"question": "What colour?", "image": {"url": data_url(img(2))},
                                  "answers": ["red", "blue", "green"], "both_orders": False})
    assert status == 200 and d["usage"]["verdicts"] == 3


def test_openai_client_post(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    d = client.post("/rewards", body=group(3, n=2), cast_to=object)
    assert len(d["win_rates"]) == 2 and d["usage"]["verdicts"] == 2
    with pytest.raises(openai.BadRequestError, match="at least 2"):
        client.post("/rewards", body={"caption": "x", "images": [data_url(img(0))]}, cast_to=object)
