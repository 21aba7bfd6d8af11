"""A bounded queue in front of the model and the worker threads that run it: one per device, each
taking a batch of compatible jobs at a time (dynamic batching).

Jobs carry their own deadline: a worker drops a job whose deadline passed while it waited and stops
a running one at the next denoising step, so a timed-out request frees the model. Inside a batch a
stopped job gets its answer at once; the batch stops when all of its jobs have.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from t2iadapter.errors import T2IAdapterError, out_of_memory

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # progress(done, total); raises `Stopped` when every job of the batch stopped
# What a worker runs: a batch of jobs (same `key`) → one result per job, in order. Raising fails the batch.
Runner = Callable[[list["Job"], Progress], list[Any]]


class QueueFull(Exception):
    """The queue holds `queue_size` waiting jobs; `retry_after` is a guess in whole seconds."""

    def __init__(self, retry_after: int, what: str = "generation") -> None:
        super().__init__(f"the {what} queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Stopped(Exception):
    """A job was cancelled or timed out; `reason` says which, for the client."""

    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


class WorkerStopped(Exception):
    """The worker is not running (the server is starting or shutting down)."""


class WorkerError(Exception):
    """A model worker failed on a job for a reason that is not the client's (→ 500 with this message)."""


@dataclass(eq=False)
class Job:
    """One queued request of the model (`payload`, e.g. a GenerationRequest), with its progress and outcome."""

    payload: Any
    deadline: float  # time.monotonic() after which the job is stopped
    timeout: float
    key: Hashable | None = None  # jobs with equal keys may run as one batch; None: always alone
    images: int = 1  # what the job adds to a batch (its count against `max_batch`)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    done_steps: int = 0
    total_steps: int = 0
    stop: Stopped | None = None  # set when the job is asked to stop
    big: bool = False  # hand its memory back to the OS when it ends (see `release_memory`)
    worker: str | None = None  # the worker that ran it

    @property
    def status(self) -> str:
        """queued, running, done, failed, cancelled or timeout."""
        if not self.future.done():
            return "running" if self.started is not None else "queued"
        exc = self.stop if self.future.cancelled() else self.future.exception()
        if exc is None:
            return "done"
        if isinstance(exc, Stopped):
            return "timeout" if exc.timed_out else "cancelled"
        return "failed"

    @property
    def error(self) -> BaseException | None:
        if not self.future.done():
            return None
        return self.stop if self.future.cancelled() else self.future.exception()

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        return self.done_steps / self.total_steps if self.total_steps else 0.0

    def timeout_error(self) -> Stopped:
        return Stopped(f"the request did not finish within the {self.timeout:g} s timeout", timed_out=True)

    def check(self) -> None:
        """Raise `Stopped` if the job should stop now (called between denoising steps)."""
        if self.stop is not None:
            raise self.stop
        if time.monotonic() > self.deadline:
            raise self.timeout_error()


@dataclass
class Lane:
    """One model worker: a device, the runner that owns its model, and an optional start-up warm-up."""

    name: str  # e.g. "cuda:0" (unique: "cpu", "cpu#1" for two on one device)
    runner: Runner
    warmup: Callable[[], None] | None = None  # runs on the worker thread before it takes jobs (compiling)
    status: str = "starting"  # starting, up, failed (warm-up raised), stopped
    jobs: int = 0  # jobs finished
    failures: int = 0  # batches that raised (not the client's fault)
    thread: threading.Thread | None = None


