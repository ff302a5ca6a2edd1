"""A seeded synthetic catalog: the embedded default and the test fixture.

Items get a topic; their text is drawn from that topic's vocabulary (real
words, so a pretrained text model sees the topic too) and their category
agrees with the topic most of the time. Users' attributes shift which topics
they like, and a popularity skew makes some items far more common, so every
baseline has something to find: popularity, segments, content and ids. Most
users also state an interest: a few words of the topic they like best, the
text a sign-up form would collect, which is what a new user brings besides
attributes.
"""

from __future__ import annotations

import numpy as np

from services.trainer.data.model import Categorical, Dataset, Entities, Interactions

TOPICS: dict[str, tuple[str, ...]] = {
    "space": ("rocket", "orbit", "planet", "galaxy", "astronaut", "telescope", "comet", "moon",
              "nebula", "satellite", "launch", "star"),
    "cooking": ("recipe", "kitchen", "bread", "spice", "oven", "pasta", "soup", "chef",
                "garlic", "dessert", "grill", "flavor"),
    "sports": ("football", "match", "goal", "tennis", "coach", "league", "stadium", "runner",
               "champion", "basketball", "team", "score"),
    "music": ("guitar", "concert", "song", "piano", "album", "melody", "band", "jazz",
              "singer", "rhythm", "orchestra", "drum"),
    "history": ("empire", "war", "king", "ancient", "castle", "revolution", "medieval",
                "dynasty", "battle", "archive", "treaty", "pharaoh"),
    "finance": ("stock", "market", "bank", "invest", "budget", "loan", "tax", "profit",
                "currency", "fund", "trader", "interest"),
    "nature": ("forest", "river", "mountain", "bird", "ocean", "wildlife", "flower", "tree",
               "desert", "island", "valley", "rain"),
    "technology": ("computer", "software", "robot", "network", "code", "chip", "data",
                   "internet", "algorithm", "device", "cloud", "startup"),
}  # fmt: skip
AGE_BANDS = ("18-24", "25-34", "35-49", "50+")
REGIONS = ("north", "south", "west")
FORMATS = ("book", "video", "podcast")


INTEREST_SHARE = 0.7  # users who state an interest; the rest leave it empty
# Two of an item's topic words make a title a person can read and judge; the
# other words follow in a subtitle, so the text carries every word it had.
TITLE_TEMPLATES = (
    "The {a} and the {b}",
    "{a} of the {b}",
    "Notes on {a} and {b}",
    "{a}, {b} and Beyond",
    "A Year of {a} and {b}",
    "Inside the {a}: {b} Stories",
    "The {a} {b} Handbook",
    "Of {a} and {b}",
)


def readable_titles(words: list[list[str]], seed: int) -> list[str]:
    """Per item, a title made of its first two words ("The Rocket and the Moon"). Its
    own random stream, as for the interests: the words and the rest stay as they were."""
    rng = np.random.default_rng([seed, 2])
    picks = rng.integers(0, len(TITLE_TEMPLATES), size=len(words))
    return [
        TITLE_TEMPLATES[int(p)].format(a=w[0].capitalize(), b=w[1].capitalize())
        for w, p in zip(words, picks, strict=True)
    ]


