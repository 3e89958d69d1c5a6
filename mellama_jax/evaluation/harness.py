"""`mellama eval`: the MIBE tasks over a checkpoint, run as the paper's harness runs them, every output kept.

Protocol (DESIGN §2) by default: zero-shot, greedy, up to 256 new tokens, stop at EOS. Each task's outputs are
parsed twice (the paper's substring parser and a strict one) and scored under both. In `--out DIR`:

  predictions/<task>.jsonl  one row per example: id, prompt, output (and its token ids), parsed, parsed_strict, gold
  results.json              per task and metric under both parsers (and on the clean subset when a contamination
                            report is given), the settings and compute dtype, the checkpoint and its fingerprint,
                            library versions
  results.md                the same as a table, Me-LLaMA-70B-chat's published numbers beside ours

Each task's predictions are written as soon as it finishes, so an interrupted eval re-run with the same
checkpoint and settings picks up at the task it was in. Other settings are refused unless `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import pathlib
import shutil

import tqdm

from mellama_jax.checkpoint import find_params
from mellama_jax.config_file import read_model_config
from mellama_jax.errors import UserError
from mellama_jax.evaluation.tasks import TASKS, Example, Task, load_examples
from mellama_jax.inference.generate import Loaded, Sampling, apply_template, generate, load
from mellama_jax.outdir import replace_file, sha256_of
from mellama_jax.training.run_dir import LOCK, RunLock, write_json

log = logging.getLogger(__name__)

PARSERS = ("paper", "strict")  # the paper-compatible substring parser, and the strict first-label parser
VERSIONS = ("mellama-jax", "jax", "jaxlib", "flax", "numpy", "scikit-learn", "seqeval", "rouge-score", "bert-score",
            "sentencepiece", "tokenizers")  # fmt: skip
RESULTS, TABLE, PREDICTIONS = "results.json", "results.md", "predictions"
# A run killed while loading the model leaves its lock, or while first writing results.json its partial file.
_LEFTOVERS = {LOCK, f".{RESULTS}.partial"}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What decides the outputs (the batch size does not, so it is not part of a run's identity)."""

    shots: int = 0  # 0: the paper's zero-shot; 1: each example is preceded by the next one, answered
    limit: int | None = None  # the first N examples of each task
    template: str = "raw"  # prompt wrapper (generate.apply_template): raw | me-llama | llama2-chat
    sampling: Sampling = dataclasses.field(default_factory=Sampling)

    def __post_init__(self):
        if self.shots not in (0, 1):
            raise UserError(f"--shots must be 0 or 1, got {self.shots}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")


def evaluate(
    ckpt_dir: pathlib.Path,
    tasks: str,
    data_dir: pathlib.Path,
    out_dir: pathlib.Path,
    settings: EvalSettings = EvalSettings(),
    batch_size: int = 16,
    exclude_report: pathlib.Path | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    quantize: str | None = None,
) -> dict:
    """Runs `tasks` ("all" or "a,b") on the checkpoint and writes the outputs; returns results.json's content."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.suffix == ".json":
        raise UserError(f"--out {out_dir}: names a folder (results.json and predictions/ are written inside it)")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    examples = load_examples(tasks, pathlib.Path(data_dir), settings.limit)  # bad data fails before the model loads
    chosen = [TASKS[name] for name in examples]
    excluded = _excluded(exclude_report, chosen, examples, pathlib.Path(data_dir)) if exclude_report else None
    _check_room(pathlib.Path(ckpt_dir), settings.sampling)  # before anything is written
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir, "mellama eval writes this folder")
    try:
        lock.acquire()
    except OSError as e:  # a full or read-only disk: name the folder it happened in
        raise OSError(e.errno, e.strerror, str(lock.path)) from e
    try:
        previous = _check_out(out_dir, overwrite)  # under the lock: an eval that just ended here may have written it
        model = load(ckpt_dir, dtype, quantize=quantize)
        identity = {"checkpoint": str(pathlib.Path(ckpt_dir).resolve()), "fingerprint": model.fingerprint,
                    "dtype": model.cfg.dtype, "quantize": model.quantize, "settings": _settings(settings),
                    "data_dir": str(pathlib.Path(data_dir).resolve())}  # fmt: skip
        if previous and {k: previous.get(k) for k in identity} != identity:
            if not overwrite:
                raise UserError(f"{out_dir}: holds results of another checkpoint or other settings; pass --overwrite"
                                " to replace them, or choose another --out")  # fmt: skip
            previous = None
        # tasks evaluated earlier into this folder with the same settings stay in the results
        results = {**identity, "versions": _versions(), "tasks": dict((previous or {}).get("tasks", {}))}
        _save(out_dir, results)  # first: a run killed from here on is resumed as this folder's owner
        if previous is None:
            shutil.rmtree(out_dir / PREDICTIONS, ignore_errors=True)
        (out_dir / PREDICTIONS).mkdir(exist_ok=True)
        for task in chosen:
            data_file = task.find(pathlib.Path(data_dir))
            data_sha = sha256_of(data_file)
            rows = _reuse(out_dir, task, examples[task.name], previous, data_sha)
            if rows is None:
                rows = _run_task(model, task, examples[task.name], settings, batch_size)
                _write_rows(out_dir / PREDICTIONS / f"{task.name}.jsonl", rows)
            results["tasks"][task.name] = _scores(
                task, examples[task.name], rows, exclude_report, excluded, data_file, data_sha
            )
            _save(out_dir, results)
        return results
    finally:
        lock.release()


def _save(out_dir: pathlib.Path, results: dict) -> None:
    write_json(out_dir / RESULTS, results)
    replace_file(out_dir / TABLE, table(results).encode())


def _check_room(ckpt_dir: pathlib.Path, sampling: Sampling) -> None:
    """The model's positions must hold a prompt (at least BOS and one token) and `max_new_tokens` answer tokens."""
    find_params(ckpt_dir, adapters=True)  # a non-checkpoint is named as such, not as lacking a model_config.json
    positions = read_model_config(ckpt_dir / "model_config.json").max_seq_len
    if positions - sampling.max_new_tokens < 2:
        raise UserError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt"
                        f" in the model's {positions} positions")  # fmt: skip


