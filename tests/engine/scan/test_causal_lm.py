"""Causal language models against the float64 brute force: a 2-layer GPT-2 trained with the Trainer's token-level
loss on right-padded sequences of different lengths (labels -100 under the padding), AdamW with warm-up and
clipping. Per-sample scores weigh each training sequence by its tokens; the query outputs are each validation
sequence's loss and the log-probability of a chosen next token at a chosen position."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests.engine.scan.test_math import check_identities, compare  # noqa: E402
from tests.support.oracle import oracle, train_causal_lm  # noqa: E402

from engine.ops.output_modes import next_token_targets  # noqa: E402
from engine.scan import Problem, attribute_local  # noqa: E402

ALL_BY = frozenset({"sample", "step", "tensor", "param"})


@functools.cache
def lm_run():
    return train_causal_lm()


def _token_targets(run):
    return next_token_targets(run.xq, positions=[2, 1, 2], tokens=[3, int(run.xq[1, 1]), 11])


@pytest.mark.parametrize("output", ["loss", "token_logprob"])
def test_token_weighted_scores_match_the_oracle(output):
    torch.set_num_threads(1)
    run = lm_run()
    lens = (run.y[:, 1:] != -100).sum(1)
    assert len(set(lens.tolist())) > 3  # the sequences really differ in length, so token weights matter
    if output == "token_logprob":
        run = dataclasses.replace(run, yq=_token_targets(run))
    o = oracle(run, output="lm_loss" if output == "loss" else output, nodes=16)
    assert o.replay_error < 1e-12
    ds = attribute_local(run.traj, Problem(run.xq, run.yq, output=output, by=ALL_BY), chunk_updates=3)
    compare(ds, o, tol=1e-9, what=output)  # the default quadrature rule, against 16 nodes per update
    check_identities(ds)
    assert float(np.abs(ds["quadrature_residual"]).max()) <= 1e-9 * float(np.abs(ds["delta"]).max())
    # tied weights (GPT-2's wte and lm_head) are one tensor
    tensors = [str(t) for t in ds["tensor"].values]
    assert tensors.count("transformer.wte.weight") == 1 and not any("lm_head" in t for t in tensors)
    assert tensors == list(run.traj.tensor_names)
    if output == "loss":
        # unweighted per-sample gradients (each sequence's own mean) would not match: the weights are not all 1
        w = lens.double() / lens.double().mean()
        assert float((w - 1).abs().max()) > 0.3


def test_token_logprob_targets_are_checked():
    run = lm_run()
    with pytest.raises(ValueError, match="positions must lie in 1..7"):
        next_token_targets(run.xq, positions=[0, 1, 2])
    with pytest.raises(ValueError, match="one per query"):
        next_token_targets(run.xq, positions=[1, 2])
    y = _token_targets(run)
    assert (y != -100).sum().item() == 3 and int(y[0, 2]) == 3 and int(y[1, 1]) == int(run.xq[1, 1])
