"""runs/real_table.py: paired bootstrap intervals with known answers, coverage under no effect, the seeds-only
fallback, and its JSON."""

import importlib.util
import json
import os

import numpy as np
import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("real_table", os.path.join(REPO, "runs/real_table.py"))
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)

KEY = "zeroshot/clipart/acc1"
BASE = "CLIP (AltText)"


def write_world(folder, outcomes, items=True):
    """06's two files for {method: {seed: [outcome per item]}} on the clip-art zero-shot column."""
    results, lines = [], []
    for method, seeds in outcomes.items():
        for seed, values in seeds.items():
            name = f"{method} (seed {seed})"
            weights = {"pretrained": f"/ckpt/{method}/{seed}/latest.pt", "checkpoint_mtime": 1}
            row = {"name": name, "task": "zeroshot", "dataset": "clipart", **weights}
            results.append({**row, "metrics": {"acc1": float(np.mean(values))}})
            lines.append({**row, "weights": weights, "item_order": "abc", "items": {"acc1": list(values)}})
    path = folder / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in results))
    if items:
        (folder / "results.items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def table(path, *extra):
    out = path.parent / "table.json"
    rt.main([str(path), "--json", str(out), *extra])
    return json.loads(out.read_text())


def test_a_constant_shift_gives_that_shift_and_a_zero_width_interval(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = {s: rng.uniform(0, 0.9, 200).tolist() for s in (0, 1, 2)}
    shifted = {s: [v + 0.1 for v in values] for s, values in base.items()}
    got = table(write_world(tmp_path, {BASE: base, "A": shifted}))
    d = got["differences"]["A"][KEY]
    assert d["basis"] == "seeds+items" and d["seeds"] == 3 and d["items"] == 200
    assert d["diff"] == pytest.approx(0.1) and d["lo"] == pytest.approx(0.1) and d["hi"] == pytest.approx(0.1)
    assert d["excludes_zero"] and d["se"] == pytest.approx(0, abs=1e-12)
    # means agree with the first table: the difference of the means
    assert got["per_seed"]["A"][KEY]["0"] - got["per_seed"][BASE][KEY]["0"] == pytest.approx(0.1)
    text = capsys.readouterr().out
    assert "**+10.0 [+10.0, +10.0]** ✓" in text and "| A | 1 |" not in text
    assert got["differences"]["A"]["retrieval/clipart/image_retrieval_recall@1"] is None  # not measured


def bernoulli_world(rng, effect, seeds=2, n=300):
    """Items of varied difficulty; every model's outcomes drawn independently per seed."""
    difficulty = rng.beta(2, 5, n)
    base = {s: (rng.random(n) < difficulty).astype(int).tolist() for s in range(seeds)}
    other = {
        s: (rng.random(n) < np.clip(difficulty + effect, 0, 1)).astype(int).tolist() for s in range(seeds)
    }
    return {BASE: base, "B": other}


def test_no_effect_intervals_cover_zero_about_95_percent(tmp_path):
    rng = np.random.default_rng(1)
    covered = 0
    for i in range(40):
        folder = tmp_path / str(i)
        folder.mkdir()
        results = write_world(folder, bernoulli_world(rng, 0.0))
        runs = rt.read_runs(rt.read_jsonl(results), rt.read_jsonl(folder / "results.items.jsonl"))
        d = rt.difference(runs, "B", BASE, "zeroshot", "clipart", "acc1", draws=2000, seed=i)
        assert d["basis"] == "seeds+items"
        covered += d["lo"] <= 0 <= d["hi"]
    assert covered >= 34, covered  # >= 85% of 40 for a 95% interval


def test_a_small_real_effect_on_many_items_is_seen_and_exceeds_the_detectable_one(tmp_path):
    got = table(write_world(tmp_path, bernoulli_world(np.random.default_rng(2), 0.03, n=8000)))
    d = got["differences"]["B"][KEY]
    assert d["excludes_zero"] and d["lo"] > 0 and d["lo"] < 0.03 < d["hi"]
    assert got["detectable"][KEY] == pytest.approx(2.80 * d["se"]) and got["detectable"][KEY] < 0.03


def test_without_items_the_seeds_alone_and_the_output_says_so(tmp_path, capsys):
    rng = np.random.default_rng(3)
    path = write_world(tmp_path, bernoulli_world(rng, 0.0), items=False)
    got = table(path)
    d = got["differences"]["B"][KEY]
    assert d["basis"] == "seeds" and d["items"] is None and got["items"] is None
    assert "No per-item outcomes" in capsys.readouterr().out
    # items of other weights (a retrained checkpoint) are not used either
    write_world(tmp_path, bernoulli_world(rng, 0.0))
    lines = [json.loads(line) for line in open(tmp_path / "results.items.jsonl")]
    lines[0]["weights"]["checkpoint_mtime"] = 2
    (tmp_path / "results.items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    d = table(path)["differences"]["B"][KEY]
    assert d["basis"] == "seeds" and d["why_seeds_only"] == "no items"
    assert "† Intervals over the seeds only (no items" in capsys.readouterr().out


def test_pairing_by_seed_and_the_newest_row(tmp_path):
    # the baseline has seeds 0, 1; B has 1, 2: only seed 1 pairs; a re-measured row replaces the old one
    world = {BASE: {0: [0, 0, 0, 0], 1: [0, 1, 0, 0]}, "B": {1: [1, 1, 0, 0], 2: [1, 1, 1, 1]}}
    path = write_world(tmp_path, world)
    with open(path, "a") as f:
        f.write(
            json.dumps(
                {"name": "B (seed 7)", "task": "zeroshot", "dataset": "clipart", "metrics": {"acc1": 0.1}}
            )
        )
        f.write(
            "\n"
            + json.dumps(
                {"name": "B (seed 7)", "task": "zeroshot", "dataset": "clipart", "metrics": {"acc1": 0.3}}
            )
        )
    got = table(path)
    d = got["differences"]["B"][KEY]
    assert d["seeds"] == 1 and d["diff"] == pytest.approx(0.25) and d["basis"] == "seeds+items"
    assert got["per_seed"]["B"][KEY] == {"1": 0.5, "2": 1.0, "7": 0.3}
