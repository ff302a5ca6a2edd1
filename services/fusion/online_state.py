"""Online user state materialised from the events topic, and its snapshots.

One consumer thread applies events in partition order into ``UserStore``,
watched by the shared stall guard (``services.common.kafka_consumer``): a poll
loop silent for ``STALLED_AFTER_S`` is abandoned and a new consumer and thread
take over from the offsets applied so far; a consumer whose polls return
nothing while the partitions have a backlog is recreated in its thread.
Every replica must see every event, so the consumer ``assign()``s itself all
partitions (no consumer group, nothing committed to Kafka); the offsets live in
the snapshot next to the state they produced. A snapshot is taken in the
consumer thread between polls (state and offsets agree), serialised by a writer
thread, and written atomically (tmp + fsync + rename). On start the service
loads the snapshot and seeks each partition to its stored next offset: nothing
is replayed twice in effect (event ids are deduplicated too) and nothing is
skipped.

``UserState`` objects are immutable and replaced whole, so request threads read
a user's state without locks while the consumer writes.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from coldstart.v1 import events_pb2
from prometheus_client import Counter, Gauge

from services.common.events import EventDecodeError, decode_event
from services.common.kafka_consumer import (
    STALLED_AFTER_S,
    ConsumerGuard,
    ConsumerStalled,
    close_consumer,
    consumer_options,
    make_consumer,
)
from services.fusion.snapshot import (
    SnapshotCorrupt,
    Streamed,
    UserColumns,
    factorize,
    is_columnar,
    read_file,
    write_file,
)

log = logging.getLogger("coldstart.fusion.state")

EVENTS_APPLIED = Counter(
    "coldstart_fusion_events_applied_total", "Events applied to the online state.", ["kind"]
)
EVENTS_SKIPPED = Counter(
    "coldstart_fusion_events_skipped_total",
    "Events not applied (undecodable, duplicate, unusable), by reason.",
    ["reason"],
)
ONLINE_USERS = Gauge("coldstart_fusion_online_users", "Users held in the online state.")
SNAPSHOTS = Counter(
    "coldstart_fusion_snapshots_total", "Snapshots written, by outcome.", ["outcome"]
)
STATE_ERRORS = Counter(
    "coldstart_fusion_state_errors_total",
    "Online-state store calls that failed (read: the batch was served as new users, "
    "flagged degraded; write: the events are retried, not lost), by operation.",
    ["op"],
)
CONSUMER_RESTARTS = Counter(
    "coldstart_fusion_consumer_restarts_total",
    "Event consumers replaced by the stall guard: stalled (poll loop silent; a new "
    "thread takes over) or not_fetching (empty polls with a backlog).",
    ["reason"],
)

# Binary and columnar (services/fusion/snapshot.py); before it, one JSON document
# (format 1) in state.json, still read when no state.bin is there (the first restart
# after an upgrade) and removed once a state.bin is durable.
SNAPSHOT_FILE = "state.bin"
SNAPSHOT_FORMAT = 2
LEGACY_SNAPSHOT_FILE = "state.json"
LEGACY_SNAPSHOT_FORMAT = 1
# Interest vectors are copied into the file this many users at a time, so the writer
# never holds a second copy of all of them.
VECTOR_CHUNK_USERS = 65_536
# Event ids remembered for deduplication (producers' retries arrive close together).
SEEN_EVENT_IDS = 100_000


@dataclass(frozen=True)
class UserState:
    attributes: Mapping[str, str] = field(default_factory=dict)
    interest_vector: np.ndarray | None = None
    recent_item_ids: tuple[str, ...] = ()
    updated_at_ms: int = 0
    # item id -> value of its latest interaction when that was a "rating" (only ids in
    # recent_item_ids). The model version's positive threshold decides which of them are
    # liked (core.py); other kinds are implicit positives and have no entry.
    ratings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemEvent:
    """An item_upserted event, handed to the model holder's live index."""

    item_id: str
    text: str
    attributes: Mapping[str, str]
    tags: tuple[str, ...]
    content_vector: np.ndarray | None


Encoder = Callable[[str], np.ndarray | None]


