"""The trainer's consume loop: consumer processes feed one log writer.

The one implementation of "exactly once into the event log" (an in-process
loop, ``ingest_processes = 0``, measured at ~40% of the bare kafka-python rate
against ~70% for this on 2 cores, was removed). Order of effects for one poll
batch (what makes a SIGKILL at any moment safe):

1. decode every record; the ones that cannot be applied are produced to the
   dead-letter topic and acknowledged by the broker (acks=all) first;
2. the good events, the erasures and the next offsets are written to the
   event log in ONE SQLite transaction;
3. only then the offsets are committed to Kafka.

With ``ingest_processes = N >= 1`` the service starts N consumer processes
(members of the consumer group; the group spreads the topic's partitions over
them). Each one polls and hands every batch, the raw records as columns
(offsets, keys, values per partition), to the writer thread in the service
process over a pipe: a consumer process does little more than a bare
kafka-python consume loop. The writer decodes the records, sends the bad ones
to the dead-letter topic (acknowledged before anything of their batch is
applied), and is the log's only writer: it applies each batch in ONE SQLite
transaction (rows, erasures, counters, offsets) -- batches that queued up
while it was busy share one transaction, all or nothing -- then acknowledges
it; the consumer commits offsets to Kafka only after that acknowledgement.

Why it is still exactly-once:

* the log is written only by the writer, one transaction per batch (or
  group), with the offsets; a consumer process cannot touch it;
* every (re)assignment seeks to the log's offsets, asked of the writer over
  the same pipe, so the answer comes after every batch sent before it was
  applied (eager rebalancing: a member first drains what it has in flight in
  ``on_partitions_revoked``);
* a batch that fails to apply (disk full, dead-letter topic unreachable) is
  answered ``failed``; the writer
  then drops every later batch of that consumer's *epoch* (they were read
  past a hole), the consumer starts a new epoch, asks for the log's offsets
  and seeks back: no later batch can land before the failed one;
* a SIGKILL of the service kills its consumers (``PR_SET_PDEATHSIG``; they
  also exit when the pipe closes); a killed consumer is restarted by the
  writer after what it sent is applied. Neither leaves a half batch: a pipe
  message arrives whole or not at all, and a batch is one transaction.

The stall guard (``services.common.kafka_consumer``, shared with fusion): the
writer kills and restarts a consumer process it has not heard from for
``STALLED_AFTER_S``; a consumer whose polls return nothing while its partitions
have a backlog is recreated in its process (``ConsumerGuard``). Both are
counted in ``coldstart_trainer_consumer_restarts_total{reason}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any

from services.common.kafka_consumer import (
    STALLED_AFTER_S,
    ConsumerGuard,
    ConsumerStalled,
    close_consumer,
    consumer_options,
    make_consumer,
)
from services.trainer import metrics
from services.trainer.event_log import EventLogError
from services.trainer.ingest import (
    DeadLetter,
    columns_of,
    note_dead_letters,
    split_columns,
)

if TYPE_CHECKING:
    from services.trainer.ingest import Ingestor

log = logging.getLogger("coldstart.trainer.ingest")

# Batches a consumer may have sent but not seen acknowledged (decode ahead of
# the writer by this much; each is up to max_poll_records rows).
MAX_IN_FLIGHT = 4
# The writer applies batches that queued up meanwhile in one transaction, up to
# this many rows (20k-row transactions cost ~2/3 of the CPU of 5k-row ones).
GROUP_MAX_ROWS = 20_000
# How long a consumer waits for the writer before it checks the stop flag again.
REPLY_WAIT_S = 1.0
# How long a stopping consumer waits for its in-flight batches.
DRAIN_TIMEOUT_S = 10.0
# A consumer process that exits is restarted after this back-off (doubling).
RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0
# A consumer's main loop says it is alive at least this often (a poll returns
# within ~0.2 s, a rebalance gives up after its poll timeout too) ...
ALIVE_EVERY_S = 2.0
# ... and one the writer has not heard from for STALLED_AFTER_S (the shared
# stall guard's time) is stuck: killed and restarted (a restart is the SIGKILL
# the tests prove safe). kafka-python 3.0.12 has been seen to block a poll
# forever: its main thread waiting in send_fetches for an IO-thread task that
# never ran.

# Back-off after a failed batch (log or dead-letter write) or a consumer
# error, doubling up to the max.
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
# Each consumer's poll timeout.
POLL_TIMEOUT_MS = 200
# Bytes per partition per fetch: a big batch is one transaction.
MAX_PARTITION_FETCH_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ConsumerConfig:
    """What a consumer process needs (picklable: it crosses the spawn)."""

    index: int
    bootstrap: str
    topic: str
    group_id: str
    group_instance_id: str
    check_crcs: bool
    max_poll_records: int
    parent_pid: int
    log_level: str = "INFO"


def trainer_consumer_options(
    max_poll_records: int, check_crcs: bool, group_instance_id: str, client_id: str
) -> dict[str, Any]:
    """The trainer's KafkaConsumer options (besides bootstrap and group)."""
    return consumer_options(
        client_id=client_id,
        max_poll_records=max_poll_records,
        check_crcs=check_crcs,
        group_instance_id=group_instance_id,
        max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
    )


