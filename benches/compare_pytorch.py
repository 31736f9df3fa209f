#!/usr/bin/env python3
"""flava-rs against transformers' FLAVA in PyTorch, side by side on this machine.

Each configuration runs alternately in both implementations, each in a fresh process
(`target/release/flava-bench` for ours, this script with `--worker` for PyTorch), for several
rounds; the table shows the medians over all timed iterations, the ratio ours / PyTorch (time;
below 1 means flava-rs is faster) and each process's peak resident memory.

    .venv/bin/python benches/compare_pytorch.py            # the whole table (~10 min on 2 cores)
    .venv/bin/python benches/compare_pytorch.py --quick    # one round, fewer iterations
    .venv/bin/python benches/compare_pytorch.py --device cuda   # flava-rs --features cuda vs PyTorch CUDA

On `--device cuda` the same configurations run on the GPU, plus the `full` training step (batch
8), and the table adds each side's GPU memory (PyTorch: `max_memory_reserved`; flava-rs: what its
allocator's pools hold at the end).

Configurations (random weights, same shapes and masks on both sides, see benches/src/inputs.rs):
`tiny` (the default `flava pretrain` model: 64 px, patch 8, hidden 128, 2/2/1 layers): the
pretraining step on paired, image-only and text-only batches of 64; `small` (64 px, patch 8, hidden 256, 4/4/2 layers): image and text embedding and the pretraining
step (forward, backward, AdamW) on paired, image-only and text-only batches of 32; `full`
(flava-full sizes): image and text embedding and the paired pretraining forward, batch 8. The
fine-tuning step (`small`, batch 32) is transformers' `FlavaModel` with torchmultimodal's head
(`Linear(d, 768) -> ReLU -> Dropout(0.5) -> Linear(768, 3)`) on the multimodal CLS, cross-entropy,
forward, backward and AdamW, against `flava_objectives::FlavaForClassification` on the Trainer.
Both sides clip the gradients to global norm 1 before AdamW (`clip_grad_norm_`; flava-rs's
Trainer does it as `flava pretrain` does); the optimizer phase includes it.
Before the table, both sides time one square f32 matmul (n = 2048: `torch.mm`, and a flex matmul
in `flava-bench sgemm`); the larger is the machine's measured sgemm peak. Each row's matmul FLOPs
are counted on each side: once by `torch.utils.flop_counter.FlopCounterMode` on the PyTorch model
(forward, and backward for training steps), and by flava-rs itself (`flava-bench --products`: every
matrix product of its kernels during the timed iterations, timed). The two counts differ where the
two do different work: transformers' `FlavaForPreTraining` runs the unmasked image or text tower
on image-only and text-only batches too, for a contrastive loss those batches do not have, and
flava-rs does not. The table gives each side's achieved GFLOP/s on its own count and its share of
that peak; a second table says where flava-rs's time goes: in its products (and how fast they
run in place) or outside them. The CPU model and its SIMD flags head the table.
PyTorch runs eager with `torch.get_num_threads()` threads (all cores) and
`skip_unmasked_multimodal_encoder=True` (pretraining needs no unmasked fusion; flava-rs skips it).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FLAVA_BENCH_BIN: a flava-bench built elsewhere (scripts/gpu_check.sh carries one to a GPU machine).
OURS = os.environ.get("FLAVA_BENCH_BIN") or os.path.join(ROOT, "target", "release", "flava-bench")
SEQ = 32

CONFIGS = [
    # what, preset, batch, task, iterations per round
    ("image", "small", 32, "pairs", 10),
    ("text", "small", 32, "pairs", 10),
    ("step", "tiny", 64, "pairs", 6),
    ("step", "tiny", 64, "images", 6),
    ("step", "tiny", 64, "text", 6),
    ("step", "small", 32, "pairs", 4),
    ("step", "small", 32, "images", 4),
    ("step", "small", 32, "text", 4),
    ("finetune", "small", 32, "pairs", 4),
    ("image", "full", 8, "pairs", 3),
    ("text", "full", 8, "pairs", 5),
    ("forward", "full", 8, "pairs", 2),
]
# The sgemm peak probe: one [n, n]·[n, n] f32 matmul on each side.
SGEMM_N = 2048
# Only on a GPU: a full-size training step.
GPU_CONFIGS = [("step", "full", 8, "pairs", 3)]


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def inputs(cfg, b, task):
    """The batch of benches/src/inputs.rs."""
    import torch

    s, patch = cfg.image_config.image_size, cfg.image_config.patch_size
    p = (s // patch) ** 2
    out = {}
    g = torch.Generator().manual_seed(0)
    if task != "text":
        out["pixel_values"] = torch.randn(b, 3, s, s, generator=g)
        i = torch.arange(b * p)
        out["bool_masked_pos"] = (i % 5 < 2).reshape(b, p)
        out["mim_labels"] = (i * 7 % cfg.image_config.vocab_size).reshape(b, p)
    if task != "images":
        i = torch.arange(b * SEQ)
        ids = (5 + i * 13 % 900).reshape(b, SEQ)
        out["input_ids"] = ids
        out["input_ids_masked"] = ids.clone()
        out["attention_mask"] = torch.ones(b, SEQ, dtype=torch.long)
        labels = torch.full((b * SEQ,), -100, dtype=torch.long)
        pos = i[i % 7 == 0]
        labels[pos] = 5 + pos * 13 % 900
        out["mlm_labels"] = labels.reshape(b, SEQ)
    if task == "pairs":
        out["itm_labels"] = torch.tensor([int(k % 5 != 0) for k in range(b)])
    return out


def worker(args):
    import torch
    from transformers import FlavaConfig, FlavaForPreTraining

    torch.manual_seed(0)
    if args.what == "sgemm":
        n = args.batch
        a, c = torch.rand(n, n) * 2 - 1, torch.rand(n, n) * 2 - 1
        times = []
        torch.mm(a, c)
        for _ in range(args.iters):
            t = time.perf_counter()
            torch.mm(a, c)
            times.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"times_ms": times, "peak_rss_mb": peak_rss_mb(), "flops": 2 * n ** 3}))
        return
    with open(args.config) as f:
        cfg = FlavaConfig(**json.load(f))
    dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    # The fine-tuning step builds its own FlavaModel + head (no pretraining heads in memory).
    model = FlavaForPreTraining(cfg).to(dev) if args.what != "finetune" else None
    x = {k: v.to(dev) for k, v in inputs(cfg, args.batch, args.task).items()}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    phases = []  # [forward, backward, optimizer] ms of each step

    flops = [None]

    def timed(fn):
        # The matmul FLOPs of one call (forward, and backward where the call runs it), counted
        # on a call of its own before the timing.
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        flops[0] = counter.get_total_flops()
        fn()
        sync()
        ts = []
        for _ in range(args.iters):
            t = time.perf_counter()
            fn()
            sync()
            ts.append((time.perf_counter() - t) * 1e3)
        return ts

    if args.what in ("image", "text", "forward"):
        model.eval()
        with torch.no_grad():
            if args.what == "image":
                times = timed(lambda: model.flava.image_model(pixel_values=x["pixel_values"]))
            elif args.what == "text":
                times = timed(lambda: model.flava.text_model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]))
            else:
                times = timed(lambda: model(**x, skip_unmasked_multimodal_encoder=True, return_loss=True))
    elif args.what == "finetune":
        from transformers import FlavaModel

        torch.manual_seed(0)
        flava = FlavaModel(cfg).to(dev)
        d = cfg.multimodal_config.hidden_size
        head = torch.nn.Sequential(torch.nn.Linear(d, 768), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                   torch.nn.Linear(768, 3)).to(dev)
        params = list(flava.parameters()) + list(head.parameters())
        flava.train()
        head.train()
        opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-8, weight_decay=0.01)
        labels = torch.tensor([k % 3 for k in range(args.batch)], device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            out = flava(pixel_values=x["pixel_values"], input_ids=x["input_ids"], attention_mask=x["attention_mask"])
            logits = head(out.multimodal_output.last_hidden_state[:, 0])
            loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # as flava-rs's Trainer (grad_clip 1)
            opt.step()
            sync()

        times = timed(step)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-8, weight_decay=0.01)

        def step():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(**x, skip_unmasked_multimodal_encoder=True, return_loss=True)
            out.loss.item()  # waits for the forward pass, as flava-bench reads its loss
            t1 = time.perf_counter()
            out.loss.backward()
            sync()
            t2 = time.perf_counter()
            # Clipping at norm 1, as `flava pretrain` and flava-rs's bench step do.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sync()
            t3 = time.perf_counter()
            phases.append([(t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3])

        times = timed(step)
        phases.pop(0)  # the counted call
        phases.pop(0)  # the warm-up
    med = lambda i: statistics.median(p[i] for p in phases) if phases else None
    gpu_mb = torch.cuda.max_memory_reserved() / 2**20 if dev.type == "cuda" else None
    print(json.dumps({"times_ms": times, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
                      "device_reserved_mb": gpu_mb, "flops": flops[0],
                      "forward_ms": med(0), "backward_ms": med(1), "optimizer_ms": med(2)}))


def cpu_model():
    """The CPU's model name, from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_flags():
    """The SIMD and matrix flags that decide gemm speed (AVX2, FMA, AVX-512, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    keep = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]
                    return " ".join(k for k in keep if k in flags) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"


def bench_env():
    """flava-bench's environment: as if this Python's venv were activated (`VIRTUAL_ENV`), so that
    a BLAS installed in it (`pip install mkl`) is one of the libraries `FLAVA_BLAS=auto` times."""
    env = dict(os.environ)
    if "VIRTUAL_ENV" not in env and sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    return env


def run_json(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=bench_env())
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round, a third of the iterations")
    ap.add_argument("--only", default="", help="comma-separated what/preset/task filters, e.g. step/small")
    ap.add_argument("--no-build", action="store_true", help="use the existing target/release/flava-bench")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--what")
    ap.add_argument("--config")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--task", default="pairs")
    ap.add_argument("--iters", type=int)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: flava-rs built with --features cuda against PyTorch on the GPU")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    gpu = args.device == "cuda"
    if not args.no_build:
        features = ["--features", "cuda"] if gpu else []
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "flava-benches", "--bin", "flava-bench"] + features,
                       cwd=ROOT, check=True)
    import torch
    import transformers

    rounds = 1 if args.quick else args.rounds
    configs = [c for c in CONFIGS + (GPU_CONFIGS if gpu else []) if not args.only or any(
        all(part in (c[0], c[1], c[3]) for part in f.split("/")) for f in args.only.split(","))]
    cfg_files = {}
    for preset in sorted({c[1] for c in configs}):
        path = os.path.join(ROOT, "target", f"bench-config-{preset}.json")
        out = subprocess.run([OURS, "config", "--preset", preset], capture_output=True, text=True, check=True)
        with open(path, "w") as f:
            f.write(out.stdout)
        cfg_files[preset] = path
    # The machine's sgemm peak: one square matmul on each side, the larger of the two.
    peak = {}
    for who, cmd in (("ours", [OURS, "sgemm", "--batch", str(SGEMM_N), "--iters", "10"] + (["--device", "cuda"] if gpu else [])),
                     ("torch", [sys.executable, __file__, "--worker", "--what", "sgemm", "--batch", str(SGEMM_N),
                                "--iters", "10", "--device", args.device])):
        res = run_json(cmd)
        peak[who] = 2 * SGEMM_N ** 3 / statistics.median(res["times_ms"]) / 1e6
        if who == "ours":
            backend = res.get("sgemm_backend", "?")
    peak_gflops = max(peak.values())
    print(f"sgemm {SGEMM_N}^3: flava-rs (flex) {peak['ours']:.0f} GFLOP/s, PyTorch {peak['torch']:.0f} GFLOP/s",
          file=sys.stderr, flush=True)
    results = {}
    for r in range(rounds):
        for what, preset, b, task, iters in configs:
            iters = max(1, iters // 3) if args.quick else iters
            common = ["--batch", str(b), "--iters", str(iters), "--task", task]
            ours_dev = ["--device", "cuda" if gpu else "flex"]
            theirs_dev = ["--device", args.device]
            ours = run_json([OURS, what, "--preset", preset, "--products"] + common + ours_dev)
            theirs = run_json([sys.executable, __file__, "--worker", "--what", what, "--config", cfg_files[preset]]
                              + common + theirs_dev)
            key = (what, preset, b, task)
            acc = results.setdefault(key, {"ours": [], "torch": [], "ours_rss": 0.0, "torch_rss": 0.0,
                                           "ours_phases": [], "torch_phases": []})
            acc["ours"] += ours["times_ms"]
            acc["torch"] += theirs["times_ms"]
            if theirs.get("forward_ms") is not None:
                for who, res in (("ours", ours), ("torch", theirs)):
                    acc[f"{who}_phases"].append([res["forward_ms"], res["backward_ms"], res["optimizer_ms"]])
            for who, res in (("ours", ours), ("torch", theirs)):
                if res.get("device_reserved_mb") is not None:
                    acc[f"{who}_gpu"] = max(acc.get(f"{who}_gpu", 0.0), res["device_reserved_mb"])
            if theirs.get("flops"):
                acc["flops"] = theirs["flops"]
            # flava-rs's own products (none on a GPU, where its kernels do not run).
            prod = ours.get("products") or {}
            if prod.get("kinds"):
                # The process's mean iteration, the same iterations its products were recorded in.
                prod["total_ms"] = statistics.mean(ours["times_ms"])
                acc.setdefault("ours_products", []).append(prod)
            acc["ours_rss"] = max(acc["ours_rss"], ours["peak_rss_mb"])
            acc["torch_rss"] = max(acc["torch_rss"], theirs["peak_rss_mb"])
            print(f"round {r + 1}/{rounds} {what}/{preset}/{task}/b{b}: ours {statistics.median(ours['times_ms']):.1f} ms, "
                  f"PyTorch {statistics.median(theirs['times_ms']):.1f} ms", file=sys.stderr, flush=True)
    where = f"GPU {torch.cuda.get_device_name(0)}, " if gpu else ""
    print(f"\nCPU: {cpu_model()}; flags: {cpu_flags()}")
    print(f"flava-rs kernels' products (FLAVA_BLAS={os.environ.get('FLAVA_BLAS', 'auto')}): {backend}")
    print(f"sgemm peak ({SGEMM_N}^3 f32): flava-rs flex {peak['ours']:.0f} GFLOP/s, torch.mm {peak['torch']:.0f} GFLOP/s; "
          f"shares below are of {peak_gflops:.0f} GFLOP/s")
    print(f"\ntorch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"{where}{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, {rounds} round(s), alternating\n")
    print("| config | batch | work | flava-rs | PyTorch | ratio (time) | matmul GFLOP flava-rs / PyTorch |"
          " GFLOP/s flava-rs / PyTorch | share of peak | peak RSS flava-rs | peak RSS PyTorch |"
          + (" GPU memory flava-rs / PyTorch |" if gpu else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    table = []
    where_lines = []  # rows of the second table
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    threads = os.cpu_count() or 1  # rayon's default, as flava-bench runs

    def lost(k):
        # A product kind's time minus its FLOPs at the peak (one-thread kinds: at a thread's share).
        ideal = 2 * k["m"] * k["n"] * k["k"] * k["calls"] / (peak_gflops * 1e9) * 1e3
        return (k["ms"] - ideal) if k["parallel"] else (k["ms"] - ideal * threads) / threads

    for (what, preset, b, task), acc in results.items():
        o, t = statistics.median(acc["ours"]), statistics.median(acc["torch"])
        work = {"image": "image embedding", "text": "text embedding",
                "step": f"pretraining step ({task})", "forward": "pretraining forward (pairs)",
                "finetune": "fine-tuning step (multimodal classification)"}[what]
        gpu_mem = (f" GPU {acc.get('ours_gpu', 0):.0f} / {acc.get('torch_gpu', 0):.0f} MB |" if gpu else "")
        fl = acc.get("flops")
        prods = acc.get("ours_products", [])
        fl_o = prods[0]["gflop"] * 1e9 if prods else None
        g_o = fl_o / o / 1e6 if fl_o else None
        g_t = fl / t / 1e6 if fl else None
        # Each process's share of its own time in products, so that rounds on a noisy host do not mix.
        p_ms = o * statistics.median(p["ms"] / p["total_ms"] for p in prods) if prods else None
        share = f"{fmt(g_o and 100 * g_o / peak_gflops, '.0f')}% / {fmt(g_t and 100 * g_t / peak_gflops, '.0f')}%"
        print(f"| {preset} | {b} | {work} | {o:.1f} ms | {t:.1f} ms | {o / t:.2f} | "
              f"{fmt(fl_o and fl_o / 1e9, '.1f')} / {fmt(fl and fl / 1e9, '.1f')} | {fmt(g_o, '.0f')} / {fmt(g_t, '.0f')} | "
              f"{share} | {acc['ours_rss']:.0f} MB | {acc['torch_rss']:.0f} MB |{gpu_mem}")
        table.append({"what": what, "preset": preset, "batch": b, "task": task, "ours_ms": o, "torch_ms": t,
                      "ratio": o / t, "ours_peak_rss_mb": acc["ours_rss"], "torch_peak_rss_mb": acc["torch_rss"],
                      "matmul_flops": fl, "ours_matmul_flops": fl_o, "ours_gflops": g_o, "torch_gflops": g_t,
                      "sgemm_peak_gflops": peak_gflops, "ours_products_ms": p_ms})
        if prods:
            p_gflops = statistics.median(p["gflop"] * 1e3 / p["ms"] for p in prods)
            bound = prods[0]["gflop"] / peak_gflops * 1e3
            worst = max(prods[0]["kinds"], key=lost)
            where_lines.append(f"| {preset} | {b} | {work} | {o:.1f} | {p_ms:.1f} ({100 * p_ms / o:.0f}%) | {p_gflops:.0f} | "
                         f"{o - p_ms:.1f} ({100 * (o - p_ms) / o:.0f}%) | {bound:.1f} ms ({o / bound:.2f}x) | "
                         f"{worst['m']}x{worst['n']}x{worst['k']} {worst['layout']} "
                         f"({'all threads' if worst['parallel'] else 'one thread'}, {worst['calls']} per iteration), "
                         f"{worst['gflops']:.0f}, {lost(worst):.1f} |")
    if where_lines:
        print("\nWhere flava-rs's time goes: in its matrix products or outside them (ms; each process's share of "
              "its own time, median over rounds, times the row's median; attention's one-thread products count as "
              "their summed time over the threads). \"Lost\": a kind's time minus its FLOPs at the sgemm peak; the "
              "kind that loses most is named.\n")
        print("| config | batch | work | flava-rs | in products | products' GFLOP/s | outside products | "
              "matmul-bound (at the peak) | most time lost: kind, GFLOP/s, ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(where_lines))
    steps = [(k, acc) for k, acc in results.items() if acc["ours_phases"]]
    if steps:
        print("\nWhere a training step's time goes (medians over rounds of each run's median, ms):\n")
        print("| config | batch | task | forward flava-rs / PyTorch | backward | optimizer |")
        print("|---|---|---|---|---|---|")
        for (what, preset, b, task), acc in steps:
            cells = []
            for i in range(3):
                o = statistics.median(p[i] for p in acc["ours_phases"])
                t = statistics.median(p[i] for p in acc["torch_phases"])
                cells.append(f"{o:.0f} / {t:.0f} ({o / t:.2f})")
            print(f"| {preset} | {b} | {task} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