def _settings(settings: EvalSettings) -> dict:
    return {**dataclasses.asdict(settings), "sampling": dataclasses.asdict(settings.sampling)}


def _versions() -> dict[str, str | None]:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _check_out(out_dir: pathlib.Path, overwrite: bool) -> dict | None:
    """The results already in `out_dir` (a folder of ours), None if it is new (or holds only what a run killed
    before its first write leaves); a folder of something else is refused."""
    if not any(p.name not in _LEFTOVERS for p in out_dir.iterdir()):
        return None
    results = out_dir / RESULTS
    try:
        previous = json.loads(results.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        previous = None
    if not isinstance(previous, dict) or "fingerprint" not in previous:
        if not overwrite:
            raise UserError(f"--out {out_dir}: exists, is not empty and holds no {RESULTS} of ours; pass --overwrite")
        for name in (RESULTS, TABLE):
            (out_dir / name).unlink(missing_ok=True)
        return None
    return previous


def _excluded(report: pathlib.Path, tasks: list[Task], examples: dict[str, list[Example]], data_dir: pathlib.Path):
    """Task name -> the ids `report` found contaminated; a report of other data for a task is refused."""
    from mellama_jax.evaluation.decontaminate import contaminated_ids

    found = contaminated_ids(pathlib.Path(report))
    entries = json.loads(pathlib.Path(report).read_text())["tasks"]
    for task in tasks:
        entry, data_file = entries.get(task.name, {}), task.find(data_dir)
        checked = entry.get("checked")
        if task.name not in found:
            log.warning("%s has no entry for %s: no clean-subset score for it", report, task.name)
        elif "data_sha256" in entry and entry["data_sha256"] != sha256_of(data_file):
            raise UserError(f"{report}: checked another {task.name} file than {data_file} (sha256 differs), whose ids"
                            " may name other examples; run mellama decontaminate on this --data-dir")  # fmt: skip
        elif isinstance(checked, int) and checked < len(examples[task.name]):
            log.warning("%s checked only the first %d %s examples (--limit?); the other %d count as clean", report,
                        checked, task.name, len(examples[task.name]) - checked)  # fmt: skip
    return found


def _reuse(out_dir, task: Task, examples: list[Example], previous: dict | None, data_sha: str) -> list[dict] | None:
    """A finished task's predictions from an earlier run with the same settings and the same data file."""
    done = (previous or {}).get("tasks", {}).get(task.name)
    path = out_dir / PREDICTIONS / f"{task.name}.jsonl"
    if not done or done.get("data_sha256") != data_sha or not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if [r.get("id") for r in rows] != [e.id for e in examples]:
        return None
    log.info("%s: reusing the %d predictions in %s", task.name, len(rows), path)
    return rows


def _prompt_ids(model: Loaded, texts: list[str], room: int) -> tuple[list[list[int]], int]:
    """Token ids with BOS; a prompt longer than `room` keeps BOS and its last tokens (the input's end and the
    answer cue), as lm-eval's HF model truncates. Returns the ids and how many were cut."""
    ids, cut = [], 0
    for text in texts:
        tokens = model.tokenizer.encode(text)
        if len(tokens) > room:
            tokens, cut = tokens[:1] + tokens[len(tokens) - room + 1 :], cut + 1
        ids.append(tokens)
    return ids, cut


def _run_task(model: Loaded, task: Task, examples: list[Example], settings: EvalSettings, batch_size: int) -> list:
    n = len(examples)
    shots = [examples[(i + 1) % n] if settings.shots and n > 1 else None for i in range(n)]
    prompts = [task.prompt(e, shot) for e, shot in zip(examples, shots, strict=True)]
    room = model.cfg.max_seq_len - settings.sampling.max_new_tokens
    ids, cut = _prompt_ids(model, [apply_template(p, settings.template) for p in prompts], room)
    if cut:
        log.warning("%s: %d of %d prompts exceed %d tokens; their beginnings were cut", task.name, cut, n, room)
    with tqdm.tqdm(total=n, desc=task.name, unit="ex") as bar:
        outputs = generate(model, ids, settings.sampling, batch_size, progress=bar.update)
    rows = []
    for example, prompt, new in zip(examples, prompts, outputs, strict=True):
        text = model.tokenizer.decode(new)
        rows.append({"id": example.id, "prompt": prompt, "output": text, "output_ids": list(new),
                     "parsed": task.parse(text, example), "parsed_strict": task.parse_strict(text, example),
                     "gold": example.gold})  # fmt: skip
    return rows


def _write_rows(path: pathlib.Path, rows: list[dict]) -> None:
    replace_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def _scores(task: Task, examples: list[Example], rows: list[dict], report, excluded, data_file, data_sha) -> dict:
    entry = {"title": task.title, "data_file": str(data_file), "data_sha256": data_sha, "n": len(rows)}
    entry["paper_parser"] = task.score(examples, [r["parsed"] for r in rows])
    entry["strict_parser"] = task.score(examples, [r["parsed_strict"] for r in rows])
    if excluded is not None and task.name in excluded:
        keep = [i for i, e in enumerate(examples) if e.id not in excluded[task.name]]
        entry["clean"] = {"report": str(report), "n": len(keep), "excluded": len(rows) - len(keep)}
        if keep:
            entry["clean"]["paper_parser"] = task.score([examples[i] for i in keep], [rows[i]["parsed"] for i in keep])
    entry["paper"] = dict(task.paper)
    return entry


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def table(results: dict) -> str:
    """results.md: one row per task and metric, tasks in DESIGN §2's order."""
    settings = results["settings"]
    sampling = settings["sampling"]
    decoding = "greedy" if sampling["temperature"] == 0 else f"temperature {sampling['temperature']}"
    lines = [
        f"# MIBE results: {results['checkpoint']}",
        "",
        f"{settings['shots']}-shot, {decoding}, up to {sampling['max_new_tokens']} new tokens, stop at EOS;"
        f" template {settings['template']}; {results['dtype']} compute"
        f"{', ' + results['quantize'] + ' weights' if results.get('quantize') else ''};"
        f" fingerprint `{results['fingerprint']}`.",
        "paper parser: the first choice (in choice order) found in the output, as the paper's harness;"
        " strict: the first label at the start of the answer.",
        "",
    ]
    entries = [(task, results["tasks"][task.name]) for task in TASKS.values() if task.name in results["tasks"]]
    with_clean = any("clean" in entry for _, entry in entries)  # the column only when a report was given
    lines += [
        "| task | metric | n | paper parser | strict parser |" + (" clean subset (n) |" if with_clean else "")
        + " Me-LLaMA-70B-chat (paper) |",
        "|---|---|---:|---:|---:|" + ("---:|" if with_clean else "") + "---:|",
    ]  # fmt: skip
    notes = []
    for task, entry in entries:
        clean = entry.get("clean")
        for metric in task.metrics:
            cells = [task.title, metric, str(entry["n"]), _cell(entry["paper_parser"].get(metric)),
                     _cell(entry["strict_parser"].get(metric))]  # fmt: skip
            if with_clean:
                cells.append(
                    "" if clean is None else f"{_cell(clean.get('paper_parser', {}).get(metric))} ({clean['n']})"
                )
            lines.append("| " + " | ".join([*cells, _cell(entry["paper"].get(metric))]) + " |")
        for metric, reason in entry["paper_parser"].get("skipped", {}).items():
            notes.append(f"- {task.title} {metric} skipped: {reason}")
    lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"
