"""01_collect_meta_pairs: every source, cleaning, counts, provenance."""

import io
import json
import os
import tarfile

import pytest
from conftest import stage

mp = stage("01_collect_meta_pairs")


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_human_pairs_are_ours_and_enough():
    assert len(mp.HUMAN_PAIRS) >= 16
    assert len({a for a, _ in mp.HUMAN_PAIRS}) == len(mp.HUMAN_PAIRS)
    assert all(a.strip() and b.strip() and mp.norm(a) != mp.norm(b) for a, b in mp.HUMAN_PAIRS)


def test_coco_pairs_are_two_captions_of_one_image(toy, tmp_path):
    coco = json.load(open(toy / "coco/annotations/captions_train2017.json"))
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], set()).add(" ".join(a["caption"].split()))
    out = tmp_path / "pairs.jsonl"
    mp.main(
        [
            "--sources",
            "coco",
            "--out",
            str(out),
            "--per-source",
            "1000",
            "--coco-captions",
            str(toy / "coco/annotations/captions_train2017.json"),
        ]
    )
    pairs = read(out)
    assert len(pairs) == len(by_image)  # one record per image, every image used
    images = []
    for p in pairs:
        assert p["source"] == "coco" and p["input"] != p["output"]
        # the whole list is one image's captions, each once, with the record's own pair among them
        (image,) = [i for i, caps in by_image.items() if set(p["captions"]) <= caps]
        images.append(image)
        assert len(p["captions"]) >= 2 and len({mp.norm(c) for c in p["captions"]}) == len(p["captions"])
        assert set(p["captions"]) == by_image[image]  # the toy's 5 captions per image are all distinct
        assert p["input"] in p["captions"] and p["output"] in p["captions"]
    assert len(set(images)) == len(images)


