"""What weight-only quantization costs, measured at load on a held-out text: perplexity before and after, and how
often the quantized model's top token agrees with the full-precision one's at each position (teacher-forced, so
one early disagreement does not hide all later agreement).

The default text is a short clinical passage written for this purpose (no patient's data); `--quant-check-text`
gives your own (your held-out notes are the better test).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mellama_jax.errors import UserError
from mellama_jax.inference.loaded import Loaded
from mellama_jax.model import quant
from mellama_jax.model.scoring import token_logprobs
from mellama_jax.model.sharding import activation_mesh

log = logging.getLogger(__name__)
_score = jax.jit(token_logprobs, static_argnums=0)

HELD_OUT = (
    "A 64-year-old woman presented to the emergency department with two days of fever, productive cough and "
    "shortness of breath. She had a history of type 2 diabetes mellitus treated with metformin and of chronic "
    "kidney disease. On examination her temperature was 38.9 degrees Celsius, her heart rate 112 beats per minute "
    "and her oxygen saturation 89 percent on room air. Crackles were heard over the right lower lobe. The chest "
    "radiograph showed a right lower lobe consolidation without effusion. Laboratory tests revealed a white cell "
    "count of 16,400 per microliter, a C-reactive protein of 182 milligrams per liter and a creatinine of 1.9 "
    "milligrams per deciliter, above her baseline. Blood cultures were drawn and she was started on intravenous "
    "ceftriaxone and azithromycin, with the doses adjusted for her renal function, together with supplemental "
    "oxygen and intravenous fluids. Metformin was held. Over the next 48 hours her fever resolved, her oxygen "
    "requirement fell and her creatinine returned to baseline. Community-acquired pneumonia is a leading cause of "
    "hospitalization among older adults; severity scores such as CURB-65 help decide between outpatient care and "
    "admission, and treatment should follow local resistance patterns and be narrowed once culture results return."
)


def _measure(model: Loaded, params, scales, tokens) -> tuple[float, np.ndarray]:
    """(perplexity of tokens [1, T], the most likely token at each position but the last)."""
    picks = jnp.arange(tokens.shape[1] - 1)[None]
    with activation_mesh(model.mesh):
        logp, top = _score(model.cfg, params, scales, tokens, picks, tokens[:, 1:])
    return math.exp(-float(logp.mean())), np.asarray(top[0])


def quantized(model: Loaded, mode: str, text: str | None = None) -> Loaded:
    """The model with integer layer weights and their scales, and the cost measured on `text` (or the built-in
    one) in its `quant_report`, which is also logged."""
    if mode not in quant.MODES:
        raise UserError(f"quantize must be one of {', '.join(quant.MODES)}, got {mode!r}")
    ids = model.tokenizer.encode(text or HELD_OUT)[: model.cfg.max_seq_len]
    if len(ids) < 16:
        raise UserError("--quant-check-text: needs at least 16 tokens to measure anything")
    tokens = jnp.asarray([ids], jnp.int32)
    ppl, top = _measure(model, model.params, {}, tokens)
    params, scales = jax.jit(functools.partial(quant.quantize, mode=mode))(model.params)
    q_ppl, q_top = _measure(model, params, scales, tokens)
    report = {
        "text": "built-in clinical passage" if text is None else "--quant-check-text",
        "tokens": len(ids),
        "perplexity": round(ppl, 4),
        "perplexity_quantized": round(q_ppl, 4),
        "perplexity_change": round(q_ppl / ppl - 1, 5),
        "top1_agreement": round(float(np.mean(top == q_top)), 4),
    }
    log.info(summary(mode, report))
    return dataclasses.replace(model, params=params, scales=scales, quantize=mode, quant_report=report)


def summary(mode: str, report: dict) -> str:
    return (f"{mode}: perplexity {report['perplexity']:.3f} -> {report['perplexity_quantized']:.3f}"
            f" ({100 * report['perplexity_change']:+.2f} %), top-1 agreement {100 * report['top1_agreement']:.1f} %"
            f" over {report['tokens']} tokens of the {report['text']}")  # fmt: skip


def read_text(path: pathlib.Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
