"""Text generation from a checkpoint: a batched prefill, then KV-cache decoding inside one jitted loop.

Prompts are token ids. They are sorted by length and batched with their neighbours; each batch is
left-padded to a bucket length (16, 32, 48, 64, 80, ... : at most 1.25x its longest prompt past 64), so a batch
never pads to an outlier and a handful of compiled programs serve every batch. Padding slots get segment
id 0 and every prompt's positions start at 0 at its first token, so the cache's mask (same segment,
slot not after the query's) hides the padding and each row computes what it would alone.

One jitted program per (rows, bucket) shape prefills the cache with all prompt tokens but the last, then
runs a `lax.while_loop` that feeds one token per row, samples the next, and stops when every row has
produced an end-of-sequence id or `max_new_tokens`. Sampling follows transformers' order (temperature,
then top-k, then top-p); each row draws from a key folded from the seed and its prompt's index, so a
prompt's tokens do not depend on the batch it landed in.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify
from jax.sharding import Mesh, NamedSharding

from mellama_jax.checkpoint import find_params, restore_params, stored_arrays
from mellama_jax.config import DTYPES, LoraConfig, MeshConfig, ModelConfig
from mellama_jax.config_file import read_json_object, read_model_config
from mellama_jax.data.sft import TEMPLATES
from mellama_jax.data.tokenizer import Tokenizer, check_vocab, load_tokenizer
from mellama_jax.errors import UserError
from mellama_jax.inference import quality
from mellama_jax.inference.loaded import Loaded
from mellama_jax.inference.sampling import sample_rows
from mellama_jax.model import lora, quant
from mellama_jax.model.llama import abstract_model, init_cache, with_params
from mellama_jax.model.sharding import activation_mesh, batch_sharding, make_mesh, shardings, spec
from mellama_jax.outdir import sha256_of

# Prefill attends T new queries to the whole cache ([B, N, T, S] fp32 scores): chunks keep that bounded.
PREFILL_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. temperature 0 is greedy (top_k and top_p are then unused)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self):
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if type(self.top_k) is not int or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if type(self.seed) is not int or not 0 <= self.seed < 2**31:
            raise UserError(f"seed must be an integer in [0, 2^31), got {self.seed!r}")


def decode_mesh(cfg: ModelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The default mesh for decoding: `tensor` as large as the heads allow, `data` over the remaining devices.

    Decoding reads every weight once per token. FSDP would all-gather the whole model for every token;
    tensor parallelism keeps each device's share of heads, MLP and vocabulary in place and reads it
    there, so the time per token shrinks with the devices. Devices the heads cannot use become replicas
    that split the batch.
    """
    devices = list(devices if devices is not None else jax.local_devices())
    dims = (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size)
    tensor = max(t for t in range(1, len(devices) + 1) if len(devices) % t == 0 and all(d % t == 0 for d in dims))
    return make_mesh(MeshConfig(data=len(devices) // tensor, fsdp=1, tensor=tensor), devices)


def load(ckpt_dir: str | pathlib.Path, dtype: str | None = None, mesh: Mesh | None = None,
         quantize: str | None = None, quant_text: str | None = None) -> Loaded:  # fmt: skip
    """A converted checkpoint or a training run (its latest complete step), placed on `mesh`. A LoRA run's
    adapters are folded into its base weights here, once. `quantize` ("int8", "int4") holds the layer weights
    as integers, once the cost is measured on `quant_text` (or a built-in text) and logged.

    `dtype` is the compute dtype, and the params are held in it: decoding reads every weight per token, so
    "bfloat16" halves that traffic. None computes in float32, whatever the checkpoint trained in, so scores
    and greedy outputs match a float32 reference, with the params as stored (bf16 weights are upcast per
    use, exactly). `mesh` defaults to `decode_mesh` over this process's devices.
    """
    ckpt_dir = pathlib.Path(ckpt_dir)
    item_dir, subtree = find_params(ckpt_dir, adapters=True)
    lora_cfg = lora.read_lora_config(ckpt_dir) if subtree else None
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in quant.MODES:
        raise UserError(f"quantize must be one of {', '.join(quant.MODES)}, got {quantize!r}")
    cfg = read_model_config(ckpt_dir / "model_config.json")
    cfg = dataclasses.replace(cfg, dtype=dtype or "float32", param_dtype=dtype or cfg.param_dtype, remat="none")
    tokenizer = load_tokenizer(ckpt_dir)
    check_vocab(tokenizer, cfg.vocab_size, str(ckpt_dir))
    mesh = mesh if mesh is not None else decode_mesh(cfg)
    abstract = nnx.state(abstract_model(cfg), nnx.Param)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
    shapes = nnx.to_pure_dict(abstract)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings(shapes, logical, mesh)
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # hashing reads the files the restore reads
        digest = pool.submit(sha256_of, item_dir)
        try:
            params = restore_params(item_dir, target, subtree)
        except ValueError as e:
            raise UserError(f"{item_dir}: does not fit model_config.json ({str(e).splitlines()[0][:200]})") from None
        if lora_cfg is not None:
            params = _folded(params, item_dir, lora_cfg)
        loaded = Loaded(cfg, params, tokenizer, _eos_ids(ckpt_dir, tokenizer), mesh, digest.result())
    return loaded if quantize is None else quality.quantized(loaded, quantize, quant_text)


def _folded(params: dict, item_dir: pathlib.Path, cfg: LoraConfig) -> dict:
    """`params` with the run's adapters folded in, each weight keeping its dtype and sharding."""
    adapters = jax.tree.map(np.asarray, stored_arrays(item_dir, ("lora",)))  # rank-r factors: small
    fold = jax.jit(
        functools.partial(lora.fold, s=lora.scale(cfg)),
        out_shardings=jax.tree.map(lambda x: x.sharding, params),
        donate_argnums=0,
    )
    return fold(params, adapters)


def _eos_ids(ckpt_dir: pathlib.Path, tokenizer: Tokenizer) -> tuple[int, ...]:
    path = ckpt_dir / "generation_config.json"
    eos = read_json_object(path).get("eos_token_id") if path.is_file() else None
    if eos is None:
        return () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    ids = eos if isinstance(eos, list) else [eos]
    if not all(type(i) is int for i in ids):
        raise UserError(f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return tuple(ids)


def apply_template(text: str, template: str) -> str:
    """`text` wrapped as the SFT data wraps a prompt (data/sft.TEMPLATES); the tokenizer then adds BOS."""
    if template not in TEMPLATES:
        raise UserError(f"chat template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    return TEMPLATES[template][0].format(prompt=text)


def read_prompts(path: str | pathlib.Path) -> list[str]:
    """Prompts from a file: one per line (.txt), or each line's "prompt" field (.jsonl); blank lines skipped."""
    path = pathlib.Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f'{path}: expected a .txt (one prompt per line) or .jsonl file (a "prompt" field per line)')
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{path}:{number}: expected an object with a string "prompt" field')
        prompts.append(record["prompt"])
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def bucket_length(n: int) -> int:
    """The padded length of `n` tokens: multiples of 16 up to 64, then each octave cut in four (80, 96, 112, 128,
    160, ..., 1024, 1280, ...): at most a quarter added past 64, four shapes per doubling. Prompts (generate,
    serve's prefill) and scored rows (lm-eval) share it."""
    size = 16 * max(1, -(-n // 16))
    if size > 64:
        step = 1 << (size - 1).bit_length() - 3  # a quarter of the octave that holds `size`
        size = -(-size // step) * step
    return size


def sample(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row: logits [B, V] fp32, keys [B] (one per row) -> [B] int32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    rows = lambda value, dtype: jnp.full(logits.shape[:1], value, dtype)  # noqa: E731
    return sample_rows(logits, keys, rows(sampling.temperature, jnp.float32), rows(sampling.top_k, jnp.int32),
                       rows(sampling.top_p, jnp.float32))  # fmt: skip


@functools.lru_cache(maxsize=32)
def _decoder(cfg: ModelConfig, sampling: Sampling, eos_ids: tuple[int, ...], mesh: Mesh, chunk: int,
             stop_ids: tuple[int, ...] = ()) -> Callable:  # fmt: skip
    """The jitted prefill + decode loop; one per (model, sampling, mesh), each compiled once per input shape.

    A row ends at an `eos_ids` token (not kept) or after a `stop_ids` token (kept); the loop ends when every
    row has. `sampling.seed` is 0 here: the seed is an argument, so a new seed compiles nothing.
    """
    n = sampling.max_new_tokens

    def run(weights, tokens, lengths, live, rows, seed):
        # weights (params, quantization scales); tokens [B, P] left-padded, lengths [B] prompt lengths,
        # live [B] real rows, rows [B] prompt indices
        b, p = tokens.shape
        model = functools.partial(with_params(cfg, weights[0]), quant_scales=weights[1] or None)
        first = p - lengths[:, None]  # [B, 1] slot of each prompt's first token
        slots = jnp.arange(p)[None, :]
        positions = jnp.maximum(slots - first, 0)
        segments = (slots >= first).astype(jnp.int32)
        cache = init_cache(cfg, b, p - 1 + n)
        cache = _prefill(model, tokens[:, :-1], positions[:, :-1], segments[:, :-1], cache, chunk)
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(rows)

        def step(state):
            i, token, cache, out, length, done = state
            logits, cache = model(token[:, None], (lengths - 1 + i)[:, None], jnp.ones((b, 1), jnp.int32), cache)
            new = sample(logits[:, 0], jax.vmap(jax.random.fold_in, (0, None))(keys, i), sampling)
            ended = done | jnp.isin(new, jnp.asarray(eos_ids or (-1,), jnp.int32))
            out = jax.lax.dynamic_update_index_in_dim(out, new, i, axis=1)
            stop = ended | jnp.isin(new, jnp.asarray(stop_ids or (-1,), jnp.int32))
            return i + 1, new, cache, out, jnp.where(ended, length, i + 1), stop

        def going(state):
            return (state[0] < n) & ~jnp.all(state[5])

        zeros = jnp.zeros((b,), jnp.int32)
        state = (jnp.int32(0), tokens[:, -1], cache, jnp.zeros((b, n), jnp.int32), zeros, ~live)
        _, _, _, out, length, _ = jax.lax.while_loop(going, step, state)
        return out, length

    return jax.jit(checkify.checkify(run, errors=checkify.user_checks))


def _prefill(model, tokens, positions, segments, cache, chunk: int):
    """The cache filled with tokens [B, T], `chunk` tokens at a time; their logits are never computed (unused)."""
    t = tokens.shape[1]
    full, rest = divmod(t, chunk)

    def fill(j, cache):
        piece = lambda x: jax.lax.dynamic_slice_in_dim(x, j * chunk, chunk, axis=1)  # noqa: E731
        return model(piece(tokens), piece(positions), piece(segments), cache)[1]

    if full:
        cache = jax.lax.fori_loop(0, full, fill, cache)
    if rest:
        cache = model(tokens[:, t - rest :], positions[:, t - rest :], segments[:, t - rest :], cache)[1]
    return cache


def _checked(prompts: Sequence[Sequence[int]], cfg: ModelConfig, sampling: Sampling) -> list[np.ndarray]:
    limit = cfg.max_seq_len - sampling.max_new_tokens
    checked = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"prompt {i}: expected a non-empty sequence of token ids")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise UserError(f"prompt {i}: token id outside the model's vocabulary (0..{cfg.vocab_size - 1})")
        if ids.size > limit:
            raise UserError(
                f"prompt {i}: {ids.size} tokens + max_new_tokens {sampling.max_new_tokens} exceed the model's"
                f" max_seq_len {cfg.max_seq_len}"
            )
        checked.append(ids.astype(np.int32))
    return checked


def _left_padded(ids: list[np.ndarray], chosen: list[int], rows: int, p: int) -> tuple[np.ndarray, ...]:
    """tokens [rows, p] with each chosen prompt ending at slot p - 1, its length, whether the row is real, and
    its prompt's index; the filler rows that round a batch up hold a single token 0."""
    tokens, lengths = np.zeros((rows, p), np.int32), np.ones(rows, np.int32)
    live, indices = np.zeros(rows, bool), np.zeros(rows, np.int32)
    for r, i in enumerate(chosen):
        tokens[r, p - len(ids[i]) :], lengths[r], live[r], indices[r] = ids[i], len(ids[i]), True, i
    return tokens, lengths, live, indices


def generate(
    model: Loaded,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling = Sampling(),
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """The new token ids of every prompt (each prompt as the model should see it, BOS included), in input order,
    the end-of-sequence id not included; a row also ends after any of `stop_ids` (kept). `progress(n)` is called
    after each batch with the prompts it finished.
    """
    if type(batch_size) is not int or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    cfg, mesh = model.cfg, model.mesh
    ids = _checked(prompts, cfg, sampling)
    decode = _decoder(cfg, dataclasses.replace(sampling, seed=0), tuple(model.eos_ids), mesh, PREFILL_CHUNK,
                      tuple(sorted(set(stop_ids))))  # fmt: skip
    rows_sharding = NamedSharding(mesh, spec(("batch",)))
    split = mesh.size // rows_sharding.shard_shape((mesh.size,))[0]  # ways the rows are split
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    results: list[list[int]] = [[] for _ in ids]
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        # Rows: a power of two up to batch_size (few shapes to compile), split evenly over the batch's mesh axes.
        rows = -(-min(batch_size, 1 << (len(chosen) - 1).bit_length()) // split) * split
        p = min(bucket_length(len(ids[chosen[-1]])), cfg.max_seq_len - sampling.max_new_tokens)
        tokens, *per_row = _left_padded(ids, chosen, rows, p)
        with activation_mesh(mesh):
            error, (out, length) = decode(
                (model.params, model.scales or {}),
                jax.device_put(tokens, batch_sharding(mesh)),
                *(jax.device_put(x, rows_sharding) for x in per_row),
                jnp.int32(sampling.seed),
            )
        error.throw()
        out, length = np.asarray(out), np.asarray(length)
        for r, i in enumerate(chosen):
            results[i] = out[r, : length[r]].tolist()
        if progress is not None:
            progress(len(chosen))
    return results
