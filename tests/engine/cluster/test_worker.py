"""What a worker receives: a job carries the caller's settings (job scope) to the workers, which compute under
them whatever their own environment says; per-process settings stay the worker's own."""

from __future__ import annotations

from engine import settings
from engine.cluster.worker import Job, make_job, running
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
