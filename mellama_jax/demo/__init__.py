"""The demo: Me-LLaMA's pipeline in miniature on a generated corpus, in minutes on a CPU.

`corpus` (an invented world of drug and disease facts, rendered as CPT text, SFT records and held-out eval
items), `pipeline` (data -> base -> CPT -> eval -> LoRA SFT -> eval -> HF/PEFT export -> summary), `check`
(the exports reloaded in transformers and peft, compared token for token), `cli` (`mellama demo`).
"""
