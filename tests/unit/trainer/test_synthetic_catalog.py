"""The embedded catalog reads as a catalog: titles a person can judge, made of the
item's own topic words, and the same data for the same seed."""

from __future__ import annotations

from services.trainer.data.synthetic import TOPICS, generate


def test_titles_are_readable_and_made_of_the_items_topic_words() -> None:
    data = generate(n_users=50, n_items=200, seed=3)
    vocabulary = {w for words in TOPICS.values() for w in words}
    category = data.items.categorical["category"]
    for text, row in zip(data.items.text, category.matrix.tocsr(), strict=True):
        title, subtitle, item_category = text.split(" | ")
        assert title[0].isupper() and len(title.split()) >= 3, title
        words = [w.strip(",:").lower() for w in title.split()]
        # Two topic words in the title, the other two in the subtitle.
        assert sum(w in vocabulary for w in words) == 2, title
        assert subtitle.startswith(("a book about", "a video about", "a podcast about"))
        assert category.vocab[row.indices[0]] == item_category


def test_same_seed_same_catalog_other_seed_other_titles() -> None:
    first, again, other = generate(seed=5), generate(seed=5), generate(seed=6)
    assert first.items.text == again.items.text
    assert (first.interactions.item == again.interactions.item).all()
    assert first.items.text != other.items.text
