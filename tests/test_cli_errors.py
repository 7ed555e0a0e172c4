"""The one error path of every command (``uniter_fast.entry``): bad input ends with exit status 2 and one ``error:``
line naming it, no traceback (``--debug`` / ``UNITER_FAST_DEBUG=1`` add it); a failed run exits 1; a bug keeps its
traceback. The training CLIs check their input before distributed start-up: paths, task names, config fields, ds.json
(with the installed DeepSpeed's own reader) and the initial checkpoint's layout and sizes."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch

from uniter_fast import Model, UniterConfig
from uniter_fast.checkpoint import check_config_fits, read_checkpoint
from uniter_fast.entry import CommandParser, run_command
from uniter_fast.errors import CheckpointError, ConfigError, DataError, RunFailed
from uniter_fast.files import read_json
from uniter_fast.training.config import RunConfig, check_run_fields
from uniter_fast.training.ds_keys import check_with_deepspeed, model_keys
from uniter_fast.training.engine import check_mixed_precision_stage, complete_ds_config, load_ds_config
from uniter_fast.training.loop import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTED = "PROCESS GROUP STARTED"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def run_failing(capsys: Any, main: Callable, argv: list[str], status: int = 2) -> str:
    """``run_command(main, argv)`` must exit with ``status`` and print one ``error:`` line and no traceback;
    returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, argv)
    assert exit_info.value.code == status
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------ the wrapper
def raising(err: BaseException) -> Callable[[list[str]], None]:
    def main(argv: list[str]) -> None:
        raise err

    return main