def _vector_from_text(text: str | None) -> np.ndarray | None:
    if not text:
        return None
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


USER_EVENT_KINDS = frozenset({"user_registered", "interaction", "user_forgotten"})


class StateUnavailable(RuntimeError):
    """The store cannot answer now (Redis down or too slow); nothing was applied."""


class UserStateStore(Protocol):
    """What fusion reads user state through, and the event consumers write through.

    Backends: ``UserStore`` (in process, the default) and
    ``services.fusion.redis_state.RedisUserStore``; both pass
    tests/support/state_contract.py. ``get_many`` answers one micro-batch's users in
    one call and raises ``StateUnavailable`` rather than hang or half-answer.
    ``apply_events`` applies user events in order, each event id at most once across
    every writer, a user's events of one call together; it raises
    ``StateUnavailable`` when the store could not take them (the caller retries
    the same events: applied ones are then skipped as duplicates).
    """

    history_length: int

    def get_many(self, user_ids: Sequence[str]) -> list[UserState | None]: ...

    def apply_events(self, events: Iterable[events_pb2.Event]) -> int: ...

    def apply(self, event: events_pb2.Event) -> bool: ...


def event_user_id(event: events_pb2.Event) -> str | None:
    """The user a user event is about; None for any other kind."""
    kind = event.WhichOneof("payload")
    if kind == "user_registered":
        return event.user_registered.user_id
    if kind == "interaction":
        return event.interaction.user_id
    if kind == "user_forgotten":
        return event.user_forgotten.user_id
    return None


def next_user_state(
    previous: UserState | None,
    event: events_pb2.Event,
    history_length: int,
    encode: Callable[[str], np.ndarray | None],
) -> UserState | None:
    """The user's state after one user event (None: forgotten); every backend
    applies events through this, so they agree on what an event does."""
    kind = event.WhichOneof("payload")
    now = event.timestamp_ms or int(time.time() * 1000)
    if kind == "user_registered":
        reg = event.user_registered
        vector: np.ndarray | None = None
        if len(reg.interest_vector):
            vector = np.asarray(reg.interest_vector, dtype=np.float32)
        elif reg.interest_text:
            vector = encode(reg.interest_text)
        return UserState(
            attributes=dict(reg.attributes),
            interest_vector=vector,
            recent_item_ids=previous.recent_item_ids if previous else (),
            updated_at_ms=now,
            ratings=previous.ratings if previous else {},
        )
    if kind == "interaction":
        inter = event.interaction
        previous = previous or UserState()
        # A repeat moves the item to the end instead of filling history with copies.
        recent = [i for i in previous.recent_item_ids if i != inter.item_id]
        recent.append(inter.item_id)
        kept = tuple(recent[-history_length:])
        # The latest interaction decides: a rating records its value, any other kind
        # (an implicit positive) clears an older rating of the item.
        ratings = {i: v for i, v in previous.ratings.items() if i != inter.item_id}
        if inter.kind == "rating":
            ratings[inter.item_id] = float(inter.value)
        for dropped in recent[:-history_length]:
            ratings.pop(dropped, None)
        return UserState(
            attributes=previous.attributes,
            interest_vector=previous.interest_vector,
            recent_item_ids=kept,
            updated_at_ms=now,
            ratings=ratings,
        )
    if kind == "user_forgotten":
        return None
    raise ValueError(f"not a user event: {kind}")


class InterestEncoder:
    """Interest text -> vector through the encoder, for events that carry text but no
    vector; without an encoder the vector stays unset (said once in the log)."""

    def __init__(self, encoder: Encoder | None) -> None:
        self.encoder = encoder
        self._warned = False

    def __call__(self, text: str) -> np.ndarray | None:
        if self.encoder is None:
            if not self._warned:
                log.warning("no encoder_address: interest text without a vector is left unset")
                self._warned = True
            return None
        return self.encoder(text)


