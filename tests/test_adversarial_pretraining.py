"""VILLA's adversarial pretraining (APT): the adversarial step of ``uniter_fast.training.adversarial`` on each
pretraining objective, on the packed (fast) and padded (reference) encoders; K = 0; the config block; a short run of
``pretrain.py`` with the block on."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from tests.pretrain_batches import task_batch
from tests.pretrain_runs import REPO, exported_weights, launcher, run, step_log, write_configs
from tests.test_adversarial import ModuleEngine, assert_steps_agree, run_step
from tests.test_adversarial_reuse import CountingEngine
from tests.test_pretrain_heads import tiny_model
from tests.test_tasks_e2e import finetune, write_config
from tests.test_tasks_e2e import step_log as finetune_steps
from uniter_fast.errors import ConfigError
from uniter_fast.pretraining.config import parse_training_config
from uniter_fast.pretraining.model import task_kind
from uniter_fast.tasks.vcr_pretrain import prepare_vcr_pretraining
from uniter_fast.training.adversarial import AdversarialConfig, AdversarialStep, parse_adversarial

OBJECTIVES = ["mlm", "mrfr", "mrc", "mrckl", "itm"]
SHAPES = ([6, 3, 9], [5, 8, 2])


def pretraining_models(task: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(fast model, reference model with the same weights, a batch of ``task``), dropout 0, in training mode."""
    torch.manual_seed(seed)
    ref = tiny_model(False).train()
    fast = tiny_model(True).train()
    fast.load_state_dict(ref.state_dict())
    return fast, ref, task_batch(task, *SHAPES, ref.config.vocab_size, seed=seed + 11)


@pytest.mark.parametrize("task", OBJECTIVES)
@pytest.mark.parametrize(
    "cfg",
    [
        AdversarialConfig(adv_modality="text+image", adv_lr_txt=1e-2, adv_lr_img=0.1, adv_max_norm=0.05),
        AdversarialConfig(adv_modality="alter", norm_type="linf", adv_lr_txt=1e-3, adv_lr_img=1e-2),
    ],
    ids=["text+image-l2-projected", "alter-linf"],
)
def test_fast_equals_reference_every_objective(task, cfg) -> None:
    fast, ref, batch = pretraining_models(task)
    got, want = run_step(fast, batch, cfg, task), run_step(ref, batch, cfg, task)
    # MRC-kl's loss (and so the perturbations' gradient) is about 1e-3 here: its fp32 rounding, relative to the
    # largest entry that L-inf divides by, is larger than the other objectives'
    assert_steps_agree(got, want, delta_atol=1e-4 if task == "mrckl" else 1e-5)
    out, _, trace = got
    assert len(trace) == cfg.adv_steps and all(math.isfinite(float(v)) for v in out.values())
    moved = {key for deltas in trace[-1]["deltas"] for key, delta in deltas.items() if delta.any()}
    assert moved == {"txt", "img"}  # both perturbations ascended (MRM: at the unmasked regions)
    if task == "mrfr":  # a regression: no KL
        assert float(out["adv_kl"]) == 0.0
    else:
        assert float(out["adv_kl"]) > 0.0


PADDED_KEYS = ("input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index", "txt_labels")


@pytest.mark.parametrize("task", OBJECTIVES)
def test_packed_only_batch_equals_both_layouts(task) -> None:
    """Pretraining's fast collate gives the packed layout only: the perturbations live in a [B, max_seqlen] grid
    there, and the step is the same as on a batch that also has the padded keys."""
    fast, _, batch = pretraining_models(task)
    packed_only = {k: v for k, v in batch.items() if k not in PADDED_KEYS + ("img_masks", "img_mask_tgt")}
    cfg = AdversarialConfig(adv_modality="text+image", adv_lr_txt=1e-2, adv_lr_img=0.1)
    (out_1, grads_1, trace_1), (out_2, grads_2, trace_2) = (
        run_step(fast, packed_only, cfg, task),
        run_step(fast, batch, cfg, task),
    )
    for key in out_2:
        torch.testing.assert_close(out_1[key], out_2[key], rtol=1e-6, atol=1e-7)
    for step_1, step_2 in zip(trace_1, trace_2):
        for key, want in step_2["deltas"][0].items():
            got = step_1["deltas"][0][key]
            assert not got[:, want.size(1) :].any()
            torch.testing.assert_close(got[:, : want.size(1)], want, rtol=1e-5, atol=1e-9)
    for name in grads_2:
        torch.testing.assert_close(grads_1[name], grads_2[name], rtol=1e-5, atol=1e-8, msg=name)


