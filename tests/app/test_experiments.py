"""The pure pieces of the experiments (experiments/scores.py) on toy cases with known answers, and the
pipeline-alignment query on a real recorded store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments import scores


def test_importance_sums_with_signs_then_takes_the_absolute_value() -> None:
    # (query, output, part, 3): element 0 cancels (+1, -1), element 1 adds up (-2, -2), element 2 is 0.5 once
    s = np.zeros((2, 1, 1, 3))
    s[0, 0, 0] = [1.0, -2.0, 0.5]
    s[1, 0, 0] = [-1.0, -2.0, 0.0]
    imp = scores.importance_from_scores({"w": s})
    np.testing.assert_allclose(imp["w"], [0.0, 4.0, 0.5])
    # leading axes to sum can be chosen (here: only the first two), the tensor shape is kept
    imp2 = scores.importance_from_scores({"w": s.reshape(2, 1, 3)}, sum_axes=(0, 1))
    np.testing.assert_allclose(imp2["w"], [0.0, 4.0, 0.5])


def test_importance_per_output_takes_the_absolute_value_before_summing_outputs() -> None:
    # (output, part, 2): element 0 moves output 0 by +1 and output 1 by -1 (cancels when summed with signs)
    s = np.array([[[1.0, 0.0], [0.0, 0.5]], [[-1.0, 0.0], [0.0, 0.0]]])
    np.testing.assert_allclose(scores.importance_from_scores({"w": s}, sum_axes=(0, 1))["w"], [0.0, 0.5])
    np.testing.assert_allclose(scores.importance_from_scores({"w": s}, sum_axes=(1,), abs_sum_axes=(0,))["w"],
                               [2.0, 0.5])


def test_global_mask_ranks_all_tensors_together() -> None:
    imp = {"a": np.array([10.0, 9.0, 8.0, 7.0]), "b": np.array([[1.0, 2.0], [3.0, 4.0]])}
    m = scores.global_mask(imp, 0.5)  # 4 of 8 elements: all of "a", none of "b"
    assert m["a"].tolist() == [True] * 4
    assert m["b"].tolist() == [[False, False], [False, False]]
    m = scores.global_mask(imp, 0.75)  # 6 of 8: plus the two largest of "b"
    assert m["b"].tolist() == [[False, False], [True, True]]
    assert scores.kept_fraction(m) == 0.75


def test_per_module_mask_keeps_the_fraction_of_each_tensor() -> None:
    imp = {"a": np.array([10.0, 9.0, 8.0, 7.0]), "b": np.array([[1.0, 2.0], [3.0, 4.0]])}
    m = scores.per_module_mask(imp, 0.5)
    assert m["a"].tolist() == [True, True, False, False]
    assert m["b"].tolist() == [[False, False], [True, True]]
    assert scores.per_module_mask(imp, 1.0)["b"].all() and not scores.per_module_mask(imp, 0.0)["a"].any()


def test_masks_reject_a_fraction_outside_0_1() -> None:
    with pytest.raises(ValueError, match="kept fraction"):
        scores.global_mask({"a": np.ones(3)}, 1.5)
    with pytest.raises(ValueError, match="kept fraction"):
        scores.per_module_mask({"a": np.ones(3)}, -0.1)


def test_baselines_magnitude_and_random() -> None:
    params = {"w": np.array([-3.0, 1.0, -0.5])}
    np.testing.assert_allclose(scores.magnitude_importance(params)["w"], [3.0, 1.0, 0.5])
    assert scores.global_mask(scores.magnitude_importance(params), 2 / 3)["w"].tolist() == [True, True, False]
    r0, r0b, r1 = (scores.random_importance({"w": np.zeros(50)}, s)["w"] for s in (0, 0, 1))
    np.testing.assert_array_equal(r0, r0b)
    assert not np.array_equal(r0, r1)


def test_prediction_metrics_known_values() -> None:
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    same = scores.prediction_metrics(ref, ref, y)
    assert same["accuracy"] == pytest.approx(2 / 3) and same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0)
    flat = torch.zeros(3, 2)  # uniform predictions: argmax is class 0 everywhere
    m = scores.prediction_metrics(ref, flat, y)
    assert m["accuracy"] == 1.0 and m["agreement"] == pytest.approx(2 / 3)
    p = torch.softmax(ref.double(), dim=-1)
    want = float((p * (p.log() - np.log(0.5))).sum(-1).mean())
    assert m["kl"] == pytest.approx(want)


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(3, 40)).astype(float)  # many ties
    b = a + rng.normal(size=(3, 40))
    got = scores.spearman(a, b)
    want = [spearmanr(a[i], b[i]).statistic for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert scores.spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
    assert scores.spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    assert np.isnan(scores.spearman(np.ones(5), np.arange(5.0)))


def test_lds_of_an_exact_linear_datamodel_is_one() -> None:
    # the true effect of sample n on query q; leaving samples out changes each query's output by -sum of effects
    rng = np.random.default_rng(1)
    effects = rng.normal(size=(4, 30))
    removed = rng.random((50, 30)) < 0.5
    actual = -(removed.astype(float) @ effects.T).T  # (Q, S)
    pred = scores.predicted_changes(effects, removed)
    np.testing.assert_allclose(pred, actual)
    np.testing.assert_allclose(scores.lds(actual, pred), 1.0)
    # scores of the wrong sign anti-correlate, unrelated scores do not correlate on average
    np.testing.assert_allclose(scores.lds(actual, scores.predicted_changes(-effects, removed)), -1.0)
    noise = scores.predicted_changes(rng.normal(size=(4, 30)), removed)
    assert abs(np.mean(scores.lds(actual, noise))) < 0.5


def test_lds_shape_errors_say_what_is_expected() -> None:
    with pytest.raises(ValueError, match=r"\(Q, N\)"):
        scores.predicted_changes(np.zeros((2, 3)), np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError, match=r"\(Q, S\)"):
        scores.lds(np.zeros((2, 3)), np.zeros((2, 4)))


def test_mean_spread_drops_nans() -> None:
    s = scores.mean_spread(np.array([1.0, np.nan, 3.0]))
    assert s == {"mean": 2.0, "std": pytest.approx(np.sqrt(2.0)), "min": 1.0, "max": 3.0, "n": 2}
    assert scores.mean_spread(np.array([np.nan]))["n"] == 0


def test_pipeline_alignment_on_a_recorded_run(modadd_store) -> None:
    from experiments.grokking import VARIANTS, pipeline_alignment
    from explaind_store import open_run

    run = open_run(modadd_store)
    al = pipeline_alignment(run, every=2)
    assert al["step"] == [0, 2, 4, 6]
    assert set(al["variants"]) == set(VARIANTS)
    # at the last checkpoint every hybrid is the final model itself: KL 0 and the final model's accuracy
    last = {v: (d["accuracy"][-1], d["kl"][-1]) for v, d in al["variants"].items()}
    accs = {a for a, _ in last.values()}
    assert len(accs) == 1 and all(abs(k) < 1e-6 for _, k in last.values())
    # at step 0 the checkpoint alone is the initial model, which differs from the final one
    assert al["variants"]["checkpoint only"]["kl"][0] > 0
    # the final outer layers make a different model than the checkpoint alone at step 0
    assert al["variants"]["final outer (embed, MLP out, unembed)"]["kl"][0] != al["variants"]["checkpoint only"]["kl"][0]


def test_per_module_mask_with_groups_ranks_the_tensors_of_a_module_together() -> None:
    # module "m" = tensors a (4) and b (4): keeping half keeps the 4 largest of the 8 (all of a); module "c" alone
    imp = {"a": np.array([10.0, 9.0, 8.0, 7.0]), "b": np.array([1.0, 2.0, 3.0, 4.0]), "c": np.array([5.0, 1.0])}
    m = scores.per_module_mask(imp, 0.5, groups={"m": ["a", "b"], "c": ["c"]})
    assert m["a"].all() and not m["b"].any() and m["c"].tolist() == [True, False]
    assert list(m) == ["a", "b", "c"]
    # without groups each tensor keeps its own half
    assert scores.per_module_mask(imp, 0.5)["b"].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="exactly once"):
        scores.per_module_mask(imp, 0.5, groups={"m": ["a", "b"]})  # c is in no group
    with pytest.raises(ValueError, match="exactly once"):
        scores.per_module_mask(imp, 0.5, groups={"m": ["a", "b"], "n": ["b", "c"]})


def test_transformer_components_and_per_component_masks_keep_the_fraction_of_each() -> None:
    from experiments.pruning_grokked import components
    from explaind_store.examples import modadd

    model = modadd.make_model(p=7, d_model=8, n_heads=2, d_mlp=16)
    names = [n for n, _ in model.named_parameters()]
    groups = components(names)
    assert groups == {"embedding": ["embed"],
                      "attention": ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_o.weight"],
                      "MLP in": ["mlp_in.weight", "mlp_in.bias"], "MLP out": ["mlp_out.weight", "mlp_out.bias"],
                      "unembedding": ["unembed.weight"]}
    # importance: the bias far above its weight, so a per-tensor mask and a per-component mask differ
    imp = {n: np.random.default_rng(0).random(tuple(p.shape)) + (10.0 if n.endswith("bias") else 0.0)
           for n, p in model.named_parameters()}
    for kept in (0.7, 0.97):
        m = scores.per_module_mask(imp, kept, groups)
        for comp, ts in groups.items():
            size = sum(imp[t].size for t in ts)
            assert sum(int(m[t].sum()) for t in ts) == round(kept * size), comp
        assert m["mlp_in.bias"].all()  # ranked with its weight, the bias is kept whole
    # ranked alone (one module per tensor), the bias loses 30% of its elements
    assert scores.per_module_mask(imp, 0.7)["mlp_in.bias"].sum() == round(0.7 * 16)


def test_query_set_model_sums_log_probabilities_and_keeps_training_outputs() -> None:
    from experiments.pruning_grokked import with_query_sets
    from explaind_store.examples import modadd

    torch.manual_seed(0)
    model = modadd.make_model(p=7, d_model=8, n_heads=2, d_mlp=16).double()
    x = modadd.make_data(7, 20, 8, seed=0)["val"][0]
    want_train = model(x)
    names = [n for n, _ in model.named_parameters()]
    wrapped = with_query_sets(model, sample_ndim=1)
    assert [n for n, _ in wrapped.named_parameters()] == names
    torch.testing.assert_close(wrapped(x), want_train)  # training batches: the model's own outputs
    sets = torch.stack([x[:4], x[4:]])  # two query sets of 4 points
    want = torch.log_softmax(want_train, -1).reshape(2, -1).sum(-1, keepdim=True)
    torch.testing.assert_close(wrapped(sets), want)


def test_summed_scores_equal_the_per_query_scores_summed_over_queries_and_classes(modadd_store) -> None:
    import engine
    from engine.result import param_var
    from experiments.pruning_grokked import summed_scores
    from explaind_store import open_run

    run = open_run(modadd_store)
    x, _ = run.split("val")
    got = summed_scores(modadd_store, x, (0, 6), rule="gauss:4")
    ds = engine.attribute(str(modadd_store), queries="val", output="log_softmax", by=("param",), quadrature="gauss:4",
                          client="sync", progress=False)
    for n in run.tensor_names:
        np.testing.assert_allclose(got[n], ds[param_var(n)].sum(("query", "output")).values, rtol=1e-9, atol=1e-12)
    assert got["_change"] == pytest.approx(float((ds["final"] - ds["initial"]).sum()), rel=1e-12)


def test_prune_and_measure_restores_the_model_and_is_exact_at_kept_1() -> None:
    from experiments.pruning import prune_and_measure
    from explaind_store.examples import modadd

    torch.manual_seed(0)
    model = modadd.make_model(p=7, d_model=8, n_heads=2, d_mlp=16).double()
    x, y = modadd.make_data(7, 20, 8, seed=0)["val"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    imp = {"magnitude": scores.magnitude_importance({n: p.numpy() for n, p in before.items()})}
    rows = prune_and_measure(model, x, y, imp, (0.0, 1.0), seed=7)
    assert [(r["scope"], r["kept"]) for r in rows] == [("global", 0.0), ("global", 1.0), ("per_module", 0.0),
                                                       ("per_module", 1.0)]
    assert all(r["seed"] == 7 for r in rows)
    full = [r for r in rows if r["kept"] == 1.0]
    assert all(r["kl"] == 0.0 and r["agreement"] == 1.0 for r in full)
    assert all(r["kept_actual"] == 0.0 and r["kl"] > 0 for r in rows if r["kept"] == 0.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_importance_per_part_keeps_data_and_decay_from_cancelling() -> None:
    # (part, 2): element 0 is moved +1 by the data and -1 by weight decay (net 0), element 1 only by the data
    s = {"w": np.array([[1.0, 0.5], [-1.0, 0.0], [0.0, 0.0]])}
    np.testing.assert_allclose(scores.importance_from_scores(s, sum_axes=(0,))["w"], [0.0, 0.5])
    np.testing.assert_allclose(scores.importance_from_scores(s, sum_axes=(), abs_sum_axes=(0,))["w"], [2.0, 0.5])
