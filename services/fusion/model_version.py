"""One model version from the registry, loaded for serving.

A version folder holds (names from the manifest's ``files``):

    user_tower.onnx   inputs user_attributes [B, A], interest [B, C], history [B, C] -> [B, D]
    item_tower.onnx   inputs content [B, C], item_attributes [B, I] -> [B, D]
    ranker.onnx       input features [N, F] -> score [N]
    item_ids.json     the catalog's ids, row order
    item_vectors.npy  [n, D] item tower outputs      content_vectors.npy [n, C]
    popularity.npy    [n] training interaction counts
    items.faiss       optional HNSW index over item_vectors (built at load when absent)
    items.jsonl       optional per-row {"text", "attributes", "tags"} for reasons and filters

Everything that shapes an input (vocabularies, input/output names, ranker
feature order) comes from manifest.json; see docs/FUSION.md. Any missing or
inconsistent part raises ModelLoadError with one line naming the file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort

from services.common import ann as ann_kinds
from services.fusion import features
from services.fusion.index import ItemIndex, ItemMeta, build_hnsw

log = logging.getLogger("coldstart.fusion.model")

FORMAT = "coldstart.recommender/1"  # the provisional format (synthetic.py writes it)
RECSYS_FORMAT = "coldstart.recommender/2"  # the trainer's export: recsys_version.py
DEFAULT_FILES = {
    "user_tower": "user_tower.onnx",
    "item_tower": "item_tower.onnx",
    "ranker": "ranker.onnx",
    "item_ids": "item_ids.json",
    "item_vectors": "item_vectors.npy",
    "content_vectors": "content_vectors.npy",
    "popularity": "popularity.npy",
    "index": "items.faiss",
    "items": "items.jsonl",
}


@dataclass(frozen=True)
class UserInputs:
    """What the service knows about a user for one call, in this version's terms."""

    attributes: Mapping[str, str]
    interest: np.ndarray | None  # content-space vector, or None
    # Item rows of this version's index, oldest first: the items the user liked (an
    # implicit interaction, or a rating at or above the version's positive threshold).
    history_rows: np.ndarray
    user_id: str = ""
    # Item rows the user rated below the positive threshold, oldest first: never history
    # (training never saw them as positives), but not recommended again either.
    unliked_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # Values the version derives from these inputs, computed once per call
    # (the user tower and the ranker both need them).
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class ModelLoadError(Exception):
    """A version cannot be served; the message is one line naming the cause."""


def read_manifest(path: Path) -> Any:
    """A version folder's manifest.json, or a one-line ModelLoadError."""
    try:
        return json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}/manifest.json: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}/manifest.json: not valid JSON ({exc})") from None


