#!/usr/bin/env python3
"""Checks that a model directory saved by flava-rs loads in transformers' FlavaModel with no
missing or unexpected keys and gives the reference outputs.

    FLAVA_KEEP_SAVED=/tmp/flava-saved cargo test -p flava-fusion --test parity saved_model
    .venv/bin/python scripts/check_hf_load.py /tmp/flava-saved
"""
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import FlavaModel

saved = sys.argv[1]
fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
model, info = FlavaModel.from_pretrained(saved, output_loading_info=True)
model.eval()
print("missing:", info["missing_keys"], "unexpected:", info["unexpected_keys"], "mismatched:", info["mismatched_keys"])
io = load_file(os.path.join(fixtures, "tiny_io.safetensors"))
with torch.no_grad():
    out = model(input_ids=io["input_ids"], pixel_values=io["pixel_values"], attention_mask=io["attention_mask"],
                token_type_ids=io["token_type_ids"], output_hidden_states=True)
worst = max(
    (out.image_embeddings - io["image_last_hidden"]).abs().max().item(),
    (out.text_embeddings - io["text_last_hidden"]).abs().max().item(),
    (out.multimodal_embeddings - io["mm_last_hidden"]).abs().max().item(),
)
print(f"max |diff| of the three last_hidden_states vs the reference: {worst:.2e}")
ok = not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"] and worst < 1e-5
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