class UserStore:
    """user id -> UserState; written by one thread, read by many."""

    def __init__(
        self,
        history_length: int = 200,
        encoder: Encoder | None = None,
        on_item: Callable[[ItemEvent], None] | None = None,
        *,
        user_events: bool = True,
    ) -> None:
        self.history_length = history_length
        self.encoder = encoder
        self.on_item = on_item
        # False: only item events are applied here (the users live in Redis; every
        # replica still needs every item upsert for its live index).
        self.user_events = user_events
        self._users: dict[str, UserState] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._encode = InterestEncoder(encoder)

    def get(self, user_id: str) -> UserState | None:
        return self._users.get(user_id)

    def __len__(self) -> int:
        return len(self._users)

    def get_many(self, user_ids: Sequence[str]) -> list[UserState | None]:
        users = self._users
        return [users.get(u) for u in user_ids]

    def apply_events(self, events: Iterable[events_pb2.Event]) -> int:
        return sum(self.apply(event) for event in events)

    def apply(self, event: events_pb2.Event) -> bool:
        """Apply one decoded event; False when it was a duplicate or unusable."""
        kind = event.WhichOneof("payload")
        if kind in USER_EVENT_KINDS and not self.user_events:
            return False  # another store keeps the users (state_backend = "redis")
        if event.event_id in self._seen:
            EVENTS_SKIPPED.labels("duplicate").inc()
            return False
        self._seen[event.event_id] = None
        if len(self._seen) > SEEN_EVENT_IDS:
            self._seen.popitem(last=False)
        user_id = event_user_id(event)
        if user_id is not None:
            state = next_user_state(
                self._users.get(user_id), event, self.history_length, self._encode
            )
            if state is None:
                self._users.pop(user_id, None)
            else:
                self._users[user_id] = state
        elif kind == "item_upserted":
            up = event.item_upserted
            content: np.ndarray | None = None
            if len(up.content_vector):
                content = np.asarray(up.content_vector, dtype=np.float32)
            elif up.text:
                content = self._encode(up.text)
            if content is None or self.on_item is None:
                EVENTS_SKIPPED.labels("item_without_vector").inc()
            else:
                self.on_item(
                    ItemEvent(up.item_id, up.text, dict(up.attributes), tuple(up.tags), content)
                )
        else:  # decode_event guarantees a payload; a newer kind is skipped, not fatal
            EVENTS_SKIPPED.labels("unknown_kind").inc()
            return False
        assert kind is not None
        EVENTS_APPLIED.labels(kind).inc()
        ONLINE_USERS.set(len(self._users))
        return True

    # -- snapshot (de)serialisation ----------------------------------------
    def capture(self) -> dict[str, Any]:
        """Cheap, consistent copy (states are immutable); ``encode`` makes it columns."""
        return {"users": dict(self._users), "seen": list(self._seen)}

    @staticmethod
    def encode(captured: Mapping[str, Any]) -> dict[str, Any]:
        """A ``capture`` in columns, for ``write_snapshot``; it walks every user, so it
        runs in the writer thread, outside the apply lock. The interest vectors are not
        copied here: the writer streams them (``VECTOR_CHUNK_USERS`` at a time)."""
        users: Mapping[str, UserState] = captured["users"]
        states = list(users.values())
        n = len(states)

        def bounds(counts: Iterable[int]) -> np.ndarray:
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(np.fromiter(counts, np.int64, n), out=offsets[1:])
            return offsets

        recents = [s.recent_item_ids for s in states]
        item_offsets = bounds(map(len, recents))
        item_count = int(item_offsets[-1])
        # Rated items are recent items: one table for both.
        rated = [s.ratings for s in states]
        rating_offsets = bounds(map(len, rated))
        codes, item_table = factorize(
            list(chain(chain.from_iterable(recents), chain.from_iterable(rated)))
        )
        rating_values = np.fromiter(
            chain.from_iterable(r.values() for r in rated), np.float64, int(rating_offsets[-1])
        )

        attributes = [s.attributes for s in states]
        attr_offsets = bounds(map(len, attributes))
        keys = list(chain.from_iterable(a.keys() for a in attributes))
        values = list(chain.from_iterable(a.values() for a in attributes))
        attr_codes, attr_table = factorize(keys + values)

        vectors = [s.interest_vector for s in states]
        vector_offsets = bounds(0 if v is None else v.size for v in vectors)

        def vector_chunks() -> Iterable[np.ndarray]:
            for first in range(0, n, VECTOR_CHUNK_USERS):
                chunk = [
                    v
                    for v in vectors[first : first + VECTOR_CHUNK_USERS]
                    if v is not None and v.size
                ]
                if not chunk:
                    continue
                try:
                    joined = np.concatenate(chunk)
                except ValueError:  # not all 1-d (an encoder's (1, d)); rare, and slower
                    joined = np.concatenate([np.ravel(v) for v in chunk])
                yield joined.astype("<f4", copy=False)

        columns = UserColumns(
            user_ids=list(users),
            updated_at_ms=np.fromiter((s.updated_at_ms for s in states), np.int64, n),
            attr_offsets=attr_offsets,
            attr_keys=attr_codes[: len(keys)],
            attr_values=attr_codes[len(keys) :],
            attr_table=attr_table,
            item_offsets=item_offsets,
            item_codes=codes[:item_count],
            item_table=item_table,
            rating_offsets=rating_offsets,
            rating_codes=codes[item_count:],
            rating_values=rating_values,
            vector_offsets=vector_offsets,
            vectors=Streamed("<f4", int(vector_offsets[-1]), vector_chunks),
            seen=list(captured["seen"]),
        )
        return {"columns": columns}

    def restore(self, document: Mapping[str, Any]) -> None:
        """From ``read_snapshot``: columns, or a format-1 JSON document."""
        columns = document.get("columns")
        if isinstance(columns, UserColumns):
            self._users = self._restored_columns(columns)
            seen: Iterable[str] = columns.seen
        else:
            users = document.get("users", {})
            self._users = {uid: self._restored(raw) for uid, raw in users.items()}
            seen = document.get("seen", [])
        self._seen = OrderedDict.fromkeys(seen)
        ONLINE_USERS.set(len(self._users))

    def _restored_columns(self, columns: UserColumns) -> dict[str, UserState]:
        cap = self.history_length
        # Object arrays index in C: every user's item ids are references into one table.
        items = np.array(columns.item_table, dtype=object)[columns.item_codes].tolist()
        table = np.array(columns.attr_table, dtype=object)
        keys = table[columns.attr_keys].tolist()
        values = table[columns.attr_values].tolist()
        item_offsets = columns.item_offsets.tolist()
        attr_offsets = columns.attr_offsets.tolist()
        vector_offsets = columns.vector_offsets.tolist()
        times = columns.updated_at_ms.tolist()
        vectors = columns.vectors
        assert isinstance(vectors, np.ndarray)  # (read_snapshot's columns)

        rated = np.array(columns.item_table, dtype=object)[columns.rating_codes].tolist()
        rating_values = columns.rating_values.tolist()
        rating_offsets = columns.rating_offsets.tolist()

        users: dict[str, UserState] = {}
        for u, uid in enumerate(columns.user_ids):
            first, last = item_offsets[u], item_offsets[u + 1]
            r0, r1 = rating_offsets[u], rating_offsets[u + 1]
            ratings = dict(zip(rated[r0:r1], rating_values[r0:r1], strict=True))
            # (a cap of 0 keeps everything, as slicing [-0:] does in apply)
            if 0 < cap < last - first:
                first = last - cap
                # A shorter history keeps the ratings of the ids it keeps only.
                kept = set(items[first:last])
                ratings = {i: v for i, v in ratings.items() if i in kept}
            a0, a1 = attr_offsets[u], attr_offsets[u + 1]
            v0, v1 = vector_offsets[u], vector_offsets[u + 1]
            users[uid] = UserState(
                attributes=dict(zip(keys[a0:a1], values[a0:a1], strict=True)),
                # A copy per user: a forgotten user's vector is freed, not pinned by a
                # view into everyone's.
                interest_vector=vectors[v0:v1].copy() if v1 > v0 else None,
                recent_item_ids=tuple(items[first:last]),
                updated_at_ms=times[u],
                ratings=ratings,
            )
        return users

    def _restored(self, raw: Mapping[str, Any]) -> UserState:
        """One user of a format-1 (JSON) snapshot."""
        recent = tuple(str(i) for i in raw["r"])[-self.history_length :]
        # A snapshot from before ratings were kept has no "g": every item counts as
        # liked, as it did when that snapshot was written.
        kept = set(recent)
        ratings = {str(i): float(v) for i, v in raw.get("g", {}).items() if i in kept}
        return UserState(
            attributes=dict(raw["a"]),
            interest_vector=_vector_from_text(raw.get("v")),
            recent_item_ids=recent,
            updated_at_ms=int(raw.get("t", 0)),
            ratings=ratings,
        )


