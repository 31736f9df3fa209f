#!/usr/bin/env python3
"""Writes the classification-head parity fixture of flava-rs.

The reference: transformers' FlavaModel (the tiny model of tests/fixtures/tiny, written by
make_fixtures.py) with torchmultimodal's classifier layout on the CLS of one encoder:
    classifier.model = Sequential(Linear(d, 16), ReLU, Dropout(p), Linear(16, 5))
fed by last_hidden_state[:, 0] of the image encoder, the text encoder, or the multimodal
encoder (text padding masked). Dropout is off (p = 0 here) so that values and gradients are
deterministic. For each tower: the head's weights, the logits, the cross-entropy loss and
gradients of the head and of backbone weights; for the multimodal head also the soft-score BCE
(VQA) and, with a 1-output head, the MSE loss.

Run from the repository root with the venv made by scripts/setup_python.sh:
    .venv/bin/python scripts/make_classification_fixtures.py
It writes tests/fixtures/classification_io.safetensors, and tests/fixtures/tokenizer/
expected_pairs.json (sentence pairs as BertTokenizerFast encodes them for GLUE-style tasks).
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import FlavaModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
HIDDEN, CLASSES = 16, 5

# Backbone weights whose gradients are compared (HF names).
BACKBONE_GRADS = {
    "image": ["image_model.encoder.layer.0.attention.attention.query.weight",
              "image_model.embeddings.cls_token"],
    "text": ["text_model.encoder.layer.1.output.dense.weight",
             "text_model.embeddings.word_embeddings.weight"],
    "multimodal": ["image_model.encoder.layer.0.attention.attention.query.weight",
                   "text_model.encoder.layer.1.output.dense.weight",
                   "multimodal_model.encoder.layer.0.intermediate.dense.weight",
                   "multimodal_model.cls_token",
                   "text_to_mm_projection.weight"],
}


def head(d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(d, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.0),
                            torch.nn.Linear(HIDDEN, classes))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def features(model, tower, io):
    if tower == "image":
        return model.image_model(pixel_values=io["pixel_values"]).last_hidden_state[:, 0]
    if tower == "text":
        return model.text_model(input_ids=io["input_ids"], attention_mask=io["attention_mask"],
                                token_type_ids=io["token_type_ids"]).last_hidden_state[:, 0]
    out = model(input_ids=io["input_ids"], pixel_values=io["pixel_values"],
                attention_mask=io["attention_mask"], token_type_ids=io["token_type_ids"])
    return out.multimodal_embeddings[:, 0]


def main():
    io = load_file(os.path.join(ROOT, "tiny_io.safetensors"))
    io = {k: io[k] for k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids")}
    model = FlavaModel.from_pretrained(os.path.join(ROOT, "tiny")).eval()
    cfg = model.config
    dims = {"image": cfg.image_config.hidden_size, "text": cfg.text_config.hidden_size,
            "multimodal": cfg.multimodal_config.hidden_size}
    labels = torch.tensor([3, 0, 4])
    t = {"labels": labels}
    params = dict(model.named_parameters())
    for seed, tower in enumerate(("image", "text", "multimodal")):
        clf = head(dims[tower], CLASSES, 10 + seed)
        model.zero_grad()
        logits = clf(features(model, tower, io))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        p = f"{tower}."
        for name, w in clf.state_dict().items():
            t[p + "classifier.model." + name] = w.detach().clone()
        t[p + "logits"] = logits.detach()
        t[p + "loss.ce"] = loss.detach().reshape(1)
        t[p + "grad.classifier.model.0.weight"] = clf[0].weight.grad.clone()
        t[p + "grad.classifier.model.3.bias"] = clf[3].bias.grad.clone()
        for name in BACKBONE_GRADS[tower]:
            t[p + "grad." + name] = params[name].grad.clone()
        if tower == "multimodal":
            # VQA: soft scores, BCE with logits summed over answers, mean over rows.
            g = torch.Generator().manual_seed(7)
            soft = torch.rand(3, CLASSES, generator=g) * (torch.rand(3, CLASSES, generator=g) > 0.5)
            logits = clf(features(model, tower, io))
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft, reduction="sum") / 3
            t["soft_scores"] = soft
            t[p + "loss.bce"] = bce.detach().reshape(1)
            # STS-B: one output, mean squared error.
            reg = head(dims[tower], 1, 20)
            values = torch.tensor([0.5, 3.2, -1.0])
            out = reg(features(model, tower, io))
            for name, w in reg.state_dict().items():
                t["regression.classifier.model." + name] = w.detach().clone()
            t["values"] = values
            t["regression.logits"] = out.detach()
            t["regression.loss.mse"] = torch.nn.functional.mse_loss(out[:, 0], values).detach().reshape(1)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(ROOT, "classification_io.safetensors"))
    print("wrote", len(t), "tensors")


def pair_fixtures():
    from transformers import BertTokenizerFast
    d = os.path.join(ROOT, "tokenizer")
    tok = BertTokenizerFast.from_pretrained(d)
    pairs = [["a red circle", "the circle is red"], ["is it big?", "a small blue square left of a cross"],
             ["one", "two three four five six seven eight nine ten eleven twelve"]]
    max_length = 12
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], padding="max_length", truncation=True,
              max_length=max_length)
    out = {"pairs": pairs, "max_length": max_length, "input_ids": enc["input_ids"],
           "attention_mask": enc["attention_mask"], "token_type_ids": enc["token_type_ids"]}
    with open(os.path.join(d, "expected_pairs.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
    pair_fixtures()
