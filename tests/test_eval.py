"""06_eval: metric conventions on hand-built embeddings, the linear probe, toy checkpoints end to end, bad inputs."""

import argparse
import importlib.util
import io
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, stage
from PIL import Image

ev = stage("06_eval")


def hits_for(scores, targets, ks=(1, 5)):
    """hits_at on a ready score matrix: identity candidates make queries @ candidates.T the scores themselves."""
    scores, targets = torch.tensor(scores, dtype=torch.float32), torch.tensor(targets)
    return ev.hits_at(scores, torch.eye(scores.shape[1]), targets, torch.arange(scores.shape[1]), ks), targets


def test_classification_known_answers_ties_and_fewer_than_5_classes():
    hits, y = hits_for(
        [
            [0.9, 0.1, 0.0],  # class 0: hit
            [0.2, 0.8, 0.1],  # class 0: class 1 wins
            [0.5, 0.5, 0.0],  # class 0: tied with class 1 -> half a hit
            [0.1, 0.7, 0.7],  # class 1: tied with class 2 -> half a hit
            [0.0, 0.1, 0.3],
        ],  # class 2: hit
        [0, 0, 0, 1, 2],
    )
    assert hits[:, 0].tolist() == [1, 0, 0.5, 0.5, 1]
    m, ties = ev.classification_metrics(hits, y, 3)
    assert set(m) == {"acc1", "mean_per_class_recall"}  # no top-5 with 3 classes
    assert m["acc1"] == pytest.approx(3 / 5) and ties == {"acc1": pytest.approx(2 / 5)}
    # balanced, not the plain accuracy
    assert m["mean_per_class_recall"] == pytest.approx((1.5 / 3 + 0.5 + 1) / 3)


def test_top5_and_a_collapsed_model_scores_chance():
    hits, y = hits_for(
        [
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # class 5 is 6th: no top-5 hit
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # class 4 is 5th: a top-5 hit
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        ],  # class 0: top-1
        [5, 4, 0],
    )
    m, ties = ev.classification_metrics(hits, y, 6)
    assert (m["acc1"], m["acc5"], ties) == (pytest.approx(1 / 3), pytest.approx(2 / 3), {})
    hits, y = hits_for([[0.3] * 6] * 6, list(range(6)))  # every class ties: chance, whatever the index order
    m, _ = ev.classification_metrics(hits, y, 6)
    assert (m["acc1"], m["acc5"], m["mean_per_class_recall"]) == (
        pytest.approx(1 / 6),
        pytest.approx(5 / 6),
        pytest.approx(1 / 6),
    )


def test_retrieval_known_answer_several_captions_per_image():
    # scores[i, j] = image i . caption j; captions 0,1 -> image 0, 2 -> image 1, 3,4,5 -> image 2
    # image 2: its captions 4, 5 tie caption 0 (another image's)
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.95, 0.0, 0.0, 0.0],
            [0.2, 0.1, 0.5, 0.6, 0.1, 0.1],  # caption 1 ties image 0 and image 1
            [0.7, 0.0, 0.0, 0.1, 0.7, 0.7],
        ]
    )
    text_image = torch.tensor([0, 0, 1, 2, 2, 2])
    m, ties = ev.retrieval_metrics(torch.eye(3), scores.T.contiguous(), text_image)
    # image->text: image 0's best caption (0.9) is beaten by caption 2, image 1's by caption 3; image 2: two positives and
    # one negative share first place, and a random order puts a positive first with chance 1 - 1/3
    assert m["text_retrieval_recall@1"] == pytest.approx((0 + 0 + 2 / 3) / 3)
    # text->image, every caption its own query: captions 0, 4, 5 hit, 1 ties (half), 2 and 3 miss
    assert m["image_retrieval_recall@1"] == pytest.approx(3.5 / 6)
    assert (
        m["text_retrieval_recall@5"] == m["image_retrieval_recall@5"] == m["image_retrieval_recall@10"] == 1.0
    )
    assert ties == {
        "image_retrieval_recall@1": pytest.approx(1 / 6),
        "text_retrieval_recall@1": pytest.approx(1 / 3),
    }


def test_ties_get_the_average_over_every_tie_order():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (4, 6), generator=g).float()  # 4 queries x 6 candidates, ties everywhere
    labels = torch.tensor([0, 1, 2, 3])
    candidate_labels = torch.tensor([0, 0, 1, 2, 3, 3])  # queries 0 and 3 have two positives
    got = ev.hits_at(scores, torch.eye(6), labels, candidate_labels, (1, 2, 3))
    orders = list(itertools.permutations(range(6)))
    for q in range(4):
        for j, k in enumerate((1, 2, 3)):
            top = [sorted(range(6), key=lambda c: (-scores[q, c].item(), order[c]))[:k] for order in orders]
            assert got[q, j].item() == pytest.approx(
                sum(any(candidate_labels[c] == q for c in t) for t in top) / len(orders)
            )


def clip_benchmark_recall(scores, positive, k):
    """CLIP_benchmark's recall_at_k (topk, a hit when any positive is in it), reference for tie-free scores."""
    topk = scores.topk(k, dim=1).indices
    return (positive.gather(1, topk).any(1)).float().mean().item()


def test_retrieval_equals_clip_benchmark_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    per_image = torch.randint(1, 8, (40,), generator=g)
    text_image = torch.repeat_interleave(torch.arange(40), per_image)
    images = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    texts = F.normalize(images[text_image] + 0.9 * torch.randn(len(text_image), 16, generator=g), dim=-1)
    m, ties = ev.retrieval_metrics(images, texts, text_image)
    scores = texts @ images.T
    positive = F.one_hot(text_image, 40).bool()
    for k in (1, 5, 10):  # no ties in random floats: exactly CLIP_benchmark's numbers
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(clip_benchmark_recall(scores, positive, k))
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(
            clip_benchmark_recall(scores.T, positive.T, k)
        )
    assert 0 < m["image_retrieval_recall@1"] < m["image_retrieval_recall@10"] < 1 and ties == {}
    ids = torch.arange(40)
    for q, c, ql, cl in ((images, texts, ids, text_image), (texts, images, text_image, ids)):
        assert torch.equal(
            ev.hits_at(q, c, ql, cl, (1, 5), max_elements=37), ev.hits_at(q, c, ql, cl, (1, 5))
        )


def test_retrieval_5k_images_25k_captions_stays_small():
    code = """
import importlib, resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
ev = importlib.import_module("06_eval")
torch.manual_seed(0)
images = torch.nn.functional.normalize(torch.randn(5000, 32), dim=-1)
text_image = torch.arange(25000) // 5
texts = torch.nn.functional.normalize(images[text_image] + torch.randn(25000, 32), dim=-1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m, _ = ev.retrieval_metrics(images, texts, text_image)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, m["image_retrieval_recall@1"])
"""
    # glibc keeps freed blocks by default (RSS would show its cache); a fixed mmap threshold makes RSS track live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", code, REPO], capture_output=True, text=True, timeout=300, env=env
    )
    grown_mb, r1 = out.stdout.split()
    assert int(grown_mb) < 150, (
        f"peak memory grew {grown_mb} MB; the full 5k x 25k score matrix alone is 500 MB"
    )
    assert 0 < float(r1) < 1


class Texts(list):
    def to(self, device):
        return self


