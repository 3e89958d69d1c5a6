"""lm-evaluation-harness adapter: our model as lm-eval's `mellama` model (the paper's check against forgetting).

lm-eval 0.4.13 resolves `--model NAME` only in its own registry, and nothing it runs imports other packages,
so `lm_eval --model mellama` alone cannot find us. Importing this module registers the model; `mellama lm-eval
ARGS...` does that and hands ARGS to lm-eval's own command line:

    mellama lm-eval --model mellama --model_args ckpt=CKPT_DIR,dtype=bfloat16 --tasks hellaswag --batch_size 16

From Python: `import mellama_jax.evaluation.lm_eval`, then `lm_eval.simple_evaluate(model="mellama", ...)`.

Scoring follows lm-eval's HF model (`lm_eval/models/huggingface.py`): the context and continuation are split by
TemplateLM's rule (encode both, keep the whole's tail), an empty context becomes BOS, a window-overflowing request
loses tokens from the left. One jitted forward pass, sharded over the checkpoint's mesh, scores a batch; padded
lengths follow a coarse ladder (`bucket`), so a run compiles a handful of shapes, not one per request, and only
the scored positions are projected onto the vocabulary.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mellama_jax.errors import UserError
from mellama_jax.inference import generate
from mellama_jax.model.scoring import token_logprobs
from mellama_jax.model.sharding import RULES, activation_mesh, batch_sharding

log = logging.getLogger(__name__)

# gen_kwargs we honour; lm-eval's normalize_gen_kwargs maps max_new_tokens & co. onto max_gen_toks.
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed")


def bucket(length: int, max_length: int) -> int:
    """The padded length of a row of `length` tokens: generate's ladder (at most +25 % past 64), at most max_length."""
    return min(generate.bucket_length(length), max_length)


