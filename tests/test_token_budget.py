"""Token budgets: ``tokens_per_update`` -> gradient accumulation for any world size, its one-line errors,
``train_batch_size: "auto"`` (CPU fallback; a mocked CUDA device's memory), the training-memory estimate against the
measured saved tensors, and a short real run that trains with the derived accumulation."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests.pretrain_runs import launcher, run, write_configs
from uniter_fast.config import UniterConfig
from uniter_fast.errors import ConfigError
from uniter_fast.files import read_json
from uniter_fast.finetuning.config import default_config, load_finetune_config, parse_finetune_config
from uniter_fast.pretraining.config import parse_training_config
from uniter_fast.pretraining.model import UniterForPretraining, pretraining_model_size
from uniter_fast.training import budget
from uniter_fast.training import run as training_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
from batches import corpus_batches  # noqa: E402

TASKS = ["itm", "mlm", "mrfr", "mrckl"]
GIB = 2**30


def tiny_raw(**fields: object) -> dict:
    """configs/pretrain-tiny.json as a dict, with ``fields`` set."""
    raw = read_json(os.path.join(REPO, "configs", "pretrain-tiny.json"), "config")
    raw.update(fields)
    return raw


def training_config(**fields: object):
    return parse_training_config(tiny_raw(**fields), os.path.join(REPO, "configs"))


@pytest.mark.parametrize(
    "tokens, size, world, steps",
    [
        (163840, 10240, 8, 2),
        (163840, 10240, 1, 16),
        (163840, 20480, 2, 4),
        (163840, 40960, 4, 1),
        (393216, 6144, 16, 4),
    ],
)
def test_accumulation_from_tokens_per_update(tokens: int, size: int, world: int, steps: int) -> None:
    assert budget.accumulation_steps(tokens, size, world) == steps


def test_accumulation_errors_name_fields_and_values() -> None:
    with pytest.raises(ConfigError, match=r"tokens_per_update=163840 is not a multiple of train_batch_size=10240 x 3"):
        budget.accumulation_steps(163840, 10240, 3)
    with pytest.raises(ConfigError, match=r"tokens_per_update=8192 is smaller than .* train_batch_size=10240"):
        budget.accumulation_steps(8192, 10240, 1)


@pytest.mark.parametrize("world, steps", [(1, 4), (2, 2), (4, 1)])
def test_run_config_accumulation_for_world_sizes(world: int, steps: int) -> None:
    cfg = training_config(train_batch_size=1024, tokens_per_update=4096)
    choice = training_run.resolve_budget(cfg, world)
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (1024, steps)
    assert f"gradient_accumulation_steps={steps} x {world} rank(s) -> tokens_per_update=4096" in choice.line()


def test_without_tokens_per_update_nothing_changes() -> None:
    cfg = training_config()
    choice = training_run.resolve_budget(cfg, 8)
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.tokens_per_update) == (1024, None, None)
    assert choice.line() == "token budget: train_batch_size=1024 (configured)"


def test_run_config_errors() -> None:
    with pytest.raises(ConfigError, match="not a multiple of train_batch_size=1024 x 3 rank"):
        training_run.resolve_budget(training_config(tokens_per_update=4096), 3)
    cfg = training_config(tokens_per_update=4096, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 contradicts tokens_per_update=4096"):
        training_run.resolve_budget(cfg, 1)
    for value in (0, -4096, 1.5, "4096", True):
        with pytest.raises(ConfigError, match="tokens_per_update must be an integer"):  # >= 1, or of the JSON type
            training_config(tokens_per_update=value)
    with pytest.raises(ConfigError, match=r"train_batch_size must be a number > 0, got 'big' \(or \"auto\""):
        training_config(train_batch_size="big")


def test_auto_is_pretraining_only() -> None:
    raw = read_json(default_config("vqa"), "config")
    raw["train_batch_size"] = "auto"
    with pytest.raises(ConfigError, match='train_batch_size "auto" sizes pretraining'):
        parse_finetune_config(raw, os.path.dirname(default_config("vqa")))
    cfg = load_finetune_config(default_config("vqa"))  # tokens_per_update is shared: the rule is the same
    cfg.tokens_per_update, cfg.gradient_accumulation_steps = 2 * cfg.train_batch_size, None
    training_run.resolve_budget(cfg, 1)
    assert cfg.gradient_accumulation_steps == 2


def test_auto_on_cpu_falls_back_to_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training_run, "cuda_memory_bytes", lambda: None)
    cfg = training_config(train_batch_size="auto", tokens_per_update=20480)
    choice = training_run.resolve_budget(cfg, 1)
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (10240, 2)
    assert "auto without a CUDA device: the recipe's 10240" in choice.line()
    cfg = training_config(train_batch_size="auto")
    assert "auto without tokens_per_update" in training_run.resolve_budget(cfg, 1).line()
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (10240, None)
    with pytest.raises(ConfigError, match="tokens_per_update=15000 is not a multiple of train_batch_size=10240"):
        training_run.resolve_budget(training_config(train_batch_size="auto", tokens_per_update=15000), 1)


def test_auto_with_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """UNITER-base in-domain (163,840 tokens per update) on one 80 GiB GPU: the largest ladder budget that divides
    the update (65536 does not) and fits: 40960 tokens, 4 accumulation steps."""
    monkeypatch.setattr(training_run, "cuda_memory_bytes", lambda: 80 * GIB)
    raw = tiny_raw(train_batch_size="auto", tokens_per_update=163840, model="base", model_overrides={})
    cfg = parse_training_config(raw, os.path.join(REPO, "configs"))
    choice = training_run.resolve_budget(cfg, 1)
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (40960, 4)
    assert choice.estimate is not None and choice.estimate.total <= budget.SAFE_FRACTION * 80 * GIB
    assert "(auto), estimated training memory" in choice.line() and "of the device's 80.0 GiB" in choice.line()


@pytest.mark.parametrize(
    "world, memory, budget_tokens, steps",
    [(1, None, 10240, 16), (8, None, 10240, 2), (1, 80, 40960, 4), (8, 80, 20480, 1)],
)
def test_the_base_recipe_sizes_its_micro_batch(
    monkeypatch: pytest.MonkeyPatch, world: int, memory: int, budget_tokens: int, steps: int
) -> None:
    """configs/pretrain-indomain-base.json (``"auto"``, 163,840 tokens per update) as docs/pretraining.md says: the
    recipe's 10240 on a CPU, sized from an 80 GiB GPU otherwise; the update stays 163,840 tokens."""
    monkeypatch.setattr(training_run, "cuda_memory_bytes", lambda: None if memory is None else memory * GIB)
    recipe = read_json(os.path.join(REPO, "configs", "pretrain-indomain-base.json"))
    budget_fields = {key: recipe[key] for key in ("train_batch_size", "tokens_per_update", "model")}
    cfg = parse_training_config(tiny_raw(**budget_fields, model_overrides={}), os.path.join(REPO, "configs"))
    training_run.resolve_budget(cfg, world)
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (budget_tokens, steps)
    assert budget_tokens * steps * world == 163840


