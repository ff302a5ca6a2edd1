"""Recommendation logic, free of gRPC: the servicer converts protos to these
types and back, tests call it directly.

Each call reads ``ModelHolder.current`` once and uses that version to the end,
so a swap never changes the model under a running call, and the answer names
the version that produced it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from services.common.batcher import MicroBatcher
from services.common.errors import InvalidArgument, NotFound
from services.common.heap import freeze_long_lived
from services.common.registry import ModelRegistry, RegistryError
from services.fusion.index import ItemMeta, contained
from services.fusion.metrics import BATCHER_METRICS
from services.fusion.model_version import ModelLoadError, ModelVersion, UserInputs
from services.fusion.online_state import (
    ItemEvent,
    StateUnavailable,
    UserState,
    UserStateStore,
    UserStore,
)

log = logging.getLogger("coldstart.fusion.core")

MODEL_INFO = Gauge(
    "coldstart_fusion_model_info", "1 for the model version serving now.", ["version"]
)
MODEL_LOAD_FAILURES = Counter(
    "coldstart_fusion_model_load_failures_total",
    "Model versions that failed to load or warm; the previous version kept serving.",
    ["version"],
)
MODEL_SWAPS = Counter("coldstart_fusion_model_swaps_total", "Model versions swapped in.")
LIVE_ITEMS = Gauge(
    "coldstart_fusion_live_items", "Items upserted since start (kept across model swaps)."
)
UNUSABLE_VECTORS = Counter(
    "coldstart_fusion_unusable_vectors_total",
    "Online-state vectors ignored because their dimension does not fit the model.",
    ["what"],
)

MAX_LIST = 10_000  # exclusions, candidates, upserted items per call
POPULAR_CANDIDATES = 50
# Tower candidates for a version whose manifest does not say how many its ranker
# was trained on (the ``candidates`` setting overrides both).
DEFAULT_CANDIDATES = 200
# Reason thresholds (cosines of L2-normalised content vectors).
SIMILAR_THRESHOLD = 0.5
INTEREST_THRESHOLD = 0.3


@dataclass(frozen=True)
class UserQuery:
    user_id: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    interest_vector: Sequence[float] = ()
    recent_item_ids: Sequence[str] = ()


@dataclass(frozen=True)
class Filters:
    attribute_equals: Mapping[str, str] = field(default_factory=dict)
    tags_any: Sequence[str] = ()


@dataclass(frozen=True)
class Scored:
    item_id: str
    score: float
    reason: str = ""
    # The catalog's record of the item, for display fields on request (a reference,
    # no copy: answers that do not ask for display pay nothing).
    meta: ItemMeta | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Result:
    items: list[Scored]
    model_version: str
    new_user: bool = False
    unknown_item_ids: list[str] = field(default_factory=list)
    # The online state could not be read (Redis down): served as a new user.
    degraded: bool = False


@dataclass(frozen=True)
class ItemInput:
    item_id: str
    content_vector: Sequence[float] | np.ndarray
    text: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    tags: Sequence[str] = ()


def check_k(k: int, max_k: int) -> None:
    if not 1 <= k <= max_k:
        raise InvalidArgument("k", f"must be 1..{max_k}, got {k}")


def check_vector(name: str, values: Sequence[float] | np.ndarray, dimension: int) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    if vector.shape != (dimension,):
        raise InvalidArgument(name, f"must have {dimension} values, got {vector.size}")
    if not np.all(np.isfinite(vector)):
        raise InvalidArgument(name, "must be finite (no NaN or Inf)")
    return vector


def check_list(name: str, values: Sequence[str]) -> None:
    if len(values) > MAX_LIST:
        raise InvalidArgument(name, f"at most {MAX_LIST} entries, got {len(values)}")


class ModelHolder:
    """The serving model version, swapped atomically when the registry moves on.

    ``current`` is a single reference: readers take it once per call. Items
    upserted since start are kept here and re-applied to every new version, so a
    swap does not drop them (a version that already has the id wins: its vector
    was trained).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        load: Callable[[Path], ModelVersion],
        warm: Callable[[ModelVersion], None] = lambda _m: None,
    ) -> None:
        self.registry = registry
        self._load = load
        self.warm = warm
        self._current: ModelVersion | None = None
        self._lock = threading.Lock()  # upserts vs swap
        self._live: dict[str, ItemInput] = {}
        self._failed: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ModelVersion:
        model = self._current
        if model is None:
            raise RuntimeError("no model loaded")
        return model

    def load_initial(self) -> ModelVersion:
        """Load CURRENT or raise ModelLoadError (the caller makes it a StartupError)."""
        version = self.registry.current()
        if version is None:
            raise ModelLoadError(
                f"no model in registry {self.registry.root}: run `coldstart train` first"
            )
        model = self._load(self.registry.path(version))
        self.warm(model)
        self._install(model)
        return model

    def _install(self, model: ModelVersion) -> None:
        with self._lock:
            self._apply_items(model, list(self._live.values()), skip_base=True)
            old = self._current
            self._current = model
        if old is not None:
            MODEL_INFO.remove(old.version)
        MODEL_INFO.labels(model.version).set(1)
        log.info("model serving", extra={"version": model.version, "items": len(model.index)})

    def poll_once(self) -> bool:
        """Swap in the registry's CURRENT when it changed; True when swapped."""
        try:
            version = self.registry.current()
        except OSError:
            return False
        current = self._current
        if version is None or version == self._failed or (current and version == current.version):
            return False
        try:
            model = self._load(self.registry.path(version))
            self.warm(model)
        except (ModelLoadError, RegistryError, OSError) as exc:
            self._failed = version
            MODEL_LOAD_FAILURES.labels(version).inc()
            log.error(
                "model version failed to load; the previous one keeps serving",
                extra={"version": version, "error": str(exc)},
            )
            return False
        self._failed = None
        self._install(model)
        # The new version is as long-lived as the one at start (services/common/heap.py).
        freeze_long_lived(collect_first=False)
        MODEL_SWAPS.inc()
        return True

    def start_watcher(self, interval_s: float) -> None:
        def watch() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.poll_once()
                except Exception:  # never let the watcher die: swaps would stop for good
                    log.exception("model watcher error")

        self._thread = threading.Thread(target=watch, name="fusion-model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- live items -----------------------------------------------------------
    def upsert(self, items: Sequence[ItemInput]) -> ModelVersion:
        with self._lock:
            model = self.current
            self._apply_items(model, items, skip_base=False)
            for item in items:
                self._live[item.item_id] = item
            LIVE_ITEMS.set(len(self._live))
        return model

    def upsert_event(self, event: ItemEvent) -> None:
        assert event.content_vector is not None
        model = self.current
        if event.content_vector.shape != (model.content_dimension,):
            UNUSABLE_VECTORS.labels("item_content").inc()
            return
        if not np.all(np.isfinite(event.content_vector)):
            UNUSABLE_VECTORS.labels("item_content").inc()
            return
        self.upsert(
            [
                ItemInput(
                    event.item_id, event.content_vector, event.text, event.attributes, event.tags
                )
            ]
        )

    @staticmethod
    def _apply_items(model: ModelVersion, items: Sequence[ItemInput], *, skip_base: bool) -> None:
        usable = []
        for item in items:
            if len(item.content_vector) != model.content_dimension:
                UNUSABLE_VECTORS.labels("item_content").inc()
                continue
            row = model.index.row(item.item_id)
            if skip_base and row is not None and row < model.index.base_count:
                continue
            usable.append(item)
        if not usable:
            return
        content = np.stack([np.asarray(i.content_vector, dtype=np.float32) for i in usable])
        vectors = model.item_vectors(
            content, [i.attributes for i in usable], [i.text for i in usable]
        )
        metas = [ItemMeta(i.item_id, i.text, dict(i.attributes), tuple(i.tags)) for i in usable]
        model.index.upsert(metas, vectors, content)

    def export_items(self) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._live.values())
        return [
            {
                "id": i.item_id,
                "text": i.text,
                "attributes": dict(i.attributes),
                "tags": list(i.tags),
                "content": [float(x) for x in i.content_vector],
            }
            for i in items
        ]

    def restore_items(self, records: Iterable[Mapping[str, Any]]) -> None:
        items = [
            ItemInput(
                item_id=str(r["id"]),
                content_vector=np.asarray(r["content"], dtype=np.float32),
                text=str(r.get("text", "")),
                attributes=dict(r.get("attributes", {})),
                tags=tuple(r.get("tags", ())),
            )
            for r in records
        ]
        if items:
            self.upsert(items)


