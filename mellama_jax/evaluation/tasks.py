"""The MIBE tasks (Me-LLaMA's 12 medical benchmarks, DESIGN §2, plus MedQA's 4-option release): the registry.

    from mellama_jax.evaluation.tasks import TASKS, select
    for task in select("pubmedqa,medqa"):
        examples = task.load(data_dir, limit=100)
        outputs = ...  # the model's greedy continuation of task.prompt(example) for each example
        predictions = [task.parse(out, ex) for out, ex in zip(outputs, examples)]
        scores = task.score(examples, predictions)  # {"accuracy": ..., "macro_f1": ...}

`Example`, `Task` and the task kinds live in base.py / kinds.py; the datasets in mibe_qa.py, mibe_class.py and
mibe_gen.py; parsers.py and metrics.py hold what they share. The registry also holds the demo corpus's tasks
(demo_tasks.py, `suite = "demo"`); "all" means the MIBE tasks only.
"""

from __future__ import annotations

import logging
import pathlib

from mellama_jax.errors import UserError
from mellama_jax.evaluation.base import Example, Task
from mellama_jax.evaluation.demo_tasks import DemoMC, DemoShort, DemoYesNo
from mellama_jax.evaluation.mibe_class import DDI, BioNLI, HoC, MedNLI, MTSample
from mellama_jax.evaluation.mibe_gen import I2B2, MimicCXR, PubMedSumm
from mellama_jax.evaluation.mibe_qa import EmrQA, MedMCQA, MedQA, MedQA4, PubMedQA

__all__ = ["MIBE", "TASKS", "Example", "Task", "load_examples", "select"]

log = logging.getLogger(__name__)

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
        DemoMC(),
        DemoYesNo(),
        DemoShort(),
    )
}
MIBE = tuple(name for name, task in TASKS.items() if task.suite == "mibe")  # what "all" selects


def select(spec: str) -> list[Task]:
    """The tasks named in `spec` ("all": the MIBE tasks; or comma-separated names), in order, without repeats."""
    names = list(MIBE) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        what = f"unknown task {', '.join(repr(n) for n in unknown)}" if unknown else "no task given"
        raise UserError(f"--tasks: {what}; valid: all, {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]


def load_examples(spec: str, data_dir: pathlib.Path, limit: int | None = None) -> dict[str, list[Example]]:
    """Task name -> its first `limit` examples, for the tasks of `spec`. With "all", a task with no file in
    `data_dir` is skipped with a warning (the credentialed sets are often absent); a named one is an error."""
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder")
    found = {}
    for task in select(spec):
        if spec.strip() == "all" and not task.has_data(data_dir):
            log.warning("%s: no file in %s (tried %s), skipped", task.name, data_dir, ", ".join(task.patterns))
            continue
        found[task.name] = task.load(data_dir, limit)
        if not found[task.name]:
            raise UserError(f"{task.find(data_dir)}: no examples for {task.name}")
    if not found:
        raise UserError(f"--data-dir {data_dir}: no file of any task")
    return found
