"""Checkpoint converters (``python -m uniter_fast.convert``, the MMF / LightningDOT / volta layouts of
uniter_fast.checkpoint): other projects' files, built from their module structures (tests/foreign_layouts.py) with
random weights, load with one call, give the outputs of the model they came from, round-trip to their layout bit for
bit (fp16 too), and every user mistake is one line."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from tests.cli_helpers import run_cli
from tests.foreign_layouts import (
    LdotBiEncoder,
    LdotForPretraining,
    MmfUniter,
    randomized,
    volta_state,
)
from tests.model_batches import random_batch
from uniter_fast import Model, UniterConfig
from uniter_fast.checkpoint import read_checkpoint
from uniter_fast.convert import convert, export, main
from uniter_fast.errors import CheckpointError
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model

TINY = UniterConfig.tiny(attention_backend="eager")


def full_batch(config: UniterConfig) -> dict[str, torch.Tensor]:
    """Rows without padding (MMF concatenates text and image without UNITER's gather: equal when nothing pads)."""
    return random_batch([9, 9], [6, 6], config.vocab_size, config.img_dim, generator_seed=5)


def saved(state: dict[str, torch.Tensor], path, dtype=None) -> str:
    """``state`` as a ``torch.save`` file at ``path`` (floating tensors cast to ``dtype`` when given)."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, path)
    return str(path)


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def mmf() -> MmfUniter:
    return randomized(MmfUniter(TINY), seed=1)


@pytest.fixture(scope="module")
def ldot() -> LdotForPretraining:
    return randomized(LdotForPretraining(TINY), seed=2)


# ---------------------------------------------------------------------------------------------------- MMF
def test_mmf_file_loads_with_one_call_and_gives_mmfs_outputs(tmp_path, mmf, caplog) -> None:
    src = saved(mmf.state_dict(), tmp_path / "mmf.pth")
    with caplog.at_level(logging.INFO, logger="uniter_fast.checkpoint"):
        model = Model.from_pretrained(src, config=TINY).eval()
    assert any("layout 'mmf'" in r.getMessage() for r in caplog.records)
    batch = full_batch(TINY)
    want = mmf.uniter.uniter(
        *(batch[k] for k in ("input_ids", "position_ids", "img_feat", "img_pos_feat")), batch["attention_mask"]
    )
    torch.testing.assert_close(model(**batch, output_all_encoded_layers=False), want)


def test_mmf_pretraining_heads_are_the_originals(tmp_path, mmf) -> None:
    ckpt = read_checkpoint(saved(mmf.state_dict(), tmp_path / "mmf.pth"))
    assert ckpt.conversion.source == {
        "prefix": "uniter.uniter.",
        "heads": {"mrfr": "mrfr", "mrc": "mrc"},
        "position_ids": True,
    }
    assert ckpt.conversion.renamed["uniter.heads.mrfr.linear_proj_bias"] == "feat_regress.bias"
    assert (
        ckpt.conversion.renamed["uniter.uniter.img_embeddings.final_layer_norm.weight"]
        == "uniter.img_embeddings.LayerNorm.weight"
    )
    assert list(ckpt.conversion.dropped) == ["uniter.uniter.text_embeddings.position_ids"]
    model = UniterForPretraining(TINY, img_label_dim=5)
    model.load_state_dict({**model.state_dict(), **ckpt.state})  # every mapped key is a key of the original model
    hidden = torch.randn(4, TINY.hidden_size)
    torch.testing.assert_close(model.region_classifier(hidden), mmf.uniter.heads.mrc.region_classifier(hidden))
    head = mmf.uniter.heads.mrfr
    want = torch.nn.functional.linear(head.feat_regress(hidden), head.linear_proj_weight.t(), head.linear_proj_bias)
    torch.testing.assert_close(model.feat_regress(hidden), want)


def test_mmf_pretrained_file_starts_a_task_model(tmp_path, mmf, caplog) -> None:
    """What ``finetune.py --checkpoint uniter.pretrained.pth`` does: the encoder loads, the task head starts fresh."""
    src = saved(mmf.state_dict(), tmp_path / "mmf.pth")
    with caplog.at_level(logging.INFO, logger="uniter_fast.checkpoint"):
        model, _ = load_task_model(get_task("vqa"), src, {"num_answers": 3}, config=TINY)
    assert any("layout 'mmf'" in r.getMessage() for r in caplog.records)
    base = mmf.uniter.uniter
    assert torch.equal(model.uniter.img_embeddings.LayerNorm.weight, base.img_embeddings.final_layer_norm.weight)
    assert torch.equal(model.uniter.embeddings.word_embeddings.weight, base.text_embeddings.word_embeddings.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mmf_round_trip_is_bit_for_bit(tmp_path, mmf, dtype) -> None:
    src = saved(mmf.state_dict(), tmp_path / "mmf.pth", dtype)
    report = convert(src, str(tmp_path / "folder"), source="villa", config=TINY)
    assert report["layout"] == "mmf" and report["dtypes"] == [str(dtype).replace("torch.", "")]
    export(str(tmp_path / "folder"), str(tmp_path / "back.pth"), "mmf")
    assert_bitwise(torch.load(tmp_path / "back.pth"), torch.load(src))


def test_encoder_only_drops_the_heads_under_their_file_names(tmp_path, mmf) -> None:
    src = saved(mmf.state_dict(), tmp_path / "mmf.pth")
    report = convert(src, str(tmp_path / "encoder"), encoder_only=True, config=TINY)
    heads = sorted(k for k in torch.load(src) if k.startswith("uniter.heads."))
    assert sorted(k for k in report["dropped"] if k.startswith("uniter.heads.")) == heads and len(heads) == 12
    assert not any(k.startswith("uniter.heads.") for k in report["renamed"])
    export(str(tmp_path / "encoder"), str(tmp_path / "back.pth"), "mmf")
    assert_bitwise(torch.load(tmp_path / "back.pth"), {k: v for k, v in torch.load(src).items() if k not in heads})


def test_mmf_classification_head_is_refused_unless_encoder_only(tmp_path) -> None:
    vqa = randomized(MmfUniter(TINY, heads="vqa2"), seed=3)
    src = saved(vqa.state_dict(), tmp_path / "vqa.pth")
    with pytest.raises(CheckpointError, match=r"MMF head 'vqa2' .*own BertPooler.*eps 1e-6.*--encoder-only"):
        read_checkpoint(src)
    with pytest.raises(CheckpointError, match="eps 1e-6"):  # never half a fine-tuned model
        load_task_model(get_task("vqa"), src, {})
    report = convert(src, str(tmp_path / "encoder"), encoder_only=True, config=TINY)
    assert report["task"] is None and "uniter.heads.vqa2.classifier.2.weight" in report["dropped"]
    assert all(k.startswith("uniter.uniter.") for k in report["renamed"])  # the encoder's renames only
    model = Model.from_pretrained(tmp_path / "encoder").eval()  # the folder alone, its config.json
    batch = full_batch(TINY)
    want = vqa.uniter.uniter(
        *(batch[k] for k in ("input_ids", "position_ids", "img_feat", "img_pos_feat")), batch["attention_mask"]
    )
    torch.testing.assert_close(model(**batch, output_all_encoded_layers=False), want)


# ---------------------------------------------------------------------------------------------------- LightningDOT
def test_lightningdot_image_tower_loads_and_says_it_was_trained_image_only(tmp_path, ldot, caplog) -> None:
    src = saved(ldot.state_dict(), tmp_path / "LightningDot.pt")
    with caplog.at_level(logging.INFO, logger="uniter_fast.checkpoint"):
        model = Model.from_pretrained(src, config=TINY).eval()
    messages = [r.getMessage() for r in caplog.records]
    assert any("layout 'lightningdot'" in m for m in messages)
    assert any("trained on images alone" in m for m in messages)
    batch = random_batch([7, 3], [5, 8], TINY.vocab_size, generator_seed=2)
    tower = ldot.bert.img_model.bert
    torch.testing.assert_close(model(**batch)[-1], tower(**batch)[-1], rtol=0, atol=0)


def test_lightningdot_finetune_checkpoint_starts_a_task_model(tmp_path, ldot) -> None:
    src = saved(LdotBiEncoder(TINY).state_dict(), tmp_path / "flickr-ft.pt")  # the BiEncoder alone: no 'bert.'
    model, _ = load_task_model(get_task("vqa"), src, {"num_answers": 3}, config=TINY)
    tower = LdotBiEncoder(TINY)
    tower.load_state_dict(torch.load(src))
    assert torch.equal(model.uniter.pooler.dense.weight, tower.img_model.bert.pooler.dense.weight)


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lightningdot_towers_round_trip_bit_for_bit(tmp_path, ldot, tower, dtype) -> None:
    src = saved(ldot.state_dict(), tmp_path / "ldot.pt", dtype)
    report = convert(src, str(tmp_path / "folder"), source="lightningdot", tower=tower, config=TINY)
    source = torch.load(src)
    own = "bert.img_model." if tower == "image" else "bert.txt_model."
    heads = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
    kept = [k for k in source if k.startswith(own) or (tower == "image" and k.startswith(heads))]
    buffer = "bert.txt_model.bert.embeddings.position_ids"  # dropped, then written back
    assert sorted(report["dropped"]) == sorted(set(source) - set(kept) | ({buffer} if tower == "text" else set()))
    export(str(tmp_path / "folder"), str(tmp_path / "back.pt"), "lightningdot")
    want = {k: source[k] for k in kept}
    assert_bitwise(torch.load(tmp_path / "back.pt"), want)


def test_lightningdot_text_tower_is_a_bert_without_image_embedder(tmp_path, ldot) -> None:
    convert(saved(ldot.state_dict(), tmp_path / "ldot.pt"), str(tmp_path / "text"), tower="text", config=TINY)
    ckpt = read_checkpoint(tmp_path / "text")
    assert ckpt.text_only and not any(k.startswith("uniter.img_embeddings.") for k in ckpt.state)
    model = Model.from_pretrained(tmp_path / "text", strict=False)
    text = ldot.bert.txt_model.bert
    for key, value in text.state_dict().items():
        if key != "embeddings.position_ids":
            assert torch.equal(model.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------------- volta, unknown
def test_volta_is_refused_with_the_differences_named(tmp_path) -> None:
    src = saved(volta_state(TINY, seed=4), tmp_path / "volta.bin")
    with pytest.raises(CheckpointError) as err:
        Model.from_pretrained(src)
    message = str(err.value)
    assert "e-bug/volta's UNITER layout" in message and "\n" not in message
    for difference in ("ReLU pooler of 1,024 units", "5-d boxes", "global image token", "30,522", "v_* aliases"):
        assert difference in message


def test_unknown_layout_names_the_closest_of_all_layouts(tmp_path, mmf) -> None:
    ldot_like = {  # a bi-encoder under other names
        k.replace("img_model", "image_model").replace("txt_model", "text_model"): v
        for k, v in LdotBiEncoder(TINY).state_dict().items()
    }
    with pytest.raises(ValueError, match=r"unknown checkpoint layout .* closest known layout is 'lightningdot'"):
        read_checkpoint(saved(ldot_like, tmp_path / "ldot-like.pt"))
    mmf_like = {
        "module." + k.replace("text_embeddings", "txt_embeddings").replace("final_layer_norm", "last_norm"): v
        for k, v in mmf.state_dict().items()
    }
    with pytest.raises(ValueError, match=r"closest known layout is 'mmf'"):
        read_checkpoint(saved(mmf_like, tmp_path / "mmf-like.pt"))
    ddp = {"module." + k: v for k, v in mmf.state_dict().items()}  # MMF's prefix is read off the keys: DDP's loads
    assert read_checkpoint(saved(ddp, tmp_path / "ddp.pt")).conversion.source["prefix"] == "module.uniter.uniter."


# ---------------------------------------------------------------------------------------------------- the folder
def test_converted_folder_holds_the_task_head_task_json_and_a_model_card(tmp_path) -> None:
    task = get_task("re")
    model, _ = load_task_model(task, None, {}, config=TINY)
    randomized(model, seed=6)
    src = saved(model.state_dict(), tmp_path / "model_step_100.pt", torch.float16)  # an original train_re.py file
    report = convert(src, str(tmp_path / "re"), config=TINY)
    assert report["task"] == "re" and report["layout"] == "uniter" and report["renamed"] == {}
    names = sorted(os.listdir(tmp_path / "re"))
    assert names == ["README.md", "config.json", "conversion.json", "model.safetensors", "task.json"]
    assert json.loads((tmp_path / "re" / "task.json").read_text())["task"] == "re"
    card = (tmp_path / "re" / "README.md").read_text()
    assert report["sha256"] in card and "- layout: uniter" in card and "model_step_100.pt" in card
    loaded, _ = load_task_model(task, str(tmp_path / "re"), {})
    assert_bitwise({k: v.half() for k, v in loaded.state_dict().items()}, {k: v for k, v in torch.load(src).items()})
    export(str(tmp_path / "re"), str(tmp_path / "back.pt"), "uniter")
    assert_bitwise(torch.load(tmp_path / "back.pt"), torch.load(src))


def test_a_head_shared_by_several_tasks_needs_task(tmp_path) -> None:
    model, _ = load_task_model(get_task("vqa"), None, {"num_answers": 3}, config=TINY)
    src = saved(randomized(model, seed=7).state_dict(), tmp_path / "model_step_9.pt")
    with pytest.raises(
        CheckpointError, match=r"--task: the checkpoint's heads \['vqa_output'\] fit the tasks \['ve', 'vqa'\]"
    ):
        convert(src, str(tmp_path / "any"), config=TINY)
    assert not (tmp_path / "any").exists()
    assert convert(src, str(tmp_path / "vqa"), task="vqa", config=TINY)["task"] == "vqa"
    assert json.loads((tmp_path / "vqa" / "task.json").read_text()) == {"task": "vqa", "options": {"num_answers": 3}}


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_prints_the_report(tmp_path, mmf) -> None:
    src = saved(mmf.state_dict(), tmp_path / "mmf.pth")
    status, out, err = run_cli(main, [src, "--out", str(tmp_path / "folder"), "--from", "mmf"])
    assert status == 0, err
    report = json.loads(out)
    assert report["layout"] == "mmf" and report["keys"] == len(read_checkpoint(tmp_path / "folder").state)
    assert report == json.loads((tmp_path / "folder" / "conversion.json").read_text())
    status, out, err = run_cli(main, [str(tmp_path / "folder"), "--to", "mmf", "--out", str(tmp_path / "back.pth")])
    assert status == 0 and json.loads(out)["to"] == "mmf", err


def test_cli_errors_are_one_line(tmp_path, mmf) -> None:
    src = saved(mmf.state_dict(), tmp_path / "mmf.pth")
    (tmp_path / "taken").mkdir()
    cases = [
        ([src, "--out", str(tmp_path / "a"), "--from", "hf"], "argument --from: invalid choice: 'hf'"),
        ([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "b")], "no checkpoint file or directory at"),
        ([src, "--out", str(tmp_path / "taken")], "--out: '%s' already exists" % (tmp_path / "taken")),
        ([src, "--out", str(tmp_path / "c"), "--from", "lightningdot"], "has the 'mmf' layout, expected lightningdot"),
        ([src, "--out", str(tmp_path / "d"), "--to", "mmf", "--task", "vqa"], "takes none of ['--task']"),
    ]
    for argv, message in cases:
        status, out, err = run_cli(main, argv)
        assert status == 2 and out == "" and err.count("\n") == 1 and message in err, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["mmf.pth", "taken"] and os.listdir(tmp_path / "taken") == []
