"""The FastAPI app: JSON/multipart API, job progress, the web page, limits and the optional token."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2iadapter.errors import MissingWeightsError, T2IAdapterError
from t2iadapter.server import openapi
from t2iadapter.server.extraction import ExtractorPool, ExtractorUnavailable, describe
from t2iadapter.server.generation import UnknownName, batch_key, make_runner, prepare, warm
from t2iadapter.server.images import b64_bytes, b64_png, open_bounded
from t2iadapter.server.jobs import Job, Lane, ModelWorker, QueueFull, Stopped, WorkerError, WorkerStopped
from t2iadapter.server.limits import BIG_OUTPUT, Limits, ServerSettings
from t2iadapter.server.schemas import (
    AdapterInfo, ExtractRequest, ExtractResponse, GenerateRequest, GenerateResponse, Health, JobOut, ModelsResponse,
    explain,
)  # fmt: skip
from t2iadapter.server.security import BodyLimit, QuietDisconnect, SameOrigin, TokenGuard

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parent.parent / "web"
CONDITION_FIELD = "condition."  # multipart: file field `condition.<adapter name>`


def create_app(
    source: Any,
    *,
    limits: Limits | None = None,
    token: str | None = None,
    base_label: str | None = None,
) -> FastAPI:
    """The app for an `AdapterPipeline`, a list of them (one model worker each, e.g. one per GPU) or `ServerSettings`
    (loaded now, one pipeline per device); the model workers run while it serves."""
    from t2iadapter.server.metrics import Metrics, MetricsMiddleware

    limits = limits or Limits()
    settings = source if isinstance(source, ServerSettings) else None
    named = settings.load_pipelines() if settings else \
        [(f"worker{i}", p) for i, p in enumerate(source if isinstance(source, (list, tuple)) else [source])]
    pipe = named[0][1]  # the one that answers /v1/models and checks requests (all workers load the same models)
    label = base_label or (settings.base if settings else str(pipe.base.source))
    sizes = list(settings.warmup) if settings else []
    lanes = [Lane(name, make_runner(p, label), warmup=(lambda p=p: warm(p, sizes, limits.max_batch)) if sizes else None)
             for name, p in named]
    metrics = Metrics()
    worker = ModelWorker(limits.queue_size, lanes, max_batch=limits.max_batch, batch_wait=limits.batch_wait_ms / 1000,
                         observer=metrics)
    metrics.watch(worker)
    pool = ExtractorPool(max_waiting=limits.queue_size)

    unavailable: dict[str, MissingWeightsError] = {}  # adapter name → why it cannot run here, found at start-up

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if pipe.style_names:  # a style reference needs CLIP vision: find out now, not as a job that fails later
            try:
                await run_in_threadpool(pipe.load_style_encoder)
            except MissingWeightsError as exc:
                log.warning("style adapter(s) %s will refuse requests (503): %s", ", ".join(pipe.style_names), exc)
                unavailable.update(dict.fromkeys(pipe.style_names, exc))
        worker.start()
        log.info("%d model worker(s) started (%s; %d adapters, queue %d, batches of up to %d)", len(lanes),
                 ", ".join(n for n, _ in named), len(pipe.adapters), limits.queue_size, limits.max_batch)
        try:
            yield
        finally:
            pool.close()
            await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="t2iadapter",
        version="1",
        summary="T2I-Adapter (arXiv 2302.08453): controlled text-to-image generation with registered adapters",
        lifespan=lifespan,
    )
    app.state.worker, app.state.pipeline, app.state.limits, app.state.metrics = worker, pipe, limits, metrics

    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    app.add_middleware(SameOrigin, enabled=not token, public=is_public)
    app.add_middleware(TokenGuard, token=token, public=is_public)  # 401 before anything is read
    app.add_middleware(QuietDisconnect)  # a client gone mid-body is one log line
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: times and counts every answer

    # ------------------------------------------------------------- errors → statuses

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's bare "Not Found" / "Method Not Allowed" for a mistyped path or method, made to say which."""
        detail, path = exc.detail, request.url.path
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint or file at {path}; the API's endpoints are listed at /docs"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            allowed = " or ".join((exc.headers or {}).get("Allow", "").split(", ")) or "another method"
            detail = f"{request.method} is not allowed on {path}; use {allowed}"
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(T2IAdapterError)
    async def _user_error(_r: Request, exc: T2IAdapterError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 422)

    @app.exception_handler(UnknownName)
    async def _unknown(_r: Request, exc: UnknownName) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0])}, 404)

    @app.exception_handler(QueueFull)
    async def _full(_r: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(MissingWeightsError)
    async def _no_weights(_r: Request, exc: MissingWeightsError) -> JSONResponse:
        log.warning("a request needs weights this server does not have: %s", exc)  # the advice is the operator's
        return JSONResponse({"detail": "this server cannot run the request: model weights it needs are not installed "
                                       "(the server log says which); leave out the adapter that needs them (e.g. a "
                                       "style adapter needs CLIP vision weights) or ask the operator"}, 503)

    @app.exception_handler(ExtractorUnavailable)
    async def _unavailable(_r: Request, exc: ExtractorUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503)

    @app.exception_handler(WorkerStopped)
    async def _stopped(_r: Request, exc: WorkerStopped) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": "5"})

    @app.exception_handler(WorkerError)
    async def _failed(_r: Request, exc: WorkerError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 500)

    @app.exception_handler(Stopped)
    async def _timeout(_r: Request, exc: Stopped) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, 504 if exc.timed_out else 503)

    # ------------------------------------------------------------- page, health, models

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        """Liveness, queue occupancy and each model worker's state; needs no token."""
        workers = worker.workers()
        status = "ok" if any(w["status"] == "up" for w in workers) else \
            "starting" if any(w["status"] == "starting" for w in workers) else "down"
        return Health(status=status, **worker.stats(), workers=workers)

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics: queue depth, batch sizes, images, latency per endpoint, refusals by reason; no token."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", response_model=ModelsResponse, tags=["models"])
    async def models() -> ModelsResponse:
        """Registered adapters (the only names requests may use), extractors, schedulers and limits."""
        from t2iadapter.generation.request import defaults
        from t2iadapter.generation.schedulers import scheduler_names

        adapters = [AdapterInfo(name=n, kind=m.kind, channels=getattr(m.config, "in_channels", None))
                    for n, m in pipe.adapters.items()]
        return ModelsResponse(
            base=label, adapters=adapters, fuser=pipe.fuser is not None,
            controlnets=list(getattr(pipe, "controlnets", {})),  # issue 16
            extractors=[describe(n) for n in pool.names], schedulers=scheduler_names(),
            default_size=pipe.default_size, size_multiple=pipe.size_multiple, limits=asdict(limits), defaults=defaults(),
        )

    # ------------------------------------------------------------- extraction

    @app.post("/v1/extract", response_model=ExtractResponse, tags=["extract"],
              openapi_extra=openapi.body("ExtractRequest", multipart=openapi.EXTRACT_MULTIPART))
    async def extract(request: Request) -> ExtractResponse:
        """Image → condition image with a named extractor (JSON with base64, or multipart `image` + `extractor`)."""
        req, data = await read_extract(request)
        extractor = pool.build(req.extractor, req.options)
        image = await run_in_threadpool(open_bounded, data, "image", limits.max_input_side)
        out = await pool.run(extractor, image)
        png = await run_in_threadpool(b64_png, out)
        return ExtractResponse(extractor=req.extractor, png=png, width=out.width, height=out.height,
                               channels=extractor.channels or 3)

    # ------------------------------------------------------------- generation

    async def submit(request: Request) -> Job:
        req, uploads = await read_generate(request)
        gen = await run_in_threadpool(prepare, req, pipe, limits, uploads)
        for use in gen.adapters:
            if use.name in unavailable:
                raise unavailable[use.name]  # 503 before it takes a queue slot or a job id
        big = gen.size[0] * gen.size[1] * req.num_images >= BIG_OUTPUT
        return worker.submit(gen, limits.timeout, key=batch_key(pipe, gen), images=len(gen.prompts) * gen.num_images,
                             big=big)

    @app.post("/v1/generate", response_model=GenerateResponse, tags=["generate"],
              openapi_extra=openapi.body("GenerateRequest", multipart=openapi.GENERATE_MULTIPART),
              responses=openapi.GENERATE_ERRORS)
    async def generate(request: Request) -> GenerateResponse:
        """Generate and wait for the PNGs (each carries its parameters in a `t2iadapter` text chunk)."""
        job = await submit(request)
        try:
            await wait_done(job, job.deadline - time.monotonic())
        except TimeoutError:
            worker.cancel(job, timed_out=True)
            raise job.timeout_error() from None
        except asyncio.CancelledError:  # the client went away: free the model
            worker.cancel(job)
            raise
        if job.error is not None:
            raise job.error
        return job.future.result()

    @app.post("/v1/jobs", response_model=JobOut, status_code=202, tags=["generate"],
              openapi_extra=openapi.body("GenerateRequest", multipart=openapi.GENERATE_MULTIPART),
              responses=openapi.GENERATE_ERRORS)
    async def create_job(request: Request) -> JobOut:
        """Queue a generation and return at once; poll `GET /v1/jobs/{id}` for progress and the result."""
        return job_out(await submit(request))

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["generate"])
    async def get_job(job_id: str) -> JobOut:
        """Status, progress (fraction of steps), queue position, and the result once done."""
        return job_out(find_job(job_id))

    @app.delete("/v1/jobs/{job_id}", response_model=JobOut, tags=["generate"])
    async def cancel_job(job_id: str) -> JobOut:
        """Cancel: a queued job is dropped, a running one stops at its next step."""
        job = find_job(job_id)
        worker.cancel(job)
        return job_out(job)

    def find_job(job_id: str) -> Job:
        job = worker.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
        return job

    def job_out(job: Job) -> JobOut:
        error = job.error
        result = job.future.result() if job.status == "done" else None
        return JobOut(id=job.id, status=job.status, progress=round(job.progress, 4), position=worker.position(job),
                      error=str(error) if error is not None else None, result=result)

    openapi.install(app)
    return app