@pytest.mark.parametrize(
    "preset, tokens, memory, expected",
    [
        ("base", 163840, 80, 40960),
        ("base", 163840, 141, 40960),
        ("base", 163840, 24, 32768),
        ("large", 393216, 80, 49152),
        ("large", 393216, 141, 65536),
        ("large", 393216, 24, 8192),
    ],
)
def test_auto_ladder(preset: str, tokens: int, memory: int, expected: int) -> None:
    config = UniterConfig.preset(preset)
    choice = budget.choose_budget(
        "auto", tokens, 1, 10240, (config, TASKS, pretraining_model_size(config)), memory * GIB
    )
    assert choice.budget == expected
    assert tokens % choice.budget == 0 and choice.accumulation == tokens // expected
    size, limit = pretraining_model_size(config), budget.SAFE_FRACTION * memory * GIB
    assert budget.training_memory(config, TASKS, expected, size).total <= limit
    for bigger in range(expected + budget.LADDER_STEP, budget.MAX_AUTO_TOKENS + 1, budget.LADDER_STEP):
        assert tokens % bigger or budget.training_memory(config, TASKS, bigger, size).total > limit, bigger


def test_auto_fails_when_nothing_fits() -> None:
    with pytest.raises(ConfigError, match='train_batch_size "auto": no multiple of 2048 tokens divides'):
        large = UniterConfig.preset("large")
        budget.choose_budget("auto", 163840, 1, 10240, (large, TASKS, pretraining_model_size(large)), 4 * GIB)


