"""Retraining runs: export -> train (a subprocess) -> evaluate -> gate -> publish -> prune.

Where a run can die, and why the registry never shows a partial version:

- the training command writes into a per-run *candidate* registry under the
  log folder, never into the published one, so a kill during training leaves
  at most files that the next start deletes;
- publishing stages the candidate's files into the published registry with
  ``ModelRegistry.stage`` (complete folder, manifest last, fsync, one rename),
  so a kill there leaves a ``.staging`` leftover that ``clean_staging`` removes;
- the run journal (``runs.json``, written atomically) records "publishing"
  before the rename; a kill between the rename and the CURRENT flip is rolled
  forward on the next start (the gate had already passed); a failure there
  removes the version again so that a rollback can never land on a version
  that was never current;
- old versions are pruned by renaming them out of ``versions/`` first (one
  atomic step) and deleting afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.paths import REPO_ROOT
from services.common.registry import MANIFEST, ModelRegistry, RegistryError, write_json_atomic
from services.trainer import metrics
from services.trainer.event_log import EventLog
from services.trainer.settings import TrainerSettings

if TYPE_CHECKING:
    from services.trainer.training_set import ExportedData, HoldOut, InitialData

log = logging.getLogger("coldstart.trainer.retrain")

RUN_ENV = "COLDSTART_TRAINER_RUN_ID"
FINAL_STATES = frozenset({"published", "gated", "failed"})
JOURNAL_KEEP = 50
K = 20
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class Scorer(Protocol):
    """What evaluation needs of a model version."""

    def score(
        self, user_ids: Sequence[str], histories: Sequence[Sequence[str]], candidates: Sequence[str]
    ) -> np.ndarray:
        """(len(user_ids), len(candidates)) scores; higher is better; -inf = never."""


class RunFailed(RuntimeError):
    """A run step failed; the message says which and why."""


@dataclass
class RunRecord:
    run_id: str
    reason: str
    state: str = "running"
    started_at_ms: int = 0
    finished_at_ms: int = 0
    candidate_version: str = ""
    published_version: str = ""
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    current_metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    pid: int = 0
    trigger_event_ms: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def now_ms() -> int:
    return int(time.time() * 1000)


def load_callable(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    target: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return target


def recall_at_k(scorer: Scorer, holdout: HoldOut, k: int = K, batch: int = 256) -> float:
    """Mean over held-out users of hits in the top k / number of targets.

    History items are never recommended (masked); ties are broken at random
    with a fixed seed, so a constant scorer gets the expected random score.
    """
    if not holdout.users:
        raise ValueError("no held-out users")
    candidates = holdout.candidates
    column = {item: j for j, item in enumerate(candidates)}
    rng = np.random.default_rng(0)
    total = 0.0
    for start in range(0, len(holdout.users), batch):
        users = holdout.users[start : start + batch]
        histories = holdout.histories[start : start + batch]
        targets = holdout.targets[start : start + batch]
        scores = np.asarray(scorer.score(users, histories, candidates), dtype=np.float64)
        if scores.shape != (len(users), len(candidates)):
            raise ValueError(
                f"scorer returned shape {scores.shape}, expected {(len(users), len(candidates))}"
            )
        if np.isnan(scores).any() or np.isposinf(scores).any():
            raise ValueError("scorer returned NaN or +inf")
        for row, history in enumerate(histories):
            cols = [column[i] for i in history if i in column]
            scores[row, cols] = -np.inf
        tie = rng.random(scores.shape)
        top = np.lexsort((tie, -scores), axis=1)[:, :k]
        for row, target in enumerate(targets):
            wanted = {column[i] for i in target if i in column}
            if wanted:
                total += len(wanted.intersection(top[row].tolist())) / len(target)
    return total / len(holdout.users)


def remove_version(registry: ModelRegistry, version: str) -> None:
    """Take a version out of ``versions/`` in one rename, then delete it.

    ``rmtree`` on the version folder itself could be killed halfway and leave
    a folder that still has its manifest but not all of its files.
    """
    trash = registry.root / ".trash"
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{version}.{uuid.uuid4().hex[:8]}"
    os.rename(registry.path(version), target)
    with contextlib.suppress(OSError):
        fd = os.open(registry.versions_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    shutil.rmtree(target, ignore_errors=True)


def prune_versions(registry: ModelRegistry, keep: int) -> list[str]:
    """Keep the newest ``keep`` versions and the current one."""
    current = registry.current()
    kept = registry.versions()
    doomed = [v for v in kept[: max(0, len(kept) - keep)] if v != current]
    for version in doomed:
        remove_version(registry, version)
    return doomed


def _process_has_run(pid: int, run_id: str) -> bool:
    """Is ``pid`` still a process we started for ``run_id``? (Guards against pid reuse.)"""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{RUN_ENV}={run_id}".encode() in environ.split(b"\0")


class Retrainer:
    """Runs one retraining run at a time; thread-safe entry points for the servicer."""

    def __init__(
        self,
        settings: TrainerSettings,
        event_log: EventLog,
        registry: ModelRegistry,
        *,
        initial: InitialData | None = None,
    ) -> None:
        self.settings = settings
        self.event_log = event_log
        self.registry = registry
        self.state_dir = settings.log_path()
        self.runs_dir = self.state_dir / "runs"
        self.journal_path = self.state_dir / "runs.json"
        self._initial = initial
        self._lock = threading.Lock()  # guards _active and the journal
        self._registry_lock = threading.Lock()  # publishing vs rollback
        self._active: RunRecord | None = None
        self._thread: threading.Thread | None = None
        self._runs: list[RunRecord] = self._read_journal()

    # -- journal ------------------------------------------------------------
    def _read_journal(self) -> list[RunRecord]:
        import json

        try:
            data = json.loads(self.journal_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("run journal unreadable; starting a new one", extra={"error": repr(exc)})
            return []
        return [RunRecord.from_json(r) for r in data.get("runs", [])]

    def _save(self, record: RunRecord) -> None:
        with self._lock:
            for i, existing in enumerate(self._runs):
                if existing.run_id == record.run_id:
                    self._runs[i] = record
                    break
            else:
                self._runs.append(record)
            self._runs = self._runs[-JOURNAL_KEEP:]
            self.state_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.journal_path, {"runs": [asdict(r) for r in self._runs]})

    def runs(self) -> list[RunRecord]:
        with self._lock:
            return list(self._runs)

    def last_run(self) -> RunRecord | None:
        with self._lock:
            return self._runs[-1] if self._runs else None

    # -- start-up -----------------------------------------------------------
    def recover(self) -> None:
        """Finish what a killed process left: journal states, leftovers, orphans."""
        removed = self.registry.clean_staging()
        shutil.rmtree(self.registry.root / ".trash", ignore_errors=True)
        if removed:
            log.warning("removed unfinished staging folders", extra={"count": removed})
        for record in self.runs():
            if record.state in FINAL_STATES:
                continue
            if record.pid and _process_has_run(record.pid, record.run_id):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(record.pid, signal.SIGKILL)
                log.warning("killed an orphaned training process", extra={"pid": record.pid})
            if record.state == "publishing":
                self._recover_publishing(record)
            else:
                record.message = f"interrupted while {record.state} (trainer restarted)"
                record.state = "failed"
            record.finished_at_ms = record.finished_at_ms or now_ms()
            self._save(record)
        if self.runs_dir.exists():
            for folder in self.runs_dir.iterdir():
                for leftover in ("data", "candidates", "work"):
                    shutil.rmtree(folder / leftover, ignore_errors=True)

    def _recover_publishing(self, record: RunRecord) -> None:
        staged = [
            v
            for v in self.registry.versions()
            if self.registry.manifest(v).get("trainer", {}).get("run_id") == record.run_id
        ]
        if not staged:
            record.state = "failed"
            record.message = "interrupted while publishing; nothing was published"
            return
        version = staged[-1]
        if self.registry.current() != version:
            # The gate passed before the kill: finish the publication.
            self.registry.set_current(version)
        record.state = "published"
        record.published_version = version
        record.message = "publication finished after a restart"
        log.warning("rolled an interrupted publication forward", extra={"version": version})

    # -- triggering ---------------------------------------------------------
    def trigger(self, reason: str, *, trigger_event_ms: int = 0) -> tuple[str, bool]:
        """Start a run in the background unless one runs; (run_id, started)."""
        with self._lock:
            if self._active is not None:
                return self._active.run_id, False
            record = self._new_record(reason, trigger_event_ms)
            self._active = record
        self._thread = threading.Thread(
            target=self._run_guarded, args=(record,), name=f"retrain-{record.run_id}", daemon=True
        )
        self._thread.start()
        return record.run_id, True

    def run(self, reason: str) -> RunRecord:
        """Run synchronously (tests, benchmarks); raises FailedPrecondition if one runs."""
        with self._lock:
            if self._active is not None:
                raise FailedPrecondition(f"run {self._active.run_id} is in progress")
            record = self._new_record(reason, 0)
            self._active = record
        self._run_guarded(record)
        return record

    def busy(self) -> bool:
        with self._lock:
            return self._active is not None

    def wait(self, timeout_s: float) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout_s)

    def shutdown(self) -> None:
        """Kill a training process on service stop (the next start marks the run failed)."""
        with self._lock:
            record = self._active
        if record is not None and record.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)
        self.wait(timeout_s=10)

    @staticmethod
    def _new_record(reason: str, trigger_event_ms: int) -> RunRecord:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return RunRecord(
            run_id=f"r{stamp}-{uuid.uuid4().hex[:6]}",
            reason=reason,
            started_at_ms=now_ms(),
            trigger_event_ms=trigger_event_ms,
        )

    # -- one run ------------------------------------------------------------
    def _run_guarded(self, record: RunRecord) -> None:
        started = time.perf_counter()
        try:
            self._save(record)
            self._run(record)
        except Exception as exc:
            record.state = "failed"
            record.message = str(exc) if isinstance(exc, RunFailed) else repr(exc)
            log.error(
                "retraining run failed; the current version stays",
                extra={"run_id": record.run_id, "error": record.message},
                exc_info=not isinstance(exc, RunFailed),
            )
        finally:
            record.finished_at_ms = now_ms()
            record.pid = 0
            metrics.RUNS.labels(record.state if record.state in FINAL_STATES else "failed").inc()
            metrics.RUN_DURATION.observe(time.perf_counter() - started)
            with contextlib.suppress(Exception):
                self._save(record)
            run_dir = self.runs_dir / record.run_id
            for leftover in ("data", "candidates", "work"):
                shutil.rmtree(run_dir / leftover, ignore_errors=True)
            with self._lock:
                self._active = None

    def _set_state(self, record: RunRecord, state: str) -> None:
        record.state = state
        self._save(record)
        log.info("run state", extra={"run_id": record.run_id, "state": state})

    def initial_data(self) -> InitialData:
        # pandas and scipy load here, not at import: the service starts faster.
        from services.trainer.training_set import empty_initial, initial_from_dataset

        if self._initial is None:
            if self.settings.initial_data:
                from services.trainer.data.registry import load_dataset

                self._initial = initial_from_dataset(load_dataset(self.settings.initial_data))
            else:
                self._initial = empty_initial()
        return self._initial

    def _run(self, record: RunRecord) -> None:
        from services.trainer.training_set import build_training_set

        run_dir = self.runs_dir / record.run_id
        run_dir.mkdir(parents=True, exist_ok=True)

        self._set_state(record, "exporting")
        try:
            with self.event_log.reader() as conn:
                exported = build_training_set(
                    conn,
                    self.initial_data(),
                    run_dir / "data",
                    topic=self.settings.events_topic,
                    holdout_fraction=self.settings.holdout_fraction,
                    holdout_max_events=self.settings.holdout_max_events,
                )
        except OSError as exc:
            raise RunFailed(f"exporting the training set failed: {exc}") from exc
        if exported.training_rows == 0:
            raise RunFailed("no training rows (empty initial data and log)")

        self._set_state(record, "training")
        candidates = ModelRegistry(run_dir / "candidates")
        self._train(record, exported, candidates, run_dir / "train.log")
        kept = candidates.versions()
        if not kept:
            raise RunFailed(f"training wrote no version; see {run_dir / 'train.log'}")
        record.candidate_version = kept[-1]
        candidate_dir = candidates.path(kept[-1])

        self._set_state(record, "evaluating")
        decision = self._evaluate(record, exported.holdout, candidate_dir)
        if not decision:
            self._set_state(record, "gated")
            return

        self._set_state(record, "publishing")
        version = self._publish(record, exported, candidates, kept[-1])
        record.published_version = version
        record.state = "published"
        self._save(record)
        try:
            pruned = prune_versions(self.registry, self.settings.keep_versions)
        except OSError as exc:
            log.error("pruning old versions failed", extra={"error": repr(exc)})
            pruned = []
        log.info(
            "published a new version",
            extra={"run_id": record.run_id, "version": version, "pruned": pruned},
        )

    def _train(
        self, record: RunRecord, exported: ExportedData, candidates: ModelRegistry, log_path: Path
    ) -> None:
        values = {
            "python": shlex.quote(sys.executable),
            "workers": str(self.settings.workers),
            "data": shlex.quote(str(exported.folder)),
            "registry": shlex.quote(str(candidates.root)),
            "run_id": record.run_id,
            "device": self.settings.device,
            # Checkpoints and logs of the training command, deleted with the run's data.
            "workdir": shlex.quote(str(exported.folder.parent / "work")),
        }
        command = shlex.split(self.settings.train_command_template().format(**values))
        env = {**os.environ, RUN_ENV: record.run_id, "PYTHONUNBUFFERED": "1"}
        if self.settings.device == "cpu":
            # No GPU visible: torch picks gloo and CPU tensors in every worker.
            env["CUDA_VISIBLE_DEVICES"] = ""
        started = time.perf_counter()
        with log_path.open("ab") as out:
            try:
                # Own process group: a timeout kills torchrun and all its workers.
                process = subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                raise RunFailed(f"cannot start the training command {command[0]!r}: {exc}") from exc
            record.pid = process.pid
            self._save(record)
            try:
                code = process.wait(timeout=self.settings.train_timeout_seconds)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
                raise RunFailed(
                    f"training exceeded train_timeout_seconds={self.settings.train_timeout_seconds:g}"
                ) from None
            finally:
                record.pid = 0
        duration = time.perf_counter() - started
        metrics.TRAINING_DURATION.observe(duration)
        record.candidate_metrics["training_seconds"] = round(duration, 3)
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RunFailed(f"training exited with {code}: {' | '.join(tail)}")

    def _scorer_for(self, version_dir: Path) -> Scorer:
        import json

        manifest = json.loads((version_dir / MANIFEST).read_text())
        spec = manifest.get("scorer") or self.settings.scorer
        if not spec:
            raise RunFailed(f"no scorer for {version_dir.name}: none in its manifest or settings")
        scorer: Scorer = load_callable(str(spec))(version_dir)
        return scorer

    def _evaluate(self, record: RunRecord, holdout: HoldOut, candidate_dir: Path) -> bool:
        """Score both versions on the held-out slice; True when the candidate may go out."""
        current = self.registry.current()
        if not holdout.users:
            if current is None:
                record.message = "no held-out events; published as the first version"
                return True
            record.message = "no held-out events to compare with the current version"
            return False
        try:
            candidate_recall = recall_at_k(self._scorer_for(candidate_dir), holdout)
        except RunFailed:
            raise
        except Exception as exc:
            raise RunFailed(f"evaluating the candidate failed: {exc!r}") from exc
        record.candidate_metrics["recall_at_20"] = candidate_recall
        record.candidate_metrics["holdout_users"] = float(len(holdout.users))
        metrics.EVALUATION_RECALL.labels("candidate").set(candidate_recall)
        if current is None:
            record.message = "first version"
            return True
        try:
            current_recall = recall_at_k(self._scorer_for(self.registry.path(current)), holdout)
        except Exception as exc:
            # A current version we cannot even score is no bar to clear.
            log.warning("current version could not be evaluated", extra={"error": repr(exc)})
            record.message = f"current version {current} could not be evaluated: {exc!r}"
            return True
        record.current_metrics["recall_at_20"] = current_recall
        metrics.EVALUATION_RECALL.labels("current").set(current_recall)
        bar = current_recall * (1 - self.settings.gate_threshold)
        if candidate_recall >= bar:
            record.message = (
                f"recall@20 {candidate_recall:.4f} >= {bar:.4f} (current {current_recall:.4f})"
            )
            return True
        record.message = (
            f"gated: recall@20 {candidate_recall:.4f} < {bar:.4f} (current {current_recall:.4f}, "
            f"threshold {self.settings.gate_threshold:g})"
        )
        return False

    def _pause(self, point: str) -> None:
        if self.settings.debug_pause_point == point and self.settings.debug_pause_seconds > 0:
            log.warning("debug pause", extra={"point": point})
            time.sleep(self.settings.debug_pause_seconds)

    def _publish(
        self, record: RunRecord, exported: ExportedData, candidates: ModelRegistry, name: str
    ) -> str:
        source = candidates.path(name)
        manifest = dict(candidates.manifest(name))
        for key in ("version", "parent_version", "created_at"):
            manifest.pop(key, None)
        manifest["candidate_version"] = name
        manifest.setdefault("metrics", {})
        if "recall_at_20" in record.candidate_metrics:
            manifest["metrics"]["holdout_recall_at_20"] = record.candidate_metrics["recall_at_20"]
        manifest["trainer"] = {
            "run_id": record.run_id,
            "reason": record.reason,
            "log_offsets": {str(p): o for p, o in sorted(exported.log_offsets.items())},
            "log_events": exported.log_events,
            "training_rows": exported.training_rows,
            "held_out_rows": exported.held_out_rows,
            "forgotten_users": exported.forgotten_users,
            "evaluation": {
                "candidate_recall_at_20": record.candidate_metrics.get("recall_at_20"),
                "current_recall_at_20": record.current_metrics.get("recall_at_20"),
                "gate_threshold": self.settings.gate_threshold,
            },
        }
        with self._registry_lock:
            try:
                with self.registry.stage(manifest) as folder:
                    for child in sorted(source.iterdir()):
                        if child.name != MANIFEST:
                            shutil.move(str(child), str(folder / child.name))
                    self._pause("publish_staging")
            except (OSError, RegistryError) as exc:
                raise RunFailed(f"writing the registry failed: {exc}") from exc
            version = str(manifest["version"])
            self._pause("publish_renamed")
            try:
                self.registry.set_current(version)
            except (OSError, RegistryError) as exc:
                # Never leave a version that was never current where rollback could find it.
                with contextlib.suppress(OSError):
                    remove_version(self.registry, version)
                raise RunFailed(f"flipping CURRENT failed: {exc}") from exc
        return version

    # -- rollback -----------------------------------------------------------
    def rollback(self, version: str) -> tuple[str, str | None]:
        if version and not _VERSION_NAME.match(version):
            raise InvalidArgument("version", f"not a version name: {version!r}")
        with self._registry_lock:
            if version and version not in self.registry.versions():
                raise NotFound(f"version {version!r} is not kept in the registry")
            try:
                return self.registry.rollback(version or None)
            except RegistryError as exc:
                raise FailedPrecondition(str(exc)) from None


class RetrainScheduler:
    """Starts runs when enough events arrived or enough time passed."""

    def __init__(self, retrainer: Retrainer, every_events: int, every_seconds: float) -> None:
        self.retrainer = retrainer
        self.every_events = every_events
        self.every_seconds = every_seconds
        self._since = 0
        self._first_event_ms = 0
        self._last_run = time.monotonic()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retrain-scheduler", daemon=True)

    def start(self) -> None:
        if self.every_events or self.every_seconds:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def on_applied(self, applied: int) -> None:
        if not applied:
            return
        with self._lock:
            self._since += applied
            due = self.every_events and self._since >= self.every_events
        if due:
            self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                by_events = bool(self.every_events) and self._since >= self.every_events
                by_time = (
                    bool(self.every_seconds)
                    and time.monotonic() - self._last_run >= self.every_seconds
                )
                since = self._since
            if not (by_events or by_time):
                continue
            reason = f"{since} new events" if by_events else f"{self.every_seconds:g}s elapsed"
            _run_id, started = self.retrainer.trigger(reason, trigger_event_ms=now_ms())
            if started:
                with self._lock:
                    self._since -= since
                    self._last_run = time.monotonic()
