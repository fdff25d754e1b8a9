"""AdaptSegNet's and AdvEnt's released DeepLab-v2 checkpoints as warm-ups
(model.init_format adaptsegnet / advent): their network, their key names, the errors."""

import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.data.transforms import normalize
from pipeline.experiment import ExperimentConfig
from pipeline.models import build_model, load_checkpoint, load_released_checkpoint
from pipeline.models.deeplab import DeepLabV2, deeplabv2_small
from pipeline.models.resnet import BasicBlock, ResNet

K = 19
LAYERS = (3, 4, 23, 3)  # ResNet-101


def resnet_multi_keys(layers=LAYERS, branches=4):
    """The state-dict names of their ResNetMulti, written out from their code (AdaptSegNet
    model/deeplab_multi.py, AdvEnt advent/model/deeplabv2.py), not from our model."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight"] + [f"bn1.{p}" for p in bn]
    for stage, blocks in enumerate(layers, 1):
        for block in range(blocks):
            for i in (1, 2, 3):
                keys += [f"layer{stage}.{block}.conv{i}.weight"] + [f"layer{stage}.{block}.bn{i}.{p}" for p in bn]
        keys += [f"layer{stage}.0.downsample.0.weight"] + [f"layer{stage}.0.downsample.1.{p}" for p in bn]
    for head in ("layer5", "layer6"):
        keys += [f"{head}.conv2d_list.{i}.{p}" for i in range(branches) for p in ("weight", "bias")]
    return keys


def released_state(model: DeepLabV2, branches=4, seed=0):
    """``model``'s shapes under their names, random values, with their extra tensors: the
    auxiliary head layer5 (on layer3's 1024 channels) and, for AdaptSegNet, layer6's two
    unused branches."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("backbone.").replace("classifier.convs.", "layer6.conv2d_list.")
        state[key] = torch.randint(0, 9, value.shape, generator=g) if value.dtype == torch.long \
            else torch.randn(value.shape, generator=g)
    k, channels = model.num_classes, model.backbone.out_channels
    for i in range(branches):
        state[f"layer5.conv2d_list.{i}.weight"] = torch.randn(k, channels // 2, 3, 3, generator=g)
        state[f"layer5.conv2d_list.{i}.bias"] = torch.randn(k, generator=g)
    for i in range(len(model.classifier.convs), branches):
        state[f"layer6.conv2d_list.{i}.weight"] = torch.randn(k, channels, 3, 3, generator=g)
        state[f"layer6.conv2d_list.{i}.bias"] = torch.randn(k, generator=g)
    return state


@pytest.fixture(scope="module")
def advent101():
    torch.manual_seed(0)
    return build_model("deeplabv2_resnet101_advent", K)


def small_caffe(branches=2, num_classes=K):
    """The small backbone built as theirs, for the cheaper file tests."""
    backbone = ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128), caffe=True)
    return DeepLabV2(backbone, num_classes, (2, 3, 5, 6)[:branches], caffe_input=True)


def test_their_network_strides_in_the_1x1_dilates_whole_stages_and_rounds_the_pool_up(advent101):
    r = advent101.backbone
    assert r.layer2[0].conv1.stride == (2, 2) and r.layer2[0].conv2.stride == (1, 1)
    assert r.layer3[0].conv2.dilation == (2, 2) and r.layer4[0].conv2.dilation == (4, 4)
    assert r.maxpool.ceil_mode
    # AdaptSegNet's outS(64) (its feature size for a 64-pixel side) = 9; torchvision's layout gives 8
    assert r(torch.zeros(1, 3, 64, 64)).shape[-2:] == (9, 9)
    assert build_model("deeplabv2_resnet101_adaptsegnet", K).classifier.convs[1].dilation == (12, 12)
    assert len(build_model("deeplabv2_resnet101_adaptsegnet", K).classifier.convs) == 2


def test_their_network_sees_caffes_input(advent101):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    seen = []
    advent101.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    advent101.eval()(normalize(image)[None])
    bgr_minus_mean = image[:, :, ::-1].astype(np.float64) - (104.00698793, 116.66876762, 122.67891434)
    np.testing.assert_allclose(seen[0][0].permute(1, 2, 0).numpy(), bgr_minus_mean, atol=1e-3)
    assert "input_scale" not in advent101.state_dict()  # checkpoints keep torchvision's keys


@pytest.mark.parametrize("fmt, branches", [("advent", 4), ("adaptsegnet", 2)])
def test_a_released_checkpoint_loads_key_by_key(advent101, tmp_path, fmt, branches):
    model = advent101 if fmt == "advent" else build_model("deeplabv2_resnet101_adaptsegnet", K)
    state = released_state(model, branches=4)
    assert sorted(state) == sorted(resnet_multi_keys())  # exactly their names
    assert state["layer5.conv2d_list.0.weight"].shape == (K, 1024, 3, 3)
    assert state["layer6.conv2d_list.3.weight"].shape == (K, 2048, 3, 3)
    path = tmp_path / f"{fmt}.pth"
    torch.save(state, path)
    load_released_checkpoint(model, str(path), fmt)

    loaded = model.state_dict()
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "layer5" or (head == "layer6" and int(rest.split(".")[1]) >= branches):
            continue  # the auxiliary head, and AdaptSegNet's branches its forward never sums
        ours = "classifier.convs." + rest.removeprefix("conv2d_list.") if head == "layer6" else "backbone." + key
        assert torch.equal(loaded[ours], value), key
    assert torch.equal(model.backbone.layer3[22].bn3.running_var, state["layer3.22.bn3.running_var"])
    assert torch.equal(model.classifier.convs[1].bias, state["layer6.conv2d_list.1.bias"])