@pytest.mark.parametrize("layers_of", ["tiny", "base"])
def test_estimate_matches_the_saved_tensors(layers_of: str) -> None:
    """The estimate of the bytes autograd saves in a forward (bf16 autocast, fast path; the CPU's padded attention
    keeps its scores, counted) is within 10% of the measurement, on batches the calibration did not see (budget
    2048, epoch 1; bench/budget_calibration.py fits at 4096, epoch 0), for 2-layer models of each task."""
    overrides = {"hidden_size": 128, "intermediate_size": 256, "vocab_size": 128} if layers_of == "tiny" else {}
    config = UniterConfig.from_dict({**UniterConfig.preset(layers_of).to_dict(), **overrides, "num_hidden_layers": 2})
    torch.manual_seed(0)
    model = UniterForPretraining(config, fast=True)
    model.uniter.check_values = False
    size = pretraining_model_size(config)
    for task in TASKS:
        batch = corpus_batches(task, 2048, 1, epoch=1)[0]
        tokens = int((batch["txt_lens"] + batch["num_bbs"]).sum())
        measured = budget.forward_saved_bytes(model, batch, task)
        estimate = budget.saved_bytes(config, task, tokens, size, budget.padded_shape(batch))
        assert abs(estimate / measured - 1) < 0.10, (task, tokens, measured, estimate)


def test_recipe_configs_state_the_original_update() -> None:
    """10240 tokens x 2 steps x 8 GPUs (base) and 6144 x 4 x 16 (large), as docs/pretraining.md lists them; the base
    config sizes its micro-batch (``"auto"``), the large one keeps the original's."""
    for name, original, gpus, size in (("indomain-base", 10240, 8, "auto"), ("alldata-large", 6144, 16, 6144)):
        cfg = read_json(os.path.join(REPO, "configs", f"pretrain-{name}.json"), "config")
        ds = read_json(os.path.join(REPO, "configs", f"ds-{name}.json"), "ds")
        assert cfg["train_batch_size"] == size
        assert cfg["tokens_per_update"] == original * ds["gradient_accumulation_steps"] * gpus
        assert budget.accumulation_steps(cfg["tokens_per_update"], original, gpus) == ds["gradient_accumulation_steps"]


def test_a_run_trains_with_the_derived_accumulation(tmp_path) -> None:
    """pretrain.py, tiny, bundled data, 2 steps of 512-token micro-batches with tokens_per_update 1536 and ds.json's
    accumulation 1: the run logs and trains with 3 micro-batches per step (the checkpoint's ds config and stream)."""

    def edit(cfg: dict) -> None:
        cfg["tokens_per_update"] = 1536

    cfg_path, ds_path = write_configs(str(tmp_path), steps=2, grad_accum=1, edit=edit)
    proc = run(launcher("python"), cfg_path, ds_path)
    line = "token budget: train_batch_size=512 (configured), gradient_accumulation_steps=3 x 1 rank(s) -> "
    assert line + "tokens_per_update=1536" in proc.stderr
    with open(cfg_path, encoding="utf-8") as f:
        out = json.load(f)["output_dir"]
    state = torch.load(os.path.join(out, "ckpt", "step2", "mp_rank_00_model_states.pt"), weights_only=False)
    assert state["ds_config"]["gradient_accumulation_steps"] == 3
    assert state["stream"]["micro"] == 3
    assert sum(loader["position"] for loader in state["stream"]["loaders"].values()) == 2 * 3
