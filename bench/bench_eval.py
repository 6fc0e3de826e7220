"""Benchmark 06_eval.py against CLIP_benchmark: wall time and metrics on the same toy model and the same data.

    python bench/bench_eval.py                      # builds what is missing under bench/out/, then both tools
    python bench/bench_eval.py --pretrained toy/train/alt/latest.pt --json bench/out/eval.json

Data: toy eval sets from 00_toy_data.py (--eval-per-class images for each of 8 shape classes, --retrieval-images
images x 5 captions), written once more in CLIP_benchmark's local wds layout (<set>/test/{0..3}.tar + nshards.txt,
classnames.txt, zeroshot_classification_templates.txt, dataset_type.txt): both tools read those same tars.
Model: toy-clip from --pretrained (a 05_train.py checkpoint with toy-clip.json beside it), else one trained here for
--train-steps on the toy shards' AltText and saved in 05's layout (latest.pt + toy-clip.json).
CLIP_benchmark 1.6.2 runs in its own venv, bench/out/venv-clipbench (made when missing: this venv's torch and
torchvision versions, numpy < 2.4 for its zero-shot path, and requests, which it imports without declaring),
with --no_amp (on CPU its default bf16 autocast changes results); 06 runs in that same venv, so both use one torch.
Both get the same batch size, DataLoader workers and torch threads. Timed: the evaluation call in-process (imports
done before the clock starts; model load, data decoding, encoding and metrics inside), best and median of --repeats,
the tools alternating so that changes in machine load hit both alike.
Prints both metric sets side by side: each must be the same, or differ by no more than the share of queries that an
exact score tie decided (identical captions of two images tie exactly: CLIP_benchmark's topk then takes the data
order's pick, 06 the average over tie orders); exit status 1 otherwise. Then per task `CLIP_benchmark / 06_eval = X.Yx`
(above 1: 06 is faster).
CLIP_benchmark's linear probe asserts device == 'cuda', so on CPU only 06's probe is run and shown.

    python bench/bench_eval.py --probe-memory 100000   # the probe's peak memory only, both solvers

measures (Linux: VmHWM) what 06's linear probe adds at peak to N x 512 random normalised features with 1000
classes, against a formula of its arrays, and states the formula at ImageNet-1k's 1,281,167 x 512.
"""

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
VENV = os.path.join(OUT, "venv-clipbench")
VENV_PY = os.path.join(VENV, "bin", "python")
MARKER = "BENCH_RESULT "
METRICS = {
    "zeroshot": ["acc1", "acc5", "mean_per_class_recall"],
    "retrieval": [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)],
}


def ensure_toy(toy, args):
    if not os.path.exists(os.path.join(toy, "eval", "retrieval", "captions.jsonl")):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "00_toy_data.py"),
                "--out",
                toy,
                "--skip-models",
                "--num-shards",
                "2",
                "--eval-per-class",
                str(args.eval_per_class),
                "--retrieval-images",
                str(args.retrieval_images),
            ],
            check=True,
        )


def ensure_checkpoint(toy, out, steps, seed=0):
    """A toy-clip trained on the shards' AltText with the symmetric CLIP loss, saved as 05_train.py saves."""
    ckpt = os.path.join(out, "latest.pt")
    if os.path.exists(ckpt):
        return ckpt
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(toy, "models", "toy-clip.json"), os.path.join(out, "toy-clip.json"))
    open_clip.add_model_config(os.path.join(out, "toy-clip.json"))
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms("toy-clip")
    tokenizer = open_clip.get_tokenizer("toy-clip")
    samples = {}
    for shard in sorted(f for f in os.listdir(os.path.join(toy, "shards")) if f.endswith(".tar")):
        with tarfile.open(os.path.join(toy, "shards", shard)) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    pairs = [
        (preprocess(Image.open(io.BytesIO(s["jpg"])).convert("RGB")), s["txt"].decode())
        for s in samples.values()
    ]
    opt, rng = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1), random.Random(seed)
    start = time.time()
    for _ in range(steps):
        batch = rng.sample(pairs, 128)
        f_i, f_t, scale = model(torch.stack([x for x, _ in batch]), tokenizer([t for _, t in batch]))
        logits, labels = scale * f_i @ f_t.T, torch.arange(len(batch))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(
        {
            "epoch": 1,
            "step": steps,
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "args": {"steps": steps, "lr": 1e-3, "batch_size": 128, "texts": "alt"},
            "model_name": "toy-clip",
        },
        ckpt,
    )
    print(
        f"trained toy-clip for {steps} steps on {len(pairs)} AltText pairs in {time.time() - start:.0f}s (loss {loss.item():.2f}) -> {ckpt}"
    )
    return ckpt


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(folder, samples, meta, shards):
    """CLIP_benchmark's local wds layout (build_wds_dataset): <folder>/test/{0..N-1}.tar + nshards.txt, metadata beside.
    It splits shards over DataLoader workers and stops when a worker gets none: at least as many shards as workers."""
    if os.path.exists(os.path.join(folder, "test", "nshards.txt")):
        return folder
    os.makedirs(os.path.join(folder, "test"), exist_ok=True)
    for shard in range(shards):
        with tarfile.open(os.path.join(folder, "test", f"{shard}.tar"), "w") as tar:
            for i in range(shard, len(samples), shards):
                for ext, data in samples[i].items():
                    add_member(tar, f"s{i:07d}.{ext}", data)
    for name, text in {**meta, "test/nshards.txt": f"{shards}\n"}.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return folder


