"""Issue 17: dynamic batching (bitwise the same alone or batched), several workers, worker failure, /metrics, /health."""
import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from t2iadapter.bases import load_base, tiny_adapter_config  # noqa: E402
from t2iadapter.cli import main as cli  # noqa: E402
from t2iadapter.errors import ConditionError, ConfigError  # noqa: E402
from t2iadapter.generation.request import AdapterUse, GenerationRequest  # noqa: E402
from t2iadapter.models import build_adapter  # noqa: E402
from t2iadapter.pipeline import AdapterPipeline, GenerationResult  # noqa: E402
from t2iadapter.server import Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread on a busy CPU
    base = load_base("tiny")
    torch.manual_seed(0)
    adapters = {"sketch": build_adapter(tiny_adapter_config(base, 1)), "color": build_adapter(tiny_adapter_config(base, 3))}
    yield AdapterPipeline(base, adapters)
    torch.set_num_threads(before)


def cond(seed: int, channels: int = 1) -> np.ndarray:
    shape = (64, 64) if channels == 1 else (64, 64, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def req(prompt="a red star", seed=1, weight=1.0, window="0:1", **kw) -> GenerationRequest:
    return GenerationRequest(prompt, (AdapterUse("sketch", cond(seed), weight, window),), steps=kw.pop("steps", 4),
                             seed=seed, **kw)


def pixels(result: GenerationResult) -> list[np.ndarray]:
    return list(result.images)


# ------------------------------------------------------------------ the batched entry point


def test_a_request_gives_the_same_image_alone_or_in_a_batch(pipe):
    a = req("a red star", seed=1, weight=0.6, window="0:0.5")
    b = req("a blue cat", seed=2, weight=1.4, window="0.25:1")
    c = req("two dogs", seed=3, weight=1.0, num_images=2)
    alone = [pipe.generate_batch([r], output_type="np")[0].images for r in (a, b, c)]
    together = [r.images for r in pipe.generate_batch([b, c, a], output_type="np")]
    for mine, batched in zip(alone, (together[2], together[0], together[1])):
        assert all(np.array_equal(x, y) for x, y in zip(mine, batched))  # bitwise: see loop.MIN_ROWS
    # against the one-request path (diffusers' call shapes): float rounding only
    single = pipe.generate(a, output_type="np").images[0]
    assert np.abs(single - alone[0][0]).max() < 1e-4


def test_a_request_gives_the_same_image_in_a_batch_of_16_rows_or_more(pipe):
    """With CFG, 8 requests are 16 UNet rows, where oneDNN's 1x1 convolutions round differently than at 4..15 rows
    (one thread): an image batched with 7 others differed from the same request alone (2e-6, 2 PNG pixel values)."""
    a = req("a red star", seed=1)
    alone = pipe.generate_batch([a], output_type="np")[0].images[0]
    together = pipe.generate_batch([a] + [req(f"prompt {k}", seed=10 + k) for k in range(8)], output_type="np")
    assert np.array_equal(together[0].images[0], alone)


def test_weights_and_windows_stay_per_request_in_a_batch(pipe):
    strong, weak, late = req(seed=5, weight=1.5), req(seed=5, weight=0.2), req(seed=5, weight=1.5, window="0.5:1")
    images = [r.images[0] for r in pipe.generate_batch([strong, weak, late], output_type="np")]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    for r, image in zip((strong, weak, late), images):
        assert np.array_equal(pipe.generate_batch([r], output_type="np")[0].images[0], image)


def test_requests_that_cannot_share_a_unet_call_are_refused(pipe):
    with pytest.raises(ConfigError, match="cannot share"):
        pipe.generate_batch([req(steps=3), req(steps=4)])
    assert pipe.batch_key(req(size=(64, 64))) == pipe.batch_key(req())  # the base's size, resolved


# ------------------------------------------------------------------ the server


def png_b64(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(cond(seed), "L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def body(prompt="a red star", seed=1, **kw):
    return {"prompt": prompt, "conditions": {"sketch": png_b64(seed)}, "steps": 2, "seed": seed, **kw}


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def scrape(c) -> dict[tuple[str, tuple], float]:
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def wait_jobs(c, ids, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = [c.get(f"/v1/jobs/{i}").json() for i in ids]
        if all(s["status"] not in ("queued", "running") for s in states):
            return states
        time.sleep(0.05)
    raise AssertionError(f"jobs not done: {states}")


def test_the_server_batches_queued_requests_and_each_image_is_its_own(pipe):
    limits = Limits(max_batch=4, batch_wait_ms=2000, queue_size=8, max_steps=8, max_side=128)
    with TestClient(create_app(pipe, limits=limits)) as c:
        bodies = [body("a red star", 1, adapters={"sketch": {"weight": 0.5, "window": "0:0.5"}}),
                  body("a blue cat", 2), body("two dogs", 3, adapters={"sketch": {"weight": 1.5}})]
        ids = [c.post("/v1/jobs", json=b).json()["id"] for b in bodies]  # the worker waits for company
        states = wait_jobs(c, ids)
        assert [s["status"] for s in states] == ["done"] * 3
        m = scrape(c)
        assert m[("t2iadapter_batch_jobs_count", ())] == 1 and m[("t2iadapter_batch_jobs_sum", ())] == 3
        assert m[("t2iadapter_images_total", ())] == 3
        batched = [decode(s["result"]["images"][0]["png"]) for s in states]
    with TestClient(create_app(pipe, limits=Limits(max_batch=1, max_steps=8, max_side=128))) as c:
        for b, image in zip(bodies, batched):
            alone = c.post("/v1/generate", json=b)
            assert alone.status_code == 200 and np.array_equal(decode(alone.json()["images"][0]["png"]), image)


class Flaky:
    """The real pipeline, but a prompt containing `boom` makes the model raise (a broken worker, not a bad request)."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def generate_batch(self, requests, **kw):
        if any("boom" in r.prompt for r in requests):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if any("bad condition" in r.prompt for r in requests):  # a user's error found only while running
            raise ConditionError("condition 'sketch' is not a readable image; upload a PNG or JPEG")
        if any("huge" in r.prompt for r in requests):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB (GPU 0; 79.19 GiB total)")
        return self._inner.generate_batch(requests, **kw)


def test_a_failing_worker_answers_500_and_keeps_serving(pipe):
    limits = Limits(max_batch=4, batch_wait_ms=1000, max_steps=8, max_side=128)
    with TestClient(create_app(Flaky(pipe), limits=limits)) as c:
        ids = [c.post("/v1/jobs", json=body(p, i)).json()["id"] for i, p in enumerate(["boom", "fine", "also fine"])]
        states = wait_jobs(c, ids)  # one batch fails; its jobs rerun one by one: only the bad one fails
        assert [s["status"] for s in states] == ["failed", "done", "done"]
        assert "model worker worker0 failed" in states[0]["error"] and "illegal memory access" in states[0]["error"]
        r = c.post("/v1/generate", json=body("boom"))
        assert r.status_code == 500 and "model worker worker0 failed" in r.json()["detail"]
        assert c.post("/v1/generate", json=body("after")).status_code == 200
        r = c.post("/v1/generate", json=body("huge"))  # out of memory: what to ask for instead, not torch's dump
        assert r.status_code == 500 and r.json()["detail"] == ("the model worker worker0 ran out of GPU memory on this "
                                                              "request: ask for fewer images or a smaller size")
        assert c.post("/v1/generate", json=body("after that")).status_code == 200
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["workers"][0]["status"] == "up" and health["workers"][0]["failures"] == 3
        assert scrape(c)[("t2iadapter_rejected_requests_total", (("reason", "server_error"),))] == 2


def test_a_bad_request_in_a_batch_fails_only_itself(pipe):
    """A user's error raised while its batch ran (not caught when it was queued) failed every request batched with
    it, with that user's message."""
    limits = Limits(max_batch=4, batch_wait_ms=1000, max_steps=8, max_side=128)
    with TestClient(create_app(Flaky(pipe), limits=limits)) as c:
        ids = [c.post("/v1/jobs", json=body(p, i)).json()["id"] for i, p in enumerate(["fine", "bad condition", "ok"])]
        states = wait_jobs(c, ids)
        assert [s["status"] for s in states] == ["done", "failed", "done"]
        assert states[1]["error"] == "condition 'sketch' is not a readable image; upload a PNG or JPEG"
        r = c.post("/v1/generate", json=body("bad condition"))
        assert r.status_code == 422 and "not a readable image" in r.json()["detail"]
        assert c.get("/health").json()["workers"][0]["failures"] == 0  # the user's error, not the worker's


def test_metrics_move(pipe):
    with TestClient(create_app(pipe, limits=Limits(max_steps=8, max_side=128), token="t")) as c:
        before = scrape(c)  # public, like /health
        auth = {"Authorization": "Bearer t"}
        assert c.post("/v1/generate", json=body(num_images=2), headers=auth).status_code == 200
        assert c.post("/v1/generate", json=body(steps=99), headers=auth).status_code == 422
        assert c.post("/v1/generate", json=body()).status_code == 401
        assert c.post("/v1/generate", content=b"{}", headers={**auth, "content-type": "text/plain"}).status_code == 415
        after = scrape(c)
    key = ("t2iadapter_request_seconds_count", (("endpoint", "/v1/generate"), ("method", "POST")))
    assert before.get(key, 0) == 0 and after[key] == 4
    assert after[("t2iadapter_images_total", ())] == before[("t2iadapter_images_total", ())] + 2
    for reason in ("invalid", "unauthorized", "media_type"):
        assert after[("t2iadapter_rejected_requests_total", (("reason", reason),))] == 1
    assert after[("t2iadapter_queue_depth", ())] == 0 and after[("t2iadapter_workers_up", ())] == 1
    assert after[("t2iadapter_batch_images_sum", ())] == 2 and after[("t2iadapter_images_per_second", ())] > 0


class Blocking:
    """A model that blocks until released (to see two workers busy at once)."""

    adapters: dict = {}
    spatial_names: list = []
    style_names: list = []
    fuser = None
    default_size = (64, 64)
    size_multiple = 64

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.base = type("Base", (), {"source": "stub"})()

    def generate_batch(self, requests, callback, **kw):
        callback(0, 1)
        assert self.release.wait(30)
        return [GenerationResult([Image.new("RGB", (64, 64))], {"prompt": r.prompt}) for r in requests]


def test_two_workers_run_two_requests_at_once():
    release = threading.Event()
    with TestClient(create_app([Blocking(release), Blocking(release)], limits=Limits(max_batch=1))) as c:
        ids = [c.post("/v1/jobs", json={"prompt": p, "steps": 1}).json()["id"] for p in "ab"]
        for _ in range(300):
            if c.get("/health").json()["running"] == 2:
                break
            time.sleep(0.01)
        health = c.get("/health").json()
        assert health["running"] == 2 and health["waiting"] == 0
        assert [w["name"] for w in health["workers"]] == ["worker0", "worker1"]
        release.set()
        assert [s["status"] for s in wait_jobs(c, ids)] == ["done", "done"]
        assert sorted(w["jobs"] for w in c.get("/health").json()["workers"]) == [1, 1]


def test_jobs_queued_behind_workers_that_all_failed_to_warm_up_get_an_answer():
    """A job queued while the only worker warmed up stayed `queued` for good when the warm-up failed."""
    gate = threading.Event()

    def warmup():
        assert gate.wait(30)
        raise RuntimeError("compile failed")

    app = create_app(Blocking(threading.Event()), limits=Limits(max_batch=1))
    app.state.worker.lanes[0].warmup = warmup
    with TestClient(app) as c:
        job = c.post("/v1/jobs", json={"prompt": "a", "steps": 1}).json()
        assert job["status"] == "queued"
        gate.set()
        state = wait_jobs(c, [job["id"]], timeout=10)[0]
        assert state["status"] == "failed" and "failed to warm up" in state["error"]
        assert c.get("/health").json()["status"] == "down"
        assert c.post("/v1/generate", json={"prompt": "b", "steps": 1}).status_code == 503
        assert scrape(c)[("t2iadapter_jobs_total", (("status", "failed"),))] == 1


def test_serve_starts_one_warmed_worker_per_device(monkeypatch):
    import uvicorn

    seen = {}

    def fake_run(app, host, port, **_kw):
        with TestClient(app) as c:
            for _ in range(600):  # the warm-up runs on the worker threads
                seen["health"] = c.get("/health").json()
                if all(w["status"] == "up" for w in seen["health"]["workers"]):
                    break
                time.sleep(0.05)
            seen["gen"] = c.post("/v1/generate", json={"prompt": "x", "steps": 2, "width": 64, "height": 64}).status_code
            seen["limits"] = c.get("/v1/models").json()["limits"]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    argv = ["serve", "--base", "tiny", "--devices", "cpu,cpu", "--warmup", "64x64", "--max-batch", "2",
            "--batch-wait-ms", "5", "--threads", "1"]
    assert cli(argv) == 0
    assert [(w["name"], w["status"]) for w in seen["health"]["workers"]] == [("cpu", "up"), ("cpu#1", "up")]
    assert seen["gen"] == 200 and seen["limits"]["max_batch"] == 2 and seen["limits"]["batch_wait_ms"] == 5


def test_fast_mode_batches_pad_to_few_shapes_and_match_eager():
    """Fast mode: batched rows pad to powers of two (few compiled shapes); images match eager batching."""
    import torch._dynamo.testing

    from t2iadapter.generation.loop import fast_rows

    assert [fast_rows(n) for n in (1, 2, 4, 5, 8, 9)] == [4, 4, 4, 8, 8, 16]
    base = load_base("tiny")
    torch.manual_seed(0)
    eager = AdapterPipeline(base, {"sketch": build_adapter(tiny_adapter_config(base, 1))})
    a, b = req("one", 1, 0.5, "0:0.5"), req("two", 2, 1.5, "0.5:1")
    want = [r.images[0] for r in eager.generate_batch([a, b], output_type="np")]
    counter = torch._dynamo.testing.CompileCounter()
    eager.optimize(dtype=torch.float32, backend=counter, compile_vae=False, compile_adapters=False)
    alone = eager.generate_batch([a], output_type="np")[0].images[0]  # 2 rows → 4
    graphs = counter.frame_count
    got = [r.images[0] for r in eager.generate_batch([a, b], output_type="np")]  # 4 rows: the same shape
    assert counter.frame_count == graphs, "a batch of two recompiled the UNet"
    assert np.array_equal(alone, got[0])
    for x, y in zip(got, want):
        assert np.abs(x - y).max() < 1e-4


def test_a_worker_goes_on_when_the_work_around_a_batch_raises():
    """Anything raising after a batch's outcome (the metrics observer, `release_memory` after a CUDA fault) ended
    the worker thread while /health still said up: every later job waited for its timeout."""
    from t2iadapter.server.jobs import Lane, ModelWorker

    class Observer:
        calls = 0

        def batch(self, jobs, images):
            pass

        def finished(self, job):
            Observer.calls += 1
            if Observer.calls == 1:
                raise RuntimeError("observer broke")

    worker = ModelWorker(4, [Lane("cpu", lambda jobs, progress: [job.payload * 2 for job in jobs])],
                         observer=Observer())
    worker.start()
    try:
        first = worker.submit(1, timeout=10)
        assert first.future.result(timeout=10) == 2  # its outcome came before the observer raised
        second = worker.submit(21, timeout=10)
        assert second.future.result(timeout=10) == 42
        lane = worker.lanes[0]
        assert lane.status == "up" and lane.thread.is_alive() and lane.failures == 1
    finally:
        worker.stop()
