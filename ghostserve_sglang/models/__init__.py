"""Models bundled for trying GhostServe without a download: a ``config.json`` only, to be served with
``--load-format dummy --skip-tokenizer-init`` (random weights; requests send ``input_ids``)."""

import pathlib

TINY_LLAMA = pathlib.Path(__file__).parent / "tiny-llama"
