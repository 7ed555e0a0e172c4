"""Checkpoint against databases (what ``evaluate.py`` and ``finetune.py`` do before building the model: the task's
``data_options``, then ``load_task_model``): answer maps (VQA, VE), VCR's object tags, the word vocabulary, the
original checkpoints without ``task.json``; and the head-initialisation log of a pretrained start."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import pytest
import torch

from tests.tasks_helpers import original_checkpoint, tiny_config
from tests.test_tasks_vqa import _npz_dir, _vocab
from uniter_fast.build import main as build_main
from uniter_fast.data.task_records import VE_ENT2IDX
from uniter_fast.errors import CheckpointError, DataError
from uniter_fast.tasks import get_task
from uniter_fast.tasks.bundled import resolve_bundled
from uniter_fast.tasks.checkpoint import load_task_model, save_task_model
from uniter_fast.tasks.data import DbCache
from uniter_fast.tasks.spec import DATA_FACTS

SETTINGS = type("S", (), dict(max_txt_len=60, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36))()
H = tiny_config().hidden_size


def data_options(task_name: str, txt_paths: list[str], given: dict | None = None) -> dict:
    """What evaluate.py hands ``load_task_model``: the checked options and what the dbs fix."""
    task = get_task(task_name)
    options = task.check_options(given or {}, "test")
    return {**options, **task.data_options(DbCache(SETTINGS), txt_paths, options)}


def export(task_name: str, options: dict, directory: str, **config) -> str:
    """A fine-tuned export (config.json, model.safetensors, task.json) of a fresh model for ``options``."""
    task = get_task(task_name)
    model, options = load_task_model(task, None, options, tiny_config(**config))
    save_task_model(model, task, options, directory)
    return directory


def build_vqa(tmp_path, name: str, answers: list[list[str]]) -> str:
    """A VQA db built on its own from one question per answer list (its own ans2label.json); returns txt_db."""
    if not (tmp_path / "feats").exists():
        _npz_dir(tmp_path / "feats", ["im0"])
    ann = tmp_path / f"{name}.jsonl"
    lines = [
        {"question_id": i, "image": "im0", "question": "what color is the cup ?", "answers": a}
        for i, a in enumerate(answers)
    ]
    ann.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    flags = {"task": "vqa", "annotations": ann, "features": tmp_path / "feats", "out": tmp_path / name}
    flags["vocab"] = _vocab(tmp_path / "vocab.txt")
    build_main([arg for flag, value in flags.items() for arg in (f"--{flag}", str(value))])
    return str(tmp_path / name / "txt")


def test_a_vqa_db_built_on_its_own_is_refused_with_both_files(tmp_path, caplog) -> None:
    """The issue's case: a val db built on its own has its own answer map; a model trained on the train db's map
    scored 0 while every prediction was right. Now: an error naming task.json, the db's ans2label.json and the
    first differing labels; the train db's map loads."""
    train = build_vqa(tmp_path, "train", [["red"] * 3, ["red"] * 2, ["blue"] * 3, ["two"]])
    val = build_vqa(tmp_path, "val", [["two"] * 3, ["two"], ["red"]])
    train_map = json.load(open(os.path.join(train, "ans2label.json")))
    assert train_map == {"red": 0, "blue": 1, "two": 2} and json.load(open(os.path.join(val, "ans2label.json"))) == {
        "two": 0,
        "red": 1,
    }
    finetuned = export("vqa", data_options("vqa", [train]), str(tmp_path / "finetuned"))
    options = data_options("vqa", [val])
    with pytest.raises(CheckpointError) as err:
        load_task_model(get_task("vqa"), finetuned, options)
    message = str(err.value)
    assert message.startswith("answer map mismatch: ") and "\n" not in message
    assert f"{finetuned}/task.json, 3 answers" in message and f"{val}/ans2label.json, 2 answers" in message
    assert "label 0: 'red' vs 'two'; label 1: 'blue' vs 'red'; label 2: 'two' vs None" in message
    model, loaded = load_task_model(get_task("vqa"), finetuned, data_options("vqa", [train]))
    assert loaded["ans2label_table"] == train_map and DATA_FACTS not in loaded
    assert model.vqa_output[3].out_features == 3
    # the 'ans2label' option must be the dbs' own map: their records' labels index it
    (tmp_path / "map.json").write_text(json.dumps(train_map))
    with pytest.raises(DataError, match=re.escape(f"answer maps differ: {val}/ans2label.json and {tmp_path}/map.json")):
        data_options("vqa", [val], {"ans2label": str(tmp_path / "map.json")})
    # an original checkpoint (no task.json): only the head size can be compared, and the log says so
    torch.save(model.state_dict(), tmp_path / "model_step_9.pt")
    with pytest.raises(
        CheckpointError, match=r"head of .*model_step_9.pt has 3 answers, .*val/txt/ans2label.json\) has 2"
    ):
        load_task_model(get_task("vqa"), str(tmp_path / "model_step_9.pt"), options)
    with caplog.at_level(logging.INFO):
        load_task_model(get_task("vqa"), str(tmp_path / "model_step_9.pt"), data_options("vqa", [train]))
    assert "no task.json (an original train_vqa.py checkpoint)" in caplog.text
    assert "its answer map is unknown (no task.json): only its size (3 answers" in caplog.text


