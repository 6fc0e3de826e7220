"""02 with the real SmolLM2-135M-Instruct on vLLM's CPU backend (run by runs/test.sh in .venv-vllm), on the real
clip-art alt texts of tests/data/openclipart_sample.jsonl: what runs/real.sh does, at test size."""

import json
import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from conftest import REPO, stage  # noqa: E402

rw = stage("02_rewrite")
mp = stage("01_collect_meta_pairs")
SAMPLE = [json.loads(line) for line in open(os.path.join(REPO, "tests", "data", "openclipart_sample.jsonl"))]


@pytest.fixture(scope="module")
def engine(smollm2):
    engine = rw.TextEngine("vllm", str(smollm2), max_model_len=1024, dtype="bfloat16", enforce_eager=True)
    yield engine
    engine.llm.llm_engine.engine_core.shutdown()  # before pytest closes the streams vLLM logs to


def test_rewrite_real_captions_with_vllm(engine, smollm2, tmp_path, monkeypatch):
    monkeypatch.setattr(rw, "TextEngine", lambda *a, **k: engine)  # the module's one real engine
    rows = SAMPLE[:32]
    with open(tmp_path / "clipart.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"key": f"{i:09d}", "text": r["text"]}) + "\n")
    mp.main(["--sources", "human", "--out", str(tmp_path / "meta.jsonl")])
    common = [
        "--engine",
        "vllm",
        "--model",
        str(smollm2),
        "--input",
        str(tmp_path / "clipart.jsonl"),
        "--meta-pairs",
        str(tmp_path / "meta.jsonl"),
    ]
    (stats,) = rw.main(common + ["--out-dir", str(tmp_path / "a")])
    records = [json.loads(line) for line in open(tmp_path / "a" / "clipart.jsonl", encoding="utf-8")]
    assert len(records) == len(rows) and stats["engine"] == "vllm"
    assert stats["ok"] >= 0.8 * len(rows), stats
    for r in records:
        (text,) = r["rewrites"]["human"]
        assert text and "\n" not in text and not rw.looping(text) and len(text.split()) <= 60
    print(f"vLLM SmolLM2 rewrites: {stats['ok']}/{len(rows)} ok, {stats['counts']}")
    # a seed per request: the same draws again. Not always the same bytes: in bf16 the logits depend on which requests
    # share a batch (vLLM's engine core starts stepping while requests still arrive) and on the prefix cache, and a
    # near-tie can flip a sampled token; a whole-run mismatch would mean the seeds do not reach the sampler
    engine.llm.reset_prefix_cache()
    rw.main(common + ["--out-dir", str(tmp_path / "b")])
    first = open(tmp_path / "a" / "clipart.jsonl").read().splitlines()
    again = open(tmp_path / "b" / "clipart.jsonl").read().splitlines()
    assert len(again) == len(first)
    same = sum(a == b for a, b in zip(first, again, strict=True))
    assert len(again) == len(first) and same >= 0.75 * len(first), f"{same} of {len(first)} rewrites repeated"
