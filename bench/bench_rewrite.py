"""Benchmark 02_rewrite.py's generation engines against a named baseline: one prompt at a time.

    python bench/bench_rewrite.py                      # hf, then vllm (in .venv-vllm if this venv lacks it)
    python bench/bench_rewrite.py --engines hf --prompts 128 --json bench/out/rewrite.json

Prompts are the stage's own: LaCLIP prompts from 02's `build_prompt`, toy alt texts read with 02's
`read_samples`, 3 in-context examples per prompt from the meta pairs, sampled as the stage samples
(temperature 0.9, top-p 0.95, <= 77 new tokens, stop at "\n", a seed per prompt). Toy data is built
into --toy (00_toy_data.py, 01_collect_meta_pairs.py --sources human coco) when missing.
Arms, on the same loaded engine and the same torch thread count, each warmed up once before timing:
  hf    batched       TextEngine("hf").generate(prompts), --batch-size per batch (the stage's path)
  hf    one-at-a-time the same engine with batch_size=1, on an evenly spread subset (--baseline-prompts)
  vllm  batched       TextEngine("vllm", enforce_eager=True).generate(prompts), all of a round in one call
  vllm  one-at-a-time one generate call per prompt
  vllm  02 end-to-end  02_rewrite.main on --stage-prompts captions (a JSONL per round), --seed-mode per-sample and
                       per-chunk, each against a bare LLM.generate over the same first-attempt prompts
The arms alternate in --rounds slices (on a shared machine the load swings tenfold; --rounds 1 runs each
arm in one go). A load average above 0.5 at the start is printed as a warning under the table.
Prints a table (engine, arm, prompts, seconds, rewrites/s, tokens/s) and per engine
`<engine>: batched / one-at-a-time = X.Yx (goal >= 8x)`; for vLLM also `02 end-to-end / bare LLM.generate`
(goal >= 0.9) per seed mode, and what per-request seeds cost (bare generate with / without). Rates are per second, so arms that ran on
different numbers of prompts compare. Tokens are the returned completions re-tokenized (the stop
line end included): stop strings make lengths vary, so both rates are shown.
"""

import argparse
import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
rewrite = importlib.import_module("02_rewrite")
VLLM_VENV = os.path.join(ROOT, ".venv-vllm")
VLLM_PYTHON = os.path.join(VLLM_VENV, "bin", "python")
MARKER = "BENCH_RESULT "


def ensure_toy(toy):
    """Toy shards, tiny model and meta pairs under `toy`, built by the stage scripts when missing."""
    if not os.path.exists(os.path.join(toy, "models", "tiny-llama", "config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "00_toy_data.py"), "--out", toy], check=True)
    pairs = os.path.join(toy, "meta_pairs.jsonl")
    if not os.path.exists(pairs):
        coco = os.path.join(toy, "coco", "annotations", "captions_train2017.json")
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "01_collect_meta_pairs.py"),
                "--sources",
                "human",
                "coco",
                "--out",
                pairs,
                "--coco-captions",
                coco,
            ],
            check=True,
        )
    return os.path.join(toy, "models", "tiny-llama"), pairs


def build_prompts(toy, pairs_path, n, k=3, seed=0, style="laclip"):
    """n (prompt, seed) as 02's rewrite_llm makes them: each caption once per meta-pair source."""
    pools = rewrite.load_meta_pairs(pairs_path, None)
    prompts, seeds, counts = [], [], Counter()
    for shard in rewrite.list_inputs([os.path.join(toy, "shards")], (".tar",)):
        for key, text in rewrite.read_samples(shard, counts):
            caption = " ".join(rewrite.one_line(text or "").split()[:64])
            for source in pools if caption else ():
                rng = random.Random(rewrite.sample_seed(seed, rewrite.shard_name(shard), key, source, 0, -1))
                examples = rewrite.draw_examples(pools[source], k, rng)
                prompts.append(rewrite.build_prompt(caption, examples, style))
                seeds.append(rng.getrandbits(63))
                if len(prompts) == n:
                    return prompts, seeds
    return prompts, seeds


