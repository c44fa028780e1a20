"""`nomic-moe serve` as a real process on 127.0.0.1: the openai client, TEI's route, errors, load, lifecycle."""

import base64
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from serve_fixtures import API_KEY, ServerProcess  # noqa: E402

TEXTS = ["What food did they eat?", "The settlers ate bread and fish.", "thunderstorms", "a b c d e f g h"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model(ckpts):
    return ckpts.converted()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    # a small batch budget, so that a large request spans many batches
    s = ServerProcess(model, "--api-key", API_KEY, "--served-model-name", "tiny", "--max-batch-tokens", "1024",
                      log=tmp_path_factory.mktemp("serve") / "server.log")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.terminate()


@pytest.fixture(scope="module")
def encoder(model):
    from nomic_moe_inference.encoder import Encoder

    return Encoder(model)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def post(server, path, body, headers=AUTH, **kw):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kw)


def vectors(resp):
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


@pytest.mark.parametrize("extra,prompt", [({"prompt_name": "query"}, "query"), ({"input_type": "document"}, "document"),
                                          ({}, "document")])
def test_openai_client_default_base64_matches_encoder(client, encoder, extra, prompt):
    resp = client.embeddings.create(model="tiny", input=TEXTS, extra_body=extra or None)
    np.testing.assert_allclose(vectors(resp), encoder.encode(TEXTS, prompt=prompt).numpy(), atol=1e-5)
    assert resp.usage.prompt_tokens == sum(len(encoder.tokenizer(encoder.prompts[prompt] + t)["input_ids"]) for t in TEXTS)


def test_openai_matryoshka_and_prefixed_text(client, encoder):
    resp = client.embeddings.create(model="tiny", input=TEXTS, dimensions=16, extra_body={"prompt_name": "query"})
    got = vectors(resp)
    np.testing.assert_allclose(got, encoder.encode(TEXTS, prompt="query", dim=16).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # a text that already has a prefix gets no second one, with or without a prompt
    text = "search_query: What food did they eat?"
    for extra in (None, {"prompt_name": "document"}):
        raw = client.embeddings.with_raw_response.create(model="tiny", input=[text], extra_body=extra)
        assert raw.headers["x-prompt-already-prefixed"] == "1"
        np.testing.assert_allclose(vectors(raw.parse()), encoder.encode([text]).numpy(), atol=1e-5)


def test_float_format_equals_base64(server):
    body = {"model": "tiny", "input": TEXTS[:2], "prompt_name": "query"}
    f = post(server, "/v1/embeddings", dict(body, encoding_format="float")).json()
    b = post(server, "/embeddings", dict(body, encoding_format="base64")).json()
    for x, y in zip(f["data"], b["data"]):
        np.testing.assert_array_equal(np.array(x["embedding"], np.float32), np.frombuffer(base64.b64decode(y["embedding"]), "<f4"))


def test_tei_embed_route(server, encoder):
    r = post(server, "/embed", {"inputs": TEXTS, "prompt_name": "query"})
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json()), encoder.encode(TEXTS, prompt="query").numpy(), atol=1e-5)
    r = post(server, "/embed", {"inputs": TEXTS[0], "normalize": False, "dimensions": 8})
    raw = np.array(r.json())
    assert raw.shape == (1, 8) and abs(np.linalg.norm(raw) - 1) > 1e-3  # not normalised
    np.testing.assert_allclose(raw / np.linalg.norm(raw), encoder.encode(TEXTS[:1], prompt="document", dim=8).numpy(), atol=1e-5)
    bad = post(server, "/embed", {"inputs": "x", "prompt_name": "nope"})
    assert bad.status_code == 422 and "prompt" in bad.json()["error"] and bad.json()["error_type"] == "Validation"


