"""Two sources of the native merge kernel (warp_dist/merging/merge_kernel.cpp) timed against each other in one process.

    git show HEAD~1:warp_dist/merging/merge_kernel.cpp > /tmp/old_kernel.cpp
    python benchmarks/merge_ab.py --baseline /tmp/old_kernel.cpp             # the repository's kernel against it
    python benchmarks/merge_ab.py --baseline A.cpp --candidate B.cpp --size tiny

What a change to the kernel needs and benchmarks/merge.py cannot give on a shared VM whose copy bandwidth drifts by a
third between runs: both builds on the same tensors at the same moments. Tensors of SmolLM2-135M's shapes (preset
cpu: its 30 layers' 9 tensors and the 49152 x 576 embedding, random values; tiny: 4 layers of a 64-wide model),
merged as the trainer merges from its second iteration on: `merging.merge_pass(kernel="native")` tensor after tensor
into two output buffers allocated once, with the SFT row (--no-sft: without it, as in the first iteration and in
benchmarks/merge.py). Each round: a plain copy of the inputs (`copy_` into destinations allocated once), then the
baseline, then the candidate, --rounds rounds after a warm-up one. Per kernel: the median time and its bandwidth
against the copy's (bytes as in merge.py: (M + 3) x model bytes merged, 2 x (M + 1) copied); candidate / baseline =
the median over rounds of the two times' ratio in the same round (below 1: the candidate is faster). Both builds'
outputs and Gram matrices are compared bit for bit ("same bits").
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "merge_ab"
PRESETS = {
    "tiny": dict(hidden=64, intermediate=160, kv=32, layers=4, vocab=512, policies="2", rounds=3),
    "cpu": dict(hidden=576, intermediate=1536, kv=192, layers=30, vocab=49152, policies="2,4", rounds=11),
    "gpu": dict(hidden=576, intermediate=1536, kv=192, layers=30, vocab=49152, policies="2,4", rounds=11),
}
SHAPE = {"hidden": "hidden size", "intermediate": "MLP width", "kv": "k/v projection rows", "layers": "decoder layers",
         "vocab": "embedding rows"}  # the decoder's size flags, with their help
COLUMNS = ["dtype", "M", "SFT row", "model MB", "copy GB/s", "baseline ms", "baseline / copy", "candidate ms",
           "candidate / copy", "candidate / baseline time", "same bits"]


def parse_args(argv):
    ap = common.parser(NAME, __doc__)
    ap.add_argument("--baseline", required=True, help="a merge_kernel.cpp to compare against")
    ap.add_argument("--candidate", default=str(ROOT / "warp_dist" / "merging" / "merge_kernel.cpp"),
                    help="the kernel source under test (default: the repository's)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list: float32, bfloat16")
    ap.add_argument("--policies", default=None, help="comma list of M values, e.g. 2,4")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (medians over them)")
    ap.add_argument("--no-sft", action="store_true", help="merge without the SFT row (the first iteration)")
    for k, what in SHAPE.items():
        ap.add_argument(f"--{k}", type=int, default=None, help=what)
    args = common.apply_preset(ap.parse_args(argv), PRESETS)
    for flag in ("baseline", "candidate"):
        if not Path(getattr(args, flag)).is_file():
            raise SystemExit(f"--{flag}: {getattr(args, flag)} is not a file (a merge_kernel.cpp source)")
    bad = [d for d in args.dtypes.split(",") if d.strip() not in ("float32", "bfloat16")]
    if bad:
        raise SystemExit(f"--dtypes: unknown {bad}; allowed float32, bfloat16")
    if args.rounds < 1:
        raise SystemExit(f"--rounds: {args.rounds}; needs at least 1")
    ms = common.int_list(args.policies)
    if not ms or any(not 1 <= m <= 8 for m in ms):
        raise SystemExit(f"--policies: {args.policies}; allowed 1..8 (the kernel's policies per call)")
    for k in SHAPE:
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k}: {getattr(args, k)}; needs at least 1")
    return args


def shapes(args) -> list[tuple[int, ...]]:
    """A Llama-style decoder's tensors: the embedding, per layer q, k, v, o, gate, up, down and two norms, a norm."""
    h, i, kv = args.hidden, args.intermediate, args.kv
    layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(args.vocab, h)] + layer * args.layers + [(h,)]


def kernel(flag: str, source: str):
    """The ctypes function of `source`, built (or found in the cache) by warp_dist.merging.native; one line if it does not
    build."""
    from warp_dist.merging import native

    native.SOURCE, native._FN = Path(source), None
    try:
        return native.load()
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"--{flag}: {source}: {e}") from None


