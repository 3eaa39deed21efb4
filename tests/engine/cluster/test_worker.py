"""What a worker receives: a job carries the caller's settings (job scope) to the workers, which compute under
them whatever their own environment says; per-process settings stay the worker's own."""

from __future__ import annotations

from engine import settings
from engine.cluster.worker import TRIM_EVERY, Job, make_job, running
from engine.scan import Problem
from explaind_store import open_run


def _settings_in_task(job: Job) -> tuple[int, bool, int]:
    with running(job):
        return settings.get("keep_u_bytes"), settings.get("pipeline"), settings.get("worker_threads")


def test_job_carries_the_callers_settings_to_workers(cluster, digits_store):
    run = open_run(digits_store)
    x, y = run.split("val")
    problem = Problem(x[:1], y[:1], window=(0, 2))
    with settings.override(keep_u_bytes=123, pipeline=False):
        job = make_job(run, problem, by_reference=False)
    assert job.settings["keep_u_bytes"] == 123 and "worker_threads" not in job.settings
    got = cluster.submit(_settings_in_task, job, pure=False).result()
    assert got == (123, False, 1)
    # outside a job's task the worker reads its own environment (here: the defaults)
    default = settings.TABLE["keep_u_bytes"].default
    assert cluster.submit(settings.get, "keep_u_bytes", pure=False).result() == default


def _rss_freed_by_a_task(job: Job) -> tuple[int, int]:
    """In a worker: fragment the heap the way a chunk task does (temporaries freed, a few small results kept
    between them), then run ``TRIM_EVERY`` (empty) engine tasks; the resident MiB before and after them."""
    import numpy as np
    import psutil

    proc = psutil.Process()
    blocks = [np.ones(8192) for _ in range(4000)]  # 64 KiB each, below malloc's mmap threshold: in the heap
    keep = blocks[::16]  # outlive the task's temporaries and pin the heap's top
    del blocks
    before = proc.memory_info().rss >> 20
    for _ in range(TRIM_EVERY):
        with running(job):
            pass
    after = proc.memory_info().rss >> 20
    del keep
    return before, after


def test_a_worker_hands_freed_heap_pages_back_after_each_task(cluster, digits_store):
    """Issue 14: a worker's resident memory grew with the number of tasks it ran (freed heap pages kept by malloc
    while the memory in use stayed flat); every ``TRIM_EVERY`` engine tasks a worker now calls ``malloc_trim``."""
    import ctypes.util

    import pytest

    if not ctypes.util.find_library("c") or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim"):
        pytest.skip("malloc_trim is glibc's: nothing to hand back elsewhere")
    run = open_run(digits_store)
    x, y = run.split("val")
    job = make_job(run, Problem(x[:1], y[:1], window=(0, 2)), by_reference=False)
    before, after = cluster.submit(_rss_freed_by_a_task, job, pure=False).result()
    assert before - after >= 100, f"RSS {before} MiB -> {after} MiB: the ~230 MiB freed stayed resident"
