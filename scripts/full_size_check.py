#!/usr/bin/env python3
"""Full-size check, run by hand (not in CI; it writes 1.4 GB): builds a random FlavaForPreTraining
with the default (flava-full) configuration, saves it exactly as the official checkpoint is laid out
(`pytorch_model.bin` with `flava.` keys, heads, codebook, tied head biases under both names and an
int64 position_ids buffer), and writes what HF's FlavaProcessor + FlavaModel give for two images
and two texts. Then compare with `flava embed --json` (see README, "Full-size check").

    .venv/bin/python scripts/full_size_check.py /tmp/flava-full-random
"""
import json
import os
import shutil
import sys

import torch
from PIL import Image
from transformers import BertTokenizerFast, FlavaConfig, FlavaForPreTraining, FlavaModel, FlavaProcessor
from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil

out = sys.argv[1]
fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
cfg = FlavaConfig()
pre = FlavaForPreTraining(cfg).eval()
with torch.no_grad():
    for n, p in pre.named_parameters():
        if "token" in n or "position_embeddings" in n:
            p.normal_(0, 0.02)
sd = dict(pre.state_dict())
for head in ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head"):
    sd[f"{head}.bias"] = sd[f"{head}.decoder.bias"]
sd["flava.text_model.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
torch.save(sd, os.path.join(out, "pytorch_model.bin"))
cfg.save_pretrained(out)
FlavaImageProcessorPil(do_convert_rgb=True).save_pretrained(out)
tok = BertTokenizerFast.from_pretrained(os.path.join(fixtures, "tokenizer"))
tok.save_pretrained(out)
for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(out, f)):
        os.remove(os.path.join(out, f))

model = FlavaModel(cfg).eval()
model.load_state_dict({k[len("flava."):]: v for k, v in pre.state_dict().items() if k.startswith("flava.")})
images = ["landscape_300x200.png", "photo_256x256.jpg"]
texts = ["a photo of a cat", "two dogs playing on the left"]
proc = FlavaProcessor(image_processor=FlavaImageProcessorPil(do_convert_rgb=True), tokenizer=tok)
enc = proc(images=[Image.open(os.path.join(fixtures, "processor", i)) for i in images], text=texts,
           padding="max_length", max_length=77, truncation=True, return_tensors="pt")
with torch.no_grad():
    fi = model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output[:, 0]
    ft = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output[:, 0]
    lg = model.logit_scale.exp() * torch.nn.functional.normalize(fi, dim=-1) @ torch.nn.functional.normalize(ft, dim=-1).T
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump({"images": images, "texts": texts, "image_features": fi.tolist(), "text_features": ft.tolist(),
               "logits_per_image": lg.tolist()}, f)
print("wrote", out, "keys:", len(sd))
