"""Benchmark 03_visual_concepts.py's hf engine: batched generation against one image at a time, on the tiny LLaVA.

    python bench/bench_vec.py                          # 256 toy images batched (batch 32) vs 32 one at a time
    python bench/bench_vec.py --images 512 --batch-size 64 --json bench/out/vec.json

Images and prompt are the stage's own: toy images read with 03's `read_images` and decoded with its `load_image`,
the VeCLIP question through the model's chat template (`VisionEngine`), greedy decoding, --max-new-tokens new tokens
at most (03's default). Toy data is built into --toy (00_toy_data.py) when missing.
Arms, on the same loaded engine and the same torch thread count, each warmed up once before timing:
  batched        VisionEngine("hf").generate(all images) with --batch-size images per batch (the stage's path)
  one-at-a-time  the same engine with batch_size=1, on an evenly spread subset (--baseline-images)
Prints a table (arm, images, seconds, images/s, tokens/s, tokens/image) and
`hf: batched / one-at-a-time = X.Yx images/s`. Rates are per second, so arms of different sizes compare. Tokens are
the returned captions re-tokenized: the tiny random LLaVA rarely stops early, so both arms decode about as many
tokens per image and the images/s ratio is a fair one.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
vec = importlib.import_module("03_visual_concepts")


def ensure_toy(toy):
    model = os.path.join(toy, "models", "tiny-llava")
    if not os.path.exists(os.path.join(model, "config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "00_toy_data.py"), "--out", toy], check=True)
    return model


def load_images(toy, n, max_side):
    images, counts = [], Counter()
    for shard in vec.list_inputs([os.path.join(toy, "shards")], (".tar",)):
        for key, raw in vec.read_images(shard, counts):
            img, _ = vec.load_image(raw, max_side) if raw is not None else (None, "missing")
            if img is not None:
                images.append((img, vec.sample_seed(0, vec.shard_name(shard), key)))
            if len(images) == n:
                return images
    return images


def timed(engine, images, one_at_a_time):
    start = time.perf_counter()
    if one_at_a_time:
        outs = [engine.generate([im], [s])[0] for im, s in images]
    else:
        outs = engine.generate([im for im, _ in images], [s for _, s in images])
    return time.perf_counter() - start, outs


def run_arms(engine, images, n_baseline, batch_size):
    step = max(1, len(images) // n_baseline)
    rows, tok = [], engine.processor.tokenizer
    for arm, subset, single in (
        ("one-at-a-time", images[::step][:n_baseline], True),
        ("batched", images, False),
    ):
        engine.batch_size = 1 if single else batch_size
        timed(engine, subset[: 1 if single else batch_size], single)  # warm-up: the same shapes
        seconds, outs = timed(engine, subset, single)
        tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
        rows.append(
            {
                "arm": arm,
                "images": len(subset),
                "seconds": round(seconds, 3),
                "images_per_s": round(len(subset) / seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
                "tokens_per_image": round(tokens / len(subset), 1),
                "batch_size": engine.batch_size,
            }
        )
        print(f"  hf {arm}: {len(subset)} images in {seconds:.1f}s", flush=True)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--toy",
        default=os.path.join(ROOT, "bench", "out", "toy"),
        help="toy data folder (built when missing)",
    )
    p.add_argument("--images", type=int, default=256, help="images in the batched arm")
    p.add_argument(
        "--baseline-images",
        type=int,
        default=32,
        help="images in the one-at-a-time arm (an even spread of them)",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="hf batch size in the batched arm (03's default)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=48, help="generation limit per caption (03's default)"
    )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads, the same for both arms"
    )
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    model = ensure_toy(os.path.abspath(args.toy))
    images = load_images(os.path.abspath(args.toy), args.images, 1024)
    start = time.perf_counter()
    engine = vec.VisionEngine(
        "hf", model, vec.VECLIP_QUESTION, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    print(
        f"bench_vec: {len(images)} toy images, {args.threads} threads, hf batch size {args.batch_size}, "
        f"one-at-a-time on {min(args.baseline_images, len(images))}, engine ready in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    rows = run_arms(engine, images, args.baseline_images, args.batch_size)
    cols = ("arm", "images", "seconds", "images_per_s", "tokens_per_s", "tokens_per_image")
    table = [[c.replace("_per_", "/") for c in cols]] + [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print()
    for row in table:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    one, batched = rows
    ratio = (
        f"hf: batched / one-at-a-time = {batched['images_per_s'] / one['images_per_s']:.1f}x images/s, "
        f"{batched['tokens_per_s'] / one['tokens_per_s']:.1f}x tokens/s"
    )
    print(ratio)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
