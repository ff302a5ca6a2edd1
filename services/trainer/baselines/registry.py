"""The built-in baselines, registered by name (imported lazily by ``base.create``)."""

from __future__ import annotations

from services.trainer.baselines.base import Options, Recommender, register


def _popularity(seed: int, options: Options) -> Recommender:
    from services.trainer.baselines.popularity import Popularity

    return Popularity(seed=seed, **options)


def _segment_popularity(seed: int, options: Options) -> Recommender:
    from services.trainer.baselines.popularity import SegmentPopularity

    return SegmentPopularity(seed=seed, **options)


def _random(seed: int, options: Options) -> Recommender:
    from services.trainer.baselines.popularity import RandomScores

    return RandomScores(seed=seed)


def _content_knn(seed: int, options: Options) -> Recommender:
    from services.trainer.baselines.content_knn import ContentKNN

    return ContentKNN(seed=seed, **options)


def _als(seed: int, options: Options) -> Recommender:
    from services.trainer.baselines.als import ALS

    return ALS(seed=seed, **options)


def _lightfm(seed: int, options: Options) -> Recommender:
    from services.trainer.baselines.lightfm_model import LightFMRecommender

    return LightFMRecommender(seed=seed, **options)


def _dropoutnet(seed: int, options: Options) -> Recommender:
    from services.trainer.baselines.dropoutnet import DropoutNet

    return DropoutNet(seed=seed, **options)


register("random", _random, "uniform random scores (the floor)")
register("popularity", _popularity, "training positives per item")
register("popularity-segment", _segment_popularity, "popularity in the user attribute segment")
register("content-knn", _content_knn, "item k-NN on pretrained text vectors, no training")
register("als", _als, "implicit ALS; fold-in for cold users, popularity with no history")
register("lightfm", _lightfm, "LightFM WARP with user and item features")
register("dropoutnet", _dropoutnet, "two-tower (content + attributes + id with dropout), torch")
