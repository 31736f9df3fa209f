#!/usr/bin/env python3
"""Tokenization throughput of transformers' full-size FlavaImageCodebook at 112 px, batch 8, CPU
(the same work as `dvae/tokenize_full_codebook_112px_batch8` in benches/benches/dvae.rs).

    .venv/bin/python benches/compare_dvae_pytorch.py
"""
import statistics
import time

import torch
from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

torch.manual_seed(0)
cb = FlavaImageCodebook(FlavaImageCodebookConfig()).eval()
x = torch.rand(8, 3, 112, 112) * 0.8 + 0.1
with torch.no_grad():
    cb.get_codebook_indices(x)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        cb.get_codebook_indices(x)
        times.append(time.perf_counter() - t)
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}: {8 / statistics.median(times):.1f} images/s "
      f"(median {statistics.median(times) * 1000:.0f} ms per batch of 8)")
