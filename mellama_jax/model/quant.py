"""Weight-only quantization of the decoder's layer weights: int8 per output channel, int4 in groups.

A weight W [L, *in, *out] is held as integers Q [L, *in, *out] and scales [L, G, *out], the flattened input
axis cut into G groups: W ≈ Q · scale of its group. int8 keeps one group (a scale per output channel); int4
keeps groups of 128 inputs (or the largest divisor of the input size below that). Rounding is to nearest
(round-to-nearest, "RTN", as AWQ's and GPTQ's baselines), scales are max|W| / qmax per group, symmetric.

The model dequantizes inside its layer scan (`dequantize`, one layer at a time), so memory holds the integers
and one layer's weights in the compute dtype. The embedding table and the output head stay as they are, as
the ecosystem leaves them (vLLM, llama.cpp's Q8_0/Q4_0 keep the output layer in higher precision).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

# mode -> (integer dtype, largest magnitude, group size along the input; None = one group)
MODES = {"int8": (jnp.int8, 127, None), "int4": (jnp.int4, 7, 128)}
# the quantized weights inside a layer: (module, weight) -> how many leading axes are its input
WEIGHTS = {("attn", "q"): 1, ("attn", "k"): 1, ("attn", "v"): 1, ("attn", "o"): 2,
           ("mlp", "gate"): 1, ("mlp", "up"): 1, ("mlp", "down"): 1}  # fmt: skip


def groups(inputs: int, mode: str) -> int:
    """How many groups the `inputs` of a weight are cut into."""
    size = MODES[mode][2]
    if size is None:
        return 1
    return inputs // max(g for g in range(1, size + 1) if inputs % g == 0)


def _quantize_one(w: jax.Array, n_in: int, mode: str) -> tuple[jax.Array, jax.Array]:
    dtype, qmax, _ = MODES[mode]
    lead, ins, outs = w.shape[:1], w.shape[1 : 1 + n_in], w.shape[1 + n_in :]
    g = groups(math.prod(ins), mode)
    grouped = w.astype(jnp.float32).reshape(*lead, g, -1, *outs)  # [L, G, I/G, *out]
    scale = jnp.max(jnp.abs(grouped), axis=2) / qmax  # [L, G, *out]
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(grouped / scale[:, :, None]), -qmax, qmax).astype(dtype)
    return q.reshape(w.shape), scale


def quantize(params: Mapping, mode: str) -> tuple[dict, dict]:
    """(params with the layer weights as integers, their scales {module: {weight: [L, G, *out]}})."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {', '.join(MODES)}, got {mode!r}")
    layers = jax.tree.map(lambda x: x, dict(params["layers"]), is_leaf=lambda x: not isinstance(x, Mapping))
    scales: dict = {}
    for (module, weight), n_in in WEIGHTS.items():
        q, scale = _quantize_one(layers[module][weight], n_in, mode)
        layers[module][weight] = q
        scales.setdefault(module, {})[weight] = scale
    return {**params, "layers": layers}, scales


def dequantize(layer: dict, scales: Mapping) -> dict:
    """One layer's params (a pure dict, no L axis) with each quantized weight back in float32; others as given."""
    if not scales:
        return layer
    out = {module: dict(weights) if isinstance(weights, Mapping) else weights for module, weights in layer.items()}
    for module, weights in scales.items():
        for weight, scale in weights.items():
            q = out[module][weight]
            g, outs = scale.shape[0], scale.shape[1:]
            grouped = q.astype(jnp.float32).reshape(g, -1, *outs) * scale[:, None]
            out[module][weight] = grouped.reshape(q.shape)
    return out
