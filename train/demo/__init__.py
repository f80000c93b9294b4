"""The bundled demo pair's data: an offline chat corpus and a small byte-level tokenizer.

    python -m train.demo.build_corpus --data-dir data/ --out demo_data/

Everything is built from what ships with the running Python interpreter (its standard
library sources, `pydoc_data`) plus generated arithmetic, so it needs no network and is
reproducible on any machine with the same Python version. See `train.demo.corpus`.
"""
