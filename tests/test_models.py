import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import (
    build_model,
    load_checkpoint,
    load_iast_checkpoint,
    load_imagenet_backbone,
    param_groups,
    save_checkpoint,
    set_batchnorm_mode,
)
from pipeline.models.deeplab import batchnorm_layers
from pipeline.models.weights import map_iast_keys

K = 19


@pytest.fixture(scope="module")
def r101():
    torch.manual_seed(0)
    return build_model("deeplabv2_resnet101", K)


def small(num_classes=K, seed=0):
    torch.manual_seed(seed)
    return build_model("deeplabv2_small", num_classes)


# --- structure -------------------------------------------------------------------

def test_resnet101_matches_torchvision_names_and_sizes(r101):
    state = r101.backbone.state_dict()
    # torchvision resnet101: 44,549,160 parameters, of which fc holds 2048*1000 + 1000
    assert sum(p.numel() for p in r101.backbone.parameters()) == 44_549_160 - 2_049_000
    # 104 convs + 104 BNs (weight, bias, running_mean, running_var, num_batches_tracked)
    assert len(state) == 104 + 104 * 5
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer1.0.downsample.1.running_var"].shape == (256,)
    assert state["layer3.22.bn3.weight"].shape == (1024,)
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert "layer3.23.conv1.weight" not in state and not any(k.startswith("fc.") for k in state)


def test_resnet101_dilation_follows_torchvision(r101):
    b = r101.backbone
    assert b.layer2[0].conv2.stride == (2, 2)  # layer2 keeps its stride
    # a dilated stage: no stride; first block at the previous dilation, the rest doubled
    assert (b.layer3[0].conv2.stride, b.layer3[0].conv2.dilation) == ((1, 1), (1, 1))
    assert all(blk.conv2.dilation == (2, 2) and blk.conv2.padding == (2, 2) for blk in b.layer3[1:])
    assert b.layer3[0].downsample[0].stride == (1, 1)
    assert (b.layer4[0].conv2.stride, b.layer4[0].conv2.dilation) == ((1, 1), (2, 2))
    assert all(blk.conv2.dilation == (4, 4) for blk in b.layer4[1:])


def test_resnet101_output_stride_8_and_logits_at_input_size(r101):
    r101.eval()
    with torch.no_grad():
        assert r101.backbone(torch.randn(1, 3, 64, 96)).shape == (1, 2048, 8, 12)
        assert r101(torch.randn(1, 3, 61, 90)).shape == (1, K, 61, 90)


def test_classifier_is_four_dilated_branches_summed(r101):
    convs = r101.classifier.convs
    assert [c.dilation for c in convs] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(c.padding == c.dilation and c.kernel_size == (3, 3) for c in convs)
    assert all(c.in_channels == 2048 and c.out_channels == K and c.bias is not None for c in convs)
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert 0.0095 < weights.std().item() < 0.0105 and abs(weights.mean().item()) < 1e-3
    features = torch.randn(1, 2048, 5, 7)
    with torch.no_grad():
        expected = sum(F.conv2d(features, c.weight, c.bias, padding=c.padding, dilation=c.dilation)
                       for c in convs)
        assert torch.allclose(r101.classifier(features), expected, atol=1e-5)


def test_small_model_shapes_and_align_corners_upsampling():
    model = small().eval()
    x = torch.randn(2, 3, 128, 256)
    with torch.no_grad():
        low = model.classifier(model.backbone(x))
        logits = model(x)
    assert low.shape == (2, K, 16, 32) and logits.shape == (2, K, 128, 256)
    assert len(model.classifier.convs) == 4
    # align_corners=True: the corner pixels are exactly the corner cells of the low-res map
    for i, j in [(0, 0), (-1, -1), (0, -1), (-1, 0)]:
        assert torch.allclose(logits[..., i, j], low[..., i, j], atol=1e-6)
    assert torch.allclose(logits, F.interpolate(low, size=(128, 256), mode="bilinear",
                                                align_corners=True), atol=1e-6)


def test_benchmark_model_predicts_at_output_stride_4_with_a_stride_2_stem():
    model = build_model("deeplabv2_small_os4", K).eval()
    x = torch.randn(2, 3, 128, 256)
    with torch.no_grad():
        features, logits = model.forward_with_features(x)
    assert model.backbone.output_stride == 4
    assert features.shape == (2, 64, 32, 64) and logits.shape == (2, K, 128, 256)
    assert [c.dilation[0] for c in model.classifier.convs] == [4, 6, 10, 12]
    # the dilated stages keep their resolution: no stride after the stem's two halvings
    strides = {m.stride[0] for n, m in model.backbone.named_modules()
               if isinstance(m, torch.nn.Conv2d) and n.startswith("layer")}
    assert strides == {1}


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="deeplabv2_resnet101.*deeplabv2_small"):
        build_model("deeplabv3", K)


def test_param_groups_split_backbone_and_classifier():
    model = small()
    groups = param_groups(model, lr=3e-5)
    assert [g["lr"] for g in groups] == pytest.approx([3e-6, 3e-5])
    ids = [[id(p) for p in g["params"]] for g in groups]
    assert set(ids[0]) == {id(p) for p in model.backbone.parameters()}
    assert set(ids[1]) == {id(p) for p in model.classifier.parameters()}
    assert sorted(ids[0] + ids[1]) == sorted(id(p) for p in model.parameters())
    torch.optim.Adam(groups, weight_decay=5e-4)  # accepted as optimiser groups


