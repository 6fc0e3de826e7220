"""Evaluate CLIP and LLM2CLIP models: zero-shot classification, image-text retrieval, a linear probe and caption retrieval (CRA).

Conventions are CLIP_benchmark's (bench/bench_eval.py checks that the numbers agree), so they compare with papers: a
class embedding is the normalised mean of the normalised embeddings of its prompts; top-1, top-5 (omitted under 5
classes), mean per-class recall; Recall@1/5/10 both ways, every caption its own query, image->text a hit when any of
the image's captions is in the top k. Candidates tied exactly with the best positive share their places (the expected
hit over tie orders), so no data order changes a number and a collapsed model scores chance. Linear probe: multinomial
logistic regression (L-BFGS, L2 weight lambda) on normalised frozen image features; of 17 lambdas (1e2..1e-6) the best
on a held-out fifth of train, refit on all of it (k-shot: on the k per class). Full-batch float64 L-BFGS up to 2^26
train samples x (dim + classes); above, e.g. ImageNet-1k, mini-batches in float32 on the device (--probe-solver).
CRA, LLM2CLIP's caption retrieval accuracy (text only): of each image with two captions or more, the first retrieves
the second among every image's second; top-1.

Reads:  --model NAME --pretrained CKPT|TAG  open_clip; a 05_train.py checkpoint ({"state_dict", "epoch", "step", ...},
            torch.load weights_only=True) finds its config <dir of CKPT>/<NAME>.json itself (or --model-config); an LLM2CLIP one
            (05 --text-tower) has "text_tower" {"path", "max_length", "adapter": Adapter config, ...} and "adapter.*" weights in
            "extra_state_dict": its texts go through that frozen tower (or --text-tower PATH) and the adapter
        --text-tower PATH alone (no --pretrained): CRA only, on the raw tower's normalised mean-pooled embeddings
        --zeroshot [LABEL=]DIR  a sub-folder per class (named as in classnames.txt, or the i-th sorted folder is line i,
            like ImageNet's wnids), templates.txt with {c}; or CLIP_benchmark's wds layout: DIR[/test]/*.tar of <key>.jpg|
            png|webp + <key>.cls, classnames.txt, zeroshot_classification_templates.txt
        --retrieval [LABEL=]PATH  JSONL {"image": path, "captions": [...]} (a folder: its captions.jsonl), a JSON list of
            those, Karpathy's dataset_coco.json / dataset_flickr30k.json (--split), or wds tars of <key>.txt, a caption a line
        --linear-probe [LABEL=]DIR  labelled like --zeroshot; tested on --probe-test DIR, else on a stratified half of DIR
        --cra [LABEL=]PATH  read as --retrieval, captions only (image files need not exist)
Writes: --results FILE  one JSON line per (name, task, dataset) measured: {"name", "task", "dataset", "metrics" (fractions,
            CLIP_benchmark's keys), "ties", "n", "counts" (skipped inputs), "model", "pretrained", "epoch", "step", ...};
            task "cra": metrics {"cra"}, n {"images"}; LLM2CLIP and text-only rows add "text_tower" (the folder used)
        FILE.md  the Markdown table (a row per --name, percentages) of the newest line per (name, task, dataset); printed too
        --item-results ITEMS  (off by default) per row of FILE, a line {"name", "task", "dataset", "weights" (the row's
            checkpoint id: pretrained, checkpoint_bytes/mtime; text_tower/mtime), "item_order" (a fingerprint of the items
            and their order), "items": {metric: [outcome per item]}}, an outcome 0/1 (or the expected hit over a tie) and
            the metric its mean: zero-shot acc1/acc5 per image; image_retrieval_recall@k per caption query and
            text_retrieval_recall@k per image query; lp_acc1/lp_acc5 per probe test item (the fixed test half, or
            --probe-test), by the classifier refit with the chosen lambda; cra per first caption. Mean per-class recalls are no item means: not listed. Items come in the readers' order
            (sorted folders and files, tar and JSONL order), the same for every model on the same data; a row is done only
            when its items line is there too. runs/real_table.py --items reads it for paired bootstrap intervals

Toy (CPU): every model into toy/eval/results.jsonl, one row each:
    python 06_eval.py --name alt --pretrained toy/train/alt/latest.pt
LLM2CLIP checkpoint, and CRA of a contrastively fine-tuned tower (07) against the raw one (rows text:cc_minilm, text:minilm):
    python 06_eval.py --pretrained toy/train/llm2clip/latest.pt
    python 06_eval.py --text-tower toy/cc_minilm/model && python 06_eval.py --text-tower toy/models/minilm
ImageNet-1k zero-shot (AMP on GPU; --templates laclip for LaCLIP's 7):
    python 06_eval.py --name laclip --model ViT-B-16 --pretrained out/laclip/latest.pt \
        --zeroshot imagenet=/data/imagenet/val --classnames imagenet --templates openai --results results.jsonl
COCO 5k / Flickr30k 1k test retrieval (Karpathy splits; images relative to each JSON's folder, or --image-root):
    python 06_eval.py --name laclip --model ViT-B-16 --pretrained out/laclip/latest.pt \
        --retrieval coco=/data/coco/dataset_coco.json flickr30k=/data/flickr30k/dataset_flickr30k.json --results results.jsonl
Per-item outcomes beside the results, for intervals on the differences between models (runs/real_table.py):
    python 06_eval.py --name "alt (seed 0)" --pretrained toy/train/alt/latest.pt --item-results toy/eval/results.items.jsonl
Several models: one per SLURM array task (sbatch --array=0-3 --gpus 1), all appending to one --results (appends are locked).
Tasks: the ones named (--zeroshot, --retrieval, --linear-probe, --cra, each with its data sets) run, and only those;
a command that names none runs all four on the toy sets, less any --no-<task>. A row already in --results for the same checkpoint file (path, size, mtime) is
skipped; a changed checkpoint or --overwrite is measured again, and the newest line per (name, task, dataset) counts.
Missing, unreadable or caption-less images and image-less classes are skipped, counted in "counts" and named in a WARNING.
"""

import argparse
import contextlib
import fcntl
import glob
import hashlib
import io
import json
import math
import os
import socket
import sys
import tarfile
import time
import zlib
from collections import Counter

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
# LaCLIP's ImageNet prompts for its CC3M/CC12M/RedCaps models (eval_zeroshot_imagenet.py in its repository):
# the 7-prompt ensemble of OpenAI's prompt-engineering notebook, also open_clip's SIMPLE_IMAGENET_TEMPLATES.
LACLIP_TEMPLATES = [
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
]
TABLE = {
    "zeroshot": [
        ("acc1", "top-1"),
        ("acc5", "top-5"),
        ("mean_per_class_recall", "mean recall"),
        ("acc1_h", "heads top-1"),  # clip-rocket checkpoints only (columns shown when some row has them)
        ("acc1_zh", "z+h top-1"),
    ],
    "retrieval": [
        (f"{d}_retrieval_recall@{k}", f"{arrow} R@{k}")
        for d, arrow in (("text", "I→T"), ("image", "T→I"))
        for k in (1, 5, 10)
    ],
    "linear_probe": [("lp_acc1", "LP top-1"), ("lp_mean_per_class_recall", "LP mean recall")],
    "cra": [("cra", "CRA")],
}


HEAD_KEYS = {"acc1_h", "acc1_zh"}


def tie_share(m, t, p):
    """Chance that a random order of t negatives and p positives puts a positive among its first m."""
    places = torch.minimum(m.clamp(min=0), t)
    # a miss: negatives take all m places; of the (t+p)!/(t+p-m)! ways to fill them, t!/(t-m)! do (in
    # log-gamma, as the factorials overflow)
    miss = torch.exp(
        torch.lgamma(t + 1)
        - torch.lgamma(t - places + 1)
        - torch.lgamma(t + p + 1)
        + torch.lgamma(t + p - places + 1)
    )
    # no place left after the candidates above the tie: no hit; more places than tied negatives: a sure hit
    return torch.where(m <= 0, 0.0, torch.where(m > t, 1.0, 1 - miss))