@pytest.mark.parametrize(
    "err,status",
    [
        (ConfigError("a.json: key 'x'\n  is unknown"), 2),
        (DataError("db 'x': record 'y' is corrupted"), 2),
        (CheckpointError("c.pt: does not fit"), 2),
        (FileNotFoundError("--checkpoint 'x' does not exist"), 2),
        (PermissionError("output_dir 'x' is not writable"), 2),
        (json.JSONDecodeError("Expecting value", "{", 1), 2),
        (TypeError("config must be a JSON object, got list"), 2),
        (RunFailed("step 3, task itm: non-finite loss {'loss': nan}"), 1),
    ],
)
def test_user_errors_and_failed_runs_are_one_line(capsys, monkeypatch, err, status) -> None:
    monkeypatch.delenv("UNITER_FAST_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    line = run_failing(capsys, raising(err), [], status)
    assert line == "error: " + "; ".join(part.strip() for part in str(err).splitlines())


def test_a_bug_keeps_its_traceback(capsys) -> None:
    with pytest.raises(KeyError):
        run_command(raising(KeyError("a bug")), [])
    with pytest.raises(RuntimeError):
        run_command(raising(RuntimeError("a bug")), [])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback_then_the_line(capsys, monkeypatch, how) -> None:
    monkeypatch.delenv("RANK", raising=False)
    if how == "env":
        monkeypatch.setenv("UNITER_FAST_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_info:
        run_command(raising(ConfigError("bad value")), ["--debug"] if how == "flag" else [])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.startswith("Traceback") and "raise err" in stderr and stderr.endswith("error: bad value\n")


def test_only_rank_0_prints(capsys, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        run_command(raising(ConfigError("bad value")), [])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_usage_errors_take_the_same_path(capsys) -> None:
    parser = CommandParser(prog="tool")
    parser.add_argument("--steps", type=int, required=True)
    with pytest.raises(ConfigError, match=r"tool: the following arguments are required: --steps"):
        parser.parse_args([])
    with pytest.raises(ConfigError, match=r"argument --steps: invalid int value: 'x'"):
        parser.parse_args(["--steps", "x"])
    assert parser.parse_args(["--steps", "3", "--debug"]).debug
    line = run_failing(capsys, lambda argv: parser.parse_args(argv), ["--steps", "3", "--stpes", "4"])
    assert line == "error: tool: unrecognized arguments: --stpes 4 (see --help)"


# ------------------------------------------------------------------------------------------------ every CLI, in-process
def test_every_cli_gives_one_line_for_bad_input(capsys, tmp_path) -> None:
    from uniter_fast.build import main as build
    from uniter_fast.convert import main as convert
    from uniter_fast.evaluate import main as evaluate
    from uniter_fast.extract.cli import main as extract
    from uniter_fast.finetune import main as finetune
    from uniter_fast.info import main as info
    from uniter_fast.pretrain import main as pretrain

    gone = str(tmp_path / "gone")
    cases = [
        (convert, [gone, "--out", str(tmp_path / "o")], f"no checkpoint file or directory at {gone!r}"),
        (convert, [gone, "--out", "o", "--from", "hf"], "argument --from: invalid choice: 'hf'"),
        (
            build,
            ["--task", "vqa", "--annotations", "a", "--features", "f", "--vocab", gone, "--out", "o"],
            "vocab file",
        ),
        (build, ["--features", "f", "--vocab", "v", "--out", "o"], "--captions is required"),
        (evaluate, ["--checkpoint", gone], f"--checkpoint {gone!r} does not exist"),
        (evaluate, ["--task", "vqaa", "--checkpoint", gone], "argument --task: invalid choice: 'vqaa'"),
        (extract, ["--images", gone, "--weights", "w", "--out", "o"], f"images: {gone!r} is neither"),
        (extract, ["--images", "i", "--out", "o"], "the following arguments are required: --weights"),
        (info, ["--jsn"], "unrecognized arguments: --jsn"),
        (pretrain, ["--config", gone], f"training config {gone!r} does not exist"),
        (finetune, ["--task", "vqaa"], "invalid choice: 'vqaa' (choose from 'itm', 'itm-hn', 'nlvr2', 're'"),
        (finetune, [], "give --task (its bundled tiny config is used) or --config"),
        (finetune, ["--task", "vqa", "--num_train_steps", "many"], "argument --num_train_steps: invalid int"),
    ]
    for main, argv, expected in cases:
        line = run_failing(capsys, main, argv)
        assert expected in line, (argv, line)
    for main, argv, expected in cases:  # every command knows --debug: the traceback, then the same line
        with pytest.raises(SystemExit) as exit_info:
            run_command(main, [*argv, "--debug"])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback (most recent call last)" in stderr, (argv, stderr)
        assert expected in stderr.rstrip().splitlines()[-1], (argv, stderr)


def test_builders_and_the_extractor_that_write_nothing_exit_2(capsys, tmp_path) -> None:
    """Nothing written is a failure (one line, exit 2) and leaves no output directory."""
    from uniter_fast.build import main as build
    from uniter_fast.extract.cli import main as extract

    (tmp_path / "feats").mkdir()
    (tmp_path / "noimgs").mkdir()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    common = ["--features", str(tmp_path / "feats"), "--vocab", str(vocab)]
    cases = [
        (build, ["--task", "ve", "--annotations", str(empty), *common, "--out", str(tmp_path / "o1")], "no ve record"),
        (
            extract,
            ["--images", str(tmp_path / "noimgs"), "--weights", "w", "--out", str(tmp_path / "o2")],
            "names no image",
        ),
    ]
    for main, argv, expected in cases:
        line = run_failing(capsys, main, argv)
        assert expected in line and "nothing written" in line, (argv, line)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_non_finite_loss_fails_the_run(tmp_path) -> None:
    """The loop's non-finite loss is a ``RunFailed`` (exit status 1)."""

    class Engine:
        device = torch.device("cpu")

        def __call__(self, batch: dict, task: str) -> dict:
            return {"loss": torch.tensor(float("nan"))}

        def backward(self, loss: torch.Tensor, scale_wrt_gas: bool) -> None:
            pass

        def step(self) -> None:
            pass

        def zero_optimization_partition_weights(self) -> bool:
            return False

    trainer = Trainer(Engine(), RunConfig(output_dir=str(tmp_path)), None, None, None)
    with pytest.raises(RunFailed, match=r"step 1, task itm: non-finite loss \{'loss': nan\}"):
        trainer.train_step([("itm", {})])


# ------------------------------------------------------------------------------------------------ before start-up
class Started(Exception):
    """Raised by the patched rank start-up: the run got past every check."""


@pytest.fixture()
def no_start(monkeypatch) -> None:
    """The training CLIs in-process: rank start-up raises ``Started``; the launcher variables are set (and restored
    afterwards) so that nothing leaks into other tests."""

    def init_ranks(*args: Any, **kwargs: Any) -> None:
        raise Started()

    monkeypatch.setattr("uniter_fast.training.run.init_ranks", init_ranks)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("UNITER_FAST_DEBUG", raising=False)


def write_json(path: Any, content: Any) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
    return str(path)


def repo_ds() -> dict:
    return read_json(os.path.join(REPO, "ds.json"))


def finetune_config(tmp_path: Any, **changes: Any) -> str:
    """A VQA fine-tuning config over empty db directories (enough for every check before start-up)."""
    (tmp_path / "db").mkdir(exist_ok=True)
    raw = {"task": "vqa", "output_dir": str(tmp_path / "out"), "model_config": "tiny"}
    raw.update({key: "db" for key in ("train_txt_db", "train_img_db", "val_txt_db", "val_img_db")})
    raw.update(changes)
    return write_json(tmp_path / f"finetune-{len(list(tmp_path.glob('finetune-*.json')))}.json", raw)


def pretrain_config(tmp_path: Any, **changes: Any) -> str:
    """A pretraining config of the tiny model over empty db directories."""
    for name in ("txt", "img"):
        (tmp_path / name).mkdir(exist_ok=True)
    data = [{"name": "d", "db": ["txt"], "img": ["img"], "tasks": ["mlm"], "mix_ratio": [1]}]
    raw = {"output_dir": str(tmp_path / "out"), "model": "tiny", "train_datasets": data, "val_datasets": data}
    raw.update(changes)
    return write_json(tmp_path / f"pretrain-{len(list(tmp_path.glob('pretrain-*.json')))}.json", raw)


def tiny_checkpoint(tmp_path: Any, name: str, **sizes: Any) -> str:
    model = Model(UniterConfig.tiny(**sizes))
    path = str(tmp_path / name)
    torch.save({"uniter." + k: v for k, v in model.state_dict().items()}, path)
    return path


def test_good_input_reaches_start_up(no_start, tmp_path) -> None:
    """The control of the tests below: with good input (and a checkpoint of the right sizes) both training CLIs get
    to rank start-up."""
    from uniter_fast.finetune import main as finetune
    from uniter_fast.pretrain import main as pretrain

    checkpoint = tiny_checkpoint(tmp_path, "tiny.pt")
    with pytest.raises(Started):
        finetune(["--config", finetune_config(tmp_path), "--checkpoint", checkpoint])
    with pytest.raises(Started):
        pretrain(["--config", pretrain_config(tmp_path), "--checkpoint", checkpoint])


def test_a_checkpoint_given_on_the_command_line_replaces_the_configs(no_start, tmp_path) -> None:
    """A config naming a checkpoint that is gone is refused, unless ``--checkpoint`` replaces it (then the file's is
    not read); ``evaluate`` always takes its ``--checkpoint``."""
    from uniter_fast.evaluate import main as evaluate
    from uniter_fast.finetune import main as finetune
    from uniter_fast.pretrain import main as pretrain

    checkpoint, gone = tiny_checkpoint(tmp_path, "tiny.pt"), str(tmp_path / "gone.pt")
    for main, config in (
        (finetune, finetune_config(tmp_path, checkpoint=gone)),
        (pretrain, pretrain_config(tmp_path, checkpoint=gone)),
    ):
        with pytest.raises(FileNotFoundError, match=f"checkpoint '{gone}' does not exist"):
            main(["--config", config])
        with pytest.raises(Started):
            main(["--config", config, "--checkpoint", checkpoint])
    with pytest.raises(DataError, match="txt_db meta file .* does not exist"):  # past the config, at the dbs
        evaluate(["--task", "vqa", "--config", finetune_config(tmp_path, checkpoint=gone), "--checkpoint", checkpoint])


def test_training_clis_check_everything_before_start_up(no_start, capsys, tmp_path) -> None:
    from uniter_fast.finetune import main as finetune
    from uniter_fast.pretrain import main as pretrain

    gone = str(tmp_path / "gone")
    ds = repo_ds()
    misspelt = write_json(tmp_path / "ds-misspelt.json", {**ds, "train_micro_batch_sise": 1})
    nested = write_json(tmp_path / "ds-nested.json", {**ds, "zero_optimization": {"stagee": 2}})
    (tmp_path / "a-file").write_text("")
    small = tiny_checkpoint(tmp_path, "small.pt", hidden_size=32, intermediate_size=64, num_attention_heads=2)
    junk = str(tmp_path / "junk.pt")
    with open(junk, "w", encoding="utf-8") as f:
        f.write("not a checkpoint")
    ft, pt = finetune_config(tmp_path), pretrain_config(tmp_path)
    negative_lr = finetune_config(tmp_path, learning_rate=-1)
    cases = [
        (finetune, ["--config", ft, "--checkpoint", gone], f"--checkpoint {gone!r} does not exist"),
        (finetune, ["--config", finetune_config(tmp_path, task="vqaa")], "'task' must be one of ['itm', 'itm-hn'"),
        (finetune, ["--config", negative_lr], f"{negative_lr}: learning_rate must be a number > 0, got -1"),
        (finetune, ["--config", finetune_config(tmp_path, val_txt_db="nowhere")], "val_txt_db: database directory"),
        (
            finetune,
            ["--config", ft, "--ds_config", misspelt],
            "unknown key 'train_micro_batch_sise' (closest: 'train_micro_batch_size_per_gpu')",
        ),
        (
            finetune,
            ["--config", ft, "--ds_config", nested],
            "unknown key 'zero_optimization.stagee' (closest: 'stage')",
        ),
        (finetune, ["--config", ft, "--checkpoint", small], "hidden_size 32 != 64, intermediate_size 64 != 128"),
        (finetune, ["--config", ft, "--checkpoint", junk], f"{junk}: cannot be read as a checkpoint"),
        (finetune, ["--config", ft, "--output_dir", str(tmp_path / "a-file")], "is a file, not a directory"),
        (finetune, ["--config", ft, "--resume"], "holds no previous run"),
        (pretrain, ["--config", gone], "does not exist"),
        (
            pretrain,
            ["--config", pretrain_config(tmp_path, learning_rte=1e-4)],
            "unknown keys ['learning_rte'] (closest: 'learning_rate')",
        ),
        (
            pretrain,
            ["--config", pretrain_config(tmp_path, model_overrides={"hidden_sise": 32})],
            "model_overrides: 'hidden_sise' is not a model config field (closest: 'hidden_size')",
        ),
        (
            finetune,
            ["--config", finetune_config(tmp_path, adversarial={"reuse_clean_forward": True, "adv_init_mag": 0.01})],
            "adversarial.adv_init_mag must be 0 with reuse_clean_forward true",
        ),
        (pretrain, ["--config", pt, "--ds_config", misspelt], "(closest: 'train_micro_batch_size_per_gpu')"),
        (pretrain, ["--config", pt, "--checkpoint", small], "its weights do not fit the model config 'tiny'"),
    ]
    for main, argv, expected in cases:
        line = run_failing(capsys, main, argv)
        assert expected in line, (argv, line)


def test_the_opt_out_lets_unknown_ds_keys_through(no_start, caplog, tmp_path) -> None:
    from uniter_fast.pretrain import main as pretrain

    newer = write_json(tmp_path / "ds-newer.json", {**repo_ds(), "a_newer_deepspeed_key": True})
    argv = ["--config", pretrain_config(tmp_path), "--ds_config", newer]
    with pytest.raises(ConfigError, match="unknown key 'a_newer_deepspeed_key'"):
        pretrain(argv)
    with caplog.at_level(logging.WARNING), pytest.raises(Started):
        pretrain([*argv, "--allow_unknown_ds_keys"])
    assert "unknown key 'a_newer_deepspeed_key'" in caplog.text and "ignores it" in caplog.text


# ------------------------------------------------------------------------------------------------ ds.json
def run_config() -> RunConfig:
    cfg = RunConfig(output_dir="out")
    check_run_fields(cfg)
    return cfg


@pytest.mark.parametrize("path", ["ds.json", *sorted(glob.glob(os.path.join(REPO, "configs", "ds-*.json")))])
def test_every_shipped_ds_config_passes(path, monkeypatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ds = load_ds_config(os.path.join(REPO, path), run_config())
    assert ds["train_micro_batch_size_per_gpu"] == 1


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda d: d.update(steps_per_prnt=10),
            r"ds.json: unknown key 'steps_per_prnt' \(closest: 'steps_per_print'\)",
        ),
        (
            lambda d: d["zero_optimization"].update(offload_optimizer={"devise": "cpu"}),
            r"unknown key 'zero_optimization.offload_optimizer.devise' \(closest: 'device'\)",
        ),
        (lambda d: d["bf16"].update(enabeld=True), r"unknown key 'bf16.enabeld' \(closest: 'enabled'\)"),
        (lambda d: d.update(tensorboard={"enable": True}), r"unknown key 'tensorboard.enable' \(closest: 'enabled'\)"),
        (lambda d: d["zero_optimization"].update(stage="two"), r"zero_optimization.stage: .*\(given 'two'\)"),
        (lambda d: d.update(amp={"enabled": True}), r"ds.json: DeepSpeed .* rejects it: .*AMP"),
    ],
)
def test_deepspeed_reader_names_the_key(edit, match) -> None:
    ds = complete_ds_config(repo_ds(), run_config())
    edit(ds)
    with pytest.raises(ConfigError, match=match):
        check_with_deepspeed(ds, "ds.json")


def test_mixed_precision_without_zero_is_refused() -> None:
    """bf16 / fp16 at ZeRO stage 0 (given, or no zero_optimization at all): the export could not read the fp32
    master weights; one line naming the file, the key and the value."""
    for ds in ({"bf16": {"enabled": True}}, {"fp16": {"enabled": True}, "zero_optimization": {"stage": 0}}):
        precision = next(iter(ds))
        with pytest.raises(ConfigError, match=rf"^ds.json: {precision} needs zero_optimization.stage 1, 2 or 3, got 0"):
            check_mixed_precision_stage(ds, "ds.json")
    for ds in ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, {"bf16": {"enabled": False}}, {}):
        check_mixed_precision_stage(ds, "ds.json")


