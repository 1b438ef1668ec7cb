"""SLERP + LITI merge throughput and the streaming merger's memory, next to a plain copy of the same tensors.

    python benchmarks/merge.py --size cpu      # SmolLM2-135M state dict + a ~1 GB synthetic one, M = 2 and 4
    python benchmarks/merge.py --size tiny     # tiny GPT-2 + a 2 MB synthetic state dict

Two state dicts: a real model's (policies = its weights + small Gaussian noise, so task vectors are neither zero
nor colinear and SLERP takes its real path) and a synthetic one of N random fp32 [D, D] tensors. For M policies:

- The yardstick, a plain copy of the same tensors in the same run: `dst.copy_(src)` of init and the M policies
  into destinations allocated once (bytes moved = read + written = 2 x (M + 1) x model bytes), and `clone()`, which
  also pays for fresh pages (a page fault per 4 KiB).
- The merge as the trainer runs it: `merging.merge_pass` tensor after tensor into output buffers allocated once
  (sized to the largest tensor), with `kernel="eager"` (chunked torch ops), `kernel="compiled"` (torch.compile'd
  fused sweeps; the compile of the first call is timed apart) and `kernel="native"` (the same sweeps as a C++
  function, built once per machine). Bytes processed = read (init + M policies) + written
  (theta_slerp and the next theta_init) = (M + 3) x model bytes, every stored tensor once (tied tensors once).
  Copy, eager, compiled and native run in rounds (copy, eager, compiled, native, copy, ...), --repeat rounds after a warm-up one;
  GB/s from the median times; ratio = the median over rounds of (merge GB/s / copy GB/s) of the same round, so
  both sides of a ratio see the same moment of the machine (this box's copy bandwidth drifts 27-49 GB/s between
  runs). Also `merging.merge_state_dicts` (new output tensors each call) against clone (median of --repeat), and
  "call us": the compiled (and native) merge's fixed cost per call, the intercept of its times on 64 K and 1 M
  elements.
- `dist.stream_merge` with a one-process Dist (what rank 0 runs), in a fresh process per row that builds the same
  state dicts (in this one, earlier timings' freed heap pages made the same row read 38 or 348 MB): wall time, and
  peak growth of its anonymous RSS during the call (a thread samples /proc/self/statm, resident - shared, every 2 ms, after gc + malloc_trim; the
  file-backed pages of library code faulted in meanwhile are not the merger's memory and had added up to ~50 MB). The call returns both outputs
  (2 x model bytes), so its extra working memory = peak growth - outputs; the theoretical working set is
  (largest tensor) x (M + 2) (M policy tensors + 2 outputs of one name). Both are reported next to the model size.
  Measured twice, with merge.kernel eager (fp64 chunks; MKL may keep its matrix-product workspace) and native (no
  temporaries: what merge.kernel=auto takes where merging takes long).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "merge"
PRESETS = {
    "tiny": dict(model="embedded:tiny-gpt2", synthetic_tensors=8, synthetic_dim=256, policies="2,4", repeat=3),
    "cpu": dict(model="embedded:smollm2-135m", synthetic_tensors=64, synthetic_dim=2048, policies="2,4", repeat=5),
    "gpu": dict(model="embedded:smollm2-135m", synthetic_tensors=256, synthetic_dim=2048, policies="2,4", repeat=2),
}
COLUMNS = ["state dict", "model MB", "tensors", "largest MB", "M", "copy GB/s", "eager GB/s", "eager / copy",
           "compiled GB/s", "compiled / copy", "compile s (first call)", "call us", "native GB/s", "native / copy",
           "native call us", "merge_state_dicts / clone",
           "stream_merge s", "stream extra MB (measured)", "stream extra MB, native kernel", "(M+2) x largest MB",
           "extra / model"]
WARMUP_BYTES = 64 * 2**20  # the warm-up merges a slice of the tensors up to this size
NOISE = 1e-3


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--model", default=None, help="model whose state dict is merged (embedded:... or a folder)")
    ap.add_argument("--synthetic-tensors", type=int, default=None, help="N tensors in the synthetic state dict")
    ap.add_argument("--synthetic-dim", type=int, default=None, help="each synthetic tensor is [D, D] fp32")
    ap.add_argument("--policies", default=None, help="comma list of M values, e.g. 2,4")
    ap.add_argument("--repeat", type=int, default=None, help="timed repetitions (median is reported)")
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--eta", type=float, default=0.5)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of state-dict dtypes to merge")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state-file", default=None, help=argparse.SUPPRESS)  # the model's state dict, for the children
    return common.apply_preset(ap.parse_args(argv), PRESETS)


def float_names(state) -> list[str]:
    from warp_dist import merging

    return [k for k in merging.unique_names(state) if state[k].is_floating_point()]


def state_bytes(state) -> int:
    return sum(state[k].numel() * state[k].element_size() for k in float_names(state))


def with_noise(init, seed: int):
    """A policy: init + NOISE * N(0, 1) on every float tensor (tied tensors stay tied)."""
    import torch

    from warp_dist import merging

    g = torch.Generator().manual_seed(seed)
    out = merging.clone_state(init)
    for k in float_names(out):
        out[k].add_(torch.randn(out[k].shape, generator=g, dtype=out[k].dtype), alpha=NOISE)
    return out


def real_state(model: str, state_file: str | None = None):
    """The fp32 state dict of `model`; with `state_file` (what the parent saved for its children) read from there,
    so a child starts without importing transformers (~6 s of CPU per child on a 2-core box)."""
    if state_file:
        import torch

        # mmapped from the file: no heap pages to free afterwards; tied tensors come back sharing their storage
        return torch.load(state_file, weights_only=True, mmap=True)
    from warp_dist.models import load_causal_lm, resolve_model_path

    m = load_causal_lm(resolve_model_path(model), "float32", "cpu")
    from warp_dist import merging

    state = merging.clone_state(m.state_dict())
    del m
    return state


def synthetic_state(n: int, dim: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {f"layer.{i}.weight": 0.02 * torch.randn(dim, dim, generator=g) for i in range(n)}


def call_cost(kernel: str, dtype, M: int, repeat: int = 200) -> float:
    """Fixed seconds per merge call of `kernel` (compiled or native), apart from its memory traffic: calls on flat tensors of n1 = 64 K and
    n2 = 1 M elements (both in the L2/L3 caches' range the model's small tensors live in), the line through the two
    median times taken at n = 0."""
    import statistics

    import torch

    from warp_dist import merging

    g = torch.Generator().manual_seed(0)
    times = {}
    for n in (merging.COMPILED_MIN, 16 * merging.COMPILED_MIN):
        x = torch.randn(n, generator=g).to(dtype)
        ps = [(x.float() + 1e-3 * torch.randn(n, generator=g)).to(dtype) for _ in range(M)]
        out, nxt = torch.empty_like(x), torch.empty_like(x)
        merging.merge_pass(x, ps, 0.5, 0.5, kernel=kernel, out=out, nxt=nxt)  # compiles (or hits the cache)
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            merging.merge_pass(x, ps, 0.5, 0.5, kernel=kernel, out=out, nxt=nxt)
            ts.append(time.perf_counter() - t0)
        times[n] = statistics.median(ts)
    (n1, t1), (n2, t2) = sorted(times.items())
    return max(0.0, t1 - (t2 - t1) / (n2 - n1) * n1)


def warm_names(init, names: list[str]) -> list[str]:
    """A warm-up slice: the first tensors up to WARMUP_BYTES (at least one)."""
    warm, acc = [], 0
    for k in names:
        warm.append(k)
        acc += init[k].numel() * init[k].element_size()
        if acc >= WARMUP_BYTES:
            break
    return warm


def build(source: str, dtype: str, M: int, args):
    """init and M policies: `source` 'model' (args.model's state dict) or 'synthetic'; tied tensors stay tied."""
    import torch

    from warp_dist import merging

    state = (real_state(args.model, args.state_file) if source == "model"
             else synthetic_state(args.synthetic_tensors, args.synthetic_dim, args.seed))
    init = merging.clone_state(state, dtype=getattr(torch, dtype))
    del state
    return init, [with_noise(init, args.seed + 1 + m) for m in range(M)]


def measure_stream(init, pols: list, args, kernel: str) -> dict:
    """`dist.stream_merge` as rank 0 runs it (one process, merge.kernel `kernel`): wall time and peak anonymous-RSS
    growth over the call, after a warm-up on a slice; the streamed result is checked against the in-memory merge on
    that slice."""
    import torch

    from warp_dist import dist as distmod
    from warp_dist import merging

    M = len(pols)
    names = float_names(init)
    warm = warm_names(init, names)
    d = distmod.init(M, 60.0, cpu=not torch.cuda.is_available())
    if d.world_size != 1:
        raise RuntimeError("merge.py measures the one-process merger: run it with plain python, not a launcher")
    sources = {m: (lambda name, st=pols[m]: st[name]) for m in range(M)}

    def stream(keys):
        """What rank 0 runs: theta_slerp of every tensor comes back through on_slerp (kept here)."""
        got = {}
        distmod.stream_merge(d, keys, {k: tuple(init[k].shape) for k in keys}, lambda n: init[n].reshape(-1),
                             sources, lambda name, ini, ps: merging.merge_pass(ini, ps, args.lam, args.eta, kernel=kernel),
                             lambda n, full: got.__setitem__(n, full))
        return got

    stream(warm)  # warm-up
    with common.PeakRSS(anon=True) as mem:  # anonymous pages: the merger's memory, not library code
        t0 = time.perf_counter()
        out = stream(names)
        t_stream = time.perf_counter() - t0
    ref, _ = merging.merge_state_dicts({k: init[k] for k in warm}, [{k: p[k] for k in warm} for p in pols],
                                       args.lam, args.eta)
    worst = max((ref[k] - out[k]).abs().max().item() for k in warm)
    return {"stream_s": t_stream, "growth_bytes": mem.growth, "max_abs_diff": worst}


def stream_in_child(argv, source: str, dtype: str, M: int, kernel: str, state_file: str) -> dict:
    """`measure_stream` in a fresh process that builds the same state dicts: RSS growth there is the merger's own,
    not the reuse of heap pages this process's earlier timings freed (that had made the same row read 38 or 348 MB
    from one run to the next)."""
    return common.rerun_as_child(__file__, argv, f"{source},{dtype},{M},{kernel}",
                                 f"merge.py stream child {source} {dtype} M={M} {kernel}", ("--state-file", state_file))


def bench_state(label: str, source: str, dtype: str, init, policies_all, ms: list[int], args, argv) -> list[dict]:
    import torch

    from warp_dist import merging

    names = float_names(init)
    B = state_bytes(init)
    largest_numel = max(init[k].numel() for k in names)  # float tensors of one dtype
    largest = largest_numel * init[names[0]].element_size()
    warm = warm_names(init, names)
    from warp_dist.merging import native

    native_ok = not native.unavailable()
    rows = []
    for M in ms:
        pols = policies_all[:M]
        # the streaming merger's memory, in a fresh process (see stream_in_child), with the eager kernel and with
        # the native one (what merge.kernel=auto takes for large models)
        st = stream_in_child(argv, source, dtype, M, "eager", args.state_file)
        t_stream, worst, growth = st["stream_s"], st["max_abs_diff"], st["growth_bytes"]
        stn = stream_in_child(argv, source, dtype, M, "native", args.state_file) if native_ok else None

        def clone_all(keys=names, pols=pols):
            for st in (init, *pols):
                for k in keys:
                    st[k].clone()

        dests = {(i, k): torch.empty_like(st[k]) for i, st in enumerate((init, *pols)) for k in names}

        def copy_all(pols=pols, dests=dests):
            for i, st in enumerate((init, *pols)):
                for k in names:
                    dests[(i, k)].copy_(st[k])

        def merge(keys=None, pols=pols):
            if keys is None:
                return merging.merge_state_dicts(init, pols, args.lam, args.eta)
            return merging.merge_state_dicts({k: init[k] for k in keys}, [{k: p[k] for k in keys} for p in pols],
                                             args.lam, args.eta)

        bufs = (torch.empty(largest_numel, dtype=init[names[0]].dtype),
                torch.empty(largest_numel, dtype=init[names[0]].dtype))

        def merge_into(kernel, keys=names, pols=pols, bufs=bufs):
            """What the trainer's merge does: tensor after tensor into two reused output buffers."""
            for k in keys:
                n = init[k].numel()
                merging.merge_pass(init[k], [p[k] for p in pols], args.lam, args.eta, kernel=kernel,
                                   out=bufs[0][:n], nxt=bufs[1][:n])

        t_clone = common.timeit(clone_all, repeat=args.repeat, warmup=1)
        merge(warm)
        t_merge = common.timeit(merge, repeat=args.repeat, warmup=0)
        compile_s = None
        timed = {"copy": copy_all, "eager": lambda: merge_into("eager")}
        if not merging.compiler_available():
            t0 = time.perf_counter()
            merge_into("compiled", keys=[max(names, key=lambda k: init[k].numel())])
            compile_s = time.perf_counter() - t0
            timed["compiled"] = lambda: merge_into("compiled")
            call_s = call_cost("compiled", init[names[0]].dtype, M)
        else:
            call_s = None
        native_call_s = None
        if native_ok:
            timed["native"] = lambda: merge_into("native")
            native_call_s = call_cost("native", init[names[0]].dtype, M)
        # copy and the merges in rounds (copy, eager, compiled, copy, ...): each ratio is the median over rounds of
        # the pair timed back to back, not of timings taken minutes apart
        t = common.timeit_interleaved(timed, repeat=args.repeat, warmup=1)
        t_copy, t_eager, t_compiled, t_native = t["copy"], t["eager"], t.get("compiled"), t.get("native")
        per_byte = (M + 3) / (2 * (M + 1))  # merge bytes / copy bytes
        dests.clear()
        common.release_memory()

        read_written = (M + 3) * B
        copy_gbps = 2 * (M + 1) * B / t_copy["median_s"] / common.GB
        clone_gbps = 2 * (M + 1) * B / t_clone["median_s"] / common.GB
        merge_gbps = read_written / t_merge["median_s"] / common.GB
        eager_gbps = read_written / t_eager["median_s"] / common.GB
        compiled_gbps = read_written / t_compiled["median_s"] / common.GB if t_compiled else None
        native_gbps = read_written / t_native["median_s"] / common.GB if t_native else None
        outputs = B  # theta_slerp kept by the benchmark's on_slerp (the trainer updates its tensors in place)
        extra = growth - outputs
        theory = largest * (M + 2)
        rows.append({
            "state_dict": label, "M": M, "model_bytes": B, "num_tensors": len(names), "largest_tensor_bytes": largest,
            "merge_bytes": read_written,
            "copy_s": t_copy["median_s"], "copy_bytes": 2 * (M + 1) * B, "copy_gbps": copy_gbps,
            "eager_s": t_eager["median_s"], "eager_times_s": t_eager["times_s"], "eager_gbps": eager_gbps,
            "eager_over_copy_bandwidth": per_byte * common.paired_ratio(t_eager["times_s"], t_copy["times_s"]),
            "copy_times_s": t_copy["times_s"],
            "compiled_s": t_compiled["median_s"] if t_compiled else None,
            "compiled_times_s": t_compiled["times_s"] if t_compiled else None,
            "compiled_gbps": compiled_gbps,
            "compiled_over_copy_bandwidth": (per_byte * common.paired_ratio(t_compiled["times_s"], t_copy["times_s"])
                                             if t_compiled else None),
            "compile_first_call_s": compile_s, "compiled_call_overhead_s": call_s,
            "native_s": t_native["median_s"] if t_native else None,
            "native_times_s": t_native["times_s"] if t_native else None,
            "native_gbps": native_gbps,
            "native_over_copy_bandwidth": (per_byte * common.paired_ratio(t_native["times_s"], t_copy["times_s"])
                                           if t_native else None),
            "native_call_overhead_s": native_call_s,
            "merge_s": t_merge["median_s"], "merge_times_s": t_merge["times_s"], "merge_gbps": merge_gbps,
            "clone_s": t_clone["median_s"], "clone_bytes": 2 * (M + 1) * B, "clone_gbps": clone_gbps,
            "merge_over_clone_bandwidth": merge_gbps / clone_gbps,
            "stream_merge_s": t_stream,
            "stream_rss_peak_growth_bytes": growth, "stream_outputs_bytes": outputs,
            "stream_extra_bytes_measured": extra, "stream_extra_bytes_theoretical": theory,
            "stream_extra_over_model": extra / B, "theoretical_over_model": theory / B,
            "stream_vs_in_memory_max_abs_diff": worst,
            "stream_native_merge_s": stn["stream_s"] if stn else None,
            "stream_native_extra_bytes_measured": stn["growth_bytes"] - outputs if stn else None,
            "stream_native_vs_in_memory_max_abs_diff": stn["max_abs_diff"] if stn else None,
        })
    return rows


def table(res: dict) -> list[list[str]]:
    rows = []
    for r in res["rows"]:
        def opt(v, f=common.fmt):
            return f(v) if v is not None else "n/a (no C++ compiler)"

        rows.append([r["state_dict"], common.fmt(r["model_bytes"] / common.MB), str(r["num_tensors"]),
                     common.fmt(r["largest_tensor_bytes"] / common.MB), str(r["M"]), common.fmt(r["copy_gbps"]),
                     common.fmt(r["eager_gbps"]), common.fmt_ratio(r["eager_over_copy_bandwidth"]),
                     opt(r["compiled_gbps"]), opt(r["compiled_over_copy_bandwidth"], common.fmt_ratio),
                     opt(r["compile_first_call_s"]),
                     opt(r["compiled_call_overhead_s"] * 1e6 if r["compiled_call_overhead_s"] is not None else None),
                     opt(r["native_gbps"]), opt(r["native_over_copy_bandwidth"], common.fmt_ratio),
                     opt(r["native_call_overhead_s"] * 1e6 if r["native_call_overhead_s"] is not None else None),
                     common.fmt_ratio(r["merge_over_clone_bandwidth"]),
                     common.fmt(r["stream_merge_s"]), common.fmt(r["stream_extra_bytes_measured"] / common.MB),
                     opt(r["stream_native_extra_bytes_measured"] / common.MB
                         if r["stream_native_extra_bytes_measured"] is not None else None),
                     common.fmt(r["stream_extra_bytes_theoretical"] / common.MB),
                     common.fmt_ratio(r["stream_extra_over_model"])])
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    ms = common.int_list(args.policies)
    if not ms or min(ms) < 1:
        raise SystemExit("--policies: a comma list of M >= 1")
    from warp_dist import dist as distmod

    if args.child:  # one streaming-merger measurement, in the fresh process the parent started
        spec, out = args.child.split("=", 1)
        source, dt, M, kernel = spec.split(",")
        # the state dicts in mmapped blocks: building them leaves no freed holes in the heap for the merge's
        # allocations to land in (glibc serves a request from a free heap chunk before it considers mmap, and pages
        # malloc_trim released come back as growth: the same row read 23 or 112 MB)
        distmod.tune_allocator(mmap_threshold=1 << 20)
        init, pols = build(source, dt, int(M), args)
        res = measure_stream(init, pols, args, kernel)
        common.write_json_atomic(out, res)
        return res

    distmod.tune_allocator()  # the trainer's allocator settings from the first timing on (dist.init sets them too)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        raise SystemExit(f"--dtypes: unknown {bad}; allowed float32, bfloat16, float16")
    rows = []
    n, dim = args.synthetic_tensors, args.synthetic_dim
    with tempfile.TemporaryDirectory(prefix="warp_bench_merge_") as tmp:
        # the model's fp32 state dict, read once and saved for this process's later rows and the children
        args.state_file = str(Path(tmp) / "model_state.pt")
        torch.save(real_state(args.model), args.state_file)
        for dt in dtypes:
            for label, source in ((args.model, "model"), (f"synthetic {n} x [{dim}, {dim}]", "synthetic")):
                init, pols = build(source, dt, max(ms), args)
                rows += [{**r, "dtype": dt} for r in bench_state(f"{label} {dt}", source, dt, init, pols, ms, args, argv)]
                del init, pols
                common.release_memory()
    res = {
        "config": {"model": args.model, "synthetic_tensors": n, "synthetic_dim": dim, "policies": ms,
                   "repeat": args.repeat, "lam": args.lam, "eta": args.eta, "torch_threads": torch.get_num_threads()},
        "rows": rows,
        "counting": "merge bytes = read (init + M policies) + written (2 outputs) = (M+3) x model bytes; copy and "
                    "clone bytes = read + written = 2 x (M+1) x model bytes; model bytes = unique float tensors; "
                    "GB = 1e9",
        "notes": "copy = dst.copy_(src) into destinations allocated once; eager / compiled = merging.merge_pass "
                 "tensor after tensor into two reused output buffers (what the trainer does), kernel eager (chunked "
                 "torch ops) or compiled (torch.compile'd fused sweeps; compile s = the first call on the largest "
                 "tensor, inductor's on-disk cache may hold it from an earlier run); merge_state_dicts / clone = the "
                 "in-memory merge with new output tensors against clone (both pay fresh pages). stream extra = peak "
                 "anonymous-RSS growth during dist.stream_merge (in a fresh process per row) minus its full outputs, "
                 "with merge.kernel eager (measured) and native; "
                 "theoretical = largest tensor x (M+2); call us = the compiled merge's fixed cost per call (intercept "
                 "of its times on 64 K and 1 M elements; native call us the same for the C++ kernel). "
                 "copy, eager, compiled and native are timed in rounds (one of each per round); eager / copy, "
                 "compiled / copy and native / copy = median over rounds of the two bandwidths' ratio in the same "
                 "round.",
    }
    return common.finish(NAME, args, argv, res, COLUMNS, table(res))


if __name__ == "__main__":
    main(sys.argv[1:])