def timed(engine, prompts, seeds, one_at_a_time):
    """(seconds, completions); one_at_a_time = one generate call (hf: one batch) per prompt."""
    start = time.perf_counter()
    if one_at_a_time:
        outs = [engine.generate([p], [s], n=1, stop=["\n"])[0] for p, s in zip(prompts, seeds, strict=True)]
    else:
        outs = engine.generate(prompts, seeds, n=1, stop=["\n"])
    return time.perf_counter() - start, [o[0] for o in outs]


def run_arms(engine, name, prompts, seeds, args):
    """The batched arm on all prompts, the one-at-a-time baseline on an evenly spread subset. The arms
    alternate in --rounds slices, so a shared machine's swings in load fall on both alike."""
    step = max(1, len(prompts) // args.baseline_prompts)
    arms = {
        "one-at-a-time": (
            prompts[::step][: args.baseline_prompts],
            seeds[::step][: args.baseline_prompts],
            True,
        ),
        "batched": (prompts, seeds, False),
    }
    seconds, outs = Counter(), {arm: [] for arm in arms}
    for r in range(-1, args.rounds):  # round -1 warms each arm up: other text, same shapes
        for arm, (ps, ss, single) in arms.items():
            if name == "hf":
                engine.batch_size = 1 if single else args.batch_size
            else:
                engine.llm.reset_prefix_cache()  # no arm reuses prompts another arm (or the warm-up) cached
            if r < 0:
                warm = 1 if single else min(len(ps), args.batch_size)
                timed(engine, [p + " " for p in ps[:warm]], ss[:warm], single)
                continue
            lo, hi = len(ps) * r // args.rounds, len(ps) * (r + 1) // args.rounds
            dt, got = timed(engine, ps[lo:hi], ss[lo:hi], single)
            seconds[arm] += dt
            outs[arm] += got
    rows = []
    for arm, (ps, _, single) in arms.items():
        tokens = sum(engine.count_tokens(o if o.endswith("\n") else o + "\n") for o in outs[arm])
        rows.append(
            {
                "engine": name,
                "arm": arm,
                "prompts": len(ps),
                "seconds": round(seconds[arm], 3),
                "rewrites_per_s": round(len(ps) / seconds[arm], 2),
                "tokens_per_s": round(tokens / seconds[arm], 1),
                "tokens_per_rewrite": round(tokens / len(ps), 1),
                "batch_size": 1 if single else (args.batch_size if name == "hf" else len(ps) // args.rounds),
            }
        )
        print(f"  {name} {arm}: {len(ps)} prompts in {seconds[arm]:.1f}s", flush=True)
    return rows


def bench_engine(name, model, prompts, seeds, args):
    import torch

    torch.set_num_threads(args.threads)  # the same for both arms; vLLM's CPU workers bind their own
    start = time.perf_counter()
    if name == "hf":
        engine = rewrite.TextEngine("hf", model, 0.9, 0.95, 77, args.batch_size)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        engine = rewrite.TextEngine("vllm", model, 0.9, 0.95, 77, enforce_eager=True)
    print(f"  {name}: engine ready in {time.perf_counter() - start:.1f}s", flush=True)
    rows = run_arms(engine, name, prompts, seeds, args)
    if name == "vllm":
        rows += stage_arms(engine, args)
    return rows


def bare_generate(engine, prompts, seeds):
    """vLLM's LLM.generate alone, with the stage's sampling parameters: the ceiling for 02 end to end."""
    from vllm import SamplingParams

    params = []
    for seed in seeds:
        params.append(SamplingParams(n=1, temperature=0.9, top_p=0.95, max_tokens=77, seed=seed, stop=["\n"]))
    engine.llm.generate(prompts, params, use_tqdm=False)


def stage_arms(engine, args):
    """02 end to end (read, prompt, generate, check, write) against a bare LLM.generate over the same first-attempt
    prompts, both with per-request seeds and with none (--seed-mode per-chunk), in one process on one engine,
    alternating in --rounds slices of --stage-prompts toy captions (one meta-pair source: one prompt per caption).
    02 runs with --max-retries --stage-retries (default 0): it then generates exactly the bare arm's prompts, so the
    ratio is 02's own cost (the tiny toy model's rewrites are rejected often; retries are more generation, not
    overhead)."""
    import tempfile

    pools = rewrite.load_meta_pairs(args.pairs, ["human"])
    captions, counts = [], Counter()
    for shard in rewrite.list_inputs([os.path.join(args.toy, "shards")], (".tar",)):
        for key, text in rewrite.read_samples(shard, counts):
            if text and text.strip() and len(captions) < args.stage_prompts:
                captions.append((key, text))
    work = tempfile.mkdtemp(prefix="bench_rewrite_")
    rewrite.TextEngine = lambda *a, **k: engine  # the stage builds no second engine
    seconds, made = Counter(), Counter()
    for r in range(-1, args.rounds):  # round -1 warms up
        lo, hi = (
            (0, 8) if r < 0 else (len(captions) * r // args.rounds, len(captions) * (r + 1) // args.rounds)
        )
        part = os.path.join(work, f"r{r + 1}.jsonl")
        with open(part, "w") as f:
            for key, text in captions[lo:hi]:
                f.write(json.dumps({"key": key, "text": text}) + "\n")
        prompts, seeds = [], []
        for key, text in captions[lo:hi]:
            caption = " ".join(rewrite.one_line(text).split()[:64])
            rng = random.Random(rewrite.sample_seed(0, f"r{r + 1}", key, "human", 0, -1))
            prompts.append(
                rewrite.build_prompt(caption, rewrite.draw_examples(pools["human"], 3, rng), "laclip")
            )
            seeds.append(rng.getrandbits(63))
        for mode in ("per-sample", "per-chunk"):
            arms = {f"02 end-to-end, {mode} seeds": None, f"bare LLM.generate, {mode} seeds": None}
            for arm in arms:
                engine.llm.reset_prefix_cache()
                start = time.perf_counter()
                if arm.startswith("02"):
                    rewrite.main(
                        [
                            "--engine",
                            "vllm",
                            "--input",
                            part,
                            "--meta-pairs",
                            args.pairs,
                            "--sources",
                            "human",
                            "--out-dir",
                            os.path.join(work, f"{mode}-{r + 1}"),
                            "--seed-mode",
                            mode,
                            "--max-retries",
                            str(args.stage_retries),
                        ]
                    )
                else:
                    bare_generate(engine, prompts, seeds if mode == "per-sample" else [None] * len(seeds))
                if r >= 0:
                    seconds[arm] += time.perf_counter() - start
                    made[arm] += hi - lo
    rows = []
    for arm in seconds:
        rows.append(
            {
                "engine": "vllm",
                "arm": arm,
                "prompts": made[arm],
                "seconds": round(seconds[arm], 3),
                "rewrites_per_s": round(made[arm] / seconds[arm], 2),
                "tokens_per_s": 0,
                "tokens_per_rewrite": 0,
                "batch_size": made[arm] // args.rounds,
            }
        )
        print(f"  vllm {arm}: {made[arm]} captions in {seconds[arm]:.1f}s", flush=True)
    return rows


def vllm_elsewhere(args):
    """Rows from this script re-run in .venv-vllm with --only vllm, or a reason it could not run."""
    cmd = [
        VLLM_PYTHON,
        os.path.abspath(__file__),
        "--only",
        "vllm",
        "--toy",
        args.toy,
        "--prompts",
        str(args.prompts),
        "--stage-prompts",
        str(args.stage_prompts),
        "--stage-retries",
        str(args.stage_retries),
        "--baseline-prompts",
        str(args.baseline_prompts),
        "--rounds",
        str(args.rounds),
        "--threads",
        str(args.threads),
    ]
    print(f"vllm: not importable here, running {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ},
    )
    lines, result = [], None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER) :])
        elif line.startswith("  vllm"):
            print(line, end="", flush=True)
    if proc.wait() == 0 and result is not None:
        return result, None
    return [], f"FAILED (exit {proc.returncode}):\n    " + "\n    ".join(lines[-15:])