def measure(fns: dict, dt, M: int, args, g) -> dict:
    """One row: copy, the baseline and the candidate in rounds on one set of tensors, then the bit comparison."""
    import torch

    from warp_dist import merging
    from warp_dist.merging import native

    xs = [torch.randn(s, generator=g).to(dt) for s in shapes(args)]
    pols = [[(x.float() + 1e-2 * torch.randn(x.shape, generator=g)).to(dt) for _ in range(M)] for x in xs]
    sfts = [None if args.no_sft else (x.float() - 1e-2 * torch.randn(x.shape, generator=g)).to(dt) for x in xs]
    largest = max(x.numel() for x in xs)
    bufs = {k: (torch.empty(largest, dtype=dt), torch.empty(largest, dtype=dt)) for k in fns}
    srcs = [t for x, ps in zip(xs, pols, strict=True) for t in (x, *ps)]
    dsts = [torch.empty_like(t) for t in srcs]

    def copy():
        for s, d in zip(srcs, dsts, strict=True):
            d.copy_(s)

    def merge(k, x, ps, f):
        native._FN = fns[k]
        out, nxt = bufs[k]
        return merging.merge_pass(x, ps, 0.5, 0.5, sft=f, kernel="native", out=out[:x.numel()], nxt=nxt[:x.numel()])

    def merge_all(k):
        return lambda: [merge(k, x, ps, f) for x, ps, f in zip(xs, pols, sfts, strict=True)]

    try:
        t = common.timeit_interleaved({"copy": copy, **{k: merge_all(k) for k in fns}}, repeat=args.rounds)
        same = True  # then every tensor's outputs and Gram matrix from both builds, bit for bit
        for x, ps, f in zip(xs, pols, sfts, strict=True):
            a, b = ([r.view(torch.int16) if r.dtype == torch.bfloat16 else r for r in merge(k, x, ps, f)] for k in fns)
            same = same and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    finally:
        native._FN = None
    model_bytes = sum(x.numel() for x in xs) * xs[0].element_size()
    per_byte = (M + 3) / (2 * (M + 1))
    row = {"dtype": str(dt).removeprefix("torch."), "M": M, "sft": not args.no_sft, "model_bytes": model_bytes,
           "copy_gbps": 2 * (M + 1) * model_bytes / t["copy"]["median_s"] / common.GB,
           "copy_times_s": t["copy"]["times_s"], "same_bits": same,
           "candidate_over_baseline_time": statistics.median(
               c / b for c, b in zip(t["candidate"]["times_s"], t["baseline"]["times_s"], strict=True))}
    for k in fns:
        row[f"{k}_s"] = t[k]["median_s"]
        row[f"{k}_times_s"] = t[k]["times_s"]
        row[f"{k}_over_copy_bandwidth"] = per_byte * common.paired_ratio(t[k]["times_s"], t["copy"]["times_s"])
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from warp_dist.merging import native

    keep = native.SOURCE  # kernel() builds each source (one line, naming its flag, where it cannot be built)
    try:
        fns = {k: kernel(k, getattr(args, k)) for k in ("baseline", "candidate")}
    finally:
        native.SOURCE, native._FN = keep, None
    g = torch.Generator().manual_seed(args.seed)
    rows = [measure(fns, getattr(torch, d.strip()), M, args, g)
            for d in args.dtypes.split(",") if d.strip() for M in common.int_list(args.policies)]
    res = {"config": {"baseline": args.baseline, "candidate": args.candidate, "rounds": args.rounds,
                      "shapes": {k: getattr(args, k) for k in SHAPE},
                      "torch_threads": torch.get_num_threads()},
           "rows": rows}
    table = [[r["dtype"], r["M"], "yes" if r["sft"] else "no", common.fmt(r["model_bytes"] / common.MB),
              common.fmt(r["copy_gbps"]), common.fmt(r["baseline_s"] * 1e3),
              common.fmt_ratio(r["baseline_over_copy_bandwidth"]), common.fmt(r["candidate_s"] * 1e3),
              common.fmt_ratio(r["candidate_over_copy_bandwidth"]), f"{r['candidate_over_baseline_time']:.3f}",
              "yes" if r["same_bits"] else "NO"] for r in rows]
    return common.finish(NAME, args, argv, res, COLUMNS, table)


if __name__ == "__main__":
    main(sys.argv[1:])