def test_kl_compares_the_objective_logits() -> None:
    """The logits of each objective: masked tokens x vocabulary, masked regions x classes, pairs x 2; MRFR none."""
    model = tiny_model(True)
    for task in OBJECTIVES:
        batch = task_batch(task, *SHAPES, model.config.vocab_size, seed=3)
        logits = model(batch, task, with_logits=True)["logits"]
        if task == "mrfr":
            assert logits is None
            continue
        packed = batch["packed"]
        want = {
            "mlm": (len(packed.get("mlm_index", [])), model.config.vocab_size),
            "mrc": (len(packed.get("mrm_index", [])), 1601),
            "mrckl": (len(packed.get("mrm_index", [])), 1601),
            "itm": (len(SHAPES[0]), 2),
        }[task]
        assert tuple(logits.shape) == want, task
        plain = model(batch, task)
        torch.testing.assert_close(model(batch, task, with_logits=True)["loss"], plain["loss"], rtol=0, atol=0)


@pytest.mark.parametrize("task", OBJECTIVES)
def test_zero_steps_is_a_plain_pretraining_step_exactly(task) -> None:
    fast, _, batch = pretraining_models(task)
    out, grads, trace = run_step(fast, batch, AdversarialConfig(adv_steps=0), task)
    fast.zero_grad()
    plain = fast(batch, task)
    plain["loss"].backward()
    assert trace == [] and torch.equal(out["loss"], plain["loss"])
    for name, param in fast.named_parameters():
        if param.grad is not None:
            assert torch.equal(grads[name], param.grad), name


def test_mrfr_step_is_the_sum_of_the_perturbed_task_losses() -> None:
    """Without a KL, the accumulated gradient is that of (1/K) sum_k MRFR(inputs + delta_k) at the traced deltas."""
    fast, _, batch = pretraining_models("mrfr")
    cfg = AdversarialConfig(adv_modality="text+image", adv_lr_txt=1e-2, adv_lr_img=0.1)
    _, grads, trace = run_step(fast, batch, cfg, "mrfr")
    fast.zero_grad()
    engine = ModuleEngine(fast)
    from uniter_fast.model.perturbation import with_deltas

    for record in trace:
        deltas = record["deltas"][0]
        out = engine(with_deltas(batch, deltas["txt"], deltas["img"]), "mrfr")
        (out["loss"] / cfg.adv_steps).backward()
    for name, param in fast.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("task", OBJECTIVES)
def test_mrfr_skips_the_clean_forward(task) -> None:
    """K + 1 forwards and K + 1 backwards (the last through the clean graph, for the KL) for the objectives with
    logits, K forwards and K engine backwards with the shared clean pass (plus its input-only backward); MRFR has no
    KL, so no clean forward: K forwards, K backwards either way."""
    fast, _, batch = pretraining_models(task)
    for reuse in (False, True):
        cfg = AdversarialConfig(adv_modality="text+image", adv_steps=3, reuse_clean_forward=reuse)
        engine = CountingEngine(fast)
        AdversarialStep(cfg, fast)(engine, batch, task)
        extra = 0 if task == "mrfr" or reuse else 1
        assert (engine.forwards, engine.backwards) == (cfg.adv_steps + extra, cfg.adv_steps + extra)
        # a KL weighed 0 has no clean forward either
        engine = CountingEngine(fast)
        AdversarialStep(dataclasses.replace(cfg, adv_kl_weights={task: 0}), fast)(engine, batch, task)
        assert (engine.forwards, engine.backwards) == (cfg.adv_steps, cfg.adv_steps)


