"""`t2iadapter serve`: every endpoint and status code of the API on the tiny base with tiny random adapters."""
import base64
import io
import json
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from t2iadapter.bases import load_base, tiny_adapter_config  # noqa: E402
from t2iadapter.cli import main as cli  # noqa: E402
from t2iadapter.models import build_adapter  # noqa: E402
from t2iadapter.pipeline import AdapterPipeline  # noqa: E402
from t2iadapter.pngmeta import CHUNK  # noqa: E402
from t2iadapter.server import Limits, create_app  # noqa: E402

LIMITS = Limits(max_upload_mb=0.25, max_steps=8, max_side=128, max_input_side=256, queue_size=2, timeout=60)
EVIL = "../../etc/passwd"


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model is fastest on one thread; two spin-waiting threads on a busy 2-core CPU are ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(one_thread):
    base = load_base("tiny")
    torch.manual_seed(0)
    adapters = {"sketch": build_adapter(tiny_adapter_config(base, 1)), "color": build_adapter(tiny_adapter_config(base, 3))}
    return AdapterPipeline(base, adapters)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, limits=LIMITS)) as c:
        yield c


def png_b64(w=64, h=64, mode="L", seed=0) -> str:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def body(**kw):
    req = {"prompt": "a red star", "conditions": {"sketch": png_b64()}, "steps": 2, "seed": 7}
    req.update(kw)
    return req


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_health_models_page_and_docs(client):
    assert client.get("/health").json() == {"status": "ok", "waiting": 0, "running": 0, "capacity": 2,
                                            "workers": [{"name": "worker0", "status": "up", "jobs": 0, "failures": 0}]}
    models = client.get("/v1/models").json()
    assert {(a["name"], a["kind"], a["channels"]) for a in models["adapters"]} == {("sketch", "full", 1), ("color", "full", 3)}
    assert "canny" in [e["name"] for e in models["extractors"]] and "ddim" in models["schedulers"]
    assert models["limits"]["max_steps"] == 8 and models["default_size"] == [64, 64]
    assert models["defaults"]["steps"] == 30 and models["defaults"]["guidance_scale"] == 7.5  # GenerationRequest's
    assert all("model" not in e["options"] for e in models["extractors"])
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/extract", "/v1/models", "/v1/jobs", "/health"} <= set(spec["paths"])
    assert "GenerateRequest" in spec["components"]["schemas"]


def test_generate_json_returns_png_with_parameters(client):
    r = client.post("/v1/generate", json=body(adapters={"sketch": {"weight": 0.8, "window": "0:0.5"}}))
    assert r.status_code == 200, r.text
    out = r.json()
    im = decode(out["images"][0]["png"])
    assert im.size == (64, 64)
    params = json.loads(im.text[CHUNK])
    assert params["seed"] == 7 and params["adapters"] == ["sketch"] and params["weights"] == [0.8]
    assert params["windows"] == [[0.0, 0.5]] and params["steps"] == 2 and params["base"] == "tiny"
    assert out["parameters"]["prompt"] == "a red star"


def test_generate_multipart_matches_json(client):
    raw = base64.b64decode(png_b64())
    req = {k: v for k, v in body().items() if k != "conditions"}
    r = client.post("/v1/generate", data={"request": json.dumps(req)}, files={"condition.sketch": ("s.png", raw, "image/png")})
    assert r.status_code == 200, r.text
    j = client.post("/v1/generate", json=body())
    a, b = (np.asarray(decode(x.json()["images"][0]["png"])) for x in (r, j))
    assert np.array_equal(a, b)
    twice = [("condition.sketch", ("a.png", raw, "image/png")), ("condition.sketch", ("b.png", raw, "image/png"))]
    r = client.post("/v1/generate", data={"request": json.dumps(req)}, files=twice)  # the last one won silently
    assert r.status_code == 422 and "'condition.sketch' is sent twice" in r.json()["detail"]


def test_extract_json_and_multipart(client):
    r = client.post("/v1/extract", json={"extractor": "canny", "image": png_b64(80, 40, "RGB"), "options": {"low": 50}})
    assert r.status_code == 200, r.text
    assert r.json()["channels"] == 1 and decode(r.json()["png"]).size == (80, 40)
    raw = base64.b64decode(png_b64(32, 32, "RGB"))
    r = client.post("/v1/extract", data={"extractor": "color", "options": '{"factor": 8}'}, files={"image": ("a.png", raw)})
    assert r.status_code == 200 and r.json()["channels"] == 3


