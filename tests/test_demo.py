"""The browser demo, ``python -m uniter_fast.demo``: its checkpoint arguments and errors, what a click computes, and
the served page driven by a real headless Chromium (Debian's ``chromium`` and ``chromium-driver`` packages, through
Selenium): the page loads, a photo is uploaded, a question is asked and the pipeline's answer appears; the RE box
and the alignment picture come back as images.

``UNITER_FAST_DEMO_SCREENSHOT=docs/demo.png`` also saves the screenshot of the answered page (docs/own-images.md)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.cli_helpers import run_cli
from tests.extract_helpers import TINY, TINY_CLI, photo_paths, tiny_weights
from tests.tasks_helpers import export_task_model
from uniter_fast import Pipeline, UniterConfig
from uniter_fast.data.tokenizer import build_vocab
from uniter_fast.demo.answers import align, ask, lines_of
from uniter_fast.demo.cli import checkpoint_tasks, main
from uniter_fast.demo.render import BOX_COLOUR, draw_box, summary
from uniter_fast.extract import Extractor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is the woman wearing ?"
EXPRESSION = "the woman on the left"
VQA_ANSWERS = {"cup": 0, "cat": 1, "uniform": 2, "yes": 3, "no": 4}
INSTALL_BROWSER = "apt-get install -y chromium chromium-driver (Debian; .ci/run does it)"
SCREENSHOT_ENV = "UNITER_FAST_DEMO_SCREENSHOT"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """A random tiny detector, a vocabulary and tiny fine-tuned vqa, itm and re exports."""
    root = tmp_path_factory.mktemp("demo")
    weights = str(root / "tiny-milvlg.pth")
    torch.save(tiny_weights("milvlg"), weights)
    vocab = str(root / "vocab.txt")
    size = build_vocab([QUESTION, EXPRESSION, "A woman in a uniform .", *VQA_ANSWERS], vocab)
    given = {"vqa": {"ans2label_table": VQA_ANSWERS, "num_answers": len(VQA_ANSWERS)}, "itm": {}, "re": {}}
    config = UniterConfig.tiny(vocab_size=size)
    exports = {name: export_task_model(name, o, config, str(root / f"finetuned-{name}")) for name, o in given.items()}
    return dict(root=root, weights=weights, vocab=vocab, exports=exports, photo=photo_paths()[0])


def pipeline(world: dict, task: str) -> Pipeline:
    extractor = Extractor(world["weights"], config=TINY)
    return Pipeline.from_pretrained(task, world["exports"][task], extractor, world["vocab"])


def test_checkpoints_by_task_json_or_task_prefix(world) -> None:
    exports = world["exports"]
    assert checkpoint_tasks([exports["vqa"], f"itm={exports['itm']}"]) == {"vqa": exports["vqa"], "itm": exports["itm"]}
    for values, message in [
        ([f"vqq={exports['vqa']}"], "expected TASK=PATH with TASK one of"),
        ([exports["vqa"], f"vqa={exports['vqa']}"], "two checkpoints for vqa"),
        ([str(world["root"])], "has no task.json naming one of"),
        ([f"re={world['root'] / 'missing'}"], "expected an existing checkpoint"),
    ]:
        with pytest.raises(ValueError, match=message):
            checkpoint_tasks(values)


def test_user_mistakes_are_one_line(world, monkeypatch) -> None:
    common = ["--detector", world["weights"], "--vocab", world["vocab"]]
    status, _, err = run_cli(main, ["--checkpoint", str(world["root"]), *common])
    assert status == 2 and err.count("\n") == 1 and "has no task.json" in err, err
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed: import gradio fails
    status, _, err = run_cli(main, ["--checkpoint", world["exports"]["vqa"], *common])
    assert status == 2 and err.count("\n") == 1 and 'pip install -e ".[demo]"' in err, err


def test_a_taken_port_is_one_line(world) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--checkpoint", world["exports"]["itm"], "--detector", world["weights"], "--vocab", world["vocab"],
                "--port", str(port), *TINY_CLI]  # fmt: skip
        status, _, err = run_cli(main, argv)
    assert status == 2 and err.count("\n") == 1 and f"cannot serve on 127.0.0.1:{port}" in err, err


def test_summary_lines_and_the_drawn_box() -> None:
    vqa = {"answers": [{"answer": "cup", "score": 0.75}, {"answer": "cat", "score": 0.5}]}
    assert summary("vqa", vqa) == "answer: cup (0.750), cat (0.500)"
    assert summary("itm", {"score": 0.25, "logit": -1.0986}) == "ITM score 0.250 (logit -1.099)"
    re = {"index": 2, "box": [10.0, 20.0, 30.0, 40.0], "prob": 0.5, "probs": [0.25, 0.25, 0.5]}
    assert summary("re", re) == "box 2 of 3 (p = 0.500): x 10, y 20, w 30, h 40"
    plain = Image.new("RGB", (100, 100), (0, 0, 0))
    boxed = draw_box(plain, [10, 30, 50, 40], "box 2")
    assert boxed.getpixel((10, 50)) == BOX_COLOUR and boxed.getpixel((59, 50)) == BOX_COLOUR  # left and right edges
    assert boxed.getpixel((35, 50)) == (0, 0, 0) and plain.getpixel((10, 50)) == (0, 0, 0)  # inside; a copy


def test_a_click_gives_the_pipelines_answer(world) -> None:
    photo = Image.open(world["photo"]).convert("RGB")
    vqa = pipeline(world, "vqa")
    line, boxed, result = ask(vqa, [photo], QUESTION)
    assert result == vqa(photo, QUESTION) and line == summary("vqa", result) and boxed is None
    re = pipeline(world, "re")
    line, boxed, result = ask(re, [photo], EXPRESSION)
    assert line.startswith(f"box {result['index']} of ") and boxed.size == photo.size
    x, y, w, h = result["box"]
    assert boxed.getpixel((int(x + w / 2), int(y + h - 1))) == BOX_COLOUR  # the bottom edge of the box
    picture, distance = align(vqa, photo, "A woman in a uniform .")
    assert picture.size[0] > 500 and distance.startswith("OT distance ")
    with pytest.raises(ValueError, match="upload an image first"):
        ask(vqa, [None], QUESTION)
    with pytest.raises(ValueError, match="type a text first"):
        ask(vqa, [photo], "  ")
    with pytest.raises(ValueError, match="answers: expected 4 lines, one each, got 2"):
        lines_of("a cup\n\n a cat ", "answers", 4)


def test_a_missing_browser_fails_and_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium chromium-driver"):
        browser_paths()


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver); fails (not skips) when they are missing: the test needs them, CI installs them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(f"the browser test needs Chromium and its driver (found {chromium}, {driver}): {INSTALL_BROWSER}")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(world: dict, port: int) -> subprocess.Popen:
    """``python -m uniter_fast.demo`` with the vqa, itm and re exports, once its page answers."""
    exports = world["exports"]
    argv = [sys.executable, "-m", "uniter_fast.demo", "--checkpoint", exports["vqa"], "--checkpoint",
            f"itm={exports['itm']}", "--checkpoint", f"re={exports['re']}", "--detector", world["weights"],
            "--vocab", world["vocab"], "--port", str(port), "--top-k", "3", *TINY_CLI]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": REPO, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with open(world["root"] / "demo.log", "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the demo exited with {proc.returncode}:\n{(world['root'] / 'demo.log').read_text()[-3000:]}")
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/", timeout=2
            ):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("the demo did not serve its page within 120 s:\n" + (world["root"] / "demo.log").read_text()[-3000:])


def headless_chromium() -> webdriver.Chrome:
    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server",
                 "--window-size=1280,900"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def upload_and_ask(browser: webdriver.Chrome, task: str, photo: str, text: str, timeout: float = 60) -> str:
    """Upload ``photo`` and type ``text`` in ``task``'s tab, press its button; the answer box's text once filled."""
    wait = WebDriverWait(browser, timeout)
    browser.find_element(By.CSS_SELECTOR, f"#{task}-image0 input[type=file]").send_keys(photo)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f"#{task}-image0 img"))  # the upload is shown
    browser.find_element(By.CSS_SELECTOR, f"#{task}-text textarea").send_keys(text)
    browser.find_element(By.ID, f"{task}-run").click()
    answer = f"#{task}-answer textarea"
    return wait.until(lambda b: b.find_element(By.CSS_SELECTOR, answer).get_attribute("value"))


def open_tab(browser: webdriver.Chrome, title: str) -> None:
    buttons = [b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == title]
    assert buttons, f"no tab {title!r}"
    buttons[0].click()


def test_the_page_answers_in_a_real_browser(world) -> None:
    browser_paths()
    photo = world["photo"]
    expected = pipeline(world, "vqa")(photo, QUESTION, top_k=3)
    port = free_port()
    proc = serve(world, port)
    browser = headless_chromium()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.ID, "vqa-run"))
        assert browser.title == "UNITER demo"
        tabs = [b.text.strip() for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")]
        assert tabs == ["Visual question answering", "Image-text matching", "Referring expressions",
                        "Word-region alignment"]  # fmt: skip
        assert upload_and_ask(browser, "vqa", photo, QUESTION) == summary("vqa", expected)
        open_tab(browser, "Referring expressions")
        assert upload_and_ask(browser, "re", photo, EXPRESSION).startswith("box ")
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#re-box img"))
        if os.environ.get(SCREENSHOT_ENV):  # the docs' picture: 256 colours keep it small
            shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
            shot.quantize(256).save(os.environ[SCREENSHOT_ENV], optimize=True)
    finally:
        browser.quit()
        proc.terminate()
        proc.wait(30)
