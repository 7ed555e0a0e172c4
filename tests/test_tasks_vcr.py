"""VCR and its second-stage pretraining: original keys and grown tables, the head and loss against hand-written
formulas, the sequences' type ids as the original builds them, original / pretrained / second-stage checkpoints,
fast vs reference, Q->A / QA->R / Q->AR on hand-computed scores, the results files, the builder, and learning."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from tests.tasks_helpers import (
    compare_fast_reference,
    encoder_keys,
    encoder_rows,
    learn_subset,
    original_checkpoint,
    perturb,
    random_batch,
    tiny_config,
)
from tests.test_tasks_vqa import _npz_dir
from uniter_fast.build import main as build_main
from uniter_fast.data.tokenizer import SPECIAL_TOKENS
from uniter_fast.data.vcr_db import VcrTxtTokLmdb
from uniter_fast.errors import DataError
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.tasks import get_task
from uniter_fast.tasks.bundled import resolve_bundled
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.data import DbCache
from uniter_fast.tasks.vcr import UniterForVisualCommonsenseReasoning, VcrDataset, prepare_vcr_tables, vcr_scores
from uniter_fast.tasks.vcr_pretrain import VcrPretrainDataset, prepare_vcr_pretraining

SETTINGS = type("S", (), dict(max_txt_len=220, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36))()
HEAD_KEYS = [f"vcr_output.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")]
BASE = 1000  # the tiny model's word table = the bundled VCR set's special_token_base


def model(fast: bool = False, seed: int = 0) -> UniterForVisualCommonsenseReasoning:
    torch.manual_seed(seed)
    net = UniterForVisualCommonsenseReasoning(tiny_config(), fast=fast)
    prepare_vcr_tables(net, BASE)
    return perturb(net)


def vcr_batch(seed: int = 0) -> dict:
    batch = random_batch([(6, 4), (9, 7), (3, 10), (12, 2)], seed, vocab=BASE + 81, txt_types=None)
    gen = torch.Generator().manual_seed(seed)
    batch["txt_type_ids"] = torch.randint(0, 4, batch["input_ids"].shape, generator=gen)
    batch["packed"]["txt_type_ids"] = batch["txt_type_ids"][batch["input_ids"] != 0]
    batch["targets"] = torch.tensor([1, 0, 0, 1])
    return batch


def test_keys_and_grown_tables() -> None:
    net = model()
    assert list(net.state_dict()) == encoder_keys(tiny_config()) + HEAD_KEYS
    emb = net.uniter.embeddings
    assert emb.token_type_embeddings.weight.shape == (4, 64) and emb.word_embeddings.weight.shape == (BASE + 81, 64)
    assert net.config.type_vocab_size == 4 and net.config.vocab_size == BASE + 81


def test_init_embeddings_copy_the_original_rows() -> None:
    torch.manual_seed(0)
    net = perturb(UniterForVisualCommonsenseReasoning(tiny_config()))
    types = net.uniter.embeddings.token_type_embeddings.weight.detach().clone()
    words = net.uniter.embeddings.word_embeddings.weight.detach().clone()
    prepare_vcr_tables(net, BASE)
    new_types = net.uniter.embeddings.token_type_embeddings.weight
    torch.testing.assert_close(new_types, types[[0, 1, 0, 0]])  # answer / rationale start as the text type
    new_words = net.uniter.embeddings.word_embeddings
    torch.testing.assert_close(new_words.weight[:BASE], words)
    assert abs(float(new_words.weight[BASE:].detach().std()) - 0.02) < 0.005 and new_words.padding_idx == 0
    prepare_vcr_tables(net, BASE)  # already grown: kept as is
    assert new_words.weight.shape[0] == BASE + 81
    with pytest.raises(ValueError, match="special_token_base.*needs 28996 words.*has 1081"):
        prepare_vcr_tables(net, 28996)


def test_a_smaller_pretrained_word_table_grows_to_the_tags() -> None:
    """A pretraining export with fewer words than the db's ``special_token_base`` (the default demo export has 128,
    the bundled VCR set's tags start at 1000): rows up to the base, then the 81 tags, the old rows kept."""
    torch.manual_seed(0)
    net = perturb(UniterForVisualCommonsenseReasoning(tiny_config(vocab_size=128)))
    words = net.uniter.embeddings.word_embeddings.weight.detach().clone()
    prepare_vcr_tables(net, BASE)
    new_words = net.uniter.embeddings.word_embeddings.weight
    assert new_words.shape[0] == BASE + 81 and net.config.vocab_size == BASE + 81
    torch.testing.assert_close(new_words[:128], words)


