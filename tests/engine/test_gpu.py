"""device="cuda": the per-update math on the GPU reproduces the CPU result (float64 on both). Skipped cleanly where
CUDA is not available."""

from __future__ import annotations

import pytest
import torch
from tests.support.compare import assert_results_close, identity_error

import engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

# float64 on both devices, but GPU kernels sum in other orders: agreement to ~1e-13, checked at 1e-10
RTOL = 1e-10


@pytest.mark.parametrize("by", ["sample,step,tensor", "param"])
def test_cuda_sync_matches_cpu(digits_store, by):
    cpu = engine.attribute(digits_store, queries="val[:3]", by=by, client="sync", progress=False)
    gpu = engine.attribute(digits_store, queries="val[:3]", by=by, client="sync", device="cuda", progress=False)
    assert gpu.attrs["device"] == "cuda"
    assert_results_close(gpu, cpu, rtol=RTOL)
    assert identity_error(gpu) <= 1e-10


def test_cuda_transformer_window_matches_cpu(modadd_store):
    kw = {"queries": "val[:2]", "output": "target_logprob", "by": "sample,tensor", "steps": slice(2, 6),
          "client": "sync", "progress": False}
    cpu = engine.attribute(modadd_store, **kw)
    gpu = engine.attribute(modadd_store, device="cuda", **kw)
    assert_results_close(gpu, cpu, rtol=RTOL)


def test_cuda_on_local_cluster_workers(digits_store, cluster, tmp_path):
    cpu = engine.attribute(digits_store, queries="val[:2]", by="sample,step", client="sync", progress=False)
    gpu = engine.attribute(digits_store, queries="val[:2]", by="sample,step", client=cluster, device="cuda",
                           out=tmp_path / "gpu.zarr", progress=False)
    assert_results_close(gpu, cpu, rtol=RTOL)


def test_query_budget_on_cuda_is_a_share_of_free_gpu_memory():
    """The rows' state lives on the GPU when the scan runs there: the default budget follows its free memory."""
    from engine import settings
    from engine.api import query_limit

    free, _ = torch.cuda.mem_get_info()
    with settings.override(query_bytes=0):
        assert 0 < query_limit("cuda") <= free
    with settings.override(query_bytes=123456):
        assert query_limit("cuda") == 123456
