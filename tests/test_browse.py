"""09_browse: one self-contained page, every caption joined by key, filters and sorts; checked in headless Chromium."""

import json
import re
import shutil
import subprocess
from collections import Counter

import pytest
from conftest import stage, write_jsonl
from PIL import Image

br = stage("09_browse")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two toy shards of 30, 02-style rewrites with scores (one key left out), 04's fused, 03's VeCs."""
    root = tmp_path_factory.mktemp("browse")
    stage("00_toy_data").main(
        [
            "--out",
            str(root),
            "--num-shards",
            "2",
            "--samples-per-shard",
            "30",
            "--image-size",
            "48",
            "--skip-models",
            "--eval-per-class",
            "1",
            "--retrieval-images",
            "2",
            "--coco-images",
            "2",
        ]
    )
    for folder in ("rewrites", "fused", "vec"):
        (root / folder).mkdir()
    for name in ("00000", "00001"):
        keys = [k for k, m in br.iter_tar(str(root / f"shards/{name}.tar"), {"txt"}, Counter()) if "jpg" in m]
        rewrites, fused, vecs = [], [], []
        for i, key in enumerate(keys):
            if key.endswith("3"):
                continue  # no sidecar record for this key: its card shows the AltText alone
            failed = i % 4 == 0
            rewrites.append(
                {
                    "key": key,
                    "text": f"alt {key}",
                    "status": "fallback" if failed else "ok",
                    "rewrites": {"human": [f"alt {key}" if failed else f"a rewrite of {key}"]},
                    "scores": {"human": [round((i * 37 % 100) / 100, 2)]},
                }
            )
            fused.append({"key": key, "fused": f"fused {key}", "status": "ok", "scores": 0.5})
            vecs.append({"key": key, "vec": f"vec {key}", "status": "ok"})
        write_jsonl(str(root / f"rewrites/{name}.jsonl"), rewrites)
        write_jsonl(str(root / f"fused/{name}.jsonl"), fused)
        write_jsonl(str(root / f"vec/{name}.jsonl"), vecs)
    return root


def page_cards(path):
    text = open(path, encoding="utf-8").read()
    payload = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, flags=re.S).group(
        1
    )
    return json.loads(payload.replace("<\\/", "</"))


def run(data, out, *extra):
    return br.main(
        [
            "--input",
            str(data / "shards"),
            "--texts",
            str(data / "rewrites"),
            str(data / "fused"),
            "--vec-dir",
            str(data / "vec"),
            "--out",
            str(out),
            *extra,
        ]
    )


def test_page_holds_every_caption_joined_by_key(data, tmp_path):
    stats = run(data, tmp_path / "b.html", "--sample", "25", "--seed", "3")
    cards = page_cards(tmp_path / "b.html")
    assert stats["cards"] == len(cards) == 25 and stats["keys_with_image"] == 60
    assert len({c["key"] for c in cards}) == 25
    for card in cards:
        assert card["image"].startswith("data:image/jpeg;base64,")
        labels = [c["label"] for c in card["captions"]]
        if card["key"].endswith("3"):
            assert labels == []  # no record in any sidecar: nothing invented
            continue
        assert labels == ["VeC", "rewrites/human", "fused"]  # two --texts folders: each line names its own
        human = card["captions"][1]
        assert human["status"] in ("ok", "fallback") and (human["status"] == "fallback") == human[
            "text"
        ].startswith("alt ")
        assert card["worst"] == min(human["score"], 0.5)
    again = (
        page_cards(tmp_path / "b.html")
        if run(data, tmp_path / "b.html", "--sample", "25", "--seed", "3")
        else None
    )
    assert [c["key"] for c in again] == [c["key"] for c in cards]  # the draw is seeded
    other = (
        page_cards(tmp_path / "c.html")
        if run(data, tmp_path / "c.html", "--sample", "25", "--seed", "4")
        else None
    )
    assert {c["key"] for c in other} != {c["key"] for c in cards}


def test_same_sources_in_two_folders_are_told_apart_and_the_page_explains_itself(data, tmp_path):
    """02's rewrites and an EDA run both have a "human" source: each line names its folder. The AltText line
    has a label, and the page says what "fallback" means."""
    eda = tmp_path / "rewrites_eda"
    eda.mkdir()
    for name in ("00000", "00001"):
        records = [json.loads(x) for x in open(data / f"rewrites/{name}.jsonl")]
        for r in records:
            r["rewrites"] = {"human": [f"eda {r['key']}"]}
        write_jsonl(str(eda / f"{name}.jsonl"), records)
    br.main(
        [
            "--input",
            str(data / "shards"),
            "--texts",
            str(data / "rewrites"),
            str(eda),
            "--out",
            str(tmp_path / "b.html"),
            "--sample",
            "10",
        ]
    )
    cards = [c for c in page_cards(tmp_path / "b.html") if c["captions"]]
    assert cards and all(
        [c["label"] for c in card["captions"]] == ["rewrites/human", "rewrites_eda/human"] for card in cards
    )
    assert br.folder_labels(["a/x/rewrites", "b/x/rewrites", "c/fused"]) == {
        "a/x/rewrites": "a/x/rewrites",
        "b/x/rewrites": "b/x/rewrites",
        "c/fused": "fused",
    }
    page = open(tmp_path / "b.html", encoding="utf-8").read()
    assert '"AltText: "' in page and 'fallback: "02 found no rewrite that passed its checks' in page


def test_a_caption_cannot_break_out_of_the_page(data, tmp_path):
    cards = [
        {
            "key": "1",
            "shard": "s",
            "image": None,
            "alt": "</script><script>alert(1)</script>",
            "captions": [],
            "statuses": [],
            "worst": None,
        }
    ]
    text = br.render(cards, "<b>title</b>")
    assert "</script><script>alert" not in text and "<b>title</b>" not in text


def chromium(*args):
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium here (Debian: apt-get install chromium); .ci/run installs it when root",
)
def test_page_in_a_real_browser(data, tmp_path):
    run(data, tmp_path / "b.html", "--sample", "40")
    cards = page_cards(tmp_path / "b.html")
    dom = chromium("--dump-dom", f"file://{tmp_path / 'b.html'}")
    assert dom.count('class="card"') == 40 and "40 of 40 samples" in dom
    assert dom.count('<div class="alt"><b>AltText: </b>') == 40
    assert "</span> 02 found no rewrite that passed its checks" in dom  # the legend says what fallback means
    # a linked view: only fallback cards shown, worst-scored first
    dom = chromium(
        "--virtual-time-budget=2000", "--dump-dom", f"file://{tmp_path / 'b.html'}#status=fallback&sort=worst"
    )
    fallback = [c for c in cards if "fallback" in c["statuses"]]
    assert fallback and f"{len(fallback)} of 40 samples" in dom
    visible = re.findall(r'<div class="card"><img[^>]*><div><div class="key">[^<]*/ (\d+)</div>', dom)
    assert len(visible) == len(fallback)
    scores = {c["key"]: c["worst"] for c in fallback}
    assert [scores[k] for k in visible] == sorted(scores.values())  # worst first
    chromium(
        "--window-size=1200,900", f"--screenshot={tmp_path / 'shot.png'}", f"file://{tmp_path / 'b.html'}"
    )
    with Image.open(tmp_path / "shot.png") as shot:
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert shot.size == (1200, 900) and colours and len(colours) > 200  # text, thumbnails: not a blank page
