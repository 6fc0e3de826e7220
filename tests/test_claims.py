"""Shard claims (--assign claim, the shared shard-work block), driven through 02_rewrite --engine eda, which
needs no model: workers that die mid-shard, silent and live holders, races over one stale claim, a worker
whose claim was taken over, --assign stride, more workers than shards."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from conftest import REPO, stage

rw = stage("02_rewrite")
SIZES = [120, 5, 30, 60, 17, 90, 40]  # unequal on purpose: the big first shard is the one a worker dies in
WORDS = "dog cat house field river tree car boat bird child man woman street".split()
SLOW_WORKER = """
import importlib, sys, time
sys.path.insert(0, sys.argv[1])
rw = importlib.import_module("02_rewrite")
append = rw.append_partial


def slow_append(*args):
    append(*args)
    time.sleep(0.3)  # slow enough that the test can kill it between two saved chunks


rw.append_partial = slow_append
rw.main(sys.argv[2:])
"""


def write_shards(folder, sizes=SIZES):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        with open(folder / f"{i:05d}.jsonl", "w") as f:
            for k in range(n):
                text = f"a {WORDS[k % 13]} near the {WORDS[k * 7 % 13]} and a big {WORDS[(k + i) % 13]}"
                f.write(json.dumps({"key": f"{i}-{k}", "text": text}) + "\n")
    return sorted(str(p) for p in folder.glob("*.jsonl"))


def eda_args(src, out, *extra):
    return ["--engine", "eda", "--input", str(src), "--out-dir", str(out), "--chunk-size", "5", *extra]


def outputs(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}


def leftovers(out):
    return sorted(p.name for p in out.iterdir() if ".claim" in p.name or ".tmp" in p.name)


def write_claim(path, host="elsewhere", pid=12345, age=0.0):
    """Another worker's claim, `age` seconds since its last heartbeat."""
    record = {
        "host": host,
        "pid_ns": rw.pid_namespace(),
        "pid": pid,
        "worker": 7,
        "start": "then",
        "token": "t",
    }
    path.write_bytes(json.dumps(record).encode())
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path.read_bytes()


