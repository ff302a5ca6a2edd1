"""Online user state in Redis (``state_backend = "redis"``).

Layout: one key per user, ``<prefix>u:{<user id>}``, holding the user's packed
``UserState`` (``pack_state``: a struct header, the attribute keys and values and
the recent item ids as one NUL-joined UTF-8 text, the ratings as item positions +
float64 values, the interest vector as float32), and one key per applied event,
``<prefix>ev:{<user id>}:<event id>`` with a TTL, for deduplication shared by every
writer. The ``{user id}`` hash tag keeps a user's keys in one Redis Cluster slot,
so one script can update them together.

Writers (``StateWriter``, the replicas with ``state_writer = true``) form one Kafka
consumer group and split the partitions; for each poll they read the touched
users and event-id keys (one pipeline), apply the new events with
``next_user_state`` (the in-process store's own transition), and write each user
with one Lua script that checks the event ids are still unseen and the user's
version is the one read (compare-and-set), then sets the state and the event-id
keys together: apply and dedupe are atomic, so a second writer (after a
rebalance, or a killed writer's events redelivered) applies nothing twice. Kafka
offsets are committed only after Redis has the writes (at-least-once delivery +
dedupe = applied once).

Readers (every replica) fetch a micro-batch's users with one ``MGET``. Socket
timeouts are short and a failed read opens a short circuit (``retry_after_s``):
calls meanwhile fail fast with ``StateUnavailable``, which the core serves as new
users, flagged ``degraded``.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any

import numpy as np
from coldstart.v1 import events_pb2

from services.common.events import EventDecodeError, decode_event
from services.common.kafka_consumer import (
    ConsumerGuard,
    ConsumerStalled,
    close_consumer,
    consumer_options,
    make_consumer,
)
from services.fusion.online_state import (
    CONSUMER_RESTARTS,
    EVENTS_APPLIED,
    EVENTS_SKIPPED,
    STATE_ERRORS,
    Encoder,
    InterestEncoder,
    StateUnavailable,
    UserState,
    event_user_id,
    next_user_state,
)

log = logging.getLogger("coldstart.fusion.redis_state")

STATE_FORMAT = 1
# format, version (compare-and-set counter), updated_at_ms, attributes, items,
# ratings, vector dimension
_HEADER = struct.Struct("<BQqHHHH")
_TEXT_LENGTH = struct.Struct("<I")
_SEPARATOR = "\x00"
# The header's counts are uint16.
MAX_COUNT = 65_535
# Compare-and-set rounds for one batch before the writer backs off and retries it.
CAS_ROUNDS = 5

# KEYS[1]: the user's key; KEYS[2..]: the event-id keys of the events applied.
# ARGV[1]: the version bytes read ("" = absent), ARGV[2]: the new value ("" = forget),
# ARGV[3]: the event-id TTL in seconds. 0: something moved since the read.
_APPLY_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
local version = ''
if cur then version = string.sub(cur, 2, 9) end
if version ~= ARGV[1] then return 0 end
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], '1', 'EX', ARGV[3])
end
return 1
"""


class StateFormatError(ValueError):
    """A stored value this code cannot read (or a state it cannot pack)."""


