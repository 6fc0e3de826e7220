"""The real-data table: 06's results.jsonl rows named "<method> (seed N)", as mean ± sd over seeds.

Usage: python runs/real_table.py real/eval/results.jsonl [--out real/eval/table.md]
Columns: zero-shot top-1 on the held-out clip-art classes and on Fashion-MNIST, retrieval R@1/R@5 both ways
on the held-out clip-art titles, and the linear probe on the clip-art classes; percent. Rows keep the order
in which their methods first appear in the results file.
"""

import argparse
import json
import re
import statistics

COLUMNS = [  # (task, dataset label as 06 writes it, metric, header)
    ("zeroshot", "clipart", "acc1", "clip-art zero-shot top-1"),
    ("zeroshot", "fmnist", "acc1", "Fashion-MNIST zero-shot top-1"),
    ("retrieval", "clipart", "text_retrieval_recall@1", "I→T R@1"),
    ("retrieval", "clipart", "text_retrieval_recall@5", "I→T R@5"),
    ("retrieval", "clipart", "image_retrieval_recall@1", "T→I R@1"),
    ("retrieval", "clipart", "image_retrieval_recall@5", "T→I R@5"),
    ("linear_probe", "clipart", "lp_acc1", "linear probe top-1"),
]
SEEDED = re.compile(r"^(?P<method>.*) \(seed (?P<seed>\d+)\)$")


def read_rows(path):
    """{method: {(task, dataset, metric): [value per seed]}} in first-seen order."""
    table = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            m = SEEDED.match(row["name"])
            method = m.group("method") if m else row["name"]
            cells = table.setdefault(method, {})
            for metric, value in row["metrics"].items():
                if value is not None:
                    cells.setdefault((row["task"], row["dataset"], metric), []).append(value)
    return table


def cell(values):
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def markdown(table):
    seeds = {method: max((len(v) for v in cells.values()), default=0) for method, cells in table.items()}
    lines = [
        "| method | seeds | " + " | ".join(c[3] for c in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for method, cells in table.items():
        values = [cell(cells.get((task, dataset, metric), [])) for task, dataset, metric, _ in COLUMNS]
        lines.append(f"| {method} | {seeds[method]} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("results", help="06_eval.py's results JSONL")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    text = markdown(read_rows(args.results))
    print(text, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
