"""04_fuse with the vLLM engine for real (vLLM's CPU backend; runs/test.sh runs it in .venv-vllm): every key once,
the AltText cut to the engine's context, fallbacks, and the same fused captions whatever the shard split.
One engine for the module: it takes ~40 s to start on CPU. (03's vLLM path needs torchvision, which that venv
cannot have; tests/test_vec.py checks its requests against vLLM's API with a stand-in.)"""

import io
import json
import os
import tarfile
from collections import Counter

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from conftest import stage  # noqa: E402

fu = stage("04_fuse")
CONTEXT, NEW_TOKENS = 640, 24


@pytest.fixture(scope="module")
def engine(toy):
    engine = fu.TextEngine(
        "vllm",
        str(toy / "models/tiny-llama"),
        temperature=0.7,
        top_p=0.95,
        max_new_tokens=NEW_TOKENS,
        max_model_len=CONTEXT,
        enforce_eager=True,
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


def test_fuse_with_vllm_end_to_end_split_invariant_and_within_context(toy, engine, tmp_path, monkeypatch):
    seen = []
    real_generate = engine.generate

    def spy(prompts, seeds, n=1, stop=None):
        seen.extend(prompts)
        return real_generate(prompts, seeds, n, stop)

    monkeypatch.setattr(engine, "generate", spy)
    monkeypatch.setattr(fu, "TextEngine", lambda *a, **k: engine)  # the module's one real engine
    shards, vec_dir = tmp_path / "in", tmp_path / "vec"
    shards.mkdir()
    vec_dir.mkdir()
    keys = {}
    for shard in ("00000", "00001"):
        with (
            tarfile.open(toy / f"shards/{shard}.tar") as src,
            tarfile.open(shards / f"{shard}.tar", "w") as dst,
        ):
            for m in src:
                data = src.extractfile(m).read()
                if m.name == "000000003.txt":
                    data = (
                        "Acme Rocket Skates X200 in Paris " + "buy now " * 1300
                    ).encode()  # 10,000+ characters
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
        keys[shard] = [k for k, _ in fu.iter_tar(str(shards / f"{shard}.tar"), set(), Counter())]
        vecs = {
            k: None if i == 5 else f"a small picture of shape {i} on a plain background"
            for i, k in enumerate(keys[shard])
        }
        with open(vec_dir / f"{shard}.jsonl", "w") as f:
            f.writelines(json.dumps({"key": k, "vec": v}) + "\n" for k, v in vecs.items())
        (vec_dir / f"{shard}.stats.json").write_text(json.dumps({"shard": shard}))
    common = [
        "--engine",
        "vllm",
        "--input",
        str(shards),
        "--vec-dir",
        str(vec_dir),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--max-prompt-tokens",
        "100000",
    ]
    stats = fu.main(common + ["--out-dir", str(tmp_path / "whole")])
    whole = outputs(tmp_path / "whole")
    assert sorted(whole) == sorted(keys["00000"] + keys["00001"])
    assert all(
        r["status"] in {"ok", "truncated", "fallback_vec", "fallback_alt"} and r["fused"]
        for r in whole.values()
    )
    assert whole["000000005"]["status"] == "fallback_alt" and stats[0]["counts"]["vec_null"] == 1
    assert (
        whole["000000003"]["status"] in {"truncated", "fallback_vec"} and stats[0]["counts"]["truncated"] == 1
    )
    assert sum(s["in"] for s in stats) == len(whole) and stats[0]["engine"] == "vllm"
    tokenizer = engine.llm.get_tokenizer()
    long_prompt = next(p for p in seen if "Acme Rocket Skates" in p)
    # cut to the engine's context, so vLLM took it
    assert len(tokenizer(long_prompt)["input_ids"]) <= CONTEXT - NEW_TOKENS
    assert "Visual description: a small picture of shape 3 on a plain background\n" in long_prompt
    for shard_id in range(2):
        fu.main(
            common + ["--out-dir", str(tmp_path / "split"), "--shard-id", str(shard_id), "--num-shards", "2"]
        )
    assert outputs(tmp_path / "split") == whole  # a seed per key: the same captions whatever the split
