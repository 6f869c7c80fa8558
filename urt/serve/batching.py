"""The worker that turns queued requests into batched `urt.generation.generate` calls.

One worker thread groups queued requests with the same sampling parameters into one `generate()` call of
up to `max_batch_size` prompts, waiting at most `batch_wait_s` after the oldest request for companions. A
failing batch is retried one request at a time so only the culprit gets the error and the others their
answers. Each completion is a `urt.generation.Completion`: its `ids` (stop token included) and
`finish_reason` give the response's `usage.completion_tokens` and `finish_reason`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from urt.errors import UrtError
from urt.serve.errors import RequestError
from urt.serve.request import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Job:
    encoded: Any
    params: SamplingParams
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    completions: list | None = None  # `Completion`s, `params.n` of them
    error: BaseException | None = None
    deadline: float | None = None  # time.monotonic() past which its generation is stopped (504)
    timeout_s: float | None = None
    cancelled: str | None = None  # why its client no longer wants it (e.g. it disconnected)

    def cancel(self, why: str) -> None:
        """Stop this job's work: skipped while queued, its rows ended at the next decoding step if running."""
        self.cancelled = why

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        return self.cancelled is not None or self.expired()

    def stopped_error(self) -> RequestError:
        if self.cancelled is not None:
            return RequestError(f"cancelled: {self.cancelled}", status=499, code="cancelled")
        return RequestError(f"the request ran past this server's time limit of {self.timeout_s:g} s per request "
                            f"(--max-request-seconds); its generation was stopped", status=504, type="server_error",
                            code="timeout")


class QueueWorker:
    """A queue and one worker thread that runs batches of queued jobs sharing a key (`batch_key`): the
    oldest job plus those queued with its key, up to `max_batch`, waiting at most `batch_wait_s` after the
    oldest arrived for companions. A failing batch is retried one job at a time, so only the culprit gets the
    error. A job has `enqueued`, `done` (set once it has its result or `error`) and `error`. Subclasses give
    `batch_key`, `process` (run a batch) and the thread's name; `submit` is theirs (it builds the job)."""

    thread_name = "urt-serve-worker"
    queued_what = "requests"

    def __init__(self, *, max_batch: int, batch_wait_s: float, max_queue: int):
        self.max_batch = int(max_batch)
        self.batch_wait_s = float(batch_wait_s)
        self.max_queue = int(max_queue)
        self._cond = threading.Condition()
        self._pending: deque = deque()
        self._running = False
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._batch_sizes: deque[int] = deque(maxlen=100_000)  # the most recent ones
        self._batches = 0

    def batch_key(self, job):
        raise NotImplementedError

    def process(self, batch: list) -> None:
        """Run one batch, leaving each job's result on it; raise to have the batch retried job by job."""
        raise NotImplementedError

    def failure(self, err: BaseException) -> BaseException:
        """The error a job that failed on its own is answered with."""
        return err

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._worker, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker (after the batch it is running) and fail the jobs still queued with a 503."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            left = list(self._pending)
            self._pending.clear()
        for job in left:
            job.error = RequestError("the server is shutting down", status=503, type="server_error")
            job.done.set()

    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def stats(self) -> dict:
        with self._stats_lock:
            sizes = list(self._batch_sizes)
            batches = self._batches
        return {"batches": batches, "batch_sizes": sizes, "max_batch_size_seen": max(sizes, default=0),
                "mean_batch_size": (sum(sizes) / len(sizes)) if sizes else 0.0, "queued": self.queued()}

    def _enqueue(self, job):
        with self._cond:
            if not self._running:
                raise RequestError("the server is shutting down", status=503, type="server_error")
            if len(self._pending) >= self.max_queue:
                raise RequestError(f"the server is overloaded ({self.max_queue} {self.queued_what} queued); retry "
                                   f"later", status=503, type="server_error", code="overloaded")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    # ------------------------------------------------------------------------------ worker

    def _take_batch(self) -> list | None:
        """Block until a batch is ready (see the class docstring). None when stopping."""
        with self._cond:
            while not self._pending and self._running:
                self._cond.wait(0.5)
            if not self._running:
                return None
            key = self.batch_key(self._pending[0])
            deadline = self._pending[0].enqueued + self.batch_wait_s
            while self._running:
                same = sum(1 for j in self._pending if self.batch_key(j) == key)
                left = deadline - time.monotonic()
                if same >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            if not self._running:
                return None
            batch: list = []
            rest: deque = deque()
            for j in self._pending:
                (batch if len(batch) < self.max_batch and self.batch_key(j) == key else rest).append(j)
            self._pending = rest
            return batch

    def _worker(self) -> None:
        while True:
            try:
                batch = self._take_batch()
            except Exception:  # noqa: BLE001 - never let the worker die
                log.exception("urt serve: %s: batching failed", self.thread_name)
                continue
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list) -> None:
        if not batch:
            return
        try:
            self.process(batch)
            with self._stats_lock:
                self._batch_sizes.append(len(batch))
                self._batches += 1
        except Exception as err:  # noqa: BLE001 - a failure answers the requests, not the process
            if len(batch) > 1:  # find the culprit: the others still get their answers
                for job in batch:
                    self._run([job])
                return
            err = self.failure(err)
            log.warning("urt serve: %s: %s: %s", self.thread_name, type(err).__name__, err)
            batch[0].error = err
        for job in batch:
            job.done.set()


