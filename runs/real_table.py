"""The real-data tables: mean ± sd over seeds per method, and its paired difference to a baseline (95% bootstrap).

From 06's results.jsonl rows named "<method> (seed N)" and, for the intervals, 06's --item-results file.

Usage: python runs/real_table.py real/eval/results.jsonl [--items real/eval/results.items.jsonl]
           [--baseline "CLIP (AltText)"] [--draws 2000] [--out real/eval/table.md] [--json real/eval/table.json]
Columns: zero-shot top-1 on the held-out clip-art classes and on Fashion-MNIST, retrieval R@1/R@5 both ways
on the held-out clip-art titles, the linear probe on the clip-art classes, and retrieval R@1/R@5 both ways on
the held-out Tux Paint stamps against the sentences people wrote for them; percent; a column no row has is
left out. Rows keep the order
in which their methods first appear in the results file; of a (name, task, dataset) measured twice, the newest
row counts (as in 06's own table).

Differences (second table), per method and metric, in points: method minus baseline, paired by seed (the seeds
both have) and by eval item (06 --item-results: every model's outcome on every item, in the same item order).
  estimate  mean over the shared seeds of (method's metric - baseline's metric) = the difference of the means
  interval  two-way percentile bootstrap, --draws draws (2000), seeded (--bootstrap-seed): a draw resamples the
            shared seeds with replacement and, independently, the eval items with replacement, the same items
            for both methods and every seed (items are crossed with seeds: every model sees every item); its
            value is the mean over the drawn seeds of the mean over the drawn items of (method - baseline).
            The interval is the 2.5 and 97.5 percentiles of the draws. Resampling both ways counts the item x
            seed noise twice, so the interval is on the wide side (conservative): in tests/test_real_table.py 39
            of 40 no-effect worlds of 2 seeds x 300 items cover 0.
  marked    ✓ and bold where the interval excludes 0; "not seen" where it does not.
  detectable  the minimum detectable effect at 80% power for a two-sided 5% test,
            MDE = (z_0.975 + z_0.80) x SE = 2.80 x SE, SE the standard deviation of the bootstrap draws (the
            standard error of the paired difference); the table's last row gives per metric the median MDE over
            the methods compared. A true effect of that size is seen about 4 times in 5; smaller ones mostly not.
Without items for a cell (no --items file, an old run, items of other weights or in another order), its interval
resamples the seeds only (marked †, and said below the table): with 2 seeds that is a crude interval.
--items defaults to <results without .jsonl>.items.jsonl, where runs/real.sh has 06 write them.
--json PATH writes every number (fractions, not points) for README generators and tests.
"""

import argparse
import json
import os
import re
import statistics

import numpy as np

COLUMNS = [  # (task, dataset label as 06 writes it, metric, header)
    ("zeroshot", "clipart", "acc1", "clip-art zero-shot top-1"),
    ("zeroshot", "fmnist", "acc1", "Fashion-MNIST zero-shot top-1"),
    ("retrieval", "clipart", "text_retrieval_recall@1", "I→T R@1"),
    ("retrieval", "clipart", "text_retrieval_recall@5", "I→T R@5"),
    ("retrieval", "clipart", "image_retrieval_recall@1", "T→I R@1"),
    ("retrieval", "clipart", "image_retrieval_recall@5", "T→I R@5"),
    ("linear_probe", "clipart", "lp_acc1", "linear probe top-1"),
    ("retrieval", "sentences", "text_retrieval_recall@1", "sentences I→T R@1"),
    ("retrieval", "sentences", "text_retrieval_recall@5", "sentences I→T R@5"),
    ("retrieval", "sentences", "image_retrieval_recall@1", "sentences T→I R@1"),
    ("retrieval", "sentences", "image_retrieval_recall@5", "sentences T→I R@5"),
]
SEEDED = re.compile(r"^(?P<method>.*) \(seed (?P<seed>\d+)\)$")
MDE_FACTOR = 2.80  # z_0.975 + z_0.80 = 1.960 + 0.842: 80% power, two-sided 5%


def read_jsonl(path):
    """The newest line per (name, task, dataset), in the order the keys first appear."""
    latest = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                latest[(row["name"], row["task"], row["dataset"])] = row
    return latest


def method_and_seed(name):
    m = SEEDED.match(name)
    if m:
        return m.group("method"), int(m.group("seed"))
    return name, None


def read_runs(results, items=None):
    """{method: {seed: {(task, dataset): (results row, its items line or None)}}}, methods in first-seen order.
    An items line counts only if it was measured on the row's weights."""
    runs = {}
    for (name, task, dataset), row in results.items():
        method, seed = method_and_seed(name)
        line = (items or {}).get((name, task, dataset))
        if line is not None and any(row.get(k) != v for k, v in line.get("weights", {}).items()):
            line = None  # measured on other weights than the row: stale
        runs.setdefault(method, {}).setdefault(seed, {})[(task, dataset)] = (row, line)
    return runs