def test_scores_and_loss_match_the_formulas() -> None:
    net = model().double()
    batch = vcr_batch()
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    p = dict(net.named_parameters())
    pooled = torch.tanh(
        encoder_rows(net, batch)[:, 0] @ p["uniter.pooler.dense.weight"].T + p["uniter.pooler.dense.bias"]
    )
    h = torch.relu(pooled @ p["vcr_output.0.weight"].T + p["vcr_output.0.bias"])
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-12)
    logits = (h * p["vcr_output.2.weight"] + p["vcr_output.2.bias"]) @ p["vcr_output.3.weight"].T
    logits = logits + p["vcr_output.3.bias"]
    torch.testing.assert_close(net(batch, compute_loss=False)["scores"], logits[:, 1:], rtol=1e-9, atol=1e-9)
    expected = -torch.log_softmax(logits, 1)[torch.arange(4), batch["targets"]].mean()
    torch.testing.assert_close(net(batch)["loss"].double(), expected, rtol=1e-6, atol=1e-9)


def test_fast_path_matches_reference() -> None:
    compare_fast_reference(lambda fast: model(fast=fast), vcr_batch())


def test_checkpoints_original_pretrained_and_second_stage(tmp_path) -> None:
    h, task, options = tiny_config().hidden_size, get_task("vcr"), {"special_token_base": BASE}
    shapes = {
        "vcr_output.0.weight": (2 * h, h),
        "vcr_output.0.bias": (2 * h,),
        "vcr_output.2.weight": (2 * h,),
        "vcr_output.2.bias": (2 * h,),
        "vcr_output.3.weight": (2, 2 * h),
        "vcr_output.3.bias": (2,),
    }
    state = original_checkpoint(tiny_config(), shapes, type_rows=4, extra_words=81)
    torch.save(state, tmp_path / "model_step_8000.pt")
    net, _ = load_task_model(task, str(tmp_path / "model_step_8000.pt"), options)
    for key, value in state.items():
        torch.testing.assert_close(net.state_dict()[key], value.float(), msg=key)
    pretrained = perturb(UniterForPretraining(tiny_config()))
    torch.save(pretrained.state_dict(), tmp_path / "uniter.pt")
    net, _ = load_task_model(task, str(tmp_path / "uniter.pt"), options)
    torch.testing.assert_close(
        net.uniter.embeddings.token_type_embeddings.weight,
        pretrained.uniter.embeddings.token_type_embeddings.weight[[0, 1, 0, 0]],
    )
    second = UniterForPretraining(tiny_config())
    prepare_vcr_pretraining(perturb(second), BASE)
    torch.save(second.state_dict(), tmp_path / "vcr_pretrain.pt")
    net, _ = load_task_model(task, str(tmp_path / "vcr_pretrain.pt"), options)
    torch.testing.assert_close(
        net.uniter.state_dict()["embeddings.word_embeddings.weight"], second.uniter.embeddings.word_embeddings.weight
    )


def test_second_stage_model_grows_the_mlm_head_tied() -> None:
    net = perturb(UniterForPretraining(tiny_config()))
    bias = net.cls.predictions.bias.detach().clone()
    prepare_vcr_pretraining(net, BASE)
    assert net.cls.predictions.decoder.weight is net.uniter.embeddings.word_embeddings.weight
    assert net.cls.predictions.bias.shape == (BASE + 81,)
    torch.testing.assert_close(net.cls.predictions.bias[:BASE], bias)
    assert torch.all(net.cls.predictions.bias[BASE:] == 0)


