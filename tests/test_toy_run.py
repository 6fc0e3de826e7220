"""The README's toy commands are the run sheet's, and the run sheet works from a copy of the scripts."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def readme_toy_commands():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    toy_part = text.split("## At scale")[0]
    return [line.split("#")[0].strip() for line in toy_part.splitlines() if re.match(r"python 0\d_", line)]


def test_readme_toy_commands_are_the_run_sheet():
    sheet = open(os.path.join(REPO, "runs/toy.sh")).read()
    ran = [
        line.strip().replace("$PY ", "python ").replace(" ${TOY_ARGS:-}", "")
        for line in sheet.splitlines()
        if line.strip().startswith("$PY 0")
    ]
    assert readme_toy_commands() == ran and len(ran) >= 4


def test_toy_run_sheet_end_to_end(tmp_path):
    work = tmp_path / "copy"  # the scripts alone, as a user copies them
    os.makedirs(work / "runs")
    for name in os.listdir(REPO):
        if re.match(r"\d\d_.*\.py$", name):
            shutil.copy(os.path.join(REPO, name), work)
    shutil.copy(os.path.join(REPO, "runs/toy.sh"), work / "runs")
    env = dict(
        os.environ,
        SKIP_SETUP="1",
        PY=sys.executable,
        TOY_ARGS="--num-shards 2 --samples-per-shard 16 --lm-steps 20 --eval-per-class 2 --retrieval-images 8 --coco-images 10",
    )
    result = subprocess.run(
        ["bash", "runs/toy.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    toy = work / "toy"
    sources = {json.loads(line)["source"] for line in open(toy / "meta_pairs.jsonl")}
    assert {"human", "coco"} <= sources
    for out in ["rewrites"] + (["rewrites_eda"] if "EDA baseline skipped" not in result.stdout else []):
        for shard in ("00000", "00001"):
            keys = [json.loads(line)["key"] for line in open(toy / out / f"{shard}.jsonl")]
            assert len(keys) == len(set(keys)) == 16
            assert json.load(open(toy / out / f"{shard}.stats.json"))["in"] == 16
    for run in ("alt", "laclip", "laclip_mt"):
        assert (toy / "train" / run / "latest.pt").exists() and (
            toy / "train" / run / "toy-clip.json"
        ).exists()
    table = open(toy / "eval/results.md").read()
    browse = json.load(open(toy / "browse.html.stats.json"))
    assert (
        browse["cards"] == browse["keys_with_image"] == 32 and browse["counts"].get("missing_sidecar", 0) == 0
    )
    assert all(name in table for name in ("AltText", "LaCLIP", "LaCLIP-MT", "VeCLIP"))
    for stage_out, field in (("vec", "vec"), ("fused", "fused")):
        records = [json.loads(line) for line in open(toy / stage_out / "00000.jsonl")]
        assert len(records) == 16 and all(field in r and "status" in r for r in records)
    if (toy / "models/minilm").exists():
        assert json.load(open(toy / "cc_minilm/model/llm2clip_text.json"))["pooling"] == "mean"
        assert json.load(open(toy / "text_emb/00000.stats.json"))["in"] == 16
        assert "text_tower" in json.load(open(toy / "train/llm2clip/_config.json"))["args"]
        assert all(name in table for name in ("LLM2CLIP", "MiniLM-CC", "CRA"))


def test_slurm_train_wrapper_starts_one_torchrun_per_node_with_the_job_id(tmp_path):
    """runs/slurm_train.sbatch as sbatch runs it, with scontrol and srun stood in by scripts that
    print what they were asked: one torchrun per node, rendezvous on the first node with the job's id, every
    argument handed to 05_train.py as given; the README's multi-node line uses the wrapper."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\nprintf "gpu-a\\ngpu-b\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-[a-b]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=REPO,
    )
    script = os.path.join(REPO, "runs/slurm_train.sbatch")
    result = subprocess.run(
        ["bash", script, "--texts", "a b/c", "--out-dir", "out/x"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("srun --ntasks-per-node 1 torchrun --nnodes 2 --nproc-per-node 4 --rdzv-id 4242 ")
    assert "--rdzv-endpoint gpu-a:29500 05_train.py --texts a b/c --out-dir out/x" in line
    sbatch_lines = re.findall(r"^#SBATCH (--\S+)", open(script).read(), flags=re.MULTILINE)
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8"} <= set(sbatch_lines)
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    at_scale = readme.split("## At scale")[1].split("\n## ")[0]
    assert "sbatch --nodes 4 runs/slurm_train.sbatch --model ViT-B-16" in at_scale
    assert not re.search(
        r"(--out-dir|--pretrained) runs/", at_scale
    )  # outputs stay out of the scripts' folder


COMMAND = re.compile(r"(?:\bpython3?|\btorchrun\b[^\n\"]*?)\s+(\d\d_[a-z_]+\.py)([^\n]*)")
SBATCH = re.compile(
    r"\bsbatch\b[^\n`]*?runs/slurm_train\.sbatch([^\n]*)"
)  # the wrapper hands its arguments to 05_train.py


def shown_commands(text):
    """(script, argv) of every `python NN_*.py ...` / `torchrun ... NN_*.py ...` command in a text, continuation
    lines joined; a trailing comment, a `( ...)` note or `&& ...` is not part of it, `...` stands for flags
    shown elsewhere, and a command with a <placeholder> is left out."""
    import shlex

    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        found = [(m.group(1), m.group(2)) for m in COMMAND.finditer(line)]
        found += [("05_train.py", m.group(1)) for m in SBATCH.finditer(line)]
        for script, rest in found:
            rest = re.split(r"\s{2,}\(|&&|`", rest)[0]
            if "<" in rest:
                continue
            try:
                words = shlex.split(rest, comments=True)
            except ValueError:  # a command quoted inside sbatch --wrap "...": it ends at the quote
                words = shlex.split(rest.split('"')[0], comments=True)
            yield script, [w for w in words if w != "..."]


def test_every_command_the_readme_and_run_sheets_show_parses():
    """Each stage's own parser accepts every command README.md and the stages' run sheets show: a flag a stage
    does not have (or a combination it refuses) fails here, not in a user's job."""
    import ast
    import contextlib
    import importlib
    import io

    sources = [("README.md", open(os.path.join(REPO, "README.md"), encoding="utf-8").read())]
    for name in sorted(os.listdir(REPO)):
        if re.match(r"\d\d_.*\.py$", name):
            sources.append((name, ast.get_docstring(ast.parse(open(os.path.join(REPO, name)).read()))))
    checked, refused = 0, []
    for where, text in sources:
        for script, argv in shown_commands(text):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    importlib.import_module(script[:-3]).parse_args(argv)
            except SystemExit:
                refused.append(f"{where}: {script} {' '.join(argv)}: {err.getvalue().strip()[-200:]}")
            checked += 1
    assert not refused, "\n".join(refused)
    assert checked >= 90
    # and the check can fail: a flag no stage has
    bad = list(shown_commands("python 05_train.py --texts a --text-mode uniform --no-such-flag 3  # note"))
    assert bad == [("05_train.py", ["--texts", "a", "--text-mode", "uniform", "--no-such-flag", "3"])]
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()):
            importlib.import_module("05_train").parse_args(bad[0][1])
