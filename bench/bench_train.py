"""Benchmark 05_train.py against open_clip's own trainer (open_clip_train.main) on the same toy data, side by side.

    python bench/bench_train.py                                 # builds bench/out/toy and bench/out/venv-openclip when missing
    python bench/bench_train.py --epochs 1 3 --batch-size 64 --workers 2 --threads 2 --json bench/out/train.json

Both trainers get the same model config (00's toy-clip.json: a 2-layer ViT, 64 px), shards (4 x 800 toy samples), batch
size, DataLoader workers, torch threads (OMP_NUM_THREADS), fp32, AdamW (lr 1e-3, wd 0.2, betas 0.9/0.98, eps 1e-6),
warmup, seed, AltText only, and a checkpoint per epoch. Each runs as a subprocess twice, for E1 and E2 epochs, arms
interleaved, in --repeats rounds (default 3; the ratios printed are the medians over rounds); steady samples/s = (samples(E2) - samples(E1)) / (seconds(E2) - seconds(E1)), which cancels start-up
(imports, model build) and keeps everything paid per epoch (data, steps, worker start, checkpoints). The same difference
over CPU seconds (user + system of the trainer and its DataLoader workers) is shown beside it: when other work shares the
cores, wall time swings with it and CPU time much less. End-to-end samples/s of the E2 run is shown too. Peak memory: the
highest sum of PSS over the trainer's process tree (shared pages counted once), sampled every 0.1 s.
Prints a table and `05_train / open_clip_train steady samples/s = X.XXx (goal >= 1.10); per CPU-second Y.YYx
(goal >= 1.10); peak memory Z.ZZx (goal <= 1.0)`, with the load average before the run.
On 2 cores with 2 workers, use 1 thread: 2 OpenMP threads beside 2 busy workers spin and run several times slower.

open_clip_train needs webdataset 0.2.86 (1.0.x crashes it: KeyError 'fname'), pandas, braceexpand and fsspec, so it runs
in its own venv (--openclip-venv), made here with pip when missing, with this venv's torch, torchvision and open_clip
versions. It has no flag for a custom model config: a two-line wrapper registers toy-clip.json, then calls its main().
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
WRAPPER = "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); from open_clip_train.main import main; main(sys.argv[2:])"


def ensure_toy(toy):
    if not os.path.exists(os.path.join(toy, "shards", "00003_stats.json")):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "00_toy_data.py"), "--out", toy, "--skip-models"], check=True
        )
    return os.path.join(toy, "shards"), os.path.join(toy, "models", "toy-clip.json")


def ensure_openclip_venv(venv):
    python = os.path.join(venv, "bin", "python")
    check = "import open_clip_train.main, webdataset; assert webdataset.__version__ == '0.2.86'"
    if os.path.exists(python) and subprocess.run([python, "-c", check], capture_output=True).returncode == 0:
        return python
    import open_clip
    import torch
    import torchvision

    versions = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"open_clip_torch=={open_clip.__version__}",
        "webdataset==0.2.86",
        "braceexpand",
        "pandas",
        "fsspec",
    ]
    print(f"creating {venv}: pip install {' '.join(versions)}", flush=True)
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *versions], check=True)
    return python


def tree_pss_kib(pid):
    """Sum of PSS (KiB) over `pid` and its descendants; shared pages are split between the processes that map them."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def cpu_seconds():
    # every waited-for descendant: the trainer and its DataLoader workers
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd, env, log_path):
    """(wall seconds, CPU seconds, peak PSS MiB) of a subprocess tree, its output kept in log_path."""
    with open(log_path, "w") as log:
        start, cpu, peak = time.perf_counter(), cpu_seconds(), 0
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None:
            peak = max(peak, tree_pss_kib(proc.pid))
            time.sleep(0.1)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if proc.returncode:
        raise SystemExit(
            f"{cmd[0]} ... failed ({proc.returncode}); see {log_path}:\n" + open(log_path).read()[-3000:]
        )
    return seconds, cpu, peak / 1024


def commands(arm, epochs, args, shards, config, work, openclip_python):
    if arm == "05_train":
        return [
            sys.executable,
            os.path.join(ROOT, "05_train.py"),
            "--input",
            shards,
            "--model",
            config,
            "--out-dir",
            work,
            "--epochs",
            str(epochs),
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--lr",
            "1e-3",
            "--wd",
            "0.2",
            "--eps",
            "1e-6",
            "--crop-scale",
            "0.9",
            "--warmup",
            "20",
            "--seed",
            "0",
            "--precision",
            "fp32",
            "--log-every",
            "10",
            "--save-every",
            "100000",
        ]
    return [
        openclip_python,
        "-c",
        WRAPPER,
        config,
        "--train-data",
        os.path.join(shards, "{00000..00003}.tar"),
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(args.samples),
        "--model",
        "toy-clip",
        "--epochs",
        str(epochs),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--lr",
        "1e-3",
        "--wd",
        "0.2",
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--warmup",
        "20",
        "--seed",
        "0",
        "--precision",
        "fp32",
        "--log-every-n-steps",
        "10",
        "--logs",
        os.path.dirname(work),
        "--name",
        os.path.basename(work),
        "--save-frequency",
        "1",
        "--report-to",
        "",
    ]


