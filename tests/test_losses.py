import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.labels import IGNORE_INDEX, NUM_CLASSES
from pipeline.losses import (
    adversarial_loss,
    consistency_loss,
    cross_entropy,
    discriminator_loss,
    region_guided_loss,
)
from pipeline.models.discriminator import OutputSpaceDiscriminator


def _released_iast_loss(logits, label, kld_weight=0.1, entropy_weight=3.0):
    """Transcription of the released IAST loss (UDASegmentor.forward, entropyloss, kldloss)."""
    reg_val_matrix = torch.ones_like(label).type_as(logits)
    reg_val_matrix[label == 255] = 0
    reg_val_matrix = reg_val_matrix.unsqueeze(dim=1)
    reg_ignore_matrix = 1 - reg_val_matrix
    reg_weight = torch.ones_like(logits)
    reg_weight_val = reg_weight * reg_val_matrix
    reg_weight_ignore = reg_weight * reg_ignore_matrix

    def entropyloss(logits, weight):
        val_num = weight[weight > 0].numel()
        logits_log_softmax = torch.log_softmax(logits, dim=1)
        entropy = -torch.softmax(logits, dim=1) * weight * logits_log_softmax
        return torch.sum(entropy) / val_num

    def kldloss(logits, weight):
        val_num = weight[weight > 0].numel()
        logits_log_softmax = torch.log_softmax(logits, dim=1)
        num_classes = logits.size()[1]
        kld = -1 / num_classes * weight * logits_log_softmax
        return torch.sum(kld) / val_num

    seg = nn.CrossEntropyLoss(ignore_index=255)(logits, label)
    kld = kldloss(logits, reg_weight_val)
    ent = entropyloss(logits, reg_weight_ignore)
    return seg, kld, ent, seg + kld_weight * kld + entropy_weight * ent


def _numpy_parts(logits, label):
    z = logits.detach().double().numpy()
    y = label.numpy()
    k = z.shape[1]
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    p = np.exp(log_p)
    log_p = np.moveaxis(log_p, 1, -1)  # N,H,W,K
    p = np.moveaxis(p, 1, -1)
    conf = y != IGNORE_INDEX
    seg = -np.mean(np.take_along_axis(log_p[conf], y[conf][:, None].astype(int), axis=1)) if conf.any() else 0.0
    r_c = np.mean(-log_p[conf] / k) if conf.any() else 0.0
    r_i = np.mean(-p[~conf] * log_p[~conf]) if (~conf).any() else 0.0
    return seg, r_c, r_i


def test_uniform_logits_hand_computed():
    k = 4
    logits = torch.zeros(1, k, 2, 3)
    label = torch.tensor([[[0, 1, 255], [3, 255, 255]]])
    loss = region_guided_loss(logits, label)
    # p = 1/K everywhere: CE = log K, R_c = (1/K)·log K, R_i = entropy/K = log K / K.
    assert loss.seg.item() == pytest.approx(math.log(k))
    assert loss.confident.item() == pytest.approx(math.log(k) / k)
    assert loss.ignored.item() == pytest.approx(math.log(k) / k)
    assert loss.total.item() == pytest.approx(math.log(k) * (1 + 0.1 / k + 3.0 / k))


def test_small_example_matches_numpy():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 3.0]], [[-1.0, 0.0]]]])  # N=1, K=3, H=1, W=2
    label = torch.tensor([[[1, IGNORE_INDEX]]])
    loss = region_guided_loss(logits, label, weight_confident=0.5, weight_ignored=2.0)
    p0 = np.exp([2.0, 0.5, -1.0]) / np.exp([2.0, 0.5, -1.0]).sum()
    p1 = np.exp([-1.0, 3.0, 0.0]) / np.exp([-1.0, 3.0, 0.0]).sum()
    seg = -np.log(p0[1])
    r_c = np.sum(-np.log(p0) / 3) / 3
    r_i = np.sum(-p1 * np.log(p1)) / 3
    assert loss.seg.item() == pytest.approx(seg, rel=1e-6)
    assert loss.confident.item() == pytest.approx(r_c, rel=1e-6)
    assert loss.ignored.item() == pytest.approx(r_i, rel=1e-6)
    assert loss.total.item() == pytest.approx(seg + 0.5 * r_c + 2.0 * r_i, rel=1e-6)


