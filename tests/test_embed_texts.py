"""08_embed_texts: every text of every key cached exactly once, equal to the live tower; kill -9 + re-run completes."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import REPO, stage

emb = stage("08_embed_texts")


@pytest.fixture(scope="module")
def sidecars(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("side")
    stage("02_rewrite").main(["--engine", "eda", "--input", str(toy / "shards"), "--out-dir", str(root / "rw"), "--n", "2"])
    (root / "fu").mkdir()
    for shard in ("00000", "00001"):
        recs = [json.loads(line) for line in open(root / "rw" / f"{shard}.jsonl")]
        with open(root / "fu" / f"{shard}.jsonl", "w") as f:
            for i, r in enumerate(recs[:-1]):  # the last key has no fused caption
                f.write(json.dumps({"key": r["key"], "fused": r["text"] if i % 3 == 0 else f"fused caption {i}", "status": "ok"}) + "\n")
    return root


def test_every_text_cached_once_and_equal_to_live_tower(toy, sidecars, tmp_path):
    out = tmp_path / "cache"
    stats = emb.main(["--input", str(toy / "shards"), "--texts", str(sidecars / "rw"), str(sidecars / "fu"), "--model", str(toy / "models/minilm"), "--out-dir", str(out)])
    assert [s["shard"] for s in stats] == ["00000", "00001"]
    model, tok, settings = emb.load_text_tower(str(toy / "models/minilm"), "cpu")
    for shard in ("00000", "00001"):
        records = [json.loads(line) for line in open(out / f"{shard}.jsonl")]
        matrix = np.load(out / f"{shard}.emb.npy")
        assert matrix.dtype == np.float16 and matrix.shape[0] == sum(len(r["texts"]) for r in records)
        alt = {k: m["txt"].decode() for k, m in emb.iter_tar(str(toy / f"shards/{shard}.tar"), {"txt"}, Counter())}
        rw = {r["key"]: r for r in map(json.loads, open(sidecars / "rw" / f"{shard}.jsonl"))}
        fu = {r["key"]: r["fused"] for r in map(json.loads, open(sidecars / "fu" / f"{shard}.jsonl"))}
        assert [r["key"] for r in records] == list(rw)
        row = 0
        for r in records:
            wanted = [alt[r["key"]], rw[r["key"]]["text"], *rw[r["key"]]["rewrites"]["eda"], *([fu[r["key"]]] if r["key"] in fu else [])]
            wanted = [" ".join(t.split()) for t in wanted if t.strip()]
            assert r["texts"] == list(dict.fromkeys(wanted)) and (not alt[r["key"]].strip() or r["texts"][0] == " ".join(alt[r["key"]].split()))
            assert r["row"] == row
            row += len(r["texts"])
        some = records[3]
        with torch.no_grad():
            live = emb.tower_encode(model, tok, some["texts"], settings["max_length"], "cpu").numpy()
        cached = matrix[some["row"]:some["row"] + len(some["texts"])].astype(np.float32)
        assert np.allclose(cached, live, atol=2e-3)


def test_kill_9_then_rerun_completes(toy, sidecars, tmp_path):
    out = tmp_path / "cache"
    cmd = [sys.executable, os.path.join(REPO, "08_embed_texts.py"), "--input", "--texts", str(sidecars / "rw"), "--model",
           str(toy / "models/minilm"), "--out-dir", str(out), "--batch-size", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "00000.stats.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "00001.stats.json").exists(), "the kill came too late to interrupt anything"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 already done" in result.stdout
    for shard in ("00000", "00001"):
        keys = [json.loads(line)["key"] for line in open(out / f"{shard}.jsonl")]
        assert len(keys) == len(set(keys)) == 24
    assert not list(out.glob("*.tmp*"))
    with pytest.raises(SystemExit, match="no .tar or .jsonl shards"):  # a wrong --input must not drop the AltTexts silently
        emb.main(["--input", str(tmp_path / "nowhere"), "--texts", str(sidecars / "rw"), "--out-dir", str(tmp_path / "c2")])


def test_decoder_tower_embedding_does_not_depend_on_its_batch(toy, tmp_path):
    """A causal LLM with absolute positions (GPT-2 shaped, random) as tower: padding goes right, so a text embeds the same
    alone or beside a longer one (left padding would shift its positions, and a cache would disagree with the live tower)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2Model
    tok = AutoTokenizer.from_pretrained(str(toy / "models/tiny-llama"))
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128)).save_pretrained(tmp_path / "gpt")
    tok.save_pretrained(tmp_path / "gpt")
    model, tok, settings = emb.load_text_tower(str(tmp_path / "gpt"), "cpu")
    with torch.no_grad():
        alone = emb.tower_encode(model, tok, ["a red circle"], settings["max_length"], "cpu")
        batched = emb.tower_encode(model, tok, ["a red circle", "three small green squares on a striped yellow background"],
                                   settings["max_length"], "cpu")
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