def toy_as_wds(toy, out, shards):
    zs, rt = os.path.join(toy, "eval", "zeroshot"), os.path.join(toy, "eval", "retrieval")
    read = lambda *parts: open(os.path.join(*parts), "rb").read()
    names = [n.strip() for n in open(os.path.join(zs, "classnames.txt")) if n.strip()]
    samples = [
        {"jpg": read(zs, n, f), "cls": str(c).encode()}
        for c, n in enumerate(names)
        for f in sorted(os.listdir(os.path.join(zs, n)))
    ]
    meta = {
        "classnames.txt": "\n".join(names) + "\n",
        "zeroshot_classification_templates.txt": read(zs, "templates.txt").decode(),
    }
    zs_wds = write_wds(os.path.join(out, "zeroshot"), samples, meta, shards)
    records = [json.loads(line) for line in open(os.path.join(rt, "captions.jsonl"))]
    samples = [{"jpg": read(rt, r["image"]), "txt": "\n".join(r["captions"]).encode()} for r in records]
    return zs_wds, write_wds(
        os.path.join(out, "retrieval"), samples, {"dataset_type.txt": "retrieval\n"}, shards
    )


def ensure_venv():
    if (
        os.path.exists(VENV_PY)
        and subprocess.run([VENV_PY, "-c", "import clip_benchmark, requests"], capture_output=True).returncode
        == 0
    ):
        return
    import torch
    import torchvision

    pins = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
    ]
    print(f"making {VENV}: clip_benchmark==1.6.2 {' '.join(pins)} numpy<2.4 requests", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", VENV], check=True)
    subprocess.run(
        [VENV_PY, "-m", "pip", "install", "-q", *pins, "numpy<2.4", "requests", "clip_benchmark==1.6.2"],
        check=True,
    )


RUN_06 = """
import importlib, json, sys, time, torch, open_clip
torch.set_num_threads({threads})
sys.path.insert(0, {root!r})
ev = importlib.import_module("06_eval")
start = time.perf_counter()
records = ev.main({argv!r})
print({marker!r} + json.dumps({{"seconds": time.perf_counter() - start, "records": records}}))
"""
RUN_CB = """
import json, sys, time, torch, open_clip
torch.set_num_threads({threads})
open_clip.add_model_config({config!r})
from clip_benchmark.cli import main
sys.argv = ["clip_benchmark"] + {argv!r}
start = time.perf_counter()
main()
print({marker!r} + json.dumps({{"seconds": time.perf_counter() - start, "metrics": json.load(open({output!r}))["metrics"]}}))
"""

RUN_PROBE = """
import importlib, json, sys, time, torch
torch.set_num_threads({threads})
sys.path.insert(0, {root!r})
ev = importlib.import_module("06_eval")


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


g = torch.Generator().manual_seed(0)
x = torch.randn({n}, {dim}, generator=g)
x /= x.norm(dim=1, keepdim=True)  # in place: the features are held once, as 06's encode_images holds them
y = torch.randint(0, {classes}, ({n},), generator=g)
test_x = torch.randn({n_test}, {dim}, generator=g)
test_x /= test_x.norm(dim=1, keepdim=True)
test_y = torch.randint(0, {classes}, ({n_test},), generator=g)
# a small probe first: torch's first backward and optimiser step page in some 300 MB of library code, once
w = slice(0, 2000)
ev.linear_probe(x[w], y[w], test_x[w], test_y[w], {classes}, grid=(1,), solver={solver!r}, steps=1)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to what is held now: features and all
held = status("VmRSS:")
start = time.perf_counter()
_, extra = ev.linear_probe(x, y, test_x, test_y, {classes}, grid=(1e-4,), solver={solver!r}, steps={steps})
seconds = time.perf_counter() - start
result = {{"held": held, "peak": status("VmHWM:"), "seconds": seconds, "features": x.numel() * 4}}
print({marker!r} + json.dumps({{**result, "solver": extra["solver"]}}))
"""


def run(code, python=VENV_PY):
    start = time.perf_counter()
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode or not lines:
        raise SystemExit(
            f"run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return {**json.loads(lines[-1][len(MARKER) :]), "process_seconds": time.perf_counter() - start}


def bench_task(task, data, ckpt, config, args):
    results = os.path.join(OUT, "eval_results.jsonl")
    ours = [
        "--model",
        "toy-clip",
        "--pretrained",
        ckpt,
        "--name",
        "bench",
        "--results",
        results,
        "--overwrite",
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--zeroshot" if task == "zeroshot" else "--retrieval",  # 06 runs only the task it is given
        data,
    ]
    output = os.path.join(OUT, f"clip_benchmark_{task}.json")
    theirs = [
        "eval",
        "--dataset",
        f"wds/{task}",
        "--dataset_root",
        data,
        "--model",
        "toy-clip",
        "--pretrained",
        ckpt,
        "--task",
        "zeroshot_classification" if task == "zeroshot" else "zeroshot_retrieval",
        "--output",
        output,
        "--batch_size",
        str(args.batch_size),
        "--num_workers",
        str(args.workers),
        "--no_amp",
        "--recall_k",
        "1",
        "5",
        "10",
        "--quiet",
    ]
    rows = {"06_eval": [], "CLIP_benchmark": []}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        r = run(RUN_06.format(threads=args.threads, root=ROOT, argv=ours, marker=MARKER))
        rows["06_eval"].append(
            {**r, "metrics": r["records"][0]["metrics"], "ties": r["records"][0].get("ties", {})}
        )
        rows["CLIP_benchmark"].append(
            run(RUN_CB.format(threads=args.threads, config=config, argv=theirs, marker=MARKER, output=output))
        )
        print(
            f"  {task}: 06_eval {rows['06_eval'][-1]['seconds']:.2f}s, "
            f"CLIP_benchmark {rows['CLIP_benchmark'][-1]['seconds']:.2f}s",
            flush=True,
        )
    return {
        tool: {
            "seconds": min(r["seconds"] for r in rs),
            "median_seconds": sorted(r["seconds"] for r in rs)[len(rs) // 2],
            "process_seconds": min(r["process_seconds"] for r in rs),
            "metrics": rs[0]["metrics"],
            "ties": rs[0].get("ties", {}),
            "same_every_run": all(r["metrics"] == rs[0]["metrics"] for r in rs),
        }
        for tool, rs in rows.items()
    }


def probe_bytes(solver, n, dim, classes, n_test, batch=4096, chunk=8192):
    """Bytes the probe holds beyond the features (4 n dim), by 06's code. minibatch: index and label vectors
    of 8 bytes (fit + val, the refit's, a permutation and its order: ~5 n), W with its gradient and two
    optimiser states, a batch of rows and 3 of logits, a validation chunk of rows and logits, the test rows.
    lbfgs: the fit rows copied (4 n dim), made float64 with a bias column, ~3 float64 logit-sized arrays."""
    if solver == "minibatch":
        vectors = 5 * 8 * n
        weights = 4 * 4 * (dim + 1) * classes
        batches = 4 * batch * (dim + 3 * classes) + 4 * chunk * (dim + 1 + classes)
        return vectors + weights + batches + 4 * n_test * (dim + 1)
    return 4 * n * dim + 8 * n * (dim + 1) + 3 * 8 * n * classes


def probe_memory(args):
    """Peak memory of 06's linear probe beyond the features it is given, measured (one lambda and the refit, a
    few steps per fit: memory does not depend on steps) and estimated at ImageNet-1k's 1,281,167 x 512."""
    n, dim, classes, n_test, imagenet = args.probe_memory, 512, 1000, 10000, 1281167
    print(f"linear probe memory: {n} x {dim} float32 features, {classes} classes, {n_test} test, CPU")
    for solver in ("minibatch", "lbfgs"):
        code = RUN_PROBE.format(
            threads=args.threads,
            root=ROOT,
            marker=MARKER,
            n=n,
            dim=dim,
            classes=classes,
            n_test=n_test,
            solver=solver,
            steps=3,
        )
        r = run(code, sys.executable)
        added = (r["peak"] - r["held"]) / 2**20
        formula = probe_bytes(solver, n, dim, classes, n_test) / 2**20
        at_imagenet = (4 * imagenet * dim + probe_bytes(solver, imagenet, dim, classes, 50000)) / 2**30
        features = r["features"] / 2**20
        print(
            f"  {solver:<9}: features {features:.0f} MiB, the probe added {added:.0f} MiB at peak "
            f"(formula {formula:.0f} MiB; {r['seconds']:.0f}s)"
        )
        print(f"  {solver:<9}: at {imagenet:,} x {dim}, 50k test: features + formula = {at_imagenet:.1f} GiB")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--toy", default=os.path.join(OUT, "toy-eval"), help="toy data folder (built when missing)"
    )
    p.add_argument(
        "--eval-per-class", type=int, default=125, help="zero-shot images per class when building --toy"
    )
    p.add_argument(
        "--retrieval-images",
        type=int,
        default=1000,
        help="retrieval images (5 captions each) when building --toy",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="toy-clip checkpoint with toy-clip.json beside it (default: train one)",
    )
    p.add_argument("--train-steps", type=int, default=150, help="steps of the checkpoint trained here")
    p.add_argument("--batch-size", type=int, default=64, help="both tools")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, both tools")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both tools")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per tool and task (best is reported)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--probe-memory",
        type=int,
        default=0,
        metavar="N",
        help="only measure the linear probe's peak memory on N random 512-d features, 1000 classes (both "
        "solvers, CPU), and estimate it at ImageNet-1k's size",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.probe_memory:
        return probe_memory(args)
    toy = os.path.abspath(args.toy)
    ensure_toy(toy, args)
    ckpt = (
        os.path.abspath(args.pretrained)
        if args.pretrained
        else ensure_checkpoint(toy, os.path.join(OUT, "ckpt-alt"), args.train_steps)
    )
    config = os.path.join(os.path.dirname(ckpt), "toy-clip.json")
    zs, rt = toy_as_wds(
        toy, os.path.join(os.path.dirname(toy), os.path.basename(toy) + "-wds"), max(4, args.workers)
    )
    ensure_venv()
    print(
        f"bench_eval: {ckpt}; {args.threads} threads, batch {args.batch_size}, {args.workers} workers, best of {args.repeats}",
        flush=True,
    )
    report = {
        task: bench_task(task, data, ckpt, config, args)
        for task, data in (("zeroshot", zs), ("retrieval", rt))
    }
    probe = run(
        RUN_06.format(
            threads=args.threads,
            root=ROOT,
            marker=MARKER,
            argv=[
                "--model",
                "toy-clip",
                "--pretrained",
                ckpt,
                "--name",
                "bench",
                "--results",
                os.path.join(OUT, "eval_results.jsonl"),
                "--overwrite",
                "--linear-probe",
                zs,
                "--workers",
                str(args.workers),
                "--device",
                "cpu",
            ],
        )
    )["records"][0]
    worst, verdicts = 0.0, []
    print(
        f"\n{'task':<10} {'metric':<27} {'06_eval':>9} {'CLIP_benchmark':>15} {'|diff|':>8} {'tied':>6}  verdict"
    )
    for task, tools in report.items():
        for key in METRICS[task]:
            a, b = tools["06_eval"]["metrics"].get(key), tools["CLIP_benchmark"]["metrics"].get(key)
            diff, tied = abs(a - b), tools["06_eval"]["ties"].get(key, 0.0)
            # where exact score ties decide a query, CLIP_benchmark's topk takes one tie order (the data order's),
            # 06 the average over all orders: they can differ by at most the share of such queries
            verdict = "same" if diff <= 1e-6 else "within ties" if diff <= tied + 1e-6 else "DISAGREE"
            worst, verdicts = max(worst, diff), verdicts + [verdict]
            print(f"{task:<10} {key:<27} {a:>9.4f} {b:>15.4f} {diff:>8.1e} {tied:>6.3f}  {verdict}")
    agree = "DISAGREE" not in verdicts
    print(
        f"largest difference {worst:.1e}: {'AGREE' if agree else 'DISAGREE'} ({verdicts.count('same')} of {len(verdicts)} the same; "
        f"'tied' = share of queries an exact score tie decided, e.g. two images' identical captions)"
    )
    for task, tools in report.items():
        a, b = tools["06_eval"], tools["CLIP_benchmark"]
        print(
            f"{task}: 06_eval {a['seconds']:.2f}s, CLIP_benchmark {b['seconds']:.2f}s -> "
            f"CLIP_benchmark / 06_eval = {b['seconds'] / a['seconds']:.2f}x (medians {a['median_seconds']:.2f}s vs "
            f"{b['median_seconds']:.2f}s: {b['median_seconds'] / a['median_seconds']:.2f}x)"
            f" (whole process incl. imports: {a['process_seconds']:.1f}s vs {b['process_seconds']:.1f}s)"
        )
    print(
        "linear probe (06 only; CLIP_benchmark's needs CUDA): "
        + ", ".join(f"{k} {v:.4f}" for k, v in probe["metrics"].items())
        + f", lambda {probe['lambda']:.0e}, n {probe['n']}, {probe['seconds']:.1f}s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "checkpoint": ckpt,
                    "report": report,
                    "linear_probe": probe,
                    "largest_difference": worst,
                    "agree": agree,
                },
                f,
                indent=1,
            )
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