def positive_threshold(where: str, manifest: Mapping[str, Any]) -> float:
    """The manifest's ``user_history.positive_threshold``: a rating at or above it is a
    liked item (history), below it an unliked one. -inf (everything liked, as before
    the section) where the manifest has none. ``where`` names the manifest in errors."""
    section = manifest.get("user_history")
    if section is None:
        return float("-inf")
    if not isinstance(section, Mapping):
        raise ModelLoadError(f"{where}: user_history must be an object, got {section!r}")
    value = section.get("positive_threshold", float("-inf"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ModelLoadError(
            f"{where}: user_history.positive_threshold must be a number, got {value!r}"
        )
    return float(value)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class VersionFiles:
    """Reads the files of one version folder by role; each failure is a one-line
    ModelLoadError naming the file (shared by every model format)."""

    def __init__(self, path: Path, files: Mapping[str, str], intra_op_threads: int) -> None:
        self.path = path
        self.files = files
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = intra_op_threads
        self.options.inter_op_num_threads = 1
        self.options.log_severity_level = 3

    def file(self, role: str) -> Path:
        found = self.path / self.files[role]
        if not found.is_file():
            raise ModelLoadError(f"{found}: missing ({role})")
        return found

    def session(self, role: str) -> ort.InferenceSession:
        onnx_path = self.file(role)
        try:
            return ort.InferenceSession(
                str(onnx_path), self.options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several types for a bad file
            raise ModelLoadError(
                f"{onnx_path}: cannot load ONNX model ({first_line(exc)})"
            ) from None

    def array(self, role: str) -> np.ndarray:
        try:
            loaded: np.ndarray = np.load(self.file(role), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ModelLoadError(
                f"{self.path / self.files[role]}: not a numpy array ({exc})"
            ) from None
        return loaded

    def json(self, role: str) -> Any:
        try:
            return json.loads(self.file(role).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                f"{self.path / self.files[role]}: not valid JSON ({exc})"
            ) from None


@dataclass(frozen=True)
class TowerSpec:
    inputs: Mapping[str, str]  # role -> ONNX input name
    output: str


def _spec(manifest: Mapping[str, Any], tower: str, roles: Sequence[str]) -> TowerSpec:
    section = manifest.get("towers", {}).get(tower, {})
    inputs = dict(section.get("inputs", {}))
    for role in roles:
        inputs.setdefault(role, role)
    return TowerSpec(inputs=inputs, output=str(section.get("output", f"{tower}_vector")))


def declared_candidates(version: str, manifest: Mapping[str, Any]) -> int | None:
    """How many tower candidates the version's ranker was trained to order
    (``ranker.candidates``), or None where the manifest does not say."""
    value = manifest.get("ranker", {}).get("candidates")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(
            f"{version}: ranker.candidates must be a positive integer, got {value!r}"
        )
    return value


class ModelVersion:
    """Immutable model parts plus the live item index built from them."""

    # Ratings below it are unliked (core.py splits a user's history by it); -inf: every
    # interaction is liked, as in versions before ``user_history``.
    positive_threshold: float = float("-inf")

    def __init__(
        self,
        version: str,
        manifest: Mapping[str, Any],
        user_session: ort.InferenceSession,
        item_session: ort.InferenceSession,
        ranker_session: ort.InferenceSession,
        index: ItemIndex,
    ) -> None:
        self.version = version
        self.manifest = manifest
        self.dimension = int(manifest["dimension"])
        self.content_dimension = int(manifest["content_dimension"])
        self.user_vocab: dict[str, list[str]] = dict(manifest.get("user_attributes", {}))
        self.item_vocab: dict[str, list[str]] = dict(manifest.get("item_attributes", {}))
        self._user_hot = features.MultiHot(self.user_vocab)
        self._item_hot = features.MultiHot(self.item_vocab)
        self.user_spec = _spec(manifest, "user", ("user_attributes", "interest", "history"))
        self.item_spec = _spec(manifest, "item", ("content", "item_attributes"))
        ranker = manifest.get("ranker", {})
        self.ranker_input = str(ranker.get("input", "features"))
        self.ranker_output = str(ranker.get("output", "score"))
        self.ranker_features: list[str] = list(ranker.get("features", []))
        self.ranker_candidates = declared_candidates(version, manifest)
        self.positive_threshold = positive_threshold(version, manifest)
        self._user = user_session
        self._item = item_session
        self._ranker = ranker_session
        self.index = index

    # -- loading ------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: Path,
        *,
        intra_op_threads: int = 1,
        ef_search: int = 0,
        nprobe: int = 0,
        fold_threshold: int = 5_000,
    ) -> ModelVersion:
        path = Path(path)
        manifest = read_manifest(path)
        if not isinstance(manifest, dict):
            raise ModelLoadError(f"{path}/manifest.json: not a JSON object")
        version = str(manifest.get("version") or path.name)
        fmt = manifest.get("format", FORMAT)
        if cls is ModelVersion and fmt == RECSYS_FORMAT:
            # The trainer's export (services/trainer/model/export.py).
            from services.fusion.recsys_version import RecsysModelVersion

            return RecsysModelVersion.load(
                path,
                intra_op_threads=intra_op_threads,
                ef_search=ef_search,
                nprobe=nprobe,
                fold_threshold=fold_threshold,
            )
        if fmt != FORMAT:
            raise ModelLoadError(
                f"{path}: manifest format {fmt!r} is not supported "
                f"(want {FORMAT} or {RECSYS_FORMAT})"
            )
        for key in ("dimension", "content_dimension"):
            if not isinstance(manifest.get(key), int) or manifest[key] <= 0:
                raise ModelLoadError(f"{path}/manifest.json: {key} must be a positive integer")
        unknown = set(manifest.get("ranker", {}).get("features", [])) - set(
            features.KNOWN_RANKER_FEATURES
        )
        if unknown:
            raise ModelLoadError(f"{path}/manifest.json: unknown ranker features {sorted(unknown)}")
        positive_threshold(f"{path}/manifest.json", manifest)  # fails before the files load
        files = {**DEFAULT_FILES, **manifest.get("files", {})}

        folder = VersionFiles(path, files, intra_op_threads)
        file, session, array = folder.file, folder.session, folder.array
        user_session = session("user_tower")
        item_session = session("item_tower")
        ranker_session = session("ranker")

        try:
            ids = json.loads(file("item_ids").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path / files['item_ids']}: not valid JSON ({exc})") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ModelLoadError(f"{path / files['item_ids']}: must be a list of strings")
        n = len(ids)
        vectors = array("item_vectors").astype(np.float32, copy=False)
        content = array("content_vectors").astype(np.float32, copy=False)
        popularity = array("popularity").astype(np.float32, copy=False)
        dimension, content_dimension = manifest["dimension"], manifest["content_dimension"]
        for role, got, want in (
            ("item_vectors", vectors.shape, (n, dimension)),
            ("content_vectors", content.shape, (n, content_dimension)),
            ("popularity", popularity.shape, (n,)),
        ):
            if tuple(got) != want:
                raise ModelLoadError(f"{path / files[role]}: shape {tuple(got)}, expected {want}")
        metas = cls._read_items(path / files["items"], ids)
        index_path = path / files["index"]
        ann: faiss.Index
        if index_path.is_file():
            try:
                ann = faiss.read_index(str(index_path))
            except RuntimeError as exc:
                raise ModelLoadError(
                    f"{index_path}: cannot read faiss index ({str(exc).splitlines()[0][:200]})"
                ) from None
            if ann.ntotal != n or ann.d != dimension:
                raise ModelLoadError(
                    f"{index_path}: holds {ann.ntotal} vectors of dimension {ann.d}, "
                    f"expected {n} of {dimension}"
                )
            if ann_kinds.kind_of(ann) is None:
                # A kind the search cannot pass parameters to: rebuilt as HNSW.
                ann = build_hnsw(vectors)
        else:
            ann = build_hnsw(vectors)
        index = ItemIndex(
            metas,
            vectors,
            content,
            popularity,
            ann,
            ef_search=ef_search,
            nprobe=nprobe,
            fold_threshold=fold_threshold,
        )
        model = cls(version, manifest, user_session, item_session, ranker_session, index)
        model.check()
        return model

    @staticmethod
    def _read_items(items_path: Path, ids: list[str]) -> list[ItemMeta]:
        if not items_path.is_file():
            return [ItemMeta(item_id=i) for i in ids]
        metas: list[ItemMeta] = []
        with items_path.open() as handle:
            for line_no, line in enumerate(handle):
                if line_no >= len(ids):
                    raise ModelLoadError(f"{items_path}: more lines than item ids ({len(ids)})")
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ModelLoadError(
                        f"{items_path}:{line_no + 1}: not valid JSON ({exc})"
                    ) from None
                metas.append(
                    ItemMeta(
                        item_id=ids[line_no],
                        text=str(record.get("text", "")),
                        attributes={
                            str(k): str(v) for k, v in record.get("attributes", {}).items()
                        },
                        tags=tuple(str(t) for t in record.get("tags", [])),
                    )
                )
        if len(metas) != len(ids):
            raise ModelLoadError(f"{items_path}: {len(metas)} lines for {len(ids)} item ids")
        return metas

    def check(self) -> None:
        """Run every graph once on neutral inputs; shapes must match the manifest."""
        try:
            user = self.user_vectors(
                [{}],
                np.zeros((1, self.content_dimension), np.float32),
                np.zeros((1, self.content_dimension), np.float32),
            )
            item = self.item_vectors(np.zeros((1, self.content_dimension), np.float32), [{}])
            scores = self.score(np.zeros((3, len(self.ranker_features)), np.float32))
        except Exception as exc:
            first = (
                str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            )
            raise ModelLoadError(
                f"{self.version}: a graph does not match the manifest ({first})"
            ) from None
        if user.shape != (1, self.dimension) or item.shape != (1, self.dimension):
            raise ModelLoadError(
                f"{self.version}: towers output {user.shape} / {item.shape}, manifest dimension {self.dimension}"
            )
        if scores.shape != (3,):
            raise ModelLoadError(f"{self.version}: ranker outputs {scores.shape} for 3 rows")

    # -- the serving interface (what core.py calls) ---------------------------
    def user_vector(self, user: UserInputs) -> np.ndarray:
        """[D] query vector for the ANN index."""
        vector: np.ndarray = self.user_vector_batch([user])[0]
        return vector

    def rank(self, user: UserInputs, rows: np.ndarray, user_vec: np.ndarray) -> np.ndarray:
        """Ranker scores of candidate ``rows`` for ``user`` (higher is better)."""
        return self.rank_batch([user], [rows], user_vec[None, :])[0]

    def similarity_query(self, row: int) -> np.ndarray:
        """[D] the ANN query for items similar to ``row`` (SimilarItems)."""
        vector: np.ndarray = self.index.vectors(np.asarray([row]))[0]
        return vector

    def user_vector_batch(self, users: Sequence[UserInputs]) -> np.ndarray:
        """[B, D] query vectors, one user-tower run for all of ``users``."""
        interest, history = self._content_inputs(users)
        return self.user_vectors([u.attributes for u in users], interest, history)

    def rank_batch(
        self,
        users: Sequence[UserInputs],
        rows: Sequence[np.ndarray],
        user_vecs: np.ndarray,
        dots: Sequence[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Ranker scores of each user's candidate rows: one ranker run for all.
        ``dots``: the rows' tower scores (user vector . item vector) when the caller
        has them already (the index search computes them), else computed here."""
        sizes = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        if not sizes.sum():
            return [np.empty(0, dtype=np.float32) for _ in rows]
        all_rows = np.concatenate(rows)
        segment = np.repeat(np.arange(len(rows)), sizes)
        if dots is not None:
            dot = np.concatenate(dots)
        else:
            dot = np.einsum("ij,ij->i", self.index.vectors(all_rows), user_vecs[segment])
        interest, history = self._content_inputs(users)
        # Each user's candidates padded to one width (-1), against its two query
        # rows (interest, history mean; zeros when absent): one faiss call.
        filled = np.arange(int(sizes.max()))[None, :] < sizes[:, None]
        padded = np.full(filled.shape, -1, dtype=np.int64)
        padded[filled] = all_rows
        queries = np.stack([interest, history], axis=1).reshape(2 * len(users), -1)
        products = self.index.content_products(queries, np.repeat(padded, 2, axis=0))
        products = products.reshape(len(users), 2, -1)
        history_count = np.log1p(np.asarray([len(u.history_rows) for u in users], np.float64))
        feature_rows = features.ranker_features(
            self.ranker_features,
            dot=dot,
            interest_sim=products[:, 0][filled],
            history_sim=products[:, 1][filled],
            log_popularity=self.index.log_popularity(all_rows),
            history_count=history_count[segment],
        )
        scores = self.score(feature_rows)
        return np.split(scores, np.cumsum(sizes)[:-1])

    def _content_inputs(self, users: Sequence[UserInputs]) -> tuple[np.ndarray, np.ndarray]:
        """[B, C] stated interests and normalised history-content means (zeros when absent)."""
        interest = np.zeros((len(users), self.content_dimension), dtype=np.float32)
        history = np.zeros((len(users), self.content_dimension), dtype=np.float32)
        for i, user in enumerate(users):
            if user.interest is not None:
                interest[i] = user.interest
            if len(user.history_rows):
                mean = user.derived.get("history_mean")
                if mean is None:
                    mean = features.normalise(self.index.content(user.history_rows).mean(axis=0))
                    user.derived["history_mean"] = mean
                history[i] = mean
        return interest, history

    # -- inference ----------------------------------------------------------
    def user_vectors(
        self,
        attributes: Sequence[Mapping[str, str]],
        interest: np.ndarray,
        history: np.ndarray,
    ) -> np.ndarray:
        feeds = {
            self.user_spec.inputs["user_attributes"]: self._user_hot.encode(attributes),
            self.user_spec.inputs["interest"]: np.asarray(interest, dtype=np.float32),
            self.user_spec.inputs["history"]: np.asarray(history, dtype=np.float32),
        }
        (out,) = self._user.run([self.user_spec.output], feeds)
        return np.asarray(out, dtype=np.float32)

    def item_vectors(
        self,
        content: np.ndarray,
        attributes: Sequence[Mapping[str, str]],
        texts: Sequence[str] | None = None,
    ) -> np.ndarray:
        """[N, D] item vectors of new items (``texts``: their text; unused by this format)."""
        feeds = {
            self.item_spec.inputs["content"]: np.asarray(content, dtype=np.float32),
            self.item_spec.inputs["item_attributes"]: self._item_hot.encode(attributes),
        }
        (out,) = self._item.run([self.item_spec.output], feeds)
        return np.asarray(out, dtype=np.float32)

    def score(self, feature_rows: np.ndarray) -> np.ndarray:
        (out,) = self._ranker.run([self.ranker_output], {self.ranker_input: feature_rows})
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def info(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created_at": str(self.manifest.get("created_at", "")),
            "parent_version": str(self.manifest.get("parent_version") or ""),
            "dimension": self.dimension,
            "item_count": len(self.index),
            "metrics": {
                k: float(v)
                for k, v in self.manifest.get("metrics", {}).items()
                if isinstance(v, (int, float))
            },
            "encoder_model": str(self.manifest.get("encoder_model", "")),
        }
