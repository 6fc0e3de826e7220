"""The vLLM engine for real (vLLM's CPU backend here, run by runs/test.sh in .venv-vllm): 01's llm source
and 02 end to end, and reproducibility of per-request seeds across shard splits. One engine per module:
it takes ~40 s to start on CPU."""

import json
import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from conftest import stage  # noqa: E402

rw = stage("02_rewrite")
mp = stage("01_collect_meta_pairs")


@pytest.fixture(scope="module")
def engine(toy):
    engine = rw.TextEngine(
        "vllm", str(toy / "models/tiny-llama"), max_new_tokens=32, max_model_len=1024, enforce_eager=True
    )
    yield engine
    engine.llm.llm_engine.engine_core.shutdown()  # before pytest closes the streams vLLM logs to


def outputs(out_dir):
    got = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".jsonl"):
            for line in open(out_dir / name, encoding="utf-8"):
                r = json.loads(line)
                assert r["key"] not in got
                got[r["key"]] = r
    return got


def test_engine_seeds(engine):
    prompts = ["red circle => a red circle\nblue star =>"] * 2
    a = engine.generate(prompts, [1, 2], n=2, stop=["\n"])
    b = engine.generate(prompts, [1, 2], n=2, stop=["\n"])
    assert a == b and len(a) == 2 and all(len(x) == 2 for x in a)
    assert a[0] != a[1]  # a seed per request, not one stream for all


def test_rewrite_with_vllm_end_to_end_and_split_invariant(toy, meta_pairs, engine, tmp_path, monkeypatch):
    monkeypatch.setattr(rw, "TextEngine", lambda *a, **k: engine)  # the module's one real engine
    common = ["--engine", "vllm", "--input", str(toy / "shards"), "--meta-pairs", str(meta_pairs), "--n", "2"]
    stats = rw.main(common + ["--out-dir", str(tmp_path / "whole")])
    whole = outputs(tmp_path / "whole")
    keys = {k for f in (toy / "shards").glob("*.tar") for k, _ in rw.iter_tar(str(f), set(), rw.Counter())}
    assert set(whole) == keys
    assert all(
        set(r["rewrites"]) == {"human", "coco"} and all(len(v) == 2 for v in r["rewrites"].values())
        for r in whole.values()
    )
    assert sum(s["in"] for s in stats) == len(keys) and stats[0]["engine"] == "vllm"
    for shard_id in range(2):
        rw.main(
            common + ["--out-dir", str(tmp_path / "split"), "--shard-id", str(shard_id), "--num-shards", "2"]
        )
    assert outputs(tmp_path / "split") == whole  # same rewrites whatever the split


def test_llm_meta_pairs_with_vllm(toy, engine, tmp_path, monkeypatch):
    monkeypatch.setattr(mp, "TextEngine", lambda *a, **k: engine)
    pairs = mp.main(
        [
            "--sources",
            "llm",
            "--engine",
            "vllm",
            "--shards",
            str(toy / "shards"),
            "--out",
            str(tmp_path / "m.jsonl"),
        ]
    )
    assert 0 < len(pairs) <= 16 and all(p["source"] == "llm" and p["output"] for p in pairs)
