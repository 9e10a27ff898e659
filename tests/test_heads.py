"""Heads, calibration and episodes: small exact cases and seeded synthetic clusters."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fewshot.calibration import calibrate, loo_scores
from fewshot.errors import InvalidArgument
from fewshot.evaluate import auroc, omniglot_runs_error, run_episodes
from fewshot.heads import CACHE_BETA, HEADS, NEIGHBOURS, center, prototypes, rank, scores


def clusters(n_classes=8, per_class=10, dim=32, spread=0.4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    x = np.repeat(centres, per_class, axis=0) + spread * rng.normal(size=(n_classes * per_class, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"class{i}" for i in np.repeat(np.arange(n_classes), per_class)]


def test_prototypes_are_renormalised_means():
    x = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    protos, names = prototypes(x, ["a", "a", "b"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(protos, [[0.7071068, 0.7071068], [-1, 0]], atol=1e-6)


def test_knn_vote_is_similarity_weighted():
    support = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32)
    s, names = scores("knn", np.array([[1, 0]], np.float32), support, ["a", "b", "b"], k=3)
    np.testing.assert_allclose(s, [[1 / 3, 0.8 / 3]], atol=1e-6)
    assert names == ["a", "b"]
    s, _ = scores("knn", np.array([[1, 0]], np.float32), support, ["a", "b", "b"], k=2)
    np.testing.assert_allclose(s, [[1 / 2, 0.8 / 2]], atol=1e-6)  # the 2 nearest only


def test_cache_head_sums_the_nearest_examples_only():
    """Prototype cosine + exp(-beta (1 - cos)) over the class's examples among the 64 nearest."""
    x, labels = clusters(n_classes=3, per_class=40, dim=16, seed=5)
    query = x[:1] * 0.9 + x[50:51] * 0.1
    query /= np.linalg.norm(query)
    s, names = scores("cache", query, x, labels)
    sims = (query @ x.T)[0]
    nearest = np.argsort(-sims)[:NEIGHBOURS]
    protos, _ = prototypes(x, labels)
    for j, name in enumerate(names):
        mine = [i for i in nearest if labels[i] == name]
        expected = query[0] @ protos[j] + np.exp(-CACHE_BETA * (1 - sims[mine])).sum()
        np.testing.assert_allclose(s[0, j], expected, rtol=1e-5)


@pytest.mark.parametrize("head", ["prototype", "knn", "cache"])
def test_every_head_separates_clusters(head):
    x, labels = clusters()
    support, queries = x[0::2], x[1::2]
    s, names = scores(head, queries, support, labels[0::2])
    assert (np.asarray(names)[s.argmax(axis=1)] == np.asarray(labels[1::2])).mean() > 0.95


def test_unknown_head_is_named():
    with pytest.raises(InvalidArgument, match="choose one of"):
        scores("svm", np.ones((1, 2)), np.ones((1, 2)), ["a"])


def test_centering_subtracts_and_renormalises():
    x = np.array([[1, 1], [1, -1]], np.float32) / np.sqrt(2)
    c = center(x, x.mean(axis=0))
    np.testing.assert_allclose(c, [[0, 1], [0, -1]], atol=1e-6)


def test_rank_flags_unknown_under_threshold():
    out = rank(np.array([[0.9, 0.2], [0.3, 0.1]]), ["a", "b"], k=2, threshold=0.5)
    assert [o["unknown"] for o in out] == [False, True]
    assert out[0]["matches"][0] == {"label": "a", "score": 0.9} and out[0]["threshold"] == 0.5


def test_calibrated_threshold_meets_the_false_accept_rate():
    x, labels = clusters(n_classes=20, per_class=6, seed=1)
    cal = calibrate(x, labels, far=0.05)
    assert cal.threshold is not None and cal.impostors > 0 and cal.genuines > 0
    fresh, fresh_labels = clusters(n_classes=20, per_class=6, seed=2)  # 20 classes never enrolled
    s, _ = scores("prototype", fresh, x, labels)
    assert (s.max(axis=1) >= cal.threshold).mean() <= 0.15  # unknowns mostly rejected
    assert cal.genuine_accept_rate > 0.9  # enrolled classes mostly accepted


def test_few_impostors_use_a_normal_tail_not_their_maximum():
    x = np.array([[1, 0, 0], [0.8, 0.6, 0], [0.6, 0, 0.8]], np.float32)
    cal = calibrate(x, ["a", "b", "c"], far=0.01)
    impostors = np.array([max(x[i] @ x[j] for j in range(3) if j != i) for i in range(3)])
    assert cal.threshold > impostors.max()
    assert cal.threshold >= impostors.mean() + 2.32 * impostors.std(ddof=1) - 1e-6


def test_the_threshold_keeps_the_rate_it_promises_with_95_percent_confidence():
    """858 impostor values from N(0, 1), 1% asked, 400 draws: the bounded threshold lets through more than
    1% of a fresh stream in at most ~5% of draws (here, with the normal fit too, fewer); the plain
    quantile does in about half."""
    from statistics import NormalDist

    from fewshot.calibration import bounded_quantile

    rng, over_bound, over_plain = np.random.default_rng(0), 0, 0
    for _ in range(400):
        values = rng.standard_normal(858)
        over_bound += 1 - NormalDist().cdf(bounded_quantile(values, 0.01)) > 0.01
        over_plain += 1 - NormalDist().cdf(np.quantile(values, 0.99, method="higher")) > 0.01
    assert over_bound / 400 <= 0.08 and over_plain / 400 >= 0.3
    assert bounded_quantile(np.arange(10.0), 0.01) == 9.0  # too few for any bound: the maximum