def test_jobs_report_progress_and_result(client):
    r = client.post("/v1/jobs", json=body(steps=3))
    assert r.status_code == 202
    job_id = r.json()["id"]
    for _ in range(300):
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert job["status"] == "done" and job["progress"] == 1.0 and job["result"]["images"]
    assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "done"  # finished jobs stay finished


@pytest.mark.parametrize("patch, reason", [
    ({"steps": 9}, "limit of 8"),
    ({"width": 256}, "limit of 128"),
    ({"num_images": 5}, "limit of 4"),
    ({"conditions": {"sketch": png_b64(300, 8)}}, "at most 256 pixels"),
    ({"conditions": {"sketch": "not base64!"}}, "not valid base64"),
    ({"conditions": {"sketch": base64.b64encode(b"GIF8 nope").decode()}}, "not an image"),
    ({"adapters": {"sketch": {"window": "0.9:0.1"}}}, "0 <= start <= end <= 1"),
    ({"adapters": {"color": {"weight": 1.0}}}, "no condition image"),
    ({"compose": "fuser"}, "without --fuser"),
    ({"scheduler": "warp-drive"}, "unknown scheduler"),
    ({"prompt": ""}, "at least 1 character"),
    ({"steps": "many"}, "valid integer"),
])
def test_invalid_requests_get_422_with_the_reason(client, patch, reason):
    r = client.post("/v1/generate", json=body(**patch))
    assert r.status_code == 422 and reason in r.text, r.text


def test_extract_422s(client):
    r = client.post("/v1/extract", json={"extractor": "canny", "image": png_b64(), "options": {"model": "/etc"}})
    assert r.status_code == 422 and "server operator" in r.text
    r = client.post("/v1/extract", json={"extractor": "canny", "image": png_b64(), "options": {"low": "lots"}})
    assert r.status_code == 422 and "expects an int" in r.text


@pytest.fixture
def opened_paths():
    """Every path the process opens while the test runs (an audit hook; hooks cannot be removed, so it is gated)."""
    seen: list[str] = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "open" and args and isinstance(args[0], (str, bytes)):
            seen.append(str(args[0]))

    sys.addaudithook(hook)
    yield seen
    active[0] = False


