"""Weights from files (a local path or s3://, read through pipeline.storage; nothing is
ever downloaded): torchvision's ImageNet backbone, our own checkpoints, and the
checkpoints released with IAST, AdaptSegNet and AdvEnt (``load_released_checkpoint``).

Every loader is strict: a missing, unexpected or wrongly shaped tensor raises a
ValueError that names the first offending keys and shows what the file held. The one
tolerance: BN ``num_batches_tracked`` counters may be absent (torchvision's older
ImageNet files predate them); the model keeps its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from pipeline import storage
from pipeline.labels import LABEL_SPACES, check_same_space
from pipeline.models.deeplab import DeepLabV2

_SHOW = 5  # offending keys listed per kind
# model.init_format's released layouts; ours is read by load_checkpoint.
RELEASED_FORMATS = ("iast", "adaptsegnet", "advent")
# The sum of AdaptSegNet's Classifier_Module returns after its second branch; AdvEnt's sums all four.
_SUMMED_BRANCHES = {"adaptsegnet": 2, "advent": 4}
_RESNET_KEYS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


def save_checkpoint(uri: str, model: DeepLabV2, **extra: Any) -> None:
    """Write ``{"model": state_dict, **extra}``; extra holds plain values (numbers,
    strings, lists, dicts, tensors) so that ``load_checkpoint`` can read it safely."""
    with storage.open_file(uri, "wb") as f:
        torch.save({"model": model.state_dict(), **extra}, f)


def load_checkpoint(model: DeepLabV2, uri: str, label_space: str | None = None) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (a "module." prefix from DDP is
    removed); returns the whole checkpoint dict, so the caller can read its extras.
    ``label_space``: refuse a checkpoint of another label space (its ``label_space``
    extra; an older checkpoint without one: the space of its number of classes)."""
    checkpoint = _read(uri)
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        raise ValueError(
            f"{uri}: not a checkpoint of ours (a dict with a 'model' entry); found "
            f"{_describe(checkpoint)}. For torchvision's ImageNet file use "
            "load_imagenet_backbone, for a released IAST checkpoint load_iast_checkpoint."
        )
    state = _strip_prefix(_tensors(checkpoint["model"], uri, "the 'model' entry"), "module.")
    if label_space is not None:
        _check_label_space(checkpoint.get("label_space"), state, uri, label_space)
    _load_exact(model, state, uri)
    return dict(checkpoint)


def _check_label_space(found: str | None, state: dict, uri: str, expected: str) -> None:
    if found is None:  # written before label spaces: known by its classifier's outputs
        classifier = state.get("classifier.convs.0.weight")
        k = None if classifier is None else classifier.shape[0]
        found = next((s.name for s in LABEL_SPACES.values() if s.num_classes == k), None)
        if found is None:
            return  # no space has that many classes: the strict load names the shapes
    check_same_space(f"checkpoint {uri}", found, expected,
                     f"start from a checkpoint trained in {expected}, or set label_space: {found}")