def test_coco_caption_over_max_words_left_out_of_its_list(tmp_path):
    long = "a very long caption " * 20
    captions = [
        (1, "a red bus on a street"),
        (1, "A red  bus on a street."),  # the same after normalising: kept once
        (1, "a bus parked by the road"),
        (1, long),
        (2, "a dog"),
        (2, long),
    ]
    coco = {"annotations": [{"image_id": i, "caption": c} for i, c in captions]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    out = tmp_path / "pairs.jsonl"
    mp.main(["--sources", "coco", "--out", str(out), "--coco-captions", str(tmp_path / "coco.json")])
    (record,) = read(out)  # image 2 keeps one caption: no pair can be drawn from it
    assert record["captions"] == ["A red bus on a street.", "a bus parked by the road"]
    assert {record["input"], record["output"]} == set(record["captions"])
    stats = json.loads((tmp_path / "pairs.stats.json").read_text())
    assert stats["dropped"]["coco"] == {"caption_too_long": 2}


def test_all_sources_with_llm_and_user_file(toy, tmp_path):
    user = tmp_path / "mine.jsonl"
    user.write_text(
        "\n".join(
            [
                json.dumps({"input": "a cat", "output": "a small grey cat sleeping"}),
                json.dumps({"input": "a cat", "output": "a small grey cat sleeping"}),  # duplicate
                json.dumps({"input": "same text", "output": "Same text!"}),  # identical after normalising
                json.dumps({"input": "", "output": "nothing in"}),
                json.dumps({"source": "web", "input": "two\ndogs", "output": "two dogs  playing\tin a park"}),
                json.dumps({"input": "long", "output": "word " * 80}),
                "{broken json",
            ]
        )
        + "\n"
    )
    out = tmp_path / "meta_pairs.jsonl"
    pairs = mp.main(
        [
            "--sources",
            "human",
            "coco",
            "llm",
            "file",
            "--out",
            str(out),
            "--pairs-file",
            str(user),
            "--coco-captions",
            str(toy / "coco/annotations/captions_train2017.json"),
            "--shards",
            str(toy / "shards"),
            "--llm-model",
            str(toy / "models/tiny-llama"),
            "--max-new-tokens",
            "24",
        ]
    )
    assert read(out) == pairs
    counts = {s: sum(p["source"] == s for p in pairs) for s in ("human", "coco", "llm", "file", "web")}
    assert counts["human"] == 16 and counts["coco"] == 16 and counts["file"] == 1 and counts["web"] == 1
    assert 0 < counts["llm"] <= 16
    assert {"source": "web", "input": "two dogs", "output": "two dogs playing in a park"} in pairs
    assert all("\n" not in p["input"] + p["output"] and p["input"] and p["output"] for p in pairs)
    stats = json.load(open(tmp_path / "meta_pairs.stats.json"))
    assert stats["per_source"] == {k: v for k, v in counts.items() if v}
    assert stats["dropped"]["file"] == {"duplicate": 1, "identical": 1, "empty": 1, "too_long": 1}
    assert stats["args"]["llm_model"].endswith("tiny-llama") and len(stats["script_sha256"]) == 64
    llm_inputs = [p["input"] for p in pairs if p["source"] == "llm"]
    alts = {
        " ".join(m["txt"].decode().split())
        for f in sorted((toy / "shards").glob("*.tar"))
        for _, m in mp.iter_tar(str(f), {"txt"}, mp.Counter())
    }
    assert set(llm_inputs) <= alts  # the llm source rewrites the user's own alt texts
    usable = sum(mp.worth_rewriting(a) for a in alts)  # the toy has fewer than the 1024 wanted: all read
    assert stats["read"] == {"llm": {"shards": 2, "shards_read": 2, "samples_read": 48, "candidates": usable}}


def write_alt_text_shards(folder, n_shards, per_shard):
    folder.mkdir()
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                for ext, data in (
                    ("jpg", b"\xff\xd8 not an image"),
                    ("txt", f"a red kite number {i} of set {s}".encode()),
                ):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_llm_source_reads_a_few_random_shards_only(tmp_path, monkeypatch):
    """Drawing 64 alt texts from 60 shards opens 8 of them, reads 128 samples of each, and draws the same texts for
    the same seed; another seed visits other shards."""
    write_alt_text_shards(tmp_path / "shards", 60, 150)
    opened, iter_tar = [], mp.iter_tar

    def counting_iter_tar(path, want, counts):
        opened.append(path)
        return iter_tar(path, want, counts)

    monkeypatch.setattr(mp, "iter_tar", counting_iter_tar)
    draws = []
    for seed in (0, 0, 1):
        read = mp.Counter()
        args = mp.parse_args(["--shards", str(tmp_path / "shards"), "--seed", str(seed)])
        draws.append(mp.sample_alt_texts(args, 64, read))
        assert read == {"shards": 60, "shards_read": 8, "samples_read": 8 * 128, "candidates": 8 * 128}
    assert len(opened) == 24 and opened[:8] == opened[8:16] != opened[16:]
    assert draws[0] == draws[1] != draws[2] and len(set(draws[0])) == 64
    shards = {text.split()[-1] for text in draws[0]}
    assert len(shards) > 2 and {f"{int(s):05d}" for s in shards} <= {
        os.path.basename(p)[:5] for p in opened[:8]
    }
    assert max(int(text.split()[4]) for text in draws[0]) > 64  # not only each shard's first lines


def test_missing_inputs_give_clear_messages(tmp_path):
    with pytest.raises(SystemExit, match="coco-captions"):
        mp.main(
            [
                "--sources",
                "coco",
                "--out",
                str(tmp_path / "x.jsonl"),
                "--coco-captions",
                str(tmp_path / "nope.json"),
            ]
        )
    with pytest.raises(SystemExit, match="pairs-file"):
        mp.main(["--sources", "file", "--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize(
    "answer,expect",
    [
        ("A plump pink pig stands in the mud.", "A plump pink pig stands in the mud."),
        (
            "Sure! Here is the rewrite:\nA plump pink pig stands in the mud.",
            "A plump pink pig stands in the mud.",
        ),
        ("Here is the rewrite:", "preamble"),
        ("A tasty pig, a tasty pig, a tasty pig, a tasty pig", "loop"),
        ("This pig caption was rewritten in ten words.", "meta"),
        ("#PigLife #Farm", "format"),
        ("A brilliant puzzle of the night sky!", "off_topic"),
        (
            "A pink pig rolls in the mud. " + "It is very happy indeed and " * 5 + "more.",
            "A pink pig rolls in the mud.",
        ),
    ],
)
def test_llm_answers_are_checked(answer, expect):
    got, why = mp.parse_llm_answer(answer, "Simple pig mammal animal", mp.LLM_MAX_WORDS)
    assert (got if got is not None else why) == expect


# A file of the shape of LaCLIP's rewrite/utils.py, written for this test (the released lists are not shipped):
# the seven list names, a long pair and more than --per-source entries (kept whole, as released), a COCO image
# with a repeated caption, and code around them that must never run.
LACLIP_UTILS = """import os
os.makedirs({marker!r})
coco_caption_list = [
['A dog runs on grass. ', 'A brown dog  running.', 'A dog runs on grass.'],
['A cat sleeps.', 'A cat is asleep on a sofa.'],
['Only one caption here.'],
]

chatgpt_source_caption_list = [{chatgpt_in}]
chatgpt_target_caption_list = [{chatgpt_out}]
bard_source_caption_list = ['red chair at the stadium', 'golden fish in a bowl']
bard_target_caption_list = ['A red chair stands out among white seats.', 'A golden fish swims in a bowl.']
human_source_caption_list = ['happy corgi time']
human_target_caption_list = [{human_out}]
def never_called():
    raise RuntimeError("imported")
"""


def write_laclip_checkout(root, marker):
    chatgpt_in = ", ".join(repr(f"alt text number {i}") for i in range(20))
    chatgpt_out = ", ".join(repr(f"A fluent caption, number {i}.") for i in range(20))
    (root / "rewrite").mkdir(parents=True)
    human_out = repr("A delighted corgi stands in the hallway. " + "word " * 70)
    text = LACLIP_UTILS.format(
        marker=str(marker), chatgpt_in=chatgpt_in, chatgpt_out=chatgpt_out, human_out=human_out
    )
    (root / "rewrite" / "utils.py").write_text(text, encoding="utf-8")


def test_laclip_source_reads_the_released_lists_as_data(tmp_path, capsys):
    marker = tmp_path / "executed"
    write_laclip_checkout(tmp_path / "LaCLIP", marker)
    out = tmp_path / "pairs.jsonl"
    mp.main(["--sources", "laclip", "--laclip-repo", str(tmp_path / "LaCLIP"), "--out", str(out)])
    assert not marker.exists()  # parsed, never run
    pairs = read(out)
    per = {}
    for p in pairs:
        per.setdefault(p["source"], []).append(p)
    # every released pair kept: 20 > --per-source 16, and the 73-word human target > --max-words 60
    assert {s: len(v) for s, v in per.items()} == {
        "laclip-chatgpt": 20,
        "laclip-bard": 2,
        "laclip-human": 1,
        "laclip-coco": 2,
    }
    assert [p["input"] for p in per["laclip-chatgpt"]] == [f"alt text number {i}" for i in range(20)]
    assert per["laclip-bard"][1] == {
        "source": "laclip-bard",
        "input": "golden fish in a bowl",
        "output": "A golden fish swims in a bowl.",
    }
    dog, cat = per["laclip-coco"]
    assert dog["captions"] == ["A dog runs on grass.", "A brown dog running."]  # one line, repeats once
    assert cat["captions"] == ["A cat sleeps.", "A cat is asleep on a sofa."]
    stats = json.load(open(tmp_path / "pairs.stats.json"))
    assert stats["dropped"]["laclip"] == {"coco_image_under_two_captions": 1}
    assert stats["read"]["laclip"]["laclip-coco"] == 3
    # 02 reads them as the original's sources, each pool whole
    pools = stage("02_rewrite").load_meta_pairs(str(out), ["laclip-chatgpt", "laclip-coco"])
    assert len(pools["laclip-chatgpt"]) == 20 and all(len(c) == 2 for _, _, c in pools["laclip-coco"])
    # without the checkout, or with a file of another shape: one line that says what to do
    with pytest.raises(SystemExit, match="--laclip-repo"):
        mp.main(["--sources", "laclip", "--out", str(out)])
    with pytest.raises(SystemExit, match="git clone"):
        mp.main(["--sources", "laclip", "--laclip-repo", str(tmp_path), "--out", str(out)])
    other = tmp_path / "other.py"
    other.write_text("coco_caption_list = []\n")
    with pytest.raises(SystemExit, match="bard_source_caption_list"):
        mp.main(["--sources", "laclip", "--laclip-repo", str(other), "--out", str(out)])
    broken = LACLIP_UTILS.replace("[{chatgpt_in}]", "[os.getcwd()]")
    other.write_text(broken.format(marker=str(marker), chatgpt_out="'a'", human_out="'b'"))
    with pytest.raises(SystemExit, match="not a plain list of strings"):
        mp.main(["--sources", "laclip", "--laclip-repo", str(other), "--out", str(out)])
