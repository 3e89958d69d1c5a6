"""Inference: batched KV-cache generation on a checkpoint or a training run.

`generate` (load, chunked prefill, one jitted decode loop, greedy or seeded sampling, per-row EOS), `cli`
(`mellama generate`).
"""
