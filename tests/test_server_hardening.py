"""The server under attack (issue 14): a slow extraction blocks nothing, options and work are bounded,
only JSON or multipart bodies are read, UTF-8 tokens, and a client that hangs up is one log line."""
import base64
import contextlib
import io
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from t2iadapter import extractors  # noqa: E402
from t2iadapter.bases import load_base, tiny_adapter_config  # noqa: E402
from t2iadapter.cli import main as cli  # noqa: E402
from t2iadapter.extractors.base import Extractor  # noqa: E402
from t2iadapter.models import build_adapter  # noqa: E402
from t2iadapter.pipeline import AdapterPipeline  # noqa: E402
from t2iadapter.server import Limits, create_app  # noqa: E402

LIMITS = Limits(max_upload_mb=0.25, max_steps=8, max_side=128, max_input_side=256, queue_size=2, timeout=60)


@pytest.fixture(scope="module")
def pipe():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    base = load_base("tiny")
    torch.manual_seed(0)
    yield AdapterPipeline(base, {"sketch": build_adapter(tiny_adapter_config(base, 1))})
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, limits=LIMITS)) as c:
        yield c


def png(w=64, h=64, mode="L") -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def gen_body(**kw):
    return {"prompt": "a red star", "conditions": {"sketch": base64.b64encode(png()).decode()}, "steps": 2, "seed": 7,
            **kw}


