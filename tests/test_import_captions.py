"""10_import_captions: tables joined to the shards by url, key, caption or path stem; every key once, the rest counted."""

import csv
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import REPO, stage

im = stage("10_import_captions")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    stage("00_toy_data").main(
        [
            "--out",
            str(root),
            "--num-shards",
            "2",
            "--samples-per-shard",
            "12",
            "--image-size",
            "32",
            "--skip-models",
            "--eval-per-class",
            "1",
            "--retrieval-images",
            "2",
            "--coco-images",
            "2",
        ]
    )
    samples = []  # (shard, key, url, AltText)
    for name in ("00000", "00001"):
        for key, members in im.iter_tar(str(root / f"shards/{name}.tar"), {"txt", "json"}, Counter()):
            meta = json.loads(members["json"])
            samples.append((name, key, meta["url"], " ".join(members["txt"].decode().split())))
    return root, samples


def records(out):
    got = {}
    for name in ("00000", "00001"):
        for line in open(out / f"{name}.jsonl"):
            r = json.loads(line)
            assert r["key"] not in got
            got[r["key"]] = r
    return got


def test_csv_joined_by_url_every_key_once_and_the_rest_counted(toy, tmp_path):
    root, samples = toy
    table = tmp_path / "recap.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "re_caption"])
        for i, (_, key, url, _) in enumerate(samples):
            if i % 5 != 0:  # every fifth sample has no row
                w.writerow([url, f"a recaption of {key}"])
        w.writerow(["http://elsewhere.invalid/1.jpg", "a row for no sample"])
        w.writerow(["", "a row without a url"])
    out = tmp_path / "out"
    stats = im.main(
        [
            "--input",
            str(root / "shards"),
            "--table",
            str(table),
            "--join",
            "url",
            "--captions",
            "re_caption",
            "--out-dir",
            str(out),
        ]
    )
    got = records(out)
    assert sorted(got) == sorted(key for _, key, _, _ in samples)
    for i, (_, key, _, alt) in enumerate(samples):
        expect = [] if i % 5 == 0 else [f"a recaption of {key}"]
        assert got[key]["rewrites"] == {"re_caption": expect} and got[key]["text"] == alt
        assert got[key]["status"] == ("no_caption" if i % 5 == 0 else "ok")
    summary = json.load(open(out / "_import.json"))
    assert summary["counts"]["rows_matched"] == len(samples) - len(samples[::5])
    assert summary["counts"]["rows_unmatched"] == 1 and summary["counts"]["rows_without_join_value"] == 1
    assert sum(s["ok"] for s in stats) == summary["samples_with_captions"] == len(samples) - len(samples[::5])
    again = im.main(
        [
            "--input",
            str(root / "shards"),
            "--table",
            str(table),
            "--captions",
            "re_caption",
            "--out-dir",
            str(out),
        ]
    )
    assert again == []  # done shards are skipped


def test_nested_jsonl_by_key_with_lists_and_tsv(toy, tmp_path):
    root, samples = toy
    table = tmp_path / "dreamlip.jsonl"
    with open(table, "w") as f:
        for _, key, _, _ in samples[:6]:
            row = {
                "id": key,
                "captions": {
                    "long": f"a long caption of {key}",
                    "short": [f"short {key} one", f"short {key} two"],
                },
            }
            f.write(json.dumps(row) + "\n")
        f.write("not json\n")
    out = tmp_path / "out"
    im.main(
        [
            "--input",
            str(root / "shards"),
            "--table",
            str(table),
            "--join",
            "key",
            "--join-column",
            "id",
            "--captions",
            "captions.long",
            "captions.short",
            "--out-dir",
            str(out),
        ]
    )
    got = records(out)
    key = samples[0][1]
    assert got[key]["rewrites"] == {
        "captions.long": [f"a long caption of {key}"],
        "captions.short": [f"short {key} one", f"short {key} two"],
    }
    assert sum(r["status"] == "ok" for r in got.values()) == 6
    assert json.load(open(out / "_import.json"))["counts"]["bad_json"] == 1
    tsv = tmp_path / "t.tsv"
    tsv.write_text("key\tvecap\n" + "".join(f"{key}\tvecap of {key}\n" for _, key, _, _ in samples[-3:]))
    im.main(
        [
            "--input",
            str(root / "shards"),
            "--table",
            str(tsv),
            "--join",
            "key",
            "--captions",
            "vecap",
            "--out-dir",
            str(tmp_path / "tsv"),
        ]
    )
    assert sum(r["status"] == "ok" for r in records(tmp_path / "tsv").values()) == 3


