"""The browser demo, ``python -m uniter_fast.demo --checkpoint C --detector W`` (the ``[demo]`` extra): a local page
to upload a photo, type a question, caption or referring expression and see the answer, the ITM score, the RE box
and the word-region alignment. ``cli``: the command; ``app``: the page (gradio); ``answers``: what a click computes;
``render``: how a result is shown. docs/own-images.md, "Browser demo"."""