def ratio_lines(rows):
    lines = []
    for name in dict.fromkeys(r["engine"] for r in rows):
        arms = {r["arm"]: r for r in rows if r["engine"] == name}
        if len(arms) == 2:
            b, o = arms["batched"], arms["one-at-a-time"]
            lines.append(
                f"{name}: batched / one-at-a-time = {b['rewrites_per_s'] / o['rewrites_per_s']:.1f}x (goal >= 8x); "
                f"tokens/s {b['tokens_per_s'] / o['tokens_per_s']:.1f}x"
            )
        rate = {r["arm"]: r["rewrites_per_s"] for r in rows if r["engine"] == name}
        for mode in ("per-sample", "per-chunk"):
            stage, bare = (
                rate.get(f"02 end-to-end, {mode} seeds"),
                rate.get(f"bare LLM.generate, {mode} seeds"),
            )
            if stage and bare:
                lines.append(
                    f"{name}: 02 end-to-end / bare LLM.generate, {mode} seeds = {stage / bare:.2f}x (goal >= 0.9)"
                )
        seeded, unseeded = (
            rate.get("bare LLM.generate, per-sample seeds"),
            rate.get("bare LLM.generate, per-chunk seeds"),
        )
        if seeded and unseeded:
            lines.append(
                f"{name}: per-request seeds cost: bare generate with / without = {seeded / unseeded:.2f}x"
            )
    return lines


