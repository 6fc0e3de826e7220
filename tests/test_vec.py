"""03_visual_concepts: one VeC record per key from the tiny LLaVA; bad images; model failures isolated;
the vLLM request shape; split invariance; kill -9 + resume."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import types
import zlib
from collections import Counter

import pytest
from conftest import REPO, stage
from PIL import Image

vc = stage("03_visual_concepts")
STATUSES = {"ok", "empty", "failed_image", "missing_image"}


def read_out(out_dir):
    records = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".jsonl"):
            for line in open(os.path.join(out_dir, name), encoding="utf-8"):
                r = json.loads(line)
                assert (name, r["key"]) not in records, f"{r['key']} twice"
                records[(name, r["key"])] = r
    return records


def tar_keys(shards):
    return {
        (p.stem + ".jsonl", k)
        for p in sorted(shards.glob("*.tar"))
        for k, _ in vc.iter_tar(str(p), set(), Counter())
    }


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width, height):
    """A valid PNG signature + header that claims a huge canvas, as a decompression bomb does."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def run(toy, out, *extra):
    return vc.main(
        [
            "--input",
            str(toy / "shards"),
            "--out-dir",
            str(out),
            "--model",
            str(toy / "models/tiny-llava"),
            "--max-new-tokens",
            "8",
            *extra,
        ]
    )


class ScriptedVLM:
    """Stands at the engine boundary: a caption made from each image's size and seed; images 7x7 px make it raise."""

    prompt = "USER: <image>\nscripted\nASSISTANT:"
    processor = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_mean=[0.5, 0.5, 0.5]))
    calls = []

    def __init__(self, *a, **k):
        pass

    def generate(self, images, seeds):
        ScriptedVLM.calls.append(len(images))
        if any(im.size == (7, 7) for im in images):
            raise ValueError("the processor rejects 7x7 images")
        return [
            f" a {im.size[0]} by {im.size[1]} picture, seed {s}\n"
            for im, s in zip(images, seeds, strict=True)
        ]


def test_hf_end_to_end_every_key_once_then_skip_and_overwrite(toy, tmp_path):
    out = tmp_path / "vec"
    stats = run(toy, out)
    records = read_out(out)
    assert set(records) == tar_keys(toy / "shards")
    assert all(
        r["status"] in {"ok", "empty"} and set(r) == {"key", "vec", "status"} for r in records.values()
    )
    assert all(
        isinstance(r["vec"], str) and r["vec"] == r["vec"].strip()
        for r in records.values()
        if r["status"] == "ok"
    )
    assert sum(r["status"] == "ok" for r in records.values()) > len(records) // 2
    assert (
        sum(s["in"] for s in stats) == len(records) == sum(s["ok"] + s["empty"] + s["failed"] for s in stats)
    )
    assert (
        stats[0]["prompt"] == "USER: <image>\nDescribe the image concisely, less than 20 words.\nASSISTANT:"
    )
    config = json.load(open(out / "_config.json"))
    assert config["question"] == vc.VECLIP_QUESTION and config["model"].endswith("tiny-llava")
    assert (
        config["sampling"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8}
        and config["prompt_hash"] == stats[0]["prompt_hash"]
    )
    before = {p: os.path.getmtime(out / p) for p in os.listdir(out) if p != "_config.json"}
    assert run(toy, out) == []  # finished shards are skipped
    assert before == {p: os.path.getmtime(out / p) for p in os.listdir(out) if p != "_config.json"}
    run(toy, out, "--overwrite")
    assert read_out(out) == records  # greedy decoding: the redone shards say the same
    assert all(os.path.getmtime(out / p) > t for p, t in before.items())


def test_prompt_goes_through_the_chat_template(toy):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(toy / "models/tiny-llava")
    assert vc.vlm_prompt(processor, "What is it?") == "USER: <image>\nWhat is it?\nASSISTANT:"
    tok = processor.tokenizer  # adds <s> itself: a template that writes one too must not double it
    with_bos = types.SimpleNamespace(
        chat_template="x", tokenizer=tok, apply_chat_template=lambda turn, **k: "<s>[INST] <image>\nQ [/INST]"
    )
    assert vc.vlm_prompt(with_bos, "Q") == "[INST] <image>\nQ [/INST]"
    bare = types.SimpleNamespace(chat_template=None, tokenizer=tok)
    assert vc.vlm_prompt(bare, "Q") == "USER: <image>\nQ\nASSISTANT:"