def test_nested_keys_come_from_deepspeeds_models() -> None:
    assert {"stage", "offload_optimizer", "overlap_comm"} <= set(model_keys("DeepSpeedZeroConfig", ()))
    assert "device" in model_keys("DeepSpeedZeroConfig", ("offload_optimizer",))
    assert model_keys("NoSuchModel", ()) == [] and model_keys("DeepSpeedZeroConfig", ("stage", "x")) == []


def test_ds_json_syntax_error_names_file_line_and_column(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    path = tmp_path / "ds.json"
    path.write_text('{\n  "gradient_clipping": 5.0\n  "bf16": {"enabled": true}\n}\n')
    with pytest.raises(ValueError, match=rf"DeepSpeed config '{path}' is not valid JSON: line 3, column 3: Expecting"):
        load_ds_config(str(path), run_config())
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=r"is not UTF-8 text"):
        load_ds_config(str(path), run_config())


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_sizes_are_checked_against_the_config(tmp_path) -> None:
    checkpoint = read_checkpoint(tiny_checkpoint(tmp_path, "c.pt", num_hidden_layers=3))
    check_config_fits(checkpoint, UniterConfig.tiny(num_hidden_layers=3), "'mine'")
    with pytest.raises(
        CheckpointError,
        match=r"c.pt: its weights do not fit the model config 'tiny' .*"
        r"num_hidden_layers 3 != 2\)",
    ):
        check_config_fits(checkpoint, UniterConfig.tiny(), "'tiny'")
    with pytest.raises(CheckpointError, match=r"img_dim 2048 != 1024"):
        check_config_fits(checkpoint, UniterConfig.tiny(num_hidden_layers=3, img_dim=1024), "'tiny'")


