#!/usr/bin/env python3
"""Writes the parity fixtures of flava-rs from Hugging Face transformers' FLAVA.

Run from the repository root with the venv made by scripts/setup_python.sh:
    .venv/bin/python scripts/make_fixtures.py
It writes tests/fixtures/tiny/ (a tiny random FLAVA with every weight perturbed, saved as
model.safetensors and as a FlavaForPreTraining pytorch_model.bin), tests/fixtures/tiny_io.safetensors
(inputs and every output the Rust tests compare), tests/fixtures/tokenizer/ and
tests/fixtures/processor/ (images and FlavaImageProcessor outputs).
"""
import json
import os
import random
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import transformers
from transformers import (
    BertTokenizerFast,
    FlavaConfig,
    FlavaForPreTraining,
    FlavaModel,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def tiny_config():
    # Hidden sizes differ between towers, odd FFN sizes, several heads, qkv bias off in the text
    # tower, projection_dim different from every hidden size.
    image = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 image_size=32, patch_size=4, num_channels=3, qkv_bias=True, mask_token=True, vocab_size=99)
    text = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=41,
                vocab_size=102, max_position_embeddings=64, type_vocab_size=2, qkv_bias=False)
    mm = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=43, qkv_bias=True)
    codebook = dict(hidden_size=16, vocab_size=99, num_groups=4, num_blocks_per_group=2)
    return FlavaConfig(image_config=image, text_config=text, multimodal_config=mm,
                       image_codebook_config=codebook, hidden_size=48, projection_dim=24,
                       logit_scale_init_value=2.0)


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            if name.endswith("LayerNorm.weight") or "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            elif name.endswith("logit_scale"):
                p.fill_(2.3)
            else:
                p.add_(noise * (3.0 if p.dim() <= 1 or "token" in name or "position" in name else 1.0))