@contextlib.contextmanager
def serving(app):
    """uvicorn in a thread on a free loopback port; its loggers propagate (log_config=None) so caplog sees them."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(15)


# ------------------------------------------------------------------ 1. a slow extraction blocks nothing

STARTED, RELEASE = threading.Event(), threading.Event()


@dataclass
class Slow(Extractor):
    """Test double: an extraction that runs until the test releases it."""

    name = "slow"
    feeds = ()
    channels = 1
    recipe = "waits for the test"

    def __call__(self, image):
        STARTED.set()
        assert RELEASE.wait(30)
        return Image.new("L", image.size)


def test_slow_extraction_does_not_block_the_server(pipe, monkeypatch):
    monkeypatch.setitem(extractors.REGISTRY, "slow", Slow)
    STARTED.clear()
    RELEASE.clear()
    image = base64.b64encode(png(32, 32, "RGB")).decode()
    results = {}

    def extract(key, name):
        with httpx.Client(timeout=30) as http:
            results[key] = http.post(url + "/v1/extract", json={"extractor": name, "image": image}).status_code

    with serving(create_app(pipe, limits=LIMITS)) as (url, _port):
        try:
            first = threading.Thread(target=extract, args=("slow", "slow"))
            first.start()
            assert STARTED.wait(20), "the slow extraction never started"
            second = threading.Thread(target=extract, args=("queued", "canny"))  # waits behind the slow one
            second.start()
            latencies = []
            with httpx.Client(timeout=5) as http:
                end = time.monotonic() + 1.0  # poll for a second while both extractions are in the server
                while time.monotonic() < end:
                    t = time.monotonic()
                    assert http.get(url + "/health").status_code == 200
                    assert http.get(url + "/v1/models").status_code == 200
                    latencies.append(time.monotonic() - t)
            assert max(latencies) < 0.5, f"/health and /v1/models took up to {max(latencies):.2f} s"
            assert "queued" not in results, "the second extraction should wait for the first"
        finally:
            RELEASE.set()
        first.join(30)
        second.join(30)
    assert results == {"slow": 200, "queued": 200}


def test_extractions_waiting_beyond_the_queue_get_429(pipe, monkeypatch):
    monkeypatch.setitem(extractors.REGISTRY, "slow", Slow)
    STARTED.clear()
    RELEASE.clear()
    image = base64.b64encode(png(16, 16, "RGB")).decode()
    with serving(create_app(pipe, limits=Limits(queue_size=1))) as (url, _port):
        answers = []
        refused = threading.Semaphore(0)

        def extract():
            r = httpx.post(url + "/v1/extract", json={"extractor": "slow", "image": image}, timeout=30)
            answers.append((r.status_code, r.headers.get("retry-after"), r.text))
            if r.status_code == 429:
                refused.release()

        threads = [threading.Thread(target=extract) for _ in range(4)]
        try:
            threads[0].start()
            assert STARTED.wait(20)
            for t in threads[1:]:  # one of these may wait behind the running one; two get 429 at once
                t.start()
            assert refused.acquire(timeout=20) and refused.acquire(timeout=20), answers
        finally:
            RELEASE.set()
        for t in threads:
            t.join(30)
    assert sorted(a[0] for a in answers) == [200, 200, 429, 429]
    full = [a for a in answers if a[0] == 429]
    assert all(int(retry) >= 1 and "extraction queue is full" in text for _code, retry, text in full)


# ------------------------------------------------------------------ 2. extractor options are bounded

@pytest.mark.parametrize("extractor, options, reason", [
    ("sketch-classic", {"sigma": "inf"}, "--sigma <= 32"),
    ("sketch-classic", {"sigma": 1e308}, "--sigma <= 32"),
    ("sketch-classic", {"sigma": 1e9}, "--sigma <= 32"),
    ("sketch-classic", {"sigma": "nan"}, "--sigma <= 32"),
    ("sketch-classic", {"sigma": -1}, "--sigma <= 32"),
    ("sketch-classic", {"threshold": "nan"}, "--threshold"),
    ("canny", {"low": 10**30, "high": 10**30}, "high <= 10000"),
    ("canny", {"high": 10**400}, ""),
    ("color", {"factor": 10**12}, "--factor <= 4096"),
    ("binarize", {"min_area": 10**30}, "--min-area <="),
])
def test_out_of_range_extractor_options_get_422(client, extractor, options, reason):
    image = base64.b64encode(png(32, 32, "RGB")).decode()
    t = time.monotonic()
    r = client.post("/v1/extract", json={"extractor": extractor, "image": image, "options": options})
    assert r.status_code == 422 and reason in r.text, r.text
    assert time.monotonic() - t < 1.0


def test_the_cli_takes_the_same_bounds(tmp_path, capsys):
    src = tmp_path / "in.png"
    src.write_bytes(png(32, 32, "RGB"))
    assert cli(["extract", "sketch-classic", str(src), str(tmp_path / "out.png"), "--sigma", "inf"]) == 2
    assert "--sigma <= 32" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


# ------------------------------------------------------------------ 3. the work of one request is bounded

def test_work_over_the_limit_gets_422_naming_the_option(pipe):
    with TestClient(create_app(pipe, limits=Limits(max_steps=8, max_work=0.02))) as c:
        r = c.post("/v1/generate", json=gen_body(steps=4, num_images=2))  # 64² x 4 x 2 = 0.033 Mpx-steps
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "0.0328 megapixel-steps" in detail and "limit of 0.02" in detail and "--max-work" in detail
        assert c.post("/v1/jobs", json=gen_body(steps=4, num_images=2)).status_code == 422
        assert c.post("/v1/generate", json=gen_body(steps=4)).status_code == 200  # 0.016 fits
        assert c.get("/v1/models").json()["limits"]["max_work"] == 0.02


def test_serve_takes_max_work_and_max_images(monkeypatch):
    import uvicorn

    seen = {}

    def fake_run(app, **_kw):
        seen["limits"] = app.state.limits

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert cli(["serve", "--base", "tiny", "--max-work", "12.5", "--max-images", "2", "--threads", "1"]) == 0
    assert seen["limits"].max_work == 12.5 and seen["limits"].max_images == 2
    assert cli(["serve", "--base", "tiny", "--max-work", "0"]) == 2


def test_big_jobs_hand_memory_back(pipe, monkeypatch):
    from t2iadapter.server import jobs

    calls = []
    monkeypatch.setattr(jobs, "release_memory", lambda: calls.append(1))
    with TestClient(create_app(pipe, limits=Limits(max_steps=8, max_side=1024))) as c:
        assert c.post("/v1/generate", json=gen_body(steps=1)).status_code == 200  # 64²: small, kept
        assert calls == []
        r = c.post("/v1/generate", json=gen_body(steps=1, width=512, height=512, num_images=4))  # 1 MP out
        assert r.status_code == 200, r.text
        end = time.monotonic() + 10
        while not calls and time.monotonic() < end:  # it runs on the worker after the answer is sent
            time.sleep(0.01)
        assert calls == [1]
    monkeypatch.undo()
    jobs.release_memory()  # and the real one runs here


# ------------------------------------------------------------------ 4. bodies: JSON as application/json only

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "text/json"])
def test_json_sent_as_another_type_gets_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    data = json.dumps(gen_body()).encode()
    for path in ("/v1/generate", "/v1/jobs", "/v1/extract"):
        r = client.post(path, content=data, headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["detail"], (path, r.text[:200])
    assert client.get("/health").json()["waiting"] == 0


def test_json_with_a_charset_is_json(client):
    r = client.post("/v1/generate", content=json.dumps(gen_body()).encode(),
                    headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_cross_site_posts_are_refused_without_a_token(pipe):
    raw = png()
    form = {"data": {"request": json.dumps({"prompt": "x", "steps": 1})}, "files": {"condition.sketch": ("s.png", raw)}}
    with TestClient(create_app(pipe, limits=LIMITS)) as c:
        r = c.post("/v1/generate", headers={"origin": "https://evil.example"}, **form)
        assert r.status_code == 403 and "cross-origin" in r.text
        assert c.post("/v1/jobs", headers={"origin": "null"}, **form).status_code == 403
        assert c.delete("/v1/jobs/x", headers={"origin": "http://evil.example"}).status_code == 403
        assert c.get("/v1/models", headers={"origin": "https://evil.example"}).status_code == 200  # reads are fine
        assert c.post("/v1/generate", headers={"origin": "http://testserver"}, **form).status_code == 200  # the page
        assert c.post("/v1/generate", **form).status_code == 200  # not a browser
    with TestClient(create_app(pipe, limits=LIMITS, token="t")) as c:  # the token protects; a proxy may rewrite Host
        r = c.post("/v1/generate", headers={"origin": "https://proxy.example", "authorization": "Bearer t"}, **form)
        assert r.status_code == 200


def test_non_ascii_tokens_compare_as_utf8(pipe):
    from t2iadapter.server.security import bearer_ok

    token = "pässwörd-ключ"
    with TestClient(create_app(pipe, limits=LIMITS, token=token)) as c:
        assert c.get("/v1/models", headers={"authorization": ("Bearer " + token).encode()}).status_code == 200
        assert c.get("/v1/models", headers={"authorization": "Bearer pässwörd".encode()}).status_code == 401
    # The header's own bytes are compared (TestClient re-encodes headers, so these go to the guard directly).
    assert bearer_ok("Bearer pässwörd".encode(), "pässwörd")
    assert not bearer_ok("Bearer pässwörd".encode("latin-1"), "pässwörd")  # worked only this way before
    assert not bearer_ok(b"Bearer \xff\xfe", "pässwörd") and not bearer_ok(None, "x")


# ------------------------------------------------------------------ 5. a client that hangs up is one line

def test_client_gone_mid_upload_logs_one_line(pipe, caplog):
    caplog.set_level(logging.INFO)
    with serving(create_app(pipe, limits=LIMITS)) as (url, port):
        for path in ("/v1/extract", "/v1/generate", "/v1/jobs"):
            caplog.clear()
            part = (b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                    b"Content-Type: image/png\r\n\r\n" + png()[:200])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 100000\r\n\r\n" + part)
            end = time.monotonic() + 10
            while time.monotonic() < end and not any("disconnect" in r.getMessage().lower() or r.exc_info
                                                     for r in caplog.records):
                time.sleep(0.02)
            records = [r for r in caplog.records if "disconnect" in r.getMessage().lower() or r.exc_info
                       or r.levelno >= logging.ERROR]
            assert records, f"nothing was logged for {path}"
            assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
            assert "Traceback" not in caplog.text
            assert len(records) == 1 and records[0].levelno in (logging.INFO, logging.WARNING)
        assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("field, value", [("guidance_scale", -5), ("guidance_scale", 1e9), ("seed", -1),
                                          ("seed", 2**64), ("steps", 0)])
def test_the_requests_own_bounds_get_422_at_once(client, field, value):
    """Issue 14 item 9: the server takes the bounds of GenerationRequest (the CLI and the API share them)."""
    t = time.monotonic()
    r = client.post("/v1/generate", json=gen_body(**{field: value}))
    assert r.status_code == 422 and field in r.text, r.text
    assert time.monotonic() - t < 1.0


# ------------------------------------------------------------------ 6. every refusal is one line saying what to fix

def one_line(r, status: int) -> str:
    """The `detail` of a refusal: the status expected, one line of text (not pydantic's list, no traceback)."""
    assert r.status_code == status, r.text[:500]
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, detail
    return detail


def raw(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


@pytest.mark.parametrize("path, request_kw, words", [
    ("/v1/generate", {"json": gen_body(seed=-1)}, ["seed", "greater than or equal to 0"]),
    ("/v1/generate", {"json": gen_body(steps="many")}, ["steps", "valid integer"]),
    ("/v1/generate", {"json": gen_body(prompt=None)}, ["prompt", "valid string"]),
    ("/v1/generate", {"json": gen_body(bogus=1, other=2)}, ["unknown fields 'bogus', 'other'", "prompt, negative_prompt"]),
    ("/v1/generate", {"json": gen_body(adapters={"sketch": {"weight": 1, "scale": 2}})},
     ["unknown field 'adapters.sketch.scale'", "weight, window"]),
    ("/v1/generate", {"json": gen_body(adapters={"sketch": {"window": [0, 0.5, 1]}})},
     ["adapters.sketch.window must be a string or a list", "START:END"]),
    ("/v1/generate", {"json": {"steps": 2}}, ["prompt is required"]),
    ("/v1/generate", {"json": gen_body(width="9" * 5000)}, ["width: unable to parse input string as an integer"]),
    ("/v1/generate", {"json": gen_body(seed=True)}, ["seed must be a number, not true"]),  # was seed 1
    ("/v1/generate", {"json": gen_body(steps=True)}, ["steps must be a number, not true"]),
    ("/v1/jobs", {"json": gen_body(guidance_scale=False)}, ["guidance_scale must be a number, not false"]),
    ("/v1/generate", {"json": gen_body(adapters={"sketch": {"weight": True}})}, ["adapters.sketch.weight must be a number"]),
    ("/v1/generate", raw(json.dumps(gen_body(guidance_scale=float("nan")))), ["guidance_scale should be a finite number"]),
    ("/v1/generate", raw(json.dumps(gen_body(adapters={"sketch": {"weight": float("nan")}}))),
     ["adapters.sketch.weight should be a finite number"]),
    ("/v1/jobs", raw('{"prompt": "x",'), ["the body is not valid JSON", "send one object"]),
    ("/v1/jobs", {"json": ["a red star"]}, ["the body must be a JSON object", "GenerateRequest"]),
    ("/v1/generate", {"data": {"request": "{nope"}}, ["the `request` field is not valid JSON"]),
    ("/v1/extract", {"json": {}}, ["extractor is required", "image is required"]),
    ("/v1/extract", {"json": {"extractor": "canny", "image": "", "options": {"low": [1]}}},
     ["options.low must be an integer, a number, true or false or a string"]),
])
def test_invalid_bodies_get_one_line_422(client, path, request_kw, words):
    if "data" in request_kw:  # multipart: the request field plus a condition file
        request_kw = dict(request_kw, files={"condition.sketch": ("s.png", png())})
    detail = one_line(client.post(path, **request_kw), 422)
    assert all(w in detail for w in words), detail
    assert client.get("/health").json()["waiting"] == 0


def test_an_unknown_scheduler_is_refused_before_it_queues(client):
    """/v1/jobs answered 202 and the job failed in the worker (only /v1/generate, waiting for it, got the 422)."""
    for path in ("/v1/jobs", "/v1/generate"):
        detail = one_line(client.post(path, json=gen_body(scheduler="warp-drive")), 422)
        assert "unknown scheduler 'warp-drive'; choose one of ddim" in detail
    assert client.get("/health").json()["waiting"] == 0


def test_a_mask_of_another_size_is_refused_before_it_queues(client):
    """/v1/jobs answered 202 and the job failed in the worker; now both endpoints refuse it at once."""
    image, mask = base64.b64encode(png(64, 64, "RGB")).decode(), base64.b64encode(png(32, 32)).decode()
    for path in ("/v1/jobs", "/v1/generate"):
        detail = one_line(client.post(path, json=gen_body(init_image=image, mask_image=mask)), 422)
        assert "mask_image is 32x32 but init_image is 64x64" in detail and "mask of the image's size" in detail


GARBAGE = {"content": b"--XyZ\r\nnot a part", "headers": {"content-type": "multipart/form-data; boundary=XyZ"}}
NO_BOUNDARY = {"content": b"x", "headers": {"content-type": "multipart/form-data"}}


@pytest.mark.parametrize("path, request_kw, words", [
    ("/v1/generate", GARBAGE, ["multipart body cannot be read", "`request` field (JSON) and `condition.<adapter>` files"]),
    ("/v1/jobs", NO_BOUNDARY, ["multipart body cannot be read (Missing boundary in multipart)", "`request` field"]),
    ("/v1/extract", GARBAGE, ["multipart body cannot be read", "an `image` file, an `extractor` field"]),
    ("/v1/extract", {"files": [("image", ("a.png", b"1")), ("image", ("b.png", b"2"))], "data": {"extractor": "canny"}},
     ["Too many files", "an `image` file"]),
    ("/v1/generate", {"data": {"request": json.dumps({"prompt": "x"})},
                      "files": [(f"condition.c{i}", ("c.png", b"x")) for i in range(33)]}, ["Too many files"]),
    ("/v1/extract", {"files": {"image": ("a.png", png())}}, ["extractor is required"]),  # was "should be a valid string"
    ("/v1/extract", {"files": {"image": ("a.png", png())}, "data": {"extractor": "canny", "threshold": "9"}},
     ["unexpected multipart field 'threshold'", "`options`"]),  # was ignored: 200 with the default options
    # the request as a file part is read (here: steps over this server's limit, so nothing runs)
    ("/v1/generate", {"files": {"request": ("r.json", json.dumps({"prompt": "x", "steps": 9}).encode()),
                                "condition.sketch": ("s.png", png())}}, ["steps=9 is above this server's limit of 8"]),
])
def test_bad_multipart_gets_one_line_422(client, path, request_kw, words):
    """starlette answered 400 "Invalid multipart data." without saying what to send; extract ignored unknown fields."""
    detail = one_line(client.post(path, **request_kw), 422)
    assert all(w in detail for w in words), detail


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (a few bytes of data: a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("field", ["conditions", "init_image", "extract"])
def test_a_bomb_header_says_too_large_not_unreadable(client, field):
    """A 100000² PNG header: PIL refuses it before the size check; it said "not an image PIL can read"."""
    bomb = base64.b64encode(png_header(100_000, 100_000)).decode()
    if field == "extract":
        r = client.post("/v1/extract", json={"extractor": "canny", "image": bomb})
    else:
        r = client.post("/v1/generate", json=gen_body(**({"conditions": {"sketch": bomb}} if field == "conditions"
                                                         else {"init_image": bomb})))
    detail = one_line(r, 422)
    assert "too large to decode" in detail and "at most 256 pixels a side" in detail, detail


@dataclass
class NoWeights(Extractor):
    """Test double: a model-based extractor whose weights this server does not have."""

    name = "noweights"
    feeds = ()
    channels = 1
    recipe = "needs weights nobody installed"

    calls = 0

    def __call__(self, image):
        from t2iadapter.errors import MissingWeightsError

        NoWeights.calls += 1
        raise MissingWeightsError("weights for X are not available. Get them and pass --model DIR")


def test_an_extractor_without_its_weights_is_503_for_the_operator(pipe, monkeypatch, caplog):
    """It was a 422 telling the client to pass --model DIR, an option only the operator may set."""
    monkeypatch.setitem(extractors.REGISTRY, "noweights", NoWeights)
    NoWeights.calls = 0
    with TestClient(create_app(pipe, limits=LIMITS)) as c:
        image = base64.b64encode(png(16, 16, "RGB")).decode()
        detail = one_line(c.post("/v1/extract", json={"extractor": "noweights", "image": image}), 503)
        assert "extractor 'noweights' is not available on this server" in detail and "--model" not in detail
        assert "--model DIR" in caplog.text  # the operator's advice goes to the log
        # looking again may wait seconds for the hub: for a while the answer comes at once, without a look
        assert c.post("/v1/extract", json={"extractor": "noweights", "image": image}).status_code == 503
        assert NoWeights.calls == 1
        assert c.post("/v1/extract", json={"extractor": "canny", "image": image}).status_code == 200


def test_a_request_needing_weights_the_server_lacks_is_503(pipe, tmp_path, caplog):
    """A style adapter without CLIP vision weights: the server finds out at start-up, and a style request is a 503
    at once (no job id that fails later, no advice only the operator can follow); other adapters still serve."""
    from t2iadapter.models import StyleAdapterConfig

    ctx = pipe.base.unet.config.cross_attention_dim
    torch.manual_seed(0)
    style = build_adapter(StyleAdapterConfig(width=32, context_dim=ctx, num_heads=4, num_layers=1, num_tokens=2))
    served = AdapterPipeline(pipe.base, {"sketch": pipe.adapters["sketch"], "style": style},
                             style_encoder=tmp_path / "no-clip")
    with caplog.at_level(logging.WARNING), TestClient(create_app(served, limits=LIMITS)) as c:
        assert "style adapter(s) style will refuse requests (503)" in caplog.text and "--model DIR" in caplog.text
        styled = gen_body(conditions={"style": base64.b64encode(png(32, 32, "RGB")).decode()})
        for path in ("/v1/generate", "/v1/jobs"):
            detail = one_line(c.post(path, json=styled), 503)
            assert "model weights it needs are not installed" in detail and "--model" not in detail
        assert c.get("/health").json()["workers"][0]["jobs"] == 0  # refused before the queue
        assert c.post("/v1/generate", json=gen_body()).status_code == 200
        assert c.get("/health").json()["workers"][0]["jobs"] == 1


def test_a_mistyped_path_or_method_says_which(client):
    """Starlette answered a bare "Not Found" / "Method Not Allowed"; the client learns what it sent and what to do."""
    detail = one_line(client.post("/v1/generat", json=gen_body()), 404)
    assert detail == "no endpoint or file at /v1/generat; the API's endpoints are listed at /docs"
    r = client.get("/v1/generate")
    detail = one_line(r, 405)
    assert detail == "GET is not allowed on /v1/generate; use POST" and r.headers["allow"] == "POST"
    assert one_line(client.get("/v1/jobs/nope"), 404) != "Not Found"  # the app's own 404s keep their words
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("option, value", [("--max-upload-mb", "inf"), ("--batch-wait-ms", "inf"),
                                           ("--batch-wait-ms", "nan")])
def test_serve_refuses_limits_that_are_no_number(monkeypatch, capsys, option, value):
    """--max-upload-mb inf was an OverflowError traceback after the model loaded; --batch-wait-ms inf killed the worker
    thread at the first request (OverflowError in Condition.wait), so every request waited for its 504."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served"))
    assert cli(["serve", "--base", "tiny", option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option[2:].replace("-", "_") in err, err


def test_a_long_batch_wait_does_not_kill_the_worker():
    """A wait past threading.TIMEOUT_MAX raised OverflowError on the worker thread: the queue stopped for good."""
    from t2iadapter.server.jobs import ModelWorker

    worker = ModelWorker(4, lambda jobs, progress: ["ok"] * len(jobs), max_batch=2, batch_wait=1e12)
    worker.start()
    try:
        first = worker.submit("a", timeout=30, key="k")
        time.sleep(0.2)  # the worker holds `first` and waits for company
        second = worker.submit("b", timeout=30, key="k")  # the company: the batch is full and runs
        assert first.future.result(10) == "ok" and second.future.result(10) == "ok"
    finally:
        worker.stop()