@pytest.mark.parametrize("task", ["mlm", "mrckl", "itm"])
def test_a_kl_weighed_0_is_the_step_without_its_term(task) -> None:
    """Weight 0 skips the clean forward; with dropout 0 the step is the one that runs it and weighs the KL 1e-30."""
    fast, _, batch = pretraining_models(task)
    cfg = AdversarialConfig(adv_modality="alter", adv_lr_txt=1e-2, adv_lr_img=0.1)
    got = run_step(fast, batch, dataclasses.replace(cfg, adv_kl_weights={task: 0}), task)
    want = run_step(fast, batch, dataclasses.replace(cfg, adv_kl_weights={task: 1e-30}), task)
    assert float(got[0].pop("adv_kl")) == 0.0 < float(want[0].pop("adv_kl"))  # logged: the KL's value, unweighed
    assert_steps_agree(got, want)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("task", OBJECTIVES)
def test_the_shared_clean_pass_equals_the_default_step(task, fast) -> None:
    """``reuse_clean_forward`` in pretraining: through the fused MLM / MRM losses (fast path: their input-only
    backward keeps the stored gradients, ``kept_gradients``) and the reference losses, the step equals the default
    step (losses, perturbations after each ascent, accumulated gradients)."""
    models = pretraining_models(task)
    model, batch = models[0 if fast else 1], models[2]
    cfg = AdversarialConfig(adv_modality="alter", adv_lr_txt=1e-2, adv_lr_img=0.1)
    want = run_step(model, batch, cfg, task)
    got = run_step(model, batch, dataclasses.replace(cfg, reuse_clean_forward=True), task)
    assert_steps_agree(got, want, delta_atol=1e-4 if task == "mrckl" else 1e-5)


@pytest.mark.parametrize("task", ["mlm", "mrc", "mrckl", "itm"])
def test_kl_weight_per_objective(task) -> None:
    """``adv_kl_weights`` weighs the KL of the objective it names (a stream ``<objective>_<dataset>``) as a uniform
    ``adv_kl_weight`` of that value would, exactly, and leaves the other objectives at ``adv_kl_weight``."""
    fast, _, batch = pretraining_models(task)
    stream = f"{task}_synth"
    base = AdversarialConfig(adv_modality="text+image", adv_lr_txt=1e-2, adv_lr_img=0.1, adv_kl_weight=1.5)
    named = run_step(fast, batch, dataclasses.replace(base, adv_kl_weights={task: 0.25}), stream)
    other = run_step(fast, batch, dataclasses.replace(base, adv_kl_weights={"x": 0.25}), stream)
    for got, weight in ((named, 0.25), (other, 1.5)):
        want = run_step(fast, batch, dataclasses.replace(base, adv_kl_weight=weight), stream)
        assert all(torch.equal(got[0][key], want[0][key]) for key in want[0])
        assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][n], want[1][n]) for n in want[1])
    assert not torch.equal(named[0]["loss"], other[0]["loss"])  # the KL is in the loss: the weight changes it


VCR_BASE = 1000  # the tiny word table = the bundled VCR set's special_token_base


