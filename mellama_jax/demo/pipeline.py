"""`mellama demo`: Me-LLaMA's pipeline in miniature, on the built-in demo corpus, in minutes on a laptop CPU.

    mellama demo --out runs/demo

Stages, each written under OUT and skipped when its output is already complete, so a re-run resumes:
  data/          the demo corpus (demo/corpus.py): CPT text mixed 15:1:4, SFT records, held-out eval items,
                 and the tokenizer trained on the corpus;
  base/          a small LLaMA, randomly initialised and saved as a converted checkpoint: the stand-in for LLaMA-2;
  runs/cpt/      continued pre-training on the mixture (`mellama train --config configs/cpt.yaml`);
  runs/sft/      LoRA instruction tuning from the CPT run (`configs/sft.yaml`);
  eval/{base,cpt,sft}/  `mellama eval` of the held-out items at each stage;
  hf/cpt, hf/sft, hf/sft-adapter/  the CPT model and the merged SFT model in Hugging Face format, and the
                 SFT adapters as a PEFT folder; when transformers is installed, the merged model (and, with peft,
                 the adapter folder on hf/cpt) is reloaded and its greedy outputs compared with ours;
  summary.md     the scores per stage beside chance, and where every output went.
The configs in OUT/configs are plain training configs: `mellama train --config` runs them the same way.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
from collections.abc import Callable

import numpy as np

from mellama_jax.config_file import read_json_object
from mellama_jax.demo.corpus import VOCAB_SIZE, write_demo_data
from mellama_jax.errors import UserError
from mellama_jax.outdir import replace_file, staged_output
from mellama_jax.training.run_dir import MODEL_CONFIG, RunLock

TASKS = ("demo_mc", "demo_yesno", "demo_short")
STAGES = {"base": "before CPT", "cpt": "after CPT", "sft": "after LoRA SFT"}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's outputs; OUT/demo.json records them, and a re-run must match."""

    seed: int = 0
    corpus_tokens: int = 150_000  # CPT corpus size, in tokens of the demo tokenizer
    d_model: int = 128
    n_layers: int = 3  # 4 learnt the held-out facts no better (seeds 0-2) at 1.24x the time per step (BENCHMARKS.md)
    # Two heads of 64, not four of 32: the same weights, but on a CPU the attention's softmax over [heads, T, T]
    # costs as much as the matmuls, and the held-out scores were no worse (BENCHMARKS.md).
    n_heads: int = 2
    ffn_dim: int = 384
    seq_len: int = 256  # the model's length, and SFT rows: three ~84-token records each
    cpt_seq_len: int = 128  # CPT rows: documents are ~95 tokens, and shorter rows cost less attention per token
    cpt_steps: int = 300  # 8 passes over the corpus: 250 or 200 left the held-out facts partly learnt (BENCHMARKS.md)
    cpt_batch: int = 32
    cpt_lr: float = 3e-3
    sft_steps: int = 300
    sft_batch: int = 8  # 300 steps of 8 scored as 300 of 16 on MC and short answers, in half the time
    sft_lr: float = 3e-3  # a model this small needs far more than the paper's 1e-5 for 13B/70B
    lora_rank: int = 16
    lora_alpha: float = 32.0
    max_new_tokens: int = 32
    eval_batch: int = 32


