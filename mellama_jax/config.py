"""Typed, frozen configuration and translation to and from Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mellama_jax.errors import UserError

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("auto", "xla", "flash", "cudnn")  # see attention.py
# ModelConfig fields that change how the model is computed or initialised, not the function its weights compute:
# a run may set them freely over a checkpoint's model_config.json.
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "init_std", "attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaMA architecture. Defaults are LLaMA-2 7B; use the named presets."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    ffn_dim: int = 11008
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights
    remat: str = "full"  # one of REMAT_POLICIES
    attention: str = "auto"  # one of ATTENTION: auto = flash on GPU, xla elsewhere

    def __post_init__(self):
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len")
        for name in sizes:
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("rms_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise UserError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION:
            raise UserError(f"model.attention must be one of {ATTENTION}, got {self.attention!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    @classmethod
    def llama2_7b(cls, **kw) -> ModelConfig:
        return cls(**kw)

    @classmethod
    def llama2_13b(cls, **kw) -> ModelConfig:
        return cls(**{"d_model": 5120, "n_layers": 40, "n_heads": 40, "n_kv_heads": 40, "ffn_dim": 13824, **kw})

    @classmethod
    def llama2_70b(cls, **kw) -> ModelConfig:
        return cls(**{"d_model": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim": 28672, **kw})

    @classmethod
    def tiny(cls, **kw) -> ModelConfig:
        """A CPU-sized model with LLaMA-2's vocabulary, so the real tokenizer drives it."""
        defaults = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "ffn_dim": 172}
        return cls(**{**defaults, "max_seq_len": 256, "dtype": "float32", "remat": "none", **kw})


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def typed(value: Any, kind: type, what: str) -> Any:
    """`value`, read from JSON, as a `kind` (an int is a float too, a bool no int); else a UserError naming `what`."""
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise UserError(f"{what} must be {_KINDS[kind]}, got {json.dumps(value, default=repr)}")
    return value


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (sharding.py); one may be -1, meaning "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs (distributed.py). Left empty: SLURM/OpenMPI launches are detected, else one process."""

    coordinator: str = ""  # "host:port" of process 0 (or env JAX_COORDINATOR_ADDRESS)
    num_processes: int = 0  # 0: from the launcher or env JAX_NUM_PROCESSES
    process_id: int = -1  # -1: from the launcher or env JAX_PROCESS_ID


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay; defaults are the paper's CPT recipe (DESIGN §1)."""

    lr: float = 8e-6
    min_lr: float = 0.0
    warmup_ratio: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-5
    decay_vectors: bool = False  # decay 1-D params (RMSNorm scales) too; matrices are always decayed
    clip_norm: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UserError(f"optim.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0, got {self.min_lr} and {self.lr}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("eps", "clip_norm"):
            if not getattr(self, name) > 0:
                raise UserError(f"optim.{name} must be positive, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise UserError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


FORMATS = ("jsonl", "text", "parquet", "array_record", "tfds", "prepared")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One named corpus of the CPT mixture (data/sources.py reads it)."""

    name: str = ""
    paths: tuple[str, ...] = ()  # files, folders or glob patterns; tfds: the dataset name ("name/config:1.0.0")
    format: str = ""  # one of FORMATS; "" = from the file extension (.jsonl .txt .parquet .array_record)
    text_field: str = "text"  # jsonl / parquet / array_record / tfds: the field holding a document's text
    weight: float = 1.0  # share of the mixture's *tokens* (relative to the other sources' weights)
    split: str = "train"  # tfds only
    data_dir: str = ""  # tfds only: where the prepared dataset lies ("" = TFDS's default)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from: the built-in counting corpus, or a CPT mixture of corpora (data/cpt.py)."""

    kind: str = "synthetic"  # synthetic | cpt | sft
    sources: tuple[SourceConfig, ...] = ()  # sft: records of all sources together, weights unused
    template: str = "me-llama"  # sft prompt wrapper: raw | me-llama | llama2-chat (data/sft.py)
    tokenizer: str = ""  # tokenizer file or folder; "" = init_from's (raw sources need one; prepared do not)
    on_error: str = "raise"  # raise | skip: a malformed record stops the run, or is skipped and counted
    epochs: int = 0  # stop after this many passes over the data (0: no limit)
    token_budget: int = 0  # stop after this many tokens (0: no limit); the run also stops at `steps`
    # cpt with epochs: when one source has had its last epoch, the mixture ends ("stop"), or that source
    # starts over while the others finish theirs, and the mixture ends with the last one ("repeat").
    on_source_end: str = "stop"
    # the share of every source's documents never trained on, and validated on when no eval_data is given;
    # chosen per document by a hash of its index in the source, so it is the same whatever the seed, the
    # processes or a resume (data/packing.py: held_out)
    heldout: float = 0.0

    def __post_init__(self):
        if self.kind not in ("synthetic", "cpt", "sft"):
            raise UserError(f"data.kind must be 'synthetic', 'cpt' or 'sft', got {self.kind!r}")
        if self.template not in ("raw", "me-llama", "llama2-chat"):
            raise UserError(f"data.template must be 'raw', 'me-llama' or 'llama2-chat', got {self.template!r}")
        if self.on_error not in ("raise", "skip"):
            raise UserError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.on_source_end not in ("stop", "repeat"):
            raise UserError(f"data.on_source_end must be 'stop' or 'repeat', got {self.on_source_end!r}")
        for name in ("epochs", "token_budget"):
            if getattr(self, name) < 0:
                raise UserError(f"data.{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if not 0.0 <= self.heldout < 1.0:
            raise UserError(f"data.heldout must be in [0, 1) (a share of the documents), got {self.heldout}")
        if self.heldout and self.kind == "synthetic":
            raise UserError("data.heldout: the synthetic counting data has no documents to hold out")
        if self.kind != "synthetic" and not self.sources:
            raise UserError(f"data.sources: a {self.kind} run needs at least one source")
        names = [s.name for s in self.sources]
        for i, source in enumerate(self.sources):
            if not source.name or source.name in names[:i]:
                raise UserError(f"data.sources[{i}]: every source needs a unique name, got {source.name!r}")
            if not source.paths:
                raise UserError(f"data.sources[{i}] ({source.name}): no paths")
            if source.format not in ("", *FORMATS):
                raise UserError(f"data.sources[{i}] ({source.name}): format must be one of {', '.join(FORMATS)}")
            if self.kind == "sft" and source.weight != 1.0:
                raise UserError(f"data.sources[{i}] ({source.name}): sft uses every record once per epoch; no weight")
            if not source.weight > 0:
                raise UserError(f"data.sources[{i}] ({source.name}): weight must be positive, got {source.weight}")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (lora.py); DESIGN §1's SFT: rank 16, alpha 32 on every attention and MLP projection."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # only 0: the adapters are merged into the weights per layer, which dropout would break
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"lora.rank must be at least 1, got {self.rank}")
        if not self.alpha > 0:
            raise UserError(f"lora.alpha must be positive, got {self.alpha}")
        if self.dropout != 0.0:
            raise UserError(f"lora.dropout: only 0.0 is supported, got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise UserError(f"lora.targets must be distinct names among {', '.join(LORA_TARGETS)}, got {self.targets}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run: model, batch shape, optimiser, data and mesh."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig.llama2_13b)
    seq_len: int = 4096
    global_batch: int = 1024  # sequences per optimiser step: 1024 x 4096 ≈ 4M tokens (DESIGN §1)
    micro_batches: int = 16  # gradient accumulation: the paper's 16
    steps: int | str = 30_000  # optimiser steps (129B tokens / 4M per step ≈ 30.8K), or "auto": as many as the data
    seed: int = 0
    run_dir: str = "runs/me-llama"  # checkpoints, metrics.jsonl, TensorBoard logs, loss.png; resumed if present
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    init_from: str = ""  # a converted checkpoint (CPT from LLaMA-2); empty: random init
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    peak_tflops: float = 0.0  # per device, for MFU; 0: from the device kind (A100 312, H100 989)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    # Validation (validation.py): every eval_every steps (0: never), at the run's start and at its end, the loss
    # on eval_data (read once, whole), or without it on data.heldout's share of the training documents.
    eval_every: int = 0
    eval_batches: int = 0  # at most this many global batches per evaluation, the same ones every time (0: all)
    eval_data: DataConfig | None = None  # cpt or sft sources, as in `data`; tokenizer "" = data's
    lora: LoraConfig | None = None  # LoRA adapters trained on frozen params; None: full fine-tuning

    def __post_init__(self):
        if self.steps != "auto" and (isinstance(self.steps, str) or self.steps < 1):
            raise UserError(f"steps must be a positive integer or 'auto', got {self.steps!r}")
        for name in ("seq_len", "global_batch", "micro_batches", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.global_batch % self.micro_batches:
            raise UserError(f"micro_batches ({self.micro_batches}) must divide global_batch ({self.global_batch})")
        if self.seq_len > self.model.max_seq_len:
            raise UserError(f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        if not self.run_dir:
            raise UserError("run_dir must name a folder")
        if self.peak_tflops < 0:
            raise UserError(f"peak_tflops must be >= 0 (0: from the device kind), got {self.peak_tflops}")
        self._check_eval()

    def _check_eval(self) -> None:
        if self.eval_every < 0:
            raise UserError(f"eval_every must be >= 0 (0: never), got {self.eval_every}")
        if self.eval_batches < 0:
            raise UserError(f"eval_batches must be >= 0 (0: all of the eval data), got {self.eval_batches}")
        held = self.eval_data
        if held is not None:
            if held.kind not in ("cpt", "sft"):
                raise UserError(f"eval_data.kind must be 'cpt' or 'sft', got {held.kind!r}")
            for name in ("epochs", "token_budget", "heldout", "on_source_end"):  # an evaluation reads it all, once
                if getattr(held, name) != getattr(DataConfig, name):
                    raise UserError(f"eval_data.{name} does not apply: every evaluation reads each document once"
                                    " (eval_batches bounds it)")  # fmt: skip
            if held.kind == self.data.kind == "sft" and held.template != self.data.template:  # left out, it is me-llama
                raise UserError(f"eval_data.template ({held.template!r}) differs from data.template"
                                f" ({self.data.template!r}): validation would wrap prompts unlike training; set"
                                f" eval_data.template: {self.data.template}")  # fmt: skip
        if self.eval_every and held is None and not self.data.heldout:
            raise UserError(
                "eval_every: nothing to evaluate on; give eval_data (held-out sources) or data.heldout"
                " (a share of the training documents)"
            )
