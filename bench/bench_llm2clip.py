"""Benchmark LLM2CLIP training in 05_train.py: text embeddings from 08's cache vs the live frozen tower, side by side.

    python bench/bench_llm2clip.py                                   # toy data + the real MiniLM, on CPU
    python bench/bench_llm2clip.py --tower bench/out/llm-1b --make-tower 2048x16 --model ViT-B-16 --batch-size 256 --rewrites none \
        --workers 8 --steps 60 --json bench/out/llm2clip.json        # one GPU: a random Llama-shaped tower, bf16 (4096x32: 8B-shaped)

Arms, in one command and on the same shards, texts, model, batch, workers and seed: 05 with --text-tower (the tower encodes
every batch's texts, without grad) and 05 with --text-cache (08 encoded them once beforehand; the cache's own build time is
measured too, and amortised over the epochs it serves). Each arm runs --steps steps, logging every --log-every; steady
samples/s is the median of the logged windows, less the first two (step 1, start-up) and those right after an epoch end
(checkpoint writes, reader restart). Also prints the loss at step 1 of
both arms, which must agree (float32 cache; a float16 cache agrees to ~1e-3). --make-tower WxL writes a random-weight
Llama-shaped decoder (hidden W, L layers, the toy tokenizer) to --tower first: a stand-in for an 8B LLM when no hub is
reachable. Prints `cache / live steady samples/s = X.XXx`.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")


def make_tower(path, shape, toy):
    """A random Llama-shaped encoder at `path` with the toy LLM's tokenizer: sizes like a real LLM, no download."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    width, layers = map(int, shape.split("x"))
    tok = AutoTokenizer.from_pretrained(os.path.join(toy, "models", "tiny-llama"))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=int(width * 3.5),
        num_hidden_layers=layers,
        num_attention_heads=width // 128,
        num_key_value_heads=max(1, width // 512),
        max_position_embeddings=512,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaModel(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    print(f"{path}: random LlamaModel {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")


def run(cmd):
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - start


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--toy", default=os.path.join(OUT, "toy"), help="toy data folder (built by 00 when missing)"
    )
    p.add_argument("--tower", default=None, help="the frozen text tower (default: <toy>/models/minilm)")
    p.add_argument(
        "--make-tower", default=None, help="WIDTHxLAYERS: first write a random Llama-shaped tower to --tower"
    )
    p.add_argument("--model", default=None, help="open_clip model (default: the toy's toy-clip.json)")
    p.add_argument(
        "--rewrites",
        choices=["eda", "none"],
        default="eda",
        help="texts: AltText + EDA rewrites (02, needs WordNet), or AltText",
    )
    p.add_argument("--steps", type=int, default=30, help="steps per arm")
    p.add_argument("--log-every", type=int, default=5, help="a samples/s window every N steps")
    p.add_argument("--batch-size", type=int, default=64, help="05's --batch-size")
    p.add_argument("--workers", type=int, default=2, help="05's --workers")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    toy, work = args.toy, os.path.join(OUT, "llm2clip")
    if not os.path.exists(os.path.join(toy, "shards", "00003_stats.json")):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "00_toy_data.py"), "--out", toy, "--lm-steps", "20"],
            check=True,
        )
    if args.rewrites == "eda" and not os.path.exists(os.path.join(toy, "rewrites", "00003.stats.json")):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "02_rewrite.py"),
                "--engine",
                "eda",
                "--input",
                os.path.join(toy, "shards"),
                "--out-dir",
                os.path.join(toy, "rewrites"),
            ],
            check=True,
        )
    tower = args.tower or os.path.join(toy, "models", "minilm")
    if args.make_tower and not os.path.exists(os.path.join(tower, "config.json")):
        make_tower(tower, args.make_tower, toy)
    # a toy folder made with --skip-models (bench_train.py's): link MiniLM
    if not args.tower and not os.path.exists(tower):
        sys.path.insert(0, ROOT)
        __import__("importlib").import_module("00_toy_data").link_sentence_encoder(tower)
    shutil.rmtree(work, ignore_errors=True)
    cache, texts_dirs = (
        os.path.join(work, "cache"),
        [os.path.join(toy, "rewrites")] * (args.rewrites == "eda"),
    )
    py, cuda = [sys.executable], __import__("torch").cuda.is_available()
    # as 05 loads the live tower: bf16 autocast on GPUs
    cache_s = run(
        py
        + [
            os.path.join(ROOT, "08_embed_texts.py"),
            "--input",
            os.path.join(toy, "shards"),
            "--texts",
            *texts_dirs,
            "--model",
            tower,
            "--out-dir",
            cache,
            "--store-dtype",
            "float32",
            "--dtype",
            "bfloat16" if cuda else "float32",
        ]
    )
    texts = sum(
        json.load(open(os.path.join(cache, f)))["texts"]
        for f in os.listdir(cache)
        if f.endswith(".stats.json")
    )
    common = [
        "--input",
        os.path.join(toy, "shards"),
        *(["--texts", *texts_dirs, "--text-mode", "uniform"] if texts_dirs else []),
        "--model",
        args.model or os.path.join(toy, "models", "toy-clip.json"),
        "--max-steps",
        str(args.steps),
        "--log-every",
        str(args.log_every),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--save-every",
        "100000",
    ]
    result = {"tower": tower, "cache_build_s": round(cache_s, 1), "texts": texts}
    for arm, extra in (("live", ["--text-tower", "hf:" + tower]), ("cache", ["--text-cache", cache])):
        out = os.path.join(work, "run_" + arm)
        wall = run(py + [os.path.join(ROOT, "05_train.py"), *common, *extra, "--out-dir", out])
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        # log[0] is step 1 and log[1] holds start-up; a window right after an epoch end holds its checkpoint and reader restart
        steady = statistics.median(
            [r["samples_per_s"] for i, r in enumerate(log) if i >= 2 and log[i - 1]["epoch"] % 1]
            or [log[-1]["samples_per_s"]]
        )
        for f in os.listdir(out):
            os.remove(os.path.join(out, f)) if f.endswith(
                ".pt"
            ) else None  # a big model's epoch checkpoints fill small disks
        result[arm] = {
            "steady_samples_per_s": steady,
            "wall_s": round(wall, 1),
            "loss_step_1": log[0]["loss"],
            "loss_last": log[-1]["loss"],
        }
    ratio = result["cache"]["steady_samples_per_s"] / result["live"]["steady_samples_per_s"]
    print(f"\n{'arm':<6} {'steady samples/s':>17} {'wall s':>8} {'loss@1':>9} {'loss@last':>10}")
    for arm in ("live", "cache"):
        r = result[arm]
        print(
            f"{arm:<6} {r['steady_samples_per_s']:>17.1f} {r['wall_s']:>8.1f} {r['loss_step_1']:>9.5f} {r['loss_last']:>10.5f}"
        )
    print(f"cache build (08): {cache_s:.1f}s for {texts} texts = {texts / cache_s:.0f} texts/s")
    print(
        f"step-1 loss |live - cache| = {abs(result['live']['loss_step_1'] - result['cache']['loss_step_1']):.2e}"
    )
    print(f"cache / live steady samples/s = {ratio:.2f}x")
    result["ratio"] = round(ratio, 3)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