@dataclass(frozen=True)
class _Call:
    """A validated Recommend call, before its user's online state is read (one read
    for a whole batch: ``Recommender._serve``)."""

    model: ModelVersion
    query: UserQuery
    interest: np.ndarray | None  # the request's own interest vector, checked
    k: int
    excluded_rows: np.ndarray  # the request's exclusions
    eligible: np.ndarray | None  # rows passing the filters; None = no filter


@dataclass(frozen=True)
class _Request:
    """A Recommend call in the terms of the version that serves it, with its user."""

    model: ModelVersion
    user: UserInputs
    new_user: bool
    k: int
    excluded: np.ndarray  # rows never returned: exclusions + history
    eligible: np.ndarray | None  # rows passing the filters; None = no filter
    degraded: bool = False


class Recommender:
    """The calls. With ``max_batch`` > 1 concurrent Recommend calls are served in
    micro-batches (``services.common.batcher``); the answers are the same."""

    def __init__(
        self,
        holder: ModelHolder,
        store: UserStateStore,
        *,
        candidates: int = 0,
        max_k: int = 1_000,
        batch_wait_ms: float = 0.0,
        max_batch: int = 1,
        batch_workers: int = 1,
    ) -> None:
        self.holder = holder
        self.store = store
        self.candidates = candidates
        self.max_k = max_k
        self._batcher: MicroBatcher[_Call, Result] | None = (
            MicroBatcher(
                self._serve,
                wait_s=batch_wait_ms / 1000,
                max_batch=max_batch,
                workers=batch_workers,
                metrics=BATCHER_METRICS,
                name="fusion",
            )
            if max_batch > 1
            else None
        )

    def candidates_for(self, model: ModelVersion) -> int:
        """Tower candidates handed to ``model``'s ranker: the setting, else the model's."""
        return self.candidates or model.ranker_candidates or DEFAULT_CANDIDATES

    def close(self) -> None:
        """Stop the batcher thread (queued calls are served first)."""
        if self._batcher is not None:
            self._batcher.close()

    # -- user features ----------------------------------------------------------
    def _states(self, user_ids: Sequence[str]) -> tuple[list[UserState | None], bool]:
        """The online state of each user (None: unknown or no id), in one store call;
        (all None, True) when the store cannot answer: served as new users, degraded
        (the store logged and counted it), never an error."""
        wanted = [u for u in user_ids if u]
        if not wanted:
            return [None] * len(user_ids), False
        try:
            found = iter(self.store.get_many(wanted))
        except StateUnavailable:
            return [None] * len(user_ids), True
        return [next(found) if u else None for u in user_ids], False

    @staticmethod
    def _request_interest(model: ModelVersion, query: UserQuery) -> np.ndarray | None:
        if not len(query.interest_vector):
            return None
        return check_vector("user.interest_vector", query.interest_vector, model.content_dimension)

    def _user(
        self,
        model: ModelVersion,
        query: UserQuery,
        requested_interest: np.ndarray | None,
        state: UserState | None,
    ) -> tuple[bool, UserInputs]:
        """(new_user, the user's inputs in ``model``'s terms) from the request and
        the user's online ``state``."""
        new_user = state is None
        attributes = {**(state.attributes if state else {}), **query.attributes}
        interest = requested_interest
        if interest is None and state is not None and state.interest_vector is not None:
            if state.interest_vector.shape == (model.content_dimension,):
                interest = state.interest_vector
            else:  # encoded for an older model's encoder; unusable until re-registered
                UNUSABLE_VECTORS.labels("interest").inc()
        # A rating below the version's positive threshold is not a liked item: training
        # never made it history, so neither does serving (the towers, the ranker and the
        # new-item blend read history as what the user liked). The request's own ids carry
        # no value: implicit positives, liked even where the state holds a low rating (the
        # caller says they are history now).
        liked_ids: list[str] = []
        unliked_ids: list[str] = []
        if state is not None and state.ratings and model.positive_threshold > -math.inf:
            ratings, threshold = state.ratings, model.positive_threshold
            asked = set(query.recent_item_ids)
            for item_id in state.recent_item_ids:
                value = ratings.get(item_id)
                if value is not None and value < threshold and item_id not in asked:
                    unliked_ids.append(item_id)
                else:
                    liked_ids.append(item_id)
        elif state is not None:  # no ratings (or a version without a threshold): all liked
            liked_ids.extend(state.recent_item_ids)
        liked_ids.extend(query.recent_item_ids)
        history_rows = self._rows(model, liked_ids)
        unliked_rows = self._rows(model, unliked_ids)
        return new_user, UserInputs(attributes, interest, history_rows, query.user_id, unliked_rows)

    def _rows(self, model: ModelVersion, item_ids: Sequence[str]) -> np.ndarray:
        """The last ``history_length`` of ``item_ids``' rows in ``model``'s index."""
        if not item_ids:
            return np.empty(0, dtype=np.int64)
        rows = [model.index.row(i) for i in item_ids]
        # Unknown history ids are ignored: an item the model never saw says nothing yet.
        known = np.asarray([r for r in rows if r is not None], dtype=np.int64)
        return known[-self.store.history_length :]

    @staticmethod
    def _reasons(model: ModelVersion, user: UserInputs, rows: np.ndarray) -> list[str]:
        """One short reason per returned row (only the final k: cheap)."""
        return Recommender._reasons_batch(model, [user], [rows])[0]

    @staticmethod
    def _reasons_batch(
        model: ModelVersion, users: Sequence[UserInputs], tops: Sequence[np.ndarray]
    ) -> list[list[str]]:
        """``_reasons`` of several users' returned rows: two faiss calls in all."""
        index = model.index
        count = len(users)
        width = max((len(t) for t in tops), default=0)
        if width == 0:
            return [[] for _ in users]
        sizes = np.asarray([len(t) for t in tops])
        filled = np.arange(width)[None, :] < sizes[:, None]
        top_rows = np.full((count, width), -1, dtype=np.int64)
        top_rows[filled] = np.concatenate(tops)
        # Interest: each user's vector against its rows (0 without one).
        interest = np.zeros((count, index.content_dimension), dtype=np.float32)
        for u, user in enumerate(users):
            if user.interest is not None:
                interest[u] = user.interest
        interest_sim = index.content_products(interest, top_rows)
        # History: every history item's content against its user's rows, best item per row.
        depth = max(len(u.history_rows) for u in users)
        best_sim = np.full((count, width), -1.0, dtype=np.float32)
        best_row = np.zeros((count, width), dtype=np.int64)
        if depth:
            lengths = np.asarray([len(u.history_rows) for u in users])
            known = np.arange(depth)[None, :] < lengths[:, None]
            history = np.zeros((count, depth), dtype=np.int64)
            history[known] = np.concatenate([u.history_rows for u in users])
            sims = index.content_products(
                index.content(history.reshape(-1)), np.repeat(top_rows, depth, axis=0)
            ).reshape(count, depth, width)
            sims[~known] = -np.inf
            best = sims.argmax(axis=1)  # [count, width]
            best_sim = np.maximum(np.take_along_axis(sims, best[:, None, :], axis=1)[:, 0], -1.0)
            best_row = np.take_along_axis(history, best, axis=1)
        similar = (best_sim >= SIMILAR_THRESHOLD) & (best_sim >= interest_sim)
        matches = interest_sim >= INTEREST_THRESHOLD
        out: list[list[str]] = []
        for u, (user, size) in enumerate(zip(users, sizes.tolist(), strict=True)):
            attributes = user.attributes
            segment = ", ".join(attributes[k] for k in sorted(attributes)) or "new users"
            popular = f"popular with {segment}"
            reasons = []
            for i, (is_similar, is_match) in enumerate(
                zip(similar[u, :size].tolist(), matches[u, :size].tolist(), strict=True)
            ):
                if is_similar:
                    liked = index.meta(int(best_row[u, i]))
                    reasons.append(f"similar to {liked.title or liked.item_id}")
                elif is_match:
                    reasons.append("matches your interests")
                else:
                    reasons.append(popular)
            out.append(reasons)
        return out

    # -- the calls --------------------------------------------------------------
    def recommend(
        self,
        query: UserQuery,
        k: int,
        exclude_item_ids: Sequence[str] = (),
        filters: Filters | None = None,
        *,
        deadline: float | None = None,
    ) -> Result:
        """Top ``k``; ``deadline`` (``time.monotonic()``): drop the call if it is still
        queued for a batch by then."""
        call = self._prepare(query, k, exclude_item_ids, filters)
        if self._batcher is None:
            result = self._serve([call])[0]
            if isinstance(result, BaseException):
                raise result
            return result
        return self._batcher.submit(call, deadline)

    def _prepare(
        self,
        query: UserQuery,
        k: int,
        exclude_item_ids: Sequence[str] = (),
        filters: Filters | None = None,
    ) -> _Call:
        """Validate a call and put it in the terms of the version serving now (the
        request alone: its user's state is read with its batch's)."""
        check_k(k, self.max_k)
        check_list("exclude_item_ids", exclude_item_ids)
        check_list("user.recent_item_ids", query.recent_item_ids)
        model = self.holder.current
        interest = self._request_interest(model, query)
        index = model.index
        # Unknown exclusion ids are ignored: nothing by that id can be returned anyway.
        excluded_rows = np.asarray(
            [r for r in map(index.row, exclude_item_ids) if r is not None], np.int64
        )
        filters = filters or Filters()
        eligible = index.eligible(filters.attribute_equals, filters.tags_any)
        return _Call(model, query, interest, k, excluded_rows, eligible)

    def _request(
        self,
        query: UserQuery,
        k: int,
        exclude_item_ids: Sequence[str] = (),
        filters: Filters | None = None,
    ) -> _Request:
        """One call with its user, as a batch of one builds it (tests look inside)."""
        call = self._prepare(query, k, exclude_item_ids, filters)
        states, degraded = self._states([query.user_id])
        return self._with_user(call, states[0], degraded)

    def _with_user(self, call: _Call, state: UserState | None, degraded: bool) -> _Request:
        new_user, user = self._user(call.model, call.query, call.interest, state)
        # What the user already interacted with is not recommended again, liked or not.
        if len(call.excluded_rows) or len(user.unliked_rows):
            excluded = np.unique(
                np.concatenate([call.excluded_rows, user.history_rows, user.unliked_rows])
            )
        else:
            excluded = np.unique(user.history_rows)
        return _Request(
            call.model, user, new_user, call.k, excluded, call.eligible, degraded=degraded
        )

    def _serve(self, calls: Sequence[_Call]) -> list[Result | BaseException]:
        """Answer ``calls`` together: one online-state read for all their users, then
        each group of one version in one pass."""
        states, degraded = self._states([c.query.user_id for c in calls])
        out: list[Result | BaseException] = [ValueError("not served")] * len(calls)
        requests: list[_Request] = []
        numbers: list[int] = []
        for n, (call, state) in enumerate(zip(calls, states, strict=True)):
            try:
                requests.append(self._with_user(call, state, degraded))
                numbers.append(n)
            except Exception as exc:  # that call's answer; the others are served
                out[n] = exc
        for n, result in zip(numbers, self._serve_requests(requests), strict=True):
            out[n] = result
        return out

    def _serve_requests(self, requests: Sequence[_Request]) -> list[Result | BaseException]:
        by_model: dict[int, list[int]] = {}
        for n, request in enumerate(requests):
            by_model.setdefault(id(request.model), []).append(n)
        out: list[Result | BaseException] = [ValueError("not served")] * len(requests)
        for numbers in by_model.values():
            served = self._serve_version([requests[n] for n in numbers])
            for n, result in zip(numbers, served, strict=True):
                out[n] = result
        return out

    def _serve_version(self, requests: Sequence[_Request]) -> list[Result]:
        """One version's batch. Per-call numpy steps are few on purpose: each costs
        ~1 us of GIL, and under load the GIL, not the cores, bounds the service."""
        model = requests[0].model
        index = model.index
        users = [r.user for r in requests]
        user_vecs = model.user_vector_batch(users)
        found = index.search_batch(
            user_vecs,
            [max(self.candidates_for(model), r.k) for r in requests],
            eligibles=[r.eligible for r in requests],
            excludeds=[r.excluded for r in requests],
        )
        popular, popular_dots = self._popular_candidates(index, requests, found, user_vecs)
        # Candidates: the search's rows (its scores are the tower scores, user .
        # item), then the popular rows it did not find.
        candidates = [
            np.concatenate([rows, extra]) for (rows, _s), extra in zip(found, popular, strict=True)
        ]
        dots = [
            np.concatenate([row_dots, extra]).astype(np.float32, copy=False)
            for (_r, row_dots), extra in zip(found, popular_dots, strict=True)
        ]
        scores = model.rank_batch(users, candidates, user_vecs, dots)
        # Every call's top k in one sort: scores padded with -inf to one width.
        sizes = np.asarray([len(c) for c in candidates])
        width = int(sizes.max(initial=0))
        filled = np.arange(width)[None, :] < sizes[:, None]
        padded = np.full(filled.shape, -np.inf, dtype=np.float32)
        if width:
            padded[filled] = np.concatenate(scores)
        order = np.argsort(-padded, axis=1, kind="stable")
        tops: list[np.ndarray] = []
        top_scores: list[list[float]] = []
        for n, (request, rows, row_scores, size) in enumerate(
            zip(requests, candidates, scores, sizes.tolist(), strict=True)
        ):
            picked = order[n, : min(request.k, size)]
            tops.append(rows[picked])
            top_scores.append(row_scores[picked].tolist())
        reasons = self._reasons_batch(model, users, tops)
        meta = index.meta
        return [
            Result(
                [
                    Scored(item.item_id, score, reason, item)
                    for item, score, reason in zip(
                        map(meta, top.tolist()), values, why, strict=True
                    )
                ],
                model.version,
                request.new_user,
                degraded=request.degraded,
            )
            for request, top, values, why in zip(requests, tops, top_scores, reasons, strict=True)
        ]

    @staticmethod
    def _popular_candidates(
        index: Any,
        requests: Sequence[_Request],
        found: Sequence[tuple[np.ndarray, np.ndarray]],
        user_vecs: np.ndarray,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each call's POPULAR_CANDIDATES most popular rows that pass its filter and
        exclusions, less those its search found, with their tower scores."""
        count = len(requests)
        excluded_counts = np.asarray([len(r.excluded) for r in requests])
        # popular(n) is a prefix of popular(m) for n < m: one look-up for the batch.
        head = index.popular(POPULAR_CANDIDATES * 4 + int(excluded_counts.max()))
        # A call looks at the first POPULAR_CANDIDATES * 4 + (its exclusions) of them.
        allowed = (
            np.arange(len(head))[None, :] < (POPULAR_CANDIDATES * 4 + excluded_counts)[:, None]
        )
        for n, request in enumerate(requests):
            if request.eligible is not None:
                allowed[n] &= np.isin(head, request.eligible)
        # (call, row) pairs as one key each: one look-up per question for the batch.
        stride = np.int64(max(index.row_count, 1))
        keys = head[None, :].astype(np.int64) + np.arange(count, dtype=np.int64)[:, None] * stride
        blocked = [(n, r.excluded) for n, r in enumerate(requests) if len(r.excluded)]
        if blocked:
            allowed &= ~contained(keys, np.concatenate([e + n * stride for n, e in blocked]))
        allowed &= np.cumsum(allowed, axis=1) <= POPULAR_CANDIDATES
        searched = [rows + n * stride for n, (rows, _s) in enumerate(found) if len(rows)]
        if searched:
            allowed &= ~contained(keys, np.concatenate(searched))
        head_dots = user_vecs @ index.vectors(head).T  # [count, len(head)]
        rows = [head[a] for a in allowed]
        dots = [d[a] for d, a in zip(head_dots, allowed, strict=True)]
        return rows, dots

    def rank(self, query: UserQuery, candidate_item_ids: Sequence[str]) -> Result:
        check_list("candidate_item_ids", candidate_item_ids)
        check_list("user.recent_item_ids", query.recent_item_ids)
        model = self.holder.current
        interest = self._request_interest(model, query)
        states, degraded = self._states([query.user_id])
        new_user, user = self._user(model, query, interest, states[0])
        seen: set[str] = set()
        known: list[int] = []
        unknown: list[str] = []
        for item_id in candidate_item_ids:
            if item_id in seen:  # a repeated candidate is ranked once
                continue
            seen.add(item_id)
            row = model.index.row(item_id)
            if row is None:
                unknown.append(item_id)
            else:
                known.append(row)
        if not known:
            return Result([], model.version, new_user, unknown, degraded=degraded)
        user_vec = model.user_vector(user)
        rows = np.asarray(known, dtype=np.int64)
        scores = model.rank(user, rows, user_vec)
        order = np.argsort(-scores, kind="stable")
        reasons = self._reasons(model, user, rows[order])
        metas = [model.index.meta(int(rows[i])) for i in order]
        items = [
            Scored(item.item_id, float(scores[i]), reason, item)
            for i, item, reason in zip(order, metas, reasons, strict=True)
        ]
        return Result(items, model.version, new_user, unknown, degraded=degraded)

    def similar_items(self, item_id: str, k: int) -> Result:
        check_k(k, self.max_k)
        if not item_id:
            raise InvalidArgument("item_id", "must not be empty")
        model = self.holder.current
        row = model.index.row(item_id)
        if row is None:
            raise NotFound(f"item_id: unknown item {item_id!r}")
        meta = model.index.meta(row)
        rows, scores = model.index.search(
            model.similarity_query(row), k, excluded=np.asarray([row])
        )
        reason = f"similar to {meta.title or meta.item_id}"
        items = [
            Scored(item.item_id, float(s), reason, item)
            for item, s in zip(map(model.index.meta, rows.tolist()), scores, strict=True)
        ]
        return Result(items, model.version)

    def upsert_items(self, items: Sequence[ItemInput]) -> tuple[int, str]:
        if not items:
            raise InvalidArgument("items", "must not be empty")
        check_list("items", [i.item_id for i in items])
        model = self.holder.current
        checked: dict[str, ItemInput] = {}
        for n, item in enumerate(items):
            if not item.item_id:
                raise InvalidArgument(f"items[{n}].item_id", "must not be empty")
            vector = check_vector(
                f"items[{n}].content_vector", item.content_vector, model.content_dimension
            )
            # A repeated id in one call: the last record wins, as with two calls.
            checked[item.item_id] = ItemInput(
                item.item_id, vector, item.text, dict(item.attributes), tuple(item.tags)
            )
        used = self.holder.upsert(list(checked.values()))
        return len(checked), used.version

    def warm(self, model: ModelVersion) -> None:
        """A few calls on ``model`` before it serves (first-run allocations, caches)."""
        probe = Recommender(_Fixed(model), UserStore(), candidates=self.candidates)  # type: ignore[arg-type]
        some = [model.index.meta(r).item_id for r in model.index.popular(3)]
        for _ in range(3):
            probe.recommend(UserQuery(), 10)
            probe.recommend(UserQuery(recent_item_ids=some), 10)
        if not all(math.isfinite(s.score) for s in probe.recommend(UserQuery(), 10).items):
            raise ModelLoadError(f"{model.version}: warm-up produced non-finite scores")


class _Fixed:
    """A holder stand-in that always returns one model (for warm-up)."""

    def __init__(self, model: ModelVersion) -> None:
        self.current = model