def write_laclip(tmp_path, samples, stems=False):
    csv_path = tmp_path / "cc3m_original.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])  # a header: skipped, as LaCLIP's loader skips it
        for _, key, _, alt in samples:
            w.writerow([f"training/{key if stems else 'x' + key}.jpg", alt])
        w.writerow(["training/unknown.jpg", "a caption no sample has"])
    for source in ("chatgpt", "bard"):
        lines = [f"{source} rewrite of {key}" for _, key, _, _ in samples] + [f"{source} rewrite of nothing"]
        (tmp_path / f"cc3m_{source}.txt").write_text("\n".join(lines) + "\n")
    return [
        "--laclip-csv",
        str(csv_path),
        "--laclip-texts",
        f"chatgpt={tmp_path / 'cc3m_chatgpt.txt'}",
        f"bard={tmp_path / 'cc3m_bard.txt'}",
    ]


def test_laclip_release_joined_by_caption_and_by_path_stem(toy, tmp_path):
    root, samples = toy
    out = tmp_path / "by_caption"
    im.main(["--input", str(root / "shards"), *write_laclip(tmp_path, samples), "--out-dir", str(out)])
    got, alts = records(out), Counter(alt for _, _, _, alt in samples)
    for _, key, _, alt in samples:
        chatgpt = got[key]["rewrites"]["chatgpt"]
        assert f"chatgpt rewrite of {key}" in chatgpt
        assert len(chatgpt) == alts[alt]  # a sample shares the rewrites of every image with its AltText
    summary = json.load(open(out / "_import.json"))["counts"]
    assert summary["laclip_image_rows"] == len(samples) + 1 and summary["rows_unmatched"] == 1
    out = tmp_path / "by_stem"
    im.main(
        [
            "--input",
            str(root / "shards"),
            *write_laclip(tmp_path, samples, stems=True),
            "--join",
            "path-stem",
            "--out-dir",
            str(out),
        ]
    )
    got = records(out)
    assert all(
        got[key]["rewrites"] == {"chatgpt": [f"chatgpt rewrite of {key}"], "bard": [f"bard rewrite of {key}"]}
        for _, key, _, _ in samples
    )


