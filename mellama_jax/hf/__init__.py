"""Hugging Face interop: the one table of HF tensor names <-> our parameter paths, and the conversions.

`table` (the mapping, shapes, checks), `files` (safetensors and legacy `.bin`, read and written one tensor at a
time), `config` (`config.json` <-> ModelConfig, refusing what we do not implement), `convert` (whole folders,
both ways, with tokenizer and generation settings), `cli` (`mellama convert`).
"""
