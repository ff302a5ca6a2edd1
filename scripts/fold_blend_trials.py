"""Item cold-start: can training choose the new-item blend on items it holds out?

    [FEATURES=all|z|none] OUT=DIR python scripts/fold_blend_trials.py DATA PART SEED [SEED ...]
    COMPARE=OPTION OUT=DIR python scripts/fold_blend_trials.py DATA PART SEED [SEED ...]
    KNN=1 | TITLE=1 OUT=DIR python scripts/fold_blend_trials.py DATA PART SEED [SEED ...]
    python scripts/fold_blend_trials.py summary OUT/results.jsonl

The blend's weights (content-knn, map, unliked knn) were chosen by hand on both catalogs'
validation halves; ml-latest-small prefers other weights than ML-100K (docs/experiments/model-runs.md, runs
4 and 8). Per seed, on the item-cold split, this fits the towers (``coldstart-no-ranker``)
and, as ``select.auto_select`` does, a second set of towers on the training data less a
seeded 20% of the warm items ("the fold": those items play new). For both it records, per
user, the blend's terms over the towers' top 100 (tower score, knn, map, unliked knn and the
tower's item bias on its own), on the fold's held-out items and on the split's ``PART``
items. Every weight set of a grid is then scored on both (Recall@20, the harness's
definition), and the weights the fold picks are scored on ``PART`` beside the default.

Beside the grid, ``learned`` scores on ``PART``: the default blend plus the user's
"mainstreamness" (mean log popularity of their history, standardised over users) times
the standardised item bias; and, unless FEATURES=none, a gradient-boosted classifier
(hit or not) trained on the fold's heads over FEATURES ("all": the terms standardised and
raw, head position, history sizes, user and item attributes; "z": the standardised terms,
head position and history sizes), alone and mixed into the default blend.

One JSON line per seed goes to OUT/results.jsonl: the default's, the fold-chosen and the
``PART``-best weights' recall on ``PART``, the whole grid on both, the ``learned`` rows.

COMPARE=OPTION instead fits the towers without and with a boolean model option (e.g.
``unliked_pool``) on each seed's split and records ``PART``'s Recall@20 of the towers alone
and of the default blend for both; ``summary`` reads either kind of file. KNN=1 scores other forms of
the knn term (``knn_trials``), TITLE=1 a knn term over the title alone (``title_trials``);
each writes one JSON line per seed with the default's recall beside the variants'.
"""

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from trial_common import append_result, fit_towers, make_split, open_data, train_data, z

from services.common.recsys_features import content_knn_scores, content_map
from services.trainer.model.distributed import DistContext
from services.trainer.model.select import holdout_folds, without_items
from services.trainer.model.train import _topk, item_vectors, train, user_vectors

OUT = Path(os.environ.get("OUT", ".run/trials/fold"))
HEAD = 100
KNN = [0.3, 0.5, 0.7, 1.0, 1.5]
MAP = [0.3, 0.5, 0.7, 1.0, 1.5]
UNLIKED = [0.0, 0.1, 0.2, 0.35]
BIAS = [-0.3, 0.0, 0.3]
GRID = list(itertools.product(KNN, MAP, UNLIKED, BIAS))
DEFAULT = (0.7, 0.7, 0.2, 0.0)
# The learned fusion's inputs: "all" (terms standardised and raw, head position, history
# sizes, user and item attributes) or "z" (standardised terms, position, history sizes).
FEATURES = os.environ.get("FEATURES", "all")


