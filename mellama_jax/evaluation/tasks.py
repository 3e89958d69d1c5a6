"""The MIBE tasks (Me-LLaMA's 12 medical benchmarks, DESIGN §2, plus MedQA's 4-option release): the registry.

    from mellama_jax.evaluation.tasks import TASKS, select
    for task in select("pubmedqa,medqa"):
        examples = task.load(data_dir, limit=100)
        outputs = ...  # the model's greedy continuation of task.prompt(example) for each example
        predictions = [task.parse(out, ex) for out, ex in zip(outputs, examples)]
        scores = task.score(examples, predictions)  # {"accuracy": ..., "macro_f1": ...}

`Example`, `Task` and the task kinds live in base.py / kinds.py; the datasets in mibe_qa.py, mibe_class.py and
mibe_gen.py; parsers.py and metrics.py hold what they share.
"""

from __future__ import annotations

from mellama_jax.errors import UserError
from mellama_jax.evaluation.base import Example, Task
from mellama_jax.evaluation.mibe_class import DDI, BioNLI, HoC, MedNLI, MTSample
from mellama_jax.evaluation.mibe_gen import I2B2, MimicCXR, PubMedSumm
from mellama_jax.evaluation.mibe_qa import EmrQA, MedMCQA, MedQA, MedQA4, PubMedQA

__all__ = ["TASKS", "Example", "Task", "select"]

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        PubMedQA(),
        MedQA(),
        MedQA4(),
        MedMCQA(),
        EmrQA(),
        I2B2(),
        DDI(),
        HoC(),
        MTSample(),
        PubMedSumm(),
        MimicCXR(),
        BioNLI(),
        MedNLI(),
    )
}


def select(spec: str) -> list[Task]:
    """The tasks named in `spec` ("all" or comma-separated names), in the order given, without repeats."""
    names = list(TASKS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        what = f"unknown task {', '.join(repr(n) for n in unknown)}" if unknown else "no task given"
        raise UserError(f"--tasks: {what}; valid: all, {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]
