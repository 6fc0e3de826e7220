import importlib
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def stage(name):
    """A stage script imported in-process, as users' tests would."""
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """Small toy data and tiny models from 00, built once per test session."""
    out = tmp_path_factory.mktemp("toy")
    stage("00_toy_data").main(["--out", str(out), "--num-shards", "2", "--samples-per-shard", "24",
                               "--eval-per-class", "2", "--retrieval-images", "8", "--coco-images", "20", "--lm-steps", "40"])
    return out


@pytest.fixture(scope="session")
def meta_pairs(toy):
    path = toy / "meta_pairs.jsonl"
    stage("01_collect_meta_pairs").main(["--sources", "human", "coco", "--out", str(path),
                                         "--coco-captions", str(toy / "coco/annotations/captions_train2017.json")])
    return path
