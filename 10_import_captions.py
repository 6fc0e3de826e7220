"""Bring your own captions: caption tables made elsewhere, joined to your img2dataset shards, as 05-ready sidecars.

Many recaptioned sets exist already: LaCLIP's released CC3M/CC12M/RedCaps rewrites, Recap-DataComp-1B (`re_caption`),
DreamLIP's long and short captions, VeCap. This stage joins such a table to the shards you downloaded, by key or by
URL (img2dataset writes both into each sample's .json), and writes one sidecar per shard in 02's format, so
`05_train.py --texts <out-dir>` trains on them unchanged (`--text-mode uniform`: LaCLIP; `mix`: VeCLIP). Every key of
a shard gets a record (with no caption, status "no_caption": 05 then uses its AltText); table rows that match no sample
and samples that match no row are counted, never silently dropped. Instead of 02-04, not after them.

Reads:  --input   img2dataset tars (<key>.jpg + .txt + .json with "key" and "url"), files, folders or globs
        --table   CSV, TSV, JSONL or parquet (pyarrow, optional) files; --join key|url names the column to join on
                  (--join-column, default "key" or "url"); --captions COLUMN [COLUMN ...]: each one a caption source
                  (a dotted path reaches into nested JSON, a list value gives several captions)
        --laclip-csv + --laclip-texts SOURCE=FILE ...: LaCLIP's released files, a CSV of (image path, caption) and
                  one text file per source with one rewrite per CSV image row, in the same order; joined to your
                  samples by the original caption (= your AltText, whitespace-normalised: a rewrite of a text is a
                  rewrite for every image with that text) or, with --join path-stem, by the image file's stem = key
Writes: <out-dir>/<shard>.jsonl  {"key", "text", "rewrites": {source: [caption, ...]}, "status": "ok"|"no_caption"}
        <out-dir>/<shard>.stats.json (written last: the done-marker), <out-dir>/_import.json (rows matched,
        unmatched, ambiguous, per source; arguments and sha256 of every table)

On the toy shards: tests/test_import_captions.py writes a CSV, a TSV, a nested JSONL and LaCLIP-style files and imports each.
Recap-DataComp-1B:  python 10_import_captions.py --input datacomp/shards --table recap/*.parquet --join url \
              --join-column url --captions re_caption --out-dir datacomp/recap
LaCLIP CC3M:  python 10_import_captions.py --input cc3m/shards --laclip-csv cc3m_original.csv \
              --laclip-texts chatgpt=cc3m_chatgpt.txt bard=cc3m_bard.txt mscoco=cc3m_mscoco.txt human=cc3m_human.txt \
              --out-dir cc3m/laclip_rewrites
One process reads the tables once for all the shards it is given: memory grows with the samples of those shards, not
with the table. For thousands of shards, run one task per subset of --input (a glob per SLURM array task).
"""

import argparse
import csv
import glob
import hashlib
import json
import os
import socket
import tarfile
import time
import zlib
from collections import Counter, defaultdict


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
        **extra,
    }


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


def clean(text):
    return " ".join(str(text).split())


def index_shards(shards, join, counts):
    """{join value: [(shard, key)]} over every sample with an image, and {shard: [(key, AltText)]} in shard
    order. join: key, url (from the sample's .json), caption (the AltText) or path-stem (= key)."""
    index, samples = defaultdict(list), {}
    for shard in shards:
        rows = []
        for key, members in iter_tar(shard, {"txt", "json"}, counts):
            if not any(e in members for e in ("jpg", "jpeg", "png", "webp")):
                continue
            alt = clean(decode_text(members.get("txt") or b"", counts))
            rows.append((key, alt))
            if join in ("key", "path-stem"):
                value = key
            elif join == "caption":
                value = alt
            else:
                value = None
                try:
                    value = json.loads(members.get("json") or b"{}").get("url")
                except ValueError:
                    counts["bad_sample_json"] += 1
                if not value:
                    counts["sample_without_url"] += 1
            if value:
                index[str(value)].append((shard, key))
        samples[shard] = rows
    return index, samples