def test_the_margin_is_the_best_score_less_half_the_runner_up():
    from fewshot.heads import decision_values

    s = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7]], np.float32)
    np.testing.assert_allclose(decision_values(s, "margin"), [0.9 - 0.25, 0.8 - 0.35], atol=1e-6)
    np.testing.assert_allclose(decision_values(s, "score"), [0.9, 0.8])
    one = np.array([[0.6]], np.float32)  # no runner-up: it counts as 0
    assert decision_values(one, "margin")[0] == pytest.approx(0.6)
    gone = np.array([[0.7, -np.inf]], np.float32)  # a class left out (leave-one-out): no runner-up either
    assert decision_values(gone, "margin")[0] == pytest.approx(0.7)
    ranked = rank(s, ["a", "b", "c"], 2, 0.6, "margin")
    assert [r["unknown"] for r in ranked] == [False, True] and ranked[0]["decision"] == "margin"
    assert ranked[1]["decision_value"] == pytest.approx(0.45)


def test_one_leave_one_out_pass_gives_both_statistics():
    """40 one-shot classes: each example's impostor score is its best other class, its margin that less
    half the second best; no genuine value (no class has a second example)."""
    from fewshot.calibration import loo_values

    x, labels = clusters(n_classes=40, per_class=1, dim=32, spread=0.4, seed=3)
    values = loo_values(x, labels)
    (genuine_s, impostor_s), (genuine_m, impostor_m) = values["score"], values["margin"]
    assert len(genuine_s) == len(genuine_m) == 0
    others = np.sort(x @ x.T - 3 * np.eye(40), axis=1)  # each row's own cosine pushed to the bottom
    np.testing.assert_allclose(np.sort(impostor_s), np.sort(others[:, -1]), atol=1e-5)
    np.testing.assert_allclose(np.sort(impostor_m), np.sort(others[:, -1] - 0.5 * others[:, -2]), atol=1e-5)


def test_calibration_needs_two_classes():
    x, labels = clusters(n_classes=1, per_class=4)
    assert calibrate(x, labels).threshold is None
    for far in (1.5, 0.0, 1e-300, float("nan")):
        with pytest.raises(InvalidArgument, match="far"):
            calibrate(x, labels, far=far)


def naive_loo(x, labels, head, chosen):
    """Leave-one-out the slow way: the head run on the support without each example."""
    labels = np.asarray(labels)
    genuine, impostor = [], []
    for i in chosen:
        keep = np.arange(len(x)) != i
        row, names = scores(head, x[i:i + 1], x[keep], labels[keep])
        own = [j for j, name in enumerate(names) if name == labels[i]]
        if own:
            genuine.append(row[0, own[0]])
        impostor.append(np.delete(row[0], own).max())
    return np.asarray(genuine), np.asarray(impostor)


@pytest.mark.parametrize("head", HEADS)
def test_batched_leave_one_out_equals_the_slow_loop(head):
    x, labels = clusters(n_classes=9, per_class=12, dim=24, seed=3)
    labels[5] = "single"  # a one-example class: impostor scores only
    genuine, impostor = loo_scores(x, labels, head, max_examples=60, seed=1)
    chosen = np.random.default_rng(1).permutation(len(x))[:60]
    slow_genuine, slow_impostor = naive_loo(x, labels, head, chosen)
    np.testing.assert_allclose(genuine, slow_genuine, atol=1e-5)
    np.testing.assert_allclose(impostor, slow_impostor, atol=1e-5)


def test_auroc():
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([0.0, 1.0]), np.array([2.0])) == 0.0


def test_episodes_accuracy_interval_and_open_set():
    x, labels = clusters(n_classes=12, per_class=20, spread=1.3)
    report = run_episodes(x, labels, ways=5, shots=1, queries=5, episodes=200)
    assert 50 < report.accuracy <= 100 and 0 < report.ci95 < 10 and report.auroc > 0.6
    noise = np.random.default_rng(9).normal(size=x.shape).astype(np.float32)
    chance = run_episodes(noise / np.linalg.norm(noise, axis=1, keepdims=True), labels, 5, 1, 5, 200)
    assert abs(chance.accuracy - 20) < 5  # random vectors sit at chance
    with pytest.raises(ValueError, match="needs 20 classes"):
        run_episodes(x, labels, ways=20, shots=1)


def test_official_runs_error_counts_mistakes():
    x = np.eye(4, dtype=np.float32)
    paths = ["z.zip!r/training/c1.png", "z.zip!r/training/c2.png", "z.zip!r/test/i1.png", "z.zip!r/test/i2.png"]
    x[2] = x[0]  # i1 looks like c1
    x[3] = x[0]  # i2 also looks like c1, but its answer is c2
    runs = [[("r/test/i1.png", "r/training/c1.png"), ("r/test/i2.png", "r/training/c2.png")]]
    assert omniglot_runs_error(x, paths, runs) == 50.0


def test_cli_eval_json(tmp_path, encoder):
    from fewshot import embed_dataset

    from .conftest import make_image_tree

    tree = make_image_tree(tmp_path / "img", per_class=4, corrupt=False)
    embed_dataset(tree, tmp_path / "emb", encoder, workers=0, progress=False)
    out = subprocess.run([sys.executable, "-m", "fewshot.cli", "eval", str(tmp_path / "emb"), "--ways", "3",
                          "--shots", "1", "--queries", "3", "--episodes", "20", "--json"],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["accuracy"] > 80 and "ci95" in result and result["encoder"] == "efficientnet_lite0"
    bad = subprocess.run([sys.executable, "-m", "fewshot.cli", "eval", str(tmp_path / "emb"), "--ways", "9"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "needs 9 classes" in bad.stderr