# --- batch-norm modes --------------------------------------------------------------

def _train_step(model):
    model.train()  # the mode must survive this call
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 64, 64) * 3 + 1).sum().backward()


@pytest.mark.parametrize("mode, affine_trained, stats_update", [
    ("train", True, True),
    ("frozen_affine", False, True),
    ("frozen", False, False),
])
def test_batchnorm_modes(mode, affine_trained, stats_update):
    model = small()
    set_batchnorm_mode(model, mode)
    bns = batchnorm_layers(model)
    before = [bn.running_mean.clone() for bn in bns]
    _train_step(model)
    assert all(bn.training == stats_update for bn in bns)
    assert all(p.requires_grad == affine_trained for bn in bns for p in bn.parameters())
    assert all((p.grad is not None) == affine_trained for bn in bns for p in bn.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())
    assert model.backbone.conv1.weight.grad is not None
    changed = [not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns)]
    assert all(changed) if stats_update else not any(changed)
    # the mode travels with copies (the EMA teacher is a deepcopy)
    teacher = copy.deepcopy(model).train()
    assert all(bn.training == stats_update for bn in batchnorm_layers(teacher))


def test_batchnorm_mode_can_be_switched_back_and_rejects_unknown():
    model = small()
    set_batchnorm_mode(model, "frozen")
    set_batchnorm_mode(model, "train")
    model.train()
    assert all(bn.training and bn.weight.requires_grad for bn in batchnorm_layers(model))
    with pytest.raises(ValueError, match="frozen_affine"):
        set_batchnorm_mode(model, "eval")
    with pytest.raises(TypeError, match="model.module"):
        set_batchnorm_mode(nn.Sequential(model), "frozen")


# --- weights -----------------------------------------------------------------------

def test_imagenet_backbone_loads_torchvision_file(r101, tmp_path):
    # a torchvision-format file: backbone names, an fc head, and (as the old
    # resnet101-5d3b4d8f.pth) no num_batches_tracked counters
    state = {k: v + 1.0 for k, v in r101.backbone.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = str(tmp_path / "resnet101-test.pth")
    torch.save(state, path)
    classifier_before = r101.classifier.convs[0].weight.clone()
    load_imagenet_backbone(r101, path)
    loaded = r101.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert torch.equal(r101.classifier.convs[0].weight, classifier_before)

    with pytest.raises(ValueError, match=r"shape mismatch.*'conv1\.weight: file \(64, 3, 7, 7\), model \(16, 3, 7, 7\)'"):
        load_imagenet_backbone(small(), path)


def test_imagenet_backbone_reports_missing_and_unexpected(tmp_path):
    model = small()
    state = model.backbone.state_dict()
    del state["layer2.0.bn1.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = str(tmp_path / "bad.pth")
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_imagenet_backbone(model, path)
    msg = str(err.value)
    assert "missing in the file (1): ['layer2.0.bn1.weight']" in msg
    assert "not in the model (1): ['layer5.0.conv1.weight']" in msg
    assert path in msg and "the file holds a dict of" in msg


def test_checkpoint_round_trip_with_ddp_prefix_and_extras(tmp_path):
    source, target = small(seed=1), small(seed=2)
    path = str(tmp_path / "ckpt" / "round1.pt")
    save_checkpoint(path, source, round=1, step=250)
    checkpoint = load_checkpoint(target, path)
    assert checkpoint["round"] == 1 and checkpoint["step"] == 250
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())

    ddp_path = str(tmp_path / "ddp.pt")
    torch.save({"model": {"module." + k: v for k, v in small(seed=3).state_dict().items()}}, ddp_path)
    load_checkpoint(target, ddp_path)
    assert torch.equal(target.classifier.convs[2].bias, small(seed=3).classifier.convs[2].bias)


def test_checkpoint_errors_are_clear(tmp_path):
    path = str(tmp_path / "k19.pt")
    save_checkpoint(path, small(num_classes=19))
    with pytest.raises(ValueError, match=r"(?s)classifier\.convs\.0\.weight.*19 classes, the model 16"):
        load_checkpoint(small(num_classes=16), path)

    raw = str(tmp_path / "raw.pt")
    torch.save(small().state_dict(), raw)
    with pytest.raises(ValueError, match="not a checkpoint of ours"):
        load_checkpoint(small(), raw)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_checkpoint(small(), str(tmp_path / "absent.pt"))


def _iast_state(model):
    """A state dict named as the released IAST code saves it (see map_iast_keys)."""
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("classifier.convs."):
            k = k.replace("classifier.convs.", "decoder.aspp.conv2d_list.")
        state["module." + k] = v.clone()
    state["module.backbone.fc.weight"] = torch.randn(1000, model.backbone.out_channels)
    state["module.backbone.fc.bias"] = torch.randn(1000)
    state["module.discriminators.PredictorDiscriminator.0.weight"] = torch.randn(64, K, 3, 3)
    return state


def test_iast_checkpoint_keys_map_to_ours(tmp_path):
    source, target = small(seed=1), small(seed=2)
    state = _iast_state(source)
    assert "module.decoder.aspp.conv2d_list.3.bias" in state
    assert map_iast_keys(state).keys() == source.state_dict().keys()
    path = str(tmp_path / "G_gtav_at_warmup.pth")
    torch.save(state, path)
    load_iast_checkpoint(target, path)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())

    state["module.decoder.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"not in the model \(1\): \['decoder\.extra\.weight'\]"):
        load_iast_checkpoint(target, path)
