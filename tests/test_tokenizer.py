import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from refine.config import RunConfig, fit_to_tokenizer
from refine.models import build_model
from refine.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, resolve_tokenizer,
                             save_tokenizer_files)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fast-weight models keep their whole past in a recurrent state.",
    "Ünïcödé text, emoji 🚀 and numbers 12345 are fine too.",
] * 20


def write_bpe_tokenizer(directory: Path, special_tokens=("<unk>", "<s>", "</s>", "<pad>")) -> RustTokenizer:
    """A small byte-level BPE tokenizer.json trained here, offline."""
    tokenizer = RustTokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


# ---------------------------------------------------------------- ByteTokenizer


def test_byte_tokenizer_round_trips_unicode_and_has_distinct_specials():
    tokenizer = ByteTokenizer()
    text = "héllo wörld 🚀\nline two"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tokenizer.decode(ids) == text
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.sep_id}
    assert len(specials) == 4 and all(256 <= s < tokenizer.vocab_size for s in specials)
    assert tokenizer.vocab_size == 260


def test_byte_tokenizer_decode_drops_specials_and_replaces_broken_utf8():
    tokenizer = ByteTokenizer()
    ids = [tokenizer.bos_id] + tokenizer.encode("ok") + [tokenizer.eos_id]
    assert tokenizer.decode(ids) == "ok"
    rocket = tokenizer.encode("🚀")  # 4 bytes: a cut after 2 must not raise
    assert tokenizer.decode(tokenizer.encode("a") + rocket[:2]) == "a\ufffd"


def test_byte_tokenizer_decode_drops_ids_past_its_vocabulary():
    """A model's vocabulary may be larger than the tokenizer's (check_vocab_fits allows it), so its samples may hold
    ids that name no token: decoding drops them, as the tokenizers library does, instead of failing a whole batch."""
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([104, tokenizer.vocab_size, 105, 50_000]) == "hi"


def test_byte_tokenizer_rejects_bad_input():
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match="token id -1 at position 1 is negative"):
        tokenizer.decode([65, -1])
    with pytest.raises(ValueError, match="token id -1"):
        tokenizer.decode([-1])
    with pytest.raises(TypeError, match="expects str"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_byte_tokenizer_batch_matches_single_and_satisfies_protocol():
    tokenizer = ByteTokenizer()
    texts = ["a", "", "ünï"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert isinstance(tokenizer, Tokenizer)


# ---------------------------------------------------------------- HFTokenizer


def test_hf_tokenizer_loads_offline_and_round_trips(tmp_path):
    rust = write_bpe_tokenizer(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"})
    )
    tokenizer = load_tokenizer(str(tmp_path / "ckpt"))
    assert isinstance(tokenizer, HFTokenizer) and isinstance(tokenizer, Tokenizer)
    assert tokenizer.bos_id == rust.token_to_id("<s>")
    assert tokenizer.eos_id == rust.token_to_id("</s>")
    assert tokenizer.pad_id == rust.token_to_id("<pad>")
    assert tokenizer.vocab_size == rust.get_vocab_size(with_added_tokens=True)
    for text in CORPUS[:3]:
        ids = tokenizer.encode(text)
        assert len(ids) < len(text.encode("utf-8"))  # merges learned: fewer tokens than bytes
        assert tokenizer.decode(ids) == text
    # encode never adds specials; decode skips them
    assert tokenizer.bos_id not in tokenizer.encode("The quick")
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("The quick"), tokenizer.eos_id]) == "The quick"
    assert tokenizer.encode_batch(CORPUS[:3]) == [tokenizer.encode(t) for t in CORPUS[:3]]


