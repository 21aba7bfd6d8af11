"""A bounded queue in front of the model and the one worker thread that runs it (one generation at a time).

Jobs carry their own deadline: the worker drops a job whose deadline passed while it waited and
stops a running one at the next denoising step, so a timed-out request frees the model.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from t2iadapter.errors import T2IAdapterError

log = logging.getLogger(__name__)

# The work a job does: called on the worker thread with a `progress(done, total)` callback that
# raises `Stopped` when the job was cancelled or ran past its deadline.
Work = Callable[[Callable[[int, int], None]], Any]


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


@dataclass(eq=False)
class Job:
    """One queued call of the model, with its progress and outcome."""

    work: Work
    deadline: float  # time.monotonic() after which the job is stopped
    timeout: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    done_steps: int = 0
    total_steps: int = 0
    stop: Stopped | None = None  # set when the job is asked to stop
    big: bool = False  # hand its memory back to the OS when it ends (see `release_memory`)

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


class ModelWorker:
    """Runs jobs one at a time on a daemon thread; at most `queue_size` jobs wait behind the running one."""

    def __init__(self, queue_size: int, keep: int = 64) -> None:
        self.queue_size = queue_size
        self._pending: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # every job not yet evicted, oldest first
        self._keep = keep  # finished jobs kept for GET /v1/jobs/{id}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running: Job | None = None
        self._stopping = False
        self._durations: collections.deque[float] = collections.deque(maxlen=20)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="t2iadapter-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel waiting jobs, stop the running one at its next step, join the thread."""
        with self._cond:
            self._stopping = True
            for job in list(self._pending) + ([self._running] if self._running else []):
                self._cancel(job, Stopped("the server is shutting down", timed_out=False))
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    # ---------------------------------------------------------------- clients

    def submit(self, work: Work, timeout: float, *, big: bool = False) -> Job:
        """Queue `work` (`big`: release memory after it); raises QueueFull (→ 429) or WorkerStopped (→ 503)."""
        with self._cond:
            if self._thread is None or self._stopping:
                raise WorkerStopped("the model worker is not running")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(self.retry_after())
            job = Job(work=work, deadline=time.monotonic() + timeout, timeout=timeout, big=big)
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
            return {"waiting": len(self._pending), "running": int(self._running is not None), "capacity": self.queue_size}

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean recent job time (at least 1 s)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean))

    # ---------------------------------------------------------------- the thread

    def _evict(self) -> None:
        finished = [j for j in self._jobs.values() if j.future.done()]
        for job in finished[: max(0, len(finished) - self._keep)]:
            del self._jobs[job.id]

    def _next(self) -> Job | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._pending.popleft()
            self._running = job
            return job

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # cancelled while it waited
        job.started = time.monotonic()

        def progress(done: int, total: int) -> None:
            job.done_steps, job.total_steps = done, total
            job.check()

        try:
            job.check()
            result = job.work(progress)
        except Exception as exc:  # every outcome goes to the waiting client, which maps it to a status
            if not isinstance(exc, Stopped):
                log.info("job %s failed: %s", job.id, exc, exc_info=not isinstance(exc, T2IAdapterError))
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        finally:
            job.finished = time.monotonic()
            with self._cond:
                self._durations.append(job.finished - job.started)
            if job.big:
                release_memory()


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