def model_fixtures():
    out_dir = os.path.join(ROOT, "tiny")
    shutil.rmtree(out_dir, ignore_errors=True)
    torch.manual_seed(0)
    cfg = tiny_config()
    model = FlavaModel(cfg).eval()
    perturb(model, 1)
    model.save_pretrained(out_dir, safe_serialization=True)

    # The same weights as a FlavaForPreTraining `.bin` (heads and codebook beside, an int64
    # position_ids buffer as the 2022 checkpoint has), to test the `flava.` layout and .bin reading.
    pre = FlavaForPreTraining(cfg).eval()
    pre.flava.load_state_dict(model.state_dict())
    sd = {k: v.clone() for k, v in pre.state_dict().items()}
    sd["flava.text_model.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    bin_dir = os.path.join(ROOT, "tiny_pretraining")
    shutil.rmtree(bin_dir, ignore_errors=True)
    os.makedirs(bin_dir)
    torch.save(sd, os.path.join(bin_dir, "pytorch_model.bin"))
    cfg.save_pretrained(bin_dir)

    # Inputs: 3 images, 3 captions (row 1 padded), masked patches.
    g = torch.Generator().manual_seed(2)
    b, l = 3, 11
    pixel_values = torch.randn(b, 3, 32, 32, generator=g)
    input_ids = torch.randint(5, 102, (b, l), generator=g)
    input_ids[:, 0] = 2
    input_ids[:, -1] = 3
    attention_mask = torch.ones(b, l, dtype=torch.long)
    attention_mask[1, 6:] = 0
    input_ids[1, 6:] = 0
    input_ids[1, 5] = 3
    token_type_ids = torch.zeros(b, l, dtype=torch.long)
    token_type_ids[2, 6:] = 1
    bool_masked_pos = torch.zeros(b, 64, dtype=torch.bool)
    bool_masked_pos[:, 10:30] = True
    bool_masked_pos[2, 40:50] = True

    t = {}
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                    token_type_ids=token_type_ids, output_hidden_states=True)
        t["image_last_hidden"] = out.image_embeddings
        t["image_pre_ln"] = out.image_output.hidden_states[-1]
        t["image_first_hidden"] = out.image_output.hidden_states[0]
        t["image_pooler"] = out.image_output.pooler_output
        t["text_last_hidden"] = out.text_embeddings
        t["text_pre_ln"] = out.text_output.hidden_states[-1]
        t["text_pooler"] = out.text_output.pooler_output
        t["mm_last_hidden"] = out.multimodal_embeddings
        t["mm_pooler"] = out.multimodal_output.pooler_output

        img_feat = model.get_image_features(pixel_values=pixel_values).pooler_output[:, 0]
        txt_feat = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                           token_type_ids=token_type_ids).pooler_output[:, 0]
        t["image_features"] = img_feat
        t["text_features"] = txt_feat
        ni = torch.nn.functional.normalize(img_feat, dim=-1)
        nt = torch.nn.functional.normalize(txt_feat, dim=-1)
        t["logits_per_image"] = model.logit_scale.exp() * ni @ nt.T

        masked = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                       token_type_ids=token_type_ids, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
        t["masked_image_last_hidden"] = masked.image_embeddings
        t["masked_mm_last_hidden"] = masked.multimodal_embeddings

        # No text mask at all: the fusion encoder then attends to every position.
        nomask = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
        t["nomask_mm_last_hidden"] = nomask.multimodal_embeddings

        px48 = torch.randn(2, 3, 48, 48, generator=g)
        px_rect = torch.randn(2, 3, 32, 48, generator=g)
        t["pixel_values_48"] = px48
        t["pixel_values_32x48"] = px_rect
        t["interp48_last_hidden"] = model.image_model(pixel_values=px48, interpolate_pos_encoding=True).last_hidden_state
        t["interp32x48_last_hidden"] = model.image_model(pixel_values=px_rect, interpolate_pos_encoding=True).last_hidden_state

    # Standalone towers, as `FlavaImageModel.save_pretrained` / `FlavaTextModel.save_pretrained` write them.
    for tower in ("image_model", "text_model"):
        tower_dir = os.path.join(ROOT, f"tiny_{tower}")
        shutil.rmtree(tower_dir, ignore_errors=True)
        getattr(model, tower).save_pretrained(tower_dir, safe_serialization=True)

    t["pixel_values"] = pixel_values
    t["input_ids"] = input_ids
    t["attention_mask"] = attention_mask
    t["token_type_ids"] = token_type_ids
    t["bool_masked_pos"] = bool_masked_pos.to(torch.uint8)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(ROOT, "tiny_io.safetensors"))


WORDS = ("a an the photo of cat cats dog dogs red blue green square circle triangle left right on "
         "above below small big two three picture sitting next to and is with play ##ing ##s un ##believ ##able").split()


def tokenizer_fixtures():
    d = os.path.join(ROOT, "tokenizer")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,!?") + WORDS
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(d)
    texts = ["A photo of a CAT.", "two red squares left of a blue circle", "unbelievable zebra!",
             " ".join(["dog"] * 30), ""]
    enc = tok(texts, padding="max_length", max_length=16, truncation=True)
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump({"texts": texts, "max_length": 16, "input_ids": enc["input_ids"],
                   "attention_mask": enc["attention_mask"], "token_type_ids": enc["token_type_ids"]}, f)