def test_info_models_health_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] == "tiny" and info["max_batch_tokens"] == 1024 and info["experts"] and info["revision"]
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    # a labelled histogram shows only once observed: one request of its own, so the test stands alone
    assert post(server, "/embed", {"inputs": TEXTS[0]}).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("nomic_moe_requests_total", "nomic_moe_queue_seconds_bucket", "nomic_moe_inference_seconds_bucket",
                 "nomic_moe_batch_tokens_bucket", "nomic_moe_queue_tokens", "nomic_moe_expert_token_share", "nomic_moe_tokens_total"):
        assert name in text
    per_layer = {}
    for line in text.splitlines():
        if line.startswith("nomic_moe_expert_token_share{"):
            layer = line.split('layer="')[1].split('"')[0]
            per_layer[layer] = per_layer.get(layer, 0.0) + float(line.split()[-1])
    assert per_layer and all(abs(v - 1) < 1e-6 for v in per_layer.values())  # each MoE layer's shares sum to 1
    frozen = [line for line in text.splitlines() if line.startswith("nomic_moe_gc_frozen_objects ")]
    assert frozen and float(frozen[0].split()[-1]) > 10_000  # the loaded process, out of the full collections' way


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_model_thread_runs_nicer_than_the_http_threads(server):
    def nice(tid):  # field 19 of /proc/PID/task/TID/stat
        stat = (Path(f"/proc/{server.proc.pid}/task/{tid}/stat")).read_text()
        return int(stat[stat.rindex(")") + 2:].split()[16])

    base = os.getpriority(os.PRIO_PROCESS, 0)  # the server inherits the test's own
    tids = [int(t) for t in os.listdir(f"/proc/{server.proc.pid}/task")]
    assert nice(server.proc.pid) == base  # the event loop's thread
    assert min(19, base + 5) in {nice(t) for t in tids if t != server.proc.pid}  # the model's (default --model-nice 5)
    assert httpx.get(server.url + "/info").json()["model_nice"] == min(19, base + 5) - base


