"""uniter_fast.checkpoint: every container and layout the project meets is read, named, converted to the original
names and loaded (Model.from_pretrained, the pretraining init, load_task_model: what ``finetune.py --checkpoint``
calls); save_pretrained keeps tied tensors, writes the requested dtype and is atomic; an unknown layout is one clear
error."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import uniter_fast.checkpoint as ckpt_module
from uniter_fast import Model, UniterConfig
from uniter_fast.checkpoint import (
    export_original_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_pretrained,
)
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model, save_task_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = UniterConfig.tiny()


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with N(0, 1) values, exactly representable in fp16 (the original files are fp16)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p).half().float())
    return model


def bert_style(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pretraining state_dict as a BERT file holds it: ``bert.*`` names, LayerNorm gamma / beta, the NSP head, no
    image parts and no UNITER-only heads."""
    out = {}
    for key, value in state.items():
        if key.startswith(("uniter.img_embeddings", "feat_regress", "region_classifier", "itm_output")):
            continue
        name = key.replace("uniter.", "bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
        out[name.replace("LayerNorm.bias", "LayerNorm.beta")] = value.clone()
    gen = torch.Generator().manual_seed(3)
    out["cls.seq_relationship.weight"] = torch.randn(2, TINY.hidden_size, generator=gen)
    out["cls.seq_relationship.bias"] = torch.randn(2, generator=gen)
    return out


@pytest.fixture(scope="module")
def source() -> UniterForPretraining:
    torch.manual_seed(11)
    return randomized(UniterForPretraining(TINY)).eval()


@pytest.fixture(scope="module")
def deepspeed_dir(tmp_path_factory, source) -> str:
    """Real DeepSpeed checkpoints (``ckpt/`` ZeRO-2, ``ckpt0/`` no ZeRO, each with ``latest``) of a tiny
    UniterForPretraining, written in a subprocess (tests/deepspeed_checkpoint.py)."""
    out = str(tmp_path_factory.mktemp("deepspeed"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = os.path.join(REPO, "tests", "deepspeed_checkpoint.py")
    done = subprocess.run([sys.executable, script, out], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def write_layout(kind: str, directory: str, source: UniterForPretraining, deepspeed_dir: str) -> str:
    """``source`` (or its encoder) written as ``kind``; returns the path to load."""
    path = os.path.join(directory, kind)
    if kind == "original.pt":  # uniter-base.pt as released: uniter.* + pretraining heads, fp16
        export_original_checkpoint(source.state_dict(), path)
    elif kind == "bare.pt":  # a bare UniterModel state_dict
        torch.save(source.uniter.state_dict(), path)
    elif kind == "save_pretrained":
        source.uniter.save_pretrained(path)
    elif kind == "pretraining_export":
        save_pretrained(source, path, dtype=torch.float32)
    elif kind == "weights.safetensors":
        save_file({k: v.clone() for k, v in source.state_dict().items()}, path)
    elif kind == "bert.bin":
        torch.save(bert_style(source.state_dict()), path)
    elif kind == "deepspeed":  # ZeRO-2: the fp32 master weights consolidated by zero_to_fp32
        path = os.path.join(deepspeed_dir, "ckpt")
    elif kind == "deepspeed_no_zero":  # the module's weights in the model-state file
        path = os.path.join(deepspeed_dir, "ckpt0")
    return path


FORMATS = {  # kind: (container, layout)
    "original.pt": ("file", "uniter"),
    "bare.pt": ("file", "model"),
    "save_pretrained": ("directory", "model"),
    "pretraining_export": ("directory", "uniter"),
    "weights.safetensors": ("safetensors", "uniter"),
    "bert.bin": ("file", "bert"),
    "deepspeed": ("deepspeed", "uniter"),
    "deepspeed_no_zero": ("deepspeed", "uniter"),
}


def expected_state(kind: str, source: UniterForPretraining, deepspeed_dir: str) -> dict[str, torch.Tensor]:
    """What ``read_checkpoint`` must return for ``kind``: the original names and the values written."""
    if kind.startswith("deepspeed"):  # the engine's weights after its one step, as the subprocess saved them
        name = "reference0.pt" if kind == "deepspeed_no_zero" else "reference.pt"
        return torch.load(os.path.join(deepspeed_dir, name), weights_only=True)
    if kind in ("bare.pt", "save_pretrained"):
        return {"uniter." + k: v for k, v in source.uniter.state_dict().items()}
    if kind == "bert.bin":  # convert_ckpt.py's rename, and the original loader's gamma / beta -> weight / bias
        renamed = {k.replace("bert", "uniter"): v for k, v in bert_style(source.state_dict()).items()}
        return {k.replace("gamma", "weight").replace("beta", "bias"): v for k, v in renamed.items()}
    return source.state_dict()


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_layout_is_detected_converted_and_logged(kind, tmp_path, source, deepspeed_dir, caplog) -> None:
    path = write_layout(kind, str(tmp_path), source, deepspeed_dir)
    with caplog.at_level(logging.INFO, logger="uniter_fast.checkpoint"):
        ckpt = read_checkpoint(path)
    container, layout = FORMATS[kind]
    assert (ckpt.container, ckpt.layout) == (container, layout)
    line = [r.getMessage() for r in caplog.records if "checkpoint, layout '" in r.getMessage()]
    assert len(line) == 1 and f"{container} checkpoint, layout '{layout}'" in line[0], line
    expected = expected_state(kind, source, deepspeed_dir)
    assert sorted(ckpt.state) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(ckpt.state[key].float(), value.float(), rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_model_from_pretrained_loads_every_format(kind, tmp_path, source, deepspeed_dir) -> None:
    path = write_layout(kind, str(tmp_path), source, deepspeed_dir)
    bert = kind == "bert.bin"
    model = Model.from_pretrained(path, config=TINY, strict=not bert)  # BERT: no image embedder
    state = expected_state(kind, source, deepspeed_dir)
    expected = {k[len("uniter.") :]: v for k, v in state.items() if k.startswith("uniter.")}
    assert bert == ("img_embeddings.img_linear.weight" not in expected)
    for key, value in expected.items():
        torch.testing.assert_close(model.state_dict()[key], value.float(), rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_task_model_starts_from_every_format(kind, tmp_path, source, deepspeed_dir, caplog) -> None:
    """What ``finetune.py --checkpoint`` does: a pretrained checkpoint of any format initialises the VQA encoder; the
    head starts fresh (logged); a BERT-style file leaves the image embedder at its init."""
    path = write_layout(kind, str(tmp_path), source, deepspeed_dir)
    with caplog.at_level(logging.INFO):
        net, _ = load_task_model(get_task("vqa"), path, {"num_answers": 5}, TINY)
    assert "initialised freshly" in caplog.text and "vqa_output.3.weight" in caplog.text
    state = expected_state(kind, source, deepspeed_dir)
    if kind == "bert.bin":
        assert "img_embeddings.img_linear.weight" in caplog.text  # listed among the fresh keys
    for key, value in state.items():
        if key.startswith("uniter."):
            torch.testing.assert_close(net.state_dict()[key], value.float(), rtol=0, atol=0, msg=key)


def test_pretraining_init_from_deepspeed_and_bert(tmp_path, source, deepspeed_dir) -> None:
    """The pretraining floor's init (pretrain.py: strict=False): every key of a DeepSpeed checkpoint, the ties kept;
    from a BERT file the text parts, NSP skipped, the image parts fresh."""
    model = UniterForPretraining(TINY)
    report = load_checkpoint(model, os.path.join(deepspeed_dir, "ckpt"), strict=False)
    assert report.fresh == [] and report.skipped == []
    reference = expected_state("deepspeed", source, deepspeed_dir)
    for key, value in reference.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    bert = write_layout("bert.bin", str(tmp_path), source, deepspeed_dir)
    report = load_checkpoint(UniterForPretraining(TINY), bert, strict=False)
    assert report.skipped == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert "uniter.img_embeddings.img_linear.weight" in report.fresh and "itm_output.weight" in report.fresh
    with pytest.raises(ValueError, match=r"missing keys \[.*uniter.img_embeddings.img_linear.weight"):
        load_checkpoint(UniterForPretraining(TINY), bert)  # strict: the image parts must be there


def test_a_deepspeed_directory_takes_a_config_json_saved_in_it(tmp_path, deepspeed_dir) -> None:
    """A DeepSpeed directory holds no model config: without one the head count is read off the weights (hidden / 64
    = 1 for the tiny model's 4 heads); a config.json in the directory is taken."""
    ckpt_dir = shutil.copytree(os.path.join(deepspeed_dir, "ckpt"), tmp_path / "ckpt")
    assert read_checkpoint(ckpt_dir).config is None
    assert Model.from_pretrained(ckpt_dir).config.num_attention_heads == 1
    TINY.to_json_file(ckpt_dir / "config.json")
    for path in (ckpt_dir, ckpt_dir / "step1"):  # the directory with `latest`, or the tag directory
        ckpt = read_checkpoint(path)
        assert ckpt.container == "deepspeed" and ckpt.config == TINY
    assert Model.from_pretrained(ckpt_dir).config == TINY


def test_finetuned_export_round_trip_with_task_json(tmp_path) -> None:
    task = get_task("vqa")
    torch.manual_seed(5)
    net, options = load_task_model(task, None, {"num_answers": 7}, TINY)
    randomized(net)
    save_task_model(net, task, options, str(tmp_path / "finetuned"), step=3)
    assert sorted(os.listdir(tmp_path / "finetuned")) == [
        "config.json",
        "model.safetensors",
        "model_step_3.pt",
        "task.json",
    ]
    ckpt = read_checkpoint(tmp_path / "finetuned")
    assert ckpt.side_file("task.json")["options"]["num_answers"] == 7 and ckpt.config == net.config
    for path in (tmp_path / "finetuned", tmp_path / "finetuned" / "model_step_3.pt"):  # ours and the original's
        loaded, loaded_options = load_task_model(task, str(path), {})
        assert loaded_options["num_answers"] == 7
        for key, value in net.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_tied_tensors_are_saved_under_each_name_and_reload_tied(tmp_path, source) -> None:
    save_pretrained(source, tmp_path / "export")
    stored = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(stored) == set(source.state_dict())
    torch.testing.assert_close(
        stored["cls.predictions.decoder.weight"], stored["uniter.embeddings.word_embeddings.weight"]
    )
    model = UniterForPretraining(TINY)
    load_checkpoint(model, tmp_path / "export")
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_dtype_of_saved_and_loaded_weights(tmp_path) -> None:
    model = randomized(Model(TINY)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")  # default: the model's dtype
    assert {v.dtype for v in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    save_pretrained(model, tmp_path / "fp32", dtype=torch.float32)  # what the exports use
    assert {v.dtype for v in load_file(str(tmp_path / "fp32" / "model.safetensors")).values()} == {torch.float32}
    loaded = Model.from_pretrained(tmp_path / "fp32")
    assert loaded.pooler.dense.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.pooler.dense.weight, model.pooler.dense.weight.float(), rtol=0, atol=0)
    export_original_checkpoint(loaded.state_dict(), tmp_path / "fp16.pt")
    assert {v.dtype for v in torch.load(tmp_path / "fp16.pt", weights_only=True).values()} == {torch.float16}
    half = Model.from_pretrained(tmp_path / "fp16.pt", config=TINY, dtype=torch.float16)
    assert half.pooler.dense.weight.dtype == torch.float16


def test_a_failing_write_leaves_the_old_files_intact(tmp_path, monkeypatch) -> None:
    directory = tmp_path / "export"
    Model(TINY).save_pretrained(directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def broken_save_file(state, path, metadata=None) -> None:
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        randomized(Model(TINY)).save_pretrained(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # no temp file, the old weights

    original = tmp_path / "uniter.pt"
    export_original_checkpoint(Model(TINY).state_dict(), original)
    old = original.read_bytes()

    def broken_torch_save(obj, path) -> None:
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_torch_save)
    with pytest.raises(KeyboardInterrupt):
        export_original_checkpoint(Model(TINY).state_dict(), original)
    assert original.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["export", "uniter.pt"]


def test_unknown_layout_is_one_error_naming_the_closest_layout(tmp_path) -> None:
    state = {"module." + k: v for k, v in UniterForPretraining(TINY).state_dict().items()}  # a DDP-wrapped dump
    torch.save(state, tmp_path / "ddp.pt")
    with pytest.raises(ValueError) as err:
        read_checkpoint(tmp_path / "ddp.pt")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'ddp.pt'}: unknown checkpoint layout (keys ['module.cls.predictions.bias'")
    assert "the closest known layout is 'uniter'" in message
    assert "'uniter.embeddings.word_embeddings.weight'" in message and "\n" not in message
    roberta = {
        "roberta.embeddings.word_embeddings.weight": torch.zeros(3, 2),
        "roberta.pooler.dense.weight": torch.zeros(2, 2),
    }
    torch.save(roberta, tmp_path / "roberta.bin")
    with pytest.raises(ValueError, match=r"closest known layout is 'bert'.*'bert.embeddings.word_embeddings.weight'"):
        read_checkpoint(tmp_path / "roberta.bin")


def test_files_that_are_not_state_dicts_are_errors(tmp_path) -> None:
    torch.save({"model": {"uniter.pooler.dense.weight": torch.zeros(1)}, "step": torch.tensor(3)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"x.pt: expected a state_dict .*the entries \['model'\] are not tensors"):
        read_checkpoint(tmp_path / "x.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="got list"):
        read_checkpoint(tmp_path / "list.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors .* nor a DeepSpeed 'latest'"):
        read_checkpoint(tmp_path / "empty")


def test_encoder_only_load_reports_skipped_and_fresh_keys(source) -> None:
    net, _ = load_task_model(get_task("vqa"), None, {"num_answers": 5}, TINY)
    report = ckpt_module.load_state(net, source.state_dict(), "src", encoder_only=True)
    assert report.skipped == sorted(k for k in source.state_dict() if not k.startswith("uniter."))
    assert report.fresh == sorted(k for k in net.state_dict() if k.startswith("vqa_output."))
    wrong = {k: v for k, v in source.state_dict().items()}
    wrong["uniter.pooler.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(
        ValueError, match=r"src: shape mismatch .*uniter.pooler.dense.weight: model \(64, 64\), file \(3, 3\)"
    ):
        ckpt_module.load_state(net, wrong, "src", encoder_only=True)


def test_frozen_parameters_are_exported_as_loaded_under_bf16(tmp_path) -> None:
    """Under bf16 DeepSpeed casts the module to bf16 and keeps fp32 master weights only of what it trains, so a
    frozen parameter (an ITM tower's frozen cross-encoder) comes out of its checkpoint bf16-rounded;
    ``consolidated_model`` with ``frozen_parameters`` exports it as loaded, ZeRO-0 and ZeRO-2, the trained ones as
    the checkpoint holds them (tests/zero_frozen_export.py, real engines in a subprocess)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = os.path.join(REPO, "tests", "zero_frozen_export.py")
    done = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "export.json", encoding="utf-8") as f:
        report = json.load(f)
    assert set(report) == {"0", "2"}
    for stage, figures in report.items():
        assert figures["frozen_tensors"] > 0 and figures["frozen_error_without"] > 1e-6, (stage, figures)
        assert figures["frozen_error_with"] == 0.0 and figures["trained_error"] == 0.0, (stage, figures)