def write_snapshot(path: Path, document: Mapping[str, Any]) -> None:
    """The one writer: ``document`` (topic, offsets, items, ...) plus the ``columns``
    of ``UserStore.encode``, atomically (services/fusion/snapshot.py: write_file)."""
    columns: UserColumns = document["columns"]
    header = {k: v for k, v in document.items() if k != "columns"}
    header["format"] = SNAPSHOT_FORMAT
    write_file(path, header, columns.sections())
    if path.name != LEGACY_SNAPSHOT_FILE:
        # The new file is durable; the pre-upgrade JSON would only ever stand in for it.
        path.with_name(LEGACY_SNAPSHOT_FILE).unlink(missing_ok=True)


def read_snapshot(path: Path) -> dict[str, Any] | None:
    """The one reader: a columnar snapshot (``"columns"``: ``UserColumns``) or a
    format-1 JSON one (``"users"``, ``"seen"``), told apart by the first bytes; None
    (replay from the start) when there is none or it cannot be read."""
    if path.name != LEGACY_SNAPSHOT_FILE and not path.exists():
        legacy = path.with_name(LEGACY_SNAPSHOT_FILE)
        if legacy.exists():  # the first start after the upgrade
            path = legacy
    try:
        if is_columnar(path):
            header, arrays = read_file(path)
            if header.get("format") != SNAPSHOT_FORMAT:
                log.error("snapshot format unknown, replaying the topic from the start")
                return None
            header["columns"] = UserColumns.from_sections(arrays)
            return header
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (SnapshotCorrupt, json.JSONDecodeError, UnicodeDecodeError) as exc:
        # An atomic write never leaves this; a disk that did gets a full replay, loudly.
        log.error(
            "snapshot unreadable, replaying the topic from the start", extra={"error": str(exc)}
        )
        return None
    if not isinstance(document, dict) or document.get("format") != LEGACY_SNAPSHOT_FORMAT:
        log.error("snapshot format unknown, replaying the topic from the start")
        return None
    return document