def item_cold_queries(ds: Any, vecs: np.ndarray, seed: int, part: str) -> tuple[Any, ...]:
    """(training data, the item-cold split's ``part`` task, its users, their liked
    histories, their below-threshold training items) for split ``seed``."""
    split = make_split("item-cold", ds, seed)
    data = train_data(ds, split, vecs.astype(np.float32))
    task = split.tasks_for(part)[0]
    users = np.asarray(task.users, dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    unliked_all = data.unliked_by_user()
    unliked = [unliked_all.get(int(u), none) for u in users]
    hists = [np.asarray(h, dtype=np.int64) for h in task.history]
    return data, task, users, hists, unliked


def terms(
    towers: Any,
    data: Any,
    content: np.ndarray,
    thresholds: np.ndarray,
    users: np.ndarray,
    histories: list[np.ndarray],
    unliked: list[np.ndarray],
    targets: list[np.ndarray],
    candidates: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per user, the blend's terms over the towers' top ``HEAD`` of ``candidates``, which
    of those are targets, and the number of targets (recall's denominator)."""
    ivecs = item_vectors(towers, data)
    cmap = content_map(content, ivecs, data.pop > 0)
    uvecs = user_vectors(
        towers,
        data,
        data.user_attrs[users],
        data.user_codes[users].astype(np.int64),
        histories,
        ivecs,
        data.interest[users],
        unliked,  # read only by towers trained with unliked_pool
    )
    tower = uvecs @ ivecs[candidates].T
    head = _topk(tower, min(HEAD, len(candidates)))
    n = len(users)
    out = {k: np.zeros((n, head.shape[1])) for k in ("t", "knn", "map", "uknn", "bias", "hit")}
    out["n_targets"] = np.array([len(t) for t in targets], dtype=np.float64)
    out["has_hist"] = np.array([len(h) > 0 for h in histories])
    for r in range(n):
        c = candidates[head[r]]
        th = thresholds[c]
        out["t"][r] = tower[r, head[r]]
        out["knn"][r] = content_knn_scores(content, histories[r], c, th)
        out["map"][r] = content[c] @ (cmap @ uvecs[r])
        if len(unliked[r]):
            out["uknn"][r] = content_knn_scores(content, unliked[r], c, th)
        out["bias"][r] = ivecs[c, -1]
        out["hit"][r] = np.isin(c, targets[r])
    out["items"] = candidates[head]
    logpop = np.log1p(np.asarray(data.pop, dtype=np.float64))
    main = np.array([logpop[h].mean() if len(h) else np.nan for h in histories])
    ok = np.isfinite(main)
    main[ok] = (main[ok] - main[ok].mean()) / (main[ok].std() + 1e-9)
    out["main"] = np.where(ok, main, 0.0)
    out["hist_len"] = np.array([len(h) for h in histories], dtype=np.float64)
    out["unliked_len"] = np.array([len(u) for u in unliked], dtype=np.float64)
    out["user_attrs"] = np.asarray(data.user_attrs[users], dtype=np.float64)
    return out


def features(rec: dict[str, np.ndarray], item_attrs: np.ndarray) -> np.ndarray:
    """(users x head, F): the blend's terms (standardised over the head and raw), the
    head position, the user's history sizes and attributes, the item's attributes."""
    n, h = rec["t"].shape
    cols = [z(rec[k]) for k in ("t", "knn", "map", "uknn", "bias")]
    if FEATURES == "all":
        cols += [rec[k] for k in ("t", "knn", "map", "uknn", "bias")]
    cols.append(np.tile(np.arange(h, dtype=np.float64) / h, (n, 1)))
    per_user = np.column_stack([np.log1p(rec["hist_len"]), np.log1p(rec["unliked_len"])])
    if FEATURES == "all":
        per_user = np.column_stack([per_user, rec["user_attrs"]])
    x = np.stack(cols, axis=-1).reshape(n * h, -1)
    u = np.repeat(per_user, h, axis=0)
    if FEATURES != "all":
        return np.hstack([x, u])
    i = np.asarray(item_attrs, dtype=np.float64)[rec["items"].reshape(-1)]
    return np.hstack([x, u, i])


def learned(
    fold: dict[str, np.ndarray], part: dict[str, np.ndarray], item_attrs: np.ndarray, seed: int
) -> dict[str, float]:
    """A gradient-boosted classifier (hit or not) trained on the fold's heads, scored on
    ``PART``'s: mixed into the default blend at weights 0 (the default) to 1000 (alone)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    keep = np.repeat(fold["has_hist"], fold["t"].shape[1])
    xf, yf = features(fold, item_attrs)[keep], fold["hit"].reshape(-1)[keep]
    clf = HistGradientBoostingClassifier(
        max_iter=200,
        learning_rate=0.05,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        random_state=seed,
    )
    clf.fit(xf, yf.astype(int))
    p = clf.decision_function(features(part, item_attrs)).reshape(part["t"].shape)
    rec = {**part, "gb": z(p)}
    return {f"gbdt:{w:g}": recall(rec, DEFAULT, extra=("gb", w)) for w in (0.0, 0.5, 1.0, 2.0, 1e3)}


def mainstream(part: dict[str, np.ndarray]) -> dict[str, float]:
    """The default blend plus c x mainstreamness x z(item bias) (and + the plain z(bias))."""
    out = {}
    zb = z(part["bias"])
    for c in (0.1, 0.2, 0.3, 0.5):
        rec = {**part, "mb": part["main"][:, None] * zb}
        out[f"mainbias:{c:g}"] = recall(rec, DEFAULT, extra=("mb", c))
        rec["mb"] = rec["mb"] + zb
        out[f"mainbias+bias:{c:g}"] = recall(rec, DEFAULT, extra=("mb", c))
    return out


def recall(
    rec: dict[str, np.ndarray],
    w: tuple[float, float, float, float],
    extra: tuple[str, float] | None = None,
) -> float:
    """Mean Recall@20 of the blend with weights (knn, map, unliked, bias) over the head;
    users without history keep the tower order (as the model does)."""
    a, b, c, d = w
    s = (
        z(rec["t"])
        + a * z(rec["knn"])
        + b * z(rec["map"])
        + c * z(rec["uknn"])
        + d * z(rec["bias"])
    )
    if extra is not None:
        s = s + extra[1] * rec[extra[0]]  # as given: callers standardise where they want
    s = np.where(rec["has_hist"][:, None], s, rec["t"])
    top = np.argsort(-s, axis=1, kind="stable")[:, :20]
    hits = np.take_along_axis(rec["hit"], top, axis=1).sum(axis=1)
    return float(np.mean(hits / rec["n_targets"]))


def summary(path: str) -> None:
    with open(path) as f:
        lines = [json.loads(x) for x in f]
    if lines and "option" in lines[0]:
        compare_summary(lines)
        return
    for d in sorted({x["data"] for x in lines}):
        rows = [x for x in lines if x["data"] == d]
        chosen = np.array([x["chosen_recall"] - x["default_recall"] for x in rows])
        best = np.array([x["best_recall"] - x["default_recall"] for x in rows])
        se = chosen.std(ddof=1) / np.sqrt(len(rows)) if len(rows) > 1 else 0.0
        print(
            f"{d}: {len(rows)} seeds, default {np.mean([x['default_recall'] for x in rows]):.4f}; "
            f"fold-chosen {chosen.mean():+.4f} +- {se:.4f} ({(chosen > 0).sum()}/{len(rows)}); "
            f"part-best (oracle) {best.mean():+.4f}"
        )
        for x in rows:
            print("   ", x["seed"], "chosen", x["chosen"], "best", x["best"])
        for k in rows[0].get("learned", {}):
            g = np.array([x["learned"][k] - x["default_recall"] for x in rows])
            print(
                f"    {k}: {g.mean():+.4f} +- {g.std(ddof=1) / np.sqrt(len(g)):.4f} ({(g > 0).sum()}/{len(g)})"
            )
        # one weight set for all seeds: summed fold recall picks it
        fold = np.sum([x["grid_fold"] for x in rows], axis=0)
        part = np.array([x["grid_part"] for x in rows])
        pick = int(np.argmax(fold))
        print(f"    pooled fold pick {GRID[pick]}: part {np.mean(part[:, pick]):.4f}")
        corr = np.corrcoef(np.mean([x["grid_fold"] for x in rows], 0), part.mean(0))[0, 1]
        print(f"    fold vs part grid correlation {corr:.3f}")


def knn_variant(
    content: np.ndarray,
    hist: np.ndarray,
    cands: np.ndarray,
    th: np.ndarray,
    all_th: np.ndarray,
    pop: np.ndarray,
    kind: str,
) -> np.ndarray:
    """The knn term computed another way (KNN=1): "idf" each history item weighted by
    1 / log(2 + its training count); "p3" cosines cubed; "sym" the neighbour test from
    either side (the candidate among the history item's nearest too); "both" from both."""
    if len(hist) == 0:
        return np.zeros(len(cands))
    sims = content[cands] @ content[hist].T
    mine = sims >= th[:, None]
    theirs = sims >= all_th[hist][None, :]
    keep = {"sym": mine | theirs, "both": mine & theirs}.get(kind, mine)
    vals = np.maximum(sims, 0.0) ** (3 if kind == "p3" else 1)
    if kind == "idf":
        vals = vals / np.log(2.0 + pop[hist])[None, :]
    out: np.ndarray = np.where(keep, vals, 0.0).sum(axis=1)
    return out


KNN_KINDS = ("idf", "p3", "sym", "both")


def knn_trials(d: str, part: str, seeds: list[int]) -> None:
    """KNN=1: the default blend with both knn terms (liked and unliked) computed each
    ``KNN_KINDS`` way instead; one JSON line per seed like COMPARE's."""
    ds, vecs = open_data(d, OUT)
    for seed in seeds:
        data, task, users, hists, unl = item_cold_queries(ds, vecs, seed, part)
        sm = fit_towers(data, seed)
        content = np.asarray(sm.data.content, dtype=np.float32)
        all_th = np.asarray(sm.thresholds)
        rec = terms(sm.result.towers, sm.data, content, all_th, users, hists, unl,
                    list(task.targets), np.asarray(task.candidates, dtype=np.int64))  # fmt: skip
        line: dict[str, Any] = {
            "data": d,
            "part": part,
            "seed": seed,
            "default": recall(rec, DEFAULT),
        }
        pop = np.asarray(sm.data.pop, dtype=np.float64)
        for kind in KNN_KINDS:
            alt = dict(rec)
            for key, rows in (("knn", hists), ("uknn", unl)):
                alt[key] = np.stack([
                    knn_variant(content, h, rec["items"][r], all_th[rec["items"][r]], all_th, pop, kind)
                    for r, h in enumerate(rows)
                ])  # fmt: skip
            line[kind] = recall(alt, DEFAULT)
        append_result(OUT, line)


TITLE_WEIGHTS = (0.35, 0.5, 0.7, 1.0, 1.5, 2.0)


def title_trials(d: str, part: str, seeds: list[int]) -> None:
    """TITLE=1: the default blend plus w x z(knn over the title alone, its "(year)" cut off,
    encoded by the same MiniLM; 200 neighbours): a franchise or a remake shares a name more
    than a genre list. Also with the unliked items' title knn at 0.2 x w beside it, and with
    the full-text knn terms left out. One JSON line per seed like KNN's."""
    import re

    from services.common.recsys_features import content_thresholds
    from services.trainer.data.vectors import MINILM, cached_vectors

    ds, vecs = open_data(d, OUT)
    titles = [re.sub(r"\s*\(\d{4}\)\s*$", "", t) for t in ds.items.text_fields["title"]]
    title_vecs = np.asarray(cached_vectors(titles, MINILM), dtype=np.float32)
    title_vecs /= np.maximum(np.linalg.norm(title_vecs, axis=1, keepdims=True), 1e-9)
    title_th = content_thresholds(title_vecs)
    for seed in seeds:
        data, task, users, hists, unl = item_cold_queries(ds, vecs, seed, part)
        sm = fit_towers(data, seed)
        rec = terms(sm.result.towers, sm.data, np.asarray(sm.data.content, dtype=np.float32),
                    np.asarray(sm.thresholds), users, hists, unl, list(task.targets),
                    np.asarray(task.candidates, dtype=np.int64))  # fmt: skip
        knn_t = np.stack([
            content_knn_scores(title_vecs, h, rec["items"][r], title_th[rec["items"][r]])
            for r, h in enumerate(hists)
        ])  # fmt: skip
        uknn_t = np.stack([
            content_knn_scores(title_vecs, u, rec["items"][r], title_th[rec["items"][r]])
            for r, u in enumerate(unl)
        ])  # fmt: skip
        line: dict[str, Any] = {
            "data": d,
            "part": part,
            "seed": seed,
            "default": recall(rec, DEFAULT),
        }
        no_knn = (0.0, DEFAULT[1], 0.0, DEFAULT[3])
        for w in TITLE_WEIGHTS:
            rec["title"] = z(knn_t)
            line[f"title:{w:g}"] = recall(rec, DEFAULT, extra=("title", w))
            line[f"title-only-knn:{w:g}"] = recall(rec, no_knn, extra=("title", w))
            rec["title"] = z(knn_t) + 0.2 * z(uknn_t)
            line[f"title+unliked:{w:g}"] = recall(rec, DEFAULT, extra=("title", w))
        append_result(OUT, line)


def compare_summary(lines: list[dict[str, Any]]) -> None:
    for d in sorted({x["data"] for x in lines}):
        rows = [x for x in lines if x["data"] == d]
        for kind in ("towers", "blend"):
            g = np.array([x[f"{kind}_True"] - x[f"{kind}_False"] for x in rows])
            base = np.mean([x[f"{kind}_False"] for x in rows])
            se = g.std(ddof=1) / np.sqrt(len(g)) if len(g) > 1 else 0.0
            print(f"{d} {rows[0]['option']} {kind}: {base:.4f} without, "
                  f"{g.mean():+.4f} +- {se:.4f} with ({(g > 0).sum()}/{len(g)} seeds)")  # fmt: skip


def compare(d: str, part: str, seeds: list[int], option: str) -> None:
    """COMPARE=OPTION: the towers fitted without and with the boolean model ``option``,
    item-cold ``part`` Recall@20 of the towers alone and of the default blend."""
    ds, vecs = open_data(d, OUT)
    for seed in seeds:
        t0 = time.time()
        data, task, users, hists, unl = item_cold_queries(ds, vecs, seed, part)
        line: dict[str, Any] = {"data": d, "part": part, "seed": seed, "option": option}
        for on in (False, True):
            sm = fit_towers(data, seed, {option: on})
            rec = terms(
                sm.result.towers,
                sm.data,
                np.asarray(sm.data.content, dtype=np.float32),
                np.asarray(sm.thresholds),
                users,
                hists,
                unl,
                list(task.targets),
                np.asarray(task.candidates, dtype=np.int64),
            )
            line[f"towers_{on}"] = recall(rec, (0.0, 0.0, 0.0, 0.0))
            line[f"blend_{on}"] = recall(rec, DEFAULT)
        line["secs"] = round(time.time() - t0, 1)
        append_result(OUT, line)


def main() -> None:
    if sys.argv[1] == "summary":
        summary(sys.argv[2])
        return
    if os.environ.get("TITLE"):
        title_trials(sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]])
        return
    if os.environ.get("KNN"):
        knn_trials(sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]])
        return
    if os.environ.get("COMPARE"):
        compare(sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]], os.environ["COMPARE"])
        return
    d, part = sys.argv[1:3]
    ds, vecs = open_data(d, OUT)
    for seed in map(int, sys.argv[3:]):
        t0 = time.time()
        data, task, users, hists, unl = item_cold_queries(ds, vecs, seed, part)
        sm = fit_towers(data, seed)
        md, cfg = sm.data, sm.cfg
        content = np.asarray(md.content, dtype=np.float32)
        thresholds = np.asarray(sm.thresholds)
        none = np.zeros(0, dtype=np.int64)
        unliked_all = data.unliked_by_user()
        cands = np.asarray(task.candidates, dtype=np.int64)
        rec_part = terms(
            sm.result.towers, md, content, thresholds, users, hists, unl, list(task.targets), cands
        )

        held = holdout_folds(md, cfg)[0]
        sub = without_items(md, held)
        fold_result = train(sub, cfg.with_options(use_ranker=False), DistContext.single())
        is_held = np.zeros(md.n_items, dtype=bool)
        is_held[held] = True
        f_users, f_hist, f_unl, f_targets = [], [], [], []
        for u in range(md.n_users):
            t = md.history(u)
            t = t[is_held[t]]
            if len(t):
                f_users.append(u)
                f_hist.append(sub.history(u).astype(np.int64))
                un = unliked_all.get(u, none)
                f_unl.append(un[~is_held[un]])
                f_targets.append(t)
        rec_fold = terms(
            fold_result.towers,
            sub,
            content,
            thresholds,
            np.asarray(f_users),
            f_hist,
            f_unl,
            f_targets,
            held.astype(np.int64),
        )
        grid_fold = [recall(rec_fold, w) for w in GRID]
        grid_part = [recall(rec_part, w) for w in GRID]
        gb = mainstream(rec_part)
        if FEATURES != "none":
            gb.update(learned(rec_fold, rec_part, np.asarray(md.item_attrs), seed))
        ci, bi = int(np.argmax(grid_fold)), int(np.argmax(grid_part))
        line = {
            "data": d,
            "part": part,
            "seed": seed,
            "secs": round(time.time() - t0, 1),
            "default_recall": grid_part[GRID.index(DEFAULT)],
            "default_fold": grid_fold[GRID.index(DEFAULT)],
            "chosen": GRID[ci],
            "chosen_recall": grid_part[ci],
            "best": GRID[bi],
            "best_recall": grid_part[bi],
            "learned": gb,
            "grid_fold": grid_fold,
            "grid_part": grid_part,
        }
        append_result(OUT, line, echo=False)
        print(d, seed, line["secs"], line["default_recall"], gb, flush=True)


if __name__ == "__main__":
    main()
