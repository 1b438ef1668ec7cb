"""Time from SIGTERM to exit of a WARP run (the preemption stop), and the cost of checking the checkpoint it wrote.

    python benchmarks/stop_time.py --out /tmp/stop_demo                       # the demo's WARP stage, 1 process
    python benchmarks/stop_time.py --out /tmp/stop_tiny --config configs/warp/tiny.yaml --overrides ""

Starts `launch/warp.py`, sends SIGTERM after the N-th training record, and prints the exit code, the seconds from
the signal to the exit, the checkpoint it left (bytes) and how long `warp_dist.checkpoint.verify_checkpoint` takes
to hash it.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="run folder (overwritten)")
    ap.add_argument("--config", default="configs/warp/demo.yaml")
    ap.add_argument("--overrides", default="model.dtype=bfloat16 train.steps=13",
                    help="space-separated dotted.key=value (default: what make demo uses on a bf16 CPU)")
    ap.add_argument("--after", type=int, default=3, help="send SIGTERM after this many training records")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cmd = [sys.executable, str(ROOT / "launch" / "warp.py"), "--config", str(ROOT / args.config), f"output_dir={out}",
           *args.overrides.split(), "progress=false", "log_with=none", "overwrite=true"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and sum('"train"' in x for x in metrics.read_text().splitlines()) >= args.after:
            break
        time.sleep(0.1)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate()
    took = time.time() - t0
    print(f"exit {proc.returncode}; {took:.1f} s from SIGTERM to exit")
    print("\n".join(x for x in text.splitlines() if "[stop]" in x))
    from warp_dist.checkpoint import checkpoints, verify_checkpoint

    ckpt = checkpoints(out / "state")[-1]
    man = json.loads((ckpt / "manifest.json").read_text())
    size = sum(v[0] for v in man["files"].values()) + sum(v[0] for v in man["blobs"].values())
    t0 = time.time()
    why = verify_checkpoint(ckpt)
    took = time.time() - t0
    print(f"{ckpt.name} ({json.loads((ckpt / 'position.json').read_text())['phase']}): {size / 1e9:.2f} GB, "
          f"verified in {took:.2f} s ({size / max(took, 1e-9) / 1e6:.0f} MB/s): {why or 'whole'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
