"""``python -m uniter_fast.evaluate --benchmark DIR``: a benchmark folder made of the bundled sets (symlinked into the
paper's layout) and tiny task checkpoints; every measured cell must equal what ``evaluate --checkpoint`` gives for
the same checkpoint and databases, absent rows show "-", server rows name a file in the server's format."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
import torch

from tests.cli_helpers import run_cli
from tests.damage_helpers import write_jsonl, write_npz_dir
from tests.tasks_helpers import export_task_model
from uniter_fast.benchmark import PAPER_TABLE
from uniter_fast.config import UniterConfig
from uniter_fast.data.build import build_dbs
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TxtTokLmdb
from uniter_fast.evaluate import main as evaluate
from uniter_fast.finetuning.config import default_config, load_finetune_config
from uniter_fast.model import UniterModel
from uniter_fast.tasks import get_task
from uniter_fast.tasks.bundled import resolve_bundled, task_sets
from uniter_fast.tasks.data import DbCache

# benchmark folder -> (task, {split folder: (bundled txt_db, bundled img_db(s))})
LAYOUT = {
    "vqa": ("vqa", {"test": ("vqa/txt_test", {"img": "pool/img_det"})}),
    "nlvr2": ("nlvr2", {"dev": ("nlvr2/txt_val", {"img": "pool/img_det"}),
                        "test1": ("nlvr2/txt_test", {"img": "pool/img_det"})}),
    "refcoco+": ("re", {"val": ("re/txt_val", {"img": "pool/img_det", "img_gt": "pool/img_gt"})}),
}  # fmt: skip
NOISE = 0.05  # the exports' parameters are perturbed off the init: every score differs
ITM_TEXTS = 12  # Flickr30K: a small caption db built from the bundled test captions (the bundled one is 750 x 150)


def _link(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(target, link)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """The benchmark folder: bundled dbs linked in, a fresh tiny checkpoint per task, a pretrained encoder."""
    sets = task_sets()
    root = str(tmp_path_factory.mktemp("benchmark"))
    vocab_size = len(WordPiece(os.path.join(sets, "vocab.txt")).vocab)
    config = UniterConfig.tiny(vocab_size=vocab_size)
    for bench, (task_name, splits) in LAYOUT.items():
        for split, (txt, imgs) in splits.items():
            _link(resolve_bundled(f"bundled:{txt}"), os.path.join(root, bench, split, "txt"))
            for name, img in imgs.items():
                _link(os.path.join(sets, img), os.path.join(root, bench, split, name))
        task = get_task(task_name)
        cfg = load_finetune_config(default_config(task_name), checkpoint_given=True)
        txt_paths = [os.path.join(root, bench, split, "txt") for split in splits]
        options = task.data_options(DbCache(cfg), txt_paths, {})
        export_task_model(task_name, options, config, os.path.join(root, bench, "checkpoint"), len(bench), NOISE)
    _small_itm_set(os.path.join(root, "flickr30k", "test"), str(tmp_path_factory.mktemp("itm")), config)
    torch.manual_seed(7)
    UniterModel(config).save_pretrained(os.path.join(root, "pretrained"))
    return root


def _small_itm_set(out: str, work: str, config: UniterConfig) -> None:
    """A caption db of the first bundled ITM test captions over random features of their images, and a fine-tuned
    retrieval checkpoint beside it."""
    txt = TxtTokLmdb(resolve_bundled("bundled:itm/txt_test"), -1)
    with open(os.path.join(task_sets(), "vocab.txt"), encoding="utf-8") as f:
        words = f.read().split("\n")
    captions = []
    for id_ in sorted(txt.id2len)[:ITM_TEXTS]:
        record = txt[id_]
        caption = " ".join(words[i] for i in record["input_ids"]).replace(" ##", "")
        captions.append({"id": id_, "image": record["img_fname"], "caption": caption})
    images = sorted({c["image"][: -len(".npz")] for c in captions})
    write_npz_dir(os.path.join(work, "feats"), images)
    build_dbs(write_jsonl(os.path.join(work, "captions.jsonl"), captions), os.path.join(work, "feats"),
              os.path.join(task_sets(), "vocab.txt"), out)  # fmt: skip
    export_task_model("itm", {}, config, os.path.join(os.path.dirname(out), "checkpoint"), 3, NOISE)


def _single(folder: str, bench: str, split: str, img: str, tmp_path: Any) -> dict[str, float]:
    """The metrics of ``evaluate --checkpoint`` on one split of the folder."""
    out_dir = str(tmp_path / f"single-{bench}-{split}-{os.path.basename(img)}")
    argv = ["--checkpoint", os.path.join(folder, bench, "checkpoint"), "--split", split, "--output_dir", out_dir,
            "--txt_db", os.path.join(folder, bench, split, "txt"), "--img_db", img]  # fmt: skip
    return evaluate(argv)[split]


def test_table_matches_single_evaluations(folder: str, tmp_path: Any) -> None:
    status, out, err = run_cli(evaluate, ["--benchmark", folder])
    assert status == 0, err
    cells = {}
    for line in out.splitlines():
        for row in PAPER_TABLE:
            if line.startswith(row.label + "  "):
                cells[row.label] = re.split(r"\s{2,}", line.strip())[-1]
    assert set(cells) == {row.label for row in PAPER_TABLE}, out
    # absent benchmarks: "-"
    for label in ("SNLI-VE val", "COCO IR R@1/5/10", "RefCOCOg val", "VCR test Q->A / QA->R / Q->AR"):
        assert cells[label] == "-", (label, out)
    # present ones: the figures of the single-checkpoint evaluation, in percent
    singles = {
        "NLVR2 dev": ("nlvr2", "dev", "img"),
        "NLVR2 test-P": ("nlvr2", "test1", "img"),
        "RefCOCO+ val": ("refcoco+", "val", "img_gt"),
        "RefCOCO+ val^d": ("refcoco+", "val", "img"),
        "Flickr30K IR R@1/5/10": ("flickr30k", "test", "img"),
    }
    expected = {
        label: _single(folder, bench, split, os.path.join(folder, bench, split, img), tmp_path)
        for label, (bench, split, img) in singles.items()
    }
    metric_rows = {row.label: row for row in PAPER_TABLE}
    for label, metrics in expected.items():
        want = " / ".join(f"{100 * metrics[m]:.2f}" for m in metric_rows[label].metrics)
        assert cells[label] == want, (label, cells[label], want)
    assert cells["RefCOCO+ val"] != cells["RefCOCO+ val^d"]  # GT and detected boxes are two evaluations
    # zero-shot rows: the pretrained encoder, not the fine-tuned checkpoint
    assert cells["Flickr30K zero-shot IR R@1/5/10"] not in ("-", cells["Flickr30K IR R@1/5/10"])
    # the server rows name VQA's results file: [{question_id, answer}] for every test question
    for label in ("VQA test-dev", "VQA test-std"):
        assert cells[label].startswith("server: "), cells[label]
    path = cells["VQA test-dev"][len("server: ") :]
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    assert results and all(set(r) == {"question_id", "answer"} for r in results)
    assert len({r["question_id"] for r in results}) == len(results)


def test_benchmark_errors(folder: str, tmp_path: Any) -> None:
    status, _, err = run_cli(evaluate, ["--benchmark", folder, "--task", "vqa"])
    assert status == 2 and "--benchmark" in err and "--task" in err and len(err.strip().splitlines()) == 1, err
    status, _, err = run_cli(evaluate, ["--benchmark", str(tmp_path)])
    assert status == 2 and "no benchmark of the paper's table" in err, err
    status, _, err = run_cli(evaluate, ["--benchmark", str(tmp_path) + "/"])  # as the README writes it: benchmark/
    assert status == 2 and f"{tmp_path}/nlvr2/checkpoint" in err and "//" not in err, err
    status, _, err = run_cli(evaluate, [])
    assert status == 2 and "--checkpoint" in err and "--benchmark" in err, err
