"""Model zoo (kdseq_fast.models) and checkpoint loading/saving (kdseq_fast.checkpoint_io)."""
import os

import pytest
import torch

from kdseq_fast.checkpoint_io import atomic_save, extract_state_dict, load_model_weights
from kdseq_fast.models import count_parameters, get_model, list_models

ZOO = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
       "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
       "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2",
       "ResNet50"]

# Millions of parameters at num_classes=100, as published with RepDistiller / CRD (Tian et al.,
# ICLR 2020). The published figures are truncated to 2 decimals, hence the 0.01M tolerance.
PUBLISHED_PARAMS_M = {
    "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26, "resnet56": 0.86,
    "resnet20": 0.28, "resnet110": 1.74, "wrn_16_2": 0.70, "vgg13": 9.46, "vgg8": 3.96,
}


def test_zoo_lists_every_name():
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", ZOO)
def test_forward_shapes_every_size(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=7).eval()
    with torch.no_grad():
        for size in (28, 32, 64):
            out = model(torch.randn(2, 3, size, size))
            assert out.shape == (2, 7), (name, size)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name, millions", sorted(PUBLISHED_PARAMS_M.items()))
def test_parameter_counts_match_published(name, millions):
    n = count_parameters(get_model(name, num_classes=100))
    assert abs(n / 1e6 - millions) < 0.01, f"{name}: {n} params vs published {millions}M"


def test_num_classes_changes_only_the_head():
    a, b = get_model("resnet8x4", 10), get_model("resnet8x4", 100)
    assert count_parameters(b) - count_parameters(a) == 90 * 256 + 90


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_in_channels(name):
    model = get_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = get_model("resnet8", num_classes=4)
    # Small images keep this cheap; the zoo's adaptive pooling makes 16 px valid.
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = get_model("wrn_16_2", 10).state_dict()
    torch.manual_seed(3)
    b = get_model("wrn_16_2", 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# RepDistiller's module names, so their published checkpoints load.
@pytest.mark.parametrize("name, keys", [
    ("resnet8x4", ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
                   "layer1.0.downsample.0.weight", "layer3.0.bn2.weight", "fc.weight"]),
    ("resnet56", ["layer1.8.conv2.weight", "layer2.0.downsample.1.weight", "fc.bias"]),
    ("wrn_40_2", ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
                  "block3.layer.5.conv2.weight", "bn1.weight", "fc.weight"]),
    ("vgg13", ["block0.0.weight", "block0.1.running_var", "block0.3.weight", "block4.4.bias",
               "classifier.weight"]),
    ("MobileNetV2", ["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.weight",
                     "conv2.0.weight", "classifier.0.weight"]),
    ("ShuffleV1", ["conv1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"]),
    ("ShuffleV2", ["layer1.0.conv5.weight", "layer1.3.conv3.weight", "conv2.weight",
                   "linear.weight"]),
    ("ResNet50", ["layer1.0.shortcut.0.weight", "layer4.2.conv3.weight", "linear.weight"]),
])
def test_repdistiller_state_dict_names(name, keys):
    sd = get_model(name, 100).state_dict()
    missing = [k for k in keys if k not in sd]
    assert not missing, missing
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)


def test_vgg8_block_layout():
    sd = get_model("vgg8", 100).state_dict()
    # One conv per block in vgg8: conv (0), bn (1); the trailing ReLU is applied in forward.
    assert sd["block0.0.weight"].shape == (64, 3, 3, 3)
    assert sd["block4.0.weight"].shape == (512, 512, 3, 3)
    assert "block0.3.weight" not in sd


def test_name_lookup_and_errors():
    assert get_model("mobilenetv2", 10).arch_name == "MobileNetV2"
    assert get_model("resnet50", 10).arch_name == "ResNet50"
    assert get_model("SHUFFLEV1", 10).arch_name == "ShuffleV1"
    assert get_model("vgg8_bn", 10).arch_name == "vgg8"
    with pytest.raises(ValueError, match="unknown model name 'resnet9'") as exc:
        get_model("resnet9")
    assert "resnet8x4" in str(exc.value) and "wrn_40_2" in str(exc.value)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("resnet8", 0)
    with pytest.raises(TypeError, match="num_classes"):
        get_model("resnet8", "10")
    with pytest.raises(ValueError, match="image_size"):
        get_model("resnet8", 10, image_size=4)
    with pytest.raises(TypeError, match="name"):
        get_model(None)