def steady_rates(result, epochs):
    """Per arm, samples/s and samples per CPU-second between the E1 and the E2 run of one round (start-up cancels)."""
    e1, e2 = epochs
    steady, per_cpu = {}, {}
    for arm in ("05_train", "open_clip_train"):
        a, b = result[arm, e1], result[arm, e2]
        steady[arm] = (b["samples"] - a["samples"]) / (b["seconds"] - a["seconds"])
        per_cpu[arm] = (b["samples"] - a["samples"]) / (b["cpu_seconds"] - a["cpu_seconds"])
    return {
        "steady": steady,
        "per_cpu": per_cpu,
        "ratio": steady["05_train"] / steady["open_clip_train"],
        "cpu_ratio": per_cpu["05_train"] / per_cpu["open_clip_train"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--toy",
        default=os.path.join(OUT, "toy"),
        help="toy data folder (built by 00_toy_data.py --skip-models if missing)",
    )
    p.add_argument(
        "--openclip-venv",
        default=os.path.join(OUT, "venv-openclip"),
        help="virtualenv with open_clip_train + webdataset 0.2.86",
    )
    p.add_argument("--epochs", type=int, nargs=2, default=[1, 3], help="the two run lengths (E1 < E2)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of both trainers")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of both trainers")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of both trainers (OMP_NUM_THREADS; 2 cores and 2 workers: 1)",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the ratios are their medians")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    shards, config = ensure_toy(args.toy)
    args.samples = sum(
        json.load(open(os.path.join(shards, f)))["successes"]
        for f in os.listdir(shards)
        if f.endswith("_stats.json")
    )
    openclip_python = ensure_openclip_venv(args.openclip_venv)
    e1, e2 = args.epochs
    load = os.getloadavg()[0]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        PYTHONWARNINGS="ignore",
    )
    runs, rounds = [], []
    for repeat in range(args.repeats):  # rounds interleaved: drifting machine load hits both arms alike
        result = {}
        for epochs in args.epochs:
            for arm in ("05_train", "open_clip_train"):
                work = os.path.join(OUT, "train_runs", f"{arm}_e{epochs}")
                shutil.rmtree(work, ignore_errors=True)
                os.makedirs(os.path.dirname(work), exist_ok=True)
                cmd = commands(arm, epochs, args, shards, config, work, openclip_python)
                seconds, cpu, peak = timed(cmd, env, work + ".log")
                run = {
                    "round": repeat,
                    "arm": arm,
                    "epochs": epochs,
                    "samples": epochs * args.samples,
                    "seconds": round(seconds, 2),
                    "cpu_seconds": round(cpu, 2),
                    "samples_per_s": round(epochs * args.samples / seconds, 1),
                    "peak_pss_mib": round(peak),
                }
                runs.append(run)
                result[arm, epochs] = run
                print(
                    f"round {repeat + 1}: {arm:16s} {epochs} epoch(s): {seconds:7.1f}s wall, {cpu:7.1f}s CPU, "
                    f"peak PSS {peak:6.0f} MiB",
                    flush=True,
                )
        rounds.append(steady_rates(result, args.epochs))
        print(
            f"round {repeat + 1}: 05_train / open_clip_train steady {rounds[-1]['ratio']:.2f}x, "
            f"per CPU-second {rounds[-1]['cpu_ratio']:.2f}x",
            flush=True,
        )
    print(
        f"\n{'trainer':16s} {'steady samples/s':>17s} {'samples per CPU-s':>18s} {'peak PSS MiB':>13s}  (medians of "
        f"{args.repeats} rounds)"
    )
    steady, per_cpu, peaks = {}, {}, {}
    for arm in ("05_train", "open_clip_train"):
        steady[arm] = statistics.median(r["steady"][arm] for r in rounds)
        per_cpu[arm] = statistics.median(r["per_cpu"][arm] for r in rounds)
        peaks[arm] = max(run["peak_pss_mib"] for run in runs if run["arm"] == arm)
        print(f"{arm:16s} {steady[arm]:17.1f} {per_cpu[arm]:18.1f} {peaks[arm]:13d}")
    ratio = statistics.median(r["ratio"] for r in rounds)
    cpu_ratio = statistics.median(r["cpu_ratio"] for r in rounds)
    memory_ratio = peaks["05_train"] / peaks["open_clip_train"]
    print(
        f"\n05_train / open_clip_train steady samples/s = {ratio:.2f}x (goal >= 1.10); per CPU-second "
        f"{cpu_ratio:.2f}x (goal >= 1.10); peak memory {memory_ratio:.2f}x (goal <= 1.0); medians of "
        f"{args.repeats} interleaved rounds; batch {args.batch_size}, {args.workers} workers, {args.threads} "
        f"threads, {args.samples} samples/epoch, epochs {e1} and {e2}, load average before {load:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "runs": runs,
                    "rounds": rounds,
                    "steady_samples_per_s": steady,
                    "samples_per_cpu_s": per_cpu,
                    "ratio": ratio,
                    "cpu_ratio": cpu_ratio,
                    "memory_ratio": memory_ratio,
                    "args": vars(args),
                },
                f,
                indent=1,
            )
    return ratio


if __name__ == "__main__":
    main()