BAD = [
    ({"model": "tiny", "input": ""}, 400, "input"),
    ({"model": "tiny", "input": []}, 400, "input"),
    ({"model": "tiny", "input": ["ok", ""]}, 400, "input"),
    ({"model": "tiny", "input": 5}, 400, "input"),
    ({"model": "tiny", "input": [1.5]}, 400, "input"),
    ({"model": "tiny"}, 400, "input"),
    ({"model": "other", "input": "x"}, 404, "model"),
    ({"model": "tiny", "input": "x", "prompt_name": "nope"}, 400, "prompt_name"),
    ({"model": "tiny", "input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"model": "tiny", "input": "x", "dimensions": 100000}, 400, "dimensions"),
    ({"model": "tiny", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "tiny", "input": ["x"] * 3000}, 413, "input"),
    ({"model": "tiny", "input": "word " * 2000, "truncate": False}, 413, "input"),
    ({"model": "tiny", "input": [[10**9]]}, 400, "input"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = post(server, "/v1/embeddings", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_malformed_json_auth_and_long_text(server, encoder):
    r = httpx.post(server.url + "/v1/embeddings", content=b"{not json", headers=dict(AUTH, **{"content-type": "application/json"}))
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert post(server, "/v1/embeddings", {"model": "tiny", "input": "x"}, headers={}).status_code == 401
    r = post(server, "/v1/embeddings", {"model": "tiny", "input": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/embeddings", content=b"x" * (9 << 20), headers=AUTH)
    assert r.status_code == 413
    long = "word " * 2000
    r = post(server, "/v1/embeddings", {"model": "tiny", "input": long})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1" and r.json()["usage"]["prompt_tokens"] == 512
    np.testing.assert_allclose(np.array(r.json()["data"][0]["embedding"]), encoder.encode([long], prompt="document")[0].numpy(), atol=1e-5)
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_sixteen_concurrent_clients_with_bad_requests_mixed_in(server, encoder):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    jobs = []
    for i in range(240):
        if i % 6 == 5:
            jobs.append((BAD[i % len(BAD)], None))
        else:
            texts = [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(int(rng.integers(1, 4)))]
            jobs.append((({"model": "tiny", "input": texts, "prompt_name": "query" if i % 2 else "document"}, 200, None), texts))
    expected = {}
    for (body, _, _), texts in jobs:
        if texts:
            expected[id(body)] = encoder.encode(texts, prompt=body["prompt_name"]).numpy()

    def one(item):
        (body, status, param), texts = item
        r = post(server, "/v1/embeddings", body)
        return body, status, r

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    for body, status, r in results:
        assert r.status_code < 500, r.text
        assert r.status_code == status, r.text
        if status == 200:
            np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]), expected[id(body)], atol=1e-5)
        else:
            assert r.json()["error"]["message"]
    text = httpx.get(server.url + "/metrics").text
    single = [line for line in text.splitlines() if line.startswith('nomic_moe_batch_requests_bucket{le="1.0"}')]
    count = [line for line in text.splitlines() if line.startswith("nomic_moe_batch_requests_count")]
    assert float(single[0].split()[-1]) < float(count[0].split()[-1])  # some batches held more than one request


def test_a_query_is_answered_while_a_large_document_request_runs(server):
    docs = [("document number %d " % i) * 60 for i in range(400)]  # ~400 x 300+ tokens: over 100 batches of 1024
    big = {}

    def send_big():
        big["response"] = post(server, "/v1/embeddings", {"model": "tiny", "input": docs})
        big["done"] = time.monotonic()

    t = threading.Thread(target=send_big)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the large request is queued, not for a fixed time
        m = httpx.get(server.url + "/metrics").text
        if any(line.startswith('nomic_moe_queue_tokens{lane="bulk"}') and float(line.split()[-1]) > 0 for line in m.splitlines()):
            break
        time.sleep(0.01)
    r = post(server, "/v1/embeddings", {"model": "tiny", "input": "what is the weather?", "prompt_name": "query"})
    answered = time.monotonic()
    t.join()
    assert r.status_code == 200 and big["response"].status_code == 200
    assert answered < big["done"]
    assert float(r.headers["x-queue-time"]) < 1000 * (big["done"] - answered) + 1e-3


def test_sigterm_finishes_requests_in_flight(model, tmp_path):
    s = ServerProcess(model, "--max-batch-tokens", "1024", "--max-queue-tokens", "1000000", log=tmp_path / "server.log")
    try:
        s.wait_healthy()
        docs = [("text %d " % i) * 50 for i in range(150)]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, s, "/v1/embeddings", {"model": model.name, "input": docs}, {}) for _ in range(4)]
            # SIGTERM only once all four are admitted (a chunked request stays in its lane until its
            # last chunk is scheduled, ~20 batches here); one still being sent would rightly get 503
            deadline, admitted = time.monotonic() + 120, 0
            while time.monotonic() < deadline and admitted < 4:
                m = httpx.get(s.url + "/metrics").text
                admitted = sum(float(line.split()[-1]) for line in m.splitlines()
                               if line.startswith('nomic_moe_queue_requests{lane="bulk"}'))
                time.sleep(0.01)
            assert admitted >= 4, f"only {admitted} of 4 requests were admitted in 120 s"
            assert not any(f.done() for f in futures), "a request finished before SIGTERM: the test needs more work per request"
            code = s.terminate()
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(len(r.json()["data"]) == len(docs) for r in responses)
        assert code == 0
    finally:
        s.terminate()


def test_ray_serve_two_replicas_give_the_same_vectors(model, encoder, tmp_path):
    pytest.importorskip("ray.serve")
    s = ServerProcess(model, "--engine", "ray", "--replicas", "2", "--cpus-per-replica", "1", log=tmp_path / "ray.log")
    try:
        s.wait_healthy(timeout=400)
        pids = set()
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:  # Ray spreads requests over the replicas
            pids.add(httpx.get(s.url + "/info", timeout=60).json()["pid"])
        assert len(pids) == 2
        for _ in range(4):
            r = post(s, "/v1/embeddings", {"model": model.name, "input": TEXTS, "prompt_name": "query"}, {})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]),
                                       encoder.encode(TEXTS, prompt="query").numpy(), atol=1e-5)
        assert post(s, "/v1/embeddings", {"model": "nope", "input": "x"}, {}).status_code == 404
    finally:
        assert s.terminate() == 0, s.log.read_text()[-3000:]
