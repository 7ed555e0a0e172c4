"""The browser demo's page (Gradio Blocks): a tab per loaded task (photo, text, the answer, the RE box drawn on the
photo, the full result) and a word-region alignment tab. The only module of the package that imports gradio, when it
builds the page."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Callable

from uniter_fast.demo.answers import align, ask
from uniter_fast.errors import ConfigError
from uniter_fast.inference import Pipeline

TITLE = "UNITER demo"
PROMPTS = {
    "vqa": ("Visual question answering", "question", "What is the man holding?"),
    "ve": ("Visual entailment", "hypothesis", "A woman is wearing a uniform."),
    "nlvr2": ("NLVR2", "statement about the two images", "There are two dogs in total."),
    "itm": ("Image-text matching", "caption", "A woman in a uniform."),
    "re": ("Referring expressions", "referring expression", "the woman on the left"),
    "vcr": ("VCR", "question", "Why is she smiling?"),
}
"""Per task: (tab title, what the text is, an example)."""
IMAGE_HEIGHT = 360
"""Pixels: the height of the photos on the page."""
USER_MISTAKES = (ValueError, TypeError, FileNotFoundError)


def require_gradio() -> ModuleType:
    """The gradio module; a ConfigError saying how to install it when it is missing."""
    try:
        import gradio
    except ImportError as err:
        raise ConfigError(f'the demo needs gradio ({err}): pip install -e ".[demo]"') from None
    return gradio


def shown_errors(gr: ModuleType, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose user mistakes (a missing image, a bad VCR list) show on the page as ``gr.Error`` messages."""

    def run(*values: Any) -> Any:
        try:
            return fn(*values)
        except USER_MISTAKES as err:
            raise gr.Error(str(err)) from err

    return run


def task_tab(gr: ModuleType, pipe: Pipeline) -> None:
    """The inputs, button and outputs of ``pipe``'s task, wired to :func:`~uniter_fast.demo.answers.ask`."""
    task = pipe.task.name
    _, kind, example = PROMPTS[task]
    count = pipe.task.query_images
    with gr.Row():
        with gr.Column():
            images = [
                gr.Image(type="pil", label=f"image {i + 1}" if count > 1 else "image", height=IMAGE_HEIGHT,
                         elem_id=f"{task}-image{i}")
                for i in range(count)
            ]  # fmt: skip
            text = gr.Textbox(label=kind, placeholder=example, elem_id=f"{task}-text")
            extra = []
            if task == "vcr":
                extra = [
                    gr.Textbox(label="the 4 answers, one a line", lines=4, elem_id="vcr-answers"),
                    gr.Textbox(label="the 4 rationales, one a line", lines=4, elem_id="vcr-rationales"),
                ]
            button = gr.Button("Ask", variant="primary", elem_id=f"{task}-run")
        with gr.Column():
            answer = gr.Textbox(label="answer", interactive=False, elem_id=f"{task}-answer")
            boxed = gr.Image(label="the referred box", interactive=False, height=IMAGE_HEIGHT, elem_id="re-box",
                             visible=task == "re")  # fmt: skip
            details = gr.JSON(label="full result", elem_id=f"{task}-result")

    def answer_fn(*values: Any) -> tuple[Any, ...]:
        found = values[:count]
        rest = values[count:]
        return ask(pipe, found, *rest)

    button.click(shown_errors(gr, answer_fn), inputs=[*images, text, *extra], outputs=[answer, boxed, details])


def alignment_tab(gr: ModuleType, pipe: Pipeline) -> None:
    """A photo and a text in, the WRA picture of ``pipe``'s encoder out (:func:`~uniter_fast.demo.answers.align`)."""
    gr.Markdown(
        f"The word-region alignment (WRA): the IPOT transport plan of the {pipe.task.name} model's encoder between the "
        "words and the photo's detected regions; each region's box in the colour of the word that sends it the most "
        "mass, beside the words x regions plan."
    )
    with gr.Row():
        image = gr.Image(type="pil", label="image", height=IMAGE_HEIGHT, elem_id="alignment-image0")
        with gr.Column():
            text = gr.Textbox(label="text", placeholder="A woman in a uniform.", elem_id="alignment-text")
            button = gr.Button("Align", variant="primary", elem_id="alignment-run")
    distance = gr.Textbox(label="OT distance", interactive=False, elem_id="alignment-answer")
    picture = gr.Image(label="alignment", interactive=False, elem_id="alignment-picture")
    button.click(shown_errors(gr, lambda im, t: align(pipe, im, t)), inputs=[image, text], outputs=[picture, distance])


def build_app(pipelines: dict[str, Pipeline], sources: dict[str, str]) -> Any:
    """The page (a ``gradio.Blocks``) of ``pipelines`` ({task: pipeline}); ``sources``: {task: checkpoint path},
    named on the page."""
    gr = require_gradio()
    loaded = ", ".join(f"{task}: `{os.path.basename(os.path.normpath(path))}`" for task, path in sources.items())
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {TITLE}\nUpload a photo, type a text, press the button. Checkpoints: {loaded}. "
            "Answers come from `uniter_fast.Pipeline` (docs/own-images.md)."
        )
        with gr.Tabs():
            for task, pipe in pipelines.items():
                with gr.Tab(PROMPTS[task][0], id=task, elem_id=f"{task}-tab"):
                    task_tab(gr, pipe)
            with gr.Tab("Word-region alignment", id="alignment", elem_id="alignment-tab"):
                alignment_tab(gr, next(iter(pipelines.values())))
    return app