@pytest.mark.parametrize("task", ["mlm_vcr", "mrfr_vcr", "mrckl_vcr"])
def test_vcr_second_stage_fast_equals_reference(task) -> None:
    """APT on VCR's second-stage pretraining: the pretraining model with VCR's grown tables (4 type rows, tag words)
    and ``txt_type_ids`` in both layouts, its objectives named by stream (``mlm_vcr``, ...)."""
    fast, ref, batch = pretraining_models(task_kind(task))
    for model in (ref, fast):
        prepare_vcr_pretraining(model, VCR_BASE)
    fast.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(5)
    batch["txt_type_ids"] = torch.randint(0, 4, batch["input_ids"].shape, generator=gen)
    batch["packed"]["txt_type_ids"] = batch["txt_type_ids"][
        torch.arange(batch["input_ids"].size(1)) < batch["txt_lens"][:, None]
    ]
    cfg = AdversarialConfig(adv_modality="text+image", adv_lr_txt=1e-2, adv_lr_img=0.1)
    got, want = run_step(fast, batch, cfg, task), run_step(ref, batch, cfg, task)
    assert_steps_agree(got, want, delta_atol=1e-4 if task == "mrckl_vcr" else 1e-5)
    out, _, trace = got
    assert (float(out["adv_kl"]) == 0.0) == (task == "mrfr_vcr")
    assert all(deltas["txt"].any() and deltas["img"].any() for deltas in trace[-1]["deltas"])


def test_vcr_second_stage_runs_with_the_block(tmp_path) -> None:
    """``finetune.py`` on the bundled VCR second stage (``vcr_pretrain``) with the APT block: every step logs finite
    adversarial losses; the KL is 0 for MRFR (none) and for the objectives the block weighs 0 (the tiny block's
    MRC-kl), positive for the others."""
    block = villa_block()
    config = write_config(
        str(tmp_path), "vcr_pretrain", steps=4, edit=lambda c: c.update(adversarial=block, valid_steps=4)
    )
    proc = finetune(config)
    records = finetune_steps(config)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    without_kl = {"mrfr_vcr"} | {f"{name}_vcr" for name, weight in block["adv_kl_weights"].items() if weight == 0}
    for record in records:
        assert all(math.isfinite(record[k]) for k in ("loss", "adv_task_loss", "adv_kl")), record
        assert (record["adv_kl"] == 0.0) == (record["task"] in without_kl), record
    assert "final vcr_pretrain metrics after 4 steps" in proc.stdout


# ---------------------------------------------------------------------- the config block
def tiny_raw() -> dict:
    with open(os.path.join(REPO, "configs", "pretrain-tiny.json"), encoding="utf-8") as f:
        return json.load(f)


def test_config_block_is_optional_and_checked() -> None:
    assert parse_training_config(tiny_raw(), REPO).adversarial is None
    assert parse_training_config({**tiny_raw(), "adversarial": None}, REPO).adversarial is None
    cfg = parse_training_config({**tiny_raw(), "adversarial": {"adv_modality": "text+image"}}, REPO)
    assert cfg.adversarial == AdversarialConfig(adv_modality="text+image")
    with pytest.raises(ConfigError, match=r"^cfg.json: adversarial.norm_type must be one of \['l2', 'linf'\]"):
        parse_training_config({**tiny_raw(), "adversarial": {"norm_type": "l1"}}, REPO, "cfg.json")
    with pytest.raises(ConfigError, match=r"^cfg.json: unknown key\(s\) \['adv_step'\] in 'adversarial'"):
        parse_training_config({**tiny_raw(), "adversarial": {"adv_step": 3}}, REPO, "cfg.json")
    with pytest.raises(ConfigError, match="^cfg.json: capture true and an adversarial block: .*set capture false$"):
        parse_training_config({**tiny_raw(), "capture": True, "adversarial": {}}, REPO, "cfg.json")


def test_config_kl_weights_name_the_run_objectives() -> None:
    """``adv_kl_weights`` may name the run's objectives with logits (``mrckl``), not MRFR (no KL) nor an objective
    the run does not train (the tiny run has no ``mrc``)."""
    cfg = parse_training_config({**tiny_raw(), "adversarial": {"adv_kl_weights": {"mrckl": 0}}}, REPO)
    assert (cfg.adversarial.kl_weight("mrckl"), cfg.adversarial.kl_weight("mlm")) == (0, 1.5)
    for name in ("mrfr", "mrc"):
        with pytest.raises(ConfigError, match=rf"^cfg.json: adversarial.adv_kl_weights names \['{name}'\], which "):
            parse_training_config({**tiny_raw(), "adversarial": {"adv_kl_weights": {name: 0}}}, REPO, "cfg.json")


