"""The plumbing every stage shares: identical copies, shard partition, atomic files, resume, tar reading."""

import glob
import io
import json
import os
import re
import tarfile
from collections import Counter

import pytest
from conftest import REPO, stage

STAGES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "[0-9][0-9]_*.py")))


def block(path, start, end):
    text = open(os.path.join(REPO, path), encoding="utf-8").read()
    m = re.search(re.escape(start) + r".*?" + re.escape(end), text, flags=re.S)
    return m.group(0) if m else None


def test_common_block_identical_in_every_stage():
    assert len(STAGES) >= 3
    copies = {s: block(s, "# ---- common (", "# ---- end common") for s in STAGES}
    assert all(copies.values()), [s for s, c in copies.items() if not c]
    reference = copies["02_rewrite.py"]
    assert [s for s, c in copies.items() if c != reference] == []


def test_shard_work_block_identical_where_used():
    users = [
        s for s in STAGES if re.search(r"\b(worker_slot|read_partial)\(", open(os.path.join(REPO, s)).read())
    ]
    assert {"02_rewrite.py", "03_visual_concepts.py", "04_fuse.py", "08_embed_texts.py"} <= set(users)
    copies = {s: block(s, "# ---- shard work (", "# ---- end shard work") for s in users}
    assert all(copies.values()) and len(set(copies.values())) == 1, [s for s, c in copies.items() if not c]


@pytest.mark.parametrize(
    "name,users",
    [
        ("text tower", {"05_train.py", "06_eval.py", "07_cc_finetune.py", "08_embed_texts.py"}),
        ("adapter", {"05_train.py", "06_eval.py"}),
    ],
)
def test_llm2clip_blocks_identical(name, users):
    copies = {s: block(s, f"# ---- {name} (", f"# ---- end {name}") for s in STAGES}
    assert {s for s, c in copies.items() if c} == users
    assert len({copies[s] for s in users}) == 1


def test_text_engine_block_identical_where_used():
    users = [s for s in STAGES if "# ---- text engine (" in open(os.path.join(REPO, s)).read()]
    assert {"01_collect_meta_pairs.py", "02_rewrite.py"} <= set(users)
    copies = {s: block(s, "# ---- text engine (", "# ---- end text engine") for s in users}
    assert len(set(copies.values())) == 1


def test_text_checks_block_identical_where_used():
    users = [s for s in STAGES if "# ---- text checks (" in open(os.path.join(REPO, s)).read()]
    assert {"01_collect_meta_pairs.py", "02_rewrite.py", "04_fuse.py"} <= set(users)
    copies = {s: block(s, "# ---- text checks (", "# ---- end text checks") for s in users}
    assert len(set(copies.values())) == 1


def test_eda_block_identical_in_02_and_05():
    copies = {s: block(s, "# ---- eda (", "# ---- end eda") for s in STAGES}
    assert {s for s, c in copies.items() if c} == {"02_rewrite.py", "05_train.py"}
    assert len({c for c in copies.values() if c}) == 1


def test_dataset_writing_block_identical_in_both_builders():
    builders = ("00_toy_data.py", "00_real_data.py")
    copies = {s: block(s, "# ---- dataset writing (", "# ---- end dataset writing") for s in builders}
    assert all(copies.values()) and len(set(copies.values())) == 1


def test_no_stage_imports_another():
    for s in STAGES:
        text = open(os.path.join(REPO, s)).read()
        assert not re.search(r"^\s*(from|import)\s+\d\d_|import_module\(", text, flags=re.M), s


@pytest.mark.parametrize("num_shards,world", [(1, 1), (1, 8), (3, 1), (4, 2), (64, 8), (7, 3)])
def test_shard_partition_complete_and_disjoint(monkeypatch, num_shards, world):
    c = stage("02_rewrite")
    shards = [f"/data/{i:05d}.tar" for i in range(101)]
    seen = Counter()
    for shard_id in range(num_shards):
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            worker, total = c.worker_slot(shard_id, num_shards)
            assert total == num_shards * world
            seen.update(c.my_shards(list(reversed(shards)), worker, total))
    assert sorted(seen) == shards and set(seen.values()) == {1}


def test_worker_slot_reads_slurm_array(monkeypatch):
    c = stage("02_rewrite")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert c.worker_slot() == (2 * 2 + 1, 8)
    with pytest.raises(SystemExit):
        c.worker_slot(5, 4)


def test_atomic_write_leaves_no_temp(tmp_path):
    c = stage("02_rewrite")
    path = tmp_path / "a.jsonl"
    c.write_jsonl(str(path), [{"key": "1", "text": "é"}])
    assert os.listdir(tmp_path) == ["a.jsonl"]
    assert json.loads(path.read_text(encoding="utf-8")) == {"key": "1", "text": "é"}