def pack_state(state: UserState, version: int) -> bytes:
    attributes = state.attributes
    items = state.recent_item_ids
    count = 2 * len(attributes) + len(items)
    text = _SEPARATOR.join(chain(attributes.keys(), attributes.values(), items))
    # One split on read instead of a length per string: a NUL inside an id would
    # shift every later one, so such a state is refused here.
    if count and text.count(_SEPARATOR) != count - 1:
        raise StateFormatError("a NUL character in an id or attribute")
    if max(len(attributes), len(items), len(state.ratings)) > MAX_COUNT:
        raise StateFormatError(f"more than {MAX_COUNT} attributes, items or ratings")
    encoded = text.encode()
    positions = np.empty(0, "<u2")
    values = np.empty(0, "<f8")
    if state.ratings:
        position = {item: n for n, item in enumerate(items)}
        rated = [(position[i], v) for i, v in state.ratings.items() if i in position]
        positions = np.fromiter((p for p, _ in rated), "<u2", len(rated))
        values = np.fromiter((v for _, v in rated), "<f8", len(rated))
    vector = state.interest_vector
    flat = np.empty(0, "<f4") if vector is None else np.ravel(vector).astype("<f4", copy=False)
    if flat.size > MAX_COUNT:
        raise StateFormatError(f"interest vector over {MAX_COUNT} values")
    header = _HEADER.pack(
        STATE_FORMAT,
        version,
        state.updated_at_ms,
        len(attributes),
        len(items),
        len(positions),
        0 if vector is None else flat.size,
    )
    return b"".join(
        (
            header,
            _TEXT_LENGTH.pack(len(encoded)),
            encoded,
            positions.tobytes(),
            values.tobytes(),
            flat.tobytes(),
        )
    )


def unpack_state(blob: bytes) -> tuple[int, UserState]:
    """(version, state) of a ``pack_state`` value."""
    try:
        fmt, version, updated, n_attrs, n_items, n_ratings, dim = _HEADER.unpack_from(blob)
        if fmt != STATE_FORMAT:
            raise StateFormatError(f"state format {fmt}, this code reads {STATE_FORMAT}")
        offset = _HEADER.size
        (text_length,) = _TEXT_LENGTH.unpack_from(blob, offset)
        offset += _TEXT_LENGTH.size
        count = 2 * n_attrs + n_items
        parts = blob[offset : offset + text_length].decode().split(_SEPARATOR) if count else []
        if len(parts) != count:
            raise StateFormatError("text section does not hold the header's counts")
        offset += text_length
        items = tuple(parts[2 * n_attrs :])
        ratings: dict[str, float] = {}
        if n_ratings:
            positions = np.frombuffer(blob, "<u2", n_ratings, offset).tolist()
            offset += 2 * n_ratings
            values = np.frombuffer(blob, "<f8", n_ratings, offset).tolist()
            offset += 8 * n_ratings
            ratings = {items[p]: v for p, v in zip(positions, values, strict=True)}
        vector = np.frombuffer(blob, "<f4", dim, offset) if dim else None
        if offset + 4 * dim != len(blob):
            raise StateFormatError("value length does not match its header")
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        if isinstance(exc, StateFormatError):
            raise
        raise StateFormatError(f"unreadable state: {exc}") from None
    state = UserState(
        attributes=dict(zip(parts[:n_attrs], parts[n_attrs : 2 * n_attrs], strict=True)),
        interest_vector=vector,
        recent_item_ids=items,
        updated_at_ms=updated,
        ratings=ratings,
    )
    return version, state


