#!/usr/bin/env python3
"""Times transformers' FLAVA encoders in PyTorch (CPU, all cores) on the configurations of
benches/benches/encoders.rs, printing medians in ms. Run right before or after
`cargo bench -p flava-benches --bench encoders` on the same idle machine and compare medians.

    .venv/bin/python benches/compare_pytorch.py
"""
import statistics
import time

import torch
from transformers import FlavaConfig, FlavaModel


def preset(name):
    if name == "full":
        return FlavaConfig(), 1
    hidden, heads, ffn, layers, size, patch = {
        "tiny": (64, 2, 128, (2, 2, 1), 32, 8),
        "small": (256, 4, 1024, (4, 4, 2), 64, 8),
    }[name]
    common = dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn)
    cfg = FlavaConfig(
        image_config=dict(num_hidden_layers=layers[0], image_size=size, patch_size=patch, **common),
        text_config=dict(num_hidden_layers=layers[1], max_position_embeddings=128, **common),
        multimodal_config=dict(num_hidden_layers=layers[2], **common),
        hidden_size=hidden, projection_dim=hidden)
    return cfg, 8


def median_ms(fn, n):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


torch.manual_seed(0)
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
for name, n in [("tiny", 50), ("small", 20), ("full", 10)]:
    cfg, b = preset(name)
    m = FlavaModel(cfg).eval()
    s = cfg.image_config.image_size
    px = torch.randn(b, 3, s, s)
    ids = torch.randint(1, 1000, (b, 32))
    mask = torch.ones(b, 32, dtype=torch.long)
    with torch.no_grad():
        img = m.image_model(pixel_values=px, output_hidden_states=True)
        txt = m.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        mm_in = torch.cat([m.image_to_mm_projection(img.hidden_states[-1]), m.text_to_mm_projection(txt.hidden_states[-1])], 1)
        mm_mask = torch.cat([torch.ones(b, mm_in.shape[1] - 32 + 1, dtype=torch.long), mask], 1)
        r = {
            "image": median_ms(lambda: m.image_model(pixel_values=px), n),
            "text": median_ms(lambda: m.text_model(input_ids=ids, attention_mask=mask), n),
            "multimodal": median_ms(lambda: m.multimodal_model(mm_in, attention_mask=mm_mask), n),
        }
    for k, v in r.items():
        print(f"encoders/{name}/{k}/{b}: {v:.3f} ms")
