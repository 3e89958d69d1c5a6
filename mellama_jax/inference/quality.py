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
from mellama_jax.model.llama import with_params
from mellama_jax.model.sharding import activation_mesh

log = logging.getLogger(__name__)

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


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, scales, tokens):
    positions = jnp.arange(tokens.shape[1])[None]
    return with_params(cfg, params)(tokens, positions, quant_scales=scales or None)[0][0]


def _measure(model: Loaded, params, scales, tokens) -> tuple[float, np.ndarray]:
    with activation_mesh(model.mesh):
        logits = _logits(model.cfg, params, scales, tokens)
    logp = jax.nn.log_softmax(logits[:-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1).mean()
    return math.exp(float(nll)), np.asarray(jnp.argmax(logits[:-1], axis=-1))


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