def redis_client(url: str, timeout_s: float) -> Any:
    """A client that fails within ``timeout_s`` instead of retrying: the callers
    decide what a failure means (serve degraded, or retry the batch)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class RedisUserStore:
    """``UserStateStore`` over Redis (module docstring: layout and guarantees)."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "coldstart:",
        history_length: int = 200,
        event_ttl_s: int = 86_400,
        retry_after_s: float = 1.0,
        encoder: Encoder | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.history_length = history_length
        self.event_ttl_s = event_ttl_s
        self.retry_after_s = retry_after_s
        self.encoder = encoder
        self._apply = client.register_script(_APPLY_SCRIPT)
        # monotonic time before which reads fail fast (Redis just failed a read)
        self._closed_until = 0.0
        self._encode = InterestEncoder(encoder)

    def user_key(self, user_id: str) -> str:
        return f"{self.prefix}u:{{{user_id}}}"

    def event_key(self, user_id: str, event_id: str) -> str:
        return f"{self.prefix}ev:{{{user_id}}}:{event_id}"

    # -- reads (every replica) ---------------------------------------------------
    def get_many(self, user_ids: Sequence[str]) -> list[UserState | None]:
        if not user_ids:
            return []
        if time.monotonic() < self._closed_until:
            STATE_ERRORS.labels("read").inc()
            raise StateUnavailable("redis failed a read just now")
        from redis.exceptions import RedisError

        try:
            blobs = self.client.mget([self.user_key(u) for u in user_ids])
        except RedisError as exc:
            STATE_ERRORS.labels("read").inc()
            self._closed_until = time.monotonic() + self.retry_after_s
            log.warning(
                "online state read failed; serving as new users (degraded)",
                extra={"error": repr(exc), "retry_after_s": self.retry_after_s},
            )
            raise StateUnavailable(repr(exc)) from None
        out: list[UserState | None] = []
        for user_id, blob in zip(user_ids, blobs, strict=True):
            if blob is None:
                out.append(None)
                continue
            try:
                out.append(unpack_state(blob)[1])
            except StateFormatError as exc:
                STATE_ERRORS.labels("decode").inc()
                log.error("unreadable user state", extra={"user_id": user_id, "error": str(exc)})
                out.append(None)
        return out

    # -- writes (the writers) ------------------------------------------------------
    def apply_events(self, events: Iterable[events_pb2.Event]) -> int:
        from redis.exceptions import RedisError

        pending: dict[str, list[events_pb2.Event]] = {}
        ids: set[str] = set()
        for event in events:
            user_id = event_user_id(event)
            if user_id is None:
                continue  # item events: every replica's own consumer applies those
            if event.event_id in ids:
                EVENTS_SKIPPED.labels("duplicate").inc()
                continue
            ids.add(event.event_id)
            pending.setdefault(user_id, []).append(event)
        applied = 0
        try:
            for _ in range(CAS_ROUNDS):
                if not pending:
                    return applied
                done, pending = self._apply_round(pending)
                applied += done
        except RedisError as exc:
            STATE_ERRORS.labels("write").inc()
            raise StateUnavailable(repr(exc)) from None
        STATE_ERRORS.labels("write").inc()
        raise StateUnavailable(f"{len(pending)} users still contended after {CAS_ROUNDS} rounds")

    def apply(self, event: events_pb2.Event) -> bool:
        return self.apply_events([event]) == 1

    def _apply_round(
        self, pending: dict[str, list[events_pb2.Event]]
    ) -> tuple[int, dict[str, list[events_pb2.Event]]]:
        """One read + compare-and-set of every pending user; (applied, the users to
        try again because another writer moved them in between)."""
        users = list(pending)
        read = self.client.pipeline(transaction=False)
        read.mget([self.user_key(u) for u in users])
        event_keys = [self.event_key(u, e.event_id) for u in users for e in pending[u]]
        read.mget(event_keys)
        blobs, seen = read.execute()
        seen_flags = iter(seen)
        writes: list[tuple[str, list[events_pb2.Event]]] = []
        write = self.client.pipeline(transaction=False)
        for user_id, blob in zip(users, blobs, strict=True):
            fresh = []
            for event in pending[user_id]:
                if next(seen_flags) is None:
                    fresh.append(event)
                else:
                    EVENTS_SKIPPED.labels("duplicate").inc()
            if not fresh:
                continue
            state: UserState | None = None
            version_bytes = b""
            version = 0
            if blob is not None:
                version_bytes = bytes(blob[1:9])
                try:
                    version, state = unpack_state(blob)
                except StateFormatError as exc:
                    # Replaced by what the events say: better than never applying again.
                    STATE_ERRORS.labels("decode").inc()
                    log.error("unreadable user state replaced", extra={"error": str(exc)})
            kept: list[events_pb2.Event] = []
            for event in fresh:
                try:
                    state = next_user_state(state, event, self.history_length, self._encode)
                except Exception:
                    EVENTS_SKIPPED.labels("apply_failed").inc()
                    log.exception("applying an event failed", extra={"event_id": event.event_id})
                    continue
                kept.append(event)
            try:
                value = b"" if state is None else pack_state(state, version + 1)
            except StateFormatError as exc:
                EVENTS_SKIPPED.labels("unusable").inc()
                log.error("user state cannot be stored", extra={"error": str(exc)})
                continue
            keys = [self.user_key(user_id)] + [self.event_key(user_id, e.event_id) for e in fresh]
            self._apply(keys=keys, args=[version_bytes, value, self.event_ttl_s], client=write)
            writes.append((user_id, kept))
        results = write.execute() if writes else []
        applied = 0
        again: dict[str, list[events_pb2.Event]] = {}
        for (user_id, kept), ok in zip(writes, results, strict=True):
            if ok:
                applied += len(kept)
                for event in kept:
                    kind = event.WhichOneof("payload")
                    assert kind is not None
                    EVENTS_APPLIED.labels(kind).inc()
            else:
                again[user_id] = pending[user_id]
        return applied, again