def stated_interests(taste: np.ndarray, topics: list[str], seed: int) -> list[str]:
    """Per user, three words of their favourite topic ("rocket, moon and comet"), or ""
    for the users who state none. Its own random stream: the rest of the data is the
    same as before users had interests."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for row in taste:
        words = list(rng.choice(TOPICS[topics[int(np.argmax(row))]], size=3, replace=False))
        out.append(
            f"{words[0]}, {words[1]} and {words[2]}" if rng.random() < INTEREST_SHARE else ""
        )
    return out


def generate(
    n_users: int = 400,
    n_items: int = 600,
    mean_interactions: float = 30.0,
    seed: int = 0,
) -> Dataset:
    """A reproducible dataset: the same arguments always give the same data."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    n_topics = len(topics)

    item_topic = rng.integers(0, n_topics, size=n_items)
    item_words: list[list[str]] = []
    for t in item_topic:
        vocab = TOPICS[topics[t]]
        words = [str(w) for w in rng.choice(vocab, size=3, replace=False)]
        # A stray word from another topic keeps text from being a perfect label.
        words.append(str(rng.choice(TOPICS[topics[rng.integers(n_topics)]])))
        item_words.append(words)
    noisy = rng.random(n_items) < 0.2
    category_idx = np.where(noisy, rng.integers(0, n_topics, size=n_items), item_topic)
    categories = [topics[c] for c in category_idx]
    formats = [FORMATS[f] for f in rng.integers(0, len(FORMATS), size=n_items)]
    titles = readable_titles(item_words, seed)
    subtitles = [
        f"a {f} about {w[2]}, with a note on {w[3]}"
        for f, w in zip(formats, item_words, strict=True)
    ]
    items = Entities(
        ids=np.asarray([f"i{i:05d}" for i in range(n_items)], dtype=object),
        categorical={
            "category": Categorical.from_values("category", categories),
            "format": Categorical.from_values("format", formats),
        },
        text_fields={"title": titles},
        text=[
            f"{t} | {sub} | {c}" for t, sub, c in zip(titles, subtitles, categories, strict=True)
        ],
    )
    popularity = rng.lognormal(0.0, 1.2, size=n_items)

    age_idx = rng.integers(0, len(AGE_BANDS), size=n_users)
    region_idx = rng.integers(0, len(REGIONS), size=n_users)
    # Each attribute value pulls its users toward one topic.
    age_topic = rng.permutation(n_topics)[: len(AGE_BANDS)]
    region_topic = rng.permutation(n_topics)[: len(REGIONS)]
    taste = rng.normal(0.0, 1.0, size=(n_users, n_topics))
    taste[np.arange(n_users), age_topic[age_idx]] += 2.0
    taste[np.arange(n_users), region_topic[region_idx]] += 1.5
    users = Entities(
        ids=np.asarray([f"u{u:05d}" for u in range(n_users)], dtype=object),
        categorical={
            "age_band": Categorical.from_values("age_band", [AGE_BANDS[a] for a in age_idx]),
            "region": Categorical.from_values("region", [REGIONS[r] for r in region_idx]),
        },
        text=stated_interests(taste, topics, seed),
    )

    rows_u: list[np.ndarray] = []
    rows_i: list[np.ndarray] = []
    rows_v: list[np.ndarray] = []
    rows_t: list[np.ndarray] = []
    counts = np.minimum(5 + rng.geometric(1.0 / mean_interactions, size=n_users), n_items // 2)
    for u in range(n_users):
        affinity = taste[u, item_topic]
        weights = np.exp(affinity) * popularity**0.8
        chosen = rng.choice(n_items, size=int(counts[u]), replace=False, p=weights / weights.sum())
        rating = np.clip(np.round(3.0 + 0.8 * affinity[chosen] + rng.normal(0, 0.8, len(chosen))),
                         1, 5)  # fmt: skip
        start = int(rng.integers(1_500_000_000, 1_600_000_000))
        stamps = start + np.cumsum(rng.integers(60, 86_400, size=len(chosen)))
        rows_u.append(np.full(len(chosen), u, dtype=np.int64))
        rows_i.append(chosen.astype(np.int64))
        rows_v.append(rating.astype(np.float32))
        rows_t.append(stamps.astype(np.int64))
    user = np.concatenate(rows_u)
    order = np.argsort(np.concatenate(rows_t), kind="stable")
    interactions = Interactions(
        user=user[order],
        item=np.concatenate(rows_i)[order],
        value=np.concatenate(rows_v)[order],
        timestamp=np.concatenate(rows_t)[order],
    )
    return Dataset(f"synthetic-{seed}", items, users, interactions, positive_threshold=4.0)
