"""The WARP loop (arXiv 2406.16768, Algorithm 1), read top to bottom in `Warp.run`.

Variant implemented: for i in 1..I, M policies start from theta_init and each runs T steps of REINFORCE on
k completions per prompt (default 1) with the KL-shaped reward r - beta * sum_t(log pi - log pi_ema); the baseline
is leave-one-out (RLOO per prompt when k > 1) or the mean, computed over the whole policy-group batch. The EMA anchor
starts at theta_init and moves with rate mu after every optimizer step. The M task vectors are merged with SLERP
(one angle per tensor; iteratively with 1/m for M > 2; or `merge.method`), then theta_init <- LITI(eta). Output: the
last merge. Every log-prob (policy, anchor, SFT) is taken under the distribution the tokens were sampled from
(temperature, min_new_tokens, top-k/top-p; see `warp_dist.sampling`). Departures from the paper: AdamW instead of
Adafactor.

Phases: evaluate SFT -> (train policies -> merge -> evaluate) x I -> final/ and summary.json. The parts: `Session`
(what a rank holds), `rl_step` (the RL phase), `merger` (the merge), `Evaluator`, `Checkpointer` (every phase boundary
is a checkpoint; a resumed run skips what is done), `output` (the run folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import checkpoint
from .. import dist as distmod
from ..config import WarpConfig
from ..evaluation.evaluator import Evaluator, reused_sft_eval
from ..evaluation.metrics import EvalResult, fmt_metrics
from ..preempt import Preempted, Stopper
from ..tracking import samples_markdown
from ..weights import SafeFile
from . import output
from .merger import NoProgressError, check_progress, fmt_diag, merge, trends
from .rl_step import save_policy, train_policy
from .session import Session
from .state import Checkpointer


class Warp:
    """One rank's WARP run: `Warp(cfg).run()` -> the summary (summary.json's content)."""

    def __init__(self, cfg: WarpConfig, dist: distmod.Dist | None = None, log=print, metrics_path=None):
        self.stopper = Stopper(cfg.stop_signals)  # first: a signal during the set-up stops at the first boundary
        self.session = Session(cfg, dist, log=log, metrics_path=metrics_path)
        self.evaluator = Evaluator(self.session)
        self.ckpt = Checkpointer(self.session)

    def run(self) -> dict:
        try:
            return self._run()
        except Preempted:
            self.session.close()
            raise
        finally:
            self.stopper.restore()

    def _run(self) -> dict:
        s, cfg, tc = self.session, self.session.cfg, self.session.cfg.train
        out = Path(cfg.output_dir)
        st = self.ckpt.start()
        if self.ckpt.done:
            s.log(f"the run in {out} is already finished: nothing to resume")
            s.close()
            return json.loads((out / "summary.json").read_text())
        self.log_start(st)
        if st.sft_eval is None:
            self.evaluate_sft()
        sft_eval = EvalResult.from_json(st.sft_eval)
        for it in range(st.iteration, tc.iterations + 1):
            st.iteration = it
            if st.merged < it:
                self.train_policies(it)
                self.merge(it)
            elif st.evaluated < it:  # resumed after the merge: the policy module must hold theta_slerp
                slerp = SafeFile(s.state_dir / "blobs" / f"iter{it}_slerp.safetensors")
                s.weights.load_(slerp.part, "theta_slerp (resumed)")
                slerp.close()
            if st.evaluated < it:
                self.evaluate_merge(it, sft_eval)
        return self.finish(sft_eval)

    # ---------------------------------------------------------------- checkpoints and stops
    def save(self, phase: str) -> None:
        """A phase-boundary checkpoint, then the run stops here if any rank was asked to (a signal)."""
        self.ckpt.save(phase)
        if self.session.dist.any(bool(self.stopper.requested)):
            raise Preempted(self.stopper.requested, f"after the checkpoint '{phase}'")

    def after_step(self, step: int) -> None:
        """After an optimizer step: the periodic checkpoint, and a stop (with this policy's state checkpointed) when
        any rank was asked to. Every rank calls it after the same step, so all agree on where they stop."""
        saved = self.ckpt.periodic(step)
        if step < self.session.cfg.train.steps and self.session.dist.any(bool(self.stopper.requested)):
            if not saved:
                self.ckpt.state.step = step
                self.ckpt.save("stopped", rank_state=True)
            raise Preempted(self.stopper.requested, f"after step {step}")

    # ---------------------------------------------------------------- the phases
    def evaluate_sft(self) -> None:
        s, st = self.session, self.ckpt.state
        reused = reused_sft_eval(s)
        ev = reused[1] if reused else self.evaluator.evaluate(s.sft.full, None)
        s.records.add({"kind": "eval", "model": "sft", "iteration": 0, **ev.metrics,
                       **({"reused_from": reused[0]} if reused else {})})
        s.log(fmt_metrics("SFT", ev.metrics))
        st.sft_eval = ev.to_json()
        self.save("sft evaluated")

    def train_policies(self, it: int) -> None:
        """This rank's policy slots of iteration `it`, one at a time (every rank has as many slots)."""
        s, st, d, tc = self.session, self.ckpt.state, self.session.dist, self.session.cfg.train
        t0 = time.perf_counter()
        for k, m in enumerate(d.topo.policies_of(d.rank)):
            # a policy is skipped when its file is in the checkpoint (trained before a resume, maybe on another
            # number of ranks); the slots stay in step: every rank checkpoints after slot k if any rank trained one
            todo = str(m) not in st.policy_files
            if not d.any(todo):
                continue
            # uneven only after a resume on another world size (some ranks' slot k done, others' not): the idle
            # ranks make no per-step calls, so the slot runs without mid-policy checkpoints or stops
            even = not d.any(not todo)
            mine = {}
            if todo:
                restore = self.ckpt.restore_rank_state if st.step else None
                bar = progress_bar(tc.steps, f"iter {it}/{tc.iterations} policy {m + 1}/{tc.policies}",
                                   s.cfg.progress and s.is_main)
                train_policy(s, it, m, progress=bar, restore=restore,
                             on_step=(lambda step, rec: self.after_step(step)) if even else None)
                if bar is not None:
                    bar.close()
                path = save_policy(s, it, m)
                mine = {m: path.name} if d.is_leader else {}
            st.slots_done, st.step = k + 1, 0
            for part in d.all_gather_object(mine):
                st.policy_files.update({str(q): n for q, n in part.items()})
            st.train_time_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            self.save("policy trained")

    def merge(self, it: int) -> None:
        s, st, d, cfg = self.session, self.ckpt.state, self.session.dist, self.session.cfg
        t0 = time.perf_counter()
        d.barrier()  # every policy is trained before the merger starts
        t_wait = time.perf_counter() - t0
        paths = {int(m): s.state_dir / "blobs" / n for m, n in st.policy_files.items()}
        t0 = time.perf_counter()
        diag = merge(s, it, paths)
        t_merge = time.perf_counter() - t0
        s.tick("merge", t_merge)
        diag.update(trends(self.ckpt.histories(it)))
        check_progress(diag)
        s.records.add({"kind": "merge", "iteration": it, "time_train_s": st.train_time_s, "time_wait_s": t_wait,
                       "time_merge_s": t_merge, **diag})
        s.log(fmt_diag(it, diag))
        if cfg.save_iterations:
            output.save_iteration(s, Path(cfg.output_dir) / f"iter_{it}", it, paths)
        st.merged, st.slots_done, st.step, st.policy_files, st.train_time_s = it, 0, 0, {}, 0.0
        st.slerp_distance_to_sft = diag["slerp_distance_to_sft"]
        self.save("merged")

    def evaluate_merge(self, it: int, sft_eval: EvalResult) -> None:
        """Evaluation of theta_slerp (after every iteration with eval.every_iteration, else after the last)."""
        s, st, cfg = self.session, self.ckpt.state, self.session.cfg
        last = it == cfg.train.iterations
        if last or cfg.eval.every_iteration:
            ev = self.evaluator.evaluate(None, sft_eval)  # the policy module holds theta_slerp
            s.records.add({"kind": "eval", "model": "final" if last else "slerp", "iteration": it, **ev.metrics})
            s.log(fmt_metrics("WARP final" if last else f"iter {it} slerp", ev.metrics))
            if last:
                st.final_eval = ev.to_json()
            else:  # kept for evals.json (launch/eval.py reuses it for iter_<i>/merged)
                st.slerp_evals[str(it)] = ev.to_json()
        st.evaluated = it
        st.iteration = it + 1
        self.save("evaluated")

    def finish(self, sft_eval: EvalResult) -> dict:
        """final/ (the last theta_slerp), summary.json, and the run state removed: the run is complete."""
        s, st, tc = self.session, self.ckpt.state, self.session.cfg.train
        out = Path(s.cfg.output_dir)
        final_eval = EvalResult.from_json(st.final_eval)
        if st.slerp_distance_to_sft == 0.0:
            raise NoProgressError("the final weights are identical to the SFT weights: nothing was learned")
        if final_eval.metrics["identical_fraction"] == 1.0:
            s.log("ERROR: every final generation is identical to the SFT model's: the policy did not move "
                  "enough to change a single sample (raise train.lr or train.steps)")
        summary = output.summary(s, st, sft_eval, final_eval, {**s.timers, "total": self.ckpt.elapsed()})
        if s.records.tracker is not None:
            s.records.tracker.text("samples", samples_markdown(summary["samples"]), tc.iterations * tc.steps)
        if s.is_main:
            slerp = SafeFile(s.state_dir / "blobs" / f"iter{tc.iterations}_slerp.safetensors")
            output.save_model(s, out / "final", lambda n: slerp.get(n))
            slerp.close()
            output.write_evals(s, out, st, sft_eval, final_eval)
            checkpoint.write_json(out / "summary.json", summary)
        s.dist.barrier()
        s.close()
        if s.is_main:  # the run is complete: its resumable state is no longer needed (final/ is the result)
            checkpoint.remove_tree(s.state_dir)
        return summary

    def log_start(self, st) -> None:
        s, cfg, tc, d = self.session, self.session.cfg, self.session.cfg.train, self.session.dist
        s.log(f"WARP: model={cfg.model.name} reward={cfg.reward.kind} backend={s.backend.name} "
              f"I={tc.iterations} M={tc.policies} T={tc.steps} batch={tc.batch_size}x{s.k} beta={tc.beta} "
              f"mu={tc.mu} merge={cfg.merge.method} lambda={cfg.merge.lam} eta={cfg.merge.eta} dtype={cfg.model.dtype} "
              f"attention={s.attention} ranks={d.world_size} groups={list(d.topo.groups)} engine={s.policy.kind}"
              + (f" push={s.backend.push_method()}" if s.backend.push_method() else "") + f" -> {cfg.output_dir}"
              + (f" (resumed at checkpoint {st.seq}: {st.phase})" if st.seq else ""))


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
