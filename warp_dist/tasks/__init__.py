"""Prompts for any task (`data.source=dataset` or `arithmetic`; IMDB's review prefixes live in warp_dist.data).

- `table`: the rows of a split, from a local jsonl / json / csv / parquet / arrow file or folder, or a hub dataset.
- `chat`: a prompt (text or conversation) rendered through the tokenizer's chat template and tokenized once: the ids
  the sampler, the trainer, the reference model and the evaluation all use.
- `arithmetic`: the built-in offline task, generated from a seed.
- `prompts`: rows -> the train and held-out `data.Prompts` (columns checked, held out, de-duplicated, length-checked).
"""