def test_villa_pretraining_configs_differ_from_theirs_only_by_the_block() -> None:
    for size in ("tiny", "indomain-base"):
        with open(os.path.join(REPO, "configs", f"pretrain-{size}-villa.json"), encoding="utf-8") as f:
            villa = json.load(f)
        with open(os.path.join(REPO, "configs", f"pretrain-{size}.json"), encoding="utf-8") as f:
            plain = json.load(f)
        block = parse_adversarial(villa.pop("adversarial"), size)
        # the bundled corpus's MRC-kl loss (~4e-4) is drowned by a KL term (docs/villa.md): the tiny run weighs it 0
        kl_weights = {"mrckl": 0} if size == "tiny" else {}
        assert block == AdversarialConfig(adv_modality="text+image", adv_kl_weights=kl_weights)
        run_keys = {"output_dir", "num_train_steps", "phases", "valid_steps", "save_steps"}  # the tiny run is short
        # the base recipe sizes its micro-batch ("auto"); the VILLA one keeps the original's 10240 (the memory
        # estimate does not count adversarial pretraining's second graph), with the same tokens_per_update
        run_keys.add("train_batch_size")
        assert {k: v for k, v in villa.items() if k not in run_keys} == {
            k: v for k, v in plain.items() if k not in run_keys
        }
    assert parse_training_config(tiny_raw() | {"adversarial": villa_block()}, REPO).adversarial is not None


def villa_block() -> dict:
    with open(os.path.join(REPO, "configs", "pretrain-tiny-villa.json"), encoding="utf-8") as f:
        return json.load(f)["adversarial"]


# ---------------------------------------------------------------------- a run of pretrain.py
def test_pretrain_runs_with_the_block(tmp_path) -> None:
    steps = 6

    def edit(cfg: dict) -> None:
        cfg["adversarial"] = villa_block()

    cfg, ds = write_configs(str(tmp_path), steps=steps, edit=edit)
    proc = run(launcher("python"), cfg, ds)
    records = step_log(cfg)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert {"loss", "adv_task_loss", "adv_kl"} <= set(record), record
        assert all(math.isfinite(record[k]) for k in ("loss", "adv_task_loss", "adv_kl")), record
    assert "final metrics after 6 steps" in proc.stdout


def test_resume_with_the_block_is_exact(tmp_path) -> None:
    """``pretrain.py`` with APT (``alter``, random initial perturbations: every RNG draw matters; the five objectives
    mixed, MRFR without its clean forward) stopped after step 3 and resumed logs and exports exactly what the
    uninterrupted run does."""
    steps = 6

    def edit(cfg: dict) -> None:
        cfg.update(save_steps=2)
        cfg["adversarial"] = {**villa_block(), "adv_modality": "alter", "adv_init_mag": 1e-3}
        # MRFR, the objectives with logits, MRFR again: both kinds of step on both sides of the cut after step 3
        others = {f"{t}_synth": 1 for t in ("mlm", "mrc", "mrckl", "itm")}
        cfg["phases"] = [
            {"steps": 2, "mix": {"mrfr_synth": 1}},
            {"steps": 2, "mix": others},
            {"mix": {"mrfr_synth": 1}},
        ]

    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    configs = [write_configs(str(d), steps=steps, edit=edit) for d in (whole, split)]
    run(launcher("python"), *configs[0])
    run(launcher("python"), *configs[1], extra=("--stop_after", "3"))
    run(launcher("python"), *configs[1], extra=("--resume",))
    records = step_log(configs[0][0])
    assert records == step_log(configs[1][0])
    tasks = [r["task"] for r in records]
    assert tasks[:2] == tasks[4:] == ["mrfr_synth"] * 2 and "mrfr_synth" not in tasks[2:4], tasks
    got, want = (exported_weights(str(d / "out")) for d in (split, whole))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
