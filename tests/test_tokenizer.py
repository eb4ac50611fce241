import pytest

from lit_lora.tokenizer import Tokenizer


def test_llama2_tokenizer_ids(llama2_tokenizer_path):
    tokenizer = Tokenizer(llama2_tokenizer_path)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    assert tokenizer.encode("Hello world, LoRA!").tolist() == [1, 15043, 3186, 29892, 4309, 4717, 29991]
    assert tokenizer.encode("Hello", bos=False, eos=True).tolist() == [15043, 2]
    assert tokenizer.encode("Hello world, LoRA!", max_length=3).tolist() == [1, 15043, 3186]


@pytest.mark.parametrize("text", ["naïve café, Ærøskøbing", "日本語のテキスト 🦙🚀", "∑ x² ≤ ∞\n\ttabs  and  spaces", "Ωmega\r\nline"])
def test_unicode_round_trip(llama2_tokenizer_path, text):
    tokenizer = Tokenizer(llama2_tokenizer_path)
    assert tokenizer.decode(tokenizer.encode(text, eos=True)) == text


def test_directory_path_finds_tokenizer_model(llama2_tokenizer_path):
    assert Tokenizer(llama2_tokenizer_path.parent).vocab_size == 32000


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model is not a readable SentencePiece model"):
        Tokenizer(bad)
