"""Checkpoint loading: the three public key layouts (random weights written in each exact layout, then read by the
real loader), strict errors that name keys, wrappers, pickles, anchors, and the full ResNet-101 key set."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.extract_helpers import TINY, tiny_weights
from uniter_fast.extract import DetectorConfig, load_detector, random_state_dict, write_random_weights
from uniter_fast.extract.layouts import canonical_to_violetteshev_key, detect_layout, from_canonical, to_canonical
from uniter_fast.extract.weights import ANCHORS_KEY

OBJ = "proposal_generator.rpn_head.objectness_logits."
PRED = "roi_heads.box_predictor."


def canonical(detector) -> dict:
    return {k: v for k, v in detector.state_dict().items()}


@pytest.fixture(scope="module")
def milvlg_detector():
    return load_detector(tiny_weights("milvlg"), TINY)


def test_layout_files_have_their_exact_keys() -> None:
    mil = tiny_weights("milvlg")["model"]
    hf = tiny_weights("airsplay")
    vio = tiny_weights("violetteshev")
    assert mil[OBJ + "weight"].shape == (24, 512, 1, 1) and mil[PRED + "bbox_pred.weight"].shape == (6404, 2048)
    assert mil[ANCHORS_KEY].tolist()[0] == [-38, -16, 53, 31] and not any("num_batches" in k for k in mil)
    assert hf[OBJ + "weight"].shape == (12, 512, 1, 1) and hf[PRED + "bbox_pred.weight"].shape == (6400, 2048)
    assert hf[PRED + "cls_embedding.weight"].shape == (1601, 256) and hf[PRED + "fc_attr.weight"].shape == (512, 2304)
    assert hf[PRED + "attr_score.weight"].shape == (401, 512) and "backbone.res2.0.conv1.norm.num_batches_tracked" in hf
    assert vio["RCNN_base.0.weight"].shape == (64, 3, 7, 7) and vio["RCNN_base.1.running_var"].shape == (64,)
    assert vio["RCNN_base.6.0.downsample.0.weight"].shape == (1024, 512, 1, 1)
    assert vio["RCNN_base.4.0.bn2.weight"].shape == (64,) and vio["RCNN_top.0.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert vio["RCNN_rpn.RPN_cls_score.weight"].shape == (24, 512, 1, 1)
    assert vio["RCNN_cls_score.weight"].shape == (1601, 2048) and vio["RCNN_bbox_pred.weight"].shape == (6404, 2048)
    assert not any("attr" in k or "embed" in k for k in vio)
    assert [detect_layout(sd) for sd in (mil, hf, vio)] == ["milvlg", "airsplay", "violetteshev"]


@pytest.mark.parametrize("layout", ["milvlg", "airsplay", "violetteshev"])
def test_each_layout_file_loads_to_the_same_network(tmp_path, layout, milvlg_detector) -> None:
    path = tmp_path / f"w-{layout}.pth"
    torch.save(tiny_weights(layout), path)
    det = load_detector(path, TINY)
    ours, want = canonical(det), canonical(milvlg_detector)
    assert det.config.blocks == (1, 1, 1, 1) and det.config.attributes == (layout != "violetteshev")
    for key, value in want.items():
        if key.startswith(OBJ) and layout == "airsplay":
            continue  # reparametrised: compared through the softmax below
        if key not in ours:
            assert layout == "violetteshev" and "attr" in key or "cls_embed" in key, key
            continue
        assert torch.equal(ours[key], value), key
    if layout == "airsplay":
        x = torch.randn(1, 512, 3, 4)
        logits = [torch.nn.functional.conv2d(x, d[OBJ + "weight"], d[OBJ + "bias"]) for d in (ours, want)]
        fg = [torch.softmax(lg.view(1, 2, 12, 3, 4), dim=1)[:, 1] for lg in logits]
        torch.testing.assert_close(fg[0], fg[1], rtol=1e-5, atol=1e-6)


def test_airsplay_background_moves_from_last_to_first() -> None:
    hf = tiny_weights("airsplay")
    sd = to_canonical("airsplay", hf)
    assert torch.equal(sd[PRED + "cls_score.weight"][0], hf[PRED + "cls_score.weight"][-1])
    assert torch.equal(sd[PRED + "cls_score.weight"][1:], hf[PRED + "cls_score.weight"][:-1])
    assert torch.equal(sd[PRED + "cls_embed.weight"][0], hf[PRED + "cls_embedding.weight"][-1])
    assert torch.equal(sd[PRED + "attr_linear2.bias"][0], hf[PRED + "attr_score.bias"][-1])
    back = from_canonical("airsplay", sd)
    for key in (PRED + "cls_score.weight", PRED + "attr_score.weight", PRED + "bbox_pred.weight"):
        assert torch.equal(back[key], hf[key]), key


def test_violetteshev_names() -> None:
    assert canonical_to_violetteshev_key("backbone.res3.2.conv3.norm.running_mean") == "RCNN_base.5.2.bn3.running_mean"
    assert canonical_to_violetteshev_key("roi_heads.res5.0.shortcut.norm.bias") == "RCNN_top.0.0.downsample.1.bias"
    assert canonical_to_violetteshev_key(OBJ + "bias") == "RCNN_rpn.RPN_cls_score.bias"
    with pytest.raises(ValueError, match="cls_embed"):
        canonical_to_violetteshev_key(PRED + "cls_embed.weight")


def test_strict_errors_name_the_keys() -> None:
    sd = tiny_weights("milvlg")["model"]
    del sd["backbone.res3.0.conv2.norm.running_var"]
    sd["backbone.res3.0.extra.weight"] = torch.zeros(1)
    sd["roi_heads.res5.0.conv1.weight"] = torch.zeros(512, 1024, 3, 3)
    with pytest.raises(ValueError) as err:
        load_detector(sd, TINY)
    message = str(err.value)
    assert "missing keys: backbone.res3.0.conv2.norm.running_var" in message
    assert "unexpected keys: backbone.res3.0.extra.weight" in message
    assert "roi_heads.res5.0.conv1.weight: expected (512, 1024, 1, 1), got (512, 1024, 3, 3)" in message


def test_unknown_layout_and_bad_bbox_pred() -> None:
    with pytest.raises(ValueError, match="unrecognised key layout"):
        load_detector({"encoder.weight": torch.zeros(2)})
    sd = tiny_weights("milvlg")["model"]
    sd[PRED + "bbox_pred.weight"] = torch.zeros(6400, 2048)
    with pytest.raises(ValueError, match=r"bbox_pred.weight: expected \(6404, 2048\), got \(6400, 2048\)"):
        load_detector(sd, TINY)


def test_wrappers_pickles_and_safetensors(tmp_path, milvlg_detector) -> None:
    sd = tiny_weights("milvlg")["model"]
    torch.save({"state_dict": sd, "iteration": 5}, tmp_path / "a.pth")
    assert torch.equal(canonical(load_detector(tmp_path / "a.pth", TINY))["backbone.stem.conv1.weight"],
                       canonical(milvlg_detector)["backbone.stem.conv1.weight"])  # fmt: skip
    with open(tmp_path / "b.pkl", "wb") as f:  # detectron2's format: numpy arrays in a pickle
        pickle.dump({"model": {k: v.numpy() for k, v in tiny_weights("airsplay").items()}, "__author__": "x"}, f)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_detector(tmp_path / "b.pkl", TINY)
    assert load_detector(tmp_path / "b.pkl", TINY, allow_pickle=True).config.attributes
    torch.save({"model": {k: v.numpy() for k, v in sd.items()}}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="allow_pickle"):
        load_detector(tmp_path / "c.pth", TINY)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "d.safetensors"))
    assert load_detector(tmp_path / "d.safetensors", TINY).config.blocks == (1, 1, 1, 1)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_detector(tmp_path / "missing.pth")


def test_cell_anchors_that_differ_warn_for_milvlg() -> None:
    sd = tiny_weights("milvlg")
    sd["model"][ANCHORS_KEY] = sd["model"][ANCHORS_KEY] + 0.5
    with pytest.warns(UserWarning, match="cell anchors differ"):
        load_detector(sd, TINY)


def test_full_resnet101_milvlg_file(tmp_path) -> None:
    path = write_random_weights(tmp_path / "r101.pth", "milvlg", seed=1)
    sd = torch.load(path, weights_only=True)["model"]
    blocks = (3, 4, 23, 3)
    # stem 5; 15 per block + 5 per projection; RPN 6; cls_score, bbox_pred, attr_linear1/2 (2 each), cls_embed 1
    assert len(sd) == 5 + sum(15 * n + 5 for n in blocks) + 6 + 9 + 1
    assert sd["backbone.res4.22.conv3.weight"].shape == (1024, 256, 1, 1)
    assert sd["backbone.res2.0.shortcut.weight"].shape == (256, 64, 1, 1)
    assert sd["roi_heads.res5.2.conv1.weight"].shape == (512, 2048, 1, 1)
    assert sd["roi_heads.res5.0.shortcut.weight"].shape == (2048, 1024, 1, 1)
    det = load_detector(path)
    assert det.config.blocks == blocks and det.config == DetectorConfig()


def test_generator_is_deterministic_and_rejects_unknown_layouts() -> None:
    a, b = random_state_dict("violetteshev", TINY, seed=3), random_state_dict("violetteshev", TINY, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["RCNN_base.0.weight"], random_state_dict("violetteshev", TINY, 4)["RCNN_base.0.weight"])
    with pytest.raises(ValueError, match="layout must be one of"):
        random_state_dict("caffe", TINY)
    assert np.isfinite(a["RCNN_base.1.running_var"].numpy()).all()