class PromptModel:
    """encode_text returns a fixed vector per prompt, with different norms, so only the convention decides the answer."""

    vectors = {"a cat": [3.0, 0.0], "the cat": [0.0, 0.5], "a dog": [-3.0, 0.0], "the dog": [0.0, -0.5]}

    def __init__(self):
        self.seen = []

    def encode_text(self, texts):
        self.seen += texts
        return torch.tensor([self.vectors[t] for t in texts])


def test_class_embedding_is_normalised_mean_of_normalised_prompts():
    args = argparse.Namespace(batch_size=3, device="cpu", precision="fp32")
    got = ev.class_embeddings(PromptModel(), Texts, ["cat", "dog"], ["a {c}", "the {c}"], args)
    expected = F.normalize(torch.tensor([0.5, 0.5]), dim=0)  # the raw mean [1.5, 0.25] points elsewhere
    assert torch.allclose(got, torch.stack([expected, -expected]))
    model = PromptModel()  # a repeated text is encoded once, so its copies tie exactly
    emb = ev.encode_texts(model, Texts, ["a cat", "the cat", "a cat", "a dog", "a cat"], args, "texts")
    assert (
        sorted(model.seen) == ["a cat", "a dog", "the cat"]
        and torch.equal(emb[0], emb[4])
        and emb.shape == (5, 2)
    )


