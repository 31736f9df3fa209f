#!/usr/bin/env python3
"""The same data work as benches/benches/data.rs with the Python stack: PIL decode of a 256-px JPEG,
torchvision two-way RandomResizedCrop (224 bicubic, 112 Lanczos), ToTensor + CLIP normalise,
map_pixels, HF's FlavaMaskingGenerator, torch.stack; 2 worker processes as a DataLoader would use.
Prints images/s and masks/s (medians). Run beside `cargo bench -p flava-benches --bench data`.

    .venv/bin/python benches/compare_data_pytorch.py
"""
import io
import statistics
import time
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F
from transformers.models.flava.image_processing_flava import FlavaMaskingGenerator

BATCH = 32
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
rng = np.random.default_rng(0)
JPEGS = []
for i in range(BATCH):
    arr = (rng.random((256, 256, 3)) * 60 + np.linspace(0, 190, 256)[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    JPEGS.append(buf.getvalue())
MASKS = FlavaMaskingGenerator(input_size=14, total_mask_patches=75, mask_group_min_patches=16)
RRC = T.RandomResizedCrop(224, scale=(0.9, 1.0))


def one(b):
    img = Image.open(io.BytesIO(b)).convert("RGB")
    i, j, h, w = RRC.get_params(img, RRC.scale, RRC.ratio)
    enc = F.resized_crop(img, i, j, h, w, [224, 224], T.InterpolationMode.BICUBIC)
    cb = F.resized_crop(img, i, j, h, w, [112, 112], T.InterpolationMode.LANCZOS)
    enc = F.normalize(F.to_tensor(enc), MEAN, STD)
    cb = 0.8 * F.to_tensor(cb) + 0.1
    return enc, cb, torch.from_numpy(np.asarray(MASKS()))


def batch(pool):
    out = pool.map(one, JPEGS)
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]), torch.stack([o[2] for o in out])


if __name__ == "__main__":
    torch.set_num_threads(1)
    with Pool(2) as pool:
        batch(pool)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            batch(pool)
            times.append(time.perf_counter() - t)
    print(f"python pipeline: {BATCH / statistics.median(times):.0f} images/s (median of 20 batches of {BATCH})")
    times = []
    for _ in range(2000):
        t = time.perf_counter()
        MASKS()
        times.append(time.perf_counter() - t)
    print(f"python FlavaMaskingGenerator: {1 / statistics.median(times):.0f} masks/s")
