#!/usr/bin/env python3
"""Bulk embedding throughput: `flava embed --data CSV --out DIR` against transformers' FLAVA on
the same images and captions, side by side, alternating, on a randomly initialised model of a
preset (default `full`: 224 px, ViT-B/16 towers; no download).

Both sides do the whole job: read and decode the JPEGs, preprocess, tokenize, run both towers in
batches, and keep the projected features (ours writes them as float32 .npy parts; PyTorch keeps
them in memory). Model loading is included on both sides. The script checks that the two sides'
features agree (max abs difference) before timing anything.

    .venv/bin/python benches/compare_embed_pytorch.py [--preset full] [--n 128] [--rounds 2]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAVA = os.path.join(ROOT, "target", "release", "flava")
BENCH = os.path.join(ROOT, "target", "release", "flava-bench")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "embed_model", "tokenizer.json")
WORDS = "a photo of the cat dog red blue green square circle triangle left right small big two three".split()


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def make_data(tmp, n, side, fmt="jpg", seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = ["image,caption"]
    for i in range(n):
        # Smooth colour fields plus noise: JPEG-typical content, not flat.
        extra = int(os.environ.get("EMBED_BENCH_EXTRA", "64"))
        h, w = side + int(rng.integers(0, extra + 1)), side + int(rng.integers(0, extra + 1))
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / rng.uniform(5, 40) + c) * 100 + 128 for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype("uint8")
        name = f"{i:05d}.{fmt}"
        Image.fromarray(img).save(os.path.join(tmp, name), **({"quality": 90} if fmt == "jpg" else {}))
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
        rows.append(f"{name},{caption}")
    csv = os.path.join(tmp, "pairs.csv")
    with open(csv, "w") as f:
        f.write("\n".join(rows) + "\n")
    return csv


def make_model(tmp, preset):
    import torch
    from transformers import FlavaConfig, FlavaImageProcessor, FlavaModel

    cfg_json = subprocess.run([BENCH, "config", "--preset", preset], capture_output=True, text=True, check=True).stdout
    cfg = FlavaConfig(**json.loads(cfg_json))
    torch.manual_seed(0)
    model = FlavaModel(cfg).eval()
    d = os.path.join(tmp, "model")
    model.save_pretrained(d, safe_serialization=True)
    s = cfg.image_config.image_size
    FlavaImageProcessor(size={"height": s, "width": s}, crop_size={"height": s, "width": s}).save_pretrained(d)
    shutil.copy(TOKENIZER, os.path.join(d, "tokenizer.json"))
    return d


def run_ours(model_dir, csv, out, batch):
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(
        [FLAVA, "embed", "--model", model_dir, "--data", csv, "--out", out, "--dtype", "f32",
         "--batch-size", str(batch), "--part-size", "1000000"],
        check=True, capture_output=True,
    )
    return time.perf_counter() - t


def feature(out):
    """The projected CLS row: transformers 5 returns an output object (`pooler_output`), 4 a tensor."""
    t = out.pooler_output if hasattr(out, "pooler_output") else out
    return t[:, 0]


def run_torch(model_dir, csv, batch, pil=False, max_length=77):
    """transformers' default image processor (the torchvision backend in 5.x) when timing; the PIL
    backend (`FlavaImageProcessorPil`, what flava-rs matches bit for bit) for the agreement check."""
    import torch
    from PIL import Image
    from transformers import BertTokenizerFast, FlavaImageProcessor, FlavaModel

    t = time.perf_counter()
    model = FlavaModel.from_pretrained(model_dir).eval()
    if pil:
        from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil
        proc = FlavaImageProcessorPil.from_pretrained(model_dir)
    else:
        proc = FlavaImageProcessor.from_pretrained(model_dir)
    tok = BertTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    base = os.path.dirname(csv)
    with open(csv) as f:
        rows = [line.rstrip("\n").split(",", 1) for line in f.readlines()[1:]]
    img_out, txt_out = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            images = [Image.open(os.path.join(base, p)).convert("RGB") for p, _ in chunk]
            pixels = proc(images=images, return_tensors="pt")["pixel_values"]
            enc = tok([c for _, c in chunk], padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt")
            img_out.append(feature(model.get_image_features(pixel_values=pixels)))
            txt_out.append(feature(model.get_text_features(input_ids=enc["input_ids"],
                                                           attention_mask=enc["attention_mask"])))
    elapsed = time.perf_counter() - t
    return elapsed, torch.cat(img_out).numpy(), torch.cat(txt_out).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--n", type=int, default=128, help="images (each with a caption)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--format", default="jpg", choices=["jpg", "png"], help="image files")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "flava-train", "-p", "flava-benches"], cwd=ROOT, check=True)
    import numpy as np
    import torch
    import transformers

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    tmp = tempfile.mkdtemp(prefix="flava-embed-bench-")
    try:
        model_dir = make_model(tmp, a.preset)
        side = json.load(open(os.path.join(model_dir, "config.json")))["image_config"]["image_size"]
        csv = make_data(tmp, a.n, side, a.format)
        out = os.path.join(tmp, "out")
        # Agreement first (one untimed run of each).
        run_ours(model_dir, csv, out, a.batch)
        _, img, txt = run_torch(model_dir, csv, a.batch, pil=True)
        ours_img = np.load(os.path.join(out, "img_emb", "img_emb_0.npy"))
        ours_txt = np.load(os.path.join(out, "text_emb", "text_emb_0.npy"))
        diff = max(float(np.abs(ours_img - img).max()), float(np.abs(ours_txt - txt).max()))
        print(f"image {float(np.abs(ours_img - img).max()):.1e}, text {float(np.abs(ours_txt - txt).max()):.1e}", file=sys.stderr)
        print(f"features agree: max |ours - transformers| = {diff:.1e}", file=sys.stderr)
        ours, theirs = [], []
        for r in range(a.rounds):
            ours.append(run_ours(model_dir, csv, out, a.batch))
            theirs.append(run_torch(model_dir, csv, a.batch)[0])
            print(f"round {r + 1}/{a.rounds}: ours {ours[-1]:.2f} s, PyTorch {theirs[-1]:.2f} s", file=sys.stderr)
        mo, mt = statistics.median(ours), statistics.median(theirs)
        result = {
            "cpu": cpu_model(), "threads": threads, "preset": a.preset, "images": a.n, "batch": a.batch,
            "rounds": a.rounds, "torch": torch.__version__, "transformers": transformers.__version__,
            "ours_s": mo, "pytorch_s": mt, "ours_images_per_s": a.n / mo, "pytorch_images_per_s": a.n / mt,
            "ratio_time": mo / mt, "max_abs_diff": diff,
        }
        if a.json:
            print(json.dumps(result))
        else:
            print(f"CPU: {result['cpu']}, {threads} threads; torch {torch.__version__}, transformers "
                  f"{transformers.__version__}; preset {a.preset}, {a.n} image-caption pairs, batch {a.batch}, "
                  f"median of {a.rounds}")
            print("| job | flava-rs | PyTorch | ratio (time) |")
            print("|---|---|---|---|")
            print(f"| bulk embedding (decode, preprocess, both towers) | {a.n / mo:.1f} pairs/s ({mo:.1f} s) | "
                  f"{a.n / mt:.1f} pairs/s ({mt:.1f} s) | {mo / mt:.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
