"""Query output modes: which scalar functions ``F(theta)`` of the model's outputs on the query inputs are explained.

The query function is ``F(theta) = mode(functional_call(model, theta, x_query))`` flattened row-major to
``(Q * O,)``: row ``q * O + o`` is output ``o`` of query ``q``. Modes:

- ``"log_softmax"``: every class log-probability (``O`` = number of classes; the labels are the class indices);
- ``"logits"``: every raw output (``O`` = number of outputs per query);
- ``"loss"``: the query's training loss (the run's loss spec, e.g. cross entropy) against ``y_query`` (``O = 1``);
- ``"target_logprob"``: the log-probability of the target class ``y_query`` (``O = 1``);
- ``"margin"``: target logit minus the largest other logit (``O = 1``; a kink where the runner-up changes).
- ``"token_logprob"`` (causal language models): the log-probability of a chosen next token at a chosen position
  (``O = 1``). The targets are labels ``(Q, T)`` in the ``causal_lm`` convention, ``IGNORE_INDEX`` (-100) except at
  the chosen position ``p``, which holds the chosen token: the output is ``log softmax(logits[q, p - 1])[token]``,
  the log-probability of that token after the prefix ``inputs[q, :p]`` (:func:`next_token_targets` builds them;
  several labelled positions give the sum of their log-probabilities, a continuation's log-probability).

Every function here is written for ``torch.func`` (vmap / jacrev / jvp over ``functional_call``): no in-place ops,
no data-dependent Python control flow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from engine.ops.quadrature import SampleQuery
from explaind_store.specs import IGNORE_INDEX, per_sample_loss

OUTPUT_MODES = ("log_softmax", "logits", "loss", "target_logprob", "margin", "token_logprob")
NEEDS_TARGETS = frozenset({"loss", "target_logprob", "margin", "token_logprob"})
SINGLE_OUTPUT = frozenset({"loss", "target_logprob", "margin", "token_logprob"})
# the modes defined for a causal language model run (outputs: logits for every position and token)
CAUSAL_LM_MODES = ("loss", "token_logprob")


def next_token_targets(
    inputs: torch.Tensor, positions: torch.Tensor | list[int], tokens: torch.Tensor | list[int] | None = None
) -> torch.Tensor:
    """Targets for ``output="token_logprob"``: labels ``(Q, T)`` that are ``IGNORE_INDEX`` except at
    ``positions[q]`` (1 <= p < T), which holds ``tokens[q]`` (default: the token that really follows,
    ``inputs[q, p]``). The output is then the log-probability of that token after ``inputs[q, :p]``."""
    inputs = torch.as_tensor(inputs)
    if inputs.ndim != 2:
        raise ValueError(f"inputs must be token ids (Q, T), got shape {tuple(inputs.shape)}")
    q, t = inputs.shape
    pos = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
    if len(pos) != q:
        raise ValueError(f"positions has {len(pos)} entries but there are {q} query sequences: give one per query")
    if bool(((pos < 1) | (pos >= t)).any()):
        raise ValueError(f"positions must lie in 1..{t - 1} (position p is predicted from the tokens before it), "
                         f"got {pos.tolist()}")
    tok = inputs[torch.arange(q), pos] if tokens is None else torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    if len(tok) != q:
        raise ValueError(f"tokens has {len(tok)} entries but there are {q} query sequences: give one per query")
    labels = torch.full((q, t), IGNORE_INDEX, dtype=torch.int64)
    labels[torch.arange(q), pos] = tok
    return labels


def validate_mode(mode: str, y_query: torch.Tensor | None, n_queries: int) -> None:
    """Raise ``ValueError`` for an unknown mode or missing / mis-sized targets."""
    if mode not in OUTPUT_MODES:
        raise ValueError(f"unknown output mode {mode!r}; use one of {', '.join(OUTPUT_MODES)}")
    if mode in NEEDS_TARGETS and y_query is None:
        raise ValueError(f"output mode {mode!r} needs the query targets: pass y_query")
    if y_query is not None and len(y_query) != n_queries:
        raise ValueError(f"y_query has {len(y_query)} entries but x_query has {n_queries} queries")


def apply_mode(
    mode: str, out: torch.Tensor, y: torch.Tensor | None, loss_spec: dict[str, str]
) -> torch.Tensor:
    """Model outputs ``(Q, ...)`` -> query outputs ``(Q, O)``."""
    if mode == "logits":
        return out.reshape(out.shape[0], -1)
    if mode == "log_softmax":
        return torch.log_softmax(out, dim=-1).reshape(out.shape[0], -1)
    assert y is not None
    if mode == "loss":
        return per_sample_loss(loss_spec, out, y).reshape(-1, 1)
    if mode == "target_logprob":
        logp = torch.log_softmax(out, dim=-1)
        return logp.gather(-1, y.reshape(-1, 1))
    if mode == "token_logprob":
        logp = torch.log_softmax(out[:, :-1], dim=-1)
        labels = y[:, 1:]
        keep = labels != IGNORE_INDEX
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(keep, picked, torch.zeros_like(picked)).sum(dim=1, keepdim=True)
    if mode == "margin":
        target = out.gather(-1, y.reshape(-1, 1))
        # not F.one_hot: it reads the labels' values, which fails under vmap (per-query quadrature)
        is_target = torch.arange(out.shape[-1], device=out.device) == y.reshape(-1, 1)
        others = torch.where(is_target, torch.full_like(out, -torch.inf), out)
        return target - others.amax(dim=-1, keepdim=True)
    raise ValueError(f"unknown output mode {mode!r}; use one of {', '.join(OUTPUT_MODES)}")


def output_labels(mode: str, n_outputs: int) -> list:
    """Coordinate labels of the ``output`` dimension: class indices, or the mode's name for one-output modes."""
    if mode in SINGLE_OUTPUT:
        return [mode]
    return list(range(n_outputs))


def make_query_fn(
    model: nn.Module,
    x_query: torch.Tensor,
    y_query: torch.Tensor | None,
    mode: str,
    loss_spec: dict[str, str],
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``F(params) -> (Q * O,)`` for a float64 eval-mode model; parameters not in ``params`` stay the model's own."""

    def query_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(model, params, (x_query,))
        return apply_mode(mode, out, y_query, loss_spec).reshape(-1)

    return query_fn


def make_sample_query(
    model: nn.Module,
    x_query: torch.Tensor,
    y_query: torch.Tensor | None,
    mode: str,
    loss_spec: dict[str, str],
    sample_chunk: int = 32,
) -> SampleQuery:
    """The same ``F`` as :func:`make_query_fn` as a :class:`~engine.ops.quadrature.SampleQuery`: query ``q``'s outputs
    depend only on ``x_query[q]`` (and ``y_query[q]``), so each query is integrated with its own kinks and its own
    reverse pass (no cross-query work). Valid for models whose eval-mode outputs are per-sample (no batch
    statistics, no mixing across the batch): every model the examples build."""
    if y_query is None:

        def fn(params: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
            return apply_mode(mode, functional_call(model, params, (xb,)), None, loss_spec)

        return SampleQuery(fn, x_query, sample_chunk)

    def fn_y(params: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, yb = inputs
        return apply_mode(mode, functional_call(model, params, (xb,)), yb, loss_spec)

    return SampleQuery(fn_y, (x_query, y_query), sample_chunk)