def _schedule(out: pathlib.Path, s: DemoSettings, run: str, seq_len: int, steps: int, batch: int, lr: float) -> dict:
    """What the two training stages share: one micro-batch, warmup then cosine, a checkpoint every third."""
    return {"seq_len": seq_len, "global_batch": batch, "micro_batches": 1, "steps": steps,
            "optim": {"lr": lr, "warmup_ratio": 0.05}, "run_dir": str(out / "runs" / run),
            "checkpoint_every": max(1, steps // 3), "seed": s.seed}  # fmt: skip


def _cpt_config(out: pathlib.Path, s: DemoSettings) -> dict:
    sources = [{"name": d, "paths": [str(out / "data" / "cpt" / f"{d}.jsonl")], "weight": w}
               for d, w in (("biomedical", 15), ("clinical", 1), ("general", 4))]  # fmt: skip
    data = {"kind": "cpt", "tokenizer": str(out / "data" / "tokenizer"), "sources": sources}
    return {
        "init_from": str(out / "base"),
        "data": data,
        **_schedule(out, s, "cpt", s.cpt_seq_len, s.cpt_steps, s.cpt_batch, s.cpt_lr),
    }


def _sft_config(out: pathlib.Path, s: DemoSettings) -> dict:
    sources = [{"name": "demo", "paths": [str(out / "data" / "sft" / "train.jsonl")]}]
    return {"init_from": str(out / "runs" / "cpt"), "data": {"kind": "sft", "template": "raw", "sources": sources},
            "lora": {"rank": s.lora_rank, "alpha": s.lora_alpha},
            **_schedule(out, s, "sft", s.seq_len, s.sft_steps, s.sft_batch, s.sft_lr)}  # fmt: skip


def _check_settings(out: pathlib.Path, settings: DemoSettings) -> None:
    """Records the settings in OUT/demo.json, or refuses a folder that holds a demo made with other ones."""
    path, wanted = out / "demo.json", dataclasses.asdict(settings)
    if path.is_file():
        found = read_json_object(path)
        changed = sorted(k for k in wanted if found.get(k) != wanted[k])
        if changed:
            raise UserError(f"{out}: holds a demo made with other settings ({', '.join(changed)}); "
                            "choose another --out, or delete the folder to start over")  # fmt: skip
    elif out.is_dir() and any(p.name != "run.lock" for p in out.iterdir()):
        raise UserError(f"{out}: exists and holds something other than a demo; choose another --out")
    else:
        replace_file(path, (json.dumps(wanted, indent=2) + "\n").encode())


def _write_base(out: pathlib.Path, s: DemoSettings) -> None:
    """A randomly initialised model saved as `mellama convert hf-to-jax` saves one, with the demo tokenizer."""
    import jax
    from flax import nnx

    from mellama_jax.checkpoint import save_params
    from mellama_jax.config import ModelConfig
    from mellama_jax.model.llama import Llama

    # remat full: on a CPU, writing every layer's activations for the backward pass (the attention probabilities,
    # [L, B, N, T, T]) costs more than computing the forward again; the runs inherit it from this config.
    cfg = ModelConfig.tiny(vocab_size=VOCAB_SIZE, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                           n_kv_heads=s.n_heads, head_dim=s.d_model // s.n_heads, ffn_dim=s.ffn_dim,
                           max_seq_len=s.seq_len, remat="full")  # fmt: skip
    model = Llama(cfg, rngs=nnx.Rngs(jax.random.PRNGKey(s.seed)))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with staged_output(out / "base") as staging:
        save_params(staging / "params", params)
        (staging / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(out / "data" / "tokenizer" / name, staging / name)


def _finished(run_dir: pathlib.Path, steps: int) -> bool:
    import orbax.checkpoint as ocp

    folder = run_dir / "checkpoints"
    return folder.is_dir() and steps in ocp.utils.checkpoint_steps(folder)


def _train(config: dict, path: pathlib.Path) -> None:
    import yaml

    from mellama_jax.config_file import load_config
    from mellama_jax.training.loop import train

    path.parent.mkdir(exist_ok=True)
    replace_file(path, yaml.safe_dump(config, sort_keys=False).encode())
    run_dir = pathlib.Path(config["run_dir"])
    if not _finished(run_dir, config["steps"]):
        train(load_config(str(path)))
    if not _finished(run_dir, config["steps"]):  # a SIGINT/SIGTERM saved the run and stopped it
        raise UserError(f"{run_dir}: stopped before step {config['steps']}; run mellama demo again to resume")


def _evaluate(out: pathlib.Path, stage: str, ckpt: pathlib.Path, s: DemoSettings) -> dict:
    from mellama_jax.evaluation.harness import EvalSettings, evaluate
    from mellama_jax.inference.generate import Sampling

    settings = EvalSettings(sampling=Sampling(max_new_tokens=s.max_new_tokens))
    # overwrite: results in the demo's own folder that another checkpoint made (a run deleted and redone) are stale
    tasks, data = ",".join(TASKS), out / "data" / "eval"
    return evaluate(ckpt, tasks, data, out / "eval" / stage, settings, s.eval_batch, overwrite=True)


def _export(out: pathlib.Path) -> None:
    from mellama_jax.hf.convert import convert_jax_to_hf

    runs, hf = out / "runs", out / "hf"
    adapter = {"adapter_only": True, "base_model": str(hf / "cpt")}
    for source, target, kw in (
        (runs / "cpt", "cpt", {}),
        (runs / "sft", "sft", {}),
        (runs / "sft", "sft-adapter", adapter),
    ):
        if not (hf / target).is_dir():
            convert_jax_to_hf(source, hf / target, dtype="float32", **kw)


def chance(data_file: pathlib.Path) -> float:
    """The expected accuracy of a uniform guess among each item's own choices."""
    rows = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return float(np.mean([1.0 / len(row["choices"]) for row in rows]))


def summary(out: pathlib.Path, results: dict[str, dict], check: str, times: dict[str, float]) -> str:
    """summary.md: held-out accuracy (paper parser) per task and stage beside chance, then where everything went."""
    tasks = results["base"]["tasks"]
    header = "| task | n | chance | " + " | ".join(STAGES.values()) + " |"
    lines = ["# mellama demo", "", "Held-out accuracy (facts the model met only in continued pre-training):", ""]
    lines += [header, "|---|---:|---:|" + "---:|" * len(STAGES)]
    for name in TASKS:
        entry = tasks[name]
        scores = [f"{results[stage]['tasks'][name]['paper_parser']['accuracy']:.3f}" for stage in STAGES]
        lines.append(f"| {entry['title']} | {entry['n']} | {chance(pathlib.Path(entry['data_file'])):.3f} | "
                     + " | ".join(scores) + " |")  # fmt: skip
    lines += ["", "Accuracy by the paper's parser; chance: a uniform guess among each item's own choices.",
              "MC items list four candidate answers and are answered with one of them.",
              "Before CPT, the random model's outputs seldom name any choice, so it scores below chance.",
              "", f"Hugging Face check: {check}", "", f"Outputs, in {out}:"]  # fmt: skip
    where = {
        "data/": "the demo corpus (cpt/, sft/, eval/) and its tokenizer",
        "base/": "the randomly initialised model (a converted checkpoint)",
        "runs/cpt/`, `runs/sft/": "training runs: metrics.jsonl, loss.png, tensorboard/, checkpoints/",
        "configs/": "the two training configs (`mellama train --config` runs them)",
        "eval/{base,cpt,sft}/": "results.md, results.json and predictions/ of each stage",
        "hf/cpt/`, `hf/sft/": "Hugging Face folders (safetensors, config.json, tokenizer); hf/sft: adapters merged",
        "hf/sft-adapter/": "the LoRA adapters as a PEFT folder for hf/cpt",
    }
    lines += [f"- `{k}`: {v}" for k, v in where.items()]
    lines += ["", "Seconds per stage (this invocation): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    return "\n".join(lines) + "\n"


def run_demo(out: str | pathlib.Path, settings: DemoSettings = DemoSettings(),
             say: Callable[[str], None] = print) -> str:  # fmt: skip
    """Runs (or resumes) every stage into `out`; returns summary.md's text."""
    out = pathlib.Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, "mellama demo writes this folder")
    lock.acquire()
    try:
        _check_settings(out, settings)
        return _stages(out, settings, say)
    finally:
        lock.release()


def _stages(out: pathlib.Path, s: DemoSettings, say: Callable[[str], None]) -> str:
    from mellama_jax.demo.check import compare_with_transformers

    times: dict[str, float] = {}

    def stage(name: str, note: str, work: Callable[[], object]):
        say(f"[demo] {name}: {note}")
        begun = time.monotonic()
        result = work()
        times[name] = time.monotonic() - begun
        return result

    runs, configs, results = out / "runs", out / "configs", {}
    if not (out / "data").is_dir():
        stage("data", f"writing the demo corpus to {out / 'data'}", lambda: _write_data(out, s))
    if not (out / "base").is_dir():
        stage("base", "initialising a small LLaMA", lambda: _write_base(out, s))
    results["base"] = stage("eval base", "held-out items before CPT", lambda: _evaluate(out, "base", out / "base", s))
    stage("cpt", "continued pre-training, 15:1:4", lambda: _train(_cpt_config(out, s), configs / "cpt.yaml"))
    results["cpt"] = stage("eval cpt", "held-out items after CPT", lambda: _evaluate(out, "cpt", runs / "cpt", s))
    stage("sft", "LoRA instruction tuning", lambda: _train(_sft_config(out, s), configs / "sft.yaml"))
    results["sft"] = stage("eval sft", "held-out items after SFT", lambda: _evaluate(out, "sft", runs / "sft", s))
    stage("export", "Hugging Face folders and the PEFT adapter", lambda: _export(out))
    check = stage("check", "reloading the exports in transformers/peft", lambda: compare_with_transformers(out, TASKS))
    text = summary(out, results, check, times)
    replace_file(out / "summary.md", text.encode())
    return text


def _write_data(out: pathlib.Path, s: DemoSettings) -> None:
    with staged_output(out / "data") as staging:
        write_demo_data(staging, seed=s.seed, size=s.corpus_tokens)