def metric_values(runs, method, task, dataset, metric):
    """{seed: value} of one metric of one method."""
    values = {}
    for seed, rows in runs.get(method, {}).items():
        row, _ = rows.get((task, dataset), (None, None))
        value = row["metrics"].get(metric) if row else None
        if value is not None:
            values[seed] = value
    return values


def cell(values):
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def shown_columns(runs):
    """The columns some method has a value in: a table of one world shows that world's benchmarks only."""
    shown = []
    for task, dataset, metric, header in COLUMNS:
        if any(metric_values(runs, method, task, dataset, metric) for method in runs):
            shown.append((task, dataset, metric, header))
    return shown


def markdown(runs):
    columns = shown_columns(runs)
    lines = [
        "| method | seeds | " + " | ".join(c[3] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for method in runs:
        values = []
        seeds = 0
        for task, dataset, metric, _ in columns:
            per_seed = metric_values(runs, method, task, dataset, metric)
            seeds = max(seeds, len(per_seed))
            values.append(cell(list(per_seed.values())))
        lines.append(f"| {method} | {seeds} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def paired_items(runs, method, baseline, seeds, task, dataset, metric):
    """(seeds x items) array of method - baseline per item, or (None, why) where the items are not all there or
    not comparable item by item."""
    rows = []
    order = None
    for seed in seeds:
        pair = []
        for who in (method, baseline):
            _, line = runs[who][seed].get((task, dataset), (None, None))
            if line is None or metric not in line["items"]:
                return None, "no items"
            if order is not None and line.get("item_order") != order:
                return None, "items in another order"
            order = line.get("item_order")
            pair.append(np.asarray(line["items"][metric], dtype=np.float64))
        if len(pair[0]) != len(pair[1]) or (rows and len(pair[0]) != rows[0].shape[0]):
            return None, "item counts differ"
        rows.append(pair[0] - pair[1])
    return np.stack(rows), None


def bootstrap(diffs, draws=2000, seed=0, resample_items=True):
    """Draws of the mean over resampled seeds (rows) of the mean over resampled items (columns) of `diffs`; the
    same resampled items for every seed of a draw. resample_items False: the seeds only."""
    rng = np.random.default_rng(seed)
    k, n = diffs.shape
    block = max(1, min(256, 2**22 // n))  # draws at a time: (block, items) arrays of ~32 MB at most
    out = np.empty(draws)
    for start in range(0, draws, block):
        b = min(block, draws - start)
        # a resample as counts: how often each seed (item) was drawn
        seed_counts = rng.multinomial(k, np.full(k, 1 / k), size=b)
        per_item = seed_counts @ diffs / k  # (b, n): mean over the drawn seeds, per item
        if resample_items:
            item_counts = rng.multinomial(n, np.full(n, 1 / n), size=b)
            out[start : start + b] = (per_item * item_counts).sum(1) / n
        else:
            out[start : start + b] = per_item.mean(1)
    return out


def difference(runs, method, baseline, task, dataset, metric, draws, seed, confidence=0.95):
    """The paired difference of one metric: estimate, interval, SE, MDE and what it rests on; None where the
    two methods share no seed with this metric."""
    mine = metric_values(runs, method, task, dataset, metric)
    base = metric_values(runs, baseline, task, dataset, metric)
    seeds = sorted(set(mine) & set(base), key=lambda s: (s is None, s))
    if not seeds:
        return None
    diffs, why = paired_items(runs, method, baseline, seeds, task, dataset, metric)
    if diffs is not None:
        basis = "seeds+items"
    else:  # a seed's metric is one number: the seeds alone
        diffs = np.array([[mine[s] - base[s]] for s in seeds])
        basis = "seeds"
    estimate = float(diffs.mean())
    result = {
        "diff": estimate,
        "seeds": len(seeds),
        "items": diffs.shape[1] if basis == "seeds+items" else None,
        "basis": basis,
        "why_seeds_only": why,
        "lo": None,
        "hi": None,
        "se": None,
        "mde": None,
        "excludes_zero": False,
    }
    if basis == "seeds" and len(seeds) < 2:  # one number: no interval
        return result
    values = bootstrap(diffs, draws, seed, resample_items=basis == "seeds+items")
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    se = float(values.std(ddof=1))
    result.update(
        lo=float(lo), hi=float(hi), se=se, mde=MDE_FACTOR * se, excludes_zero=bool(lo > 0 or hi < 0)
    )
    return result


def differences(runs, baseline, draws=2000, seed=0):
    """{method: {column key: difference or None}} for every method but the baseline."""
    table = {}
    for method in runs:
        if method == baseline:
            continue
        table[method] = {}
        for task, dataset, metric, _ in COLUMNS:
            key = f"{task}/{dataset}/{metric}"
            table[method][key] = difference(runs, method, baseline, task, dataset, metric, draws, seed)
    return table


def points(x):
    return f"{100 * x:+.1f}"


def diff_cell(d):
    if d is None:
        return "–"
    dagger = "" if d["basis"] == "seeds+items" else "†"
    if d["lo"] is None:
        return f"{points(d['diff'])}{dagger} (1 seed, no interval)"
    interval = f"[{points(d['lo'])}, {points(d['hi'])}]"
    if d["excludes_zero"]:
        return f"**{points(d['diff'])} {interval}** ✓{dagger}"
    return f"{points(d['diff'])} {interval} not seen{dagger}"


def detectable(diffs):
    """Per column key: the median over methods of the MDE, None where no method has one."""
    out = {}
    for task, dataset, metric, _ in COLUMNS:
        key = f"{task}/{dataset}/{metric}"
        mdes = [cells[key]["mde"] for cells in diffs.values() if cells[key] and cells[key]["mde"] is not None]
        out[key] = statistics.median(mdes) if mdes else None
    return out


def diff_markdown(diffs, baseline, draws, items_path, have_items, columns=COLUMNS):
    lines = [
        f"Paired difference to {baseline}, points, [95% bootstrap interval] over seeds and eval items "
        f"({draws} draws); ✓ the interval excludes 0:",
        "",
        "| method | " + " | ".join(c[3] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method, cells in diffs.items():
        values = [diff_cell(cells[f"{t}/{d}/{m}"]) for t, d, m, _ in columns]
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    mde = detectable(diffs)
    row = [
        "–" if mde[f"{t}/{d}/{m}"] is None else f"{100 * mde[f'{t}/{d}/{m}']:.1f}" for t, d, m, _ in columns
    ]
    lines.append("| smallest detectable effect (80% power) | " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "Smallest detectable effect: 2.80 x the bootstrap SE of the paired difference (80% power, two-sided 5%), "
        "the median over the methods."
    )
    seeds_only = sorted(
        {
            d["why_seeds_only"]
            for cells in diffs.values()
            for d in cells.values()
            if d and d["basis"] == "seeds"
        }
    )
    if not have_items:
        lines.append(
            f"† No per-item outcomes ({items_path} not found; 06_eval.py --item-results writes them): every "
            "interval resamples the seeds only, which with 2 seeds is crude."
        )
    elif seeds_only:
        lines.append(
            f"† Intervals over the seeds only ({', '.join(seeds_only)} in {items_path} for that cell): crude "
            "with 2 seeds."
        )
    return "\n".join(lines) + "\n"


def default_items(results):
    stem = results[: -len(".jsonl")] if results.endswith(".jsonl") else results
    return stem + ".items.jsonl"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("results", help="06_eval.py's results JSONL")
    p.add_argument(
        "--items",
        default=None,
        help="06_eval.py's --item-results JSONL (default: <results without .jsonl>.items.jsonl)",
    )
    p.add_argument("--baseline", default="CLIP (AltText)", help="the method every other one is compared with")
    p.add_argument("--draws", type=int, default=2000, help="bootstrap draws per cell")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap draws")
    p.add_argument("--out", default=None, help="also write the tables here (markdown)")
    p.add_argument("--json", default=None, help="write the numbers here (JSON, fractions)")
    args = p.parse_args(argv)
    items_path = args.items or default_items(args.results)
    have_items = os.path.isfile(items_path)
    runs = read_runs(read_jsonl(args.results), read_jsonl(items_path) if have_items else None)
    text = markdown(runs)
    diffs = None
    if args.baseline in runs:
        diffs = differences(runs, args.baseline, args.draws, args.bootstrap_seed)
        text += "\n" + diff_markdown(
            diffs, args.baseline, args.draws, items_path, have_items, shown_columns(runs)
        )
    else:
        text += f"\nNo paired differences: no method named {args.baseline!r} (--baseline).\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.json:
        summary = {
            "baseline": args.baseline,
            "draws": args.draws,
            "bootstrap_seed": args.bootstrap_seed,
            "confidence": 0.95,
            "mde_factor": MDE_FACTOR,
            "items": items_path if have_items else None,
            "columns": [
                {"key": f"{t}/{d}/{m}", "task": t, "dataset": d, "metric": m, "header": h}
                for t, d, m, h in COLUMNS
            ],
            "per_seed": {
                method: {
                    f"{t}/{d}/{m}": {str(s): v for s, v in metric_values(runs, method, t, d, m).items()}
                    for t, d, m, _ in COLUMNS
                }
                for method in runs
            },
            "differences": diffs,
            "detectable": detectable(diffs) if diffs is not None else None,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=1)
    return diffs


if __name__ == "__main__":
    main()