def commit_offsets(consumer: Any, topic: str, next_offsets: dict[int, int], *, sync: bool) -> bool:
    """Commit offsets to Kafka (only ever after they are durable in the log).

    True when a synchronous commit went through (the caller may forget them).

    Asynchronous while running (no round trip per batch): the log, not Kafka,
    decides where consumption resumes. Synchronous on the way out.
    """
    from kafka import TopicPartition
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    offsets = {
        TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in next_offsets.items()
    }
    try:
        if sync:
            consumer.commit(offsets)
        else:
            consumer.commit_async(offsets)
    except KafkaError as exc:
        # Harmless: the log holds the offsets; a rebalance seeks to them.
        log.warning("offset commit to Kafka failed", extra={"error": repr(exc)})
        return False
    return sync


def member_instance_id(base: str, index: int, processes: int) -> str:
    """Static membership id of consumer ``index``: the base itself for one process."""
    if not base or processes == 1:
        return base
    return f"{base}-{index}"


# -- the consumer process ------------------------------------------------------


# What the pipe raises once the other side is gone.
_PIPE_GONE = (EOFError, BrokenPipeError, ConnectionResetError)


class _Rewind(RuntimeError):
    """The batch was not handed over; re-read from the log's offsets."""


class ConsumerProcess:
    """The loop of one consumer process: poll, hand over, commit.

    ``run`` is the process's main; tests drive it in a thread with a fake
    consumer and sink.
    """

    def __init__(
        self,
        conn: Connection,
        config: ConsumerConfig,
        *,
        consumer_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.conn = conn
        self.config = config
        self.consumer_factory = consumer_factory or self._default_consumer
        self.stopping = False
        self.seq = 0
        self.epoch = 0
        self.in_flight: dict[int, dict[int, int]] = {}
        self.uncommitted: dict[int, int] = {}
        self.dirty = False  # acknowledged offsets not sent to Kafka yet
        self.failure = ""
        self.offsets_reply: dict[int, int] | None = None
        self.alive_sent = 0.0
        self.lag_sent = -1  # the lag the writer was last told
        # The stall counter lives in the service process: tell the writer.
        self.guard = ConsumerGuard(
            f"trainer-{config.index}", lambda reason: self._send(("restarted", reason))
        )
        # kafka-python (3.x) runs the rebalance listener on its IO thread, and a
        # join can complete after poll() has returned: the listener's _drain and
        # _seek then run while this process's main thread polls on. Two threads
        # reading one pipe split each other's frames (EOFError or a hang, in
        # test_rebalance_listeners_on_kafkas_io_thread_do_not_hang_the_hand_over),
        # so whatever reads the pipe or the hand-over state (seq, in_flight,
        # uncommitted) holds this.
        # Never held across a consumer call: the IO thread may be waiting for it.
        self._state = threading.RLock()
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._send_error: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, name="to-writer", daemon=True)
        self._sender.start()

    def _default_consumer(self) -> Any:
        options = trainer_consumer_options(
            self.config.max_poll_records,
            self.config.check_crcs,
            self.config.group_instance_id,
            client_id=f"coldstart-trainer-{self.config.index}",
        )
        return make_consumer(self.config.bootstrap, self.config.group_id, **options)

    # -- talking to the writer ---------------------------------------------
    def _send(self, message: tuple[Any, ...]) -> None:
        """Queue a message for the sender thread (pickled here, in order).

        A batch is ~90 bytes a record, far more than a socket buffer holds: a
        plain send would block until the writer reads it, i.e. until it has
        applied the batch before. The sender thread blocks instead (without
        the GIL) and this one goes on polling, up to MAX_IN_FLIGHT batches
        ahead.
        """
        if self._send_error is not None:
            raise self._send_error
        self._outbox.put(ForkingPickler.dumps(message))

    def _send_loop(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self.conn.send_bytes(data)
            except _PIPE_GONE as exc:
                self._send_error = exc
                return

    def _pump(self, wait_s: float) -> None:
        """Handle the writer's replies; wait up to ``wait_s`` for the first one."""
        with self._state:
            self._pump_locked(wait_s)

    def _pump_locked(self, wait_s: float) -> None:
        while self.conn.poll(wait_s):
            wait_s = 0
            message = self.conn.recv()
            kind = message[0]
            if kind == "applied":
                seq = message[1]
                for done in [s for s in self.in_flight if s <= seq]:
                    self.uncommitted.update(self.in_flight.pop(done))
                    self.dirty = True
            elif kind == "failed":
                seq, error = message[1], message[2]
                if seq in self.in_flight:
                    # The writer drops the rest of this epoch: so do we.
                    self.in_flight.clear()
                    self.epoch += 1
                    self.failure = error
            elif kind == "offsets":
                self.offsets_reply = dict(message[2])
            elif kind == "stop":
                self.stopping = True

    def _log_offsets(self) -> dict[int, int]:
        """The log's offsets, once every batch sent before the question is applied."""
        with self._state:
            self.seq += 1
            self.offsets_reply = None
            self._send(("offsets", self.seq, self.epoch))
            while self.offsets_reply is None:
                self._pump_locked(REPLY_WAIT_S)
            return self.offsets_reply

    def _drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            self._pump(min(REPLY_WAIT_S, max(0.0, deadline - time.monotonic())))

    # -- the loop -----------------------------------------------------------
    def run(self) -> None:
        backoff = BACKOFF_MIN_S
        consumer: Any = None
        try:
            while not self.stopping:
                try:
                    if consumer is None:
                        consumer = self.consumer_factory()
                        self.guard.started()
                        self._subscribe(consumer)
                    self.poll_once(consumer)
                    backoff = BACKOFF_MIN_S
                except _Rewind as exc:
                    log.warning("batch not applied; re-reading", extra={"error": str(exc)})
                    self._sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    try:
                        self._seek(consumer, consumer.assignment())
                    except _PIPE_GONE:
                        raise
                    except Exception as err:
                        log.warning("rewind failed", extra={"error": repr(err)})
                        close_consumer(consumer)
                        consumer = None
                except _PIPE_GONE:
                    raise
                except Exception as exc:  # never a crash loop: log, back off, go on
                    if not isinstance(exc, ConsumerStalled):  # (the guard logged that one)
                        log.exception("consumer loop error; retrying", extra={"error": repr(exc)})
                    if consumer is not None:
                        close_consumer(consumer)
                        consumer = None
                    self._sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            if consumer is not None:
                with contextlib.suppress(*_PIPE_GONE):
                    self._drain()
                self._commit(consumer, sync=True)
                close_consumer(consumer)
            with contextlib.suppress(*_PIPE_GONE):
                self._send(("bye",))
            self._outbox.put(None)
            self._sender.join(timeout=DRAIN_TIMEOUT_S)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            self._pump(min(0.1, max(0.0, deadline - time.monotonic())))

    def _subscribe(self, consumer: Any) -> None:
        from kafka import ConsumerRebalanceListener

        worker = self

        class SeekToLog(ConsumerRebalanceListener):
            """Hand back cleanly on revocation; resume where the log says on assignment."""

            def on_partitions_revoked(self, revoked: Any) -> None:
                # Let what is in flight land first (kafka-python runs this on
                # its IO thread, inside poll: no blocking consumer call here,
                # so no Kafka commit; the log holds the offsets anyway).
                worker._drain()

            def on_partitions_assigned(self, assigned: Any) -> None:
                worker._seek(consumer, assigned)
                log.info(
                    "partitions assigned",
                    extra={
                        "consumer": worker.config.index,
                        "partitions": sorted(tp.partition for tp in assigned),
                    },
                )

        consumer.partitions_for_topic(self.config.topic)
        consumer.subscribe([self.config.topic], listener=SeekToLog())

    def _seek(self, consumer: Any, assigned: Any) -> None:
        stored = self._log_offsets()
        for tp in assigned:
            if tp.partition in stored:
                consumer.seek(tp, stored[tp.partition])
            else:
                consumer.seek_to_beginning(tp)

    def poll_once(self, consumer: Any) -> bool:
        """One turn: replies, poll, hand-over. False when empty.

        The records go over as they came (``columns_of``: lists of offsets,
        keys and values): decoding them here would double this process's
        work per record, and it is the one that also runs kafka-python's
        record parsing; the writer decodes (``split_columns``).
        """
        self._pump(0)
        while len(self.in_flight) >= MAX_IN_FLIGHT and not self.stopping:
            self._pump(REPLY_WAIT_S)
        now = time.monotonic()
        if now - self.alive_sent >= ALIVE_EVERY_S:
            self.alive_sent = now
            self._send(("alive",))
        self._check_failure()
        self._commit(consumer, sync=False)
        if self.stopping:
            return False
        batches = self.guard.poll(
            consumer, timeout_ms=POLL_TIMEOUT_MS, max_records=self.config.max_poll_records
        )
        if not batches:
            if self.guard.lag != self.lag_sent:
                self.lag_sent = self.guard.lag
                self._send(("lag", self.lag_sent))
            return False
        columns = columns_of(batches)
        self.guard.update_lag(consumer)
        with self._state:
            self.seq += 1
            # partition -> the offset after its last record (dead letters included)
            self.in_flight[self.seq] = {c[0]: c[1][-1] + 1 for c in columns}
            self.lag_sent = lag = self.guard.lag
            first_at = self.guard.first_records_at
            self._send(("batch", self.seq, self.epoch, columns, lag, first_at))
        return True

    def _check_failure(self) -> None:
        if self.failure:
            failure, self.failure = self.failure, ""
            raise _Rewind(failure)

    def _commit(self, consumer: Any, *, sync: bool) -> None:
        with self._state:
            if not self.uncommitted or not (sync or self.dirty):
                return
            self.dirty = False
            offsets = dict(self.uncommitted)
        if commit_offsets(consumer, self.config.topic, offsets, sync=sync):
            with self._state:
                for partition, offset in offsets.items():
                    if self.uncommitted.get(partition) == offset:
                        del self.uncommitted[partition]


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that started it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def consumer_main(conn: Connection, config: ConsumerConfig) -> None:
    """Entry point of a consumer process."""
    _die_with_parent(config.parent_pid)
    # Ctrl-C reaches the whole process group: the service shuts its consumers
    # down in order (stop message), so they ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from services.common.logs import configure_logging

    configure_logging("trainer", config.log_level)
    try:
        ConsumerProcess(conn, config).run()
    except _PIPE_GONE as exc:
        # The service is gone (or closed the pipe): nothing here is durable
        # state, so just leave.
        log.info("consumer leaves: the writer is gone", extra={"error": repr(exc)})


# -- the writer (in the service process) -------------------------------------


@dataclass
class _Pending:
    """A batch received (and decoded) and not yet applied."""

    member: _Member
    seq: int
    epoch: int
    rows: list[Any]
    next_offsets: dict[int, int]
    dead: list[DeadLetter]


@dataclass
class _Member:
    index: int
    process: Any = None
    conn: Connection | None = None
    # Batches of this epoch and older are dropped (a failed batch left a hole).
    discard_epoch: int = -1
    lag: int = -1
    restart_at: float = 0.0
    backoff: float = RESTART_MIN_S
    said_bye: bool = False
    heard_at: float = 0.0  # monotonic time of its last message
    started_at: float = 0.0


class ProcessIngest:
    """The writer thread: starts the consumer processes, applies their batches."""

    def __init__(self, ingestor: Ingestor, processes: int) -> None:
        self.ingestor = ingestor
        self.processes = processes
        self.members = [_Member(i) for i in range(processes)]
        self._context = multiprocessing.get_context("spawn")

    def config(self, index: int) -> ConsumerConfig:
        ing = self.ingestor
        return ConsumerConfig(
            index=index,
            bootstrap=ing.bootstrap,
            topic=ing.topic,
            group_id=ing.group_id,
            group_instance_id=member_instance_id(ing.group_instance_id, index, self.processes),
            check_crcs=ing.check_crcs,
            max_poll_records=ing.max_poll_records,
            parent_pid=os.getpid(),
            log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        )

    def _spawn(self, index: int) -> tuple[Any, Connection]:
        """Start consumer ``index``: (its process, the writer's end of its pipe)."""
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=consumer_main,
            args=(child, self.config(index)),
            name=f"trainer-consumer-{index}",
            daemon=True,
        )
        process.start()
        child.close()  # ours: EOF on `parent` then means the process is gone
        return process, parent

    def _start(self, member: _Member) -> None:
        member.process, member.conn = self._spawn(member.index)
        member.said_bye, member.lag, member.discard_epoch = False, -1, -1
        member.started_at = member.heard_at = time.monotonic()
        log.info(
            "consumer process started",
            extra={"consumer": member.index, "pid": member.process.pid},
        )

    def _gone(self, member: _Member, stopping: bool, reason: str = "exited") -> None:
        if member.conn is not None:
            with contextlib.suppress(OSError):
                member.conn.close()
        if member.process is not None:
            member.process.join(timeout=5)
            code = member.process.exitcode
            if not stopping:
                log.error(
                    f"consumer process {reason}; restarting",
                    extra={"consumer": member.index, "exitcode": code},
                )
                metrics.CONSUMER_RESTARTS.labels(reason).inc()
                self.ingestor.status.last_error = (
                    f"consumer process {member.index} {reason} ({code})"
                )
                if time.monotonic() - member.started_at > 60:
                    member.backoff = RESTART_MIN_S
                member.restart_at = time.monotonic() + member.backoff
                member.backoff = min(member.backoff * 2, RESTART_MAX_S)
        member.process, member.conn = None, None
        member.lag = -1
        self._publish_lag()

    def run(self, stop: threading.Event) -> None:
        status = self.ingestor.status
        status.running = True
        try:
            while not stop.is_set():
                now = time.monotonic()
                for member in self.members:
                    if member.process is None and now >= member.restart_at:
                        try:
                            self._start(member)
                        except Exception as exc:
                            log.exception("cannot start a consumer process")
                            status.last_error = repr(exc)
                            member.restart_at = now + member.backoff
                            member.backoff = min(member.backoff * 2, RESTART_MAX_S)
                self._serve(0.2, stopping=False)
            self._shutdown()
        finally:
            status.running = False
            status.consumer_lag = -1  # not consuming: unknown

    def _serve(self, timeout_s: float, *, stopping: bool) -> None:
        """Wait for messages; apply the batches that are there in one transaction.

        Batches that queued up while the writer was busy (from one consumer or
        several) are applied together, up to GROUP_MAX_ROWS rows: fewer, bigger
        transactions when the writer is the bottleneck, no waiting when it is not.
        Any other message first flushes the group, so that an offsets answer
        covers every batch sent before the question.
        """
        by_conn: dict[Any, _Member] = {m.conn: m for m in self.members if m.conn is not None}
        if not by_conn:
            time.sleep(timeout_s)
            return
        group: list[_Pending] = []
        ready_conns = wait(list(by_conn), timeout=timeout_s)
        now = time.monotonic()
        for conn, member in by_conn.items():
            if conn in ready_conns:
                member.heard_at = now
            elif not stopping and now - member.heard_at > STALLED_AFTER_S:
                self._stalled(member, now)
        for ready in ready_conns:  # (a stalled member is one that was not ready)
            member = by_conn[ready]
            # Bounded, so that a busy consumer cannot starve the others or stop().
            for _ in range(2 * MAX_IN_FLIGHT + 2):
                if member.conn is None:
                    break
                try:
                    message = member.conn.recv()
                except _PIPE_GONE:
                    # Everything it sent before it died is whole: apply it first.
                    group = self._flush(group)
                    self._gone(member, stopping)
                    break
                try:
                    if message[0] == "batch":
                        pending = self._take_batch(member, message)
                        if pending is not None:
                            group.append(pending)
                        if sum(len(g.rows) for g in group) >= GROUP_MAX_ROWS:
                            group = self._flush(group)
                    else:
                        group = self._flush(group)
                        self._handle(member, message)
                except _PIPE_GONE:
                    self._gone(member, stopping)
                except Exception as exc:
                    # E.g. the log cannot be read to answer an offsets question.
                    # Never let the writer thread die: restart that consumer (it
                    # asks again after its back-off).
                    log.exception(
                        "writer error; restarting the consumer process",
                        extra={"consumer": member.index, "error": repr(exc)},
                    )
                    self.ingestor.status.last_error = repr(exc)
                    if member.process is not None:
                        member.process.kill()
                    self._gone(member, stopping)
                if member.conn is None or not member.conn.poll(0):
                    break
        self._flush(group)

    def _stalled(self, member: _Member, now: float) -> None:
        """Kill a consumer that stopped talking; ``run`` starts a new one."""
        log.warning(
            "consumer process silent; killing it",
            extra={"consumer": member.index, "silent_s": round(now - member.heard_at, 1)},
        )
        if member.process is not None:
            member.process.kill()
        self._gone(member, stopping=False, reason="stalled")

    def _handle(self, member: _Member, message: tuple[Any, ...]) -> None:
        """A message other than a batch."""
        assert member.conn is not None
        kind = message[0]
        if kind == "offsets":
            stored = self.ingestor.log.stored_offsets(self.ingestor.topic)
            member.conn.send(("offsets", message[1], stored))
        elif kind == "lag":
            member.lag = message[1]
            self._publish_lag()
        elif kind == "restarted":
            # The consumer's stall guard recreated its consumer (and logged why).
            metrics.CONSUMER_RESTARTS.labels(message[1]).inc()
            self.ingestor.status.last_error = f"consumer {member.index} {message[1]}"
        elif kind == "bye":
            member.said_bye = True

    def _take_batch(self, member: _Member, message: tuple[Any, ...]) -> _Pending | None:
        """A received batch, decoded, ready to apply; None when it is to be dropped."""
        _, seq, epoch, columns, lag, first_at = message
        status = self.ingestor.status
        if first_at is not None and (
            status.first_records_at is None or first_at < status.first_records_at
        ):
            status.first_records_at = first_at
        if lag >= 0:
            member.lag = lag
            self._publish_lag()
        if epoch <= member.discard_epoch:
            return None  # read past a failed batch: the consumer re-reads it
        split = split_columns(columns)
        return _Pending(member, seq, epoch, split.rows, split.next_offsets, split.dead)

    def _flush(self, group: list[_Pending]) -> list[_Pending]:
        """Dead-letter, apply the group in one transaction, answer every consumer in it."""
        if not group:
            return group
        ing = self.ingestor
        dead = [letter for pending in group for letter in pending.dead]
        if dead:
            # Durable in the dead-letter topic before their offsets are in the log.
            try:
                ing.dead_letters.send(ing.topic, dead)
            except Exception as exc:
                error = f"dead-letter topic unavailable: {exc!r}"
                log.error("dead-lettering failed; batch will be re-read", extra={"error": error})
                return self._failed(group, error)
            note_dead_letters(ing.topic, dead)
        started = time.perf_counter()
        try:
            result = ing.log.apply_batches(
                ing.topic, [(g.rows, g.next_offsets, len(g.dead)) for g in group]
            )
        except EventLogError as exc:
            metrics.LOG_WRITE_FAILURES.inc()
            log.error("event log write failed; batch will be re-read", extra={"error": str(exc)})
            return self._failed(group, str(exc))
        metrics.APPLY_BATCH_SECONDS.observe(time.perf_counter() - started)
        last: dict[int, _Pending] = {}
        for pending in group:
            last[pending.member.index] = pending
        for pending in last.values():
            self._reply(pending.member, ("applied", pending.seq))
        ing.count(result)
        return []

    def _failed(self, group: list[_Pending], error: str) -> list[_Pending]:
        """Nothing of the group was applied: every consumer in it re-reads from the log."""
        self.ingestor.status.last_error = error
        first: dict[int, _Pending] = {}
        for pending in group:
            first.setdefault(pending.member.index, pending)
        for pending in first.values():
            # Drop what it sent after this batch; it re-reads from the log.
            pending.member.discard_epoch = pending.epoch
            self._reply(pending.member, ("failed", pending.seq, error))
        return []

    def _reply(self, member: _Member, message: tuple[Any, ...]) -> None:
        # A consumer that died meanwhile re-reads from the log when restarted.
        if member.conn is not None:
            with contextlib.suppress(*_PIPE_GONE, OSError):
                member.conn.send(message)

    def _publish_lag(self) -> None:
        lags = [m.lag for m in self.members]
        lag = -1 if any(x < 0 for x in lags) else sum(lags)
        self.ingestor.status.consumer_lag = lag
        if lag >= 0:
            metrics.CONSUMER_LAG.set(lag)

    def _shutdown(self, timeout_s: float = 12.0) -> None:
        for member in self.members:
            if member.conn is not None:
                with contextlib.suppress(OSError):
                    member.conn.send(("stop",))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
            m.conn is not None and not m.said_bye for m in self.members
        ):
            self._serve(0.1, stopping=True)
        for member in self.members:
            if member.process is not None:
                member.process.join(timeout=max(0.1, deadline - time.monotonic()))
                if member.process.is_alive():
                    member.process.kill()
                    member.process.join(timeout=5)
            if member.conn is not None:
                with contextlib.suppress(OSError):
                    member.conn.close()
            member.process, member.conn = None, None