def test_torchvision_models():
    model = get_model("tv:resnet18", num_classes=5, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert model.arch_name == "tv:resnet18"
    with pytest.raises(ValueError, match="unknown torchvision model 'not_a_net'"):
        get_model("tv:not_a_net")
    with pytest.raises(ValueError, match="in_channels"):
        get_model("tv:resnet18", in_channels=1)
    assert "tv:resnet18" in list_models(include_torchvision=True)
    # A size the model cannot take is refused when it is built (it failed at the first batch).
    for name, size in (("tv:alexnet", 32), ("tv:vit_b_16", 30), ("tv:squeezenet1_0", 16), ("tv:maxvit_t", 64)):
        with pytest.raises(ValueError, match=f"cannot take {size}-px inputs"):
            get_model(name, 10, image_size=size)
    # Sized transformers: Swin takes any size (it was given an image_size it has no argument for),
    # MaxViT its input_size; RegNet's constructor cannot run on meta, so it is built unchecked.
    for name, size in (("tv:swin_t", 64), ("tv:maxvit_t", 224), ("tv:vit_b_16", 32), ("tv:regnet_y_400mf", 32)):
        model = get_model(name, 3, image_size=size).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, size, size)).shape == (1, 3), name


# ---------------------------------------------------------------- checkpoint_io -------------
def _fresh(name="resnet8", classes=10, seed=0):
    torch.manual_seed(seed)
    return get_model(name, classes)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "student", "model_state",
                                  "ddp", "compiled_ddp"])
def test_load_wrapped_state_dicts(tmp_path, wrap):
    src, dst = _fresh(seed=1), _fresh(seed=2)
    sd = src.state_dict()
    if wrap == "plain":
        obj = sd
    elif wrap == "ddp":
        obj = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 240}
    elif wrap == "compiled_ddp":
        obj = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    else:
        obj = {wrap: sd, "epoch": 3, "accuracy": 71.2}
    path = tmp_path / "ckpt.pth"
    atomic_save(obj, path)
    report = load_model_weights(dst, path)
    assert report == {"missing": [], "unexpected": []}
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # Also straight from the in-memory object.
    load_model_weights(_fresh(seed=3), obj)


def test_class_count_mismatch_names_the_layer():
    with pytest.raises(ValueError) as exc:
        load_model_weights(_fresh(classes=100), _fresh(classes=10).state_dict())
    msg = str(exc.value)
    assert "fc.weight" in msg and "(10, 64)" in msg and "(100, 64)" in msg and "resnet8" in msg


def test_missing_and_unexpected_keys():
    sd = _fresh().state_dict()
    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as exc:
        load_model_weights(_fresh(), sd)
    assert "missing keys: fc.bias" in str(exc.value)
    assert "unexpected keys: extra.weight" in str(exc.value)
    report = load_model_weights(_fresh(), sd, strict=False)
    assert report == {"missing": ["fc.bias"], "unexpected": ["extra.weight"]}


def test_wrong_architecture_is_rejected():
    with pytest.raises(ValueError, match="does not match model"):
        load_model_weights(get_model("resnet8x4", 10), _fresh().state_dict())


def test_unrecognised_checkpoint_objects(tmp_path):
    with pytest.raises(ValueError, match="no model state dict"):
        load_model_weights(_fresh(), {"epoch": 3, "optimizer": {}})
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_model_weights(_fresh(), tmp_path / "missing.pth")
    with pytest.raises(TypeError, match="model"):
        load_model_weights(object(), {})


def test_untrusted_pickle_needs_opt_in(tmp_path):
    import argparse
    path = tmp_path / "repdistiller_style.pth"
    # RepDistiller stores its argparse options in the checkpoint: not loadable weights-only.
    torch.save({"model": _fresh(seed=5).state_dict(), "opt": argparse.Namespace(lr=0.05)}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_model_weights(_fresh(), path)
    dst = _fresh()
    load_model_weights(dst, path, weights_only=False)
    assert torch.equal(dst.fc.weight, _fresh(seed=5).fc.weight)


def test_extract_state_dict_from_module():
    m = _fresh()
    assert extract_state_dict(m).keys() == m.state_dict().keys()


def test_atomic_save_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "deep" / "dir" / "x.pt"
    atomic_save({"a": torch.ones(3)}, path)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(3))
    assert os.listdir(path.parent) == ["x.pt"]


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"v": Unpicklable()}, path)
    assert torch.load(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.pt"]