def test_misaligned_laclip_files_and_bad_arguments_stop(toy, tmp_path):
    root, samples = toy
    argv = write_laclip(tmp_path, samples)
    (tmp_path / "cc3m_bard.txt").write_text("only one line\n")
    with pytest.raises(SystemExit, match="bard: ends at line 1"):
        im.main(["--input", str(root / "shards"), *argv, "--out-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="one of them"):
        im.main(["--input", str(root / "shards"), "--out-dir", str(tmp_path / "y")])
    table = tmp_path / "t.csv"
    table.write_text("url,caption\n")
    with pytest.raises(SystemExit, match="no column 're_caption'"):
        im.main(
            [
                "--input",
                str(root / "shards"),
                "--table",
                str(table),
                "--captions",
                "re_caption",
                "--out-dir",
                str(tmp_path / "z"),
            ]
        )


def test_parquet_when_pyarrow_is_there(toy, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root, samples = toy
    rows = {
        "url": [url for _, _, url, _ in samples],
        "re_caption": [f"recap {key}" for _, key, _, _ in samples],
    }
    pq.write_table(pa.table(rows), tmp_path / "recap.parquet")
    im.main(
        [
            "--input",
            str(root / "shards"),
            "--table",
            str(tmp_path / "recap.parquet"),
            "--captions",
            "re_caption",
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert all(r["status"] == "ok" for r in records(tmp_path / "out").values())


def test_05_trains_on_imported_captions(toy, tmp_path):
    root, samples = toy
    table = tmp_path / "recap.csv"
    table.write_text(
        "url,re_caption\n" + "".join(f"{url},a recaption of {key}\n" for _, key, url, _ in samples)
    )
    out = tmp_path / "imported"
    im.main(
        [
            "--input",
            str(root / "shards"),
            "--table",
            str(table),
            "--captions",
            "re_caption",
            "--out-dir",
            str(out),
        ]
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = stage("05_train").main(
        [
            "--input",
            str(root / "shards"),
            "--model",
            str(root / "models/toy-clip.json"),
            "--texts",
            str(out),
            "--text-mode",
            "uniform",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--epochs",
            "1",
            "--out-dir",
            str(tmp_path / "train"),
        ]
    )
    assert result["step"] == 3 and result["skipped"] == 0


# Messy tables: every bad row is counted (or refused with its file and line), every good row still lands.


def import_table(root, table, out, *flags):
    """Imports `table` (key, caption) joined by key; returns the records and _import.json."""
    im.main(
        [
            "--input",
            str(root / "shards"),
            "--table",
            *([str(t) for t in table] if isinstance(table, list) else [str(table)]),
            "--join",
            "key",
            "--captions",
            "caption",
            "--out-dir",
            str(out),
            *flags,
        ]
    )
    return records(out), json.load(open(out / "_import.json"))


def assert_good_rows_landed(got, samples, bad_keys=(), caption="caption of {key}", source="caption"):
    for _, key, _, _ in samples:
        if key not in bad_keys:
            assert got[key]["rewrites"] == {source: [caption.format(key=key)]} and got[key]["status"] == "ok"


def test_giant_cell_is_read_whole_and_a_multiline_row_counted(toy, tmp_path):
    root, samples = toy
    giant_key, multiline_key = samples[0][1], samples[1][1]
    table = tmp_path / "long.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "caption"])
        w.writerow([giant_key, "x" * 200_000])
        w.writerow([multiline_key, "a caption\nover two lines"])
        for _, key, _, _ in samples[2:]:
            w.writerow([key, f"caption of {key}"])
    got, summary = import_table(root, table, tmp_path / "out")
    assert got[giant_key]["rewrites"]["caption"] == ["x" * 200_000]
    assert got[multiline_key]["rewrites"]["caption"] == ["a caption over two lines"]
    assert_good_rows_landed(got, samples[2:])
    counts = summary["counts"]
    assert counts["rows"] == counts["rows_matched"] == len(samples)
    assert counts["multiline_rows"] == 1 and counts["rows_dropped"] == counts["unreadable_rows"] == 0


BAD = b"\xff\xfe broken utf8"


def write_bad_bytes_table(path, samples):
    """(key, caption) for every sample; the first one's caption has bytes that are not UTF-8."""
    rows = [(key.encode(), f"caption of {key}".encode()) for _, key, _, _ in samples]
    rows[0] = (rows[0][0], BAD)
    if path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        keys = [key.decode() for key, _ in rows]
        captions = pa.array([caption for _, caption in rows], pa.binary()).view(pa.string())  # unchecked
        pq.write_table(pa.table({"key": keys, "caption": captions}), path)
        return
    with open(path, "wb") as f:
        if path.suffix == ".jsonl":
            for key, caption in rows:
                f.write(b'{"key": "' + key + b'", "caption": "' + caption + b'"}\n')
            return
        sep = b"\t" if path.suffix == ".tsv" else b","
        f.write(b"key" + sep + b"caption\n")
        for key, caption in rows:
            f.write(key + sep + caption + b"\n")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_invalid_utf8_counted_per_file_dropped_by_default_or_replaced(toy, tmp_path, fmt):
    root, samples = toy
    table = tmp_path / f"bad.{fmt}"
    write_bad_bytes_table(table, samples)
    bad_key = samples[0][1]
    got, summary = import_table(root, table, tmp_path / "dropped")
    assert got[bad_key]["status"] == "no_caption" and got[bad_key]["rewrites"] == {"caption": []}
    assert_good_rows_landed(got, samples, bad_keys={bad_key})
    assert summary["counts"]["bad_encoding"] == summary["counts"]["rows_dropped"] == 1
    assert summary["files"][str(table)]["bad_encoding"] == 1
    assert summary["counts"]["rows_matched"] == len(samples) - 1
    got, summary = import_table(root, table, tmp_path / "replaced", "--bad-encoding", "replace")
    assert got[bad_key]["rewrites"] == {"caption": ["\ufffd\ufffd broken utf8"]}
    assert_good_rows_landed(got, samples, bad_keys={bad_key})
    assert summary["counts"]["bad_encoding"] == 1 and summary["counts"]["rows_dropped"] == 0


def test_duplicate_rows_counted_first_wins_all_or_refused(toy, tmp_path):
    root, samples = toy
    key = samples[3][1]
    table = tmp_path / "dup.csv"
    rows = [f"{k},caption of {k}\n" for _, k, _, _ in samples]
    table.write_text("key,caption\n" + "".join(rows) + f"{key},a second caption of {key}\n" + rows[3])
    got, summary = import_table(root, table, tmp_path / "first")
    assert_good_rows_landed(got, samples)  # the first row's caption only
    assert summary["counts"]["duplicate_rows"] == 2 and summary["counts"]["rows_matched"] == len(samples) + 2
    got, summary = import_table(root, table, tmp_path / "all", "--duplicates", "all")
    assert got[key]["rewrites"]["caption"] == [f"caption of {key}", f"a second caption of {key}"]
    assert_good_rows_landed(got, samples, bad_keys={key})
    assert summary["counts"]["duplicate_rows"] == 2
    with pytest.raises(
        SystemExit,
        match=rf"dup.csv:{len(samples) + 2}: key '{key}' got its 'caption' caption from .*dup.csv:5 ",
    ):
        import_table(root, table, tmp_path / "error", "--duplicates", "error")
    # several sources for one key, from other columns or files, are not duplicates
    long_, short = tmp_path / "long.jsonl", tmp_path / "short.jsonl"
    long_.write_text("".join(json.dumps({"key": k, "long": f"long {k}"}) + "\n" for _, k, _, _ in samples))
    short.write_text("".join(json.dumps({"key": k, "short": f"short {k}"}) + "\n" for _, k, _, _ in samples))
    out = tmp_path / "sources"
    im.main(
        ["--input", str(root / "shards"), "--table", str(long_), str(short), "--join", "key"]
        + ["--captions", "long", "short", "--out-dir", str(out)]
    )
    got = records(out)
    assert all(
        got[k]["rewrites"] == {"long": [f"long {k}"], "short": [f"short {k}"]} for _, k, _, _ in samples
    )
    assert json.load(open(out / "_import.json"))["counts"]["duplicate_rows"] == 0


def test_laclip_image_row_twice_is_a_duplicate_but_a_shared_caption_is_not(toy, tmp_path):
    root, samples = toy
    argv = write_laclip(tmp_path, samples, stems=True)
    key = samples[0][1]
    with open(tmp_path / "cc3m_original.csv", "a", newline="") as f:
        csv.writer(f).writerow([f"elsewhere/{key}.jpg", samples[0][3]])
    for source in ("chatgpt", "bard"):
        with open(tmp_path / f"cc3m_{source}.txt", "a") as f:
            f.write(f"another {source} rewrite\n")
    out = tmp_path / "stem"
    im.main(["--input", str(root / "shards"), *argv, "--join", "path-stem", "--out-dir", str(out)])
    assert records(out)[key]["rewrites"]["chatgpt"] == [f"chatgpt rewrite of {key}"]
    assert json.load(open(out / "_import.json"))["counts"]["duplicate_rows"] == 1
    out = tmp_path / "caption"  # by caption: the row is another image with that text, its rewrites count
    im.main(["--input", str(root / "shards"), *write_laclip(tmp_path, samples), "--out-dir", str(out)])
    assert json.load(open(out / "_import.json"))["counts"]["duplicate_rows"] == 0


def test_nul_and_control_characters_stripped_by_default_or_the_row_dropped(toy, tmp_path):
    root, samples = toy
    nul_key, tab_key = samples[0][1], samples[1][1]
    table = tmp_path / "nul.csv"
    rows = [f"{nul_key},caption\x00 of\x07 {nul_key}\x00\x00\n", f"{tab_key},caption\tof {tab_key}\n"]
    rows += [f"{k},caption of {k}\n" for _, k, _, _ in samples[2:]]
    table.write_text("\ufeffkey,caption\n" + "".join(rows))  # a spreadsheet's byte-order mark, too
    got, summary = import_table(root, table, tmp_path / "strip")
    assert_good_rows_landed(got, samples)  # the NUL row as "caption of <key>", the tab a space
    assert summary["counts"]["control_chars"] == 1 and summary["counts"]["rows_dropped"] == 0
    got, summary = import_table(root, table, tmp_path / "drop", "--control-chars", "drop")
    assert got[nul_key]["status"] == "no_caption"
    assert_good_rows_landed(got, samples, bad_keys={nul_key})
    assert summary["counts"]["control_chars"] == summary["counts"]["rows_dropped"] == 1
    assert all(summary["counts"][name] == 0 for name in ("bad_encoding", "duplicate_rows", "unreadable_rows"))
    jsonl = (
        tmp_path / "nul.jsonl"
    )  # JSON forbids raw controls in strings; a table's writer may not have cared
    lines = [f'{{"key": "{k}", "caption": "caption of {k}"}}\n' for _, k, _, _ in samples]
    lines[0] = f'{{"key": "{nul_key}", "caption": "caption of\x00 {nul_key}"}}\n'
    jsonl.write_text("".join(lines))
    got, summary = import_table(root, jsonl, tmp_path / "jsonl")
    assert_good_rows_landed(got, samples)
    assert summary["counts"]["control_chars"] == 1 and summary["counts"]["bad_json"] == 0


def test_a_join_that_matched_nothing_stops_with_an_example_and_names_lost_zeros(toy, tmp_path, capsys):
    """Keys saved by a spreadsheet lose their leading zeros: "0/24 samples got captions" with exit 0 was the
    old answer. Now nothing is written, the exit is non-zero, an unmatched value stands beside a shard key, and
    the lost zeros are named; --allow-empty writes the sidecars anyway. A missing join column names --join."""
    root, samples = toy
    table = tmp_path / "from_excel.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "caption"])
        for _, key, _, _ in samples:
            w.writerow([str(int(key)), f"a caption of {key}"])
    argv = ["--input", str(root / "shards"), "--table", str(table), "--captions", "caption"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        im.main([*argv, "--join", "key", "--out-dir", str(out)])
    message = str(stop.value.code)
    first = samples[0][1]
    assert f"key {str(int(first))!r} matches no sample" in message and f"{first!r}" in message
    assert "lost their leading zeros" in message and f"zfill({len(first)})" in message
    assert not list(out.glob("*.stats.json"))  # nothing finished-looking: the fixed table reruns cleanly
    stats = im.main([*argv, "--join", "key", "--out-dir", str(out), "--allow-empty"])
    assert sum(s["in"] for s in stats) == len(samples) and not sum(s.get("ok", 0) for s in stats)
    assert "lost their leading zeros" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no column 'url'.*--join key"):  # url is the default join
        im.main([*argv, "--out-dir", str(tmp_path / "y")])


def test_the_command_line_exits_non_zero_on_an_empty_join(toy, tmp_path):
    root, samples = toy
    table = tmp_path / "t.csv"
    table.write_text("key,caption\n7,a caption\n")
    cmd = [sys.executable, os.path.join(REPO, "10_import_captions.py"), "--input", str(root / "shards")]
    cmd += ["--table", str(table), "--join", "key", "--captions", "caption", "--out-dir", str(tmp_path / "o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no table row matched a sample" in result.stderr