def test_metrics_on_hand_computed_scores(tmp_path) -> None:
    task = get_task("vcr")
    val = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]])
    batch = {"qa_targets": torch.tensor([1, 2]), "qar_targets": torch.tensor([2, 1]), "qids": ["val-3", "val-1"]}
    sums, preds = task.eval_batch(lambda b, t, compute_loss: {"scores": val.reshape(-1, 1)}, batch, {})
    metrics = task.metrics(sums, preds)
    assert metrics["acc_qa"] == 0.5 and metrics["acc_qar"] == 1.0 and metrics["acc_q_ar"] == 0.5
    qa_loss = -torch.log_softmax(val[:, :4], 1)[torch.arange(2), batch["qa_targets"]].mean()
    assert metrics["loss_qa"] == pytest.approx(float(qa_loss))
    test = torch.zeros(2, 20)
    test[0, 1] = test[1, 0] = 5.0  # answers: 1 (right), 0 (wrong)
    test[0, 4 + 4 * 1 + 2] = 5.0  # right answer's rationale 2 (right)
    test[1, 4 + 4 * 2 + 3] = 5.0  # right answer (2)'s rationale 3 (wrong: 1 is right)
    qa, qar = vcr_scores(test, batch["qa_targets"])
    assert qar.argmax(1).tolist() == [2, 3] and qa.argmax(1).tolist() == [1, 0]
    sums, preds = task.eval_batch(lambda b, t, compute_loss: {"scores": test.reshape(-1, 1)}, batch, {})
    assert task.metrics(sums, preds)["acc_q_ar"] == 0.5 and task.metrics(sums, preds)["acc_qar"] == 0.5
    json_path, csv_path = task.write_predictions(preds, str(tmp_path), "results")
    assert json.load(open(json_path))["val-3"] == test[0].tolist()
    rows = list(csv.reader(open(csv_path)))
    assert rows[0][:6] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3", "rationale_conditioned_on_a0_0"]
    assert rows[0][-1] == "rationale_conditioned_on_a3_3" and [r[0] for r in rows[1:]] == ["val-1", "val-3"]


def _vcr_vocab(path) -> str:
    words = ["what", "color", "is", "?", "red", "blue", "green", "white", "the", "one", "left", "of", "above"]
    path.write_text("\n".join(SPECIAL_TOKENS + ["!"] + words) + "\n")
    return str(path)


def _vcr_annotations(path, labels=(2, 1)) -> None:
    record = {
        "annot_id": "val-0",
        "image": "im0",
        "question": ["what", "color", "is", [1], "?"],
        "answer_choices": [[[1], "is", c] for c in ("red", "blue", "green", "white")],
        "rationale_choices": [
            ["the", "one", [1], "is", "left", "of", [0, 2]],
            ["the", "one", [1], "is", "above"],
            ["the", "one"],
            ["the", "one", "is", "red"],
        ],
        "answer_label": labels[0],
        "rationale_label": labels[1],
    }
    path.write_text(json.dumps(record) + "\n")


def _vcr_db(tmp_path):
    _npz_dir(tmp_path / "det", ["im0"])
    _npz_dir(tmp_path / "gt", ["im0"], seed=1)
    _vcr_annotations(tmp_path / "vcr.jsonl")
    args = [
        "--task",
        "vcr",
        "--annotations",
        str(tmp_path / "vcr.jsonl"),
        "--features",
        str(tmp_path / "det"),
        "--gt_features",
        str(tmp_path / "gt"),
        "--vocab",
        _vcr_vocab(tmp_path / "vocab.txt"),
        "--special_token_base",
        str(BASE),
    ]
    build_main([*args, "--out", str(tmp_path / "db")])
    return args


