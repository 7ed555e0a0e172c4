"""Fine-tuning configs: every shipped config parses (paths swapped for temporary dirs) with the original's values,
and a bad config is an error naming the field before anything is built."""

from __future__ import annotations

import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

from tests.pretrain_runs import REPO
from uniter_fast.checkpoint import save_pretrained
from uniter_fast.config import UniterConfig
from uniter_fast.finetuning.config import parse_finetune_config
from uniter_fast.finetuning.run import fit_vocab
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.training.engine import complete_ds_config

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "finetune-*.json")))
DB_KEYS = (
    "train_txt_dbs",
    "train_img_dbs",
    "train_txt_db",
    "train_img_db",
    "val_txt_db",
    "val_img_db",
    "test_txt_db",
    "test_img_db",
)


def with_tmp_paths(raw: dict, tmp_path) -> dict:
    """``raw`` with every database path replaced by an existing temporary dir (VCR's 'gt;det' pairs kept as
    pairs) and no checkpoint."""
    (tmp_path / "db").mkdir(exist_ok=True)
    (tmp_path / "img_gt").mkdir(exist_ok=True)

    def swap(path: str) -> str:
        return f"{tmp_path / 'img_gt'};{tmp_path / 'db'}" if ";" in path else str(tmp_path / "db")

    out = dict(raw, checkpoint=None)
    for key in DB_KEYS:
        if key in out:
            out[key] = [swap(p) for p in out[key]] if isinstance(out[key], list) else swap(out[key])
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_parse(path: str, tmp_path) -> None:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    cfg = parse_finetune_config(with_tmp_paths(raw, tmp_path), where=path)
    assert cfg.task == raw["task"] and cfg.num_train_steps == raw["num_train_steps"]
    assert cfg.save_steps == cfg.valid_steps and cfg.eval_sets()["val"]


def test_original_values_of_the_base_configs(tmp_path) -> None:
    def load(name: str):
        with open(os.path.join(REPO, "configs", name), encoding="utf-8") as f:
            return parse_finetune_config(with_tmp_paths(json.load(f), tmp_path))

    vqa = load("finetune-vqa-base.json")
    assert (vqa.learning_rate, vqa.lr_mul, vqa.num_train_steps, vqa.warmup_steps) == (8e-5, 10.0, 6000, 600)
    assert (vqa.train_batch_size, vqa.gradient_accumulation_steps, vqa.grad_norm) == (5120, 5, 2.0)
    nlvr2 = load("finetune-nlvr2-base.json")
    assert nlvr2.options == {"model": "paired-attn", "use_img_type": True} and nlvr2.learning_rate == 3e-5
    refcoco = load("finetune-refcoco-base.json")
    assert refcoco.options["mlp"] == 1 and (refcoco.train_batch_size, refcoco.conf_th) == (128, -1)
    assert load("finetune-refcoco+-base.json").options["mlp"] == 2
    vcr = load("finetune-vcr-base.json")
    assert (vcr.learning_rate, vcr.max_txt_len, vcr.checkpoint_from) == (6e-5, 220, "vcr_pretrain")
    stage1 = load("finetune-vcr-pretrain-base.json")
    assert stage1.options["mix_ratio"] == [2, 1, 1] and stage1.grad_norm == -1
    ds = complete_ds_config({"gradient_clipping": 5.0, "optimizer": {"type": "AdamW", "params": {}}}, stage1)
    assert ds["gradient_clipping"] == 0.0 and ds["gradient_accumulation_steps"] == 4
    assert ds["optimizer"]["params"] == {"weight_decay": 0.01, "betas": [0.9, 0.98], "lr": stage1.learning_rate}


def base(tmp_path, **changes) -> dict:
    raw = {
        "task": "vqa",
        "output_dir": "out",
        "train_txt_db": "db",
        "train_img_db": "db",
        "val_txt_db": "db",
        "val_img_db": "db",
    }
    (tmp_path / "db").mkdir(exist_ok=True)
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"task": "vqa2"}, ValueError, r"'task' must be one of .*got 'vqa2'"),
        ({"learning_rat": 1e-4}, ValueError, r"unknown keys \['learning_rat'\] \(neither fine-tuning keys nor"),
        ({"mlp": 2}, ValueError, r"unknown keys \['mlp'\].*task 'vqa'"),
        ({"val_img_db": None}, ValueError, r"missing keys \['val_img_db'\]"),
        ({"val_txt_db": "nowhere"}, FileNotFoundError, r"val_txt_db: database directory .*nowhere.* does not exist"),
        ({"test_txt_db": "db"}, ValueError, r"give both test_txt_db and test_img_db"),
        ({"learning_rate": 0}, ValueError, r"learning_rate must be a number > 0, got 0"),
        ({"checkpoint": "missing.pt"}, FileNotFoundError, r"checkpoint .*missing.pt.* does not exist"),
        (
            {"task": "nlvr2", "model": "pair"},
            ValueError,
            r"'model' must be one of \('paired', 'triplet', 'paired-attn'\)",
        ),
        ({"task": "re", "train_loss": "hinge"}, ValueError, r"train_loss must be 'cls' or 'rank'"),
        ({"task": "vcr_pretrain", "tasks": ["mlm", "itm"]}, ValueError, r"'tasks' must be distinct names from"),
        ({"train_txt_dbs": ["db"]}, ValueError, r"give 'train_txt_db' or 'train_txt_dbs', not both"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, changes, error, match) -> None:
    with pytest.raises(error, match=match):
        parse_finetune_config(base(tmp_path, **changes), base_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("checkpoint_from", "export"),
    [
        ("pretrain", "pretrain-tiny/pretrained"),
        ("vcr_pretrain", "vcr-pretrain-tiny/pretrained"),
        ("itm", "finetune-itm-tiny/finetuned"),
    ],
)
def test_auto_checkpoint_is_the_default_export_under_the_working_directory(
    tmp_path, monkeypatch, checkpoint_from: str, export: str
) -> None:
    """``"checkpoint": "auto"`` takes the export of the default run (its tiny config's ``output_dir``, the task's
    export dir) under the working directory, wherever the config file is, and no checkpoint when that export does
    not exist."""
    config_dir, work = tmp_path / "configs", tmp_path / "work"
    config_dir.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    raw = base(config_dir, checkpoint="auto", checkpoint_from=checkpoint_from)
    assert parse_finetune_config(raw, base_dir=str(config_dir)).checkpoint is None
    (work / "output" / export).mkdir(parents=True)
    cfg = parse_finetune_config(raw, base_dir=str(config_dir))
    assert cfg.checkpoint == str(work / "output" / export)