def photo(size=(64, 48)):
    img = Image.new("RGB", size, (200, 40, 40))
    img.paste((30, 60, 220), (0, 0, size[0] // 2, size[1]))  # left half blue: orientation shows
    return img


@pytest.mark.parametrize(
    "name,raw,expect",
    [
        ("zero bytes", b"", "image_empty"),
        ("not an image", b"this is text, not a picture", "image_corrupt"),
        ("truncated jpeg", encode(photo((256, 256)), "JPEG")[:700], "image_corrupt"),
        ("jpeg header only", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "image_corrupt"),
        (
            "postscript",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
            "image_corrupt",
        ),  # never Ghostscript
        ("bomb", png_claiming(30000, 30000), "image_too_large"),
    ],
)
def test_load_image_rejects_bad_bytes_with_a_reason(name, raw, expect):
    assert vc.load_image(raw, 1024) == (None, expect)


def test_load_image_decodes_what_the_web_serves():
    big, why = vc.load_image(encode(photo((6000, 4000)), "JPEG", quality=70), 1024)
    assert why is None and big.size == (1024, 683) and big.mode == "RGB"
    assert vc.load_image(encode(photo(), "WEBP"), 1024)[0].size == (64, 48)
    assert (
        vc.load_image(encode(Image.new("CMYK", (9, 9), (0, 255, 0, 0)), "JPEG"), 1024)[0].getpixel((4, 4))[1]
        < 60
    )
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    # transparent -> white, not black
    assert vc.load_image(encode(clear, "PNG"), 1024)[0].getpixel((3, 3)) == (
        255,
        255,
        255,
    )
    grey16 = Image.new("I;16", (8, 8), 32768)
    # not clipped to white
    assert 120 <= vc.load_image(encode(grey16, "PNG"), 1024)[0].getpixel((3, 3))[0] <= 135
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    upright = vc.load_image(encode(photo((64, 48)), "JPEG", exif=exif.tobytes()), 1024)[0]
    assert upright.size == (48, 64) and upright.getpixel((24, 4))[2] > 150  # the blue half is on top now
    assert vc.load_image(encode(photo((4000, 3)), "PNG"), 1024)[0].size == (1024, 1)


def gradient(size):
    """Every pixel different from its neighbours and from the pad colour, so a shifted paste shows."""
    img = Image.new("RGB", size)
    for x in range(size[0]):
        for y in range(size[1]):
            img.putpixel((x, y), (255 - 3 * x, 250 - 3 * y, 250))
    return img


def test_pad_to_square_centres_the_image_on_the_mean_colour():
    grey = vc.pad_color_of(vc.CLIP_MEAN)
    assert grey == (122, 116, 104)  # LLaVA-1.5's int(x * 255) of CLIP's mean
    wide = gradient((40, 20))
    square = vc.pad_to_square(wide, grey)
    assert square.size == (40, 40) and square.mode == "RGB"
    assert square.crop((0, 10, 40, 30)).tobytes() == wide.tobytes()  # the original, centred
    assert square.crop((0, 0, 40, 10)).getcolors() == [(400, grey)]  # the border: the mean colour only
    assert square.crop((0, 30, 40, 40)).getcolors() == [(400, grey)]
    tall = vc.pad_to_square(gradient((20, 40)), grey)
    assert tall.size == (40, 40) and tall.crop((10, 0, 30, 40)).tobytes() == gradient((20, 40)).tobytes()
    assert tall.crop((0, 0, 10, 40)).getcolors() == [(400, grey)] == tall.crop((30, 0, 40, 40)).getcolors()
    odd = vc.pad_to_square(gradient((40, 21)), grey)  # 19 rows to share: 9 above, 10 below
    assert odd.crop((0, 9, 40, 30)).tobytes() == gradient((40, 21)).tobytes()
    same = gradient((30, 30))
    assert vc.pad_to_square(same, grey) is same


def test_pad_colour_comes_from_the_model_image_processor(toy, capsys):
    from transformers import AutoProcessor

    assert vc.processor_mean(AutoProcessor.from_pretrained(toy / "models/tiny-llava")) == vc.CLIP_MEAN
    assert "note" not in capsys.readouterr().out
    own = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_mean=[0.5, 0.25, 1.0]))
    assert vc.pad_color_of(vc.processor_mean(own)) == (127, 63, 255)
    none = types.SimpleNamespace(image_processor=types.SimpleNamespace())
    assert vc.processor_mean(none) == vc.CLIP_MEAN and "no RGB image_mean" in capsys.readouterr().out