class ModelWorker:
    """Worker threads (one per `Lane`) behind one bounded queue; each takes up to `max_batch` images of jobs with
    the same key at a time, waiting up to `batch_wait` seconds for company. At most `queue_size` jobs wait.
    """

    def __init__(self, queue_size: int, lanes: list[Lane] | Runner, *, max_batch: int = 1, batch_wait: float = 0.0,
                 keep: int = 64, observer: Any = None) -> None:
        self.queue_size = queue_size
        self.lanes = [Lane("worker", lanes)] if callable(lanes) else list(lanes)
        self.max_batch, self.batch_wait = max(1, max_batch), max(0.0, batch_wait)
        self.observer = observer  # metrics: .batch(jobs, images), .finished(job) (see server/metrics.py)
        self._pending: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # every job not yet evicted, oldest first
        self._keep = keep  # finished jobs kept for GET /v1/jobs/{id}
        self._cond = threading.Condition()
        self._running: set[Job] = set()
        self._started = False
        self._stopping = False
        self._durations: collections.deque[float] = collections.deque(maxlen=20)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        with self._cond:
            if self._started:
                return
            self._started, self._stopping = True, False
            for lane in self.lanes:
                lane.status = "starting"
                lane.thread = threading.Thread(target=self._loop, args=(lane,), name=f"t2iadapter-{lane.name}", daemon=True)
                lane.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel waiting jobs, stop the running ones at their next step, join the threads."""
        with self._cond:
            self._stopping = True
            for job in list(self._pending) + list(self._running):
                self._cancel(job, Stopped("the server is shutting down", timed_out=False))
            self._cond.notify_all()
            threads = [lane.thread for lane in self.lanes if lane.thread is not None]
            self._started = False
        end = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
        for lane in self.lanes:
            lane.status, lane.thread = "stopped", None

    # ---------------------------------------------------------------- clients

    def submit(self, payload: Any, timeout: float, *, key: Hashable | None = None, images: int = 1,
               big: bool = False) -> Job:
        """Queue `payload` (`key`: batchable with equal keys; `big`: release memory after it); raises QueueFull
        (→ 429) or WorkerStopped (→ 503)."""
        with self._cond:
            if not self._started or self._stopping:
                raise WorkerStopped("the model worker is not running")
            if not any(lane.status in ("starting", "up") for lane in self.lanes):
                raise WorkerStopped("no model worker is up (see GET /health)")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(self.retry_after())
            job = Job(payload, deadline=time.monotonic() + timeout, timeout=timeout, key=key, images=images, big=big)
            self._pending.append(job)
            self._jobs[job.id] = job
            self._evict()
            self._cond.notify_all()
        log.debug("queued job %s (%d waiting)", job.id, len(self._pending))
        return job

    def cancel(self, job: Job, *, timed_out: bool = False) -> None:
        """Stop a job: drop it from the queue if it waits, else stop it at its next step."""
        stop = job.timeout_error() if timed_out else Stopped("the job was cancelled", timed_out=False)
        with self._cond:
            self._cancel(job, stop)

    def _cancel(self, job: Job, stop: Stopped) -> None:
        if job.future.done():
            return
        job.stop = stop
        if job in self._pending:
            self._pending.remove(job)
            job.future.cancel()
            if self.observer is not None:  # it never reaches a worker: counted here (cancelled or timeout)
                self.observer.finished(job)

    def _fail_waiting(self, exc: WorkerStopped) -> None:
        """Answer every waiting job with `exc` (no worker is left to take them: they would wait forever)."""
        while self._pending:
            job = self._pending.popleft()
            job.future.set_exception(exc)
            if self.observer is not None:
                self.observer.finished(job)

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0 when running or finished, else 1 + the number of jobs ahead of it."""
        with self._cond:
            try:
                return self._pending.index(job) + 1
            except ValueError:
                return 0

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._pending), "running": len(self._running), "capacity": self.queue_size}

    def workers(self) -> list[dict[str, Any]]:
        """Each worker's name, status (starting, up, failed, stopped), finished jobs and failed batches."""
        return [{"name": lane.name, "status": lane.status, "jobs": lane.jobs, "failures": lane.failures}
                for lane in self.lanes]

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean recent batch time over the workers up (at least 1 s)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean / max(1, sum(lane.status == "up" for lane in self.lanes))))

    # ---------------------------------------------------------------- the threads

    def _evict(self) -> None:
        finished = [j for j in self._jobs.values() if j.future.done()]
        for job in finished[: max(0, len(finished) - self._keep)]:
            del self._jobs[job.id]

    def _take(self, batch: list[Job]) -> None:
        """Move pending jobs with the batch's key into it, oldest first, while they fit in `max_batch` images."""
        room = self.max_batch - sum(j.images for j in batch)
        for job in list(self._pending):
            if room <= 0:
                break
            if job.key == batch[0].key and job.images <= room:
                self._pending.remove(job)
                batch.append(job)
                room -= job.images

    def _next(self) -> list[Job] | None:
        """The next batch: the oldest job plus compatible ones, waiting up to `batch_wait` s for more."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch = [self._pending.popleft()]
            if batch[0].key is not None and self.max_batch > 1:
                end = time.monotonic() + self.batch_wait
                self._take(batch)
                while sum(j.images for j in batch) < self.max_batch and not self._stopping:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, threading.TIMEOUT_MAX))  # a longer wait raises OverflowError
                    self._take(batch)
            if self._stopping:  # stop() came while this batch gathered: it never reached _running
                for job in batch:
                    self._cancel(job, Stopped("the server is shutting down", timed_out=False))
                    job.future.cancel()
                return None
            self._running.update(batch)
            return batch

    def _loop(self, lane: Lane) -> None:
        if lane.warmup is not None:
            try:
                started = time.monotonic()
                lane.warmup()
                log.info("worker %s warmed up in %.1f s", lane.name, time.monotonic() - started)
            except Exception:
                log.exception("worker %s failed to warm up; it takes no jobs", lane.name)
                with self._cond:
                    lane.status = "failed"
                    if not any(other.status in ("starting", "up") for other in self.lanes):
                        self._fail_waiting(WorkerStopped("no model worker is up: every worker failed to warm up "
                                                         "(the server log says why)"))
                return
        lane.status = "up"
        try:
            while (batch := self._next()) is not None:
                try:
                    self._run(lane, batch)
                except Exception as exc:  # around the batch (metrics, memory release): the worker must go on
                    lane.failures += 1
                    log.error("worker %s failed around a batch; it goes on", lane.name, exc_info=exc)
                    for job in batch:
                        settle(job, exc=WorkerError(f"the model worker {lane.name} failed around this request: "
                                                    f"{type(exc).__name__}: {exc}"))
                finally:
                    with self._cond:
                        self._running.difference_update(batch)
        finally:
            with self._cond:  # a thread that ends for any reason but stop() is no worker: /health and the queue know
                if not self._stopping and lane.status == "up":
                    lane.status = "failed"
                    log.error("worker %s stopped", lane.name)
                    if not any(other.status in ("starting", "up") for other in self.lanes):
                        self._fail_waiting(WorkerStopped("no model worker is up: the last one stopped (the server "
                                                         "log says why)"))

    def _run(self, lane: Lane, batch: list[Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # drop those cancelled meanwhile
        if not live:
            return
        started = time.monotonic()
        for job in live:
            job.started, job.worker = started, lane.name
        if self.observer is not None:
            self.observer.batch(len(live), sum(j.images for j in live))
        try:
            self._attempt(lane, live)
        finally:
            now = time.monotonic()
            with self._cond:
                self._durations.append(now - started)
            for job in live:
                job.finished = now
                lane.jobs += 1
                if self.observer is not None:
                    self.observer.finished(job)
            if any(job.big for job in live):
                release_memory()

    def _attempt(self, lane: Lane, jobs: list[Job]) -> None:
        """Run a batch and settle every job; when a batch of several fails, each job is retried alone, so one
        bad request fails only itself."""
        def progress(done: int, total: int) -> None:
            alive = False
            for job in jobs:
                job.done_steps, job.total_steps = done, total
                try:
                    job.check()
                    alive = True
                except Stopped as exc:
                    settle(job, exc=exc)
            if not alive:
                raise jobs[0].stop or jobs[0].timeout_error()

        try:
            progress(0, jobs[0].total_steps or 1)
            results = lane.runner(jobs, progress)
        except Stopped:
            for job in jobs:
                settle(job, exc=job.stop or job.timeout_error())
        except Exception as exc:  # every outcome goes to the waiting client, which maps it to a status
            if len(jobs) > 1:  # a bad request (or a bad moment of the worker) fails only itself
                log.warning("a batch of %d failed on %s (%s); running its jobs one by one", len(jobs), lane.name, exc)
                for job in jobs:
                    if not job.future.done():
                        self._attempt(lane, [job])
                return
            if isinstance(exc, T2IAdapterError):
                log.info("job %s failed: %s", jobs[0].id, exc)
            else:
                lane.failures += 1
                log.error("worker %s failed on job %s", lane.name, jobs[0].id, exc_info=exc)
                memory = out_of_memory(exc)
                exc = WorkerError(f"the model worker {lane.name} ran out of {memory} memory on this request: ask for "
                                  "fewer images or a smaller size" if memory else
                                  f"the model worker {lane.name} failed on this request: {type(exc).__name__}: {exc}")
            for job in jobs:
                settle(job, exc=exc)
        else:
            for job, result in zip(jobs, results):
                settle(job, result)


def settle(job: Job, result: Any = None, *, exc: BaseException | None = None) -> None:
    """Give a running job its outcome (once; a job stopped mid-batch already has it)."""
    if job.future.done():
        return
    if exc is not None:
        job.future.set_exception(exc)
    else:
        job.future.set_result(result)


def release_memory() -> None:
    """Hand memory freed by a big job back to the OS: collect cycles, empty the CUDA cache, trim glibc's heap.

    Without it a 1024² x 4 generation left the server's RSS at twice its size for good: glibc keeps
    freed blocks in its arenas. A full collection costs ~0.3 s with torch and diffusers loaded.
    """
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass
