"""What a run leaves in its folder: HF model folders (final/, iter_<i>/), summary.json and evals.json.

Model folders are written by rank 0 tensor by tensor from the fp32 blobs in state/blobs, in `save_dtype`.
"""

from __future__ import annotations

from pathlib import Path

from .. import checkpoint
from ..evaluation import evalcache
from ..evaluation.metrics import EvalResult, sample_rows
from ..evaluation.stats import paired_differences
from ..models import DTYPES
from ..weights import SafeFile, Source
from .session import Session
from .state import RunState


def save_model(s: Session, folder: Path, source: Source) -> None:
    """HF folder (config, generation config, tokenizer, safetensors) of `source`'s weights, written tensor by tensor
    in save_dtype (rank 0 / the caller only)."""
    w = s.weights
    dtype = DTYPES[s.cfg.save_dtype_name]
    checkpoint.save_hf_folder(folder, w.module.config, s.tokenizer, w.names, w.shapes, source, dtype, w.buffers,
                              getattr(w.module, "generation_config", None))


def save_iteration(s: Session, folder: Path, iteration: int, paths: dict[int, Path]) -> None:
    """iter_<i>/: init/, policy_<m>/ and merged/ HF folders from the iteration's fp32 blobs (rank 0; a collective)."""
    if s.is_main:
        blobs = s.state_dir / "blobs"
        init = blobs / f"iter{iteration}_init.safetensors"
        items = [("init", init if init.exists() else None), ("merged", blobs / f"iter{iteration}_slerp.safetensors")]
        items += [(f"policy_{m}", p) for m, p in sorted(paths.items())]
        for name, path in items:
            if path is None:  # iteration 1 starts from the SFT weights
                save_model(s, folder / name, s.sft.full)
                continue
            f = SafeFile(path)
            save_model(s, folder / name, lambda n, f=f: f.get(n))
            f.close()
    s.dist.barrier()


def summary(s: Session, st: RunState, sft_eval: EvalResult, final_eval: EvalResult, timers: dict) -> dict:
    """summary.json: the SFT and final metrics, their paired differences, per-prompt values, samples, timers."""
    return {"sft": sft_eval.metrics, "final": {**final_eval.metrics, "weight_distance_to_sft": st.slerp_distance_to_sft},
            "timers_s": timers, "world_size": s.dist.world_size,
            "samples": sample_rows(s.eval_prompts.texts, sft_eval, final_eval, s.cfg.eval.num_samples_shown),
            "final_vs_sft": paired_differences(final_eval.per_prompt(), sft_eval.per_prompt()),
            "per_prompt": {"sft": sft_eval.per_prompt(), "final": final_eval.per_prompt()}}


def write_evals(s: Session, out: Path, st: RunState, sft_eval: EvalResult, final_eval: EvalResult) -> None:
    """<run>/evals.json (evaluation.evalcache): this run's evaluations, keyed by the weights they measured, for
    launch/eval.py to reuse. Saved folders count only when written in float32 (what was evaluated, exactly)."""
    cfg = s.cfg
    entries = {"sft": (evalcache.folder_digest(s.model_path), sft_eval)}
    if cfg.save_dtype_name == "float32":
        entries["final"] = (evalcache.folder_digest(out / "final"), final_eval)
        for it, packed in st.slerp_evals.items():
            entries[f"iter {it} merged"] = (evalcache.folder_digest(out / f"iter_{it}" / "merged"),
                                            EvalResult.from_json(packed))
    evalcache.write(out, evalcache.settings(cfg, bool(cfg.train.deepspeed)), entries, entries["sft"][0])