@pytest.mark.parametrize("task_name", ["nlvr2", "re"])
def test_tiny_configs_take_the_model_size_of_the_checkpoint(task_name: str, tmp_path) -> None:
    """The tiny configs name no ``model_config``: the checkpoint's saved config sizes the model (the default
    pretraining export is H = 128, the ``tiny`` preset H = 64), and without a checkpoint the ``tiny`` preset does."""
    with open(os.path.join(REPO, "configs", f"finetune-{task_name}-tiny.json"), encoding="utf-8") as f:
        cfg = parse_finetune_config(with_tmp_paths(json.load(f), tmp_path))
    assert cfg.model_config is None
    export = str(tmp_path / "pretrained")
    save_pretrained(UniterForPretraining(UniterConfig.tiny(hidden_size=96, intermediate_size=192)), export)
    task = get_task(task_name)
    model, _ = load_task_model(task, export, {}, cfg.model_config)
    assert model.uniter.embeddings.word_embeddings.weight.shape[1] == 96
    fresh, _ = load_task_model(task, None, {}, cfg.model_config)
    assert fresh.uniter.embeddings.word_embeddings.weight.shape[1] == UniterConfig.tiny().hidden_size == 64


def test_word_table_grows_to_the_task_vocabulary(tmp_path) -> None:
    """A pretraining export whose word table (128 rows, as the default demo's) is smaller than the task db's
    vocabulary (the bundled task sets add their words after the corpus's) gets fresh rows; the old rows are kept."""
    export = str(tmp_path / "pretrained")
    save_pretrained(UniterForPretraining(UniterConfig.tiny(vocab_size=128)), export)
    model, _ = load_task_model(get_task("re"), export, {}, None)
    words = model.uniter.embeddings.word_embeddings.weight.detach().clone()
    dbs = SimpleNamespace(opened_txt_dbs=lambda: [SimpleNamespace(v_range=(5, 158)), SimpleNamespace(v_range=(5, 140))])
    fit_vocab(dbs, model)
    grown = model.uniter.embeddings.word_embeddings.weight
    assert grown.shape[0] == model.config.vocab_size == 158
    torch.testing.assert_close(grown[:128], words)
    fit_vocab(dbs, model)  # big enough: unchanged
    assert model.uniter.embeddings.word_embeddings.weight.shape[0] == 158


def test_evaluation_needs_only_the_databases_it_reads(tmp_path) -> None:
    """Evaluation reads a config's settings and its val / test databases, never its training ones: a machine with
    the evaluation databases alone evaluates (``databases="eval"``; ``"none"``: settings only), training refuses."""
    with open(os.path.join(REPO, "configs", "finetune-vqa-tiny.json"), encoding="utf-8") as f:
        raw = with_tmp_paths(json.load(f), tmp_path)
    for key in ("train_txt_db", "train_img_db", "train_txt_dbs", "train_img_dbs"):
        raw.pop(key, None)
    raw["train_txt_dbs"] = raw["train_img_dbs"] = [str(tmp_path / "missing_train")]
    with pytest.raises(FileNotFoundError, match="train_txt_dbs: database directory .*missing_train"):
        parse_finetune_config(raw)
    assert parse_finetune_config(raw, databases="eval").eval_sets()["val"][0] == str(tmp_path / "db")
    raw["val_txt_db"] = str(tmp_path / "missing_val")
    with pytest.raises(FileNotFoundError, match="val_txt_db: database directory .*missing_val"):
        parse_finetune_config(raw, databases="eval")
    assert parse_finetune_config(raw, databases="none").val_txt_db == str(tmp_path / "missing_val")
    with pytest.raises(ValueError, match="databases must be one of"):
        parse_finetune_config(raw, databases="train")
