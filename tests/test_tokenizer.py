"""Tokenizers against their reference libraries: SentencePiece itself, and `tokenizers` for tokenizer.json."""

import json
import shutil

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from mellama_jax.data.tokenizer import check_vocab, load_tokenizer
from mellama_jax.errors import UserError

TEXTS = [
    "",
    "Metformin 500 mg PO BID; HbA1c 7.2%.",
    " leading space",
    "  two leading spaces",
    "Pt c/o SOB, BP 120/80 mmHg, HR 110 bpm, T 38.4°C, SpO2 91% on RA.",
    "β-blockers and ACE-inhibitors reduce mortality (HR 0.74, 95% CI 0.66–0.83).",
    "EGFR T790M / L858R; IL-6 ≥ 7 pg/mL",
    "糖尿病 (diabetes), Ödem, naïve",
    "emoji 🩺 and tabs\tand\nnewlines\n",
    "1,234,567.89 mmol/L ×10⁹",
    "Human: \nWhat is the dose?\n\nAssistant: \n",
]


@pytest.fixture(scope="module")
def llama2(shared_data):
    return shared_data / "llama2_tokenizer.model"


def test_llama2_ids_equal_sentencepiece(llama2):
    reference = spm.SentencePieceProcessor(model_file=str(llama2))
    ours = load_tokenizer(llama2)
    assert (ours.backend, ours.vocab_size, ours.add_bos, ours.add_eos) == ("sentencepiece", 32000, True, False)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        reference.piece_to_id("<s>"),
        reference.piece_to_id("</s>"),
        None,
    )
    for text in TEXTS:
        assert ours.encode(text) == [ours.bos_id, *reference.encode(text)], text
        assert ours.encode(text, add_special=False) == reference.encode(text), text
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text)), text


def test_llama2_literal_special_token_text_stays_text(llama2):
    # Clinical text may contain "</s>" literally; it must never turn into an end-of-document id.
    ours = load_tokenizer(llama2)
    assert ours.eos_id not in ours.encode("note </s> continues", add_special=False)


def test_folder_settings_from_tokenizer_config(tmp_path, llama2):
    shutil.copy(llama2, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True}))
    ours = load_tokenizer(tmp_path)
    assert ours.encode("fever") == [*spm.SentencePieceProcessor(model_file=str(llama2)).encode("fever"), ours.eos_id]
    assert [f.name for f in ours.files] == ["tokenizer.model", "tokenizer_config.json"]


def byte_level_bpe(folder, with_bos: bool):
    """A byte-level BPE tokenizer.json trained here on a few clinical sentences (GPT-2/Llama-3 style)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    config = {"eos_token": "<|end_of_text|>"}
    if with_bos:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
        config["bos_token"] = "<|begin_of_text|>"
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("with_bos", [False, True])
def test_byte_level_bpe_ids_equal_tokenizers(tmp_path, with_bos):
    reference = byte_level_bpe(tmp_path, with_bos)
    ours = load_tokenizer(tmp_path)
    assert ours.backend == "tokenizers"
    assert ours.add_bos is with_bos and ours.add_eos is False
    assert ours.bos_id == (reference.token_to_id("<|begin_of_text|>") if with_bos else None)
    assert ours.eos_id == reference.token_to_id("<|end_of_text|>")
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == text  # byte-level BPE is lossless


def test_byte_level_special_token_text_in_a_document_stays_text(tmp_path):
    byte_level_bpe(tmp_path, with_bos=False)
    ours = load_tokenizer(tmp_path)
    ids = ours.encode("<|end_of_text|>", add_special=False)
    assert ours.eos_id not in ids and len(ids) > 3  # several ordinary tokens, never the EOS id


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}: no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="absent.model: tokenizer file not found"):
        load_tokenizer(tmp_path / "absent.model")


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="tokenizer.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(UserError, match="tokenizer.json: not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_bad_tokenizer_config(tmp_path, llama2):
    shutil.copy(llama2, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text('{\n"bos_token": }')
    with pytest.raises(UserError, match=r"tokenizer_config.json:2: invalid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>"}))
    with pytest.raises(UserError, match=r"bos_token '<\|bos\|>' is not in the vocabulary"):
        load_tokenizer(tmp_path)


def test_vocab_mismatch_is_refused(llama2):
    check_vocab(load_tokenizer(llama2), 32000, "model_config.json")
    with pytest.raises(
        UserError, match="model_config.json: tokenizer has 32000 tokens but the model's vocab_size is 32001"
    ):
        check_vocab(load_tokenizer(llama2), 32001, "model_config.json")
