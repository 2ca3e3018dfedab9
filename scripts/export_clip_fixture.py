#!/usr/bin/env python3
"""Export small random Hugging Face CLIP models and their outputs for tests/clip_parity.rs.

Run: <venv with torch, transformers, open_clip_torch, safetensors>/bin/python scripts/export_clip_fixture.py

Writes tests/fixtures/clip/:
  tiny_a/vocab.json, tiny_a/merges.txt
                           the real CLIP BPE vocabulary (49408 tokens), built from
                           open_clip's bpe_simple_vocab_16e6.txt.gz as CLIP does it (tiny_b has
                           no tokenizer: the tests pair it with tiny_a's);
  tokens.json              [{"text", "ids"}]: CLIPTokenizerFast's ids (max_length 77, truncation),
                           checked equal to the slow CLIPTokenizer's;
  tiny_a/, tiny_b/         save_pretrained folders (config.json, model.safetensors, and for
                           tiny_a preprocessor_config.json) of two random CLIPModels, weights
                           rounded to f16 so that the f16 file holds them exactly:
                             a: quick_gelu, 32×32 images in 8×8 patches, eos_token_id 49407;
                             b: gelu, 16×16 images in 4×4 patches, eos_token_id 2 (the legacy
                                configs' argmax pooling), layer_norm_eps 1e-6, 3 text layers;
  parity.safetensors       for model m in {a, b}:
                             {m}_x          the raw samples in about [-1.2, 1.2] (a: [5,3,20,24],
                                            upscaled; b: [5,1,28,28], downscaled, grey);
                             {m}_pixels     the processor's input: (x+1)/2 clamped to [0,1],
                                            PIL's bicubic resize (float images, mode "F") of
                                            the short side to the crop size (horizontal pass,
                                            clamp to [0,1], vertical pass, clamp: as PIL does
                                            it on 8-bit images), centre crop,
                                            CLIP's mean/std;
                             {m}_image_embeds, {m}_text_embeds   get_*_features (projected);
                             {m}_logits     logits_per_image [5, prompts];
                             {m}_prob_diff, {m}_cosine, {m}_logit   the reward modes.
"""
import gzip
import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "clip")
PROMPTS = ["An image of dog", "Not an image of dog"]
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_vocab():
    import open_clip

    gz = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(gz).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(ROOT, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(ROOT, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return len(vocab)


STRINGS = [
    "An image of dog",
    "Not an image of dog",
    "a photo of a CAT.",
    "Hello, World!! How's it going?",
    "naïve café, Ünïcode ÀÉÎÕÜ résumé",
    "  multiple   spaces\tand\nnewlines  ",
    "it's we're they'll I'd you've I'm can't",
    "numbers 12345 and 3.14159, 1st 2nd",
    "emoji 🐶🐕 and symbols #$%&*(){}[]<>~`^",
    "日本語のテキスト and 中文",
    "<|endoftext|> inside a prompt",
    "hyphen-ated under_scored slash/separated e-mail@example.com",
    "",
    " ".join(["a long prompt that keeps going"] * 20),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def tokens():
    fast = CLIPTokenizerFast(os.path.join(ROOT, "vocab.json"), os.path.join(ROOT, "merges.txt"))
    slow = CLIPTokenizer(os.path.join(ROOT, "vocab.json"), os.path.join(ROOT, "merges.txt"))
    out = []
    for s in STRINGS:
        ids = fast(s, truncation=True, max_length=77)["input_ids"]
        ids_slow = slow(s, truncation=True, max_length=77)["input_ids"]
        if ids != ids_slow:
            print("fast and slow tokenizers differ on", repr(s), "(kept: fast)")
        out.append({"text": s, "ids": ids})
    with open(os.path.join(ROOT, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
    return fast


def preprocess(x, size):
    x = ((x + 1) / 2).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    h, w = x.shape[2], x.shape[3]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    # PIL's bicubic filter (what CLIPImageProcessor resizes with), in float (mode "F": no uint8
    # rounding); PIL's 8-bit path clips to [0, 255] after its horizontal and its vertical pass
    def pil(c, size):
        return np.clip(np.asarray(Image.fromarray(c, mode="F").resize(size, Image.BICUBIC)), 0, 1)

    x = torch.tensor(np.stack([np.stack([pil(pil(c.numpy(), (nw, h)), (nw, nh)) for c in im]) for im in x]))
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - m) / s


def model(name, cfg, x, tok, out, preproc_json):
    torch.manual_seed({"a": 11, "b": 12}[name])
    m = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            # spread the init so that the tiny towers are far from trivial, then round to f16
            p.copy_((p * 3 if p.ndim > 1 else p + 0.1 * torch.randn_like(p)).half().float())
        m.logit_scale.fill_(float(torch.tensor(2.6592).half()))
    d = os.path.join(ROOT, f"tiny_{name}")
    shutil.rmtree(d, ignore_errors=True)
    m.half().save_pretrained(d)
    m.float()
    if name == "a":
        for f in ["vocab.json", "merges.txt"]:
            shutil.copy(os.path.join(ROOT, f), os.path.join(d, f))
    if preproc_json is not None:
        with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
            json.dump(preproc_json, f, indent=2)
    size = cfg.vision_config.image_size
    px = preprocess(x, size)
    ids = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        o = m(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=px)
        img = m.get_image_features(pixel_values=px)
        txt = m.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
    logits = o.logits_per_image
    probs = logits.softmax(-1)
    cos = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    assert torch.allclose(logits, cos * m.logit_scale.exp(), rtol=1e-5, atol=1e-5)
    out[f"{name}_x"] = x.contiguous()
    out[f"{name}_pixels"] = px.contiguous()
    out[f"{name}_image_embeds"] = img.contiguous()
    out[f"{name}_text_embeds"] = txt.contiguous()
    out[f"{name}_logits"] = logits.contiguous()
    out[f"{name}_prob_diff"] = (probs[:, 0] - probs[:, 1]).contiguous()
    out[f"{name}_cosine"] = cos[:, 0].contiguous()
    out[f"{name}_logit"] = logits[:, 0].contiguous()
    print(name, "logits", logits.numpy().round(3).tolist())


def main():
    os.makedirs(ROOT, exist_ok=True)
    n = write_vocab()
    tok = tokens()
    g = torch.Generator().manual_seed(3)
    out = {}
    a = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=24,
    )
    xa = torch.rand(5, 3, 20, 24, generator=g) * 2.4 - 1.2
    pre_a = {
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": MEAN,
        "image_std": STD,
        "resample": 3,
        "size": {"shortest_edge": 32},
    }
    model("a", a, xa, tok, out, pre_a)
    b = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu", eos_token_id=2, layer_norm_eps=1e-6, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=12,
    )
    xb = torch.rand(5, 1, 28, 28, generator=g) * 2.4 - 1.2
    model("b", b, xb, tok, out, None)
    save_file(out, os.path.join(ROOT, "parity.safetensors"))
    for f in ["vocab.json", "merges.txt"]:
        os.remove(os.path.join(ROOT, f))
    # how close CLIP's own processor (PIL, uint8 images) is to the float pipeline above
    try:
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor(**{k: v for k, v in pre_a.items()})
        imgs = [((xa[i].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy() for i in range(5)]
        pv = proc(images=imgs, return_tensors="pt")["pixel_values"]
        print("CLIPImageProcessor vs the float pipeline: max |Δ| =", float((pv - out["a_pixels"]).abs().max()))
    except Exception as e:  # informative only
        print("CLIPImageProcessor comparison skipped:", e)


if __name__ == "__main__":
    main()