def make_images(d):
    rng = np.random.default_rng(3)
    paths = []

    def save(name, img):
        p = os.path.join(d, name)
        img.save(p)
        paths.append(name)

    def natural(h, w):
        # Smooth gradients plus shapes plus noise: real-looking content for resampling.
        y, x = np.mgrid[0:h, 0:w]
        r = 127 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)
        g = 255.0 * x / max(w - 1, 1)
        b = 255.0 * ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 3) ** 2)
        arr = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
        return np.clip(arr, 0, 255).astype(np.uint8)

    save("landscape_300x200.png", Image.fromarray(natural(200, 300)))
    save("portrait_97x131.png", Image.fromarray(natural(131, 97)))
    save("exact_224.png", Image.fromarray(natural(224, 224)))
    save("small_50x40.png", Image.fromarray(natural(40, 50)))
    save("grey_120x90.png", Image.fromarray(natural(90, 120)[..., 0], mode="L"))
    rgba = np.concatenate([natural(64, 80), rng.integers(0, 256, (64, 80, 1), dtype=np.uint8)], -1)
    save("rgba_80x64.png", Image.fromarray(rgba, mode="RGBA"))
    save("palette_70x70.png", Image.fromarray(natural(70, 70)).convert("P", palette=Image.ADAPTIVE, colors=32))
    save("photo_256x256.jpg", Image.fromarray(natural(256, 256)))
    grey16 = (natural(60, 90)[..., 1].astype(np.uint16) * 3)  # values up to 765: Pillow clips at 255
    save("grey16_90x60.png", Image.fromarray(grey16))
    return paths


def processor_fixtures():
    from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil
    d = os.path.join(ROOT, "processor")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    names = make_images(d)
    pil = FlavaImageProcessorPil(do_convert_rgb=True)
    pil.save_pretrained(d)
    out = {}
    mean = np.array(pil.image_mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(pil.image_std, dtype=np.float32).reshape(3, 1, 1)
    fast = None
    try:
        from transformers import FlavaImageProcessor
        fast = FlavaImageProcessor(do_convert_rgb=True)
    except Exception as e:  # torchvision missing
        print("FlavaImageProcessor (torchvision backend) unavailable:", e, file=sys.stderr)
    for i, name in enumerate(names):
        img = Image.open(os.path.join(d, name))
        r = pil(img, return_codebook_pixels=True, return_tensors="np")
        pv = r["pixel_values"][0]
        cb = r["codebook_pixel_values"][0]
        key = name.split(".")[0]
        # Store the 8-bit images the processor resized (exactly recoverable), plus one full float
        # output to check rescale/normalise/map_pixels arithmetic.
        out[f"{key}.pixels_u8"] = torch.from_numpy(np.rint((pv * std + mean) * 255).astype(np.uint8))
        out[f"{key}.codebook_u8"] = torch.from_numpy(np.rint((cb - 0.1) / 0.8 * 255).astype(np.uint8))
        if i == 0:
            out[f"{key}.pixel_values"] = torch.from_numpy(pv.copy())
            out[f"{key}.codebook_pixel_values"] = torch.from_numpy(cb.copy())
        if fast is not None:
            rf = fast(img, return_codebook_pixels=True, return_tensors="pt")
            diff = (rf["pixel_values"][0].numpy() - pv).__abs__().max()
            print(f"{name}: torchvision backend vs PIL backend max |diff| = {diff:.4f}", file=sys.stderr)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "expected.safetensors"))
    with open(os.path.join(d, "images.json"), "w") as f:
        json.dump(names, f)


def codebook_fixtures():
    """A tiny FlavaImageCodebook (hidden 16, vocab 99, perturbed) saved three ways, with its logits
    and tokens on 64x64 inputs (8x8 tokens): its own directory, DALL-E's original key names."""
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig
    d = os.path.join(ROOT, "codebook")
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(4)
    cfg = FlavaImageCodebookConfig(hidden_size=16, vocab_size=99, num_groups=4, num_blocks_per_group=2)
    cb = FlavaImageCodebook(cfg).eval()
    # DALL-E's own initialisation (N(0, 1/sqrt(fan_in))) with small random biases, so that the
    # argmax tokens vary across the grid.
    g5 = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in cb.named_parameters():
            if p.dim() == 4:
                p.copy_(torch.randn(p.shape, generator=g5) / (p.shape[1] * p.shape[2] * p.shape[3]) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g5) * 0.05)
    cb.save_pretrained(d, safe_serialization=True)
    dalle = {}
    for k, v in cb.state_dict().items():
        k = k.replace(".group.", ".").replace("res_path.path.", "res_path.")
        k = k[: -len(".weight")] + ".w" if k.endswith(".weight") else k[: -len(".bias")] + ".b"
        dalle[k] = v.clone()
    torch.save(dalle, os.path.join(ROOT, "codebook_dalle_keys.pt"))
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 64, 64, generator=g) * 0.8 + 0.1
    with torch.no_grad():
        logits = cb(x)
        tokens = cb.get_codebook_indices(x)
        probs = cb.get_codebook_probs(x)
    save_file({"pixel_values": x, "logits": logits.contiguous(), "probs": probs.contiguous(),
               "tokens": tokens.reshape(2, -1).to(torch.int64).contiguous()},
              os.path.join(ROOT, "codebook_io.safetensors"))


