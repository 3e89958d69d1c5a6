"""Evaluation: the MIBE benchmarks (DESIGN §2) and the checks around them.

`tasks` (the registry) over `base`/`kinds` and the datasets in `mibe_qa`, `mibe_class`, `mibe_gen` and
`demo_tasks`; `parsers` and `metrics`; `harness` (`mellama eval`: predictions, results, resume);
`decontaminate` (13-gram overlap with the training corpus); `lm_eval` (our model in lm-evaluation-harness); `cli`.
"""