async def wait_done(job: Job, timeout: float) -> None:
    """Wait (without blocking the event loop) until the job's future is settled; TimeoutError after `timeout` s."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    job.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(done.set))
    await asyncio.wait_for(done.wait(), max(timeout, 0.0))


async def read_generate(request: Request) -> tuple[GenerateRequest, dict[str, bytes]]:
    """JSON body, or multipart: a `request` field with that JSON plus `condition.<name>` files."""
    if not is_multipart(request):
        return validated(GenerateRequest, await json_body(request)), {}
    form = await read_form(request, "send a `request` field (JSON) and `condition.<adapter>` files", 32)
    text = form.get("request")
    if hasattr(text, "read"):  # sent as a file (curl -F request=@body.json)
        text = (await text.read()).decode("utf-8", "replace")
    req = validated(GenerateRequest, str(text or "{}"), "the `request` field")
    uploads = {}
    for key, value in form.multi_items():
        if key.startswith(CONDITION_FIELD) and hasattr(value, "read"):
            name = key[len(CONDITION_FIELD):]
            if name in uploads:  # the last one would win silently
                raise HTTPException(422, f"{key!r} is sent twice; send one file per condition")
            uploads[name] = await value.read()
        elif key != "request":
            raise HTTPException(422, f"unexpected multipart field {key!r}; send `request` and `condition.<adapter>` files")
    return req, uploads


async def read_extract(request: Request) -> tuple[ExtractRequest, bytes]:
    """JSON body with base64 `image`, or multipart: `image` file, `extractor`, optional `options` (JSON)."""
    if not is_multipart(request):
        req = validated(ExtractRequest, await json_body(request))
        return req, b64_bytes(req.image, "image")
    form = await read_form(request, "send an `image` file, an `extractor` field and optional `options` (JSON)", 1, 8)
    upload = form.get("image")
    if not hasattr(upload, "read"):
        raise HTTPException(422, "multipart extract needs an `image` file field")
    unexpected = sorted(set(form) - {"image", "extractor", "options"})
    if unexpected:  # as the JSON body and multipart generate: nothing a client sends is silently dropped
        raise HTTPException(422, f"unexpected multipart field {unexpected[0]!r}; send `image`, `extractor`, `options`")
    fields = {"extractor": form.get("extractor"), "image": "", "options": json_field(form.get("options"), "options")}
    if fields["extractor"] is None:
        del fields["extractor"]  # "extractor is required", not "should be a valid string"
    return validated(ExtractRequest, json.dumps(fields)), await upload.read()


async def read_form(request: Request, hint: str, max_files: int, max_fields: int = 32) -> Any:
    """The multipart form; a body that does not parse (starlette's 400) is a 422 saying what to send."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # 413 from the body limit stays
            raise
        raise HTTPException(422, f"the multipart body cannot be read ({str(exc.detail).rstrip('.')}); {hint}") from None


def is_public(path: str) -> bool:
    """Paths served without the token: health, metrics (counts only), and the page and its files (no data; the API they call is guarded)."""
    return path in ("/health", "/metrics", "/") or path.startswith("/static/")


def is_multipart(request: Request) -> bool:
    return media_type(request) == "multipart/form-data"


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def json_body(request: Request) -> bytes:
    """The body of an `application/json` request; 415 for any other type.

    A page on another site may send text/plain or form bodies without a CORS preflight; JSON sent as
    `application/json` needs one, which this server never grants.
    """
    if media_type(request) != "application/json":
        given = request.headers.get("content-type") or "none"
        raise HTTPException(
            415, f"send the request as Content-Type: application/json (or multipart/form-data), not {given[:80]}"
        )
    return await request.body()


def json_field(text: Any, name: str) -> Any:
    if text is None:
        return {}
    try:
        return json.loads(str(text))
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"field {name!r} is not valid JSON: {exc}") from None


def validated(model: type, body: bytes | str, what: str = "the body") -> Any:
    """Parse a JSON body into `model`; 422 with pydantic's reasons, as one line, when it does not fit."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise HTTPException(422, explain(exc, model, what)) from None