def hits_at(queries, candidates, query_labels, candidate_labels, ks, max_elements=2**22):
    """(queries, len(ks)): 1 where a positive candidate (same label) is among the k best, else 0. Candidates
    that tie exactly with the best positive share those places: the expected hit over the orders of the tie,
    which is what a top-k such as CLIP_benchmark's gives on average; so no data order changes a number and a
    collapsed model scores chance. A block of queries at a time, so 5k images x 25k captions never builds the
    whole score matrix."""
    chunk = max(1, max_elements // max(1, len(candidates)))  # queries per block
    blocks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ candidates.T
        positive = query_labels[start : start + chunk, None] == candidate_labels[None, :]
        best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)  # the best positive's score
        tied = scores == best
        above = (scores > best).sum(1).double()  # places taken before the tie
        tied_positives = (tied & positive).sum(1).double()
        tied_negatives = tied.sum(1) - tied_positives
        per_k = [tie_share(k - above, tied_negatives, tied_positives) for k in ks]
        blocks.append(torch.stack(per_k, 1))
    if not blocks:  # no queries
        return torch.zeros(0, len(ks), dtype=torch.float64)
    return torch.cat(blocks)


def tie_shares(hits, names):
    """Share of queries whose hit an exact tie decided, per metric
    (where any did). names: one per column of hits."""
    decided_by_tie = (hits > 0) & (hits < 1)  # a fractional hit is the expected hit over a tie's orders
    shares = decided_by_tie.double().mean(0).tolist()
    return {name: share for name, share in zip(names, shares, strict=True) if share}


def item_outcomes(hits, names):
    """{name: [outcome per item]} from the columns of `hits` (one per name): 0 or 1, or the expected hit
    where a tie decided it; their mean is the metric of that name."""
    items = {}
    for name, column in zip(names, hits.double().T.tolist(), strict=False):
        items[name] = [int(v) if v in (0.0, 1.0) else v for v in column]
    return items


def item_order(ids):
    """A fingerprint of the eval items in the order their outcomes are listed: equal for two models exactly when
    their item lists can be compared item by item."""
    return hashlib.sha256(json.dumps(ids, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def item_id(item, root):
    """An eval image as a stable id: its path relative to the data set, or a tar sample's bytes' sha1."""
    if isinstance(item, bytes):
        return hashlib.sha1(item).hexdigest()
    return os.path.relpath(item, root)


def classification_metrics(hits, targets, n_classes, prefix=""):
    """hits: hits_at(ks=(1, 5)). top-1, top-5 (with more than 5 classes), recall averaged over the classes that
    have images (balanced accuracy)."""
    top1 = hits[:, 0]
    metrics = {prefix + "acc1": top1.mean().item()}
    if n_classes > 5:  # with 5 classes or fewer every image is a top-5 hit
        metrics[prefix + "acc5"] = hits[:, 1].mean().item()
    ties = tie_shares(hits[:, : len(metrics)], list(metrics))  # for the top-k metrics kept so far

    images = torch.bincount(targets, minlength=n_classes)
    hits_per_class = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, targets, top1)
    seen = images > 0  # a class without images has no recall to average
    metrics[prefix + "mean_per_class_recall"] = (hits_per_class[seen] / images[seen]).mean().item()
    return metrics, ties


def retrieval_metrics(image_emb, text_emb, text_image, ks=(1, 5, 10)):
    """text_image[j] = the image of caption j. Image->text is a hit
    if any of the image's captions is in the top k."""
    images = torch.arange(len(image_emb))
    t2i = hits_at(text_emb, image_emb, text_image, images, ks)
    i2t = hits_at(image_emb, text_emb, images, text_image, ks)
    # CLIP_benchmark's names say what is retrieved: "image_retrieval" is text->image
    t2i_names = [f"image_retrieval_recall@{k}" for k in ks]
    i2t_names = [f"text_retrieval_recall@{k}" for k in ks]
    recalls = t2i.mean(0).tolist() + i2t.mean(0).tolist()
    metrics = dict(zip(t2i_names + i2t_names, recalls, strict=True))
    ties = {**tie_shares(t2i, t2i_names), **tie_shares(i2t, i2t_names)}
    return metrics, ties


def with_bias(x, device="cpu", dtype=torch.float64):
    """x in `dtype` with a column of ones appended (the bias's input), on `device`."""
    return torch.cat([x.to(dtype), x.new_ones(len(x), 1, dtype=dtype)], 1).to(device)


def fit_logistic(x, y, n_classes, lam, init=None, max_iter=500):
    """argmin mean cross-entropy + lam/2 |W|^2 (bias free) by full-batch L-BFGS in float64. Convex: a warm
    start changes the speed, not the answer. x: features with a bias column;
    returns W (bias in the last row)."""
    w = init.clone() if init is not None else x.new_zeros(x.shape[1], n_classes)
    w.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w, y) + lam / 2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    # on a small problem thread hand-offs cost more than the arithmetic (10x on 2 cores)
    if x.device.type == "cpu" and x.numel() * n_classes < 2**22:
        torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach()


