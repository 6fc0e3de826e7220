"""Tests for 00_toy_data.py: shard layout, AltText noise, determinism, eval sets, COCO file, tiny models."""

import importlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
toy_data = importlib.import_module("00_toy_data")

SMALL = [
    "--num-shards",
    "2",
    "--samples-per-shard",
    "40",
    "--eval-per-class",
    "3",
    "--retrieval-images",
    "12",
    "--coco-images",
    "6",
    "--image-size",
    "48",
]
COLOR_WORDS = set(toy_data.COLORS)
SHAPE_WORDS = set(toy_data.SHAPES) | set(toy_data.PLURALS.values())


def words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def read_tar(path):
    with tarfile.open(path) as tar:
        # Fixed member metadata is what makes shards byte-identical across runs and machines.
        assert all(
            (m.mtime, m.uid, m.gid, m.uname, m.gname, m.isfile()) == (0, 0, 0, "", "", True)
            for m in tar.getmembers()
        )
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples(out):
    """(shard index, key, jpg bytes, txt, json) for every sample, checking member order on the way."""
    rows = []
    for shard, tar_path in enumerate(sorted((out / "shards").glob("*.tar"))):
        members = read_tar(tar_path)
        assert len(members) % 3 == 0
        for j in range(0, len(members), 3):
            (n_jpg, jpg), (n_txt, txt), (n_json, meta) = members[j : j + 3]
            key = n_jpg[: -len(".jpg")]
            assert [n_jpg, n_txt, n_json] == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
            rows.append((shard, key, jpg, txt.decode(), json.loads(meta)))
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    toy_data.main(["--out", str(out), *SMALL])
    return out


def test_shard_layout_and_metadata(built):
    rows = samples(built)
    # no *.tmp* left behind
    assert sorted(p.name for p in (built / "shards").iterdir()) == [
        "00000.tar",
        "00000_stats.json",
        "00001.tar",
        "00001_stats.json",
    ]
    keys = [key for _, key, *_ in rows]
    assert len(keys) == 80 and len(set(keys)) == 80
    for i, (shard, key, jpg, txt, meta) in enumerate(rows):
        assert re.fullmatch(r"\d{9}", key) and key == f"{shard:05d}{i % 40:04d}"
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and img.size == (48, 48) and img.mode == "RGB"
        assert meta["key"] == key and meta["caption"] == txt and meta["status"] == "success"
        assert (meta["width"], meta["height"]) == (48, 48) and meta["count"] in (1, 2, 3)
        assert meta["shape"] in toy_data.SHAPES and meta["color"] in toy_data.COLORS
        assert meta["background"] in toy_data.BACKGROUNDS
        # The object is really drawn in its colour: enough pixels close to it (JPEG blurs edges).
        dist = np.abs(np.asarray(img, dtype=np.int16) - np.array(toy_data.COLORS[meta["color"]])).max(-1)
        assert (dist < 40).sum() >= 30, (key, meta)
    for shard in (0, 1):
        stats = json.loads((built / "shards" / f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == 40


def check_alt_text(text, kind, color, shape):
    has_color, has_shape = bool(words(text) & COLOR_WORDS), bool(words(text) & SHAPE_WORDS)
    if kind == "complete":  # names this image's own colour and shape
        assert color in words(text) and words(text) & {shape, toy_data.PLURALS[shape]}, text
    elif kind == "partial":
        assert has_color != has_shape and words(text) & {color, shape, toy_data.PLURALS[shape]}, text
    else:
        assert kind == "junk" and not has_color and not has_shape, text


def test_alt_text_is_a_noisy_mix_that_matches_its_kind(built):
    for *_, txt, meta in samples(built):
        check_alt_text(txt, meta["alt_kind"], meta["color"], meta["shape"])
    import random

    rng, kinds, texts = random.Random(1), [], set()
    for _ in range(4000):
        attrs = toy_data.draw_scene(rng, 8)[1]
        text, kind = toy_data.alt_text(attrs, rng)
        check_alt_text(text, kind, attrs["color"], attrs["shape"])
        kinds.append(kind)
        texts.add(text)
    share = {k: kinds.count(k) / len(kinds) for k in ("complete", "partial", "junk")}
    assert abs(share["complete"] - 0.5) < 0.04 and abs(share["partial"] - 0.3) < 0.04
    assert abs(share["junk"] - 0.2) < 0.04
    assert len(texts) > 300  # varied phrasings, not a handful of fixed strings


def test_same_seed_same_bytes_other_seed_differs(tmp_path, built):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    toy_data.main(["--out", str(a), *SMALL, "--skip-models"])
    toy_data.main(["--out", str(b), *SMALL, "--skip-models", "--num-shards", "1"])
    toy_data.main(["--out", str(c), *SMALL, "--skip-models", "--seed", "1"])
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(built) for p in built.rglob("*") if p.is_file() and "tiny-" not in str(p)
    )
    for f in files:
        assert (a / f).read_bytes() == (built / f).read_bytes(), f
    # A shard depends only on (seed, shard index), not on how many shards the run makes.
    assert (b / "shards/00000.tar").read_bytes() == (a / "shards/00000.tar").read_bytes()
    assert (c / "shards/00000.tar").read_bytes() != (a / "shards/00000.tar").read_bytes()
    assert (c / "eval/retrieval/captions.jsonl").read_bytes() != (
        a / "eval/retrieval/captions.jsonl"
    ).read_bytes()


def test_rerun_keeps_done_outputs_and_redoes_unfinished(tmp_path, capsys):
    out = tmp_path / "t"
    args = ["--out", str(out), *SMALL, "--skip-models"]
    toy_data.main(args)
    tar0, tar1 = out / "shards/00000.tar", out / "shards/00001.tar"
    original = tar1.read_bytes()
    tar0.write_bytes(b"sentinel")  # done (stats exists): must be kept
    tar1.write_bytes(b"partial")
    (out / "shards/00001_stats.json").unlink()  # no done-marker: must be rebuilt
    capsys.readouterr()
    toy_data.main(args)
    assert "kept" in capsys.readouterr().out
    assert tar0.read_bytes() == b"sentinel" and tar1.read_bytes() == original
    toy_data.main(args + ["--overwrite"])
    assert tar0.read_bytes() != b"sentinel"


def test_eval_sets_are_consistent(built):
    zs = built / "eval/zeroshot"
    classes = (zs / "classnames.txt").read_text().splitlines()
    assert classes == sorted(p.name for p in zs.iterdir() if p.is_dir()) == sorted(toy_data.SHAPES)
    for c in classes:
        assert len(list((zs / c).glob("*.jpg"))) == 3
    templates = (zs / "templates.txt").read_text().splitlines()
    assert 5 <= len(templates) <= 8 and all("{c}" in t for t in templates)
    lines = (built / "eval/retrieval/captions.jsonl").read_text().splitlines()
    assert len(lines) == 12
    for line in lines:
        rec = json.loads(line)
        assert (built / "eval/retrieval" / rec["image"]).is_file()
        caps = rec["captions"]
        assert len(caps) == 5 and len(set(caps)) == 5
        # All five describe the same object: same colour words and same shape in every caption.
        shapes = [words(c) & SHAPE_WORDS for c in caps]
        assert all(s and s == shapes[0] for s in shapes), caps


def test_coco_captions_file(built):
    coco = json.loads((built / "coco/annotations/captions_train2017.json").read_text())
    assert {"info", "images", "annotations"} <= set(coco)
    ids = [im["id"] for im in coco["images"]]
    assert len(ids) == 6 == len(set(ids))
    assert all({"id", "file_name", "width", "height"} <= set(im) for im in coco["images"])
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)) == 30
    for image_id in ids:
        caps = [a["caption"] for a in coco["annotations"] if a["image_id"] == image_id]
        assert len(caps) == 5 and len(set(caps)) == 5 and all(words(c) & SHAPE_WORDS for c in caps)


