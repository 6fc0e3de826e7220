"""How torch's CPU threads behave on a quiet machine and beside another busy process, for the stages' own work.

    python bench/bench_threads.py                          # every workload whose data is here, 3 repeats
    python bench/bench_threads.py --workloads rewrite --repeats 5 --json bench/out/threads.json

Workloads (each a stage command, timed whole, wall clock):
  rewrite   02_rewrite.py --engine hf on one toy shard with the tiny random LLaMA (toy/: built when missing)
  toydata   00_toy_data.py at a small size (its tiny-LLaMA and tiny-LLaVA steps) into a scratch folder
  lit       05_train.py, one epoch of the real locked-image world's CLIP row (needs real/ with its image cache)
Arms (environment of the stage process):
  baseline  OMP_NUM_THREADS=<cores>: torch's own default, one OpenMP thread per core (05's image-cache rows:
            every core, as the stage now gives them)
  1 thread  OMP_NUM_THREADS=1 (what 05 gave a LiT row before: cores minus its DataLoader workers)
  rule      no variable: the stages' set_torch_threads, their share of the cores capped at the cores idle
            over a 0.2 s look at start
  passive   OMP_NUM_THREADS=<cores> and OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep, not spin); measured
            once, 1.36 to 1.42x slower than baseline on a quiet machine for the tiny models, so not adopted
Loads: quiet, and "1 busy" (a Python process spinning on one core, started and stopped by this script).
Arms and loads interleave per repeat; the table shows the median seconds and the ratio to the baseline
under the same load. A load average above 0.5 at the start is printed as a warning.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = str(len(os.sched_getaffinity(0)))
ARMS = {
    "baseline": {"OMP_NUM_THREADS": CORES},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "rule": {},
    "passive": {"OMP_NUM_THREADS": CORES, "OMP_WAIT_POLICY": "PASSIVE"},
}


def workload_commands(args, scratch):
    """{name: argv} for the workloads asked for whose inputs exist (toy data is built when missing)."""
    py = sys.executable
    commands = {}
    if "rewrite" in args.workloads:
        toy = os.path.join(ROOT, "toy")
        if not os.path.exists(os.path.join(toy, "meta_pairs.jsonl")):
            subprocess.run([py, "00_toy_data.py"], cwd=ROOT, check=True)
            subprocess.run([py, "01_collect_meta_pairs.py"], cwd=ROOT, check=True)
        shard = sorted(f for f in os.listdir(os.path.join(toy, "shards")) if f.endswith(".tar"))[0]
        commands["rewrite"] = [
            py, "02_rewrite.py", "--engine", "hf", "--input", os.path.join(toy, "shards", shard),
            "--out-dir", os.path.join(scratch, "rewrite"), "--chunk-size", "4096",
        ]  # fmt: skip
    if "toydata" in args.workloads:
        commands["toydata"] = [
            py, "00_toy_data.py", "--out", os.path.join(scratch, "toydata"), "--num-shards", "1",
            "--samples-per-shard", "32", "--eval-per-class", "2", "--retrieval-images", "8", "--coco-images", "8",
        ]  # fmt: skip
    if "lit" in args.workloads:
        real = os.path.join(ROOT, "real")
        if os.path.isdir(os.path.join(real, "image_cache")):
            shards = sorted(os.path.join(real, "shards", f) for f in os.listdir(os.path.join(real, "shards")))
            shards = [s for s in shards if s.endswith(".tar")][:3]
            commands["lit"] = [
                py, "05_train.py", "--input", *shards, "--model", os.path.join(real, "models", "real-lit.json"),
                "--image-weights", os.path.join(real, "models", "effnet-lite0.pt"),
                "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.5", "0.5", "0.5", "--lock-image",
                "--lock-image-freeze-bn-stats", "--image-cache", os.path.join(real, "image_cache"),
                "--image-cache-views", "2", "--image-cache-strong", "2", "--epochs", "1",
                "--out-dir", os.path.join(scratch, "lit"),
            ]  # fmt: skip
        else:
            print("bench_threads: lit left out: no real/image_cache (run runs/real.sh first)")
    return commands


def run_once(argv, arm_env, scratch):
    """Wall seconds of one stage command in a fresh process; its output folders are removed first."""
    for name in ("rewrite", "toydata", "lit"):
        shutil.rmtree(os.path.join(scratch, name), ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(arm_env)
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["rewrite", "toydata", "lit"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--json", default=None, help="also write the medians here")
    args = p.parse_args()
    load = os.getloadavg()[0]
    scratch = tempfile.mkdtemp(prefix="bench_threads_")
    commands = workload_commands(args, scratch)
    times = {}
    try:
        for _ in range(args.repeats):
            for load_name in ("quiet", "1 busy"):
                busy = None
                if load_name == "1 busy":
                    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    time.sleep(1)
                try:
                    for work, argv in commands.items():
                        for arm in args.arms:
                            arm_env = ARMS[arm]
                            seconds = run_once(argv, arm_env, scratch)
                            times.setdefault((work, load_name, arm), []).append(seconds)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"cores {len(os.sched_getaffinity(0))}, repeats {args.repeats}")
    print(f"{'workload':10s} {'load':8s} {'arm':10s} {'median s':>9s} {'vs baseline':>12s}")
    rows = []
    for (work, load_name, arm), values in times.items():
        median = statistics.median(values)
        base = statistics.median(times[(work, load_name, "baseline")])
        rows.append(
            {"workload": work, "load": load_name, "arm": arm, "seconds": median, "ratio": median / base}
        )
        print(f"{work:10s} {load_name:8s} {arm:10s} {median:9.1f} {median / base:11.2f}x")
    if load > 0.5:
        print(f"warning: load average {load:.2f} at the start: the 'quiet' rows were not quiet")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