def _positive_int(value: Any, name: str) -> int:
    """`value` (an int, or the string lm-eval's argument parsing left) as a positive int; `name` says where."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0 or str(number) != str(value).strip():
        raise UserError(f"lm-eval {name} must be a positive integer, got {value!r}")
    return number


@register_model("mellama")
class MellamaLM(TemplateLM):
    """A mellama checkpoint as an lm-eval model.

    model_args: `ckpt` (a converted checkpoint or a training run, its latest step), `quantize` (int8 or int4
    weight-only, as `mellama serve --quantize`), `dtype` (compute dtype,
    default float32 as `generate.load`; bfloat16 for speed), `max_length` (the context window, default and at
    most the model's max_seq_len), `max_gen_toks` (default for generation, 256). `batch_size` comes from lm-eval's
    `--batch_size` (rows per forward pass, rounded up to a multiple of the mesh's batch shards). lm-eval's
    `device` and `max_batch_size` are accepted and unused: JAX places the model on the mesh `generate.load`
    builds. `loaded` (Python only) takes an already loaded `generate.Loaded` instead of `ckpt`.
    """

    def __init__(
        self,
        ckpt: str | None = None,
        dtype: str | None = None,
        quantize: str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        batch_size: int | str = 16,
        device: str | None = None,
        max_batch_size: int | None = None,
        loaded: generate.Loaded | None = None,
        **unknown: Any,
    ):
        super().__init__()
        if unknown:  # lm-eval would pass them on as a raw TypeError
            known = "ckpt, dtype, quantize, max_length, max_gen_toks"
            raise UserError(f"lm-eval model_args: unknown {', '.join(sorted(unknown))} (known: {known})")
        if (ckpt is None) == (loaded is None):
            raise UserError("lm-eval model_args: give ckpt=CKPT_DIR (a converted checkpoint or a training run)")
        if str(batch_size).startswith("auto"):
            raise UserError("lm-eval --batch_size: 'auto' probes torch memory; give a number of rows, e.g. 16")
        self.batch_size = _positive_int(batch_size, "--batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "model_args max_gen_toks")
        max_length = None if max_length is None else _positive_int(max_length, "model_args max_length")
        if loaded is None:  # arguments checked first: loading a large checkpoint takes minutes
            loaded = generate.load(ckpt, dtype=dtype, quantize=quantize or None)
        self.loaded, self.cfg, self.tok = loaded, loaded.cfg, loaded.tokenizer
        window = self.cfg.max_seq_len
        self._max_length = max_length or window
        if self._max_length > window:
            raise UserError(f"lm-eval model_args: max_length {self._max_length} exceeds the model's {window}")
        if self.tok.eos_id is None:
            raise UserError(f"{ckpt or 'tokenizer'}: the tokenizer has no EOS token, which lm-eval needs")

        mesh = loaded.mesh
        shards = math.prod(mesh.shape[axis] for axis in RULES["batch"])
        self.rows = -(-self.batch_size // shards) * shards  # every batch shard gets whole rows
        by_row, params = batch_sharding(mesh), jax.tree.map(lambda a: a.sharding, loaded.params)
        self.shapes: set[tuple[int, int]] = set()  # (padded length, scored width) of every batch so far
        self.padded = self.real = 0  # input tokens scored, with and without padding
        self._stops: dict[tuple[str, ...], tuple[int, ...]] = {}  # `until` strings -> tokens that hold one
        self._score = jax.jit(
            functools.partial(token_logprobs, self.cfg),
            in_shardings=(params, None, by_row, by_row, by_row),
            out_shardings=(by_row, by_row),
        )

    # What lm-eval's TemplateLM asks of a model: its special tokens and its tokenizer.
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS, or EOS without one (as HF)."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.loaded.fingerprint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids; None = the checkpoint tokenizer's own BOS/EOS settings, as HF's tokenizer defaults."""
        return self.tok.encode(string, add_special=add_special_tokens is not False)

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results["config"]."""
        return {"model_fingerprint": self.loaded.fingerprint, "model_dtype": self.cfg.dtype,
                "model_quantize": self.loaded.quantize, "model_quant_report": self.loaded.quant_report}  # fmt: skip

    # Scoring.
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(cache key or None, context ids, continuation ids)] -> [(sum log P(continuation), greedy)]."""
        rows, truncated = [], 0
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise UserError(
                    f"lm-eval: a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}"
                )
            whole = context + continuation
            truncated += len(whole) > self.max_length + 1
            whole = whole[-(self.max_length + 1) :]  # HF's rule: keep the last max_length inputs
            rows.append((whole[:-1], whole[1:], len(continuation)))
        if truncated:
            log.warning("%d request(s) longer than max_length %d lost tokens from the left", truncated, self.max_length)
        answers = self._score_rows(rows, disable_tqdm)
        for (key, _, _), answer in zip(requests, answers, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def _score_rows(self, rows: list[tuple[list[int], list[int], int]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(inputs, targets, n scored at the end) per row -> (sum of their log-probs, all greedy), longest first.

        A batch pads its rows to `bucket(longest)` and its scored positions to the next power of two of the
        most any row scores; only those positions meet the output projection (model/scoring.py)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        answers: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for chunk in tqdm(chunks, desc="mellama: scoring", disable=disable_tqdm):
            length = bucket(len(rows[chunk[0]][0]), self.max_length)
            most = max(rows[i][2] for i in chunk)
            width = min(1 << max(most - 1, 0).bit_length(), length)
            tokens = np.zeros((self.rows, length), np.int32)  # padding rows and tails: never scored
            picks = np.zeros((self.rows, width), np.int32)
            targets = np.zeros((self.rows, width), np.int32)
            for r, i in enumerate(chunk):
                inputs, following, scored = rows[i]
                n = len(inputs)
                tokens[r, :n] = inputs
                picks[r, :scored], targets[r, :scored] = np.arange(n - scored, n), following[n - scored :]
            self.shapes.add((length, width))
            self.padded += self.rows * length
            self.real += sum(len(rows[i][0]) for i in chunk)
            with activation_mesh(self.loaded.mesh):  # traced here: activations pinned onto the checkpoint's mesh
                weights = (self.loaded.params, self.loaded.scales or {})
                logp, top = jax.device_get(self._score(*weights, tokens, picks, targets))
            for r, i in enumerate(chunk):
                scored = rows[i][2]
                answers[i] = (float(logp[r, :scored].sum()), bool((top[r, :scored] == targets[r, :scored]).all()))
        log.info("mellama: scored in %d compiled shapes, padded/real tokens %.2f", len(self.shapes),
                 self.padded / max(self.real, 1))  # fmt: skip
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Per document: the sum of log P(token) over all its tokens, in disjoint windows of max_length, the
        first conditioned on prefix_token_id.

        The document is encoded without special tokens: the prefix token already starts it. (lm-eval 0.4.13's
        HF model encodes it with the tokenizer's BOS as well, so a LLaMA document's first scored token is a
        second BOS; its issue #3333.)
        """
        windows, owners = [], []
        for owner, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0], add_special_tokens=False)
            pairs = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)
            for context, predicted in map(make_disjoint_window, pairs):
                windows.append((None, context, predicted))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # Generation.
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless gen_kwargs sample) continuations, cut before the first `until` string; requests that
        share gen_kwargs run as one batch. The context keeps its last max_length - max_gen_toks tokens.

        A row stops at EOS, at max_gen_toks, or after a token whose own text holds an `until` string (so the
        answer's text holds it too); the cut at `until` is made on the text afterwards. A stop string split over
        two tokens is cut there as well, only after decoding on to the end.
        """
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        outputs: list[str] = [""] * len(requests)
        for members in tqdm(list(groups.values()), desc="mellama: generating", disable=disable_tqdm):
            sampling, until = self._sampling(requests[members[0]].args[1])
            keep = self.max_length - sampling.max_new_tokens
            if keep <= 0:
                raise UserError(
                    f"lm-eval: max_gen_toks {sampling.max_new_tokens} leaves no room in max_length {self.max_length}"
                )
            # An empty context (and no BOS added) starts from the prefix token, as loglikelihood does.
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in members]
            new_tokens = generate.generate(self.loaded, prompts, sampling, batch_size=self.batch_size,
                                           stop_ids=self._stop_ids(tuple(until)))  # fmt: skip
            for i, tokens in zip(members, new_tokens, strict=True):
                outputs[i] = postprocess_generated_text(self.tok.decode(tokens), until, think_end_token=None)
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs

    def _stop_ids(self, until: tuple[str, ...]) -> tuple[int, ...]:
        """The ids of the tokens whose own text contains one of `until` (the vocabulary read once per set)."""
        if until not in self._stops:
            vocab = range(self.tok.vocab_size) if until else ()
            self._stops[until] = tuple(i for i in vocab if any(stop in self.tok.decode([i]) for stop in until))
        return self._stops[until]

    def _sampling(self, gen_kwargs: dict) -> tuple[generate.Sampling, list[str]]:
        """lm-eval's gen_kwargs -> (generate.Sampling, stop strings); keys we cannot honour are refused."""
        if not isinstance(gen_kwargs, dict):
            raise UserError(f"lm-eval: gen_kwargs must be a mapping, got {type(gen_kwargs).__name__}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            supported = ", ".join(GEN_KWARGS)
            raise UserError(f"lm-eval gen_kwargs: unsupported {', '.join(unknown)} (supported: {supported})")
        until = kwargs["until"]
        if not all(isinstance(stop, str) for stop in until):
            raise UserError(f"lm-eval gen_kwargs: until must be strings, got {until!r}")
        sampling = generate.Sampling(
            max_new_tokens=_positive_int(kwargs["max_gen_toks"], "gen_kwargs max_gen_toks"),
            temperature=float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p", 1.0)),
            seed=int(kwargs.get("seed", 0)),
        )
        return sampling, until


def main(argv: list[str]) -> None:
    """lm-eval's own command line, with `--model mellama` registered (what `mellama lm-eval ARGS...` runs)."""
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except ValueError as e:  # lm-eval's own word for a task name it does not know; other ValueErrors are bugs
        if not str(e).startswith("Tasks not found:"):
            raise
        raise UserError(f"lm-eval --tasks: {e} (list them with: mellama lm-eval ls tasks)") from None
    except ConnectionError as e:  # a task's dataset is fetched from the Hugging Face Hub unless already cached
        raise UserError(f"lm-eval: {str(e).splitlines()[0]}; offline, only datasets already cached can run") from None
    finally:
        sys.argv = saved
