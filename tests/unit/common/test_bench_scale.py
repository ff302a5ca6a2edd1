"""The pure parts of `coldstart bench scale`: sizes, parts, the exponent fit, the
table and the targets (no processes, no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.scale import (
    SIZES,
    Size,
    evaluate_targets,
    exponents,
    fit_exponent,
    parse_parts,
    parse_sizes,
    synthetic_events,
    table_rows,
)


def test_sizes_run_smallest_first_once_each() -> None:
    assert [s.name for s in parse_sizes("large, small,small")] == ["small", "large"]
    assert SIZES["large"] == Size("large", 1_000_000, 100_000, 20_000_000)


@pytest.mark.parametrize("text", ["", "huge", "small,tiny"])
def test_unknown_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--sizes"):
        parse_sizes(text)


def test_parts_bring_what_they_need_in_run_order() -> None:
    assert parse_parts("training") == ("ingest", "export", "training")
    assert parse_parts("fusion,ingest") == ("ingest", "store", "snapshot", "fusion")
    assert parse_parts("recommend") == ("store", "recommend")


def test_unknown_parts_are_refused() -> None:
    with pytest.raises(ValueError, match="--only"):
        parse_parts("store,gpu")


def test_exponent_is_the_log_log_slope() -> None:
    xs = [2e5, 2e6, 2e7]
    assert fit_exponent(xs, [3e-4 * x for x in xs]) == pytest.approx(1.0)
    assert fit_exponent(xs, [x**2 for x in xs]) == pytest.approx(2.0)
    assert fit_exponent(xs, [5.0, 5.0, 5.0]) == pytest.approx(0.0, abs=1e-12)
    # Missing or unusable values leave their point out; one point is no fit.
    assert fit_exponent(xs, [None, 2.0, 20.0]) == pytest.approx(1.0)
    assert fit_exponent(xs, [0.0, None, 1.0]) is None


def point(size: str, events: int, **values: Any) -> dict[str, Any]:
    return {"size": size, "users": events // 20, "items": events // 200, "events": events,
            **values}  # fmt: skip


GOOD = [
    point("small", 200_000, trainer_s=10.0, export_s=2.0, fusion_redis_rss_mb=500.0,
          recommend_vs_echo=0.5, freshness_p99_ms=40.0, train_w1_rss_mb=1000.0,
          train_w2_rss_mb=900.0, memory_store_s=3.0),
    point("medium", 2_000_000, trainer_s=100.0, export_s=19.0, fusion_redis_rss_mb=520.0,
          recommend_vs_echo=0.4, freshness_p99_ms=60.0, train_w1_rss_mb=4000.0,
          train_w2_rss_mb=2400.0, memory_store_s=31.0),
]  # fmt: skip


def verdicts(points: list[dict[str, Any]]) -> dict[str, bool | None]:
    return {t.name: t.passed for t in evaluate_targets(points)}


def test_targets_pass_fail_and_not_measured() -> None:
    got = verdicts(GOOD)
    assert got["fusion RSS with Redis flat in users (within 10%; issue: 10k -> 1M users)"] is True
    assert got["trainer ingest time grows at most linearly in events (exponent <= 1.1)"] is True
    assert got["export time grows at most linearly in events (exponent <= 1.1)"] is True
    assert got["Recommend with Redis >= 0.35 of echo at 64 clients"] is True
    assert got["freshness p99 <= 1 s (Redis)"] is True
    assert got["per-worker RSS with 2 workers <= 0.65x 1 worker at the largest size"] is True
    # Not measured: neither a pass nor a fail.
    assert got["Redis writer apply time grows at most linearly in events (exponent <= 1.1)"] is None

    bad = [dict(p) for p in GOOD]
    bad[1].update(fusion_redis_rss_mb=600.0, export_s=200.0, recommend_vs_echo=0.3,
                  freshness_p99_ms=1500.0, train_w2_rss_mb=2800.0)  # fmt: skip
    got = verdicts(bad)
    assert got["fusion RSS with Redis flat in users (within 10%; issue: 10k -> 1M users)"] is False
    assert got["export time grows at most linearly in events (exponent <= 1.1)"] is False
    assert got["Recommend with Redis >= 0.35 of echo at 64 clients"] is False
    assert got["freshness p99 <= 1 s (Redis)"] is False
    assert got["per-worker RSS with 2 workers <= 0.65x 1 worker at the largest size"] is False
    lines = [t.line() for t in evaluate_targets(bad)]
    assert any(line.startswith("FAIL export time") for line in lines)
    assert any(line.startswith("n/a ") for line in lines)


def test_one_size_cannot_judge_growth() -> None:
    got = verdicts(GOOD[:1])
    assert got["fusion RSS with Redis flat in users (within 10%; issue: 10k -> 1M users)"] is None
    assert got["trainer ingest time grows at most linearly in events (exponent <= 1.1)"] is None
    assert got["Recommend with Redis >= 0.35 of echo at 64 clients"] is True


def test_table_has_a_column_per_size_and_the_exponent() -> None:
    rows = {r["measure"]: r for r in table_rows(GOOD)}
    assert rows["trainer ingest time"] == {"measure": "trainer ingest time", "unit": "s",
                                           "small": 10.0, "medium": 100.0, "exponent": 1.0}  # fmt: skip
    assert rows["Recommend / echo"]["exponent"] is None  # a ratio, not a cost
    assert "Redis writer apply time" not in rows  # not measured at any size
    assert exponents(GOOD)["export_s"] == pytest.approx(0.977, abs=1e-3)


def test_the_synthetic_stream_is_seeded_and_laid_out() -> None:
    size = Size("t", 5, 3, 40)
    events = synthetic_events(size, 7, 0, 40)
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds == ["item_upserted"] * 3 + ["user_registered"] * 5 + ["interaction"] * 32
    assert len(events[3].user_registered.interest_vector) == 384
    assert len({e.event_id for e in events}) == 40
    # A chunk is the same events, ids included, whoever generates it.
    again = synthetic_events(size, 7, 20, 40)
    assert [e.SerializeToString() for e in again] == [
        e.SerializeToString() for e in synthetic_events(size, 7, 20, 40)
    ]
    assert {e.interaction.item_id for e in events[8:]} <= {f"item-{i}" for i in range(3)}
    assert {e.interaction.user_id for e in events[8:]} <= {f"bench-user-{u}" for u in range(5)}