def test_a_data_parallel_prefix_and_missing_batch_counters_are_taken(tmp_path):
    model = small_caffe(branches=4)
    state = {"module." + k: v for k, v in released_state(model).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    target = small_caffe(branches=4)
    load_released_checkpoint(target, str(tmp_path / "old.pth"), "advent")
    assert torch.equal(target.backbone.layer1[0].conv2.weight, state["module.layer1.0.conv2.weight"])


def test_wrong_files_and_networks_are_refused_with_the_fix(tmp_path):
    path = str(tmp_path / "GTA2Cityscapes_multi.pth")
    torch.save(released_state(small_caffe(num_classes=16)), path)
    with pytest.raises(ValueError, match=rf"(?s){path}: .*16 classes, the model 19"):
        load_released_checkpoint(small_caffe(), path, "adaptsegnet")

    torch.save(released_state(small_caffe()), path)
    with pytest.raises(ValueError, match=r"set model.arch=deeplabv2_resnet101_adaptsegnet"):
        load_released_checkpoint(deeplabv2_small(K), path, "adaptsegnet")  # torchvision's layout
    with pytest.raises(ValueError, match=r"set model.arch=deeplabv2_resnet101_advent"):
        load_released_checkpoint(small_caffe(branches=2), path, "advent")  # AdvEnt sums four branches

    state = released_state(small_caffe())
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:8]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): \['backbone.layer1.0.conv1.weight: file \(8,"):
        load_released_checkpoint(small_caffe(), path, "adaptsegnet")

    ours = {"module." + k: v for k, v in small_caffe().state_dict().items()}  # ours (and IAST's) names
    torch.save(ours, path)
    with pytest.raises(ValueError, match=r"(?s)keys of another layout, e.g. \['backbone.conv1.weight'.*"
                                         r"read as adaptsegnet's layout .*set model.init_format"):
        load_released_checkpoint(small_caffe(), path, "adaptsegnet")
    state = released_state(small_caffe())
    del state["layer6.conv2d_list.1.bias"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"(?s)missing in the file \(1\): \['classifier.convs.1.bias'\]"):
        load_released_checkpoint(small_caffe(), path, "adaptsegnet")
    torch.save({"model": small_caffe().state_dict()}, path)
    with pytest.raises(ValueError, match=r"expected a released adaptsegnet state dict"):
        load_released_checkpoint(small_caffe(), path, "adaptsegnet")


def test_the_config_refuses_a_released_file_for_another_network_before_work(benchmark_data, tmp_path):
    from test_bad_input import _tiny

    path = tmp_path / "advent.pth"
    torch.save(released_state(small_caffe(branches=4)), path)
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", _tiny(
        benchmark_data, tmp_path / "out", f"model.init={path}", "model.init_format=advent"))
    with pytest.raises(config.ConfigError, match=rf"model.init: {path}: an advent checkpoint needs .*"
                                                 r"set model.arch=deeplabv2_resnet101_advent"):
        cfg.check()


def test_the_rounds_start_from_the_converted_checkpoint(benchmark_data, tmp_path, monkeypatch):
    """The plumbing of model.init_format adaptsegnet, on the small backbone built as theirs."""
    from pipeline.models import deeplab
    from pipeline.rounds import warmup_record
    from test_rounds import tiny_experiment

    monkeypatch.setitem(deeplab.ARCHS, "deeplabv2_resnet101_adaptsegnet", lambda k: small_caffe(num_classes=k))
    state = released_state(small_caffe(), branches=4)
    given = tmp_path / "GTA2Cityscapes_multi.pth"
    torch.save(state, given)
    cfg = tiny_experiment(benchmark_data, tmp_path / "out", **{
        "source_only.iterations": 0, "model.init": str(given), "model.init_format": "adaptsegnet",
        "model.arch": "deeplabv2_resnet101_adaptsegnet"})
    start = warmup_record(cfg).checkpoint
    assert start == cfg.round_train_config(1, start).init and start.startswith(cfg.output)
    loaded = small_caffe()
    load_checkpoint(loaded, start)  # ours now: what labelling and training read
    assert torch.equal(loaded.classifier.convs[1].weight, state["layer6.conv2d_list.1.weight"])
    assert torch.equal(loaded.backbone.layer4[0].bn2.running_mean, state["layer4.0.bn2.running_mean"])


@pytest.mark.parametrize("warmup", ["adaptsegnet", "advent"])
def test_the_warmup_configs_label_and_start_round_1_with_the_file(warmup):
    cfg = config.load(ExperimentConfig, ["configs/gta5_cityscapes.yaml", f"configs/warmups/{warmup}.yaml"],
                      ["model.init=/weights/released.pth"])
    assert (cfg.model.arch, cfg.model.init_format) == (f"deeplabv2_resnet101_{warmup}", warmup)
    assert cfg.round_link(1, "generator") == cfg.round_link(1, "init") == ("warmup", "last")
    assert cfg.data.source is None  # the rounds read the target only: no GTA5 needed
    cfg.check_chain()
    assert cfg.self_training.rounds == config.load(ExperimentConfig, "configs/gta5_cityscapes.yaml").self_training.rounds