def test_list_inputs_ignores_temp_files(tmp_path):
    c = stage("02_rewrite")
    for name in ["00001.tar", "00000.tar", "00002.tar.tmp.host.1", "x.txt", "00003.jsonl"]:
        (tmp_path / name).write_bytes(b"")
    got = [os.path.basename(p) for p in c.list_inputs([str(tmp_path)], (".tar", ".jsonl"))]
    assert got == ["00000.tar", "00001.tar", "00003.jsonl"]
    with pytest.raises(SystemExit):
        c.list_inputs([str(tmp_path / "nope.tar")], (".tar",))


def test_partial_resume_cuts_torn_line_and_checks_tag(tmp_path):
    c = stage("02_rewrite")
    path = str(tmp_path / "s.tmp.partial")
    c.append_partial(path, "tagA", [{"key": "a"}, {"key": "b"}])
    with open(path, "a") as f:
        f.write('{"key": "c", "te')  # a kill in the middle of a write
    assert sorted(c.read_partial(path, "tagA")) == ["a", "b"]
    c.append_partial(path, "tagA", [{"key": "c"}])
    assert sorted(c.read_partial(path, "tagA")) == ["a", "b", "c"]
    assert c.read_partial(path, "tagB") == {} and not os.path.exists(path)


def make_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_iter_tar_groups_by_key_and_reads_only_wanted(tmp_path):
    c = stage("02_rewrite")
    path = str(tmp_path / "00000.tar")
    make_tar(
        path,
        [
            ("000000000.jpg", b"J0"),
            ("000000000.txt", b"t0"),
            ("000000000.json", b"{}"),
            ("000000001.txt", b"t1"),
            ("sub/000000002.txt", b"t2"),
            ("noext", b"x"),
        ],
    )
    counts = Counter()
    got = list(c.iter_tar(path, {"txt"}, counts))
    assert [k for k, _ in got] == ["000000000", "000000001", "sub/000000002"]
    assert got[0][1] == {"jpg": None, "txt": b"t0", "json": None}
    assert not counts


def test_iter_tar_survives_corrupt_header_and_truncation(tmp_path):
    c = stage("02_rewrite")
    path = tmp_path / "00000.tar"
    make_tar(str(path), [(f"{i:09d}.txt", f"caption {i}".encode()) for i in range(6)])
    raw = bytearray(path.read_bytes())
    raw[2 * 1024 : 2 * 1024 + 100] = b"\xff" * 100  # third member's header is garbage
    path.write_bytes(bytes(raw))
    counts = Counter()
    keys = [k for k, _ in c.iter_tar(str(path), {"txt"}, counts)]
    assert keys == ["000000000", "000000001", "000000003", "000000004", "000000005"]
    path.write_bytes(bytes(raw[: 4 * 1024 + 200]))  # cut inside the fifth header
    counts = Counter()
    keys = [k for k, _ in c.iter_tar(str(path), {"txt"}, counts)]
    assert keys[:2] == ["000000000", "000000001"] and counts["tar_error"] == 1
    for cut in (4 * 1024 + 700, 4 * 1024):  # inside the fifth member's data; exactly between members
        path.write_bytes(bytes(raw[:cut]))
        counts = Counter()
        keys = [k for k, _ in c.iter_tar(str(path), {"txt"}, counts)]
        assert keys[:2] == ["000000000", "000000001"] and counts["tar_error"] == 1
    path.write_bytes(b"")
    counts = Counter()
    assert list(c.iter_tar(str(path), {"txt"}, counts)) == [] and counts["tar_error"] == 1


def test_progress_block_identical_where_used():
    users = [s for s in STAGES if "# ---- progress (" in open(os.path.join(REPO, s)).read()]
    assert {
        "02_rewrite.py",
        "03_visual_concepts.py",
        "04_fuse.py",
        "07_cc_finetune.py",
        "08_embed_texts.py",
    } <= set(users)
    copies = {s: block(s, "# ---- progress (", "# ---- end progress") for s in users}
    assert len(set(copies.values())) == 1


def test_caption_scores_block_identical_where_used():
    users = [s for s in STAGES if "# ---- caption scores (" in open(os.path.join(REPO, s)).read()]
    assert {"02_rewrite.py", "04_fuse.py"} <= set(users)
    copies = {s: block(s, "# ---- caption scores (", "# ---- end caption scores") for s in users}
    assert len(set(copies.values())) == 1