def test_damaged_checkpoint_files_name_the_file(tmp_path) -> None:
    good = tiny_checkpoint(tmp_path, "good.pt")
    with open(good, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    for path in (cut, bad):
        with pytest.raises(CheckpointError, match=rf"{path}: cannot be read as a checkpoint"):
            read_checkpoint(str(path))


# ------------------------------------------------------------------------------------------------ real entry points
WRAPPER = f"""
import runpy, sys
import deepspeed

def init_distributed(*args, **kwargs):
    print({STARTED!r}, file=sys.stderr)
    raise SystemExit(99)

deepspeed.init_distributed = init_distributed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start(args: list[str], cwd: Any) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("UNITER_FAST_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env
    )


def test_entry_points_exit_2_with_one_line(tmp_path) -> None:
    """Each command as a user starts it (``-m`` or the script; all at once): exit status 2, one ``error:`` line (the
    last), no traceback; the training scripts stop before DeepSpeed's process group starts (its patched start-up
    would say so)."""
    gone = str(tmp_path / "gone")
    misspelt = write_json(tmp_path / "ds-misspelt.json", {**repo_ds(), "train_micro_batch_sise": 1})
    finetune, pretrain = (os.path.join(REPO, "uniter_fast", f"{name}.py") for name in ("finetune", "pretrain"))
    cases = [
        (["-m", "uniter_fast.info", "--jsn"], "unrecognized arguments: --jsn"),
        (["-m", "uniter_fast.convert", gone, "--out", "o"], "no checkpoint file or directory at"),
        (
            [
                "-m",
                "uniter_fast.build",
                *"--task ve --features f --out o".split(),
                "--annotations",
                gone,
                "--vocab",
                gone,
            ],
            "vocab file",
        ),
        (["-m", "uniter_fast.evaluate", "--checkpoint", gone], "--checkpoint"),
        (["-m", "uniter_fast.extract", "--images", gone, "--weights", "w", "--out", "o"], "images:"),
        (["-c", WRAPPER, finetune, "--config", finetune_config(tmp_path), "--checkpoint", gone], "--checkpoint"),
        (
            ["-c", WRAPPER, pretrain, "--config", pretrain_config(tmp_path), "--ds_config", misspelt],
            "unknown key 'train_micro_batch_sise'",
        ),
    ]
    processes = [start(args, tmp_path) for args, _ in cases]
    for (args, expected), process in zip(cases, processes):
        _, stderr = process.communicate(timeout=600)
        lines = error_lines(stderr)
        assert process.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, stderr[-3000:])
        assert "Traceback" not in stderr and STARTED not in stderr and stderr.rstrip().splitlines()[-1] == lines[0]


def test_inference_clis_name_the_mistake_before_any_work(capsys, tmp_path) -> None:
    """predict, extract and demo: a bad device, an --out that exists or has no folder, empty texts, options of
    another task, a questions file with an unknown key, an image where a folder is expected, detector counts below
    1, a file that is not weights (no --out folder left) and a bad port: one line each, exit 2."""
    from uniter_fast.demo.cli import main as demo
    from uniter_fast.extract.cli import main as extract
    from uniter_fast.predict import main as predict

    photo = tmp_path / "photo.jpg"
    photo.write_text("not decoded before the checks")
    (tmp_path / "taken.json").write_text("{}")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": "photo.jpg", "text": "what?", "box": [[0, 0, 5, 5]]}) + "\n")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_text("x")
    weights = tmp_path / "weights.pth"
    weights.write_text("these are not weights")
    ask = ["--task", "vqa", "--checkpoint", str(tmp_path), "--detector", str(weights), "--image", str(photo)]
    extract_args = ["--images", str(tmp_path / "imgs"), "--weights", str(weights)]
    cases = [
        (predict, [*ask, "--text", "what?", "--device", "gpu"], "argument --device: expected a device such as cpu"),
        (predict, [*ask, "--text", "what?", "--out", str(tmp_path / "taken.json")], "already exists; give a new"),
        (predict, [*ask, "--text", "what?", "--out", str(tmp_path / "no" / "a.json")], "does not exist"),
        (predict, [*ask, "--text", " "], "--text: expected a non-empty text, got ' '"),
        (predict, [*ask, "--text", "what?", "--answer", "A"], "--answer/--rationale: only --task vcr takes them"),
        (
            predict,
            [*ask[:6], "--questions", str(questions)],
            "line 1: unknown key 'box' (closest: 'boxes')",
        ),
        (predict, [*ask[:6], "--questions", str(tmp_path / "none.jsonl")], "--questions: "),
        (extract, ["--images", str(photo), "--weights", "w", "--out", "o"], "expected a folder or a list file"),
        (extract, [*extract_args, "--out", str(tmp_path / "o1"), "--test-scale", "0"], "--test-scale: expected an"),
        (extract, [*extract_args, "--out", str(tmp_path / "o2"), "--batch-size", "0"], "--batch-size"),
        (extract, [*extract_args, "--out", str(tmp_path / "o3")], "is not a torch (.pth/.pt/.bin) or safetensors"),
        (
            demo,
            ["--checkpoint", f"vqa={tmp_path}", "--detector", str(weights), "--port", "99999"],
            "--port: expected a port in 1..65535, got 99999",
        ),
    ]
    for main, argv, expected in cases:
        line = run_failing(capsys, main, argv)
        assert expected in line, (argv, line)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "no"))
    assert (tmp_path / "taken.json").read_text() == "{}"


def test_unreadable_images_vocabs_and_box_settings_are_data_errors(tmp_path) -> None:
    from uniter_fast.data.img_db import ImgDbWriter
    from uniter_fast.data.tokenizer import WordPiece
    from uniter_fast.extract.images import load_bgr

    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    with pytest.raises(DataError, match=rf"^image {str(fake)!r} is not a readable image \(UnidentifiedImageError"):
        load_bgr(str(fake))
    for content in (b"", b"\xff\xfe\x00binary"):
        vocab = tmp_path / "vocab.txt"
        vocab.write_bytes(content)
        with pytest.raises(DataError, match=rf"^vocab {str(vocab)!r} is not a WordPiece vocab.txt"):
            WordPiece(str(vocab))
    for settings, match in (
        (dict(max_bb=0), r"min_bb, max_bb: need 1 <= min_bb <= max_bb, got min_bb=10, max_bb=0"),
        (dict(conf_th=5.0), r"conf_th: expected a confidence in \[0, 1\] or -1"),
        (dict(conf_th=-1, num_bb=0), "num_bb: expected an integer >= 1 with conf_th -1, got 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            ImgDbWriter(str(tmp_path / "img"), **settings)
    assert not (tmp_path / "img").exists()


def test_config_values_of_the_wrong_json_type_name_the_key(tmp_path) -> None:
    """Whole numbers, booleans, strings and lists as the config classes declare them: ``"num_train_steps": 2.5``
    used to run 3 steps and export nothing, ``"fast": "false"`` the fast path, ``"tasks": "itm"`` the tasks 'i',
    't', 'm'; ds.json sections of the wrong type (they were tracebacks)."""
    from uniter_fast.finetuning.config import parse_finetune_config
    from uniter_fast.pretraining.config import parse_training_config

    with open(os.path.join(REPO, "configs", "pretrain-tiny.json"), encoding="utf-8") as f:
        tiny = json.load(f)
    dataset = tiny["train_datasets"][0]
    cases = [
        ({"num_train_steps": 2.5}, "cfg.json: num_train_steps must be an integer, got 2.5"),
        ({"fast": "false"}, "cfg.json: fast must be true or false, got 'false'"),
        ({"mrm_prob": "0.15"}, "cfg.json: mrm_prob must be a number, got '0.15'"),
        ({"output_dir": None}, "cfg.json: output_dir must be a string, got None"),
        ({"output_dir": ""}, "output_dir must be a folder path"),
        ({"ot": {"beta": "x"}}, "cfg.json: ot: beta must be a number, got 'x'"),
        ({"train_datasets": [{**dataset, "tasks": "itm"}]}, "train_datasets[0]: tasks must be a list of strings"),
        ({"model_overrides": {"hidden_size": "128"}}, "model_overrides: hidden_size must be an integer, got '128'"),
    ]
    for edit, message in cases:
        with pytest.raises((ConfigError, ValueError), match=re.escape(message)):
            parse_training_config({**tiny, **edit}, REPO, "cfg.json")
    with open(os.path.join(REPO, "configs", "finetune-vqa-tiny.json"), encoding="utf-8") as f:
        vqa = {**json.load(f), "checkpoint": None}
    with pytest.raises(ConfigError, match=re.escape("ft.json: dropout must be a number, got '0.1'")):
        parse_finetune_config({**vqa, "dropout": "0.1"}, where="ft.json", databases="none")
    run = parse_finetune_config(vqa, databases="none")
    with open(os.path.join(REPO, "ds.json"), encoding="utf-8") as f:
        ds = json.load(f)
    for edit, message in (
        ({"bf16": True}, "ds.json: bf16 must be a JSON object"),
        ({"optimizer": {"type": 5}}, "ds.json: optimizer.type must be a string ('AdamW'), got 5"),
        ({"optimizer": {**ds["optimizer"], "params": {"betas": "x"}}}, "optimizer.params.betas must be two numbers"),
        ({"gradient_clipping": "x"}, "ds.json: gradient_clipping must be a number, got 'x'"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            complete_ds_config({**ds, **edit}, run, "ds.json")
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError, match="training config .*adir' is a folder; give the JSON file"):
        read_json(str(tmp_path / "adir"), "training config")


def test_evaluate_refuses_another_task_than_the_export_and_a_file_as_output_dir(capsys, tmp_path) -> None:
    """``--task nlvr2`` on a VQA export used to score a randomly initialised NLVR2 head (exit 0); a pretraining
    export has no head to evaluate; ``--output_dir`` a file used to fail after the evaluation."""
    from uniter_fast.evaluate import main as evaluate
    from uniter_fast.tasks import get_task
    from uniter_fast.tasks.checkpoint import load_task_model, save_task_model

    task = get_task("vqa")
    model, options = load_task_model(task, None, {"num_answers": 3}, UniterConfig.tiny())
    save_task_model(model, task, options, str(tmp_path / "vqa"))
    line = run_failing(capsys, evaluate, ["--checkpoint", str(tmp_path / "vqa"), "--task", "nlvr2"])
    assert "--task nlvr2: " in line and "says the checkpoint is a 'vqa' model; drop --task" in line
    (tmp_path / "afile").write_text("")
    argv = ["--checkpoint", str(tmp_path / "vqa"), "--output_dir", str(tmp_path / "afile")]
    line = run_failing(capsys, evaluate, argv)
    assert "--output_dir: " in line and "is a file; give a folder for the predictions" in line
    Model(UniterConfig.tiny()).save_pretrained(str(tmp_path / "pretrained"))
    line = run_failing(capsys, evaluate, ["--checkpoint", str(tmp_path / "pretrained"), "--task", "vqa"])
    assert "--task vqa: " in line and "holds no fine-tuned vqa head (a pretrained encoder?)" in line


def test_a_run_shorter_than_the_curriculum_says_its_last_phase_does_not_run(caplog) -> None:
    """A shortened run (a smoke test of the default config) stops inside the curriculum: allowed, with a warning
    naming the phase that does not run."""
    from uniter_fast.pretraining.config import parse_training_config

    with open(os.path.join(REPO, "configs", "pretrain-tiny.json"), encoding="utf-8") as f:
        tiny = json.load(f)
    phases = [{"steps": 600, "mix": {"itm_synth": 1}}, {"mix": {"mlm_synth": 1}}]
    with caplog.at_level(logging.WARNING, logger="uniter_fast.pretraining.config"):
        parse_training_config({**tiny, "num_train_steps": 8, "phases": phases}, REPO, "cfg.json")
    assert "take 600 steps, not fewer than num_train_steps 8, so the last phase (['mlm_synth'])" in caplog.text
