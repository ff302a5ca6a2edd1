"""Training-set export (initial data + log - forgotten users), hold-out and recall@20."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from coldstart.v1 import events_pb2

from services.common.events import encode_event, new_event
from services.trainer.data.generic import load_generic
from services.trainer.data.synthetic import generate
from services.trainer.event_log import EventLog, Incoming
from services.trainer.retrain import recall_at_k
from services.trainer.training_set import (
    HoldOut,
    build_training_set,
    empty_initial,
    initial_from_dataset,
)

TOPIC = "events"


def feed(log: EventLog, events: list[events_pb2.Event]) -> None:
    log.apply(
        TOPIC,
        [Incoming(0, i, e, encode_event(e)) for i, e in enumerate(events)],
        {0: len(events)},
    )


def item(item_id: str, text: str, **attributes: str) -> events_pb2.Event:
    return new_event(
        "test",
        timestamp_ms=1,
        item_upserted=events_pb2.ItemUpserted(
            item_id=item_id, text=text, attributes=attributes, tags=["a|b", "c"]
        ),
    )


def act(
    user: str, item_id: str, ts_s: int, kind: str = "view", value: float = 1.0
) -> events_pb2.Event:
    return new_event(
        "test",
        timestamp_ms=ts_s * 1000,
        interaction=events_pb2.Interaction(user_id=user, item_id=item_id, kind=kind, value=value),
    )


def test_export_merges_initial_data_and_log_without_forgotten_users(tmp_path: Path) -> None:
    dataset = generate()
    initial = initial_from_dataset(dataset)
    victim = str(dataset.users.ids[0])
    victim_rows = int((initial.interactions["user_id"] == victim).sum())
    assert victim_rows > 0
    log = EventLog(tmp_path / "log.sqlite")
    feed(
        log,
        [
            item("new-item", "a brand new thing", category="gadgets"),
            new_event(
                "test",
                timestamp_ms=2,
                user_registered=events_pb2.UserRegistered(
                    user_id="newbie", attributes={"region": "north"}, interest_text="gadgets"
                ),
            ),
            act("newbie", "new-item", 2_000_000_000),
            act("newbie", "no-such-item", 2_000_000_001),
            act(victim, "new-item", 2_000_000_002, kind="rating", value=5.0),
            new_event(
                "test",
                timestamp_ms=2_000_000_003_000,
                user_forgotten=events_pb2.UserForgotten(user_id=victim),
            ),
        ],
    )
    with log.reader() as conn:
        exported = build_training_set(
            conn,
            initial,
            tmp_path / "data",
            topic=TOPIC,
            holdout_fraction=0.1,
            holdout_max_events=50,
        )
    assert exported.forgotten_users == 1
    assert exported.skipped_unknown_items == 1
    assert exported.log_offsets == {0: 6}
    expected_rows = len(initial.interactions) - victim_rows + 1
    assert exported.training_rows + exported.held_out_rows == expected_rows
    assert exported.held_out_rows == 50

    loaded = load_generic(tmp_path / "data")
    user_ids = {str(u) for u in loaded.users.ids.tolist()}
    assert victim not in user_ids
    assert "newbie" in user_ids
    assert len(loaded.interactions) == exported.training_rows
    items = loaded.items.index()
    assert loaded.items.text[items["new-item"]] == "a brand new thing"
    tags = loaded.items.categorical["tags"]
    row = tags.matrix[items["new-item"]].indices.tolist()
    assert sorted(tags.vocab[j] for j in row) == ["a/b", "c"]
    assert victim not in exported.holdout.users
    # The newest event (newbie -> new-item, an implicit positive) is held out.
    assert "newbie" in exported.holdout.users
    k = exported.holdout.users.index("newbie")
    assert exported.holdout.targets[k] == ["new-item"]
    assert set(exported.holdout.candidates) == set(items)


def test_log_only_export_with_few_events_holds_nothing_out(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.sqlite")
    feed(log, [item("i1", "one"), act("u", "i1", 10)])
    with log.reader() as conn:
        exported = build_training_set(
            conn,
            empty_initial(),
            tmp_path / "data",
            topic=TOPIC,
            holdout_fraction=0.5,
            holdout_max_events=10,
        )
    assert exported.training_rows == 1 and exported.held_out_rows == 0
    assert exported.holdout.users == []


class FixedScorer:
    def __init__(self, order: list[str]) -> None:
        self.order = order

    def score(
        self, user_ids: Sequence[str], histories: Sequence[Sequence[str]], candidates: Sequence[str]
    ) -> np.ndarray:
        rank = {item_id: len(self.order) - i for i, item_id in enumerate(self.order)}
        row = np.asarray([float(rank.get(c, 0)) for c in candidates])
        return np.tile(row, (len(user_ids), 1))


def test_recall_at_20_masks_history_and_counts_hits() -> None:
    candidates = [f"i{n}" for n in range(100)]
    holdout = HoldOut(
        users=["a", "b"],
        histories=[["i0"], []],
        targets=[["i1", "i99"], ["i50"]],
        candidates=candidates,
    )
    perfect_for_a = FixedScorer(["i0", "i1", "i99", *(f"i{n}" for n in range(2, 30))])
    # a: i0 is history (masked), i1 and i99 in the top 20 -> 1.0; b: i50 not -> 0.0
    assert recall_at_k(perfect_for_a, holdout) == pytest.approx(0.5)
    only_b = FixedScorer(["i50"])
    # a: ties broken at random among 99 items; b: hit.
    assert 0.5 <= recall_at_k(only_b, holdout) < 0.75
    with pytest.raises(ValueError, match="no held-out users"):
        recall_at_k(only_b, HoldOut([], [], [], candidates))


class BadShape:
    def score(
        self, user_ids: Sequence[str], histories: Sequence[Sequence[str]], candidates: Sequence[str]
    ) -> np.ndarray:
        return np.zeros((1, 1))


class NaNScorer:
    def score(
        self, user_ids: Sequence[str], histories: Sequence[Sequence[str]], candidates: Sequence[str]
    ) -> np.ndarray:
        return np.full((len(user_ids), len(candidates)), np.nan)


@pytest.mark.parametrize(("scorer", "message"), [(BadShape(), "shape"), (NaNScorer(), "NaN")])
def test_recall_refuses_malformed_scores(scorer: object, message: str) -> None:
    holdout = HoldOut(["a"], [[]], [["i1"]], ["i1", "i2"])
    with pytest.raises(ValueError, match=message):
        recall_at_k(scorer, holdout)  # type: ignore[arg-type]
