"""The stages before WARP, for real and small: SFT on the tiny GPT-2 (1 rank and 2 gloo ranks), a reward model on a
tiny BERT built here, both used by a short WARP run; the output-folder cache; config errors; the pure pieces."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, accelerate_launch, subprocess_env
from warp_dist.config import ConfigError
from warp_dist.stages import output, texts
from warp_dist.stages.common import lr_factor
from warp_dist.stages.config import config_hash, load_stage_config

SFT_YAML = str(ROOT / "configs" / "stages" / "sft.yaml")
RM_YAML = str(ROOT / "configs" / "stages" / "reward_model.yaml")
# ~256 short reviews, 16 steps: seconds on the tiny GPT-2
SFT_TINY = ["model.name=embedded:tiny-gpt2", "data.num_train_reviews=256", "data.num_eval_reviews=48",
            "data.max_tokens=48", "train.lr=2e-3", "train.warmup_steps=2", "log_every=4"]
# a random tiny BERT needs a few hundred steps before its [CLS] output depends on the words: 4,000 reviews cut at
# 64 tokens + one snippet each, 500 steps of 16 (lr 3e-3 makes it collapse to a constant output); its random token
# embeddings must train (the preset freezes a pretrained encoder's)
RM_TINY = ["data.num_train_reviews=4000", "data.num_test_reviews=300", "data.review_max_tokens=64",
           "data.snippets_per_review=1", "data.snippet_max_tokens=32", "train.batch_size=16", "train.lr=1e-3",
           "train.freeze_embeddings=false", "eval.batch_size=100", "log_every=100"]
# tiny models run fastest on one thread each (two threads per process oversubscribe the 2-core CI box)
ONE_THREAD = {"WARP_DIST_NUM_THREADS": 1, "OMP_NUM_THREADS": 1}


def py(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=subprocess_env(**ONE_THREAD),
                          capture_output=True, text=True, timeout=timeout)


def launch2(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = accelerate_launch(2, str(ROOT / script), *args)
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1), capture_output=True, text=True,
                          timeout=timeout)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("sft") / "tiny_sft"
    proc = py("launch/sft.py", "--config", SFT_YAML, *SFT_TINY, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def build_tiny_bert(out: Path) -> Path:
    """A random 2-layer BERT (hidden 32, no dropout) with a WordPiece tokenizer trained on 3,000 bundled reviews."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from warp_dist.data import load_bundled_reviews

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk.train_from_iterator(load_bundled_reviews(seed=1)[:3000],
                           trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials, show_progress=False))
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tk.token_to_id("[CLS]")), ("[SEP]", tk.token_to_id("[SEP]"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, pad_token_id=tk.token_to_id("[PAD]"),
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # learns faster without dropout
    BertModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("rm")
    bert = build_tiny_bert(base / "tiny_bert")
    out = base / "tiny_rm"
    proc = py("launch/reward_model.py", "--config", RM_YAML, f"model.name={bert}", *RM_TINY, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


# ------------------------------------------------------------------------------------------------- SFT
def test_sft_lowers_the_eval_loss_and_writes_a_loadable_folder(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, proc = sft_run
    s = json.loads((out / "summary.json").read_text())
    assert s["stage"] == "sft" and s["complete"] is True and s["base_model"] == "embedded:tiny-gpt2"
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.1, (s["eval_loss_before"], s["eval_loss_after"])
    assert s["train_reviews"] == 256 and s["steps"] == 16 and s["world_size"] == 1
    assert "launch/sft.py" in s["command"] and "data.num_train_reviews=256" in s["command"]
    assert {"load_model_s", "data_s", "eval_before_s", "train_s", "eval_after_s", "save_s", "total_s"} <= set(s["timings"])
    assert s["config_hash"] == config_hash(load_stage_config("sft", SFT_YAML, [*SFT_TINY, f"output_dir={out}"]))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.config.vocab_size == len(tok)
    # nothing but the result: no temp folder left next to it
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_sft_rerun_is_skipped_and_another_config_refused(sft_run):
    out, _ = sft_run
    before = (out / "summary.json").stat().st_mtime_ns
    t0 = time.time()
    again = py("launch/sft.py", "--config", SFT_YAML, *SFT_TINY, f"output_dir={out}", "log_every=1")  # not hashed
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(again.stdout.strip().splitlines()) == 1 and "already holds this config's result" in again.stdout
    assert time.time() - t0 < 30 and (out / "summary.json").stat().st_mtime_ns == before
    other = py("launch/sft.py", "--config", SFT_YAML, *SFT_TINY, f"output_dir={out}", "train.lr=1e-3")
    assert other.returncode == 2
    assert len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert "holds a sft result of another config (train.lr=0.002 there, 0.001 now)" in other.stderr
    assert "overwrite=true" in other.stderr and (out / "summary.json").stat().st_mtime_ns == before


@pytest.mark.multiproc
def test_sft_on_two_gloo_ranks_takes_the_same_steps(sft_run, tmp_path):
    """Same config on 2 ranks: each rank half of every batch, DDP-averaged gradients -> the 1-rank weights."""
    from transformers import AutoModelForCausalLM

    one, _ = sft_run
    out = tmp_path / "sft2"
    proc = launch2("launch/sft.py", "--config", SFT_YAML, *SFT_TINY, f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s1, s2 = (json.loads((p / "summary.json").read_text()) for p in (one, out))
    assert s2["world_size"] == 2 and s2["command"].startswith("accelerate launch --num_processes 2")
    assert s2["eval_loss_before"] == pytest.approx(s1["eval_loss_before"], abs=1e-5)
    assert s2["eval_loss_after"] == pytest.approx(s1["eval_loss_after"], abs=1e-3)
    a = AutoModelForCausalLM.from_pretrained(str(one)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-3, worst


# ------------------------------------------------------------------------------------------------- reward model
def test_reward_model_learns_sentiment_on_a_tiny_bert(rm_run):
    from transformers import AutoConfig

    out, proc = rm_run
    s = json.loads((out / "summary.json").read_text())
    assert s["stage"] == "reward_model" and s["complete"] is True
    assert s["accuracy_whole_reviews"] > 0.6, s["test"]
    for key in ("accuracy_review_starts", "accuracy_sentences"):
        assert 0.0 <= s[key] <= 1.0
    assert s["test"]["whole_reviews"]["n"] == 300 and s["test"]["sentences"]["n"] > 250
    assert s["train_reviews"] == 4000 and s["train_snippets"] > 3500
    cfg = AutoConfig.from_pretrained(str(out))
    assert cfg.id2label == {0: "NEGATIVE", 1: "POSITIVE"} and cfg.label2id == {"NEGATIVE": 0, "POSITIVE": 1}
    raw = json.loads((out / "config.json").read_text())
    assert raw["id2label"] == {"0": "NEGATIVE", "1": "POSITIVE"}


@pytest.mark.parametrize("freeze", [True, False])
def test_reward_model_freeze_embeddings_keeps_the_token_embeddings(freeze):
    """train.freeze_embeddings: the token embeddings stay as loaded (and get no optimizer state); the rest trains."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from warp_dist.guards import check_finite
    from warp_dist.stages import reward_model

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2))
    cfg = load_stage_config("reward_model", RM_YAML,
                            [f"train.freeze_embeddings={str(freeze).lower()}", "train.batch_size=4", "log_every=1000"])
    g = random.Random(0)
    seqs = [[g.randrange(1, 50) for _ in range(g.randrange(3, 9))] for _ in range(16)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = reward_model._fit(cfg, model, seqs, [i % 2 for i in range(16)], 0, torch.device("cpu"), check_finite)
    assert len(losses) == 4
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(model.get_parameter(emb), before[emb]) is freeze
    assert not torch.equal(model.get_parameter("classifier.weight"), before["classifier.weight"])
    assert not torch.equal(model.get_parameter("bert.embeddings.position_embeddings.weight"),
                           before["bert.embeddings.position_embeddings.weight"])


def test_reward_model_freeze_layers_and_head_lr():
    """train.freeze_layers: the first N encoder layers stay as loaded, the rest trains; train.head_lr: the classifier
    (and BERT's pooler) move at their own rate; too many layers is one line naming the field."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from warp_dist.guards import check_finite
    from warp_dist.stages import reward_model
    from warp_dist.stages.output import StageError

    g = random.Random(0)
    seqs = [[g.randrange(1, 50) for _ in range(g.randrange(3, 9))] for _ in range(16)]

    def fit(*overrides):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                         num_attention_heads=2, intermediate_size=32, num_labels=2))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = load_stage_config("reward_model", RM_YAML, ["train.batch_size=4", "log_every=1000", *overrides])
        reward_model._fit(cfg, model, seqs, [i % 2 for i in range(16)], 0, torch.device("cpu"), check_finite)
        return {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}

    moved = fit("train.freeze_layers=1")
    layer0 = [n for n in moved if n.startswith("bert.encoder.layer.0.")]
    layer1 = [n for n in moved if n.startswith("bert.encoder.layer.1.")]
    assert layer0 and all(moved[n] == 0 for n in layer0)
    assert all(moved[n] > 0 for n in layer1 if n.endswith(".weight"))
    assert reward_model.encoder_layers(BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)))[2] is not None
    slow, fast = fit(), fit("train.head_lr=1e-2")  # train.lr = 1e-4: 100x the head's lr; measured 8.7-100x the move
    for n in ("classifier.weight", "bert.pooler.dense.weight"):
        assert fast[n] > 4 * slow[n], (n, fast[n], slow[n])
    with pytest.raises(StageError, match=r"^train.freeze_layers=3: allowed 0..2 \(the encoder's layers\)$"):
        fit("train.freeze_layers=3")
    with pytest.raises(ConfigError, match="train.head_lr"):
        load_stage_config("reward_model", RM_YAML, ["train.head_lr=-1"])


def test_warp_runs_from_the_sft_model_with_the_reward_model(sft_run, rm_run, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from warp_dist.config import RewardConfig
    from warp_dist.rewards import build_reward

    sft, _ = sft_run
    rm, _ = rm_run
    reward = build_reward(RewardConfig(kind="classifier", name=str(rm), label=1, minus_label=0))
    prompts, completions = ["This film was", "The plot"], [" wonderful, I loved it.", " was a boring mess."]
    got = reward(prompts, completions)
    tok, clf = AutoTokenizer.from_pretrained(str(rm)), AutoModelForSequenceClassification.from_pretrained(str(rm))
    with torch.no_grad():
        logits = clf(**tok([p + c for p, c in zip(prompts, completions, strict=True)], return_tensors="pt",
                           padding=True)).logits
    assert torch.allclose(got, logits[:, 1] - logits[:, 0], atol=1e-5)

    out = tmp_path / "warp"
    proc = py("launch/warp.py", "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"), f"output_dir={out}",
              f"model.name={sft}", "reward.kind=classifier", f"reward.name={rm}", "reward.label=1",
              "reward.minus_label=0", "train.steps=2", "train.iterations=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["num_prompts"] == 16
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" for r in recs)


# ------------------------------------------------------------------------------------------------- errors
def test_bad_config_is_one_line_before_any_work():
    for script, yaml, arg, msg in (
            ("launch/sft.py", SFT_YAML, "train.lrr=1", "unknown config key 'train.lrr'; did you mean train.lr, train.seed, train.max_grad_norm?"),
            ("launch/reward_model.py", RM_YAML, "train.warmup_ratio=2",
             "train.warmup_ratio=2.0 is invalid: allowed in [0, 1)")):
        t0 = time.time()
        proc = py(script, "--config", yaml, arg)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.strip() == f"config error: {msg}"
        assert time.time() - t0 < 20


def test_missing_model_folder_is_one_line(tmp_path):
    proc = py("launch/reward_model.py", "--config", RM_YAML, f"model.name={tmp_path / 'nothing'}",
              f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "model.name=" in proc.stderr and "no such folder" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_config_errors_in_process():
    with pytest.raises(ConfigError, match=r"^data.num_train_reviews=8 is invalid: allowed >= train.batch_size \(16\)$"):
        load_stage_config("sft", SFT_YAML, ["data.num_train_reviews=8"])
    with pytest.raises(ConfigError, match="unknown config key 'data.snipets_per_review'; did you mean "
                                          "data.snippets_per_review"):
        load_stage_config("reward_model", RM_YAML, ["data.snipets_per_review=3"])
    with pytest.raises(ConfigError, match="data.snippet_max_words"):
        load_stage_config("reward_model", RM_YAML, ["data.snippet_max_words=2"])


# ------------------------------------------------------------------------------------------------- pure pieces
def test_config_hash_ignores_where_and_how_loudly(tmp_path):
    a = load_stage_config("sft", SFT_YAML)
    b = load_stage_config("sft", SFT_YAML, [f"output_dir={tmp_path}", "log_every=1", "overwrite=true", "debug=true"])
    c = load_stage_config("sft", SFT_YAML, ["train.lr=5e-5"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert a.preset == "sft" and a.output_dir == f"runs/sft-{config_hash(a)[:8]}"
    # what make demo reads to find (or place) the cached result: no work, nothing written
    proc = py("launch/sft.py", "--config", SFT_YAML, "--print-output-dir", "train.lr=5e-5")
    assert proc.returncode == 0 and proc.stdout.strip() == c.output_dir and not (ROOT / c.output_dir).exists()


def test_output_decisions(tmp_path):
    cfg = load_stage_config("reward_model", RM_YAML, [f"output_dir={tmp_path / 'rm'}"])
    assert output.decide(cfg, "reward_model") == "new"
    (tmp_path / "rm").mkdir()
    assert output.decide(cfg, "reward_model") == "new"  # empty
    (tmp_path / "rm" / "notes.txt").write_text("mine")
    with pytest.raises(output.StageError, match="holds no complete warp_dist stage result .notes.txt"):
        output.decide(cfg, "reward_model")
    cfg.overwrite = True
    with pytest.raises(output.StageError, match="nothing was removed"):
        output.decide(cfg, "reward_model")  # overwrite never removes what a stage did not write
    cfg.overwrite = False
    (tmp_path / "rm" / "notes.txt").unlink()
    (tmp_path / "rm" / "summary.json").write_text(json.dumps(
        {"stage": "reward_model", "complete": True, "config_hash": config_hash(cfg)}))
    assert output.decide(cfg, "reward_model") == "skip"
    with pytest.raises(output.StageError, match="holds a reward_model result of the reward_model stage|holds a "
                                                "reward_model result"):
        output.decide(load_stage_config("sft", SFT_YAML, [f"output_dir={tmp_path / 'rm'}"]), "sft")
    cfg.train.lr = 1e-5
    with pytest.raises(output.StageError, match="another config"):
        output.decide(cfg, "reward_model")
    cfg.overwrite = True
    assert output.decide(cfg, "reward_model") == "overwrite"
    # a killed write leaves a temp folder next to output_dir: the next write removes it
    stale = tmp_path / ".rm.tmpdead"
    stale.mkdir()
    tmp = output.begin(cfg.output_dir)
    assert not stale.exists() and tmp.parent == tmp_path
    output.discard(tmp)


def test_lr_schedule():
    f = [lr_factor(s, 10, 2) for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == 1.0
    assert all(x > y for x, y in zip(f[2:], f[3:], strict=False)) and f[-1] > 0
    assert lr_factor(0, 5, 0) == 1.0


def test_sft_split_and_snippets():
    rows = [f"review {i}" for i in range(100)]
    train, ev = texts.sft_split(rows, 30, 50, 10)
    assert train == rows[30:80] and ev == rows[90:] and not set(train) & set(ev)
    with pytest.raises(ValueError, match="only 100 reviews"):
        texts.sft_split(rows, 50, 50, 10)
    text = "I loved this film. The acting was great! Was it too long? Maybe, but the ending works well."
    assert texts.sentences(text) == ["I loved this film.", "The acting was great!", "Was it too long?",
                                     "Maybe, but the ending works well."]
    rng = random.Random(0)
    for _ in range(200):
        s = texts.snippet(text, rng, 3, 6)
        assert s is not None and 3 <= len(s.split()) <= 6 and s in text
    assert texts.snippet("Too short.", rng, 3, 6) is None
    got = texts.heldout_sentences([(text, 1), ("Bad.", 0)], 0, 4, 40)
    assert len(got) == 1 and got[0][1] == 1 and got[0][0] in text


def test_reward_model_training_examples_cut_reviews_at_the_training_length():
    from warp_dist.stages.reward_model import training_examples

    rows = [("Great film. I loved every minute of it, the cast was superb.", 1), ("Dull. A waste of two hours.", 0)]
    same = load_stage_config("reward_model", RM_YAML, ["data.snippets_per_review=1"])
    short = load_stage_config("reward_model", RM_YAML, ["data.snippets_per_review=1", "data.train_review_max_tokens=100"])
    for cfg, whole in ((same, 256), (short, 100)):
        ex = training_examples(rows, cfg)
        assert [e[2] for e in ex if e[0] in dict(rows)] == [whole, whole]  # the test still reads 256 tokens
        assert all(e[2] == cfg.data.snippet_max_tokens for e in ex if e[0] not in dict(rows))
    with pytest.raises(ConfigError, match="data.train_review_max_tokens"):
        load_stage_config("reward_model", RM_YAML, ["data.train_review_max_tokens=3"])


def test_length_batches_group_similar_lengths():
    from warp_dist.stages.reward_model import length_batches

    lengths = [random.Random(i).randint(5, 300) for i in range(100)]
    batches = length_batches(lengths, 10, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(100))
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(spans) / len(spans) < 60  # random batches would span ~250


def test_sft_reviews_are_not_warp_prompt_reviews(tiny_model_path):
    """WARP's prompts (configs/warp/demo.yaml, data.seed 0; tiny.yaml's smaller pool lies inside demo's) all begin
    reviews among the first data.skip_reviews of the shuffle (as the stage's fast CSV reader orders them: so it
    orders them as warp_dist.data does), which SFT neither trains nor evaluates on."""
    from warp_dist.config import load_config
    from warp_dist.data import load_prompts
    from warp_dist.models import load_tokenizer

    sft = load_stage_config("sft", SFT_YAML)
    tok = load_tokenizer(tiny_model_path)
    reviews = texts.load_reviews("bundled", sft.data.seed)
    reserved = reviews[:sft.data.skip_reviews]
    for preset in ("demo.yaml",):
        warp = load_config(ROOT / "configs" / "warp" / preset)
        assert warp.data.seed == sft.data.seed and warp.data.source == sft.data.source
        train, ev = load_prompts(warp.data, tok)
        by_start: dict[str, list[str]] = {}
        for r in reserved:
            by_start.setdefault(r[:12], []).append(r)
        for p in train.texts + ev.texts:
            assert any(r.startswith(p) for r in by_start.get(p[:12], [])) or any(r.startswith(p) for r in reserved), p


# ------------------------------------------------------------------------------------------------- the real presets
@pytest.mark.slow
def test_default_sft_preset_moves_smollm2_towards_imdb(tmp_path):
    """configs/stages/sft.yaml as shipped (minutes on 2 CPU cores): the eval loss falls clearly."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "sft.py"), "--config", SFT_YAML,
                           f"output_dir={tmp_path / 'sft'}"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.2, (s["eval_loss_before"], s["eval_loss_after"])


@pytest.mark.slow
def test_default_reward_model_preset_is_accurate(tmp_path):
    """configs/stages/reward_model.yaml as shipped (~10 minutes on 2 CPU cores): 88.1 % measured on held-out whole reviews
    (issue 12's goal is 88 %); asserted: 86 %, the bottom of that figure's binomial 95 % interval."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "reward_model.py"), "--config", RM_YAML,
                           f"output_dir={tmp_path / 'rm'}"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert s["accuracy_whole_reviews"] >= 0.86, s["test"]
    assert s["accuracy_sentences"] > 0.7, s["test"]
