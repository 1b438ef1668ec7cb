"""Rows -> the train and held-out prompts of a task (`data.source=dataset` or `arithmetic`).

The training rows are shuffled by data.seed; without data.eval_split the first data.num_eval_prompts rows of that
order are held out. Every prompt is tokenized once (warp_dist.tasks.chat); one longer than data.prompt_max_tokens is
refused or dropped (data.long_prompts); an evaluation prompt whose ids equal a training prompt's is skipped, so a
held-out score never measures a prompt the policy trained on. Each prompt keeps its row's reward columns and, when
templated, its conversation (what a reward model reads in its own chat format).
"""

from __future__ import annotations

import random

from ..data import Prompts, bos_prefix
from . import arithmetic, chat
from .table import DataError, read_split


def _columns(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows[:100]:
        seen.update(dict.fromkeys(map(str, r)))
    return list(seen)


def check_columns(rows: list[dict], data_cfg, where: str) -> list[str]:
    """The reward columns (data.reward_columns, "" = all); DataError naming the field when a column is missing."""
    cols = _columns(rows)
    if data_cfg.prompt_column not in cols:
        raise DataError(f"data.prompt_column={data_cfg.prompt_column!r} is not a column of {where}: it has "
                        f"{', '.join(cols)}")
    wanted = [c.strip() for c in data_cfg.reward_columns.split(",") if c.strip()] or cols
    missing = [c for c in wanted if c not in cols]
    if missing:
        raise DataError(f"data.reward_columns: {', '.join(missing)} not a column of {where}: it has {', '.join(cols)}")
    clash = [c for c in wanted if c in ("prompts", "completions")]
    if clash:
        raise DataError(f"data.reward_columns: a column named {clash[0]!r} would clash with the reward function's own "
                        "argument; leave it out of data.reward_columns")
    return wanted


def task_rows(data_cfg) -> tuple[list[dict], list[dict] | None, str]:
    """(training rows, held-out rows or None to hold some out, a description for messages), columns not checked."""
    if data_cfg.source == "arithmetic":
        return arithmetic.generate(data_cfg.num_train_prompts + 2 * data_cfg.num_eval_prompts, data_cfg.seed), \
            None, "the arithmetic task"
    train = read_split(data_cfg.path, data_cfg.name, data_cfg.split, "data.split")
    ev = read_split(data_cfg.path, data_cfg.name, data_cfg.eval_split, "data.eval_split") \
        if data_cfg.eval_split else None
    return train, ev, f"{data_cfg.path} (split {data_cfg.split})"


def check_task(data_cfg) -> list[str]:
    """What can be checked without a tokenizer (the pre-launch check): readable splits, their columns. Returns the
    columns the rewards will receive."""
    train, ev, where = task_rows(data_cfg)
    keep = check_columns(train, data_cfg, where)
    if ev is not None:
        check_columns(ev, data_cfg, f"{data_cfg.path} (split {data_cfg.eval_split})")
    return keep


class _Encoder:
    def __init__(self, data_cfg, tokenizer, templated: bool):
        self.cfg, self.tok, self.templated = data_cfg, tokenizer, templated
        self.bos = bos_prefix(tokenizer)

    def __call__(self, row: dict) -> tuple[list[int], list[dict] | None]:
        value = row[self.cfg.prompt_column]
        if self.templated:
            msgs = chat.conversation(value, self.cfg.system_prompt)
            return chat.encode(self.tok, chat.render(self.tok, msgs), self.bos), msgs
        return chat.encode(self.tok, str(value), self.bos), None


def _take(rows: list[dict], order: list[int], n: int, enc: _Encoder, keep: list[str], what: str,
          exclude: set | None = None) -> tuple[Prompts, int]:
    """The first n usable rows in `order`: (prompts, rows examined); too long ones refused or dropped."""
    cfg = enc.cfg
    ids, texts, kept, convs, dup, long_, longest, seen = [], [], [], [], 0, 0, 0, 0
    for i in order:
        if len(ids) == n:
            break
        seen += 1
        p, msgs = enc(rows[i])
        if len(p) > cfg.prompt_max_tokens:
            long_ += 1
            longest = max(longest, len(p))
            continue
        if exclude is not None and tuple(p) in exclude:
            dup += 1
            continue
        ids.append(p)
        texts.append(chat.display_text(rows[i][cfg.prompt_column]))
        kept.append({c: rows[i].get(c) for c in keep})
        convs.append(msgs)
    if long_ and cfg.long_prompts == "error":
        raise DataError(f"data.prompt_max_tokens={cfg.prompt_max_tokens}: {long_} of the {seen} {what} prompts "
                        f"examined are longer{' after the chat template' if enc.templated else ''} (the longest "
                        f"{longest} tokens); raise data.prompt_max_tokens, or set data.long_prompts=drop")
    if len(ids) < n:
        field = "data.num_train_prompts" if what == "training" else "data.num_eval_prompts"
        raise DataError(f"{field}={n}: only {len(ids)} usable {what} prompts ({long_} too long, {dup} equal to a "
                        f"training prompt); lower it or bring more rows")
    return Prompts(ids, texts, dup, kept, convs if enc.templated else None), long_


def task_prompts(data_cfg, tokenizer, model: str = "") -> tuple[Prompts, Prompts]:
    """(train, eval) prompts of a dataset or the arithmetic task."""
    train_rows, eval_rows, where = task_rows(data_cfg)
    keep = check_columns(train_rows, data_cfg, where)
    if eval_rows is not None:
        check_columns(eval_rows, data_cfg, f"{data_cfg.path} (split {data_cfg.eval_split})")
    probe = (eval_rows or train_rows)[0][data_cfg.prompt_column]
    conversational = chat.is_conversation(probe) or chat.is_conversation(train_rows[0][data_cfg.prompt_column])
    templated = use_template_for(data_cfg, tokenizer, conversational, model)
    enc = _Encoder(data_cfg, tokenizer, templated)
    order = list(range(len(train_rows)))
    random.Random(data_cfg.seed).shuffle(order)
    if eval_rows is None:  # hold out the first num_eval rows of the shuffled order (a deterministic fraction)
        n_eval = data_cfg.num_eval_prompts
        if len(order) <= n_eval:
            raise DataError(f"data.num_eval_prompts={n_eval}: {where} has only {len(order)} rows, none left to "
                            "train on; lower it, or name a data.eval_split")
        # up to n_eval spare candidates (for those equal to a training prompt) when the rows allow them
        spare = min(n_eval, max(0, len(order) - n_eval - data_cfg.num_train_prompts))
        eval_rows, eval_order, order = train_rows, order[:n_eval + spare], order[n_eval + spare:]
    else:
        eval_order = list(range(len(eval_rows)))
        random.Random(data_cfg.seed + 1).shuffle(eval_order)
    tr, dropped = _take(train_rows, order, data_cfg.num_train_prompts, enc, keep, "training")
    ev, _ = _take(eval_rows, eval_order, data_cfg.num_eval_prompts, enc, keep, "evaluation",
                  exclude={tuple(p) for p in tr.ids})
    tr.dropped = dropped
    return tr, ev


def use_template_for(data_cfg, tokenizer, conversational: bool, model: str = "") -> bool:
    return chat.use_template(data_cfg.chat_template, tokenizer, conversational, model)
