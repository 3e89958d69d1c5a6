"""The demo tasks: the held-out facts of the built-in demo corpus (demo/corpus.py), in the hosted-eval schema.

They are not MIBE tasks (`suite = "demo"`), so `--tasks all` leaves them out; `mellama demo` names them. Each file
is written by `write_demo_data` into its eval/ folder; every row lists its own choices and gold index.

The demo's SFT replies recall the fact ("It is a statin."); a yes/no reply then answers ("It is a statin. So the
answer is no."). MC items list four candidate answers and are answered with one of them. The paper parser reads
the replies as it reads any output; the strict parser reads the answer after the last "So the answer is" (yes/no)
or the end of the first sentence (MC, short answer).
"""

from __future__ import annotations

from mellama_jax.evaluation import parsers
from mellama_jax.evaluation.base import Example, Row
from mellama_jax.evaluation.kinds import ChoiceTask

ANSWER_CUE = "So the answer is"  # between the recalled fact and the answer of a demo SFT reply


class DemoTask(ChoiceTask):
    """A demo task: hosted rows only (the demo corpus writes no other format)."""

    suite = "demo"

    def from_original(self, row: Row) -> Example:
        """Demo files are always hosted-schema; a row without `query` is malformed."""
        raise row.error("query", "is missing (demo files use the hosted schema {id, query, answer, choices, gold})")

    def parse_strict(self, output: str, example: Example) -> str:
        """The option letter or label that starts the answer after the last cue (or the output, without one)."""
        return super().parse_strict(output.rsplit(ANSWER_CUE, 1)[-1], example)


class DemoYesNo(DemoTask):
    """Is a statement about a held-out fact true: yes or no (half of each)."""

    name, title = "demo_yesno", "Demo yes/no (held-out facts)"
    patterns = ("demo_yesno*.json*",)
    choices = ("yes", "no")


class DemoShort(DemoTask):
    """Short answer on a held-out fact: the first of the relation's possible answers found in the output."""

    name, title = "demo_short", "Demo short answer (held-out facts)"
    patterns = ("demo_short*.json*",)

    def parse_strict(self, output: str, example: Example) -> str:
        """The longest choice that ends the answer's first sentence ("It is a statin."), else "missing"."""
        sentence = parsers.answer_start(output).split(".", 1)[0].strip().lower()
        found = [c for c in example.choices if sentence.endswith(c.lower()) and not sentence[: -len(c)][-1:].isalnum()]
        return max(found, key=len, default=parsers.MISSING)


class DemoMC(DemoShort):
    """Multiple choice on a held-out fact: four candidate answers listed in the prompt; the answer is one of them."""

    name, title = "demo_mc", "Demo MC (held-out facts)"
    patterns = ("demo_mc*.json*",)