def add_tokenizer_and_processor(d):
    """Saves the fixture tokenizer (tokenizer.json only) and a 32-px processor (64-px codebook
    branch) into model directory `d`; returns both."""
    from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil
    tok = BertTokenizerFast.from_pretrained(os.path.join(ROOT, "tokenizer"))
    tok.save_pretrained(d)
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(d, f)):
            os.remove(os.path.join(d, f))
    ip = FlavaImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                codebook_size={"height": 64, "width": 64},
                                codebook_crop_size={"height": 64, "width": 64}, do_convert_rgb=True)
    ip.save_pretrained(d)
    return tok, ip


def embed_fixtures():
    """A complete model directory (tiny weights, tokenizer, 32-px processor) and what
    `flava embed --json` must print for two of the processor images and three texts."""
    from transformers import FlavaProcessor
    d = os.path.join(ROOT, "embed_model")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "tiny"), d)
    tok, ip = add_tokenizer_and_processor(d)
    model = FlavaModel.from_pretrained(d).eval()
    images = ["landscape_300x200.png", "rgba_80x64.png"]
    texts = ["a photo of a cat", "two red squares left of a blue circle", "dogs playing"]
    proc = FlavaProcessor(image_processor=ip, tokenizer=tok)
    pil = [Image.open(os.path.join(ROOT, "processor", n)) for n in images]
    enc = proc(images=pil, text=texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        fi = model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output[:, 0]
        ft = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output[:, 0]
        logits = model.logit_scale.exp() * torch.nn.functional.normalize(fi, dim=-1) @ torch.nn.functional.normalize(ft, dim=-1).T
    with open(os.path.join(ROOT, "embed_expected.json"), "w") as f:
        json.dump({"images": images, "texts": texts, "max_length": 16, "image_features": fi.tolist(),
                   "text_features": ft.tolist(), "logits_per_image": logits.tolist()}, f)


def pretraining_fixtures():
    """A tiny FlavaForPreTraining (every width 32, as the MMM heads require; codebook inside) and,
    for a paired, an image-only and a text-only batch: the six losses, the total, every logit the
    losses use, the codebook targets, and the gradients of the total loss for chosen weights.
    Also the ITM match probabilities `flava embed --itm` must print for the embed images/texts."""
    from transformers import FlavaProcessor
    d = os.path.join(ROOT, "pretraining")
    shutil.rmtree(d, ignore_errors=True)
    image = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 image_size=32, patch_size=4, num_channels=3, qkv_bias=True, mask_token=True, vocab_size=99)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=41,
                vocab_size=102, max_position_embeddings=64, type_vocab_size=2, qkv_bias=False)
    mm = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=43, qkv_bias=True)
    codebook = dict(hidden_size=16, vocab_size=99, num_groups=4, num_blocks_per_group=2)
    cfg = FlavaConfig(image_config=image, text_config=text, multimodal_config=mm, image_codebook_config=codebook,
                      hidden_size=32, projection_dim=24, logit_scale_init_value=2.0, init_codebook=True)
    for sub in (cfg.image_config, cfg.text_config, cfg.multimodal_config):
        assert sub.hidden_dropout_prob == 0.0 and sub.attention_probs_dropout_prob == 0.0
    torch.manual_seed(7)
    model = FlavaForPreTraining(cfg)
    perturb(model, 8)
    with torch.no_grad():
        # Above ln(100): training must clamp it (value) while the gradient still flows (HF clamps
        # the parameter in place).
        model.flava.logit_scale.fill_(5.0)
        for name, p in model.image_codebook.named_parameters():
            if p.dim() == 4:
                p.normal_(0, 1 / (p.shape[1] * p.shape[2] * p.shape[3]) ** 0.5)
    model.save_pretrained(d, safe_serialization=True)
    tok, ip = add_tokenizer_and_processor(d)
    model = FlavaForPreTraining.from_pretrained(d)
    model.train()

    g = torch.Generator().manual_seed(9)
    ignore = -100

    def text_batch(b, l, pad_row, masked):
        ids = torch.randint(12, 102, (b, l), generator=g)
        ids[:, 0] = 5
        ids[:, -1] = 6
        att = torch.ones(b, l, dtype=torch.long)
        att[pad_row, 7:] = 0
        ids[pad_row, 7:] = 0
        ids[pad_row, 6] = 6
        labels = torch.full((b, l), ignore, dtype=torch.long)
        masked_ids = ids.clone()
        for (r, c) in masked:
            labels[r, c] = ids[r, c]
            masked_ids[r, c] = 7 if (r + c) % 3 else int(torch.randint(12, 102, (1,), generator=g))
        return ids, masked_ids, att, labels

    def image_batch(b):
        px = torch.randn(b, 3, 32, 32, generator=g)
        cb = torch.rand(b, 3, 64, 64, generator=g) * 0.8 + 0.1
        bmp = torch.zeros(b, 64, dtype=torch.bool)
        for r in range(b):
            start = 3 + 7 * r
            bmp[r, start:start + 12 + 2 * r] = True
        return px, cb, bmp

    grad_keys = [
        "flava.logit_scale",
        "flava.image_model.encoder.layer.0.attention.attention.query.weight",
        "flava.image_model.embeddings.cls_token",
        "flava.image_model.embeddings.mask_token",
        "flava.text_model.encoder.layer.1.output.dense.weight",
        "flava.text_model.embeddings.word_embeddings.weight",
        "flava.multimodal_model.encoder.layer.0.intermediate.dense.weight",
        "flava.multimodal_model.cls_token",
        "flava.image_projection.weight",
        "flava.text_projection.weight",
        "flava.image_to_mm_projection.weight",
        "flava.text_to_mm_projection.weight",
        "mim_head.transform.dense.weight",
        "mim_head.decoder.bias",
        "mlm_head.transform.LayerNorm.weight",
        "mlm_head.decoder.weight",
        "mmm_image_head.decoder.weight",
        "mmm_image_head.transform.dense.bias",
        "mmm_text_head.transform.dense.weight",
        "mmm_text_head.decoder.bias",
        "itm_head.pooler.dense.weight",
        "itm_head.seq_relationship.weight",
    ]
    params = dict(model.named_parameters())
    t = {}

    def run(name, **inputs):
        model.zero_grad()
        out = model(**inputs, return_loss=True)
        for k in ("mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text"):
            v = getattr(out.loss_info, k)
            if v is not None:
                t[f"{name}.loss.{k}"] = v.detach().reshape(1)
        t[f"{name}.loss.total"] = out.loss.detach().reshape(1)
        for k in ("mim_logits", "mlm_logits", "itm_logits", "mmm_image_logits", "mmm_text_logits",
                  "contrastive_logits_per_image", "contrastive_logits_per_text"):
            v = getattr(out, k)
            if v is not None:
                t[f"{name}.{k}"] = v.detach()
        out.loss.backward()
        for k in grad_keys:
            p = params[k] if k in params else params[k.replace(".decoder.bias", ".bias")]
            if p.grad is not None and p.grad.abs().max() > 0:
                t[f"{name}.grad.{k}"] = p.grad.detach().clone().reshape(p.shape if p.dim() else (1,))
        for k, v in inputs.items():
            if v is not None:
                t[f"{name}.input.{k}"] = v.to(torch.uint8) if v.dtype == torch.bool else v
        if inputs.get("codebook_pixel_values") is not None:
            with torch.no_grad():
                t[f"{name}.mim_targets"] = model.image_codebook.get_codebook_indices(
                    inputs["codebook_pixel_values"]).reshape(inputs["codebook_pixel_values"].shape[0], -1)

    # Paired: 4 pairs, row 2 an ITM negative, row 1 a padded caption.
    px, cb, bmp = image_batch(4)
    ids, ids_m, att, labels = text_batch(4, 11, 1, [(0, 2), (0, 5), (1, 3), (2, 4), (3, 1), (3, 8), (3, 9)])
    run("pairs", input_ids=ids, input_ids_masked=ids_m, attention_mask=att, pixel_values=px,
        codebook_pixel_values=cb, bool_masked_pos=bmp, mlm_labels=labels.clone(),
        itm_labels=torch.tensor([1, 1, 0, 1]))
    # No positive pair: every row counts.
    run("pairs_allneg", input_ids=ids, input_ids_masked=ids_m, attention_mask=att, pixel_values=px,
        codebook_pixel_values=cb, bool_masked_pos=bmp, mlm_labels=labels.clone(),
        itm_labels=torch.tensor([0, 0, 0, 0]))
    # Image only.
    px, cb, bmp = image_batch(3)
    run("images", pixel_values=px, codebook_pixel_values=cb, bool_masked_pos=bmp)
    # Text only.
    ids, ids_m, att, labels = text_batch(3, 9, 2, [(0, 1), (0, 4), (1, 2), (1, 7), (2, 3)])
    run("text", input_ids=ids, input_ids_masked=ids_m, attention_mask=att, mlm_labels=labels.clone())
    save_file({k: v.contiguous().clone() for k, v in t.items()}, os.path.join(ROOT, "pretraining_io.safetensors"))

    # `flava embed --itm`: P(match) from the ITM head on the unmasked multimodal output of each pair.
    model.eval()
    images = ["landscape_300x200.png", "rgba_80x64.png"]
    texts = ["a photo of a cat", "two red squares left of a blue circle", "dogs playing"]
    proc = FlavaProcessor(image_processor=ip, tokenizer=tok)
    pil = [Image.open(os.path.join(ROOT, "processor", n)) for n in images]
    enc = proc(images=pil, text=texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    probs = []
    with torch.no_grad():
        for i in range(len(images)):
            row = []
            for j in range(len(texts)):
                out = model.flava(pixel_values=enc["pixel_values"][i:i + 1], input_ids=enc["input_ids"][j:j + 1],
                                  attention_mask=enc["attention_mask"][j:j + 1])
                logits = model.itm_head(out.multimodal_embeddings)
                row.append(float(torch.softmax(logits, -1)[0, 1]))
            probs.append(row)
    with open(os.path.join(ROOT, "itm_expected.json"), "w") as f:
        json.dump({"images": images, "texts": texts, "max_length": 16, "itm_match_probability": probs}, f)


if __name__ == "__main__":
    print("transformers", transformers.__version__, "torch", torch.__version__, file=sys.stderr)
    random.seed(0)
    parts = {"model": model_fixtures, "tokenizer": tokenizer_fixtures, "processor": processor_fixtures,
             "embed": embed_fixtures, "codebook": codebook_fixtures, "pretraining": pretraining_fixtures}
    # `make_fixtures.py pretraining` rewrites one part; no argument rewrites all (in this order,
    # since later parts read the tokenizer and processor images).
    for name in sys.argv[1:] or parts:
        parts[name]()
    print("fixtures written to", os.path.normpath(ROOT), file=sys.stderr)