def test_ve_label_sets(tmp_path) -> None:
    """A VE db keeping its own ans2label.json in another order (SNLI's) is refused for an original VE checkpoint
    (the original's classes) and for an export; one without the file uses the original classes; a map of another
    size is a data error."""
    db = tmp_path / "ve_txt"
    shutil.copytree(resolve_bundled("bundled:ve/txt_val"), db)
    state = original_checkpoint(tiny_config(), {"vqa_output.3.weight": (3, 2 * H), "vqa_output.3.bias": (3,)})
    for key, shape in (("0.weight", (2 * H, H)), ("0.bias", (2 * H,)), ("2.weight", (2 * H,)), ("2.bias", (2 * H,))):
        state[f"vqa_output.{key}"] = torch.zeros(shape).half()
    torch.save(state, tmp_path / "ve.pt")
    snli = {"entailment": 0, "neutral": 1, "contradiction": 2}
    (db / "ans2label.json").write_text(json.dumps(snli))
    with pytest.raises(CheckpointError) as err:
        load_task_model(get_task("ve"), str(tmp_path / "ve.pt"), data_options("ve", [str(db)]))
    assert f"the checkpoint's ({tmp_path}/ve.pt, 3 answers) and the databases' ({db}/ans2label.json" in str(err.value)
    assert "label 0: 'contradiction' vs 'entailment'" in str(err.value)
    finetuned = export("ve", data_options("ve", [resolve_bundled("bundled:ve/txt_val")]), str(tmp_path / "export"))
    with pytest.raises(CheckpointError, match=re.escape(f"{finetuned}/task.json")):
        load_task_model(get_task("ve"), finetuned, data_options("ve", [str(db)]))
    os.remove(db / "ans2label.json")
    _, options = load_task_model(get_task("ve"), finetuned, data_options("ve", [str(db)]))
    assert options["ans2label_table"] == VE_ENT2IDX
    (db / "ans2label.json").write_text(json.dumps({**snli, "maybe": 3}))
    with pytest.raises(DataError, match=r"ans2label.json: a VE model has 3 classes .*, this answer map has 4"):
        data_options("ve", [str(db)])


def test_vcr_special_tokens(tmp_path) -> None:
    """A VCR db whose object tags start elsewhere than the checkpoint's: an export names its task.json, an original
    checkpoint its word table; a db with more tags than a VCR model's 81 rows is a data error."""
    db = tmp_path / "vcr_txt"
    shutil.copytree(resolve_bundled("bundled:vcr/txt_val"), db)
    meta = json.load(open(db / "meta.json"))
    assert meta["special_token_base"] == 1000
    finetuned = export("vcr", data_options("vcr", [str(db)]), str(tmp_path / "export"))
    model, _ = load_task_model(get_task("vcr"), finetuned, data_options("vcr", [str(db)]))
    assert model.uniter.embeddings.word_embeddings.num_embeddings == 1081
    torch.save(model.state_dict(), tmp_path / "model_step_9.pt")
    (db / "meta.json").write_text(json.dumps({**meta, "special_token_base": 900}))
    with pytest.raises(CheckpointError) as err:
        load_task_model(get_task("vcr"), finetuned, data_options("vcr", [str(db)]))
    assert str(err.value) == (
        f"VCR special tokens mismatch: the checkpoint's object tags start at id 1000 ({finetuned}/task.json "
        f"special_token_base), the databases' at 900 ({db}/meta.json special_token_base): rebuild the dbs with "
        "--special_token_base 1000"
    )
    with pytest.raises(CheckpointError) as err:
        load_task_model(get_task("vcr"), str(tmp_path / "model_step_9.pt"), data_options("vcr", [str(db)]))
    assert str(err.value).startswith(f"VCR special tokens mismatch: {tmp_path}/model_step_9.pt and {db}/meta.json: ")
    assert "needs 900 words before the 81 tags are added; it has 1081" in str(err.value)
    assert "--special_token_base 1000" in str(err.value)
    (db / "meta.json").write_text(json.dumps({**meta, "num_special_tokens": 100}))
    with pytest.raises(DataError, match=r"meta.json: num_special_tokens is 100, but a VCR model has 81 object-tag"):
        data_options("vcr", [str(db)])