class StateWriter:
    """A member of the writers' consumer group: events -> ``RedisUserStore``.

    Offsets are committed after ``apply_events`` returned (Redis has the writes);
    when Redis fails the same events are retried (backing off up to 1 s) and
    nothing is committed meanwhile. A writer killed at any point leaves its
    uncommitted events to the group's next owner of the partition, whose
    re-application is skipped event by event (the shared event-id keys).
    """

    def __init__(
        self,
        store: RedisUserStore,
        bootstrap: str,
        topic: str,
        *,
        group_id: str = "coldstart-fusion-state",
        group_instance_id: str = "",
        poll_timeout_ms: int = 50,
        consumer_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.store = store
        self.topic = topic
        self.poll_timeout_ms = poll_timeout_ms

        def new_consumer() -> Any:
            options = consumer_options(
                client_id=f"fusion-state-{uuid.uuid4().hex[:8]}",
                fetch_max_wait_ms=poll_timeout_ms,
                group_instance_id=group_instance_id,
            )
            return make_consumer(bootstrap, group_id, [topic], **options)

        self._new_consumer = consumer_factory or new_consumer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0
        self.consumer = self._new_consumer()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fusion-state-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        guard = ConsumerGuard("fusion", lambda reason: CONSUMER_RESTARTS.labels(reason).inc())
        guard.started()
        consumer = self.consumer
        while not self._stop.is_set():
            try:
                batches = guard.poll(consumer, timeout_ms=self.poll_timeout_ms)
            except ConsumerStalled:
                # Uncommitted events come back to the new member; dedupe skips them.
                close_consumer(consumer)
                consumer = self._renew()
                if consumer is None:
                    return
                guard.started()
                continue
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("poll failed; retrying")
                self._stop.wait(0.5)
                continue
            if not batches:
                continue
            if not self._apply(batches, guard):
                return  # stopping: nothing committed, the next owner re-reads it
            self._commit(consumer, batches)

    def _apply(self, batches: Any, guard: ConsumerGuard) -> bool:
        events = []
        for records in batches.values():
            for record in records:
                try:
                    events.append(decode_event(record.value))
                except EventDecodeError as exc:
                    EVENTS_SKIPPED.labels(exc.reason).inc()
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self.applied += self.store.apply_events(events)
                return True
            except StateUnavailable as exc:
                log.warning("online state write failed; retrying", extra={"error": str(exc)})
                guard.progress()  # waiting on Redis is not a stalled poll
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
        return False

    def _commit(self, consumer: Any, batches: Any) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        offsets = {
            tp: OffsetAndMetadata(records[-1].offset + 1, "", -1)
            for tp, records in batches.items()
            if records
        }
        try:
            consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance took the partitions: their next owner re-reads from the last
            # commit, and the event-id keys make that a no-op.
            log.warning("offset commit failed", extra={"error": repr(exc)})

    def _renew(self) -> Any | None:
        while not self._stop.is_set():
            try:
                self.consumer = self._new_consumer()
                return self.consumer
            except Exception:
                log.exception("cannot make a new state consumer; retrying")
                self._stop.wait(1.0)
        return None

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout_s)
        close_consumer(self.consumer)