def test_hf_tokenizer_special_ids_fall_back_to_config_json_then_names(tmp_path):
    rust = write_bpe_tokenizer(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"bos_token_id": 3, "eos_token_id": [2, 7]}))
    from_config = HFTokenizer(tmp_path / "a")
    assert (from_config.bos_id, from_config.eos_id) == (3, 2)
    assert from_config.pad_id == 2  # no pad token: EOS

    rust = write_bpe_tokenizer(tmp_path / "b")
    by_name = HFTokenizer(tmp_path / "b" / "tokenizer.json")  # a file path works too
    assert by_name.bos_id == rust.token_to_id("<s>") and by_name.eos_id == rust.token_to_id("</s>")


def test_hf_tokenizer_without_eos_or_with_unknown_token_fails_clearly(tmp_path):
    write_bpe_tokenizer(tmp_path / "noeos", special_tokens=("<unk>",))
    with pytest.raises(ValueError, match="names no EOS token"):
        HFTokenizer(tmp_path / "noeos")
    write_bpe_tokenizer(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|missing\|>'.*not in the tokenizer vocabulary"):
        HFTokenizer(tmp_path / "bad")
    write_bpe_tokenizer(tmp_path / "range")
    (tmp_path / "range" / "config.json").write_text(json.dumps({"eos_token_id": 10_000}))
    with pytest.raises(ValueError, match="eos_token_id 10000.*outside the vocabulary"):
        HFTokenizer(tmp_path / "range")
    for name, value in (("true", True), ("float", 2.0), ("text", "2")):
        write_bpe_tokenizer(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps({"eos_token_id": value}))
        with pytest.raises(ValueError, match=f"eos_token_id .* must be an integer token id, got {value!r}"):
            HFTokenizer(tmp_path / name)


def test_load_tokenizer_defaults_and_errors(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*tokenizer.model"):
        load_tokenizer(str(tmp_path / "sp"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        load_tokenizer(str(tmp_path / "broken"))


def test_a_model_directory_is_read_as_bytes_only_when_it_holds_no_tokenizer_file(tmp_path):
    """A checkpoint whose tokenizer.json went missing (its tokenizer_config.json left) was read with the byte tokenizer:
    other ids than it was trained on, silently where the EOS ids agreed."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert isinstance(resolve_tokenizer(None, model_dir), ByteTokenizer)
    (model_dir / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"model directory '{model_dir}' holds a tokenizer's "
                                                r"tokenizer_config.json but no tokenizer.json.*'byte' for the byte"):
        resolve_tokenizer(None, model_dir)
    (model_dir / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json, tokenizer.model but no tokenizer.json.*"
                                                "sentencepiece tokenizer.model converts once"):
        resolve_tokenizer(None, model_dir)
    assert isinstance(resolve_tokenizer("byte", model_dir), ByteTokenizer)  # the remedy named


def test_a_tokenizer_file_the_library_panics_on_is_a_plain_error(tmp_path):
    """The tokenizers library panics (a BaseException, which no `except Exception` catches) on a byte-level BPE
    with a subword prefix longer than some of its merges: the command would end with a Rust traceback."""
    write_bpe_tokenizer(tmp_path / "bpe")
    settings = json.loads((tmp_path / "bpe" / "tokenizer.json").read_text())
    settings["model"]["continuing_subword_prefix"] = "##"
    (tmp_path / "bpe" / "tokenizer.json").write_text(json.dumps(settings))
    # Rust's out-of-bounds panic says "slice index ..." in the tokenizers releases of today, "byte index ..." in 0.15.
    with pytest.raises(ValueError, match=r"cannot read tokenizer file '.*tokenizer\.json': the tokenizers library "
                                         r"fails on its settings \((slice|byte) index"):
        load_tokenizer(str(tmp_path / "bpe"))


def test_save_tokenizer_files_copies_what_load_tokenizer_reads(tmp_path):
    rust = write_bpe_tokenizer(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").rename(tmp_path / "src" / "custom.json")  # a file path, any name
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    original = load_tokenizer(tmp_path / "src" / "custom.json")
    save_tokenizer_files(original, tmp_path / "model")
    copied = load_tokenizer(tmp_path / "model")
    assert copied.encode("some text") == original.encode("some text")
    assert copied.eos_id == original.eos_id == rust.token_to_id("<pad>")  # tokenizer_config.json came along
    save_tokenizer_files(copied, tmp_path / "model")  # into its own directory: the same files, no error
    assert load_tokenizer(tmp_path / "model").encode("some text") == original.encode("some text")
    save_tokenizer_files(ByteTokenizer(), tmp_path / "bytes")  # the byte tokenizer has no files
    assert not (tmp_path / "bytes").exists()


def test_saved_tokenizer_files_are_those_read_though_the_directory_changed_or_went_since(tmp_path):
    write_bpe_tokenizer(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    original = load_tokenizer(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    save_tokenizer_files(original, tmp_path / "changed")
    assert load_tokenizer(tmp_path / "changed").eos_id == original.eos_id  # the <pad> the run ends documents with
    shutil.rmtree(tmp_path / "src")  # a cleaned cache, a renamed folder
    save_tokenizer_files(original, tmp_path / "gone")
    assert sorted(path.name for path in (tmp_path / "gone").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(tmp_path / "gone").encode("some text") == original.encode("some text")


def test_hf_tokenizer_encodes_special_token_text_in_a_document_as_text(tmp_path):
    write_bpe_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    tokenizer = load_tokenizer(tmp_path / "tok")
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    text = "The fox wrote </s> and <pad> and <s> in a post."
    for ids in (tokenizer.encode(text), tokenizer.encode_batch([text])[0]):
        assert not specials & set(ids)  # no EOS in the middle of a document, no pad the loss would skip
        assert tokenizer.decode(ids) == text
    # Where the pipeline adds special tokens, by id, they stay control tokens: decoding drops them.
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("fox"), tokenizer.eos_id]) == "fox"


def write_gapped_tokenizer(directory: Path, top_id: int = 500) -> RustTokenizer:
    """A WordLevel tokenizer.json whose ids have a gap: 12 tokens, "dog" is id `top_id`; EOS is "</s>" (id 2)."""
    words = ["<unk>", "<s>", "</s>", "<pad>", "the", "a", "cat", "sat", "on", "mat", "and"]
    tokenizer = RustTokenizer(models.WordLevel({word: i for i, word in enumerate(words)} | {"dog": top_id},
                                               unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return tokenizer


def test_hf_tokenizer_vocab_size_covers_every_id_of_a_vocabulary_with_gaps(tmp_path):
    rust = write_gapped_tokenizer(tmp_path / "tok")
    assert rust.get_vocab_size(with_added_tokens=True) == 12  # the library counts tokens
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert tokenizer.vocab_size == 501  # one past the highest id
    ids = tokenizer.encode("the dog sat on a mat")
    assert 500 in ids
    # A model fitted to the tokenizer embeds every id it produces.
    small = dict(model_type="delta_net", hidden_size=32, num_heads=2, num_hidden_layers=1, intermediate_size=64,
                 tie_word_embeddings=True)
    config = fit_to_tokenizer(RunConfig(model=small | {"vocab_size": tokenizer.vocab_size}), tokenizer)
    model = build_model(config.model)
    logits = model(torch.tensor([[tokenizer.bos_id, *ids, tokenizer.eos_id]])).logits
    assert logits.shape == (1, len(ids) + 2, 501) and torch.isfinite(logits).all()
    # One too small for the highest id is refused before any lookup (the byte default's 260 held the 12 counted).
    for vocab_size in (260, 500):
        with pytest.raises(ValueError, match=rf"^model has vocab_size={vocab_size}, smaller than the vocabulary of "
                                             rf"tokenizer '.*tok' \(501\): set model\.vocab_size to at least 501$"):
            fit_to_tokenizer(RunConfig(model=small | {"vocab_size": vocab_size}), tokenizer)