def test_help_does_not_import_heavy_engines():
    code = (
        "import importlib, sys; sys.path.insert(0, sys.argv[1]); m = importlib.import_module('00_toy_data')\n"
        "try:\n    m.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert not {'torch', 'transformers', 'tokenizers', 'open_clip'} & set(sys.modules), sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True, capture_output=True)


def test_tiny_llama_tokenizer_and_left_padded_generate(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built / "models/tiny-llama")
    assert tok("hi").input_ids[0] == tok.bos_token_id and tok.padding_side == "left"
    assert len(tok) == 2000 and tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    text = "Ünïcødé 日本語 🙂 => IMG_4821.JPG"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == text
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "Be brief.\nUSER: hi\nASSISTANT: hello</s>\nUSER: again\nASSISTANT:"

    model = AutoModelForCausalLM.from_pretrained(built / "models/tiny-llama")
    assert model.config.head_dim >= 32 and model.config.vocab_size == len(tok)
    prompts = ["a red circle", "two blue stars on a striped background, shot from above"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert (batch.input_ids[0, 0] == tok.pad_token_id) and batch.attention_mask[
        0, 0
    ] == 0  # padded on the left
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        alone = model.generate(**tok(prompts[:1], return_tensors="pt"), max_new_tokens=8, do_sample=False)
        sampled = model.generate(
            **batch, max_new_tokens=5, do_sample=True, top_p=0.95, temperature=0.9, num_return_sequences=3
        )
    # Left padding must not change what the shorter prompt generates.
    assert out[0, batch.input_ids.shape[1] :].tolist() == alone[0, -8:].tolist()
    assert sampled.shape[0] == 6


def test_tiny_llava_processor_and_generate(built):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(built / "models/tiny-llava")
    model = LlavaForConditionalGeneration.from_pretrained(built / "models/tiny-llava")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = proc.apply_chat_template(conv, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is it?\nASSISTANT:"
    images = [
        Image.open(p).convert("RGB") for p in sorted((built / "eval/retrieval/images").glob("*.jpg"))[:2]
    ]
    images[1] = images[1].resize((70, 40))  # a non-square image must give the same token count
    inputs = proc(
        images=images,
        text=[prompt, "USER: <image>\nDescribe the image concisely.\nASSISTANT:"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        feats = model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    per_image = feats.pooler_output[0].shape[0] if hasattr(feats, "pooler_output") else feats.shape[1]
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [per_image, per_image] == [16, 16]
    assert inputs["attention_mask"][0, 0] == 0  # the shorter prompt is left-padded
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]


def test_toy_clip_config_builds_and_forwards_in_open_clip(built):
    import open_clip
    import torch

    cfg_path = built / "models/toy-clip.json"
    open_clip.add_model_config(cfg_path)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg_path.stem)
    tokenizer = open_clip.get_tokenizer(cfg_path.stem)
    _, _, jpg, txt, _ = samples(built)[0]
    image = preprocess(Image.open(io.BytesIO(jpg))).unsqueeze(0)
    assert image.shape == (1, 3, 48, 48)
    with torch.no_grad():
        img_f, txt_f, scale = model(image, tokenizer([txt, "a red circle"]))
    assert img_f.shape == (1, 64) and txt_f.shape == (2, 64) and scale.ndim == 0
    assert torch.allclose(img_f.norm(dim=-1), torch.ones(1), atol=1e-4)
