"""Tokenizers: SentencePiece `tokenizer.model` (LLaMA-2) and HF `tokenizer.json` (through `tokenizers`).

Special tokens follow the checkpoint's own settings: `tokenizer_config.json` when it is there (its
`add_bos_token`, `bos_token`, ...), else the tokenizer file's own (SentencePiece: LLaMA's BOS and no EOS;
`tokenizer.json`: its post-processor). Ids of special tokens are looked up by name, never assumed.
"""

from __future__ import annotations

import abc
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

from mellama_jax.errors import UserError

# The tokenizer itself, in order of preference in a folder (LLaMA-2's SentencePiece model first).
TOKENIZER_MODEL_FILES = ("tokenizer.model", "tokenizer.json")
# What travels with a checkpoint, when present.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def _token_name(value: Any) -> str | None:
    """`tokenizer_config.json` writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer(abc.ABC):
    """Common interface: `encode`, `decode`, `id_of`, and the checkpoint's BOS/EOS/pad settings."""

    backend: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool  # whether encode(add_special=True) starts with BOS
    add_eos: bool
    files: list[pathlib.Path]  # the files to copy along with a converted or exported checkpoint

    def _read_specials(self, config: dict[str, Any], default_bos: str | None, default_eos: str | None) -> None:
        def lookup(key: str, default: str | None) -> int | None:
            name = _token_name(config.get(key, default))
            if name is None:
                return None
            token_id = self.id_of(name)
            if token_id is None:
                raise UserError(f"tokenizer: {key} {name!r} is not in the vocabulary")
            return token_id

        self.bos_id = lookup("bos_token", default_bos)
        self.eos_id = lookup("eos_token", default_eos)
        self.pad_id = lookup("pad_token", None)

    @abc.abstractmethod
    def id_of(self, name: str) -> int | None: ...

    @abc.abstractmethod
    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids; with `add_special`, BOS/EOS exactly as the checkpoint's tokenizer adds them."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text, special tokens dropped."""

    @abc.abstractmethod
    def token_text(self, token_id: int) -> str:
        """The vocabulary's own string for one id (a special token's name, "▁the", ...)."""

    @abc.abstractmethod
    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of `text` in which special tokens' names are those tokens (a rendered chat template), none added."""


