"""In-flight (continuous) batching: many requests decoded together, one batched decoder call per step.

`Scheduler(grounder, max_batch=8)` takes prepared sequences (`Grounder.start`: image preprocessed, prompt
tokenized, settings resolved; bad input already refused in the caller's thread) through `submit(seq)`, which
returns a `Job` to read `TokenEvent`s from. At each step boundary it
1. drops cancelled jobs (a client that went away frees its row at once);
2. admits waiting sequences while rows are free and the KV memory budget holds: each runs its vision graph
   and its prefill alone (batch 1), emits its first token, and joins the batch cache
   (egm_edge.runtime.batch_cache);
3. runs one decoder call for every active row (`Executor.decode_batch`), each row at its own position with
   its own attention mask, and hands each row its logits: the row's own `Sequence` applies its thinking
   budget, sampling and stop conditions; finished rows leave the cache at once.
A row's tokens depend only on its own logits, so under greedy decoding a batched row emits what the same
request emits alone (up to the float rounding of a longer reduction, tested on the tiny bundles).

Executors without `decode_batch` (TensorRT engines are built for batch 1) run the admitted rows one at a time,
each with its own cache, in turn. `run_until_idle()` drives the loop in the caller's thread (validate, sweep);
`start()` runs it in a daemon thread (the server). Memory: rows x the longest live sequence x
`BatchCache.bytes_per_column()`; `kv_budget_bytes` bounds it (a request that needs more than the whole budget
still runs, alone).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Iterator

import numpy as np

from egm_edge.runtime.batch_cache import BatchCache
from egm_edge.runtime.sequence import Sequence, TokenEvent


class Job:
    """One submitted sequence: its events arrive through a queue, in order, the final one carrying the result."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.cancelled = False
        self._events: queue.SimpleQueue = queue.SimpleQueue()

    def _put(self, item) -> None:
        self._events.put(item)

    def cancel(self) -> None:
        """Stop generating for this job (a no-op once it finished); the scheduler frees its row at the next step."""
        self.cancelled = True

    def events(self, deadline: float | None = None) -> Iterator[TokenEvent]:
        """The job's events as they come; raises the job's error, or TimeoutError past `deadline` (time.monotonic)."""
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError("the request ran past its deadline") from None
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.result is not None:
                return

    def wait(self, deadline: float | None = None):
        """The finished `GroundingResult`."""
        for ev in self.events(deadline):
            if ev.result is not None:
                return ev.result