def test_load_image_pads_palette_transparent_and_grey_images():
    grey = (122, 116, 104)
    palette = gradient((40, 20)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    clear = Image.new("RGBA", (20, 40), (0, 0, 0, 0))
    for img in [palette, clear, Image.new("L", (40, 20), 30), Image.new("I;16", (20, 40), 32768)]:
        padded, why = vc.load_image(encode(img, "PNG"), 1024, grey)
        assert why is None and padded.mode == "RGB" and padded.size == (40, 40), img.mode
        assert padded.getpixel((0, 0)) == grey and padded.getpixel((39, 39)) == grey, img.mode
    centre = vc.load_image(encode(clear, "PNG"), 1024, grey)[0].getpixel((20, 20))
    assert centre == (255, 255, 255)  # transparency still goes white, the padding around it is grey
    assert vc.load_image(encode(palette, "PNG"), 1024)[0].size == (40, 20)  # no colour, no padding


def make_aspect_shard(path):
    """Wide, tall, palette, transparent, grey and square images: (key, size as stored)."""
    palette = gradient((30, 10)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    images = [
        (gradient((40, 20)), "png"),
        (gradient((16, 48)), "png"),
        (palette, "png"),
        (Image.new("RGBA", (10, 30), (0, 0, 0, 0)), "png"),
        (Image.new("L", (24, 12), 30), "png"),
        (photo((32, 32)), "jpg"),
    ]
    with tarfile.open(path, "w") as tar:
        for i, (img, ext) in enumerate(images):
            data = encode(img, "PNG" if ext == "png" else "JPEG")
            info = tarfile.TarInfo(f"{i:09d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [(f"{i:09d}", img.size) for i, (img, _) in enumerate(images)]


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_image_aspect_reaches_the_model_and_the_records(toy, tmp_path, monkeypatch, capsys, aspect):
    shards = tmp_path / "in"
    shards.mkdir()
    stored = make_aspect_shard(shards / "00000.tar")
    seen = []
    generate = vc.VisionEngine.generate

    def recording_generate(self, images, seeds):
        seen.extend(images)
        return generate(self, images, seeds)

    monkeypatch.setattr(vc.VisionEngine, "generate", recording_generate)
    out = tmp_path / "vec"
    model = str(toy / "models/tiny-llava")
    (stats,) = vc.main(
        [
            "--input",
            str(shards),
            "--out-dir",
            str(out),
            "--model",
            model,
            "--max-new-tokens",
            "4",
            "--image-aspect",
            aspect,
        ]
    )
    records = [json.loads(line) for line in open(out / "00000.jsonl")]
    assert [r["key"] for r in records] == [key for key, _ in stored]  # every key still gets its record
    assert all(r["status"] in {"ok", "empty"} for r in records)
    config = json.load(open(out / "_config.json"))
    assert config["image_aspect"] == stats["image_aspect"] == config["args"]["image_aspect"] == aspect
    if aspect == "pad":
        assert [im.size for im in seen] == [(max(size), max(size)) for _, size in stored]
        assert seen[0].getpixel((0, 0)) == (122, 116, 104) and seen[1].getpixel((0, 0)) == (122, 116, 104)
        assert stats["pad_color"] == [122, 116, 104]
    else:
        assert [im.size for im in seen] == [size for _, size in stored]
        assert stats["pad_color"] is None
    assert all(im.mode == "RGB" for im in seen) and stats["prompt_hash"] == config["prompt_hash"]
    capsys.readouterr()
    other = "crop" if aspect == "pad" else "pad"  # the shard is done: no model loads, the config is rewritten
    assert vc.main(["--input", str(shards), "--out-dir", str(out), "--image-aspect", other]) == []
    # the tag decides whether an interrupted shard's saved work may be reused: the aspect must change it
    assert json.load(open(out / "_config.json"))["prompt_hash"] != stats["prompt_hash"]
    assert "made with other settings" in capsys.readouterr().out


def make_bad_shard(path):
    good = encode(photo(), "JPEG")
    members = [
        ("000000000.jpg", good),
        ("000000000.txt", b"a red and blue picture"),
        ("000000001.jpg", encode(photo(), "JPEG")[:300]),  # truncated
        ("000000002.jpg", b""),  # zero bytes
        ("000000003.txt", b"a caption without an image"),
        ("000000004.json", b"{}"),
        ("000000004.mp4", b"\x00\x00\x00\x18ftypmp42"),  # no image member
        ("000000005.jpg", b"<html>404 not found</html>"),  # not an image
        ("000000006.png", encode(photo((1, 1)), "PNG")),
        ("000000007.webp", encode(photo((4000, 3)), "WEBP")),
        ("000000008.jpg", good),
        ("000000009.jpg", png_claiming(40000, 40000)),  # a PNG behind a .jpg name, and a bomb
        ("000000008.jpg", encode(photo((7, 9)), "JPEG")),  # a second copy of key 8
        ("000000010.jpg", good),  # its header gets corrupted below
        ("000000011.jpeg", encode(photo((300, 200)), "JPEG")),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(open(path, "rb").read())
    bad = raw.find(b"000000010.jpg")
    raw[bad : bad + 100] = b"\x00\x13" * 50
    open(path, "wb").write(bytes(raw))


def test_bad_images_recorded_as_failed_with_the_real_model(toy, tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()
    make_bad_shard(str(shards / "00000.tar"))
    (stats,) = vc.main(
        [
            "--input",
            str(shards),
            "--out-dir",
            str(tmp_path / "o"),
            "--model",
            str(toy / "models/tiny-llava"),
            "--max-new-tokens",
            "6",
            "--max-image-side",
            "512",
        ]
    )
    records = {r["key"]: r for r in map(json.loads, open(tmp_path / "o/00000.jsonl"))}
    assert sorted(records) == [f"{i:09d}" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11)]
    status = {k[-2:]: r["status"] for k, r in records.items()}
    assert {k for k, s in status.items() if s == "failed_image"} == {"01", "02", "05", "09"}
    assert {k for k, s in status.items() if s == "missing_image"} == {"03", "04"}
    # 1x1 and 4000x3 images too
    assert all(status[k] in {"ok", "empty"} for k in ("00", "06", "07", "08", "11"))
    assert all(records[k]["vec"] is None for k in records if records[k]["status"] != "ok")
    assert all(
        set(r)
        == ({"key", "vec", "status", "error"} if r["status"] == "failed_image" else {"key", "vec", "status"})
        for r in records.values()
    )
    assert (
        stats["counts"]["image_corrupt"] == 2
        and stats["counts"]["image_empty"] == 1
        and stats["counts"]["image_too_large"] == 1
    )
    assert [records[f"0000000{k}"]["error"] for k in ("01", "02", "05", "09")] == [
        "image_corrupt",
        "image_empty",
        "image_corrupt",
        "image_too_large",
    ]
    assert stats["counts"]["duplicate_key"] == 1
    assert (
        stats["failed_image"] == 4
        and stats["missing_image"] == 2
        and stats["failed"] == 6
        and stats["in"] == 11
    )


def test_a_model_failure_fails_only_its_image(tmp_path, monkeypatch):
    monkeypatch.setattr(vc, "VisionEngine", ScriptedVLM)
    shards = tmp_path / "in"
    shards.mkdir()
    sizes = [(20, 10)] * 5 + [(7, 7)] + [(30, 10)] * 10
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i, size in enumerate(sizes):
            data = encode(photo(size), "PNG")
            info = tarfile.TarInfo(f"{i:09d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ScriptedVLM.calls = []
    (stats,) = vc.main(["--input", str(shards), "--out-dir", str(tmp_path / "o")])
    records = [json.loads(x) for x in open(tmp_path / "o/00000.jsonl")]
    assert [r["status"] for r in records] == ["ok"] * 5 + ["failed_image"] + ["ok"] * 10
    assert records[0]["vec"].startswith("a 20 by 20 picture")  # --image-aspect pad (default) squares it first
    assert stats["counts"]["model_error"] == 1 and records[5]["error"] == "model_error"
    assert len(ScriptedVLM.calls) <= 1 + 2 * 4  # halving, not one call per image
    with tarfile.open(shards / "00001.tar", "w") as tar:  # every image fails: a broken setup, not bad samples
        for i in range(3):
            data = encode(photo((7, 7)), "PNG")
            info = tarfile.TarInfo(f"{i:09d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(RuntimeError, match="every image"):
        vc.main(["--input", str(shards / "00001.tar"), "--out-dir", str(tmp_path / "o")])
    assert not (tmp_path / "o/00001.stats.json").exists()


def test_split_and_chunking_do_not_change_the_output(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(vc, "VisionEngine", ScriptedVLM)
    vc.main(["--input", str(toy / "shards"), "--out-dir", str(tmp_path / "whole"), "--temperature", "0.8"])
    for shard_id in range(2):
        vc.main(
            [
                "--input",
                str(toy / "shards"),
                "--out-dir",
                str(tmp_path / "split"),
                "--temperature",
                "0.8",
                "--shard-id",
                str(shard_id),
                "--num-shards",
                "2",
                "--chunk-size",
                "5",
                "--decode-workers",
                "1",
            ]
        )
    whole = read_out(tmp_path / "whole")
    # a seed per key
    assert read_out(tmp_path / "split") == whole and len({r["vec"] for r in whole.values()}) == len(whole)


def test_vllm_engine_requests_follow_the_documented_api(toy, monkeypatch):
    made = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            made["llm"] = kw

        def generate(self, requests, params, use_tqdm=True):
            made["requests"], made["params"] = requests, params
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" caption {i}")])
                for i in range(len(requests))
            ]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    engine = vc.VisionEngine("vllm", str(toy / "models/tiny-llava"), "Describe it.", tensor_parallel_size=2)
    # each torchrun rank: its own engine
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3" and "RANK" not in os.environ
    assert made["llm"]["limit_mm_per_prompt"] == {"image": 1} and made["llm"]["tensor_parallel_size"] == 2
    assert made["llm"]["trust_remote_code"] is False
    images = [photo(), photo((32, 32))]
    assert engine.generate(images, [11, 12]) == [" caption 0", " caption 1"]
    assert made["requests"] == [
        {"prompt": "USER: <image>\nDescribe it.\nASSISTANT:", "multi_modal_data": {"image": im}}
        for im in images
    ]
    kws = [p.kw for p in made["params"]]
    assert [k["seed"] for k in kws] == [11, 12] and all(
        k["max_tokens"] == 48 and k["temperature"] == 0.0 for k in kws
    )


def test_kill_9_mid_shard_then_rerun_has_every_key_once(toy, tmp_path, capsys):
    out = tmp_path / "vec"
    args = [
        "--input",
        str(toy / "shards/00000.tar"),
        "--out-dir",
        str(out),
        "--model",
        str(toy / "models/tiny-llava"),
        "--chunk-size",
        "4",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "8",
    ]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "03_visual_concepts.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = out / "00000.tmp.partial"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not (out / "00000.stats.json").exists(), "the kill did not land mid-shard"
    # a torn last line is not saved work
    saved = [json.loads(line) for line in partial.read_text().split("\n")[1:-1]]
    vc.main(args)  # the same command again
    assert f"00000: resuming, {len(saved)} " in capsys.readouterr().out
    records = read_out(out)
    assert set(records) == {k for k in tar_keys(toy / "shards") if k[0] == "00000.jsonl"}
    assert all(r["status"] in STATUSES for r in records.values())
    assert all(records[("00000.jsonl", r["key"])] == r for r in saved)  # saved work kept, not redone
    assert not list(out.glob("*.tmp*")) and (out / "00000.stats.json").exists()


def test_help_without_vllm_or_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(REPO, "03_visual_concepts.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "--max-image-side" in result.stdout
    assert (
        "vllm" not in result.stderr
        and "torch" not in result.stderr.split()
        and "transformers" not in result.stderr
    )


class PixelEncoding(dict):
    """The processor's output: `.to(device, dtype=...)` leaves it as it is."""

    def to(self, device, dtype=None):
        return self


class WidthProcessor:
    """Stands in for the VLM's processor: each image becomes the one token "its width"; a token decodes to w<width>."""

    tokenizer = types.SimpleNamespace(pad_token_id=0)

    def __call__(self, images, text, return_tensors=None, padding=False):
        import torch

        assert len(text) == len(images) and padding
        return PixelEncoding(input_ids=torch.tensor([[im.size[0]] for im in images]))

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(f"w{v}" for v in row.tolist()) for row in rows]


class WidthVLM:
    """Answers each image with its width and records the images and settings of each call."""

    def __init__(self):
        self.calls = []

    def generate(self, input_ids, **kw):
        import torch

        self.calls.append({"widths": input_ids[:, 0].tolist(), **kw})
        return torch.cat([input_ids, input_ids], 1)


def hf_vision_engine(temperature, batch_size):
    """A transformers VisionEngine around WidthVLM (its __init__ would load a model: the fields it sets, set here)."""
    import torch

    engine = object.__new__(vc.VisionEngine)
    engine.kind, engine.model_id, engine.device, engine.dtype = "hf", "width", "cpu", torch.float32
    engine.temperature, engine.top_p, engine.max_new_tokens, engine.batch_size = (
        temperature,
        0.8,
        6,
        batch_size,
    )
    engine.processor, engine.model, engine.prompt = (
        WidthProcessor(),
        WidthVLM(),
        "USER: <image>\nq\nASSISTANT:",
    )
    return engine


def test_transformers_vision_engine_batches_in_order_and_seeds_each_batch(monkeypatch):
    """Images go out in their order in batches of --batch-size, each batch seeded from its images' seeds."""
    torch = pytest.importorskip("torch")
    seeded = []
    monkeypatch.setattr(torch, "manual_seed", seeded.append)
    engine = hf_vision_engine(temperature=0.5, batch_size=2)
    assert engine.generate([], []) == []
    images = [photo((w, 3)) for w in (5, 1, 4, 2, 3)]
    assert engine.generate(images, [50, 10, 40, 20, 30]) == ["w5", "w1", "w4", "w2", "w3"]
    calls = engine.model.calls
    assert [c["widths"] for c in calls] == [[5, 1], [4, 2], [3]]
    assert seeded == [hash((50, 10)) % 2**63, hash((40, 20)) % 2**63, hash((30,)) % 2**63]
    for c in calls:
        assert c["do_sample"] is True and c["temperature"] == 0.5 and c["top_p"] == 0.8
        assert c["max_new_tokens"] == 6 and c["pad_token_id"] == 0
    greedy = hf_vision_engine(temperature=0.0, batch_size=32)
    assert greedy.generate(images[:2], [1, 2]) == ["w5", "w1"]
    (call,) = greedy.model.calls
    assert call["do_sample"] is False and "temperature" not in call and seeded[-1] == hash((1, 2)) % 2**63


def test_failing_images_isolated_by_halving_and_each_reported_with_its_error(capsys):
    """Two images the model rejects among eight: the failed call is halved until each stands alone; each gets its
    own warning and error, in order; an image that did not decode and a key without one never reach the model."""
    from concurrent.futures import Future

    class Picky:
        calls = []

        def generate(self, images, seeds):
            Picky.calls.append([im.size[0] for im in images])
            bad = [im.size[0] for im in images if im.size[1] == 7]
            if bad:
                raise ValueError(f"rejects width {bad[0]}")
            return [f" seen {im.size[0]} seed {s} " for im, s in zip(images, seeds, strict=True)]

    def done(value):
        future = Future()
        future.set_result(value)
        return future

    items = [(f"k{w}", done((photo((w, 7 if w in (3, 6) else 5)), None))) for w in range(1, 9)]
    items.insert(2, ("undecoded", done((None, "image_corrupt"))))
    items.insert(5, ("no_image", None))
    args = types.SimpleNamespace(seed=4)
    records = vc.caption_chunk(Picky(), items, args, "00000")
    assert Picky.calls == [
        [1, 2, 3, 4, 5, 6, 7, 8],
        [1, 2, 3, 4],
        [1, 2],
        [3, 4],
        [3],
        [4],
        [5, 6, 7, 8],
        [5, 6],
        [5],
        [6],
        [7, 8],
    ]
    assert [r["key"] for r in records] == [key for key, _ in items]
    by_key = {r["key"]: r for r in records}
    assert by_key["undecoded"] == {
        "key": "undecoded",
        "vec": None,
        "status": "failed_image",
        "error": "image_corrupt",
    }
    assert by_key["no_image"] == {"key": "no_image", "vec": None, "status": "missing_image"}
    for w in (3, 6):
        assert by_key[f"k{w}"] == {
            "key": f"k{w}",
            "vec": None,
            "status": "failed_image",
            "error": "model_error",
        }
    assert by_key["k1"] == {
        "key": "k1",
        "vec": f"seen 1 seed {vc.sample_seed(4, '00000', 'k1')}",
        "status": "ok",
    }
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING 00000: the model failed on image k3: ValueError: rejects width 3",
        "WARNING 00000: the model failed on image k6: ValueError: rejects width 6",
    ]
    Picky.calls = []
    every = [(f"k{w}", done((photo((w, 7)), None))) for w in range(1, 4)]
    with pytest.raises(RuntimeError, match="every image of a chunk") as raised:
        vc.caption_chunk(Picky(), every, args, "00000")
    # the last error: the halving reached image 3 last
    assert str(raised.value.__cause__) == "rejects width 3"