class EventConsumer:
    """The thread that keeps ``UserStore`` up to date from the events topic.

    Only the current *generation*'s thread applies events: the stall watchdog
    bumps the generation under ``_lock`` before it starts a replacement, and a
    thread checks it under the same lock before applying a batch, so an
    abandoned thread whose poll returns late applies nothing (the replacement
    re-reads that batch from the applied offsets).
    """

    def __init__(
        self,
        store: UserStore,
        bootstrap: str,
        topic: str,
        snapshot_path: Path,
        *,
        snapshot_interval_s: float = 5.0,
        poll_timeout_ms: int = 50,
        export_items: Callable[[], list[dict[str, Any]]] = list,
        restore_items: Callable[[Iterable[Mapping[str, Any]]], None] | None = None,
        stalled_after_s: float | None = None,
        consumer_factory: Callable[[], Any] | None = None,
    ) -> None:
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        self.store = store
        self.topic = topic
        self.snapshot_path = snapshot_path
        self.snapshot_interval_s = snapshot_interval_s
        self.poll_timeout_ms = poll_timeout_ms
        self.export_items = export_items
        self.stalled_after_s = STALLED_AFTER_S if stalled_after_s is None else stalled_after_s

        def new_consumer() -> Any:
            # No group (assign(): every replica reads every partition).
            options = consumer_options(
                client_id=f"fusion-{uuid.uuid4().hex[:8]}", fetch_max_wait_ms=poll_timeout_ms
            )
            return make_consumer(bootstrap, None, **options)

        self._new_consumer = consumer_factory or new_consumer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        # Held while a batch is applied and while the generation changes.
        self._lock = threading.Lock()
        self._generation = 0
        self.applied = 0
        try:
            self.consumer = self._new_consumer()
        except KafkaError as exc:
            raise ConnectionError(f"kafka_bootstrap {bootstrap}: {type(exc).__name__}") from None
        partitions: set[int] | None = None
        for _ in range(100):  # metadata arrives after the first round trip
            partitions = self.consumer.partitions_for_topic(topic)
            if partitions:
                break
            time.sleep(0.1)
        if not partitions:
            self.consumer.close()
            raise ConnectionError(f"events_topic {topic!r}: not found on {bootstrap}")
        self.partitions = [TopicPartition(topic, p) for p in sorted(partitions)]
        snapshot = read_snapshot(snapshot_path)
        # partition -> next offset after what the store holds (a replacement seeks here)
        self._offsets: dict[int, int] = {}
        if snapshot is not None and snapshot.get("topic") == topic:
            store.restore(snapshot)
            if restore_items is not None:
                restore_items(snapshot.get("items", []))
            self._offsets = {int(k): int(v) for k, v in snapshot.get("offsets", {}).items()}
            log.info(
                "snapshot loaded",
                extra={"users": len(store), "offsets": self._offsets, "path": str(snapshot_path)},
            )
        self._assign(self.consumer, self._offsets)
        self._guard = self._make_guard()

    @staticmethod
    def _make_guard() -> ConsumerGuard:
        return ConsumerGuard("fusion", lambda reason: CONSUMER_RESTARTS.labels(reason).inc())

    def _assign(self, consumer: Any, offsets: Mapping[int, int]) -> None:
        consumer.assign(self.partitions)
        for tp in self.partitions:
            if tp.partition in offsets:
                consumer.seek(tp, offsets[tp.partition])
            else:
                consumer.seek_to_beginning(tp)

    def start(self) -> None:
        self._guard.started()
        self._start_loop(self._generation, self.consumer, self._guard)
        self._watchdog = threading.Thread(
            target=self._watch, name="fusion-events-watchdog", daemon=True
        )
        self._watchdog.start()

    def _start_loop(self, generation: int, consumer: Any, guard: ConsumerGuard) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(generation, consumer, guard), name="fusion-events", daemon=True
        )
        self._thread.start()

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self._stop.is_set()

    def _run(self, generation: int, consumer: Any, guard: ConsumerGuard) -> None:
        last_snapshot = time.monotonic()
        dirty = False
        while self._current(generation):
            try:
                batches = guard.poll(consumer, timeout_ms=self.poll_timeout_ms)
            except ConsumerStalled:  # (logged and counted by the guard)
                replaced = self._renew(generation, consumer, guard)
                if replaced is None:
                    return
                consumer = replaced
                continue
            except Exception:
                if not self._current(generation):
                    return  # an abandoned consumer, closed under it
                # A broker hiccup: kafka-python reconnects on the next poll.
                log.exception("poll failed; retrying")
                self._stop.wait(0.5)
                continue
            with self._lock:
                if generation != self._generation:
                    return  # superseded: the replacement re-reads this batch
                for records in batches.values():
                    for record in records:
                        dirty = True
                        self._offsets[record.partition] = record.offset + 1
                        self._apply(record.value)
                        guard.progress()  # a long batch (encoder calls) is no stall
                if dirty and time.monotonic() - last_snapshot >= self.snapshot_interval_s:
                    self._snapshot_async(self._capture(consumer))
                    last_snapshot = time.monotonic()
                    dirty = False
        with self._lock:
            if generation != self._generation:
                return
            # Final snapshot on a clean stop, written before close returns.
            document = self._capture(consumer)
        self._write(document)

    def _apply(self, value: bytes | None) -> None:
        try:
            event = decode_event(value)
        except EventDecodeError as exc:
            EVENTS_SKIPPED.labels(exc.reason).inc()
            return
        try:
            if self.store.apply(event):
                self.applied += 1
        except Exception:
            # One bad event must not stop the state for everyone.
            EVENTS_SKIPPED.labels("apply_failed").inc()
            log.exception("applying an event failed", extra={"event_id": event.event_id})

    def _renew(self, generation: int, old: Any, guard: ConsumerGuard) -> Any | None:
        """A new consumer for this thread at the applied offsets; None if superseded."""
        close_consumer(old)
        while self._current(generation):
            with self._lock:
                offsets = dict(self._offsets)
            try:
                consumer = self._new_consumer()
                self._assign(consumer, offsets)
            except Exception:
                log.exception("cannot make a new event consumer; retrying")
                guard.progress()  # retrying is moving; a hang here is left to the watchdog
                self._stop.wait(1.0)
                continue
            guard.started()
            with self._lock:
                if generation == self._generation:
                    self.consumer = consumer
                    return consumer
            close_consumer(consumer)
        return None

    def _watch(self) -> None:
        """Replace a poll loop that stopped moving (a poll that never returns)."""
        period = min(1.0, self.stalled_after_s / 4)
        while not self._stop.wait(period):
            guard = self._guard
            silent = guard.silent_for()
            if silent <= self.stalled_after_s:
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                self._generation += 1
                generation = self._generation
                stuck = self.consumer
                offsets = dict(self._offsets)
            guard.stalled("stalled", f"poll loop silent for {silent:.0f} s")
            # Its close may hang as its poll did: not on this thread.
            threading.Thread(
                target=close_consumer, args=(stuck,), name="fusion-events-close", daemon=True
            ).start()
            guard = self._make_guard()
            while not self._stop.is_set():
                try:
                    consumer = self._new_consumer()
                    self._assign(consumer, offsets)
                    break
                except Exception:
                    log.exception("cannot make a new event consumer; retrying")
                    self._stop.wait(1.0)
            else:
                return
            with self._lock:
                if self._stop.is_set():
                    close_consumer(consumer)
                    return
                self.consumer, self._guard = consumer, guard
            self._start_loop(generation, consumer, guard)

    def _capture(self, consumer: Any | None) -> dict[str, Any]:
        """State and offsets; ``consumer``'s positions (it just returned from its
        poll) or, without one, the offsets applied so far."""
        if consumer is not None:
            offsets = {str(tp.partition): int(consumer.position(tp)) for tp in self.partitions}
        else:
            offsets = {str(p): o for p, o in self._offsets.items()}
        return {
            "format": SNAPSHOT_FORMAT,
            "topic": self.topic,
            "offsets": offsets,
            "taken_at_ms": int(time.time() * 1000),
            "state": self.store.capture(),
            "items": self.export_items(),
        }

    def _snapshot_async(self, document: dict[str, Any]) -> None:
        threading.Thread(
            target=self._write, args=(document,), name="fusion-snapshot", daemon=True
        ).start()

    def _write(self, document: dict[str, Any]) -> None:
        # Writers run one at a time, so an older capture never replaces a newer file.
        with self._writer_lock:
            if document["taken_at_ms"] < getattr(self, "_last_written_ms", 0):
                return
            try:
                state = document.pop("state", None)
                if state is not None:  # serialised here, off the consumer thread
                    document.update(UserStore.encode(state))
                write_snapshot(self.snapshot_path, document)
                self._last_written_ms = document["taken_at_ms"]
                SNAPSHOTS.labels("ok").inc()
            except OSError:
                SNAPSHOTS.labels("failed").inc()
                log.exception("snapshot write failed", extra={"path": str(self.snapshot_path)})

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=timeout_s)
        thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout_s)
        if thread is not None and thread.is_alive():
            # Stuck in a poll: take the final snapshot from what was applied.
            log.warning("event consumer thread did not stop; snapshot from applied offsets")
            with self._lock:
                self._generation += 1
                document = self._capture(None)
            self._write(document)
            threading.Thread(
                target=close_consumer, args=(self.consumer,), name="fusion-events-close",
                daemon=True,
            ).start()  # fmt: skip
        else:
            close_consumer(self.consumer)