def test_template_sets(tmp_path):
    import open_clip

    laclip, name = ev.pick_templates("laclip", None)
    assert (
        name == "laclip"
        and laclip == [t("{c}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]
        and len(laclip) == 7
    )
    openai, _ = ev.pick_templates("openai", None)
    assert len(openai) == 80 and all("{c}" in t for t in openai)
    assert ev.pick_templates("auto", None)[1] == "openai"
    (tmp_path / "t.txt").write_text("a photo of a {c}.\nno placeholder\n")
    with pytest.raises(SystemExit, match="needs"):
        ev.pick_templates(str(tmp_path / "t.txt"), None)


def clusters(n_per_class, n_classes=4, dim=8, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.randn(n_classes, dim, generator=g)[y] + noise * torch.randn(len(y), dim, generator=g)
    return F.normalize(x, dim=-1), y


def test_logistic_regression_reaches_the_regularised_optimum():
    x, y = clusters(20, noise=1.0)
    xb, lam = ev.with_bias(x), 1e-2
    w = ev.fit_logistic(xb, y, 4, lam)
    # warm start: same answer
    assert torch.allclose(w, ev.fit_logistic(xb, y, 4, lam, init=ev.fit_logistic(xb, y, 4, 1.0)), atol=1e-4)
    grad = xb.T @ (torch.softmax(xb @ w, 1) - F.one_hot(y, 4).double()) / len(x)
    grad[:-1] += lam * w[:-1]  # the bias row is not penalised
    assert grad.abs().max() < 1e-5  # a stationary point of the convex objective is its optimum


def test_linear_probe_split_lambda_and_k_shot():
    x, y = clusters(30)
    test_x, test_y = clusters(10, seed=0)
    m, extra = ev.linear_probe(x, y, test_x, test_y, 4)
    assert m["lp_acc1"] == 1.0 and extra["n"] == {"train": 120, "val": 24, "test": 40}
    assert extra["lambda"] in [10.0 ** (e / 2) for e in range(4, -13, -1)] and extra["val_acc1"] == 1.0
    m, extra = ev.linear_probe(x, y, test_x, test_y, 4, k_shot=2)
    assert extra["n"]["train"] == 8 and extra["k_shot"] == 2
    with pytest.raises(SystemExit, match="a class has 24 training images"):
        ev.linear_probe(x, y, test_x, test_y, 4, k_shot=25)
    rest, part = ev.stratified_split(y, 0.2, 0)
    assert sorted(rest.tolist() + part.tolist()) == list(range(120)) and Counter(y[part].tolist()) == {
        c: 6 for c in range(4)
    }


def probe_objective(x, y, w, lam):
    xb = ev.with_bias(x)
    return (F.cross_entropy(xb @ w.double(), y) + lam / 2 * w[:-1].double().pow(2).sum()).item()


def test_minibatch_probe_comes_close_to_lbfgs():
    """The mini-batch solver (float32) on the L-BFGS objective: within 1% of its optimum, pointing the same
    way (at a strong lambda too, where W is tiny), and the whole probe (lambda sweep, refit) within a point of
    L-BFGS's accuracy; on a separable set 100%."""
    x, y = clusters(300, n_classes=10, dim=16, noise=2.0)
    test = torch.arange(len(y)) % 3 == 0  # a third of each class: the same class means
    x, y, test_x, test_y = x[~test], y[~test], x[test], y[test]
    idx = torch.arange(len(y))
    for lam in (1e-3, 100.0):
        exact = ev.fit_logistic(ev.with_bias(x), y, 10, lam)
        mini = ev.fit_logistic_minibatch(x, y, idx, 10, lam)
        assert mini.dtype == torch.float32 and mini.shape == exact.shape
        assert probe_objective(x, y, mini, lam) <= 1.01 * probe_objective(x, y, exact, lam)
        assert F.cosine_similarity(mini.double().flatten(), exact.flatten(), dim=0) > 0.99
    lbfgs, _ = ev.linear_probe(x, y, test_x, test_y, 10, solver="lbfgs")
    minibatch, extra = ev.linear_probe(x, y, test_x, test_y, 10, solver="minibatch")
    assert extra["solver"] == "minibatch" and abs(minibatch["lp_acc1"] - lbfgs["lp_acc1"]) <= 0.01
    x, y = clusters(40)
    test = torch.arange(len(y)) % 4 == 0
    m, extra = ev.linear_probe(x[~test], y[~test], x[test], y[test], 4, solver="minibatch")
    assert m["lp_acc1"] == 1.0 and extra["lambda"] == 100.0  # all tie on validation: the strongest lambda's W


def test_auto_solver_switches_by_size():
    assert ev.probe_solver("auto", 50_000, 512, 100) == "lbfgs"  # CIFAR-100's train set
    assert ev.probe_solver("auto", 1_281_167, 512, 1000) == "minibatch"  # ImageNet-1k's
    assert ev.probe_solver("lbfgs", 1_281_167, 512, 1000) == "lbfgs"
    x, y = clusters(30)
    assert ev.linear_probe(x, y, *clusters(10, seed=1), 4)[1]["solver"] == "lbfgs"  # small sets: as before


def largest_matrices(solver, n_per_class):
    """The most elements of any 2-d tensor an op makes in a probe on n_per_class x 10 samples of 16 dims."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2:
                    Largest.most = max(Largest.most, t.numel())
            return out

    x, y = clusters(n_per_class, n_classes=10, dim=16)
    test_x, test_y = clusters(10, n_classes=10, dim=16, seed=1)
    with Largest():
        ev.linear_probe(x, y, test_x, test_y, 10, grid=(1e-2, 1e-4), solver=solver, steps=3)
    return Largest.most


def test_minibatch_probe_memory_does_not_grow_with_samples():
    """Besides the features and an index or label per sample, the mini-batch probe makes nothing that grows
    with the number of samples: its largest matrix is a batch's, a chunk's or W's at 50k and 200k samples
    alike (here a validation chunk of 8192 rows with their bias column). L-BFGS's grows with them."""
    bound = max(4096 * 17, 8192 * 17, 17 * 10)  # a batch of rows or of logits, a chunk of rows, W
    assert largest_matrices("minibatch", 5000) == largest_matrices("minibatch", 20000) == bound
    assert largest_matrices("lbfgs", 20000) >= 4 * largest_matrices("lbfgs", 5000) > bound


# ---- dataset readers and the results table ----


def test_dataset_labels_from_paths(tmp_path, monkeypatch):
    assert ev.label_and_path("imagenet=/data/imagenet/val") == ("imagenet", "/data/imagenet/val")
    # a split: two parts
    assert ev.label_and_path("/data/imagenet/val") == (
        "imagenet/val",
        "/data/imagenet/val",
    )
    assert ev.label_and_path("/data/coco/dataset_coco.json") == (
        "dataset_coco",
        "/data/coco/dataset_coco.json",
    )
    assert ev.label_and_path("data/test.jsonl") == ("data/test.jsonl", "data/test.jsonl")
    assert ev.label_and_path("val") == ("val", "val")
    monkeypatch.chdir(tmp_path)
    os.mkdir("a=b")
    assert ev.label_and_path("a=b") == ("a=b", "a=b")  # an existing path with "=" in its name is a path


def png_bytes(color, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, fmt)
    return buf.getvalue()


def test_class_folders_by_order_with_metadata_one_level_up(tmp_path):
    """ImageNet-style folders (not named as the classes): the i-th sorted folder is class i; classnames.txt and the
    templates are found in the folder's parent; a file that is no image is counted."""
    for name in ("n02/b.png", "n01/a.png", "n02/c.JPG"):
        (tmp_path / "val" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / name).write_bytes(png_bytes("red"))
    (tmp_path / "val/n01/readme.txt").write_text("not an image")
    (tmp_path / "classnames.txt").write_text("goldfish\n\nshark\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    args, counts = argparse.Namespace(classnames=None, split="test"), Counter()
    items, labels, names, templates = ev.read_classes(str(tmp_path / "val"), args, counts)
    val = str(tmp_path / "val")
    assert items == [f"{val}/n01/a.png", f"{val}/n02/b.png", f"{val}/n02/c.JPG"] and labels.tolist() == [
        0,
        1,
        1,
    ]
    assert names == ["goldfish", "shark"] and templates == str(
        tmp_path / "zeroshot_classification_templates.txt"
    )
    assert counts == {"not_an_image_file": 1}
    (tmp_path / "classnames.txt").write_text("goldfish\nshark\nthird\n")
    with pytest.raises(SystemExit, match="2 class folders but 3 class names"):
        ev.read_classes(val, args, Counter())


def test_retrieval_formats_json_list_karpathy_and_caption_shapes(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        (tmp_path / f"images/{i}.png").write_bytes(png_bytes("blue"))
    records = [
        {"image": "images/0.png", "captions": ["one", "  ", 2]},  # blank dropped, a number made text
        {"image": "images/1.png", "caption": "a single string"},
        {"image": "images/1.png", "captions": []},
        {"image": "images/gone.png", "captions": ["lost"]},
    ]
    (tmp_path / "list.json").write_text(json.dumps(records))
    args, counts = argparse.Namespace(split="test", image_root=None), Counter()
    pairs = ev.read_retrieval(str(tmp_path / "list.json"), args, counts)
    assert pairs == [
        (str(tmp_path / "images/0.png"), ["one", "2"]),
        (str(tmp_path / "images/1.png"), ["a single string"]),
    ]
    assert counts == {"image_without_captions": 1, "missing_image_file": 1}
    texts_only = ev.read_retrieval(str(tmp_path / "list.json"), args, Counter(), need_images=False)
    assert [p for p, _ in texts_only] == [p for p, _ in pairs] + [str(tmp_path / "images/gone.png")]
    karpathy = {
        "images": [
            {
                "filepath": "images",
                "filename": "0.png",
                "split": "test",
                "sentences": [{"raw": "a"}, {"raw": "b"}],
            },
            {"filepath": "images", "filename": "1.png", "split": "train", "sentences": [{"raw": "c"}]},
            {"filename": "images/1.png", "split": "test", "sentences": [{"raw": "d"}]},
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    assert ev.read_retrieval(str(tmp_path / "dataset_coco.json"), args, Counter()) == [
        (str(tmp_path / "images/0.png"), ["a", "b"]),
        (str(tmp_path / "images/1.png"), ["d"]),
    ]


def test_unreadable_images_are_collated_apart(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes("red"))
    items = [str(tmp_path / "a.png"), b"not an image", png_bytes("blue"), str(tmp_path / "gone.png")]
    dataset = ev.Images(items, lambda img: torch.tensor(img.getpixel((0, 0)), dtype=torch.float32))
    batch = [dataset[i] for i in range(len(dataset))]
    assert [x is None for _, x in batch] == [False, True, False, True]
    kept, images, failed = ev.collate(batch)
    assert kept == [0, 2] and failed == [1, 3] and images.tolist() == [[255, 0, 0], [0, 0, 255]]
    assert ev.collate(batch[1:2]) == ([], None, [1])


def test_markdown_table_layout():
    records = {
        ("CLIP", "cra", "toy"): {"metrics": {"cra": 0.5}},
        ("CLIP", "zeroshot", "toy"): {"metrics": {"acc1": 0.25, "mean_per_class_recall": 0.12345}},
        ("LaCLIP", "zeroshot", "toy"): {"metrics": {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5}},
        ("LaCLIP", "other", "toy"): {"metrics": {"x": 1.0}},  # a task TABLE does not show
    }
    assert ev.markdown_table(records) == (  # tasks in TABLE's order, not the records'; – where not measured
        "| model | toy top-1 | toy top-5 | toy mean recall | toy CRA |\n"
        "|---|---|---|---|---|\n"
        "| CLIP | 25.0 | – | 12.3 | 50.0 |\n"
        "| LaCLIP | 50.0 | 100.0 | 50.0 | – |\n"
    )


# ---- end to end on the toy eval sets with toy checkpoints ----


def train_toy_checkpoint(toy, out, steps, seed):
    """What 05_train.py writes: <out>/latest.pt {epoch, step, state_dict, optimizer, args, model_name} + toy-clip.json."""
    import open_clip

    os.makedirs(out, exist_ok=True)
    shutil.copy(toy / "models/toy-clip.json", out / "toy-clip.json")
    open_clip.add_model_config(str(out / "toy-clip.json"))
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms("toy-clip")
    tokenizer = open_clip.get_tokenizer("toy-clip")
    records = [json.loads(line) for line in open(toy / "eval/retrieval/captions.jsonl")]
    images = torch.stack([preprocess(Image.open(toy / "eval/retrieval" / r["image"])) for r in records])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        f_i, f_t, scale = model(images, tokenizer([rng.choice(r["captions"]) for r in records]))
        logits, labels = scale * f_i @ f_t.T, torch.arange(len(records))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(
        {
            "epoch": 1,
            "step": steps,
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "args": {"lr": 1e-3, "steps": steps},
            "model_name": "toy-clip",
        },
        out / "latest.pt",
    )
    return out / "latest.pt"


@pytest.fixture(scope="module")
def ckpts(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        name: train_toy_checkpoint(toy, root / name, steps, seed)
        for name, steps, seed in (("alt", 8, 0), ("laclip", 4, 1))
    }


def evaluate(toy, ckpt, results, *extra):
    return ev.main(
        [
            "--model",
            "toy-clip",
            "--pretrained",
            str(ckpt),
            "--results",
            str(results),
            "--workers",
            "0",
            "--zeroshot",
            str(toy / "eval/zeroshot"),
            "--retrieval",
            str(toy / "eval/retrieval"),
            "--linear-probe",
            str(toy / "eval/zeroshot"),
            *extra,
        ]
    )


def reference_metrics(toy, ckpt):
    """The toy benchmarks computed the plain way: one image at a time, loops, a full sort."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("toy-clip", pretrained=str(ckpt))
    tokenizer = open_clip.get_tokenizer("toy-clip")
    embed_image = lambda p: F.normalize(
        model.encode_image(preprocess(Image.open(p).convert("RGB"))[None]), dim=-1
    )[0]
    embed_text = lambda t: F.normalize(model.encode_text(tokenizer([t])), dim=-1)[0]
    zs = toy / "eval/zeroshot"
    names = (zs / "classnames.txt").read_text().split()
    templates = (zs / "templates.txt").read_text().splitlines()
    with torch.no_grad():
        classifier = torch.stack(
            [
                F.normalize(torch.stack([embed_text(t.replace("{c}", c)) for t in templates]).mean(0), dim=0)
                for c in names
            ]
        )
        hits, per_class = [], {c: [] for c in range(len(names))}
        for c, name in enumerate(names):
            for f in sorted(os.listdir(zs / name)):
                s = classifier @ embed_image(zs / name / f)
                hits.append((int(s.argmax()) == c, sorted(s.tolist(), reverse=True).index(s[c].item()) < 5))
                per_class[c].append(hits[-1][0])
        records = [json.loads(line) for line in open(toy / "eval/retrieval/captions.jsonl")]
        images = torch.stack([embed_image(toy / "eval/retrieval" / r["image"]) for r in records])
        texts = [(i, embed_text(c)) for i, r in enumerate(records) for c in r["captions"]]

    def top1(scores, positive):  # a tie for first place: the positives' share of it
        first = [j for j, s in enumerate(scores) if s == max(scores)]
        return sum(positive(j) for j in first) / len(first)

    t2i = [top1([float(image @ t) for image in images], lambda j, i=i: j == i) for i, t in texts]
    i2t = [
        top1([float(images[i] @ t) for _, t in texts], lambda j, i=i: texts[j][0] == i)
        for i in range(len(images))
    ]
    return {
        "acc1": sum(h for h, _ in hits) / len(hits),
        "acc5": sum(h for _, h in hits) / len(hits),
        "mean_per_class_recall": sum(sum(v) / len(v) for v in per_class.values()) / len(per_class),
        "image_retrieval_recall@1": sum(t2i) / len(t2i),
        "text_retrieval_recall@1": sum(i2t) / len(i2t),
        "items": {  # per item, in the plain order: class folders, files, captions.jsonl
            "acc1": [float(h) for h, _ in hits],
            "image_retrieval_recall@1": t2i,
            "text_retrieval_recall@1": i2t,
        },
    }


def test_end_to_end_agrees_with_plain_reference_and_reruns_skip(toy, ckpts, tmp_path):
    results = tmp_path / "results.jsonl"
    new = evaluate(toy, ckpts["alt"], results)
    assert [(r["name"], r["task"], r["dataset"]) for r in new] == [
        ("alt", "zeroshot", "zeroshot"),
        ("alt", "retrieval", "retrieval"),
        ("alt", "linear_probe", "zeroshot"),
    ]
    zs, rt, lp = new
    ref = reference_metrics(toy, ckpts["alt"])
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert zs["metrics"][key] == pytest.approx(ref[key]), key
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@1"):
        assert rt["metrics"][key] == pytest.approx(ref[key]), key
    assert (
        zs["n"] == {"images": 16, "classes": 8}
        and zs["templates"].endswith("templates.txt")
        and zs["n_templates"] == 7
    )
    # 8 images
    assert rt["n"] == {"images": 8, "captions": 40} and rt["metrics"]["image_retrieval_recall@10"] == 1.0
    assert lp["n"]["train"] + lp["n"]["test"] == 16 and 0 <= lp["metrics"]["lp_acc1"] <= 1
    shot = ev.main(
        [
            "--pretrained",
            str(ckpts["alt"]),
            "--results",
            str(tmp_path / "shot.jsonl"),
            "--workers",
            "0",
            "--no-zeroshot",
            "--no-cra",
            "--no-retrieval",
            "--linear-probe",
            str(toy / "eval/zeroshot"),
            "--probe-k-shot",
            "1",
        ]
    )
    assert shot[0]["dataset"] == "zeroshot 1-shot" and shot[0]["n"]["train"] == 8 and shot[0]["k_shot"] == 1
    assert (
        zs["epoch"] == 1
        and zs["step"] == 8
        and zs["pretrained"] == str(ckpts["alt"])
        and not zs["counts"]
        and not zs["ties"]
    )
    assert [json.loads(line) for line in open(results)] == new
    before = results.read_bytes()
    # already there: skipped
    assert evaluate(toy, ckpts["alt"], results) == [] and results.read_bytes() == before
    os.utime(ckpts["alt"], (zs["checkpoint_mtime"] + 60,) * 2)  # as if training went on: the rows are stale
    again = evaluate(toy, ckpts["alt"], results, "--no-retrieval", "--no-linear-probe")
    assert [r["task"] for r in again] == ["zeroshot"] and again[0]["checkpoint_mtime"] == zs[
        "checkpoint_mtime"
    ] + 60
    redo = evaluate(toy, ckpts["alt"], results, "--overwrite", "--no-zeroshot", "--no-linear-probe")
    lines = [json.loads(line) for line in open(results)]
    # history kept
    assert [r["task"] for r in redo] == ["retrieval"] and len(lines) == 5 and lines[-2:] == again + redo
    # the newest row per key counts
    assert list(ev.read_results(str(results)).values()) == [
        again[0],
        redo[0],
        lp,
    ]
    # a second model, a separate invocation
    evaluate(toy, ckpts["laclip"], results, "--name", "LaCLIP rewrites")
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith(
        "| model | zeroshot top-1 | zeroshot top-5 | zeroshot mean recall | retrieval I→T R@1"
    )
    assert [row.split(" | ")[0] for row in table[2:]] == ["| alt", "| LaCLIP rewrites"]
    assert table[2].split(" | ")[1] == f"{100 * again[0]['metrics']['acc1']:.1f}"  # the newest row


def test_item_results_average_to_the_metrics_in_the_same_order_for_every_model(toy, ckpts, tmp_path):
    results, items_file = tmp_path / "results.jsonl", tmp_path / "results.items.jsonl"
    evaluate(toy, ckpts["alt"], results, "--name", "CLIP (AltText) (seed 0)")  # an old run, without items
    rows = {}
    for name, ckpt in (("CLIP (AltText) (seed 0)", ckpts["alt"]), ("LaCLIP (seed 0)", ckpts["laclip"])):
        new = evaluate(
            toy,
            ckpt,
            results,
            "--name",
            name,
            "--item-results",
            str(items_file),
            "--zeroshot",
            f"clipart={toy / 'eval/zeroshot'}",
            "--retrieval",
            f"clipart={toy / 'eval/retrieval'}",
            "--linear-probe",
            f"clipart={toy / 'eval/zeroshot'}",
            "--cra",
            f"clipart={toy / 'eval/retrieval'}",
        )
        assert [r["task"] for r in new] == ["zeroshot", "retrieval", "linear_probe", "cra"]
        rows[name] = new
    lines = [json.loads(line) for line in open(items_file)]
    assert len(lines) == 8 and all("items" not in r and "item_order" not in r for r in rows[name])
    by_key = {(r["name"], r["task"]): r for r in lines}
    for name, new in rows.items():
        for row in new:
            line = by_key[(name, row["task"])]
            assert (line["dataset"], line["weights"]) == (
                "clipart",
                {k: row[k] for k in ("pretrained", "checkpoint_bytes", "checkpoint_mtime")},
            )
            expected = {
                "zeroshot": {"acc1", "acc5"},  # mean per-class recall is no item mean
                "retrieval": {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)},
                "linear_probe": {"lp_acc1", "lp_acc5"},
                "cra": {"cra"},
            }[row["task"]]
            assert set(line["items"]) == expected
            for metric, values in line["items"].items():
                assert sum(values) / len(values) == pytest.approx(row["metrics"][metric], abs=1e-12), metric
                assert all(0 <= v <= 1 for v in values)
            if row["task"] == "zeroshot":
                n = {"acc1": 16}
            elif row["task"] == "retrieval":  # caption queries, image queries
                n = {"image_retrieval_recall@1": 40, "text_retrieval_recall@1": 8}
            elif row["task"] == "linear_probe":  # the probe's test half
                n = {"lp_acc1": row["n"]["test"]}
            else:
                n = {"cra": row["n"]["images"]}
            assert {m: len(line["items"][m]) for m in n} == n
    # the same items in the same order for both models, and that order is the readers' plain one
    for task in ("zeroshot", "retrieval", "linear_probe", "cra"):
        assert (
            by_key[("CLIP (AltText) (seed 0)", task)]["item_order"]
            == by_key[("LaCLIP (seed 0)", task)]["item_order"]
        )
    ref = reference_metrics(toy, ckpts["laclip"])["items"]
    zs, rt = by_key[("LaCLIP (seed 0)", "zeroshot")], by_key[("LaCLIP (seed 0)", "retrieval")]
    assert zs["items"]["acc1"] == pytest.approx(ref["acc1"])
    assert rt["items"]["image_retrieval_recall@1"] == pytest.approx(ref["image_retrieval_recall@1"])
    assert rt["items"]["text_retrieval_recall@1"] == pytest.approx(ref["text_retrieval_recall@1"])
    # done rows with their items are skipped; a row without items is measured again
    again = evaluate(
        toy,
        ckpts["laclip"],
        results,
        "--name",
        "LaCLIP (seed 0)",
        "--item-results",
        str(items_file),
        "--zeroshot",
        f"clipart={toy / 'eval/zeroshot'}",
        "--no-retrieval",
        "--no-linear-probe",
    )
    assert again == []
    redo = evaluate(
        toy,
        ckpts["alt"],
        results,
        "--name",
        "CLIP (AltText) (seed 0)",
        "--item-results",
        str(tmp_path / "other.items.jsonl"),
        "--no-retrieval",
        "--no-linear-probe",
    )
    assert [r["task"] for r in redo] == ["zeroshot"]
    # runs/real_table.py pairs the two by seed and item
    spec = importlib.util.spec_from_file_location("real_table", os.path.join(REPO, "runs/real_table.py"))
    real_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_table)
    diffs = real_table.main([str(results), "--draws", "200"])
    for metric in (
        "zeroshot/clipart/acc1",
        "retrieval/clipart/image_retrieval_recall@1",
        "linear_probe/clipart/lp_acc1",
    ):
        d = diffs["LaCLIP"][metric]
        task = metric.split("/")[0]
        want = rows["LaCLIP (seed 0)"][["zeroshot", "retrieval", "linear_probe"].index(task)]["metrics"]
        base = rows["CLIP (AltText) (seed 0)"][["zeroshot", "retrieval", "linear_probe"].index(task)][
            "metrics"
        ]
        key = metric.split("/")[2]
        assert d["basis"] == "seeds+items" and d["diff"] == pytest.approx(want[key] - base[key])
        assert d["lo"] <= d["diff"] <= d["hi"]


def test_checkpoint_weights_and_config_lookup(toy, ckpts, tmp_path):
    model, _, _, weights = ev.load_model(ev.parse_args(["--pretrained", str(ckpts["alt"])]))
    saved = torch.load(ckpts["alt"], weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert weights == {"model": "toy-clip", "epoch": 1, "step": 8}
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(ckpts["alt"], lone / "latest.pt")
    # a name open_clip has never seen, no config beside it
    with pytest.raises(SystemExit, match="toy-clip-lone.json"):
        ev.load_model(ev.parse_args(["--model", "toy-clip-lone", "--pretrained", str(lone / "latest.pt")]))
    shutil.copy(toy / "models/toy-clip.json", tmp_path / "toy-clip-lone.json")
    ev.load_model(
        ev.parse_args(
            [
                "--model",
                "toy-clip-lone",
                "--pretrained",
                str(lone / "latest.pt"),
                "--model-config",
                str(tmp_path / "toy-clip-lone.json"),
            ]
        )
    )
    ckpt = torch.load(ckpts["alt"], weights_only=True)
    ckpt["args"] = argparse.Namespace(lr=1e-3)  # a pickled object: weights_only refuses it
    torch.save(ckpt, lone / "namespace.pt")
    with pytest.raises(SystemExit, match="weights_only"):
        ev.load_model(
            ev.parse_args(
                [
                    "--pretrained",
                    str(lone / "namespace.pt"),
                    "--model-config",
                    str(toy / "models/toy-clip.json"),
                ]
            )
        )


def write_wds(folder, samples, meta):
    """CLIP_benchmark's local wds layout: <folder>/test/0.tar + nshards.txt, metadata files at <folder>."""
    os.makedirs(folder / "test")
    with tarfile.open(folder / "test/0.tar", "w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "test/nshards.txt").write_text("1\n")
    for name, text in meta.items():
        (folder / name).write_text(text)


def test_clip_benchmark_wds_layout_reads_the_same(toy, ckpts, tmp_path):
    zs, rt = toy / "eval/zeroshot", toy / "eval/retrieval"
    names = (zs / "classnames.txt").read_text().split()
    write_wds(
        tmp_path / "wzs",
        [
            {"jpg": (zs / n / f).read_bytes(), "cls": str(c).encode()}
            for c, n in enumerate(names)
            for f in sorted(os.listdir(zs / n))
        ],
        {
            "classnames.txt": (zs / "classnames.txt").read_text(),
            "zeroshot_classification_templates.txt": (zs / "templates.txt").read_text(),
        },
    )
    write_wds(
        tmp_path / "wrt",
        [
            {"jpg": (rt / r["image"]).read_bytes(), "txt": "\n".join(r["captions"]).encode()}
            for r in map(json.loads, open(rt / "captions.jsonl"))
        ],
        {"dataset_type.txt": "retrieval\n"},
    )
    plain = evaluate(toy, ckpts["alt"], tmp_path / "a.jsonl", "--no-linear-probe")
    wds = evaluate(
        toy,
        ckpts["alt"],
        tmp_path / "b.jsonl",
        "--no-linear-probe",
        "--zeroshot",
        str(tmp_path / "wzs"),
        "--retrieval",
        str(tmp_path / "wrt"),
    )
    assert [r["metrics"] for r in wds] == [r["metrics"] for r in plain] and [r["n"] for r in wds] == [
        r["n"] for r in plain
    ]


def test_bad_inputs_are_named_and_counted(toy, ckpts, tmp_path, capsys):
    good = sorted((toy / "eval/retrieval/images").iterdir())
    data = tmp_path / "zs"
    for name, files in {
        "circle": good[:2],
        "square": good[2:4],
        "ring": [],
    }.items():  # ring: an empty class folder
        (data / name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, data / name)
    (data / "circle/broken.jpg").write_bytes(b"not a jpeg at all")
    (data / "circle/cut.jpg").write_bytes(good[0].read_bytes()[:300])  # truncated
    (data / "circle/notes.txt").write_text("not an image")
    (data / "classnames.txt").write_text("circle\nsquare\nring\nstar\n")  # star: in classnames.txt, no folder
    (data / "templates.txt").write_text("a {c}.\n")
    rt = tmp_path / "rt"
    rt.mkdir()
    (rt / "broken.jpg").write_bytes(b"\x89PNG garbage")
    lines = [{"image": os.path.relpath(f, rt), "captions": ["a shape", "another shape"]} for f in good[:3]]
    lines += [
        {"image": "gone.jpg", "captions": ["lost"]},
        {"image": "broken.jpg", "captions": ["bad"]},
        {"image": os.path.relpath(good[4], rt), "captions": []},
    ]
    (rt / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    zs, rr = ev.main(
        [
            "--pretrained",
            str(ckpts["alt"]),
            "--results",
            str(tmp_path / "r.jsonl"),
            "--workers",
            "0",
            "--no-cra",
            "--zeroshot",
            str(data),
            "--retrieval",
            str(rt / "captions.jsonl"),
            "--no-linear-probe",
        ]
    )
    out = capsys.readouterr().out
    assert zs["counts"] == {"unreadable_image": 2, "not_an_image_file": 1, "classes_without_images": 2}
    assert zs["n"] == {"images": 4, "classes": 4} and "acc5" not in zs["metrics"]
    assert (
        "2 of 4 classes have no readable images (ring, star)" in out and "2 unreadable images skipped" in out
    )
    assert rr["counts"] == {"missing_image_file": 1, "unreadable_image": 1, "image_without_captions": 1}
    assert rr["n"] == {"images": 3, "captions": 6} and "gone.jpg" in out
    (rt / "none.jsonl").write_text(json.dumps({"image": "gone.jpg", "captions": ["x"]}) + "\n")
    with pytest.raises(SystemExit, match="--image-root"):
        ev.main(
            [
                "--pretrained",
                str(ckpts["alt"]),
                "--results",
                str(tmp_path / "r.jsonl"),
                "--no-zeroshot",
                "--no-linear-probe",
                "--no-cra",
                "--retrieval",
                str(rt / "none.jsonl"),
            ]
        )
    (data / "classnames.txt").write_text("a\nb\n")  # 3 folders, 2 names, and the folders are not the names
    with pytest.raises(SystemExit, match="3 class folders but 2 class names"):
        ev.main(
            [
                "--pretrained",
                str(ckpts["alt"]),
                "--results",
                str(tmp_path / "r2.jsonl"),
                "--zeroshot",
                str(data),
                "--no-retrieval",
                "--no-linear-probe",
                "--no-cra",
            ]
        )


# ---- LLM2CLIP checkpoints and CRA ----


def save_llm2clip(toy, out, seed, tower=None):
    """What 05_train.py --text-tower writes: an open_clip checkpoint + "text_tower" record + "adapter.*" in extra_state_dict."""
    import open_clip

    os.makedirs(out, exist_ok=True)
    shutil.copy(toy / "models/toy-clip.json", out / "toy-clip.json")
    open_clip.add_model_config(str(out / "toy-clip.json"))
    torch.manual_seed(seed)
    clip, adapter = open_clip.create_model("toy-clip"), ev.Adapter(384, 64, layers=1)
    record = {
        "path": str(tower or toy / "models/minilm"),
        "cache": None,
        "pooling": "mean",
        "normalize": True,
        "max_length": 32,
        "dim": 384,
        "adapter": adapter.config,
    }
    torch.save(
        {
            "epoch": 1,
            "step": 3,
            "state_dict": clip.state_dict(),
            "args": {"text_tower": record["path"]},
            "model_name": "toy-clip",
            "extra_state_dict": {"adapter." + k: v for k, v in adapter.state_dict().items()},
            "text_tower": record,
        },
        out / "latest.pt",
    )
    return out / "latest.pt", adapter


def test_llm2clip_checkpoint_end_to_end_through_the_adapter(toy, tmp_path):
    ckpt, adapter = save_llm2clip(toy, tmp_path / "llm2clip", seed=0)
    rows = evaluate(toy, ckpt, tmp_path / "r.jsonl", "--cra", str(toy / "eval/retrieval"))
    assert [(r["name"], r["task"]) for r in rows] == [
        ("llm2clip", t) for t in ("zeroshot", "retrieval", "linear_probe", "cra")
    ]
    assert all(
        r["text_tower"] == str(toy / "models/minilm") and r["epoch"] == 1 and r["step"] == 3 for r in rows
    )
    assert all(0 <= v <= 1 for r in rows for v in r["metrics"].values())
    assert (
        rows[1]["n"] == {"images": 8, "captions": 40}
        and rows[3]["n"] == {"images": 8}
        and set(rows[3]["metrics"]) == {"cra"}
    )
    assert "| retrieval CRA |" in (tmp_path / "r.md").read_text()
    model, _, tokenizer, _ = ev.load_model(ev.parse_args(["--pretrained", str(ckpt)]))
    tower, tower_tokenizer, _ = ev.load_text_tower(str(toy / "models/minilm"), "cpu")
    texts = ["a red circle", "two blue squares"]
    with torch.no_grad():  # the frozen tower, then the saved adapter; CLIP's own text tower is not used
        assert torch.allclose(
            model.encode_text(tokenizer(texts)),
            adapter(
                ev.tower_encode(tower, tower_tokenizer, texts, {**ev.TOWER_RECIPE, "max_length": 32}, "cpu")
            ),
            atol=1e-5,
        )
    # an adapter that maps every text to one point (its bias): CRA and retrieval fall to 1 in 8, as the 8 images do
    saved = torch.load(ckpt, weights_only=True)
    saved["extra_state_dict"]["adapter.proj.weight"].zero_()
    torch.save(saved, ckpt)
    cra, rt = evaluate(
        toy,
        ckpt,
        tmp_path / "collapsed.jsonl",
        "--no-zeroshot",
        "--no-linear-probe",
        "--cra",
        str(toy / "eval/retrieval"),
    )[::-1]
    assert cra["metrics"]["cra"] == pytest.approx(1 / 8) and rt["metrics"][
        "image_retrieval_recall@1"
    ] == pytest.approx(1 / 8)


def write_captions(path, groups):
    """A caption set whose images do not exist: CRA never opens them."""
    path.write_text(
        "".join(json.dumps({"image": f"missing/{i}.jpg", "captions": c}) + "\n" for i, c in enumerate(groups))
    )
    return str(path)


def test_cra_known_answers_pairing_and_ties(toy, tmp_path):
    minilm = ["--text-tower", str(toy / "models/minilm"), "--results", str(tmp_path / "r.jsonl")]
    same = write_captions(
        tmp_path / "same.jsonl",
        [
            ["a red car", "a red car"],
            ["a dog on the grass", "a dog on the grass"],
            ["an old man reading", "an old man reading", "a third caption"],
        ],
    )
    # first captions query, second captions answer: a and b hold each other's text (misses), c and d their own (hits);
    # c's third caption is not its answer, e has one caption and is left out
    swapped = write_captions(
        tmp_path / "swapped.jsonl",
        [
            ["a photo of a cat", "a bowl of soup"],
            ["a bowl of soup", "a photo of a cat"],
            ["a red bicycle", "a red bicycle", "a photo of a cat"],
            ["a tall tree", "a tall tree"],
            ["a lonely caption"],
        ],
    )
    # two images whose second captions are the same text: each query ties its answer with the other image's, half a hit
    tied = write_captions(tmp_path / "tied.jsonl", [["a red car", "a red car"], ["a blue car", "a red car"]])
    rows = ev.main(minilm + ["--cra", same, swapped, tied])
    assert [(r["name"], r["task"], r["dataset"]) for r in rows] == [
        ("text:minilm", "cra", d) for d in ("same", "swapped", "tied")
    ]
    assert rows[0]["metrics"] == {"cra": 1.0} and rows[0]["n"] == {"images": 3} and not rows[0]["counts"]
    assert (
        rows[1]["metrics"] == {"cra": 0.5}
        and rows[1]["n"] == {"images": 4}
        and rows[1]["counts"] == {"image_with_one_caption": 1}
    )
    assert rows[2]["metrics"] == {"cra": 0.5} and rows[2]["ties"] == {"cra": 1.0}
    assert rows[0]["ties"] == {} and all(r["text_tower"] == str(toy / "models/minilm") for r in rows)


def test_text_only_mode_runs_cra_alone_and_resumes(toy, tmp_path):
    results = tmp_path / "r.jsonl"
    args = [
        "--text-tower",
        "hf:" + str(toy / "models/minilm"),
        "--results",
        str(results),
        "--cra",
        str(toy / "eval/retrieval"),
    ]
    # --zeroshot, --retrieval, --linear-probe keep their defaults: a tower alone has no image side
    rows = ev.main(args)
    assert [(r["name"], r["task"], r["dataset"]) for r in rows] == [("text:minilm", "cra", "retrieval")]
    assert (
        rows[0]["text_tower"] == str(toy / "models/minilm")
        and rows[0]["n"] == {"images": 8}
        and 0 <= rows[0]["metrics"]["cra"] <= 1
    )
    assert ev.main(args) == [] and len(results.read_text().splitlines()) == 1  # already there: skipped
    # 07's <out-dir>/model
    assert ev.parse_args(["--text-tower", "toy/cc_minilm/model"]).name == "text:cc_minilm"
    with pytest.raises(SystemExit):
        ev.parse_args([])  # neither --pretrained nor --text-tower
    tower = tmp_path / "tower"  # MiniLM's files, linked: a folder this test may change
    tower.mkdir()
    for f in os.listdir(toy / "models/minilm"):
        (tower / f).symlink_to(toy / "models/minilm" / f)
    again = ["--text-tower", str(tower), "--results", str(results), "--cra", str(toy / "eval/retrieval")]
    assert len(ev.main(again)) == 1 and ev.main(again) == []
    (tower / "retrained.txt").write_text("07 ran again in this folder")
    os.utime(tower / "retrained.txt", (time.time() + 10,) * 2)
    assert len(ev.main(again)) == 1  # a tower re-trained in place is measured again


def test_missing_or_wrong_text_tower_is_a_clear_error(toy, ckpts, tmp_path):
    ckpt, _ = save_llm2clip(toy, tmp_path / "moved", seed=0, tower=tmp_path / "gone/model")
    with pytest.raises(SystemExit, match="gone/model: no such folder; pass --text-tower"):
        ev.main(
            [
                "--pretrained",
                str(ckpt),
                "--results",
                str(tmp_path / "r.jsonl"),
                "--no-zeroshot",
                "--no-retrieval",
                "--no-linear-probe",
            ]
        )
    rows = ev.main(
        [
            "--pretrained",
            str(ckpt),
            "--results",
            str(tmp_path / "r.jsonl"),
            "--no-zeroshot",
            "--no-retrieval",
            "--no-linear-probe",
            "--cra",
            str(toy / "eval/retrieval"),
            "--text-tower",
            str(toy / "models/minilm"),
        ]
    )
    assert rows[0]["text_tower"] == str(toy / "models/minilm")  # the override is recorded
    # a plain CLIP checkpoint has no adapter to put on a tower
    with pytest.raises(SystemExit, match="no LLM2CLIP checkpoint"):
        ev.load_model(
            ev.parse_args(["--pretrained", str(ckpts["alt"]), "--text-tower", str(toy / "models/minilm")])
        )


def test_results_chart_beside_the_table(tmp_path):
    pytest.importorskip("matplotlib")
    records = {
        ("CLIP", "zeroshot", "toy"): {"metrics": {"acc1": 0.2}},
        ("LaCLIP", "zeroshot", "toy"): {"metrics": {"acc1": 0.3}},
        ("CLIP", "cra", "toy"): {"metrics": {"cra": 0.5}},
    }
    path = ev.plot_results(records, str(tmp_path / "results.png"))
    from PIL import Image

    with Image.open(path) as png:
        assert png.format == "PNG" and len(png.convert("RGB").getcolors(1 << 20)) > 20


def cache_args(folder):
    cache = None if folder is None else str(folder)
    return argparse.Namespace(image_cache=cache, batch_size=4, workers=0, device="cpu", precision="fp32")


@pytest.mark.parametrize("tower", ["timm", "vit"])
def test_image_cache_gives_the_towers_embeddings_and_is_keyed_by_its_weights(tmp_path, monkeypatch, tower):
    """--image-cache: the same normalised embeddings as the whole tower, read back without running the part
    before the projection; a tower whose weights before the projection differ never reads them."""
    import open_clip
    from torchvision import transforms as T

    text_cfg = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    vision_cfg = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
    if tower == "timm":
        vision_cfg = {"timm_model_name": "test_efficientnet", "timm_pool": "avg", "timm_proj": "linear"}
        vision_cfg["image_size"] = 32
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    items = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png_bytes((40 * i, 90, 200 - 30 * i)))
        items.append(str(path))
    items.append(str(tmp_path / "missing.png"))  # unreadable: counted, left out, cached as such
    cache = tmp_path / "cache"
    plain, kept = ev.encode_images(model, transform, items, cache_args(None), "plain", Counter())
    first, kept_first = ev.encode_images(model, transform, items, cache_args(cache), "first", Counter())
    assert kept.tolist() == kept_first.tolist() == list(range(6)) and len(list(cache.iterdir())) == 1
    assert torch.allclose(plain, first, atol=1e-5)
    # read back: the part before the projection is not run again
    trunk, _ = ev.split_image_tower(model)

    def fail(*args):
        raise AssertionError("the tower ran again")

    monkeypatch.setattr(type(trunk), "forward", fail)
    counts = Counter()
    again, _ = ev.encode_images(model, transform, items, cache_args(cache), "again", counts)
    assert torch.equal(again, first) and counts["unreadable_image"] == 1
    # the projection is applied to the cached features: a negated projection negates the embeddings
    with torch.no_grad():
        if tower == "timm":
            model.visual.head.proj.weight.mul_(-1)
        else:
            model.visual.proj.mul_(-1)
    negated, _ = ev.encode_images(model, transform, items, cache_args(cache), "negated", Counter())
    assert torch.allclose(negated, -first, atol=1e-5)
    monkeypatch.undo()
    # new weights before the projection: a new cache file, never the old features
    with torch.no_grad():
        next(trunk.parameters()).add_(1.0)
    ev.encode_images(model, transform, items, cache_args(cache), "new trunk", Counter())
    assert len(list(cache.iterdir())) == 2


def test_only_the_named_tasks_run_and_a_bare_task_flag_is_refused(toy, ckpts, tmp_path, capsys):
    """Naming a task runs that task alone (no toy retrieval, probe or CRA tagging along); --no-<task> drops one
    of the toy defaults; a task flag without a data set is an error, not a silent 'off'."""
    base = ["--pretrained", str(ckpts["alt"]), "--workers", "0"]
    rows = ev.main(
        [*base, "--results", str(tmp_path / "a.jsonl"), "--retrieval", str(toy / "eval/retrieval")]
    )
    assert [r["task"] for r in rows] == ["retrieval"]
    args = ev.parse_args([*base, "--no-linear-probe", "--no-cra"])
    assert [t[0] for t in ev.tasks_of(args)] == ["zeroshot", "retrieval"]
    for flag in ("--linear-probe", "--zeroshot", "--cra", "--retrieval"):
        with pytest.raises(SystemExit):
            ev.parse_args([*base, flag])


def test_model_name_from_the_checkpoint_chance_levels_and_templates(toy, ckpts, tmp_path, capsys):
    """No --model: the checkpoint's model_name; a different --model is refused naming the trained one. Each row
    prints its chance level and the templates, and keeps the chance in the results."""
    args = ev.parse_args(["--pretrained", str(ckpts["alt"])])
    assert args.model == "toy-clip"
    with pytest.raises(SystemExit, match="trained as 'toy-clip'"):
        ev.load_model(ev.parse_args(["--pretrained", str(ckpts["alt"]), "--model", "ViT-B-32"]))
    rows = ev.main(
        [
            "--pretrained",
            str(ckpts["alt"]),
            "--workers",
            "0",
            "--results",
            str(tmp_path / "r.jsonl"),
            "--zeroshot",
            str(toy / "eval/zeroshot"),
            "--retrieval",
            str(toy / "eval/retrieval"),
        ]
    )
    out = capsys.readouterr().out
    zs, rt = rows
    classes = zs["n"]["classes"]
    assert zs["chance"]["acc1"] == pytest.approx(1 / classes) and f"(chance {100 / classes:.1f}%)" in out
    assert f"templates {zs['templates']}, {zs['n_templates']} a class" in out
    n = rt["n"]["images"]
    assert rt["chance"]["image_retrieval_recall@1"] == pytest.approx(1 / n)
    # an image query with c of T captions: 1 - C(T - c, 1) / C(T, 1) = c / T at k = 1
    assert rt["chance"]["text_retrieval_recall@1"] == pytest.approx(
        rt["n"]["captions"] / n / rt["n"]["captions"]
    )


def test_top5_is_left_out_with_five_classes():
    hits = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    metrics, _ = ev.classification_metrics(hits, torch.tensor([0, 1]), 5)
    assert "acc5" not in metrics
    metrics, _ = ev.classification_metrics(hits, torch.tensor([0, 1]), 6)
    assert metrics["acc5"] == 1.0


def test_clip_rocket_heads_and_their_ensembles_are_evaluated(toy, tmp_path):
    """A 05 checkpoint with clip-rocket's heads: zero-shot also reports the heads' top-1 (h) and clip-rocket's
    w z + (1 - w) h ensembles (each w in the row, one w picked on held-out halves as acc1_zh); h equals the same
    computation through 05's own Trainee. A checkpoint without heads gets none of these columns."""
    import open_clip

    tr = stage("05_train")
    out = tmp_path / "rocket"
    common = [
        "--input",
        str(toy / "shards"),
        "--model",
        str(toy / "models/toy-clip.json"),
        "--batch-size",
        "8",
    ]
    common += ["--workers", "0", "--max-steps", "3", "--epochs", "1"]
    tr.main(common + ["--aug-views", "2", "--head-dim", "16", "--out-dir", str(out)])
    tr.main(common + ["--out-dir", str(tmp_path / "plain")])
    results = tmp_path / "r.jsonl"
    zeroshot = ["--zeroshot", str(toy / "eval/zeroshot"), "--workers", "0", "--results", str(results)]
    (row,) = ev.main(["--name", "rocket", "--pretrained", str(out / "latest.pt"), *zeroshot])
    (plain,) = ev.main(["--name", "plain", "--pretrained", str(tmp_path / "plain/latest.pt"), *zeroshot])
    metrics = row["metrics"]
    assert {"acc1_h", "acc1_zh"} <= set(metrics) and not {"acc1_h", "acc1_zh"} & set(plain["metrics"])
    each = row["acc1_zh_each_w"]
    assert sorted(each) == [str(w) for w in ev.HEAD_WEIGHTS] and len(row["zh_w_picked"]) == 2
    assert all(w in ev.HEAD_WEIGHTS for w in row["zh_w_picked"])
    table = open(tmp_path / "r.md").read()
    assert "heads top-1" in table and "z+h top-1" in table
    plain_line = next(line for line in table.splitlines() if line.startswith("| plain"))
    assert plain_line.count("–") == 2  # the plain row has no heads

    # the heads' top-1 through 05's Trainee, from the same checkpoint
    ckpt = torch.load(out / "latest.pt", map_location="cpu", weights_only=True)
    open_clip.add_model_config(str(out / "toy-clip.json"))
    clip, _, preprocess = open_clip.create_model_and_transforms("toy-clip")
    clip.visual.preprocess_cfg = {"size": clip.visual.image_size[0]}
    trainee = tr.Trainee(clip, json.load(open(out / "toy-clip.json"))["embed_dim"], 2, 16, 0.0)
    trainee.load_state_dict(
        {**{"clip." + k: v for k, v in ckpt["state_dict"].items()}, **ckpt["extra_state_dict"]}
    )
    trainee.eval()
    eval_args = ev.parse_args(["--pretrained", str(out / "latest.pt")])
    items, labels, names, found = ev.read_classes(str(toy / "eval/zeroshot"), eval_args, Counter())
    templates, _ = ev.pick_templates("auto", found)
    tokenizer = open_clip.get_tokenizer("toy-clip")
    with torch.no_grad():
        prompts = [t.replace("{c}", c) for c in names for t in templates]
        text = F.normalize(trainee.text_head(trainee.text_features(tokenizer(prompts))), dim=-1)
        classes = F.normalize(text.view(len(names), len(templates), -1).mean(1), dim=-1)
        images = torch.stack([preprocess(Image.open(p)) for p in items])
        image = F.normalize(trainee.image_head(trainee.image_features(images)), dim=-1)
    expect = ((image @ classes.T).argmax(1) == labels).float().mean().item()
    assert metrics["acc1_h"] == pytest.approx(expect, abs=1e-6)