def test_builder_tags_and_sequences_as_the_original(tmp_path) -> None:
    args = _vcr_db(tmp_path)
    db = str(tmp_path / "db" / "txt")
    record = VcrTxtTokLmdb(db)["val-0"]
    vocab = (tmp_path / "vocab.txt").read_text().split()
    q = [vocab.index("what"), vocab.index("color"), vocab.index("is"), BASE + 1, vocab.index("?")]
    assert record["input_ids"] == q and record["input_ids_rs"][0][-2:] == [BASE, BASE + 2]
    assert record["qa_target"] == 2 and record["img_fname"] == ["im0.npz", "im0.npz"]
    dbs = DbCache(SETTINGS)
    gt, det = dbs.img(str(tmp_path / "db" / "img_gt"), gt=True), dbs.img(str(tmp_path / "db" / "img"))
    a, r = record["input_ids_as"], record["input_ids_rs"]
    qa = VcrDataset(dbs.txt(VcrTxtTokLmdb, db, True, task="qa"), gt, det)[0]
    assert qa["targets"] == [0, 0, 1, 0]
    first = qa["rows"][0]
    assert first["input_ids"].tolist() == [2, *q, 3, *a[0], 3]  # [CLS]=2, [SEP]=3 in this vocab
    assert first["txt_type_ids"].tolist() == [0] + [0] * 5 + [2] * (len(a[0]) + 2)  # train_vcr: [0]+q+[2]*(a+2)
    assert first["img_feat"].shape[0] == 12 + det.name2nbb["im0.npz"]  # GT boxes first, then detected
    qar = VcrDataset(dbs.txt(VcrTxtTokLmdb, db, True, task="qar"), gt, det)[0]
    assert qar["targets"] == [0, 1, 0, 0]
    second = qar["rows"][1]
    assert second["input_ids"].tolist() == [2, *q, 3, *a[2], 3, *r[1], 3]
    assert second["txt_type_ids"].tolist() == [0] + [0] * 5 + [2] * (len(a[2]) + 1) + [3] * (len(r[1]) + 2)
    evaluation = VcrDataset(dbs.txt(VcrTxtTokLmdb, db, False, task="qa,qar"), gt, det, eval_mode="test")[0]
    assert len(evaluation["rows"]) == 20 and evaluation["rows"][4 + 4 * 1 + 1]["input_ids"].tolist() == [
        2,
        *q,
        3,
        *a[1],
        3,
        *r[1],
        3,
    ]
    pretrain = VcrPretrainDataset(dbs.txt(VcrTxtTokLmdb, db, True, task="qar"), gt, det, "mlm", 0.15, seed=0)[0]
    text = [2, *q, 3, *a[2], 3, *r[1], 3]
    masked = pretrain["input_ids"].tolist()
    labels = pretrain["txt_labels"].tolist()
    assert len(masked) == len(text) and [t if lab == -1 else lab for t, lab in zip(masked, labels)] == text
    types = [0] + [0] * 5 + [0] + [2] * len(a[2]) + [2] + [3] * len(r[1]) + [3]  # pretrain_vcr.py's types
    assert pretrain["txt_type_ids"].tolist() == types
    spans = [(1, 6), (7, 7 + len(a[2])), (8 + len(a[2]), len(text) - 1)]  # q, a, r: each has a masked token
    assert all(any(lab != -1 for lab in labels[s:e]) for s, e in spans)
    assert labels[0] == labels[6] == labels[7 + len(a[2])] == labels[-1] == -1
    _vcr_annotations(tmp_path / "vcr.jsonl")
    record = json.loads((tmp_path / "vcr.jsonl").read_text())
    record["answer_choices"] = record["answer_choices"][:3]
    (tmp_path / "vcr.jsonl").write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"vcr.jsonl line 1: field 'answer_choices' must hold 4 choices, got 3"):
        build_main([*args, "--out", str(tmp_path / "db2")])


def test_second_stage_batches_run_the_pretraining_losses(tmp_path) -> None:
    _vcr_db(tmp_path)
    dbs = DbCache(SETTINGS)
    txt = dbs.txt(VcrTxtTokLmdb, str(tmp_path / "db" / "txt"), True, task="qar")
    gt, det = dbs.img(str(tmp_path / "db" / "img_gt"), gt=True), dbs.img(str(tmp_path / "db" / "img"))

    def build(fast: bool) -> UniterForPretraining:
        torch.manual_seed(0)
        net = UniterForPretraining(tiny_config(), fast=fast)
        prepare_vcr_pretraining(net, BASE)
        return perturb(net)

    for kind in ("mlm", "mrfr", "mrckl"):
        dataset = VcrPretrainDataset(txt, gt, det, kind, 0.3, seed=0)
        batch = dataset.collate([dataset[0], dataset[0]])
        assert batch["txt_type_ids"].shape == batch["input_ids"].shape
        fast, reference = build(True), build(False)
        reference.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast(batch, kind)["loss"], reference(batch, kind)["loss"], rtol=1e-5, atol=1e-6)


