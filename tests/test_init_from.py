"""A run over a converted checkpoint takes the checkpoint's model and tokenizer, and exports them whole.

The checkpoint is shaped like SmolLM2's: RoPE θ 1e5, tied embeddings, a 49152-token byte-level BPE
tokenizer (none of which the default preset has).
"""

import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from mellama_jax.checkpoint import restore_params
from mellama_jax.cli import main
from mellama_jax.config import ModelConfig
from mellama_jax.model.llama import with_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 49152
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LOGIT_TOL = 1e-4  # fp32 both sides; summation order differs


def write_bpe_tokenizer(folder) -> Tokenizer:
    """A byte-level BPE of exactly VOCAB tokens: the 256 byte symbols, then merges of byte pairs."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIALS, *alphabet])}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) < VOCAB:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[0]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def test_a_run_with_only_init_from_trains_and_exports_the_checkpoints_model(tmp_path, capsys):
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e5, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    reference = write_bpe_tokenizer(tmp_path / "hf")
    assert main(["convert", "hf-to-jax", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    notes = ["Patient given 5 mg of warfarin; INR 2.3 at follow-up.", "Metformin was continued for type 2 diabetes."]
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in notes * 20))
    (tmp_path / "run.yaml").write_text(
        f"init_from: {tmp_path / 'ckpt'}\nrun_dir: {tmp_path / 'run'}\nseq_len: 32\nglobal_batch: 8\n"
        f"micro_batches: 1\nsteps: 2\n"
        f"data: {{kind: cpt, sources: [{{name: notes, paths: [{tmp_path / 'notes.jsonl'}]}}]}}\n"
    )
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert (saved["rope_theta"], saved["vocab_size"], saved["tie_embeddings"]) == (1e5, VOCAB, True)

    assert main(["convert", "jax-to-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["rope_theta"], exported["tie_word_embeddings"], exported["bos_token_id"]) == (1e5, True, 0)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.rope_parameters["rope_theta"] == 1e5
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == VOCAB
    assert tokenizer(notes[0], add_special_tokens=False)["input_ids"] == reference.encode(notes[0]).ids

    # the export is the trained run: its logits are our trained params' (through an independent forward pass)
    params = restore_params(tmp_path / "run" / "checkpoints" / "2" / "state")["params"]
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not np.array_equal(np.asarray(params["embed"]), original.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(loaded.model.embed_tokens.weight.detach().numpy(), np.asarray(params["embed"]))
    ids = np.asarray([reference.encode(notes[1]).ids])
    model = ModelConfig(**{**saved, "dtype": "float32"})
    ours, _ = with_params(model, params)(ids, np.arange(ids.shape[1])[None], np.ones_like(ids))
    with torch.no_grad():
        theirs = loaded(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=LOGIT_TOL, rtol=0)