class Batcher(QueueWorker):
    """Chat requests into `generate_fn` calls (default `urt.generation.generate`): jobs with the same
    sampling parameters share a call. `submit()` queues a job (503 when stopping or `max_queue` jobs wait);
    the job's `done` event is set once it has its completions or its error."""

    def __init__(self, bundle, *, max_batch_size: int = 8, batch_wait_s: float = 0.01, max_queue: int = 1024,
                 seed: int | None = None, generate_fn: Callable | None = None):
        super().__init__(max_batch=max_batch_size, batch_wait_s=batch_wait_s, max_queue=max_queue)
        self.bundle = bundle
        self.seed = seed
        self._generate_fn = generate_fn

    def submit(self, encoded, params: SamplingParams, timeout_s: float | None = None) -> Job:
        job = Job(encoded=encoded, params=params)
        if timeout_s is not None:
            job.timeout_s = float(timeout_s)
            job.deadline = job.enqueued + float(timeout_s)
        return self._enqueue(job)

    def batch_key(self, job: Job):
        return job.params.group_key()

    def _run(self, batch: list[Job]) -> None:
        gone = [j for j in batch if j.should_stop()]  # cancelled or out of time while queued: not run at all
        for job in gone:
            job.error = job.stopped_error()
            job.done.set()
        super()._run([j for j in batch if j not in gone])

    def process(self, batch: list[Job]) -> None:
        self._generate(batch)

    def _generate(self, batch: list[Job]) -> None:
        from urt.generation import Completion, GenerationConfig

        gen = self._generate_fn
        if gen is None:
            from urt.generation import generate as gen
        p = batch[0].params
        if p.seed is not None:
            seed = p.seed
        elif p.temperature == 0 or self.seed is not None:
            seed = self.seed or 0  # greedy ignores it; a server-wide seed makes sampling reproducible
        else:
            seed = secrets.randbelow(2 ** 31)  # unseeded sampling: a fresh draw per batch
        cfg = GenerationConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                               num_return_sequences=p.n, batch_size=len(batch), seed=int(seed) % (2 ** 63))
        kwargs = {}
        if _takes_stop_rows(gen):
            kwargs["stop_rows"] = lambda idx: [batch[i].should_stop() for i in idx]
        results = gen(self.bundle, [j.encoded for j in batch], cfg, **kwargs)
        if not isinstance(results, list) or len(results) != len(batch):
            raise UrtError(f"generate() returned {type(results).__name__} of length "
                           f"{len(results) if hasattr(results, '__len__') else '?'} for {len(batch)} prompts")
        for job, completions in zip(batch, results):
            if (not isinstance(completions, list) or len(completions) != p.n
                    or not all(isinstance(c, Completion) for c in completions)):
                raise UrtError(f"generate() returned {completions!r} for one prompt; expected {p.n} Completions")
            cut = any(c.finish_reason == "length" and len(c.ids) < p.max_tokens for c in completions)
            if cut and job.should_stop():  # stopped part-way: its client gets the reason, not a cut-off text
                job.error = job.stopped_error()
            else:
                job.completions = completions


def _takes_stop_rows(fn) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "stop_rows" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
