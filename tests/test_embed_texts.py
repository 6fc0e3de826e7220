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
    stage("02_rewrite").main(
        ["--engine", "eda", "--input", str(toy / "shards"), "--out-dir", str(root / "rw"), "--n", "2"]
    )
    (root / "fu").mkdir()
    for shard in ("00000", "00001"):
        recs = [json.loads(line) for line in open(root / "rw" / f"{shard}.jsonl")]
        with open(root / "fu" / f"{shard}.jsonl", "w") as f:
            for i, r in enumerate(recs[:-1]):  # the last key has no fused caption
                f.write(
                    json.dumps(
                        {
                            "key": r["key"],
                            "fused": r["text"] if i % 3 == 0 else f"fused caption {i}",
                            "status": "ok",
                        }
                    )
                    + "\n"
                )
    return root


def test_every_text_cached_once_and_equal_to_live_tower(toy, sidecars, tmp_path):
    out = tmp_path / "cache"
    stats = emb.main(
        [
            "--input",
            str(toy / "shards"),
            "--texts",
            str(sidecars / "rw"),
            str(sidecars / "fu"),
            "--model",
            str(toy / "models/minilm"),
            "--out-dir",
            str(out),
        ]
    )
    assert [s["shard"] for s in stats] == ["00000", "00001"]
    model, tok, settings = emb.load_text_tower(str(toy / "models/minilm"), "cpu")
    for shard in ("00000", "00001"):
        records = [json.loads(line) for line in open(out / f"{shard}.jsonl")]
        matrix = np.load(out / f"{shard}.emb.npy")
        assert matrix.dtype == np.float16 and matrix.shape[0] == sum(len(r["texts"]) for r in records)
        alt = {
            k: m["txt"].decode()
            for k, m in emb.iter_tar(str(toy / f"shards/{shard}.tar"), {"txt"}, Counter())
        }
        rw = {r["key"]: r for r in map(json.loads, open(sidecars / "rw" / f"{shard}.jsonl"))}
        fu = {r["key"]: r["fused"] for r in map(json.loads, open(sidecars / "fu" / f"{shard}.jsonl"))}
        assert [r["key"] for r in records] == list(rw)
        row = 0
        for r in records:
            wanted = [
                alt[r["key"]],
                rw[r["key"]]["text"],
                *rw[r["key"]]["rewrites"]["eda"],
                *([fu[r["key"]]] if r["key"] in fu else []),
            ]
            wanted = [" ".join(t.split()) for t in wanted if t.strip()]
            assert r["texts"] == list(dict.fromkeys(wanted)) and (
                not alt[r["key"]].strip() or r["texts"][0] == " ".join(alt[r["key"]].split())
            )
            assert r["row"] == row
            row += len(r["texts"])
        some = records[3]
        with torch.no_grad():
            live = emb.tower_encode(model, tok, some["texts"], settings, "cpu").numpy()
        cached = matrix[some["row"] : some["row"] + len(some["texts"])].astype(np.float32)
        assert np.allclose(cached, live, atol=2e-3)


def test_kill_9_then_rerun_completes(toy, sidecars, tmp_path):
    out = tmp_path / "cache"
    cmd = [
        sys.executable,
        os.path.join(REPO, "08_embed_texts.py"),
        "--input",
        "--texts",
        str(sidecars / "rw"),
        "--model",
        str(toy / "models/minilm"),
        "--out-dir",
        str(out),
        "--batch-size",
        "4",
    ]
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
    # a wrong --input must not drop the AltTexts silently
    with pytest.raises(SystemExit, match="no .tar or .jsonl shards"):
        emb.main(
            [
                "--input",
                str(tmp_path / "nowhere"),
                "--texts",
                str(sidecars / "rw"),
                "--out-dir",
                str(tmp_path / "c2"),
            ]
        )