def test_matches_released_formula_with_both_regions():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, NUM_CLASSES, 9, 11, generator=gen)
    label = torch.randint(0, NUM_CLASSES, (2, 9, 11), generator=gen)
    label[torch.rand(2, 9, 11, generator=gen) < 0.4] = IGNORE_INDEX
    seg, kld, ent, total = _released_iast_loss(logits, label)
    loss = region_guided_loss(logits, label)
    torch.testing.assert_close(loss.seg, seg)
    torch.testing.assert_close(loss.confident, kld)
    torch.testing.assert_close(loss.ignored, ent)
    torch.testing.assert_close(loss.total, total)
    np.testing.assert_allclose(
        [loss.seg.item(), loss.confident.item(), loss.ignored.item()], _numpy_parts(logits, label), rtol=1e-5
    )


@pytest.mark.parametrize("region", ["all_ignored", "all_labelled"])
def test_empty_region_gives_zero_term_and_finite_gradients(region):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 4, 6, generator=gen, requires_grad=True)
    if region == "all_ignored":
        label = torch.full((2, 4, 6), IGNORE_INDEX)
    else:
        label = torch.randint(0, 5, (2, 4, 6), generator=gen)
    loss = region_guided_loss(logits, label)
    loss.total.backward()
    assert torch.isfinite(loss.total)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    expected_seg, expected_rc, expected_ri = _numpy_parts(logits, label)
    if region == "all_ignored":
        assert loss.seg.item() == 0.0 and loss.confident.item() == 0.0
        assert loss.ignored.item() == pytest.approx(expected_ri, rel=1e-5)
    else:
        assert loss.ignored.item() == 0.0
        assert loss.seg.item() == pytest.approx(F.cross_entropy(logits, label).item(), rel=1e-6)
        assert loss.confident.item() == pytest.approx(expected_rc, rel=1e-5)


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    label = torch.tensor([[[0, 255, 2], [255, 1, 255]]])
    assert torch.autograd.gradcheck(lambda z: region_guided_loss(z, label).total, (logits,))


def test_half_precision_logits_are_computed_in_fp32():
    gen = torch.Generator().manual_seed(3)
    logits = 5 * torch.randn(1, NUM_CLASSES, 4, 4, generator=gen)
    label = torch.randint(0, NUM_CLASSES, (1, 4, 4), generator=gen)
    label[0, :2] = IGNORE_INDEX
    half = region_guided_loss(logits.half(), label)
    full = region_guided_loss(logits.half().float(), label)
    assert half.total.dtype == torch.float32
    torch.testing.assert_close(half.total, full.total)


def test_cross_entropy_matches_torch_and_is_zero_when_all_ignored():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
    label = torch.randint(0, 4, (2, 3, 3), generator=gen)
    label[0, 0] = IGNORE_INDEX
    torch.testing.assert_close(cross_entropy(logits, label), F.cross_entropy(logits, label, ignore_index=255))

    ignored = torch.full((2, 3, 3), IGNORE_INDEX, dtype=torch.uint8)
    loss = cross_entropy(logits, ignored)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_bad_inputs_are_rejected():
    logits = torch.zeros(1, 4, 3, 3)
    with pytest.raises(ValueError, match="upsample"):
        region_guided_loss(logits, torch.zeros(1, 6, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..3"):
        region_guided_loss(logits, torch.full((1, 3, 3), 4))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(logits, torch.zeros(1, 3, 3))


def test_lsgan_losses():
    d_source = torch.tensor([[[[0.5, -0.5], [0.0, 1.0]]]])  # MSE to 0: (0.25+0.25+0+1)/4
    d_target = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]]]])  # MSE to 1: (0+1+1+0)/4; to 0: (1+0+4+1)/4
    assert discriminator_loss(d_source, d_target).item() == pytest.approx((0.375 + 0.5) / 2)
    assert adversarial_loss(d_target).item() == pytest.approx(1.5)
    # A perfect discriminator has zero loss; its generator is penalised fully.
    assert discriminator_loss(torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3)).item() == 0.0
    assert adversarial_loss(torch.ones(2, 1, 3, 3)).item() == 1.0