def test_three_workers_one_killed_mid_shard_every_key_once(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    paths = write_shards(src)
    rw.main(eda_args(src, tmp_path / "single"))
    single = outputs(tmp_path / "single")
    base = eda_args(src, out, "--num-shards", "3")
    slow = subprocess.Popen(
        [sys.executable, "-c", SLOW_WORKER, REPO, *base, "--shard-id", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    partial = out / "00000.tmp.partial"
    deadline = time.time() + 60
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 1 + 10):
        time.sleep(0.05)
    slow.send_signal(signal.SIGKILL)
    killed_log = slow.communicate()[0]
    assert (out / "00000.claim").exists() and not (out / "00000.stats.json").exists(), "not killed mid-shard"
    assert json.loads((out / "00000.claim").read_text())["pid"] == slow.pid
    survivors = []
    for shard_id in (1, 2):  # together, so they race for the dead worker's shard
        cmd = [sys.executable, os.path.join(REPO, "02_rewrite.py"), *base, "--shard-id", str(shard_id)]
        survivors.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in survivors]
    assert [p.returncode for p in survivors] == [0, 0], logs
    every = "".join(logs)
    assert outputs(out) == single  # every key once, the same bytes as one worker writes
    keys = Counter(json.loads(line)["key"] for data in outputs(out).values() for line in data.splitlines())
    assert len(keys) == sum(SIZES) and set(keys.values()) == {1}
    done = Counter(re.findall(r"^(\d{5}): \d+/\d+ ok", killed_log + every, flags=re.MULTILINE))
    assert done == Counter({os.path.basename(p)[:5]: 1 for p in paths})  # no shard done twice
    assert every.count("00000: taking over the claim of") == 1 and "its process is gone" in every
    assert "00000: resuming, " in every
    assert leftovers(out) == []


def test_silent_claim_is_taken_over(tmp_path, capsys):
    path = write_shards(tmp_path / "in", [3])[0]
    out = tmp_path / "out"
    out.mkdir()
    write_claim(out / "00000.claim", age=60)
    # a minute without a heartbeat: still working
    assert rw.claim_shard(str(out), path, 0, timeout=900) is None
    write_claim(out / "00000.claim", age=1000)
    claim = rw.claim_shard(str(out), path, 0, timeout=900)
    assert claim is not None and (out / "00000.claim").read_bytes() == claim.data
    assert json.loads(claim.data)["host"] == socket.gethostname()
    said = capsys.readouterr().out
    assert "00000: taking over the claim of elsewhere pid 12345 (worker 7, since then): " in said
    assert "no heartbeat for 1000s (--claim-timeout 900)" in said
    rw.end_claim(claim)
    assert (out / "00000.claim").exists()  # not finished: left for a later run to take over


def test_claim_of_a_live_process_is_respected_until_it_dies(tmp_path, capsys):
    path = write_shards(tmp_path / "in", [3])[0]
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        theirs = write_claim(out / "00000.claim", host=socket.gethostname(), pid=holder.pid)
        assert rw.claim_shard(str(out), path, 0, timeout=900) is None
        assert (out / "00000.claim").read_bytes() == theirs
    finally:
        holder.kill()
        holder.wait()
    claim = rw.claim_shard(str(out), path, 0, timeout=900)
    assert claim is not None
    assert f"pid {holder.pid} (worker 7, since then): its process is gone" in capsys.readouterr().out
    rw.end_claim(claim)


def race_for(out, path, workers):
    """`workers` threads judge the same stale claim at once; the claims they come away with."""
    start, won = threading.Barrier(workers), []

    def race(worker):
        start.wait()
        claim = rw.claim_shard(str(out), path, worker, timeout=900)
        if claim is not None:
            won.append(claim)

    threads = [threading.Thread(target=race, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


@pytest.mark.parametrize("workers", [2, 6])
def test_racing_over_one_stale_claim_exactly_one_wins(tmp_path, workers):
    path = write_shards(tmp_path / "in", [3])[0]
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(20):
        write_claim(out / "00000.claim", age=5000)
        won = race_for(out, path, workers)
        holders = [c for c in won if rw.still_mine(c)]
        assert len(holders) == 1 and sorted(os.listdir(out)) == ["00000.claim"]  # nothing left aside
        if workers == 2:
            assert won == holders
        for claim in won:  # with 3+ racers one may come away with a claim already replaced: it never writes
            if claim not in holders:
                with pytest.raises(rw.ClaimLost):
                    rw.check_claim(claim)
            claim.stop()
        os.remove(out / "00000.claim")


def test_a_claim_taken_over_between_look_and_rename_is_put_back(tmp_path, monkeypatch):
    path = write_shards(tmp_path / "in", [3])[0]
    out = tmp_path / "out"
    out.mkdir()
    write_claim(out / "00000.claim", age=5000)
    fresh = json.dumps({"host": "rival", "pid": 1, "token": "fresh"}).encode()
    judge = rw.stale_reason

    def judged_then_taken_by_a_rival(data, mtime_ns, timeout):
        why = judge(data, mtime_ns, timeout)
        os.remove(out / "00000.claim")  # the rival takes it over first, all between our look and our rename
        (out / "00000.claim").write_bytes(fresh)
        return why

    monkeypatch.setattr(rw, "stale_reason", judged_then_taken_by_a_rival)
    assert rw.claim_shard(str(out), path, 0, timeout=900) is None
    assert sorted(os.listdir(out)) == ["00000.claim"] and (out / "00000.claim").read_bytes() == fresh


def test_heartbeat_keeps_the_claim_fresh_and_notices_a_takeover(tmp_path):
    path = write_shards(tmp_path / "in", [3])[0]
    out = tmp_path / "out"
    out.mkdir()
    claim = rw.claim_shard(str(out), path, 0, timeout=0.4)  # a beat every 0.1 s
    then = time.time() - 100
    os.utime(claim.path, (then, then))
    deadline = time.time() + 10  # generous: the machine may be busy
    while time.time() < deadline and os.stat(claim.path).st_mtime < then + 50:
        time.sleep(0.05)
    assert time.time() - os.stat(claim.path).st_mtime < 10 and not claim.lost
    rw.check_claim(claim)
    theirs = write_claim(out / "00000.claim")
    while time.time() < deadline and not claim.lost:
        time.sleep(0.05)
    assert claim.lost
    with pytest.raises(rw.ClaimLost):
        rw.check_claim(claim)
    rw.end_claim(claim)
    assert (out / "00000.claim").read_bytes() == theirs  # the new holder's claim is not ours to remove


def test_worker_whose_claim_was_taken_stops_writing(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(src, [20, 5])
    append = rw.append_partial
    theirs = []

    def append_then_lose_the_claim(path, tag, records):
        append(path, tag, records)
        if os.path.basename(path).startswith("00000") and not theirs:  # another worker takes 00000 over
            theirs.append(write_claim(out / "00000.claim"))

    monkeypatch.setattr(rw, "append_partial", append_then_lose_the_claim)
    stats = rw.main(eda_args(src, out))
    assert [s["shard"] for s in stats] == ["00001"]
    assert "WARNING 00000: another worker took this shard over" in capsys.readouterr().out
    assert not (out / "00000.jsonl").exists() and not (out / "00000.stats.json").exists()
    assert (out / "00000.tmp.partial").read_text().count("\n") == 1 + 5  # no chunk written after the loss
    assert (out / "00000.claim").read_bytes() == theirs[0] and not (out / "00001.claim").exists()


def test_claim_left_by_a_crash_in_this_process_is_resumed_by_the_next_run(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(src, [20, 5])
    rw.main(eda_args(src, tmp_path / "single"))
    append = rw.append_partial

    def append_then_crash(path, tag, records):
        append(path, tag, records)
        raise RuntimeError("the node went away")

    monkeypatch.setattr(rw, "append_partial", append_then_crash)
    with pytest.raises(RuntimeError):
        rw.main(eda_args(src, out))
    assert (out / "00000.claim").exists()
    monkeypatch.setattr(rw, "append_partial", append)
    capsys.readouterr()
    rw.main(eda_args(src, out))
    said = capsys.readouterr().out
    assert f"pid {os.getpid()} (worker 0, since " in said and "left by an earlier run in this process" in said
    assert "00000: resuming, 5 samples" in said
    assert outputs(out) == outputs(tmp_path / "single") and leftovers(out) == []


def test_assign_stride_is_the_old_split_and_claim_takes_its_own_first(tmp_path, capsys):
    src = tmp_path / "in"
    paths = write_shards(src)
    out = tmp_path / "stride"
    out.mkdir()
    for worker in range(3):
        taken = list(rw.take_shards(paths, str(out), worker, 3, "stride"))
        assert taken == [(p, None) for p in sorted(paths)[worker::3]]
    stats = rw.main(eda_args(src, out, "--assign", "stride", "--shard-id", "1", "--num-shards", "3"))
    assert [s["shard"] for s in stats] == ["00001", "00004"]
    assert "02_rewrite: 7 shards, worker 1/3 has 2, 0 already done" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["00001.jsonl", "00001.stats.json", "00004.jsonl", "00004.stats.json"]
    # claim, alone: it takes all, its own first
    stats = rw.main(eda_args(src, tmp_path / "claim", "--shard-id", "1", "--num-shards", "3"))
    assert [s["shard"] for s in stats] == ["00001", "00004", "00000", "00002", "00003", "00005", "00006"]
    said = capsys.readouterr().out
    assert "7 shards, 0 already done; worker 1/3 claims shards as it goes (its own 2 first" in said
    assert rw.main(eda_args(src, tmp_path / "claim", "--shard-id", "0", "--num-shards", "3")) == []
    assert leftovers(tmp_path / "claim") == []


def test_done_shard_is_never_claimed(tmp_path):
    path = write_shards(tmp_path / "in", [3])[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.stats.json").write_text("{}")
    assert rw.claim_shard(str(out), path, 0, timeout=900) is None
    assert list(rw.take_shards([path], str(out), 0, 1)) == [] and os.listdir(out) == ["00000.stats.json"]


def test_more_workers_than_shards_warns_once(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    write_shards(src, [3, 3])
    warning = "WARNING 16 workers for 2 shards: 14 will have nothing to do"
    monkeypatch.setenv("WORLD_SIZE", "8")
    for shard_id, rank in [(0, 0), (0, 3), (1, 0)]:
        monkeypatch.setenv("RANK", str(rank))
        rw.main(eda_args(src, tmp_path / "out", "--shard-id", str(shard_id), "--num-shards", "2"))
        assert (warning in capsys.readouterr().out) == (shard_id == rank == 0)


def test_ctrl_c_ends_in_one_line_releases_the_claim_and_the_same_command_resumes(tmp_path):
    """SIGINT mid-shard: exit 130, one line naming what is saved and how to resume, no traceback; the progress
    file holds whole records and the claim is gone (no --claim-timeout to wait out); the same command then
    finishes with every key once, the same bytes as an uninterrupted run."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(src)
    rw.main(eda_args(src, tmp_path / "single"))
    worker = subprocess.Popen(
        [sys.executable, "-c", SLOW_WORKER, REPO, *eda_args(src, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = out / "00000.tmp.partial"
    deadline = time.time() + 60
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 1 + 10):
        time.sleep(0.05)
    worker.send_signal(signal.SIGINT)
    stdout, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("02_rewrite: interrupted; 00000: ") and "re-run the same command to resume" in last
    saved = int(re.search(r"00000: (\d+) samples saved in (\S+)", last).group(1))
    assert saved >= 10 and str(partial) in last and not (out / "00000.stats.json").exists()
    assert (
        len(rw.read_partial(str(partial), json.loads((out / "_config.json").read_text())["prompt_hash"]))
        == saved
    )
    assert not (
        out / "00000.claim"
    ).exists()  # released: a re-run elsewhere need not wait for --claim-timeout
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "02_rewrite.py"), *eda_args(src, out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"00000: resuming, {saved} samples already rewritten" in result.stdout
    assert outputs(out) == outputs(tmp_path / "single") and leftovers(out) == []