def fit_logistic_minibatch(
    x, y, idx, n_classes, lam, init=None, steps=None, seed=0, batch_size=4096, epochs=10, lr=0.1
):
    """The objective of fit_logistic on rows `idx` of x, minimised on mini-batches in float32 where x lies
    (the GPU when there is one): memory is x itself plus a batch's logits and W's optimiser state, whatever
    the number of samples. `epochs` passes over the rows, 500 steps at least (or `steps`), the learning rate
    on a cosine to zero so that the last steps average the batch noise out. x: normalised features without a
    bias column; returns W with the bias in the last row, as fit_logistic does."""
    w = init.clone() if init is not None else x.new_zeros(x.shape[1] + 1, n_classes)
    w.requires_grad_(True)
    if lam >= 1e-2:
        # well conditioned (curvature between lam and 1 + lam on normalised features): gradient steps of
        # 1/(1 + lam) shrink with the gradient, so they find the small W of strong regularisation, where
        # Adam's steps of about lr each stay far off its direction (tested)
        lr = 1 / (1 + lam)
        opt = torch.optim.SGD([w], lr=lr, momentum=0.9, nesterov=True)
    else:  # ill conditioned: Adam's per-coordinate scaling gets near the optimum in a few epochs
        opt = torch.optim.Adam([w], lr=lr)
    g = torch.Generator().manual_seed(seed)
    batches_per_epoch = (len(idx) + batch_size - 1) // batch_size
    total = steps or max(500, epochs * batches_per_epoch)
    step = 0
    while step < total:  # an epoch: the rows in a fresh order
        order = idx[torch.randperm(len(idx), generator=g).to(idx.device)]
        for start in range(0, len(order), batch_size):
            if step == total:  # the last epoch stops part way
                break
            rows = order[start : start + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = x[rows] @ w[:-1] + w[-1]  # the last row of w is the bias
            loss = F.cross_entropy(logits, y[rows]) + lam / 2 * w[:-1].pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return w.detach()


# above this many elements in (train samples) x (dim + classes), "auto" trains the probe on mini-batches: the
# full-batch L-BFGS holds a few float64 arrays of that size (~2 GB here; ~30 GB for ImageNet-1k's 1.28M x 512)
LBFGS_MAX_ELEMENTS = 2**26


def probe_solver(solver, n, dim, n_classes):
    """The solver asked for; for "auto", L-BFGS while n x (dim + bias + classes) fits LBFGS_MAX_ELEMENTS."""
    if solver != "auto":
        return solver
    if n * (dim + 1 + n_classes) <= LBFGS_MAX_ELEMENTS:
        return "lbfgs"
    return "minibatch"


def fit_probe(solver, x, y, idx, n_classes, lam, init, device, steps, seed):
    """W (bias in the last row) for rows `idx` of x by either solver; minibatch wants x, y on `device`."""
    if solver == "lbfgs":
        rows = with_bias(x[idx], device)  # a float64 copy of the rows, on the device
        return fit_logistic(rows, y[idx].to(device), n_classes, lam, init, max_iter=steps or 500)
    return fit_logistic_minibatch(x, y, idx.to(device), n_classes, lam, init, steps, seed)


def predict(x, idx, w, device, chunk=8192):
    """Predicted classes of rows `idx` of x, a chunk at a time: never every row's logits at once."""
    predicted = [torch.zeros(0, dtype=torch.long)]  # no rows: an empty answer
    for start in range(0, len(idx), chunk):
        rows = x[idx[start : start + chunk].to(x.device)]
        logits = with_bias(rows, device, w.dtype) @ w
        predicted.append(logits.argmax(1).cpu())
    return torch.cat(predicted)


def stratified_split(y, fraction, seed):
    """(rest, part): `fraction` of every class goes to `part`
    (one at least, where a class has two or more)."""
    g = torch.Generator().manual_seed(seed)
    rest, part = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        if len(idx) > 1:  # one at least on each side
            n = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        else:
            n = 0
        part.extend(idx[:n].tolist())  # extend, not +: a new list per class is quadratic at ImageNet's size
        rest.extend(idx[n:].tolist())
    return torch.tensor(sorted(rest), dtype=torch.long), torch.tensor(sorted(part), dtype=torch.long)


def k_shot_rows(fit, y, k_shot, seed):
    """k_shot random rows of each class among `fit` (what the held-out split left)."""
    g = torch.Generator().manual_seed(seed)
    per_class = [fit[y[fit] == c] for c in torch.unique(y)]
    fewest = min(len(rows) for rows in per_class)
    if fewest < k_shot:
        raise SystemExit(
            f"--probe-k-shot {k_shot}: a class has {fewest} training images besides the held-out ones"
        )
    picks = [rows[torch.randperm(len(rows), generator=g)[:k_shot]] for rows in per_class]
    return torch.cat(picks)


def linear_probe(
    x,
    y,
    test_x,
    test_y,
    n_classes,
    k_shot=0,
    seed=0,
    device="cpu",
    grid=tuple(10.0 ** (e / 2) for e in range(4, -13, -1)),
    solver="auto",
    steps=None,
):
    """Features and labels on the CPU; the fits run on `device`. solver: lbfgs (full batch, float64),
    minibatch (float32, memory bounded by the features) or auto (by size, LBFGS_MAX_ELEMENTS); steps:
    iterations per fit instead of the solver's own (for measurements)."""
    fit, val = stratified_split(y, 0.2, seed)
    if k_shot:
        fit = k_shot_rows(fit, y, k_shot, seed)
        final = fit  # as CLIP_benchmark: k-shot trains on the k only
    else:
        final = torch.cat([fit, val])
    solver = probe_solver(solver, len(final), x.shape[1], n_classes)
    xs, ys = x, y  # what the fits read
    if solver == "minibatch":  # moved once, in float32; on the CPU already float32, this is no copy
        xs, ys = x.to(device, torch.float32), y.to(device)

    best_acc, best_lam = -1.0, None
    w = None
    for lam in grid:  # strong to weak: each fit starts from the previous answer
        w = fit_probe(solver, xs, ys, fit, n_classes, lam, w, device, steps, seed)
        if len(val):
            acc = (predict(xs, val, w, device) == y[val]).float().mean().item()
        else:  # no class had two images, so none was held out
            acc = 0.0
        # at equal accuracy the larger lambda, the more regularised model
        if acc > best_acc or (acc == best_acc and lam > best_lam):
            best_acc, best_lam = acc, lam

    w = fit_probe(solver, xs, ys, final, n_classes, best_lam, None, device, steps, seed)
    test = with_bias(test_x, device, w.dtype)
    # the classes' weight columns are the candidates: top-5 and ties count as in zero-shot
    classes = torch.arange(n_classes, device=device)
    hits = hits_at(test, w.T, test_y.to(device), classes, (1, 5)).cpu()
    metrics, ties = classification_metrics(hits, test_y, n_classes, "lp_")
    return metrics, {
        # per test item, the refit classifier of the chosen lambda (not the sweep's fits on the held-out fifth)
        "items": item_outcomes(hits, [k for k in ("lp_acc1", "lp_acc5") if k in metrics]),
        "lambda": best_lam,
        "val_acc1": best_acc,
        "k_shot": k_shot,
        "ties": ties,
        "solver": solver,
        "n": {"train": len(final), "val": len(val), "test": len(test_y)},
    }


def label_and_path(spec):
    """'LABEL=PATH', or PATH named by its last part (a split folder by its last two: imagenet/val)."""
    label, eq, path = spec.partition("=")
    if eq and not os.path.exists(spec):
        return label, path
    parts = os.path.normpath(spec).split(os.sep)
    name = os.path.splitext(parts[-1])[0]
    if name in ("val", "test", "train") and len(parts) > 1:
        name = "/".join(parts[-2:])
    return name, spec


def read_lines(path):
    """The file's lines, stripped, blank ones left out."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def find_tars(path, split):
    """The .tar shards in folder `path`, else in path/split (CLIP_benchmark's layout), sorted; [] if none."""
    if not os.path.isdir(path):
        return []
    tars = glob.glob(os.path.join(path, "*.tar")) or glob.glob(os.path.join(path, split, "*.tar"))
    return sorted(tars)


def sample_image(sample):
    """A tar sample's image bytes: its first non-empty member of the IMAGE_EXTS, or None."""
    for ext in IMAGE_EXTS:
        if sample.get(ext):
            return sample[ext]
    return None


def wds_samples(path, split, field, counts):
    """(image bytes, `field` bytes) per sample of the .tar shards in
    path (or path/split); None if there are none."""
    tars = find_tars(path, split)
    if not tars:
        return None
    samples = []
    for tar in tars:
        for _, sample in iter_tar(tar, {field, *IMAGE_EXTS}, counts):
            image = sample_image(sample)
            text = sample.get(field) or b""  # b"" where the sample has no such member
            if image is None or not text.strip():
                counts[f"sample_without_image_or_{field}"] += 1
            else:
                samples.append((image, sample[field]))
    return samples


def find_beside(folder, *names):
    """The first of `names` that is a file in folder, else in its parent (CLIP_benchmark's wds layout keeps
    classnames.txt and the templates above the split folder); None if none is."""
    for d in (folder, os.path.dirname(os.path.normpath(folder))):
        for name in names:
            candidate = os.path.join(d, name)
            if os.path.isfile(candidate):
                return candidate
    return None


def class_folder_labels(path, folders, names):
    """{folder: class index}: folders named as the classes are those classes; else the i-th sorted folder is
    class i (ImageNet's wnid folders), which needs as many folders as names."""
    if set(folders) <= set(names):
        return {f: names.index(f) for f in folders}
    if len(folders) == len(names):
        return {f: i for i, f in enumerate(folders)}
    raise SystemExit(
        f"{path}: {len(folders)} class folders but {len(names)} class names, and the folders are not "
        f"named as the classes: give one folder per class name (empty is fine), in classnames.txt order"
    )


def read_class_folders(path, names, counts):
    """(image paths, labels, class names) from a sub-folder per
    class; names None: the folders are the classes."""
    folders = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not folders:
        raise SystemExit(f"{path}: no class sub-folders and no .tar shards")
    names = names or folders
    label_of = class_folder_labels(path, folders, names)
    items, labels = [], []
    for folder in folders:
        files = sorted(os.listdir(os.path.join(path, folder)))
        images = [n for n in files if n.rpartition(".")[2].lower() in IMAGE_EXTS]
        counts["not_an_image_file"] += len(files) - len(images)
        for name in images:
            items.append(os.path.join(path, folder, name))
            labels.append(label_of[folder])
    return items, labels, names


def read_classes(path, args, counts):
    """(images as paths or bytes, labels, class names, templates
    file or None) from class folders or .cls tars."""
    if not os.path.isdir(path):
        raise SystemExit(f"{path}: not a folder of class sub-folders or .tar shards")
    if args.classnames == "imagenet":
        import open_clip

        names = list(open_clip.IMAGENET_CLASSNAMES)
    elif args.classnames:
        names = read_lines(args.classnames)
    else:
        found = find_beside(path, "classnames.txt")
        names = read_lines(found) if found else None

    samples = wds_samples(path, args.split, "cls", counts)
    if samples is not None:
        items = [image for image, _ in samples]
        labels = [int(cls) for _, cls in samples]
        if names is None or max(labels, default=0) >= len(names):
            raise SystemExit(
                f"{path}: .tar shards need a classnames.txt beside them with a line for every .cls label"
            )
    else:
        items, labels, names = read_class_folders(path, names, counts)
    if not items:
        raise SystemExit(f"{path}: no images found")
    templates = find_beside(path, "templates.txt", "zeroshot_classification_templates.txt")
    return items, torch.tensor(labels, dtype=torch.long), names, templates


def karpathy_records(data, split):
    """{"image", "captions"} per image of `split` in Karpathy's dataset_coco.json / dataset_flickr30k.json."""
    records = []
    for r in data["images"]:
        if r["split"] == split:
            image = os.path.join(r.get("filepath", ""), r["filename"])
            records.append({"image": image, "captions": [s["raw"] for s in r["sentences"]]})
    return records


def record_captions(record):
    """A record's non-blank captions as text: its "captions" (else "caption"), a list or a single string."""
    captions = record.get("captions", record.get("caption")) or []
    if isinstance(captions, str):
        captions = [captions]
    return [str(c) for c in captions if str(c).strip()]


def read_retrieval(path, args, counts, need_images=True):
    """[(image path or bytes, [captions])] from wds tars, JSONL, a JSON list or Karpathy's JSON."""
    samples = wds_samples(path, args.split, "txt", counts)
    if samples is not None:
        pairs = []
        for image, txt in samples:
            lines = decode_text(txt, counts).splitlines()  # a caption a line
            pairs.append((image, [line for line in lines if line.strip()]))
        return pairs

    if os.path.isdir(path):
        path = os.path.join(path, "captions.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(
            f"{path}: no such retrieval file (JSONL, JSON, or a folder with captions.jsonl or .tar shards)"
        )
    if path.endswith(".jsonl"):
        records = list(iter_jsonl(path, counts))
    else:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        if isinstance(records, dict):  # Karpathy's dataset_coco.json / dataset_flickr30k.json
            records = karpathy_records(records, args.split)
    root = args.image_root or os.path.dirname(os.path.abspath(path))
    pairs, missing = [], []
    for r in records:
        captions = record_captions(r)
        image = os.path.join(root, str(r.get("image", "")))
        if not captions:
            counts["image_without_captions"] += 1
        elif need_images and not os.path.isfile(image):  # CRA reads only the captions
            counts["missing_image_file"] += 1
            missing.append(image)
        else:
            pairs.append((image, captions))
    if missing:
        print0(
            f"WARNING {path}: {len(missing)} image files not found (e.g. {missing[0]}); skipped with their "
            "captions"
        )
    if not pairs:
        raise SystemExit(
            f"{path}: no image with captions and an existing file; image paths are taken relative to "
            f"{root} (--image-root)"
        )
    return pairs


class Images(torch.utils.data.Dataset):
    """(index, transformed image) per item, a path or a tar sample's
    bytes; (index, None) where it cannot be read."""

    def __init__(self, items, transform):
        self.items = items
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        source = io.BytesIO(item) if isinstance(item, bytes) else item
        try:
            with Image.open(source) as img:
                return i, self.transform(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return i, None  # not an image, truncated or corrupt: encode_images counts and names it


def collate(batch):
    """(indices of the readable images, those images stacked or None, indices of the unreadable ones)."""
    kept, images, failed = [], [], []
    for i, x in batch:
        if x is None:
            failed.append(i)
        else:
            kept.append(i)
            images.append(x)
    stacked = torch.stack(images) if images else None
    return kept, stacked, failed


def autocast(args):
    if args.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(
        args.device.split(":")[0], dtype=torch.bfloat16 if args.precision == "amp_bf16" else torch.float16
    )


def split_image_tower(model):
    """(the image tower up to its projection, the projection) where the tower ends in one: timm towers
    (trunk, then head) and ViTs (then proj); else None. --image-cache keeps what the first part gives."""
    visual = getattr(model, "clip", model).visual
    if isinstance(getattr(visual, "trunk", None), nn.Module) and isinstance(
        getattr(visual, "head", None), nn.Module
    ):
        return visual.trunk, visual.head
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        return ViTWithoutProjection(visual), ProjectionOf(visual)
    return None


class ViTWithoutProjection(nn.Module):
    """An open_clip ViT's output before `proj` (the pooled, normalised token)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, x):
        proj = self.visual.proj
        self.visual.proj = None
        try:
            return self.visual(x)
        finally:
            self.visual.proj = proj

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in self.visual.state_dict().items() if k != "proj"}


class ProjectionOf(nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, x):
        return x @ self.visual.proj


def image_cache_path(folder, trunk, transform, items):
    """The cache file of these images under this tower part and transform: its name hashes all three, so a
    tower that changed (unlocked, fine-tuned) never reads another's features."""
    digest = hashlib.sha256(repr(transform).encode())
    for name, tensor in sorted(trunk.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for item in items:
        digest.update(item.encode() if isinstance(item, str) else hashlib.sha256(item).digest())
    return os.path.join(folder, digest.hexdigest()[:24] + ".pt")


@torch.no_grad()
def encode_images(model, transform, items, args, what, counts):
    """Normalised embeddings of the readable images and their indices; unreadable ones are counted and named.
    With --image-cache, a tower that ends in a projection keeps the features before it on disk, keyed by the
    weights before it: evaluating several checkpoints of one locked tower embeds each image once."""
    split = split_image_tower(model) if args.image_cache else None
    if split is None:
        return encode_image_batches(model.encode_image, transform, items, args, what, counts)
    trunk, projection = split
    path = image_cache_path(args.image_cache, trunk, transform, items)
    if os.path.exists(path):
        cached = torch.load(path, map_location="cpu", weights_only=True)
        features, kept = cached["features"], cached["kept"]
        counts["unreadable_image"] += cached["unreadable"]
        print0(f"06_eval: {what}: image features from {path}")
    else:
        features, kept = encode_image_batches(trunk, transform, items, args, what, counts, normalized=False)
        os.makedirs(args.image_cache, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"features": features, "kept": kept, "unreadable": len(items) - len(kept)}, buffer)
        atomic_write(path, buffer.getvalue())
    embeddings = []
    for start in range(0, len(features), args.batch_size):
        x = features[start : start + args.batch_size].to(args.device)
        with autocast(args):
            embeddings.append(F.normalize(projection(x).float(), dim=-1).cpu())
    return torch.cat(embeddings), kept


@torch.no_grad()
def encode_image_batches(encode, transform, items, args, what, counts, normalized=True):
    """encode(images) of the readable images (L2-normalised unless told otherwise) and their indices;
    unreadable ones are counted and named."""
    loader = torch.utils.data.DataLoader(
        Images(items, transform),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=collate,
        pin_memory=args.device.startswith("cuda"),
    )
    embs, kept, bad = [], [], []
    for idx, x, failed in tqdm(
        loader, desc=f"{what} images", disable=dist_env()[0] != 0 or not sys.stderr.isatty(), leave=False
    ):
        bad += failed
        if x is not None:
            with autocast(args):
                out = encode(x.to(args.device, non_blocking=True)).float()
            embs.append((F.normalize(out, dim=-1) if normalized else out).cpu())
            kept += idx
    if bad:
        counts["unreadable_image"] += len(bad)
        example = items[bad[0]] if isinstance(items[bad[0]], str) else f"tar sample {bad[0]}"
        print0(f"WARNING {what}: {len(bad)} unreadable images skipped (e.g. {example})")
    if not kept:
        raise SystemExit(f"{what}: none of the {len(items)} images could be read")
    return torch.cat(embs), torch.tensor(kept, dtype=torch.long)


@torch.no_grad()
def encode_texts(model, tokenizer, texts, args, what):
    """Normalised embeddings; a repeated text (captions of two images, ImageNet's two 'missile' classes) is
    encoded once, so it ties exactly. Texts go 5 times --batch-size a pass, as CLIP_benchmark sends a batch's
    ~5 captions per image."""
    unique = list(dict.fromkeys(texts))
    embs = []
    size = 5 * args.batch_size
    for start in tqdm(
        range(0, len(unique), size),
        desc=what,
        disable=dist_env()[0] != 0 or not sys.stderr.isatty(),
        leave=False,
    ):
        with autocast(args):
            tokens = tokenizer(unique[start : start + size])
            # a text tower tokenizes inside encode_text
            tokens = tokens.to(args.device) if torch.is_tensor(tokens) else tokens
            embs.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    index = {t: i for i, t in enumerate(unique)}
    return torch.cat(embs)[torch.tensor([index[t] for t in texts], dtype=torch.long)]


def pick_templates(choice, found):
    import open_clip

    if choice == "openai" or choice == "auto" and not found:
        return [t("{c}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES], "openai"
    if choice == "laclip":
        return list(LACLIP_TEMPLATES), "laclip"
    path = found if choice == "auto" else choice
    templates = read_lines(path)
    if not templates or any("{c}" not in t for t in templates):
        raise SystemExit(f"{path}: every template line needs {{c}} where the class name goes")
    return templates, os.path.abspath(path)


def class_embeddings(model, tokenizer, names, templates, args):
    """Per class: the normalised mean of its prompts' normalised embeddings."""
    emb = encode_texts(
        model, tokenizer, [t.replace("{c}", c) for c in names for t in templates], args, "class prompts"
    )
    return F.normalize(emb.view(len(names), len(templates), -1).mean(1), dim=-1)


def warn_empty_classes(names, labels, what, counts):
    empty = [n for i, n in enumerate(names) if not (labels == i).any()]
    if empty:
        counts["classes_without_images"] = len(empty)
        print0(
            f"WARNING {what}: {len(empty)} of {len(names)} classes have no readable images "
            f"({', '.join(empty[:5])}): they "
            f"stay candidates, and mean per-class recall averages over the other {len(names) - len(empty)}"
        )


def run_zeroshot(model, transform, tokenizer, path, args, counts):
    items, labels, names, found = read_classes(path, args, counts)
    templates, template_name = pick_templates(args.templates, found)
    classifier = class_embeddings(model, tokenizer, names, templates, args)
    emb, kept = encode_images(model, transform, items, args, path, counts)
    labels = labels[kept]
    warn_empty_classes(names, labels, path, counts)
    hits = hits_at(emb, classifier, labels, torch.arange(len(names)), (1, 5))
    metrics, ties = classification_metrics(hits, labels, len(names))
    heads = {}
    if getattr(model, "rocket_heads", None) is not None:
        made, why = head_outputs(model, transform, tokenizer, names, templates, items, args, path, counts)
        if made is None:
            print0(f"06_eval: {path}: clip-rocket heads not evaluated: {why}")
        else:
            head_classifier, head_emb, head_kept = made
            if not torch.equal(head_kept, kept):
                raise SystemExit(f"{path}: the heads' pass read other images than the main one")
            head_metrics, heads = ensemble_scores(emb, classifier, head_emb, head_classifier, labels)
            metrics.update(head_metrics)
    ids = [[item_id(items[i], path), names[c]] for i, c in zip(kept.tolist(), labels.tolist(), strict=True)]
    chance = {"acc1": 1 / len(names)}
    if "acc5" in metrics:
        chance["acc5"] = 5 / len(names)
    return metrics, {
        "n": {"images": len(kept), "classes": len(names)},
        "chance": chance,
        "templates": template_name,
        "n_templates": len(templates),
        "ties": ties,
        **heads,
        "items": item_outcomes(hits, [k for k in ("acc1", "acc5") if k in metrics]),
        "item_order": item_order(ids),
    }


HEAD_WEIGHTS = [round(0.1 * i, 1) for i in range(1, 10)]  # clip-rocket's w z + (1 - w) h ensembles


def rocket_heads(meta):
    """clip-rocket's two MLP heads (05 --aug-views) rebuilt from a checkpoint's "extra_state_dict", in eval mode;
    None for a checkpoint without them. The layout is 05's: Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d,
    ReLU, Linear."""
    extra = meta.get("extra_state_dict", {}) if isinstance(meta, dict) else {}
    heads = {}
    for side in ("image_head", "text_head"):
        state = {k[len(side) + 1 :]: v for k, v in extra.items() if k.startswith(side + ".")}
        if "0.weight" not in state or "6.weight" not in state:
            return None
        hidden, in_dim = state["0.weight"].shape
        head = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, state["6.weight"].shape[0]),
        )
        head.load_state_dict(state)
        heads[side] = head.eval()
    return nn.ModuleDict(heads)


class TextFeatures(nn.Module):
    """An open_clip CLIP's text tower up to its projection (the pooled output the heads read)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def encode_text(self, tokens):
        kept = self.clip.text_projection
        self.clip.text_projection = None
        try:
            return self.clip.encode_text(tokens)
        finally:
            self.clip.text_projection = kept


class HeadText(nn.Module):
    def __init__(self, clip, head):
        super().__init__()
        self.features, self.head = TextFeatures(clip), head

    def encode_text(self, tokens):
        return self.head(self.features.encode_text(tokens))


def head_outputs(model, transform, tokenizer, names, templates, items, args, what, counts):
    """The heads' class embeddings and the images' head embeddings (kept indices too), or None with the reason
    when this model's towers do not expose their features before the projections."""
    split = split_image_tower(model)
    if split is None or not isinstance(getattr(model, "text_projection", None), nn.Parameter):
        return None, "the heads read features before the projections, which this tower does not expose"
    trunk, _ = split
    heads = model.rocket_heads
    classifier = class_embeddings(HeadText(model, heads["text_head"]), tokenizer, names, templates, args)

    def encode(x):
        features = trunk(x)
        if features.ndim == 4:  # a timm trunk without its own pooling, pooled as 05 pools it
            features = features.flatten(2).mean(-1)
        return heads["image_head"](features)

    emb, kept = encode_image_batches(encode, transform, items, args, what + " (heads)", counts)
    return (classifier, emb, kept), None


def ensemble_scores(emb, classifier, head_emb, head_classifier, labels, seed=0):
    """clip-rocket's eval of a model with heads: top-1 of the heads (h) and of w z + (1 - w) h for each w; and
    one honest number, "acc1_zh": w picked on one half of the images (stratified), scored on the other, both
    ways, the two halves' hits pooled (the original reports every w on the whole test set)."""
    z, h = emb @ classifier.T, head_emb @ head_classifier.T
    correct = {"h": (h.argmax(1) == labels).float()}
    for w in HEAD_WEIGHTS:
        correct[w] = ((w * z + (1 - w) * h).argmax(1) == labels).float()
    rng = torch.Generator().manual_seed(seed)
    half = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():  # every class split between the halves
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=rng)]
        half[members[: len(members) // 2]] = True
    picked, hits = [], torch.zeros(len(labels))
    for fit in (half, ~half):
        best = max(HEAD_WEIGHTS, key=lambda w: (correct[w][fit].mean().item(), -abs(w - 0.5)))
        picked.append(best)
        hits[~fit] = correct[best][~fit]
    metrics = {"acc1_h": correct["h"].mean().item(), "acc1_zh": hits.mean().item()}
    every_w = {str(w): correct[w].mean().item() for w in HEAD_WEIGHTS}
    return metrics, {"acc1_zh_each_w": every_w, "zh_w_picked": picked}


def run_retrieval(model, transform, tokenizer, path, args, counts):
    pairs = read_retrieval(path, args, counts)
    image_emb, kept = encode_images(model, transform, [p for p, _ in pairs], args, path, counts)
    pairs = [pairs[i] for i in kept.tolist()]
    texts = [c for _, captions in pairs for c in captions]
    text_image = torch.tensor(
        [i for i, (_, captions) in enumerate(pairs) for _ in captions], dtype=torch.long
    )
    text_emb = encode_texts(model, tokenizer, texts, args, "captions")
    metrics, ties = retrieval_metrics(image_emb, text_emb, text_image)
    # per query, as retrieval_metrics counts them: image_retrieval's queries are the captions, text_retrieval's
    # the images
    ks = (1, 5, 10)
    images = torch.arange(len(image_emb))
    items = {
        **item_outcomes(
            hits_at(text_emb, image_emb, text_image, images, ks), [f"image_retrieval_recall@{k}" for k in ks]
        ),
        **item_outcomes(
            hits_at(image_emb, text_emb, images, text_image, ks), [f"text_retrieval_recall@{k}" for k in ks]
        ),
    }
    ids = [[item_id(image, path), captions] for image, captions in pairs]
    return metrics, {
        "n": {"images": len(pairs), "captions": len(texts)},
        "chance": retrieval_chance(pairs, len(texts), ks),
        "ties": ties,
        "items": items,
        "item_order": item_order(ids),
    }


def retrieval_chance(pairs, n_texts, ks):
    """Recall@k of a random ranking: a caption query finds its image among the images in the top k with
    probability k/N; an image query finds one of its c captions among T with 1 - C(T - c, k) / C(T, k)."""
    chance = {}
    for k in ks:
        chance[f"image_retrieval_recall@{k}"] = min(1.0, k / len(pairs))
        total = 0.0
        for _, captions in pairs:
            miss = 1.0
            for i in range(min(k, n_texts)):
                miss *= max(0, n_texts - len(captions) - i) / (n_texts - i)
            total += 1 - miss
        chance[f"text_retrieval_recall@{k}"] = total / len(pairs)
    return chance


def run_linear_probe(model, transform, tokenizer, path, args, counts):
    items, labels, names, _ = read_classes(path, args, counts)
    x, kept = encode_images(model, transform, items, args, path, counts)
    y = labels[kept]
    if args.probe_test:
        items, labels, test_names, _ = read_classes(args.probe_test, args, counts)
        if test_names != names:
            raise SystemExit(f"{args.probe_test}: its classes differ from those of {path}")
        test_x, test_kept = encode_images(model, transform, items, args, args.probe_test, counts)
        test_y = labels[test_kept]
    else:  # one labelled set: a stratified half is the test set (the same half for every model: --seed)
        train, test = stratified_split(y, 0.5, args.seed)
        test_x, test_y, test_kept = x[test], y[test], kept[test]
        x, y = x[train], y[train]
    warn_empty_classes(names, test_y, f"{path} (probe test)", counts)
    metrics, extra = linear_probe(
        x, y, test_x, test_y, len(names), args.probe_k_shot, args.seed, args.device, solver=args.probe_solver
    )
    root = args.probe_test or path
    test_ids = []
    for i, c in zip(test_kept.tolist(), test_y.tolist(), strict=True):
        test_ids.append([item_id(items[i], root), names[c]])
    return metrics, {**extra, "n": {**extra["n"], "classes": len(names)}, "item_order": item_order(test_ids)}


def run_cra(model, transform, tokenizer, path, args, counts):
    """LLM2CLIP's caption retrieval accuracy: each image's first
    caption retrieves its second among all second captions."""
    groups = read_retrieval(path, args, counts, need_images=False)
    pairs = [captions[:2] for _, captions in groups if len(captions) >= 2]
    counts["image_with_one_caption"] += len(groups) - len(pairs)
    if not pairs:
        raise SystemExit(f"{path}: CRA needs images with two captions or more")
    captions = [caption for pair in pairs for caption in pair]
    emb = encode_texts(model, tokenizer, captions, args, "captions")
    ids = torch.arange(len(pairs))
    # first captions (even rows) query the second captions (odd rows); the right answer has the same id
    hits = hits_at(emb[0::2], emb[1::2], ids, ids, (1,))
    return {"cra": hits[:, 0].mean().item()}, {
        "n": {"images": len(pairs)},
        "ties": tie_shares(hits, ["cra"]),
        "items": item_outcomes(hits, ["cra"]),
        "item_order": item_order(pairs),
    }


class TextTowerCLIP(nn.Module):
    """LLM2CLIP: open_clip's image tower, a frozen language-model tower + adapter for text; encode_text takes
    strings, as the tower tokenizes with its own tokenizer. clip=None and
    adapter=None: the raw tower, for the text-only benchmark."""

    def __init__(self, clip, tower, tower_tokenizer, recipe, adapter, device):
        super().__init__()
        self.clip = clip
        self.tower = tower
        self.adapter = adapter
        self.tokenizer = tower_tokenizer
        self.recipe = recipe
        self.device = device

    def encode_image(self, x):
        return self.clip.encode_image(x)

    def encode_text(self, texts):
        # in its own dtype: a bf16 LLM can overflow fp16
        with torch.autocast(torch.device(self.device).type, enabled=False):
            emb = tower_encode(self.tower, self.tokenizer, texts, self.recipe, self.device)
        return emb if self.adapter is None else self.adapter(emb)


def adapter_weights(meta):
    """The adapter's weights from a checkpoint's "extra_state_dict", without their "adapter." prefix."""
    weights = {}
    for key, value in meta.get("extra_state_dict", {}).items():
        if key.startswith("adapter."):
            weights[key[len("adapter.") :]] = value
    return weights


def attach_text_tower(clip, meta, args):
    """(TextTowerCLIP, {"text_tower": path}): the tower from --text-tower or
    the checkpoint's record, its adapter loaded strictly."""
    cfg = meta.get("text_tower") if isinstance(meta, dict) else None
    if clip is not None and not cfg:
        raise SystemExit(
            f"--text-tower: {args.pretrained} is no LLM2CLIP checkpoint (no 'text_tower' record), it has "
            "no adapter"
        )
    path = args.text_tower or cfg.get("path")
    if not path or not os.path.isdir(path):
        raise SystemExit(
            f"text tower {path}: no such folder; pass --text-tower PATH, the encoder folder the checkpoint "
            "was trained with"
        )
    tower, tokenizer, settings = load_text_tower(
        path, args.device, args.text_tower_dtype, args.trust_remote_code
    )
    adapter = None
    if cfg:
        adapter = Adapter(**cfg["adapter"])
        adapter.load_state_dict(adapter_weights(meta))
        dim = adapter.config["dim"]
        if getattr(tower.config, "hidden_size", dim) != dim:  # a wrong --text-tower
            raise SystemExit(
                f"text tower {path}: width {tower.config.hidden_size}, but the adapter was trained on {dim}"
            )
    recipe = dict(settings)
    for key in RECIPE_KEYS:  # as trained: the checkpoint's record of how the tower embedded its texts
        if key in (cfg or {}):
            recipe[key] = cfg[key]
    model = TextTowerCLIP(clip, tower, tokenizer, recipe, adapter, args.device).to(args.device).eval()
    return model, {"text_tower": path}


def read_checkpoint(ckpt):
    """A checkpoint file's contents (a 05_train.py one: {"state_dict", "epoch", "step", ...}), read without
    running pickled code; {} for no file or one open_clip reads without pickle."""
    if not ckpt or ckpt.endswith((".safetensors", ".npz", ".npy")):
        return {}
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise SystemExit(
            f"{ckpt}: torch.load(weights_only=True) refuses it ({type(e).__name__}: {str(e)[:300]}); a "
            f"checkpoint must hold only tensors and plain Python values (store args as a dict)"
        ) from e


def image_normalization(args, meta):
    """(mean, std) of the eval transform: --image-mean/--image-std, else what the checkpoint was trained with
    (05 --image-mean/--image-std, e.g. a pretrained tower's own [-1, 1] scaling), else None (open_clip's)."""
    trained = meta.get("args", {}) if isinstance(meta, dict) else {}
    mean = args.image_mean or trained.get("image_mean")
    std = args.image_std or trained.get("image_std")
    return (tuple(mean) if mean else None), (tuple(std) if std else None)


def trained_note(args):
    """', trained as X: ...' where the checkpoint names a model other than --model, else ''."""
    trained_as = getattr(args, "trained_as", None)
    if not trained_as or trained_as == args.model:
        return ""
    return f"; the checkpoint was trained as {trained_as!r}: pass --model {trained_as}, or leave --model out"


def load_model(args):
    """open_clip model, eval transform, tokenizer, and what identifies the
    weights; LLM2CLIP checkpoints get their text tower."""
    import open_clip

    if not args.pretrained:  # text-only: the raw tower; strings go straight to its encode_text
        model, weights = attach_text_tower(None, None, args)
        return model, None, list, weights
    ckpt = args.pretrained if os.path.isfile(args.pretrained) else None  # else an open_clip tag
    if args.model_config:
        config = args.model_config
    elif ckpt:  # 05_train.py writes <NAME>.json beside its checkpoints
        config = os.path.join(os.path.dirname(os.path.abspath(ckpt)), args.model + ".json")
    else:
        config = None
    if config and os.path.isfile(config):
        if os.path.splitext(os.path.basename(config))[0] != args.model:
            raise SystemExit(
                f"{config}: open_clip names a config by its file stem, which must be --model {args.model}"
            )
        open_clip.add_model_config(config)
    elif args.model_config:
        raise SystemExit(f"--model-config {config}: no such file")
    trained = trained_note(args)
    if args.model not in open_clip.list_models() and not args.model.startswith("hf-hub:"):
        raise SystemExit(
            f"--model {args.model}: not an open_clip model, and no {config or '<NAME>.json'} config "
            f"(05_train.py writes it beside its checkpoints; or pass --model-config){trained}"
        )
    meta = read_checkpoint(ckpt)
    if args.pretrained == "none":
        print0("WARNING --pretrained none: random weights (a chance-level row)")
    mean, std = image_normalization(args, meta)
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            args.model,
            device=args.device,
            pretrained=None if args.pretrained == "none" else args.pretrained,
            image_mean=mean,
            image_std=std,
        )
    except (RuntimeError, AssertionError, KeyError, ValueError) as e:
        if not trained:
            raise
        raise SystemExit(
            f"--model {args.model} does not load {args.pretrained} ({type(e).__name__}){trained}"
        ) from e
    weights = {"model": args.model}
    if mean or std:
        weights["image_mean"] = mean
        weights["image_std"] = std
    if isinstance(meta, dict):
        weights["epoch"] = meta.get("epoch")
        weights["step"] = meta.get("step")
    # LLM2CLIP: texts go through a language-model tower and the checkpoint's adapter
    if args.text_tower or (isinstance(meta, dict) and "text_tower" in meta):
        model, tower = attach_text_tower(model, meta, args)
        return model, transform, list, {**weights, **tower}
    heads = rocket_heads(meta)
    if heads is not None:  # clip-rocket's heads: zero-shot also reports h and the w z + (1 - w) h ensembles
        model.rocket_heads = heads.to(args.device)
    return model.eval(), transform, open_clip.get_tokenizer(args.model), weights


def weights_id(pretrained):
    """What a row was measured on: the path or tag and, for a file, its
    size and mtime (a retrained checkpoint differs)."""
    stat = os.stat(pretrained) if os.path.isfile(pretrained) else None
    return {
        "pretrained": pretrained,
        **({"checkpoint_bytes": stat.st_size, "checkpoint_mtime": int(stat.st_mtime)} if stat else {}),
    }


def tower_id(path):
    """A tower folder and its newest file's mtime: a tower
    re-trained in place (07 again) is measured again."""
    files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else []
    return {"text_tower": path, "text_tower_mtime": int(max((os.stat(f).st_mtime for f in files), default=0))}


def read_results(path):
    """The newest record per (name, task, dataset), in the order the keys first appear."""
    latest = {}
    for r in iter_jsonl(path, Counter()) if os.path.exists(path) else []:
        latest[(r.get("name"), r.get("task"), r.get("dataset"))] = r
    return latest


def append_result(path, record):
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # several jobs append to one results file
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def table_columns(records):
    """The (task, dataset) pairs measured, tasks in TABLE's
    order, a task's datasets in the order first met."""
    tasks = list(TABLE)
    pairs = dict.fromkeys((task, dataset) for _, task, dataset in records if task in TABLE)
    return sorted(pairs, key=lambda pair: tasks.index(pair[0]))


def markdown_table(records):
    """A row per name, a column per (dataset, metric), tasks in
    TABLE's order; percentages, – where not measured."""
    columns = table_columns(records)
    measured = {key for record in records.values() for key in record.get("metrics", {})}
    shown = {
        task: [(k, label) for k, label in TABLE[task] if k not in HEAD_KEYS or k in measured]
        for task in TABLE
    }
    header = ["model"]
    for task, dataset in columns:
        for _, label in shown[task]:
            header.append(f"{dataset} {label}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = dict.fromkeys(n for n, _, _ in records)  # in the order first met
    for name in names:
        cells = [str(name)]
        for task, dataset in columns:
            metrics = records.get((name, task, dataset), {}).get("metrics", {})
            for key, _ in shown[task]:
                value = metrics.get(key)
                cells.append("–" if value is None else f"{100 * value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def row_line(name, record):
    """One result as a line: each metric with its chance level where known, the templates, counts, time."""
    chance = record.get("chance", {})
    shown = []
    for key, value in record["metrics"].items():
        note = f" (chance {100 * chance[key]:.1f}%)" if key in chance else ""
        shown.append(f"{key} {100 * value:.1f}%{note}")
    line = f"{name} {record['task']} {record['dataset']}: {', '.join(shown)} ({record['n']}"
    if "templates" in record:
        line += f"; templates {record['templates']}, {record['n_templates']} a class"
    line += f"; {record['seconds']:.1f}s)"
    if record["counts"]:
        line += f" skipped: {record['counts']}"
    return line


def plot_results(records, path):
    """The results as bar charts beside results.md: one panel per (task, data set), its first metric, a bar
    per model (matplotlib, optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0("06_eval: no results chart (pip install matplotlib for it)")
        return None
    panels = sorted(
        dict.fromkeys((t, d) for _, t, d in records if t in TABLE), key=lambda c: list(TABLE).index(c[0])
    )
    names = list(dict.fromkeys(n for n, _, _ in records))
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels) + 1, 0.32 * len(names) + 1.6), squeeze=False
    )
    # one scale for every panel (0 to the largest bar), so 0.5% and 13.5% do not look alike; chance dashed
    largest = 1.0
    for name, task, dataset in records:
        key = TABLE[task][0][0] if task in TABLE else None
        largest = max(largest, 100 * (records[(name, task, dataset)].get("metrics", {}).get(key) or 0.0))
    for ax, (task, dataset) in zip(axes[0], panels, strict=True):
        key, label = TABLE[task][0]
        values = []
        chance = None
        for name in names:
            record = records.get((name, task, dataset), {})
            metric = record.get("metrics", {}).get(key)
            values.append(0.0 if metric is None else 100 * metric)
            chance = record.get("chance", {}).get(key, chance)
        ax.barh(range(len(names)), values, color="tab:blue")
        ax.set_xlim(0, largest * 1.05)
        if chance is not None:
            ax.axvline(100 * chance, color="gray", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is axes[0][0] else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{dataset} {label}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


# The tasks and the toy sets they run on when no task is named (a command that names one runs only those named)
TOY_TASKS = {
    "zeroshot": ["toy/eval/zeroshot"],
    "retrieval": ["toy/eval/retrieval"],
    "linear_probe": ["toy/eval/zeroshot"],
    "cra": ["toy/eval/retrieval"],
}


def trained_model_name(pretrained):
    """The open_clip model name a 05_train.py checkpoint was trained as, or None (a tag, another file)."""
    if not pretrained or not os.path.isfile(pretrained) or not pretrained.endswith(".pt"):
        return None
    try:
        meta = torch.load(pretrained, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None  # load_model says what is wrong with the file
    return meta.get("model_name") if isinstance(meta, dict) else None


def tasks_of(args):
    """[(task, dataset label, path)] of every benchmark asked for, in table order."""
    tasks = []
    for task, specs in (
        ("zeroshot", args.zeroshot),
        ("retrieval", args.retrieval),
        ("linear_probe", args.linear_probe),
        ("cra", args.cra),
    ):
        for spec in specs:
            label, path = label_and_path(spec)
            if task == "linear_probe" and args.probe_k_shot:
                label += f" {args.probe_k_shot}-shot"  # a k-shot probe is its own column
            tasks.append((task, label, path))
    return tasks


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default=None,
        help="open_clip model name (a custom one needs its <name>.json); default: the name a 05 checkpoint "
        "stores, else toy-clip",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="checkpoint (05_train.py's latest.pt, epoch_N.pt), open_clip tag, or none (random)",
    )
    p.add_argument(
        "--text-tower",
        default=None,
        help="[hf:]encoder folder: replaces an LLM2CLIP checkpoint's; without --pretrained, "
        "CRA alone on the raw tower",
    )
    p.add_argument(
        "--text-tower-dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the text tower weights; None: bfloat16 on cuda, float32 on CPU",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the --text-tower folder (off for safety)",
    )
    p.add_argument(
        "--model-config",
        default=None,
        help="model config JSON (default: <dir of the checkpoint>/<model>.json, if there)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="row label (default: the checkpoint's folder, +/epoch_N if not latest.pt; else model/tag)",
    )
    p.add_argument(
        "--zeroshot",
        nargs="+",
        default=None,
        help="[LABEL=]class folders or wds tars (default when no task is named: toy/eval/zeroshot)",
    )
    p.add_argument(
        "--classnames",
        default=None,
        help="class names file, or imagenet (open_clip's 1000); default: the data's classnames.txt",
    )
    p.add_argument(
        "--templates",
        default="auto",
        help="openai (80), laclip (7), a file with {c}; auto: the data's templates.txt, else openai",
    )
    p.add_argument(
        "--retrieval",
        nargs="+",
        default=None,
        help="[LABEL=]JSONL, JSON, folder or wds tars (default when no task is named: toy/eval/retrieval)",
    )
    p.add_argument(
        "--image-root",
        default=None,
        help="retrieval image paths are relative to this (default: the annotation file's folder)",
    )
    p.add_argument(
        "--split",
        default="test",
        help="Karpathy JSON split; the wds sub-folder read when a folder holds no .tar",
    )
    p.add_argument(
        "--linear-probe",
        nargs="+",
        default=None,
        help="[LABEL=]labelled train set, as for --zeroshot (default when no task is named: toy/eval/zeroshot)",
    )
    p.add_argument(
        "--cra",
        nargs="+",
        default=None,
        help="[LABEL=]caption sets as for --retrieval, images unread (default when no task is named: "
        "toy/eval/retrieval)",
    )
    for task in TOY_TASKS:
        p.add_argument(
            f"--no-{task.replace('_', '-')}",
            action="store_true",
            help=f"skip the {task.replace('_', ' ')} task (for the toy defaults; a named task list runs only "
            "what it names)",
        )
    p.add_argument(
        "--probe-test",
        default=None,
        help="labelled test set of the probe (default: a stratified half of the train set)",
    )
    p.add_argument(
        "--probe-k-shot", type=int, default=0, help="train the probe on k images per class (0 = all)"
    )
    p.add_argument(
        "--probe-solver",
        choices=["auto", "lbfgs", "minibatch"],
        default="auto",
        help="lbfgs: full batch, float64 (memory ~ samples x classes); minibatch: batches of 4096, float32 "
        "(memory ~ the features); auto: lbfgs up to 2^26 train samples x (dim + classes)",
    )
    p.add_argument(
        "--results",
        default="toy/eval/results.jsonl",
        help="results JSONL, appended to; the table goes to <results>.md",
    )
    p.add_argument(
        "--item-results",
        default=None,
        help="also append, per row of --results, the per-item outcomes behind its metrics to this JSONL "
        "(for paired bootstrap intervals: runs/real_table.py --items)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="measure (name, task, dataset) rows already in --results again",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (texts: 5x)")
    p.add_argument(
        "--image-mean",
        type=float,
        nargs=3,
        default=None,
        help="per-channel mean of the eval transform (default: the checkpoint's 05 --image-mean, else open_clip's)",
    )
    p.add_argument(
        "--image-std",
        type=float,
        nargs=3,
        default=None,
        help="per-channel std of the eval transform (default: the checkpoint's 05 --image-std, else open_clip's)",
    )
    p.add_argument(
        "--image-cache",
        default=None,
        help="folder for image features before the tower's projection (timm towers, ViTs), keyed by the "
        "weights before it: checkpoints that share a locked image tower embed each eval image once",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader processes decoding images",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "amp", "amp_bf16"],
        default="auto",
        help="auto: amp (fp16 autocast, as CLIP_benchmark) on GPU, fp32 on CPU",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the probe's splits and k-shot picks")
    args = p.parse_args(argv)
    named = [task for task in TOY_TASKS if getattr(args, task) is not None]
    for task, default in TOY_TASKS.items():
        if getattr(args, f"no_{task}"):
            setattr(args, task, [])
        elif getattr(args, task) is None:  # no task named at all: the toy world's sets; else only those named
            setattr(args, task, [] if named else list(default))
    if not (args.pretrained or args.text_tower):
        p.error("give --pretrained CKPT|TAG, or --text-tower PATH alone for the text-only benchmark (CRA)")
    args.trained_as = trained_model_name(args.pretrained)
    args.model = args.model or args.trained_as or "toy-clip"
    args.precision = (
        ("amp" if args.device.startswith("cuda") else "fp32") if args.precision == "auto" else args.precision
    )
    args.text_tower_dtype = args.text_tower_dtype or (
        "bfloat16" if args.device.startswith("cuda") else "float32"
    )
    args.text_tower = args.text_tower[3:] if (args.text_tower or "").startswith("hf:") else args.text_tower
    # a tower has no image side: the text-only benchmark alone; toy/cc_minilm/model -> text:cc_minilm
    if not args.pretrained:
        args.zeroshot = args.retrieval = args.linear_probe = []
        parts = os.path.normpath(os.path.abspath(args.text_tower)).split(os.sep)
        args.name = args.name or "text:" + (
            parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]
        )
    # runs/alt/latest.pt -> alt, runs/alt/epoch_3.pt -> alt/epoch_3
    if args.name is None and os.path.isfile(args.pretrained):
        run = os.path.basename(os.path.dirname(os.path.abspath(args.pretrained)))
        stem = os.path.splitext(os.path.basename(args.pretrained))[0]
        args.name = run if stem == "latest" else f"{run}/{stem}"
    args.name = args.name or f"{args.model}/{args.pretrained}"
    return args


def main(argv=None):
    args = parse_args(argv)
    set_torch_threads()
    tasks = tasks_of(args)
    # the weights and the tower are part of what was measured: a row from other ones is measured again
    have = read_results(args.results)
    ident = {}
    if args.pretrained:
        ident.update(weights_id(args.pretrained))
    if args.text_tower:
        ident.update(tower_id(args.text_tower))
    old = {t: have.get((args.name, t[0], t[1])) for t in tasks}
    # with --item-results a row counts as done only when its items are there too, from the same weights
    have_items = read_results(args.item_results) if args.item_results else {}
    todo = []
    missing_items = []
    for t in tasks:
        same_weights = old[t] and all(old[t].get(k) == v for k, v in ident.items())
        items_line = have_items.get((args.name, t[0], t[1]))
        if args.item_results and same_weights and (not items_line or items_line.get("weights") != ident):
            missing_items.append(t)
        if args.overwrite or not same_weights or t in missing_items:
            todo.append(t)
    for t in tasks:
        if t not in todo:
            print0(
                f"{args.name} {t[0]} {t[1]}: already in {args.results}, skipped (--overwrite measures again)"
            )
        elif t in missing_items and not args.overwrite:
            print0(f"{args.name} {t[0]} {t[1]}: no items in {args.item_results} for its row: measuring again")
        elif old[t] and not args.overwrite:
            print0(
                f"{args.name} {t[0]} {t[1]}: its row was measured on other weights "
                f"({old[t].get('pretrained')}, or that "
                f"file changed since): measuring again"
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    if args.item_results:
        os.makedirs(os.path.dirname(os.path.abspath(args.item_results)), exist_ok=True)
    new = []
    if todo:
        model, transform, tokenizer, weights = load_model(args)
        with open(os.path.abspath(__file__), "rb") as f:
            script_sha = hashlib.sha256(f.read()).hexdigest()
        run = {
            "zeroshot": run_zeroshot,
            "retrieval": run_retrieval,
            "linear_probe": run_linear_probe,
            "cra": run_cra,
        }
        for task, label, path in todo:
            start, counts = time.time(), Counter()
            metrics, extra = run[task](model, transform, tokenizer, path, args, counts)
            items = extra.pop("items")  # not in the results row: a line of --item-results
            order = extra.pop("item_order")
            record = {
                "name": args.name,
                "task": task,
                "dataset": label,
                "metrics": metrics,
                **extra,
                "counts": {k: v for k, v in counts.items() if v},
                "path": os.path.abspath(path),
                **weights,
                **ident,
                "precision": args.precision,
                "device": args.device,
                "seconds": round(time.time() - start, 2),
                "script_sha256": script_sha,
                "host": socket.gethostname(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if args.item_results:  # first: a row in --results without its items is measured again
                append_result(
                    args.item_results,
                    {
                        "name": args.name,
                        "task": task,
                        "dataset": label,
                        "weights": ident,
                        "item_order": order,
                        "items": items,
                        "time": record["time"],
                    },
                )
            append_result(args.results, record)
            new.append(record)
            print0(row_line(args.name, record))
    table = markdown_table(read_results(args.results))
    atomic_write(os.path.splitext(args.results)[0] + ".md", table)
    if dist_env()[0] == 0:
        plot_results(read_results(args.results), os.path.splitext(args.results)[0] + ".png")
    print0("\n" + table)
    return new


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


if __name__ == "__main__":
    main()
