#!/usr/bin/env python3
"""Data parallelism over processes against threads, on this machine, on the same global batches.

    cargo build --release -p flava-train --features mpi
    python3 benches/mpi_scaling.py [--preset tiny] [--batch-size 32] [--steps 60] [--rounds 2]

Runs, alternately, `flava pretrain --data-shares 2` as one process with 2 rayon threads and
`mpiexec -iface lo -n 2 flava pretrain` with 1 thread per rank (the same data shares, so the same
batches), with the fixture tokenizer and codebook, joint phase, no evaluation. Prints, per task
kind, the median step time of each and their ratio, and for the MPI run the median time rank 0
spent in all-reduce and all-gather (waiting for the other rank included), so compute = step - both.
Standard library only (no numpy); the CPU model is printed first.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("FLAVA_BIN", ROOT / "target/release/flava"))


def cpu_model():
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:") or line.startswith("Model:"):
            print(line)


def run(kind, out, args):
    cfg = [
        "pretrain", "--out", str(out), "--preset", args.preset, "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--phases", "joint", "--no-eval", "--checkpoint-every", "1000",
        "--tokenizer", str(ROOT / "tests/fixtures/tokenizer/tokenizer.json"),
        "--codebook", str(ROOT / "tests/fixtures/codebook"), "--data-shares", "2",
    ]
    env = dict(os.environ)
    if kind == "threads":
        env["RAYON_NUM_THREADS"] = "2"
        cmd = [str(BIN)] + cfg
    else:
        env["RAYON_NUM_THREADS"] = "1"
        cmd = ["mpiexec", "-iface", "lo", "-n", "2", str(BIN)] + cfg
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # The first steps warm the allocator and caches.
    return rows[min(6, len(rows) // 4):]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cpu_model()
    per = {"threads": {}, "mpi": {}}
    comm = {}
    losses = {}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for kind in ["threads", "mpi"]:
                out = Path(d) / f"{kind}-{r}"
                rows = run(kind, out, args)
                losses[kind] = [x["loss"] for x in rows]
                for x in rows:
                    per[kind].setdefault(x["task"], []).append(x["step_time_s"])
                    if kind == "mpi":
                        c = comm.setdefault(x["task"], {"all_reduce": [], "all_gather": []})
                        c["all_reduce"].append(x["comm_all_reduce_s"])
                        c["all_gather"].append(x["comm_all_gather_s"])
    worst = max(abs(a - b) for a, b in zip(losses["threads"], losses["mpi"]))
    print(f"preset {args.preset}, global batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds; "
          f"max |loss difference| threads vs mpi: {worst:.2e}")
    print("| task | 1 process, 2 threads (ms) | mpiexec -n 2, 1 thread each (ms) | ratio mpi/threads | all-reduce (ms) | all-gather (ms) | compute (ms) |")
    print("|---|---|---|---|---|---|---|")
    for task in sorted(per["threads"]):
        t = statistics.median(per["threads"][task]) * 1e3
        m = statistics.median(per["mpi"][task]) * 1e3
        ar = statistics.median(comm[task]["all_reduce"]) * 1e3
        ag = statistics.median(comm[task]["all_gather"]) * 1e3
        print(f"| {task} | {t:.1f} | {m:.1f} | {m / t:.2f} | {ar:.1f} | {ag:.1f} | {m - ar - ag:.1f} |")


if __name__ == "__main__":
    main()