def test_discriminator_layers_follow_released_fcdiscriminator():
    d = OutputSpaceDiscriminator()
    specs = [
        (name, c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
        for name, c in d.named_modules()
        if isinstance(c, nn.Conv2d)
    ]
    assert specs == [
        ("conv1", NUM_CLASSES, 64, (3, 3), (2, 2), (1, 1)),
        ("conv2", 64, 128, (4, 4), (2, 2), (1, 1)),
        ("conv3", 128, 256, (4, 4), (2, 2), (1, 1)),
        ("conv4", 256, 512, (4, 4), (2, 2), (1, 1)),
        ("classifier", 512, 1, (4, 4), (2, 2), (1, 1)),
    ]
    assert d.leaky_relu.negative_slope == 0.2
    # conv, LeakyReLU four times, then the classifier alone: raw scores, negatives kept
    x = torch.randn(1, NUM_CLASSES, 64, 64)
    h = x
    for conv in (d.conv1, d.conv2, d.conv3, d.conv4):
        h = F.leaky_relu(conv(h), 0.2)
    torch.testing.assert_close(d(x), d.classifier(h))
    assert (d(x) < 0).any() or (d(-x) < 0).any()


def test_discriminator_loads_released_state_dict_keys():
    d = OutputSpaceDiscriminator()
    released = {f"{name}.{kind}": t for name in ("conv1", "conv2", "conv3", "conv4", "classifier")
                for kind, t in getattr(d, name).state_dict().items()}
    d.load_state_dict(released)  # strict: same names, same shapes


@pytest.mark.parametrize(
    "size, expected",
    [((512, 1024), (16, 32)), ((64, 128), (2, 4)), ((65, 129), (2, 4)), ((640, 1280), (20, 40))],
)
def test_discriminator_output_shape(size, expected):
    d = OutputSpaceDiscriminator().to("meta")  # shapes only, no compute
    out = d(torch.empty(3, NUM_CLASSES, *size, device="meta"))
    assert tuple(out.shape) == (3, 1, *expected)


def test_discriminator_learns_to_separate_domains():
    torch.manual_seed(0)
    d = OutputSpaceDiscriminator(num_classes=4)
    source = F.one_hot(torch.zeros(1, 32, 32, dtype=torch.long), 4).permute(0, 3, 1, 2).float()
    target = F.one_hot(torch.ones(1, 32, 32, dtype=torch.long), 4).permute(0, 3, 1, 2).float()
    optimizer = torch.optim.Adam(d.parameters(), lr=1e-3)
    fooled_before = adversarial_loss(d(target)).item()
    losses = []
    for _ in range(10):
        loss = discriminator_loss(d(source), d(target))
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.25 * losses[0]
    # the generator's loss rises as the discriminator tells the domains apart
    assert adversarial_loss(d(target)).item() > fooled_before + 0.2


def test_consistency_loss_is_soft_cross_entropy_on_ignored_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 5).softmax(1)
    label = torch.randint(0, 4, (2, 3, 5))
    label[0, 0] = IGNORE_INDEX
    label[1, :, :2] = IGNORE_INDEX
    loss = consistency_loss(logits, teacher, label)
    # by hand: mean over the ignored pixels of -sum_k q_k log p_k
    log_p = np.log(logits.detach().double().softmax(1).numpy())
    soft_ce = -(teacher.double().numpy() * log_p).sum(1)
    expected = soft_ce[label.numpy() == IGNORE_INDEX].mean()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    labelled = (label != IGNORE_INDEX).unsqueeze(1).expand_as(logits)
    assert logits.grad[labelled].abs().max() == 0  # labelled pixels get no gradient from it
    assert logits.grad[~labelled].abs().max() > 0
    # minimised by the teacher's own distribution
    at_teacher = consistency_loss(teacher.log(), teacher, label)
    assert at_teacher < loss


def test_consistency_loss_is_zero_without_ignored_pixels_and_checks_shapes():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    teacher = torch.full((1, 3, 2, 2), 1 / 3)
    loss = consistency_loss(logits, teacher, torch.zeros(1, 2, 2, dtype=torch.long))
    assert loss.item() == 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0
    with pytest.raises(ValueError, match="same shape"):
        consistency_loss(logits, teacher[:, :2], torch.zeros(1, 2, 2, dtype=torch.long))
