"""Metrics against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.trainer.evaluation.metrics import evaluate_ranking

D2 = 1 / math.log2(3)  # discount of rank 2


def test_single_user_hand_computed() -> None:
    # Ranking is columns 0,1,2,3,4; targets sit at ranks 2 and 5.
    m = evaluate_ranking([[0.9, 0.8, 0.7, 0.6, 0.5]], [np.array([1, 4])], ks=(1, 2, 5))
    assert m["recall@1"] == 0.0
    assert m["hit_rate@1"] == 0.0
    assert m["ndcg@1"] == 0.0
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["hit_rate@2"] == 1.0
    assert m["ndcg@2"] == pytest.approx(D2 / (1 + D2))
    assert m["recall@5"] == pytest.approx(1.0)
    dcg5 = D2 + 1 / math.log2(6)
    assert m["ndcg@5"] == pytest.approx(dcg5 / (1 + D2))


def test_excluded_items_leave_the_ranking() -> None:
    # Excluding column 0 moves the target at column 1 to rank 1.
    m = evaluate_ranking(
        [[0.9, 0.8, 0.7, 0.6, 0.5]], [np.array([1, 4])], excluded=[np.array([0])], ks=(1, 2)
    )
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["ndcg@1"] == pytest.approx(1.0)  # ideal DCG over min(|T|, K) = 1 hit
    assert m["ndcg@2"] == pytest.approx(1.0 / (1 + D2))


def test_recall_divides_by_all_targets_and_ndcg_by_min_targets_k() -> None:
    m = evaluate_ranking([[3.0, 2.0, 1.0, 0.0]], [np.array([0, 1, 3])], ks=(2,))
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx(1.0)


def test_average_over_users_and_coverage() -> None:
    scores = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    targets = [np.array([0]), np.array([1]), np.array([3])]
    m = evaluate_ranking(scores, targets, ks=(1,))
    assert m["recall@1"] == pytest.approx(2 / 3)
    assert m["hit_rate@1"] == pytest.approx(2 / 3)
    assert m["coverage@1"] == pytest.approx(2 / 4)  # items 0 and 3 were shown


def test_ties_are_broken_at_random_not_by_position() -> None:
    n_users = 4000
    scores = np.zeros((n_users, 4))
    m = evaluate_ranking(scores, [np.array([0])] * n_users, ks=(1,), seed=3)
    # Index order would put column 0 first for everyone (recall 1.0).
    assert m["recall@1"] == pytest.approx(0.25, abs=0.03)


def test_bad_scores_and_empty_targets_are_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        evaluate_ranking([[np.nan, 1.0]], [np.array([0])], ks=(1,))
    with pytest.raises(ValueError, match="without targets"):
        evaluate_ranking([[0.0, 1.0]], [np.array([], dtype=np.int64)], ks=(1,))