class Scheduler:
    def __init__(self, grounder, max_batch: int = 8, kv_budget_bytes: int | None = None):
        if max_batch < 1:
            from egm_edge.errors import InputError

            raise InputError(f"max_batch must be at least 1, got {max_batch}.")
        self.g = grounder
        ex = grounder.executor
        self.batched = hasattr(ex, "decode_batch")
        self.max_batch = max_batch
        d = grounder.bundle.decoder
        self.cache = BatchCache(2 * d.num_layers, d.num_kv_heads, d.head_dim, getattr(ex, "cache_dtype", np.float32))
        self.kv_budget_bytes = kv_budget_bytes
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []  # row order of the batch cache (batched), or turn order (one at a time)
        self._caches: dict[int, object] = {}  # id(job) -> its own cache, when decoding one row at a time
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = self._paused = False
        # steps: batched decoder calls; rows_decoded: tokens they produced; *_s: seconds inside the graphs
        self.stats = {"steps": 0, "rows_decoded": 0, "peak_batch": 0, "peak_kv_bytes": 0, "admitted": 0,
                      "prefill_s": 0.0, "decode_s": 0.0}

    # -- submitting ---------------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Job:
        job = Job(seq)
        with self._cv:
            self.waiting.append(job)
            self._cv.notify_all()
        return job

    @property
    def load(self) -> tuple[int, int]:
        """(active rows, waiting sequences)."""
        return len(self.active), len(self.waiting)

    # -- driving ------------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Run the loop in a daemon thread until `close()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="egm-edge-scheduler", daemon=True)
            self._thread.start()
        return self

    def pause(self) -> None:
        """Hold the loop at the next step boundary (jobs keep queueing) until `resume()`."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _serve(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or (not self._paused and (self.waiting or self.active)))
                if self._stop:
                    return
            self.step()

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def step(self) -> bool:
        """One step boundary: drop cancelled jobs, admit, decode once; returns whether work remains."""
        try:
            self._drop_cancelled()
            self._admit()
            if self.active:
                (self._decode_batched if self.batched else self._decode_one)()
        except Exception as e:  # a failure of the step (not of one request's input): every live job gets it
            self._fail_all(e)
        with self._cv:
            return bool(self.waiting or self.active)

    # -- internals ----------------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self._cv:
            self.waiting = deque(j for j in self.waiting if not j.cancelled)
        for job in [j for j in self.active if j.cancelled]:
            self._leave(job)

    def _fits(self, seq: Sequence) -> bool:
        if not self.active:
            return True  # alone it always runs, whatever it needs
        if len(self.active) >= self.max_batch:
            return False
        if self.kv_budget_bytes is None:
            return True
        cols = max(self.cache.P, seq.n_prompt) + max([seq.room] + [j.seq.room - len(j.seq.out_ids) for j in self.active])
        return (len(self.active) + 1) * cols * self.cache.bytes_per_column() <= self.kv_budget_bytes

    def _admit(self) -> None:
        while True:
            with self._cv:
                if not self.waiting or not self._fits(self.waiting[0].seq):
                    return
                job = self.waiting.popleft()
            seq = job.seq
            seq.marks["queued_until"] = t0 = time.perf_counter()
            try:
                logits, cache = self.g.prefill(seq, self.g.executor.new_cache(seq.capacity if not self.batched else seq.n_prompt))
            except Exception as e:
                job._put(e)
                continue
            self.stats["prefill_s"] += time.perf_counter() - t0
            self.stats["admitted"] += 1
            if self._emit(job, logits):
                continue  # finished on its first token
            self.active.append(job)
            if self.batched:
                self.cache.add(_rows(cache, seq.n_prompt))
                self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], self.cache.nbytes())
            else:
                self._caches[id(job)] = cache

    def _emit(self, job: Job, logits: np.ndarray) -> bool:
        """Hand `job` its logits; returns True when it finished (its final event sent)."""
        seq = job.seq
        ev = seq.step(logits)
        if ev is not None:
            job._put(ev)
        if seq.done:
            seq.marks["end"] = time.perf_counter()
            job._put(seq.finish())
            return True
        return False

    def _leave(self, job: Job) -> None:
        i = self.active.index(job)
        if self.batched:
            self.cache.remove(i)
            last = self.active.pop()  # the cache moved the last row into row i
            if last is not job:
                self.active[i] = last
        else:
            self.active.pop(i)
            self._caches.pop(id(job), None)

    def _counted(self, rows: int, seconds: float) -> None:
        """Account one decoder call of `rows` rows."""
        st = self.stats
        st["decode_s"] += seconds
        st["steps"] += 1
        st["rows_decoded"] += rows
        st["peak_batch"] = max(st["peak_batch"], rows)

    def _decode_batched(self) -> None:
        jobs = list(self.active)
        b = len(jobs)
        feeds = self.g.decode_feeds([j.seq for j in jobs], self.cache.prepare_step())
        t0 = time.perf_counter()
        logits = self.g.executor.decode_batch(feeds, self.cache.arrays, self.cache.P)
        self._counted(b, time.perf_counter() - t0)
        self.cache.advance()
        self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], self.cache.nbytes())
        finished = []
        for k, job in enumerate(jobs):
            job.seq.fed(batch=b)
            if self._emit(job, logits[k, -1]):
                finished.append(job)
        for job in finished:
            self._leave(job)

    def _decode_one(self) -> None:
        """Executors without batched decode: the oldest active row takes one step (rows take turns)."""
        job = self.active.pop(0)
        seq = job.seq
        t0 = time.perf_counter()
        out, self._caches[id(job)] = self.g.executor.decode(self.g.decode_feeds([seq]), self._caches[id(job)])
        self._counted(1, time.perf_counter() - t0)
        seq.fed(batch=1)
        if self._emit(job, out[0, -1]):
            self._caches.pop(id(job), None)
        else:
            self.active.append(job)

    def _fail_all(self, e: Exception) -> None:
        for job in self.active:
            job._put(e)
        self.active, self._caches = [], {}
        self.cache.clear()


def default_kv_budget(share: float = 0.25) -> int | None:
    """A share of the memory available now (None where it cannot be read: no limit but max_batch)."""
    from egm_edge.artifacts import available_host_memory

    free = available_host_memory()
    return None if free is None else int(free * share)


def _rows(cache, n: int) -> list[np.ndarray]:
    """A one-sequence cache's first n rows per past tensor, [kv, n, head_dim] each: the in-place buffers or the
    present tensors of a growing cache."""
    arrays = getattr(cache, "arrays", cache)
    return [a[0, :, :n] for a in arrays]


def ground_many(grounder, requests, max_batch: int = 8, kv_budget_bytes: int | None = None):
    """Ground `requests` (dicts of Grounder.start keywords: image, text, settings, ...) in batches, in the
    caller's thread; yields (index, GroundingResult or the request's EgmError) in completion order. At most
    2 x max_batch requests are prepared (images preprocessed) ahead of the batch."""
    from egm_edge.errors import EgmError

    sched = Scheduler(grounder, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes)
    pending = list(enumerate(requests))[::-1]
    live: dict[int, Job] = {}
    while pending or live:
        while pending and len(live) < 2 * max_batch:
            i, req = pending.pop()
            try:
                live[i] = sched.submit(grounder.start(**req))
            except EgmError as e:
                yield i, e
        sched.step()
        for i, job in list(live.items()):
            item = _finished(job)
            if item is not None:
                del live[i]
                yield i, item


def _finished(job: Job):
    """The job's result or error if it has ended (events drained without blocking), else None."""
    while True:
        try:
            item = job._events.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            return item
        if item.result is not None:
            return item.result