def test_a_fine_tuned_word_table_must_cover_the_db_vocabulary(tmp_path) -> None:
    """A fine-tuned model's word table does not grow: a db with more word ids is an error naming both files (it used
    to fail in the embedding lookup, or grow untrained rows)."""
    txt = resolve_bundled("bundled:nlvr2/txt_val")
    small = export("nlvr2", data_options("nlvr2", [txt]), str(tmp_path / "small"), vocab_size=100)
    with pytest.raises(CheckpointError) as err:
        load_task_model(get_task("nlvr2"), small, data_options("nlvr2", [txt]))
    assert str(err.value).startswith(
        f"vocabulary mismatch: {small} has a word table of 100 rows, but the text db's {txt}/meta.json (v_range end "
        "158) gives word ids up to 157"
    )
    model, _ = load_task_model(get_task("nlvr2"), small, {})  # nothing read off a db: nothing to compare
    assert model.uniter.embeddings.word_embeddings.num_embeddings == 100
    fits = export("nlvr2", data_options("nlvr2", [txt]), str(tmp_path / "fits"), vocab_size=158)
    load_task_model(get_task("nlvr2"), fits, data_options("nlvr2", [txt]))


def test_a_malformed_db_meta_is_one_error_naming_it(tmp_path) -> None:
    """The vocabulary the checks compare is read off each db's meta.json through the txt_db's own check: a meta
    without a valid v_range is a DataError naming the file, not a KeyError."""
    db = tmp_path / "txt"
    shutil.copytree(resolve_bundled("bundled:nlvr2/txt_val"), db)
    meta = json.load(open(db / "meta.json"))
    (db / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "v_range"}))
    with pytest.raises(DataError, match=rf"txt_db meta file '{re.escape(str(db))}/meta.json': 'v_range' must be"):
        data_options("nlvr2", [str(db)])


def test_pretrained_itm_start_logs_what_was_loaded(tmp_path, caplog) -> None:
    """From a pretraining checkpoint the log names itm_output as loaded and rank_output as its row 1, only the first
    stage as freshly initialised, and the pretraining heads as skipped; the model is marked first-stage untrained."""
    state = original_checkpoint(tiny_config(), {"itm_output.weight": (2, H), "itm_output.bias": (2,)})
    state["cls.predictions.bias"] = torch.zeros(tiny_config().vocab_size).half()
    torch.save(state, tmp_path / "pretrained.pt")
    with caplog.at_level(logging.INFO):
        model, _ = load_task_model(get_task("itm"), str(tmp_path / "pretrained.pt"), {}, tiny_config())
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.endswith("itm_output of UniterForImageTextRetrieval from the checkpoint's itm_output") for line in lines
    )
    assert any(
        "rank_output of UniterForImageTextRetrieval from row 1 (match) of the checkpoint's itm_output" in line
        for line in lines
    )
    (fresh,) = [line for line in lines if "initialised freshly" in line]
    assert fresh.endswith("['img_proj.bias', 'img_proj.weight', 'txt_proj.bias', 'txt_proj.weight']")
    (skipped,) = [line for line in lines if "skipped" in line]
    assert skipped.endswith("['cls.predictions.bias']")
    assert model.first_stage_untrained
    model, _ = load_task_model(get_task("itm"), str(tmp_path / "pretrained.pt"), {"first_stage_dim": 0}, tiny_config())
    assert not model.first_stage_untrained  # no first stage to train