def field(record, path):
    """record[a][b]... for a dotted path; None where a part is missing."""
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def table_rows(path, columns, counts):
    """Dicts of `columns` (dotted paths for nested JSON) per row of a CSV, TSV, JSONL or parquet file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        top = sorted({c.split(".")[0] for c in columns})
        for batch in pq.ParquetFile(path).iter_batches(columns=top, batch_size=65536):
            for row in batch.to_pylist():
                yield {c: field(row, c) for c in columns}
    elif path.endswith((".jsonl", ".json")):
        for row in iter_jsonl(path, counts):
            if isinstance(row, dict):
                yield {c: field(row, c) for c in columns}
            else:
                counts["bad_row"] += 1
    elif path.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise SystemExit(f"{path}: no column {missing[0]!r} (columns: {reader.fieldnames})")
            for row in reader:
                yield {c: row.get(c) for c in columns}
    else:
        raise SystemExit(f"{path}: a table is .csv, .tsv, .jsonl/.json or .parquet")


def caption_list(value):
    """The captions a cell holds: a string, or each string of a list; empty ones dropped."""
    values = value if isinstance(value, list) else [value]
    return [clean(v) for v in values if isinstance(v, str) and v.strip()]


def join_tables(paths, join_column, sources, index, counts, found):
    """Adds each row's captions to found[(shard, key)][source]; counts
    rows matched, unmatched, without a join value."""
    for path in paths:
        for row in table_rows(path, [join_column] + sources, counts):
            value = row.get(join_column)
            if value is None or str(value) == "":
                counts["rows_without_join_value"] += 1
                continue
            targets = index.get(str(value).strip())
            if not targets:
                counts["rows_unmatched"] += 1
                continue
            counts["rows_matched"] += 1
            for target in targets:
                for source in sources:
                    found[target][source] += caption_list(row.get(source))


def join_laclip(csv_path, texts, join, index, counts, found):
    """LaCLIP's release: CSV rows (image path, caption); the i-th image row's rewrites are line i of each
    source's text file. Rows are joined on the caption (or the path's stem)."""
    files = {}
    for item in texts:
        source, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--laclip-texts takes SOURCE=FILE, not {item!r}")
        files[source] = open(path, encoding="utf-8", errors="replace")
    lines_read = 0
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.reader(f):
            if len(row) < 2 or not row[0].lower().endswith((".png", ".jpg", ".jpeg")):
                counts["laclip_rows_skipped"] += 1  # the header, or a row LaCLIP's own loader skips too
                continue
            rewrites = {}
            for source, handle in files.items():
                line = handle.readline()
                if not line:
                    raise SystemExit(
                        f"--laclip-texts {source}: ends at line {lines_read}, before {csv_path} does"
                    )
                rewrites[source] = clean(line)
            lines_read += 1
            value = os.path.splitext(os.path.basename(row[0]))[0] if join == "path-stem" else clean(row[1])
            targets = index.get(value)
            if not targets:
                counts["rows_unmatched"] += 1
                continue
            counts["rows_matched"] += 1
            if len(targets) > 1:
                counts["rows_matching_several_samples"] += 1
            for target in targets:
                for source, text in rewrites.items():
                    if text and text not in found[target][source]:
                        found[target][source].append(text)
    for source, handle in files.items():
        if handle.readline():
            counts[f"laclip_{source}_lines_past_the_csv"] += 1
        handle.close()
    return lines_read


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--input", nargs="+", default=["toy/shards"], help="img2dataset tars: files, folders or globs"
    )
    p.add_argument(
        "--table",
        nargs="*",
        default=[],
        help="caption tables: .csv, .tsv, .jsonl/.json, .parquet (globs too)",
    )
    p.add_argument(
        "--join",
        choices=["key", "url", "caption", "path-stem"],
        default=None,
        help="what joins a row to a sample (default: url for --table, caption for --laclip-csv)",
    )
    p.add_argument(
        "--join-column", default=None, help="the table's column holding it (default: key, url or caption)"
    )
    p.add_argument("--captions", nargs="*", default=[], help="caption columns of --table, one source each")
    p.add_argument("--laclip-csv", default=None, help="LaCLIP's <dataset>_original.csv (image path, caption)")
    p.add_argument(
        "--laclip-texts",
        nargs="*",
        default=[],
        help="SOURCE=FILE: LaCLIP's rewrite files, aligned to the CSV",
    )
    p.add_argument("--out-dir", default="toy/imported", help="folder for <shard>.jsonl sidecars (05 --texts)")
    p.add_argument("--overwrite", action="store_true", help="redo shards already imported")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start, counts = time.time(), Counter()
    if bool(args.table) == bool(args.laclip_csv):
        raise SystemExit("give --table (with --captions) or --laclip-csv (with --laclip-texts), one of them")
    if args.table and not args.captions:
        raise SystemExit("--table needs --captions: the columns that hold captions")
    if args.laclip_csv and not args.laclip_texts:
        raise SystemExit("--laclip-csv needs --laclip-texts SOURCE=FILE ...")
    join = args.join or ("url" if args.table else "caption")
    tables = list_inputs(args.table, (".csv", ".tsv", ".jsonl", ".json", ".parquet")) if args.table else []
    if args.table and not tables:
        raise SystemExit(f"no tables in {args.table}")
    shards = list_inputs(args.input, (".tar",))
    if not shards:
        raise SystemExit(f"no .tar shards in {args.input}")
    os.makedirs(args.out_dir, exist_ok=True)
    todo = [
        s
        for s in shards
        if args.overwrite or not os.path.exists(os.path.join(args.out_dir, shard_name(s) + ".stats.json"))
    ]
    print(
        f"10_import_captions: {len(shards)} shards, {len(shards) - len(todo)} already done; joining on "
        f"{join}",
        flush=True,
    )
    if not todo:
        return []
    index, samples = index_shards(todo, join, counts)
    found = defaultdict(lambda: defaultdict(list))
    if tables:
        sources = list(args.captions)
        join_tables(tables, args.join_column or join, sources, index, counts, found)
    else:
        sources = [item.partition("=")[0] for item in args.laclip_texts]
        counts["laclip_image_rows"] = join_laclip(
            args.laclip_csv, args.laclip_texts, join, index, counts, found
        )
    all_stats = []
    for shard in todo:
        records, shard_counts = [], Counter()
        for key, alt in samples[shard]:
            captions = found.get((shard, key), {})
            rewrites = {source: captions.get(source, []) for source in sources}
            has_caption = any(rewrites.values())
            shard_counts["ok" if has_caption else "no_caption"] += 1
            for source in sources:
                shard_counts[f"captions_{source}"] += len(rewrites[source])
            records.append(
                {
                    "key": key,
                    "text": alt,
                    "rewrites": rewrites,
                    "status": "ok" if has_caption else "no_caption",
                }
            )
        name = shard_name(shard)
        write_jsonl(os.path.join(args.out_dir, name + ".jsonl"), records)
        stats = {
            "shard": name,
            "input": os.path.abspath(shard),
            "in": len(records),
            "sources": sources,
            "join": join,
            **dict(shard_counts),
        }
        write_json(os.path.join(args.out_dir, name + ".stats.json"), stats)
        all_stats.append(stats)
        print(
            f"{name}: {shard_counts['ok']}/{len(records)} samples got captions, "
            f"{shard_counts['no_caption']} none",
            flush=True,
        )
    table_files = tables or [args.laclip_csv] + [item.partition("=")[2] for item in args.laclip_texts]
    summary = {
        "shards": len(todo),
        "samples": sum(s["in"] for s in all_stats),
        "samples_with_captions": sum(s.get("ok", 0) for s in all_stats),
        "counts": dict(counts),
        "tables": {path: sha256_of(path) for path in table_files},
        "seconds": round(time.time() - start, 2),
    }
    write_json(
        os.path.join(args.out_dir, "_import.json"), run_config(args, join=join, sources=sources, **summary)
    )
    print(
        f"10_import_captions: {summary['samples_with_captions']}/{summary['samples']} samples got captions; "
        f"{counts['rows_matched']} rows matched, {counts['rows_unmatched']} unmatched, "
        f"{counts['rows_without_join_value']} without a {join} ({summary['seconds']:.1f}s)",
        flush=True,
    )
    return all_stats


if __name__ == "__main__":
    main()