def print_table(rows, notes):
    cols = ("engine", "arm", "prompts", "seconds", "rewrites_per_s", "tokens_per_s", "tokens_per_rewrite")
    table = [[c.replace("_per_", "/") for c in cols]] + [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print()
    for row in table:
        print(
            "  ".join(
                cell.rjust(w) if i > 1 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(
        "(rates are per second of generate time, so the baseline's smaller subset compares with the full set)"
    )
    for line in ratio_lines(rows):
        print(line)
    for name, why in notes.items():
        print(f"{name}: {why}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--toy",
        default=os.path.join(ROOT, "bench", "out", "toy"),
        help="toy data folder (built when missing)",
    )
    p.add_argument("--prompts", type=int, default=256, help="prompts in the batched arm")
    p.add_argument(
        "--baseline-prompts", type=int, default=32, help="prompts in the one-at-a-time arm (evenly spread)"
    )
    p.add_argument(
        "--rounds", type=int, default=4, help="the arms alternate in this many slices (load swings)"
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="hf batch size in the batched arm (02's default)"
    )
    p.add_argument(
        "--engines", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"], help="engines to measure"
    )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads, the same for every arm"
    )
    p.add_argument(
        "--stage-prompts", type=int, default=1024, help="captions in the 02 end-to-end vs bare generate arms"
    )
    p.add_argument("--stage-retries", type=int, default=0, help="02's --max-retries in its end-to-end arm")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--only", choices=["vllm"], default=None, help="internal: the vLLM part alone, result printed as JSON"
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.toy = os.path.abspath(args.toy)
    model, pairs = ensure_toy(args.toy)
    args.pairs = pairs
    prompts, seeds = build_prompts(args.toy, pairs, args.prompts)
    if args.only:
        print(MARKER + json.dumps(bench_engine("vllm", model, prompts, seeds, args)), flush=True)
        return
    print(
        f"bench_rewrite: {len(prompts)} LaCLIP prompts from {args.toy}, {args.threads} threads, "
        f"hf batch size {args.batch_size}, one-at-a-time on {min(args.baseline_prompts, len(prompts))}",
        flush=True,
    )
    rows, notes = [], {}
    load = os.getloadavg()[0]
    if load > 0.5:  # other jobs steal the cores (and stall multi-threaded kernels): timings do not compare
        notes["WARNING"] = (
            f"load average {load:.1f} on {os.cpu_count()} cores before starting: the machine was busy"
        )
        print(notes["WARNING"], flush=True)
    if "hf" in args.engines:
        rows += bench_engine("hf", model, prompts, seeds, args)
    if "vllm" in args.engines:
        if importlib.util.find_spec("vllm") is not None:
            rows += bench_engine("vllm", model, prompts, seeds, args)
        elif os.path.exists(VLLM_PYTHON) and os.path.realpath(sys.prefix) != os.path.realpath(VLLM_VENV):
            got, why = vllm_elsewhere(args)
            rows += got
            notes.update({"vllm": why} if why else {})
        else:
            notes["vllm"] = "SKIPPED (not installed)"
    print_table(rows, notes)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "rows": rows, "ratios": ratio_lines(rows), "notes": notes}, f, indent=1
            )


if __name__ == "__main__":
    main()
