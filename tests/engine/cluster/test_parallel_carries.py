"""The parallel-chunks schedule's carries are two chains of small tasks (issue 14: worker memory flat in the number
of updates): no task takes more than one chunk's summary, the parameter-sized totals and carries go through the
Zarr scratch store bit for bit, the results held between tasks do not grow with the number of chunks, and the
scores are the reverse chain's."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch
from dask.callbacks import Callback
from tests.support.compare import assert_results_close

from engine import plan
from engine.cluster import graph as engine_graph
from engine.cluster.worker import make_job
from engine.scan import Context, Problem, result_meta
from engine.scan.problem import context
from explaind_store import open_run

# task results that hold pass-1 totals or carries between tasks (today's keys and the old one-task ``carries``)
_CARRY_KEY = re.compile(r"^explaind-(pass1|summary|afold|ufold|aspilled|uspilled|carries|carry|startstate)-")


def _tensor_bytes(value: object) -> int:
    """Bytes of every torch tensor inside ``value`` (dicts, lists, tuples, dataclasses)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def _compute(lazy):
    """``lazy`` computed by the synchronous scheduler, and the most carry bytes its cache held at once."""
    peak = [0]

    def post(key, result, dsk, state, worker_id):
        held = sum(_tensor_bytes(v) for k, v in state["cache"].items() if _CARRY_KEY.match(str(k)))
        peak[0] = max(peak[0], held)

    with Callback(posttask=post):
        out = lazy.compute(scheduler="sync")
    return out, peak[0]


def test_parallel_carries_are_chains_with_flat_memory_and_exact_spill(digits_store, tmp_path):
    run = open_run(digits_store)
    x, y = run.split("val")
    problem = Problem(x[:2], y[:2], by=frozenset({"step", "tensor"}), window=(0, 12))
    meta = result_meta(run, problem, Context(run, problem))
    ctx = context(run, problem)
    vector = (ctx.R + 2) * ctx.n_params * 8  # one chunk's totals: U (R x P) and two momentum parts (P each)

    def lazy(n_chunks, scratch, chain=False):
        bounds = plan.chunk_bounds((0, 12), 12 // n_chunks)
        job = make_job(run, problem, by_reference=True)
        return job, engine_graph.lazy_result(job, meta, bounds, keep_u=False, chain=chain, scratch=scratch)

    job, many = lazy(12, tmp_path / "s12")
    for key, task in dict(many.__dask_graph__()).items():
        deps = [d for d in getattr(task, "dependencies", ()) if str(d).startswith("explaind-summary-")]
        assert len(deps) <= 1, f"{key} takes {len(deps)} chunks' summaries"
    got, peak_many = _compute(many)
    _, peak_few = _compute(lazy(4, tmp_path / "s4")[1])
    # whatever the number of chunks, the results waiting between tasks hold a few chunks' vectors, not all twelve
    assert peak_many <= 3 * vector and peak_few <= 3 * vector, (peak_many, peak_few, vector)
    # the forward and reverse carries went through the scratch store (chunk c's incoming U and momentum)
    spilled = tmp_path / "s12" / job.token
    assert sorted(int(p.name) for p in (spilled / "carry-u").iterdir()) == list(range(11))
    assert sorted(int(p.name) for p in (spilled / "carry-data").iterdir()) == list(range(1, 12))
    # bit for bit the carries held in memory; to float64 rounding the reverse chain's scores
    held = lazy(12, None)[1].compute(scheduler="sync")
    for name in got.data_vars:
        np.testing.assert_array_equal(got[name].values, held[name].values, err_msg=name)
    assert_results_close(got, lazy(4, tmp_path / "chain", chain=True)[1].compute(scheduler="sync"))