def test_decoder_tower_embedding_does_not_depend_on_its_batch(toy, tmp_path):
    """A causal LLM with absolute positions (GPT-2 shaped, random) as tower: padding goes right, so a text embeds the same
    alone or beside a longer one (left padding would shift its positions, and a cache would disagree with the live tower)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    tok = AutoTokenizer.from_pretrained(str(toy / "models/tiny-llama"))
    torch.manual_seed(0)
    GPT2Model(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128)
    ).save_pretrained(tmp_path / "gpt")
    tok.save_pretrained(tmp_path / "gpt")
    model, tok, settings = emb.load_text_tower(str(tmp_path / "gpt"), "cpu")
    with torch.no_grad():
        alone = emb.tower_encode(model, tok, ["a red circle"], settings, "cpu")
        batched = emb.tower_encode(
            model,
            tok,
            ["a red circle", "three small green squares on a striped yellow background"],
            settings,
            "cpu",
        )
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama3(toy, tmp_path_factory):
    """A tiny random Llama with the toy tokenizer, saved as a tower folder; the toy tokenizer has no Llama-3 header
    tokens, so the template's header is ordinary text here: what matters is that it is kept out of the pooling."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    path = tmp_path_factory.mktemp("llama") / "tower"
    tok = AutoTokenizer.from_pretrained(str(toy / "models/tiny-llama"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    LlamaModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_bidirectional_attention_sees_later_tokens_and_pools_only_the_text(tiny_llama3):
    model, tok, recipe = emb.load_text_tower(str(tiny_llama3), "cpu")
    bi = {
        **recipe,
        "attention": "bidirectional",
        "pooling": "mean",
        "padding_side": "left",
        "max_length": 512,
    }
    for attention, sees_later in (("bidirectional", True), ("causal", False)):
        r = {**bi, "attention": attention, "pooling": "last", "padding_side": "right"}
        batch, _ = emb.tower_batch(tok, ["a red circle on grey"], r)
        first_state = []
        # same first token, a different last one
        for text in (
            "a red circle on grey",
            "a red circle on blue",
        ):
            with torch.no_grad():
                b, _ = emb.tower_batch(tok, [text], r)
                inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                if attention == "bidirectional":
                    m = b["attention_mask"]
                    inputs["attention_mask"] = torch.zeros(1, 1, m.shape[1], m.shape[1])
                first_state.append(model(**inputs).last_hidden_state[0, 1])
        assert (not torch.allclose(first_state[0], first_state[1], atol=1e-6)) == sees_later, attention
    r = {**bi, "template": emb.TOWER_TEMPLATES["llama3"], "pool_tokens": "text"}
    batch, pool = emb.tower_batch(
        tok, ["a red circle", "three small green squares on a striped yellow background"], r
    )
    for i, text in enumerate(["a red circle", "three small green squares on a striped yellow background"]):
        n = len(tok(text + "<|eot_id|>", add_special_tokens=False)["input_ids"])
        assert pool[i].sum() == n and pool[i, -n:].all()  # left padded: the text and the closing tag, last
        assert batch["attention_mask"][i].sum() > n  # BOS and the header are attended to but not pooled
    with torch.no_grad():  # left padding with its own positions: a text embeds the same alone or in a batch
        alone = emb.tower_encode(model, tok, ["a red circle"], r, "cpu")
        batched = emb.tower_encode(
            model, tok, ["a red circle", "three small green squares on a striped yellow background"], r, "cpu"
        )
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


def test_live_tower_cache_and_eval_embed_alike_with_a_bidirectional_recipe(toy, tiny_llama3, tmp_path):
    """07's recipe in llm2clip_text.json is read by 08 (cache), 05 (live tower) and 06: one embedding per text."""
    recipe = {
        **emb.TOWER_RECIPE,
        "attention": "bidirectional",
        "padding_side": "left",
        "max_length": 512,
        "template": emb.TOWER_TEMPLATES["llama3"],
        "pool_tokens": "text",
    }
    (tiny_llama3 / "llm2clip_text.json").write_text(json.dumps(recipe))
    try:
        out = tmp_path / "cache"
        emb.main(
            [
                "--input",
                str(toy / "shards/00000.tar"),
                "--texts",
                "--model",
                str(tiny_llama3),
                "--out-dir",
                str(out),
                "--store-dtype",
                "float32",
            ]
        )
        assert json.load(open(out / "_config.json"))["recipe"] == recipe
        records = [json.loads(line) for line in open(out / "00000.jsonl")]
        texts = [t for r in records[:6] for t in r["texts"]]
        cached = np.load(out / "00000.emb.npy")[: len(texts)]
        tr, ev = stage("05_train"), stage("06_eval")
        args = tr.parse_args(["--text-tower", str(tiny_llama3)])
        encode, record, _ = tr.frozen_tower(args, torch.device("cpu"), None)
        assert all(record[k] == v for k, v in recipe.items())
        tower, tokenizer, settings = ev.load_text_tower(str(tiny_llama3), "cpu")
        model = ev.TextTowerCLIP(None, tower, tokenizer, settings, None, "cpu")
        with torch.no_grad():
            live, evaluated = encode(texts).numpy(), model.encode_text(texts).numpy()
        assert np.allclose(cached, live, atol=1e-5) and np.allclose(evaluated, live, atol=1e-5)
        # the cache refuses another recipe, and 05 another tower
        with pytest.raises(SystemExit, match="mix"):
            emb.main(
                [
                    "--input",
                    str(toy / "shards/00000.tar"),
                    "--texts",
                    "--model",
                    str(tiny_llama3),
                    "--out-dir",
                    str(out),
                    "--pooling",
                    "last",
                ]
            )
        with pytest.raises(SystemExit, match="cannot be mixed"):
            tr.frozen_tower(
                tr.parse_args(["--text-cache", str(out), "--text-tower", str(toy / "models/minilm")]),
                torch.device("cpu"),
                None,
            )
    finally:
        os.remove(tiny_llama3 / "llm2clip_text.json")