def load_imagenet_backbone(model: DeepLabV2, uri: str) -> None:
    """Load torchvision's ImageNet ResNet state dict (``resnet101-*.pth``) into
    ``model.backbone``; its classification head fc.* is dropped. The classifier keeps
    its initialisation."""
    state = _tensors(_read(uri), uri, "a torchvision ResNet state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    _load_exact(model.backbone, state, uri)


def map_iast_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a released IAST state dict to ours.

    Verified against the released code (github.com/bupt-ai-cz/IAST-ECCV2020, formerly
    Raykoooo/IAST, code/sseg): the trainers save ``net.state_dict()`` directly, with
    ``net`` an apex DDP around ``UDASegmentor``, so the keys read
      module.backbone.<torchvision ResNet name>   (incl. an unused ImageNet fc.*)
      module.decoder.aspp.conv2d_list.<i>.{weight,bias}   (DeepLabV2Decoder, 2048→K)
      module.discriminators.<type>.*   (warm-up checkpoints; not the segmentation net)
    and ``predictor`` (UpsamplePredictor: bilinear, align_corners=True) has no weights.
    Keys of any other form are passed through unchanged, so the strict load names them.
    """
    out = {}
    for key, value in _strip_prefix(state, "module.").items():
        if key.startswith(("backbone.fc.", "discriminators.")):
            continue
        branch = re.fullmatch(r"decoder\.aspp\.conv2d_list\.(\d+)\.(weight|bias)", key)
        if branch:
            key = f"classifier.convs.{branch[1]}.{branch[2]}"
        out[key] = value
    return out


def load_iast_checkpoint(model: DeepLabV2, uri: str) -> None:
    """Load a checkpoint released with IAST (e.g. G_gtav_at_warmup_v100.pth) into a
    ``deeplabv2_resnet101`` model; see ``map_iast_keys`` for the naming."""
    state = _tensors(_read(uri), uri, "a released IAST state dict")
    _load_exact(model, map_iast_keys(state), uri)


def map_multi_keys(state: Mapping[str, torch.Tensor], branches: int = 4) -> dict[str, torch.Tensor]:
    """Rename an AdaptSegNet or AdvEnt DeepLab-v2 state dict to ours.

    Both save ``model.state_dict()`` of their ``ResNetMulti`` (AdaptSegNet
    model/deeplab_multi.py, AdvEnt advent/model/deeplabv2.py; a DataParallel "module."
    prefix is removed), keyed
      conv1, bn1, layer1..layer4.<block>.<torchvision's names>   the ResNet → backbone.*
      layer6.conv2d_list.<i>.{weight,bias}   the classifier on layer4 (2048→K) → classifier.convs.<i>
      layer5.conv2d_list.<i>.*   the auxiliary classifier on layer3 (1024→K), dropped:
                                 both evaluate with layer6's output alone.
    Only the first ``branches`` of layer6 are kept: AdaptSegNet's forward sums two, so its
    other two were never trained. Keys of any other form pass unchanged, so that the
    strict load names them.
    """
    out = {}
    for key, value in _strip_prefix(state, "module.").items():
        if key.startswith("layer5."):
            continue
        branch = re.fullmatch(r"layer6\.conv2d_list\.(\d+)\.(weight|bias)", key)
        if branch:
            if int(branch[1]) >= branches:
                continue
            key = f"classifier.convs.{branch[1]}.{branch[2]}"
        elif key.startswith(_RESNET_KEYS):
            key = "backbone." + key
        out[key] = value
    return out


def load_released_checkpoint(model: DeepLabV2, uri: str, init_format: str) -> None:
    """Load a checkpoint in a released layout (``model.init_format``): IAST's
    (``map_iast_keys``) into ``deeplabv2_resnet101``, AdaptSegNet's or AdvEnt's
    (``map_multi_keys``) into the network they trained, ``deeplabv2_resnet101_<format>``:
    their weights in a torchvision-style ResNet would load but compute something else."""
    if init_format == "iast":
        return load_iast_checkpoint(model, uri)
    if init_format not in _SUMMED_BRANCHES:
        raise ValueError(f"unknown checkpoint format {init_format!r}: choose ours or one of {list(RELEASED_FORMATS)}")
    branches = _SUMMED_BRANCHES[init_format]
    if not (model.backbone.caffe and model.caffe_input and len(model.classifier.convs) == branches):
        raise ValueError(
            f"{uri}: an {init_format} checkpoint needs the network it was trained as (caffe-style ResNet, "
            f"caffe's BGR input, {branches} classifier branches summed): set "
            f"model.arch=deeplabv2_resnet101_{init_format}")
    state = _strip_prefix(_tensors(_read(uri), uri, f"a released {init_format} state dict"), "module.")
    hint = (f"read as {init_format}'s layout (conv1, bn1, layer1-4, layer5/layer6.conv2d_list.*): "
            "if the file is of another project, set model.init_format to its layout")
    # refused here, not by the strict load: a file named as ours (or IAST's backbone) would fit
    foreign = [k for k in state if not k.startswith((*_RESNET_KEYS, "layer5.", "layer6."))]
    if foreign:
        raise ValueError(f"{uri}: {len(foreign)} keys of another layout, e.g. {foreign[:_SHOW]}\n  ({hint})")
    _load_exact(model, map_multi_keys(state, branches), uri, hint=hint)


def _read(uri: str) -> Any:
    storage.check_uri(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"weights file {uri} does not exist (weights are never downloaded: put the file there)"
        )
    with storage.open_file(uri, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def _tensors(obj: Any, uri: str, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{uri}: expected {what} (names → tensors), found {_describe(obj)}")
    return dict(obj)


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _describe(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    entries = [f"{k!r}: {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
               for k, v in list(obj.items())[:_SHOW]]
    return f"a dict of {len(obj)} entries, e.g. {{{', '.join(entries)}}}"


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], uri: str, hint: str = "") -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"{uri}: the weights do not fit the {type(module).__name__}"]
        if missing:
            lines.append(f"  missing in the file ({len(missing)}): {missing[:_SHOW]}")
        if unexpected:
            lines.append(f"  not in the model ({len(unexpected)}): {unexpected[:_SHOW]}")
        if wrong_shape:
            shown = [f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
                     for k in wrong_shape[:_SHOW]]
            lines.append(f"  shape mismatch ({len(wrong_shape)}): {shown}")
        if any(k.startswith("classifier.") for k in wrong_shape):
            k = next(k for k in wrong_shape if k.startswith("classifier."))
            lines.append(f"  (the file has {state[k].shape[0]} classes, the model "
                         f"{expected[k].shape[0]}: build the model with the file's class count)")
        lines.append(f"  the file holds {_describe(state)}")
        if hint:
            lines.append(f"  ({hint})")
        raise ValueError("\n".join(lines))
    for k, v in expected.items():  # absent num_batches_tracked: keep the model's own
        state.setdefault(k, v)
    module.load_state_dict(state)
