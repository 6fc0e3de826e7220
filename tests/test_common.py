"""The plumbing every stage shares: identical copies, shard partition, atomic files, resume, tar reading."""

import ast
import glob
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest
from conftest import REPO, stage

STAGES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "[0-9][0-9]_*.py")))


# A shared block is code that several stages need and each carries a copy of (no stage imports another). Its
# header reads "# ---- <name> (shared code: ...) ----". Each file keeps only the definitions of a block it uses,
# and a definition reads the same in every file that has it.
SHARED_BLOCK = re.compile(
    r"# ---- (?P<name>[a-z ]+) \(shared code[^\n]*\n(?P<body>.*?)# ---- end (?P=name)\n", re.S
)
BLOCK_USERS = {
    "common": set(STAGES),
    "shard reading": set(STAGES) - {"00_toy_data.py", "00_real_data.py"},
    "dataset writing": {"00_toy_data.py", "00_real_data.py"},
    "progress": {
        "02_rewrite.py",
        "03_visual_concepts.py",
        "04_fuse.py",
        "07_cc_finetune.py",
        "08_embed_texts.py",
    },
    "shard work": {"02_rewrite.py", "03_visual_concepts.py", "04_fuse.py", "08_embed_texts.py"},
    "text engine": {"01_collect_meta_pairs.py", "02_rewrite.py", "04_fuse.py"},
    "text checks": {"01_collect_meta_pairs.py", "02_rewrite.py", "04_fuse.py"},
    "caption scores": {"02_rewrite.py", "04_fuse.py"},
    "eda": {"02_rewrite.py", "05_train.py"},
    "text tower": {"05_train.py", "06_eval.py", "07_cc_finetune.py", "08_embed_texts.py"},
    "adapter": {"05_train.py", "06_eval.py"},
}


def statement_name(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return node.name
    return ast.unparse(node.targets[0] if isinstance(node, ast.Assign) else node)


def shared_code(stage):
    """{block: {name: source}} of the top-level statements in a stage's shared blocks."""
    text = open(os.path.join(REPO, stage), encoding="utf-8").read()
    blocks = {}
    for m in SHARED_BLOCK.finditer(text):
        body = m.group("body")
        blocks[m.group("name")] = {
            statement_name(n): ast.get_source_segment(body, n) for n in ast.parse(body).body
        }
    return text, blocks


def test_shared_blocks_where_their_stages_need_them():
    for name, users in BLOCK_USERS.items():
        assert {s for s in STAGES if name in shared_code(s)[1]} == users, name
    for s in STAGES:
        text, blocks = shared_code(s)
        assert text.count("# ---- end ") == len(blocks), f"{s}: a block header that is not 'shared code'"


def test_shared_definitions_identical_wherever_they_appear():
    copies = {}
    for s in STAGES:
        for block_name, statements in shared_code(s)[1].items():
            for name, source in statements.items():
                copies.setdefault((block_name, name), {})[s] = source
    differ = [key for key, per_stage in copies.items() if len(set(per_stage.values())) > 1]
    assert differ == []
    # and no stage defines one of them again outside its blocks
    for s in STAGES:
        text, blocks = shared_code(s)
        outside = SHARED_BLOCK.sub("", text)
        top = {
            statement_name(n)
            for n in ast.parse(outside).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        }
        assert top & {name for _, name in copies} == set(), s


def test_each_stage_carries_only_shared_code_it_uses():
    for s in STAGES:
        text, blocks = shared_code(s)
        for statements in blocks.values():
            for name, source in statements.items():
                rest = ast.parse(text.replace(source, ""))
                used = {n.id for n in ast.walk(rest) if isinstance(n, ast.Name)}
                used |= {n.attr for n in ast.walk(rest) if isinstance(n, ast.Attribute)}
                assert set(re.findall(r"\w+", name)) & used, f"{s}: {name} is carried but not used"


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


def test_torch_threads_follow_the_idle_cores(monkeypatch, capsys):
    import torch

    c = stage("02_rewrite")
    before = torch.get_num_threads()
    cpus = os.sched_getaffinity(0)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's word is final
        torch.set_num_threads(3)
        assert c.set_torch_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert c.set_torch_threads(1) == 1 and torch.get_num_threads() == 1  # never above the share
        # every core busy: one thread, and the user is told why
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in cpus]
        try:
            time.sleep(0.5)
            idle = c.idle_cpus(cpus)
            assert idle is not None and 0 <= idle < 0.5
            assert c.set_torch_threads() == 1 and torch.get_num_threads() == 1
        finally:
            for b in busy:
                b.kill()
                b.wait()
        assert ("1 torch thread(s)" in capsys.readouterr().out) == (len(cpus) > 1)

        # no /proc/stat (not Linux, or hidden): the share, as before
        def no_proc(*args, **kwargs):
            raise OSError("no /proc here")

        monkeypatch.setattr(c, "open", no_proc, raising=False)
        assert c.idle_cpus(cpus) is None
        assert c.set_torch_threads() == max(1, len(cpus) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    finally:
        torch.set_num_threads(before)


APPENDIX = "# ==== shared blocks below:"


def test_each_stage_reads_its_own_code_first_and_the_shared_blocks_last():
    """Run sheet, imports, the stage's own code, parse_args, main; then one appendix of shared blocks; then the
    __main__ guard. No stage-own definition after the appendix starts, no shared definition before it."""
    for s in STAGES:
        text = open(os.path.join(REPO, s), encoding="utf-8").read()
        assert text.count(APPENDIX) == 1, f"{s}: one appendix header"
        appendix = text.index(APPENDIX)
        shared_lines = set()
        for m in SHARED_BLOCK.finditer(text):
            assert m.start() > appendix, f"{s}: shared block {m.group('name')} above the appendix"
            first = text[: m.start()].count("\n") + 1
            shared_lines.update(range(first, first + m.group(0).count("\n")))
        appendix_line = text[:appendix].count("\n") + 1
        body = ast.parse(text).body
        own = [n for n in body if n.lineno not in shared_lines]
        assert isinstance(own[-1], ast.If) and "__main__" in ast.unparse(own[-1].test), (
            f"{s}: ends in the guard"
        )
        names = [n.name for n in own if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert names[-2:] == ["parse_args", "main"], f"{s}: parse_args and main close the stage's own code"
        for n in own[:-1]:
            assert n.lineno < appendix_line, f"{s}: {statement_name(n)} (line {n.lineno}) below the appendix"