def test_learns_a_subset_of_the_bundled_set() -> None:
    """300 steps fit 32 bundled Q->A examples: the right answer scores highest for >= 80 % (chance 1/4)."""
    dbs = DbCache(SETTINGS)
    txt = dbs.txt(VcrTxtTokLmdb, resolve_bundled("bundled:vcr/txt_train"), True, task="qa")
    gt, det = dbs.img(resolve_bundled("bundled:pool/img_gt"), gt=True), dbs.img(resolve_bundled("bundled:pool/img_det"))
    dataset = VcrDataset(txt, gt, det)
    torch.manual_seed(0)
    net = UniterForVisualCommonsenseReasoning(tiny_config())
    prepare_vcr_tables(net, txt.special_token_base)
    losses = learn_subset(net, dataset, examples=32, steps=300, batch=8)
    batch = dataset.collate([dataset[i] for i in range(32)])
    with torch.no_grad():
        scores = net(batch, compute_loss=False)["scores"].reshape(32, 4)
    accuracy = float((scores.argmax(1) == batch["targets"].reshape(32, 4).argmax(1)).float().mean())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert accuracy >= 0.8, accuracy


def test_second_stage_starts_from_a_pretraining_checkpoint_heads_included(tmp_path) -> None:
    pretrained = perturb(UniterForPretraining(tiny_config()))
    torch.save(pretrained.state_dict(), tmp_path / "uniter.pt")
    net, _ = load_task_model(get_task("vcr_pretrain"), str(tmp_path / "uniter.pt"), {"special_token_base": BASE})
    for key in ("itm_output.weight", "region_classifier.net.3.weight", "cls.predictions.transform.dense.weight"):
        torch.testing.assert_close(net.state_dict()[key], pretrained.state_dict()[key], msg=key)
    torch.testing.assert_close(net.cls.predictions.bias[:BASE], pretrained.cls.predictions.bias)
    assert net.uniter.embeddings.word_embeddings.weight.shape[0] == BASE + 81
    assert net.cls.predictions.decoder.weight is net.uniter.embeddings.word_embeddings.weight


def test_training_stream_concatenates_qa_and_qar() -> None:
    """finetune.py's VCR training data: the Q->A and the QA->R dataset of the bundled db as one (the original's
    ConcatDatasetWithLens), batched by the TaskLoader; both kinds of sequence reach the batches."""
    from uniter_fast.finetuning.config import default_config, load_finetune_config
    from uniter_fast.finetuning.data import train_stream
    from uniter_fast.training.run import Run

    cfg = load_finetune_config(default_config("vcr"))
    task, dbs = get_task("vcr"), DbCache(cfg)
    options = {**cfg.options, **task.data_options(dbs, list(cfg.train_txt_dbs), cfg.options)}
    streams = task.train_streams(dbs, cfg.train_pairs(), options, cfg.seed)
    assert list(streams) == ["vcr"] and streams["vcr"][1] == 1
    dataset = streams["vcr"][0]
    qa, qar = dataset.parts
    assert len(dataset) == len(qa) + len(qar) and dataset.lens.tolist() == [*qa.lens.tolist(), *qar.lens.tolist()]
    last = dataset[len(dataset) - 1]
    want = qar[len(qar) - 1]["rows"]
    assert [r["input_ids"].tolist() for r in last["rows"]] == [r["input_ids"].tolist() for r in want]
    types = set()
    run = Run(rank=0, world=1, num_workers=0, ds_config={"gradient_accumulation_steps": 1})
    for _, (_, batch) in zip(range(6), train_stream(task, cfg, dbs, options, run)):
        assert batch["txt_type_ids"].shape == batch["input_ids"].shape and "packed" in batch
        types |= set(batch["txt_type_ids"].unique().tolist())
    assert 3 in types  # rationale tokens: QA->R sequences were drawn