class SentencePieceTokenizer(Tokenizer):
    backend = "sentencepiece"

    def __init__(self, model_file: pathlib.Path, config: dict[str, Any]):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{model_file}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size = self.sp.vocab_size()
        piece = lambda i: self.sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
        self._read_specials(config, piece(self.sp.bos_id()), piece(self.sp.eos_id()))
        # LLaMA's convention, which HF's LlamaTokenizer also defaults to: BOS yes, EOS no.
        self.add_bos = bool(config.get("add_bos_token", True)) and self.bos_id is not None
        self.add_eos = bool(config.get("add_eos_token", False)) and self.eos_id is not None

    def id_of(self, name: str) -> int | None:
        token_id = self.sp.piece_to_id(name)
        return token_id if self.sp.id_to_piece(token_id) == name else None

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        if add_special:
            ids = [self.bos_id] * self.add_bos + ids + [self.eos_id] * self.add_eos
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def encode_with_specials(self, text: str) -> list[int]:
        specials = {self.token_text(i): i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        if not specials:
            return self.sp.encode(text)
        ids = []
        for part in re.split(f"({'|'.join(map(re.escape, specials))})", text):
            ids += [specials[part]] if part in specials else self.sp.encode(part) if part else []
        return ids


class HFTokenizer(Tokenizer):
    backend = "tokenizers"

    def __init__(self, json_file: pathlib.Path, config: dict[str, Any]):
        import tokenizers

        try:
            self.tok = tokenizers.Tokenizer.from_file(str(json_file))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise UserError(f"{json_file}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        # Special-token text inside a document (a note quoting "<|end_of_text|>") stays text, as SentencePiece
        # keeps "</s>": only the pipeline places BOS/EOS, so no corpus can inject them.
        self.tok.encode_special_tokens = True
        self._read_specials(config, None, None)
        # The file's post-processor decides; an empty text shows what it adds.
        added = self.tok.encode("", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and added[:1] == [self.bos_id]
        self.add_eos = self.eos_id is not None and added[-1:] == [self.eos_id]

    def id_of(self, name: str) -> int | None:
        return self.tok.token_to_id(name)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tok.id_to_token(int(token_id))

    def encode_with_specials(self, text: str) -> list[int]:
        self.tok.encode_special_tokens = False
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = True


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """A tokenizer from a `tokenizer.model` / `tokenizer.json` file or a checkpoint folder holding one.

    In a folder, `tokenizer.model` (SentencePiece, LLaMA-2's own) wins over `tokenizer.json`.
    """
    path = pathlib.Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = next((path / name for name in TOKENIZER_MODEL_FILES if (path / name).is_file()), None)
        if path is None:
            raise UserError(f"{folder}: no tokenizer.model or tokenizer.json in this folder")
    elif not path.is_file():
        raise UserError(f"{path}: tokenizer file not found")

    config_file = folder / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{config_file}:{e.lineno}: invalid JSON ({e.msg})") from None

    if path.suffix == ".json":
        tokenizer: Tokenizer = HFTokenizer(path, config)
    else:
        tokenizer = SentencePieceTokenizer(path, config)
    tokenizer.files = [path] + [folder / n for n in TOKENIZER_FILES if (folder / n).is_file() and folder / n != path]
    return tokenizer


def check_vocab(tokenizer: Tokenizer, model_vocab: int, where: str) -> None:
    """Refuse a tokenizer whose vocabulary differs from the model's embedding table."""
    if tokenizer.vocab_size != model_vocab:
        raise UserError(
            f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_vocab}"
        )


def write_hf_tokenizer_json(tokenizer: SentencePieceTokenizer, out_dir: pathlib.Path, base_config: dict) -> None:
    """`tokenizer.json` + `tokenizer_config.json` that make `AutoTokenizer` give SentencePiece's exact ids.

    transformers 5 rebuilds `LlamaTokenizer(Fast)` from the vocab with its own whitespace handling, which
    differs from SentencePiece on leading and repeated spaces; a `PreTrainedTokenizerFast` loads our
    `tokenizer.json` untouched. The file mirrors the model's settings: dummy prefix, spaces escaped to
    "▁", BPE merges ranked by the merged piece's score, byte fallback, BOS/EOS from the checkpoint.
    `split_special_tokens` keeps a literal "</s>" in text as text, as SentencePiece does. Settings that
    do not change ids (chat template, length, padding side) are kept from `base_config`.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizerFile
    from tokenizers.models import BPE

    proto = pb.ModelProto.FromString(tokenizer.sp.serialized_model_proto())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    kinds = {p.type for p in proto.pieces}
    if (
        trainer.model_type != pb.TrainerSpec.BPE
        or norm.precompiled_charsmap
        or norm.remove_extra_whitespaces
        or not norm.add_dummy_prefix
        or trainer.treat_whitespace_as_suffix
        or pb.ModelProto.SentencePiece.USER_DEFINED in kinds
        or tokenizer.bos_id is None
        or tokenizer.eos_id is None
    ):
        raise UserError(f"{tokenizer.files[0]}: only LLaMA-style SentencePiece BPE models export as tokenizer.json")
    normal_kind = pb.ModelProto.SentencePiece.NORMAL
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == normal_kind}
    ranked = sorted(
        (rank, piece[:k], piece[k:])
        for piece, rank in normal.items()
        for k in range(1, len(piece))
        if piece[:k] in normal and piece[k:] in normal
    )
    unk = proto.pieces[trainer.unk_id].piece
    bos, eos = tokenizer.sp.id_to_piece(tokenizer.bos_id), tokenizer.sp.id_to_piece(tokenizer.eos_id)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = [(left, right) for _, left, right in ranked]
    out = HFTokenizerFile(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback))
    out.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    out.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    single = [f"{bos}:0"] * tokenizer.add_bos + ["$A:0"] + [f"{eos}:0"] * tokenizer.add_eos
    specials = [(t, vocab[t]) for t, on in ((bos, tokenizer.add_bos), (eos, tokenizer.add_eos)) if on]
    out.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=specials)
    out.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((unk, bos, eos))])
    out.save(str(out_dir / "tokenizer.json"))
    config = {
        **{k: base_config[k] for k in ("chat_template", "model_max_length", "padding_side") if k in base_config},
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{k}_token": v for k, v in (("bos", bos), ("eos", eos), ("unk", unk))},
        "pad_token": None if tokenizer.pad_id is None else tokenizer.sp.id_to_piece(tokenizer.pad_id),
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": tokenizer.add_eos,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
