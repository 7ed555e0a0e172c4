"""The network quirks (Caffe stem, stride in the 1x1, dilated res5, frozen BN, pairwise RPN softmax, proposal
layer) against hand-written references, and the whole detector: fast path vs reference path, batching, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import extract_reference as ref
from tests.extract_helpers import TINY, synthetic_image, tiny_weights
from uniter_fast.extract import Detector, Extractor
from uniter_fast.extract.backbone import Stem, Trunk, make_res5
from uniter_fast.extract.layers import Bottleneck, Conv2dNorm, FrozenBatchNorm2d
from uniter_fast.extract.rpn import ProposalGenerator


def randomise_norms(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for name in ("weight", "bias", "running_mean"):
                getattr(m, name).normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def bn(x: torch.Tensor, norm: FrozenBatchNorm2d) -> torch.Tensor:
    """Caffe BatchNorm (global stats) + Scale, written out."""
    shape = (1, -1, 1, 1)
    normed = (x - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + 1e-5)
    return normed * norm.weight.view(shape) + norm.bias.view(shape)


def caffe_max_pool(x: np.ndarray, kernel: int = 3, stride: int = 2) -> np.ndarray:
    """Caffe's MAX pooling, pad 0: ceil((H - k) / s) + 1 outputs, windows clipped at the border."""
    c, h, w = x.shape
    out_h, out_w = -(-(h - kernel) // stride) + 1, -(-(w - kernel) // stride) + 1
    out = np.empty((c, out_h, out_w), dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            hs, ws = i * stride, j * stride
            out[:, i, j] = x[:, hs : min(hs + kernel, h), ws : min(ws + kernel, w)].max(axis=(1, 2))
    return out


def test_stem_is_caffe_conv_bn_relu_ceil_pool() -> None:
    stem = Stem()
    randomise_norms(stem)
    x = torch.randn(1, 3, 33, 47)
    conv = F.conv2d(x, stem.conv1.weight, stride=2, padding=3)
    expected = caffe_max_pool(F.relu(bn(conv, stem.conv1.norm))[0].detach().numpy())
    got = stem(x)[0].detach().numpy()
    assert got.shape == expected.shape == (64, 8, 12)  # floor mode would give 8 x 11; torchvision's pad 1: 9 x 12
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_stride_sits_on_the_first_1x1() -> None:
    trunk = Trunk((1, 2, 1))
    first = trunk.res3[0]
    assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1) and first.shortcut.stride == (2, 2)
    assert trunk.res3[1].shortcut is None and trunk.res2[0].conv1.stride == (1, 1)
    block = Bottleneck(64, 32, 128, stride=2)
    randomise_norms(block)
    x = torch.randn(2, 64, 11, 9)
    out = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=2), block.conv1.norm))
    out = F.relu(bn(F.conv2d(out, block.conv2.weight, padding=1), block.conv2.norm))
    out = bn(F.conv2d(out, block.conv3.weight), block.conv3.norm)
    expected = F.relu(out + bn(F.conv2d(x, block.shortcut.weight, stride=2), block.shortcut.norm))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_res5_is_dilated_with_stride_one() -> None:
    res5 = make_res5(3)
    for block in res5:
        assert block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2)
        assert block.conv1.stride == (1, 1) and block.conv2.stride == (1, 1)
    randomise_norms(res5)
    x = torch.randn(2, 1024, 14, 14)
    block = res5[0]
    out = F.relu(bn(F.conv2d(x, block.conv1.weight), block.conv1.norm))
    out = F.relu(bn(F.conv2d(out, block.conv2.weight, padding=2, dilation=2), block.conv2.norm))
    out = bn(F.conv2d(out, block.conv3.weight), block.conv3.norm)
    expected = F.relu(out + bn(F.conv2d(x, block.shortcut.weight), block.shortcut.norm))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert res5(x).shape == (2, 2048, 14, 14)


@pytest.mark.parametrize("dilation,stride", [(1, 1), (2, 1), (1, 2)])
def test_folded_norm_equals_conv_then_norm(dilation: int, stride: int) -> None:
    conv = Conv2dNorm(16, 24, 3, stride=stride, dilation=dilation)
    randomise_norms(conv)
    x = torch.randn(3, 16, 13, 10)
    expected = conv(x)
    conv.fold_norm()
    assert conv.norm is None and conv.bias is not None
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_proposal_layer_equals_the_numpy_layer() -> None:
    rng = np.random.default_rng(7)
    hf, wf, scale = 9, 14, 0.83
    logits = rng.normal(0, 1.5, (1, 24, hf, wf)).astype(np.float32)
    deltas = rng.normal(0, 0.3, (1, 48, hf, wf)).astype(np.float32)
    size = (hf * 16 - 5, wf * 16 - 3)
    config = TINY.__class__(rpn_pre_nms_top_n=700, rpn_post_nms_top_n=120)
    got = ProposalGenerator(config).proposals(torch.from_numpy(logits), torch.from_numpy(deltas), size, [scale])[0]
    pair = logits.reshape(2, 12, hf, wf).astype(np.float64)
    fg = (np.exp(pair[1]) / np.exp(pair).sum(0)).astype(np.float32)  # Caffe's softmax over the (bg, fg) pair
    expected = ref.proposal_layer(fg, deltas[0], (size[0], size[1], np.float32(scale)), 700, 120, 0.7, 16)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=2e-4)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [synthetic_image(1, 120, 170), synthetic_image(2, 160, 120), synthetic_image(3, 120, 170)]


@pytest.fixture(scope="module")
def reference() -> Extractor:
    return Extractor(tiny_weights(), config=TINY, fast=False)


@pytest.fixture(scope="module")
def batched(images, reference) -> list:
    return reference.detect(images)


def test_fast_path_agrees_with_reference(images, batched) -> None:
    fast = Extractor(tiny_weights(), config=TINY, fast=True)
    for got, want in zip(fast.detect(images), batched):
        # proposal boxes pass exp and a sort: a near-tie may swap two RoIs, so compare the matching ones
        assert got.boxes.shape == want.boxes.shape
        same = (got.boxes - want.boxes).abs().amax(1) < 1e-2
        assert same.float().mean() > 0.9
        torch.testing.assert_close(got.features[same], want.features[same], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.cls_prob[same], want.cls_prob[same], rtol=1e-3, atol=1e-5)


def test_batch_of_mixed_sizes_equals_one_by_one(images, reference, batched) -> None:
    for image, det in zip(images, batched):
        alone = reference.detect([image])[0]
        assert torch.equal(alone.boxes, det.boxes)
        torch.testing.assert_close(alone.features, det.features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone.conf, det.conf, rtol=1e-5, atol=1e-6)


def test_deterministic(images, reference, batched) -> None:
    again = reference.detect(images[:1])[0]
    for name in ("boxes", "features", "cls_prob", "conf"):
        assert torch.equal(getattr(again, name), getattr(batched[0], name)), name


def test_detector_state_dict_has_milvlg_keys() -> None:
    keys = Detector(TINY).state_dict()
    assert keys["backbone.stem.conv1.weight"].shape == (64, 3, 7, 7)
    assert keys["backbone.res4.0.shortcut.norm.running_var"].shape == (1024,)
    assert keys["proposal_generator.rpn_head.objectness_logits.weight"].shape == (24, 512, 1, 1)
    assert keys["roi_heads.res5.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert keys["roi_heads.box_predictor.attr_linear1.weight"].shape == (512, 2304)
    assert not any("num_batches_tracked" in k or "cell_anchors" in k for k in keys)