def test_names_are_never_paths(client, opened_paths):
    for req in (body(conditions={EVIL: png_b64()}), body(adapters={EVIL: {"weight": 1}})):
        r = client.post("/v1/generate", json=req)
        assert r.status_code == 404 and "sketch" in r.json()["detail"]
    r = client.post("/v1/extract", json={"extractor": EVIL, "image": png_b64()})
    assert r.status_code == 404
    assert client.get("/v1/jobs/" + "..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert not [p for p in opened_paths if "passwd" in p]


def test_body_over_the_limit_gets_413(client):
    big = "A" * (300 * 1024)
    assert client.post("/v1/generate", json=body(prompt="x", negative_prompt=big)).status_code == 413
    r = client.post("/v1/generate", data={"request": json.dumps(body())}, files={"condition.sketch": ("a.png", b"0" * 300_000)})
    assert r.status_code == 413 and "0.25 MB" in r.text

    def chunks():  # no Content-Length: the limit is enforced while the body streams
        for _ in range(40):
            yield b" " * 10_000

    r = client.post("/v1/extract", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_token_guards_everything_but_health(pipe):
    with TestClient(create_app(pipe, limits=LIMITS, token="s3cret")) as c:
        assert c.get("/health").status_code == 200
        for path in ("/v1/models", "/openapi.json", "/docs", "/v1/jobs/x"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/generate", json=body()).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/").status_code == 200  # the page holds no data; it asks for the token


def test_timeout_gets_504_and_frees_the_model(pipe):
    with TestClient(create_app(pipe, limits=Limits(max_steps=1000, timeout=0.001))) as c:
        r = c.post("/v1/generate", json=body(steps=200))
        assert r.status_code == 504 and "0.001 s timeout" in r.json()["detail"]
        job = c.post("/v1/jobs", json=body(steps=200)).json()
        for _ in range(200):
            state = c.get(f"/v1/jobs/{job['id']}").json()
            if state["status"] not in ("queued", "running") and c.get("/health").json()["running"] == 0:
                break
            time.sleep(0.05)
        assert state["status"] == "timeout" and "timeout" in state["error"]


def test_worker_not_running_gets_503(pipe):
    c = TestClient(create_app(pipe, limits=LIMITS))  # no `with`: the lifespan (and its worker) never starts
    r = c.post("/v1/generate", json=body())
    assert r.status_code == 503 and "not running" in r.text


class BlockingPipeline:
    """Test double for a slow model (queue test only): each call blocks until `release` is set."""

    adapters: dict = {}
    spatial_names: list = []
    style_names: list = []
    fuser = None
    default_size = (64, 64)
    size_multiple = 64

    def __init__(self) -> None:
        self.release = threading.Event()
        self.base = type("Base", (), {"source": "stub"})()

    def generate(self, request, **kw):
        kw["callback"](0, None, None)
        assert self.release.wait(30)
        from t2iadapter.pipeline import GenerationResult

        return GenerationResult([Image.new("RGB", (64, 64))], {"prompt": request.prompt})


def test_full_queue_gets_429_with_retry_after():
    stub = BlockingPipeline()
    with TestClient(create_app(stub, limits=Limits(queue_size=1))) as c:
        req = {"prompt": "x", "steps": 1}
        running = c.post("/v1/jobs", json=req).json()["id"]
        for _ in range(200):
            if c.get(f"/v1/jobs/{running}").json()["status"] == "running":
                break
            time.sleep(0.01)
        waiting = c.post("/v1/jobs", json=req)
        assert waiting.status_code == 202 and waiting.json()["position"] == 1
        full = c.post("/v1/generate", json=req)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        health = c.get("/health").json()
        assert {k: health[k] for k in ("status", "waiting", "running", "capacity")} == {"status": "ok", "waiting": 1, "running": 1, "capacity": 1}
        assert c.delete(f"/v1/jobs/{waiting.json()['id']}").json()["status"] == "cancelled"
        # a job cancelled while it waits never reaches a worker; /metrics counted only those that did
        assert 't2iadapter_jobs_total{status="cancelled"} 1.0' in c.get("/metrics").text
        stub.release.set()
        for _ in range(200):
            if c.get(f"/v1/jobs/{running}").json()["status"] == "done":
                break
            time.sleep(0.01)
        assert c.get(f"/v1/jobs/{running}").json()["status"] == "done"
        assert c.post("/v1/generate", json=req).status_code == 200


def test_serve_command_errors_are_one_line(capsys, tmp_path):
    from t2iadapter import assets
    from t2iadapter.errors import MissingWeightsError

    try:
        assets.demo_base_path()
    except MissingWeightsError:  # before the demo model is trained: `serve` says so in one line
        assert cli(["serve"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: the embedded demo base model is missing") and err.count("\n") == 1
    assert cli(["serve", "--base", "tiny", "--adapter", "../x=/etc/passwd"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert cli(["serve", "--base", "tiny", "--adapter", f"a={tmp_path / 'missing.safetensors'}", "--port", "0"]) == 2


def test_serve_command_builds_the_app_from_its_options(monkeypatch, tmp_path, one_thread):
    import uvicorn

    base = load_base("tiny")
    path = build_adapter(tiny_adapter_config(base, 1)).save_file(tmp_path / "edges.safetensors")
    seen = {}

    def fake_run(app, host, port, **_kw):  # instead of serving: check the app the command built
        with TestClient(app) as c:
            seen["health"] = c.get("/health").status_code
            seen["no_token"] = c.get("/v1/models").status_code
            models = c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).json()
        seen.update(host=host, port=port, adapters=[a["name"] for a in models["adapters"]], limits=models["limits"])

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("T2IADAPTER_TOKEN", "from-env")
    argv = ["serve", "--base", "tiny", "--adapter", f"sketch={path}", "--port", "7999", "--max-steps", "12",
            "--queue-size", "3", "--threads", "1"]
    assert cli(argv) == 0
    assert seen["health"] == 200 and seen["no_token"] == 401 and seen["adapters"] == ["sketch"]
    assert seen["host"] == "127.0.0.1" and seen["port"] == 7999
    assert seen["limits"]["max_steps"] == 12 and seen["limits"]["queue_size"] == 3
