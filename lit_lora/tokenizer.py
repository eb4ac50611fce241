"""Text <-> token ids, with the tokenizer the checkpoint was trained with.

Two kinds of tokenizer files exist among Llama-architecture models, and `Tokenizer` reads both:

  * SentencePiece (`tokenizer.model`): Llama 2, TinyLlama, llama2.c's stories models. 32,000 pieces,
    BOS 1 and EOS 2 built into the model file; words carry their leading space as "▁".
  * Hugging Face `tokenizers` (`tokenizer.json` + `tokenizer_config.json`): Llama 3.x and SmolLM2 use
    byte-level BPE (Sennrich et al. 2016 on UTF-8 bytes, as GPT-2): every byte is a symbol, so any text
    encodes without unknown tokens. The special tokens (Llama 3's <|begin_of_text|> = 128000,
    <|eot_id|> = 128009; SmolLM2's <|im_start|>, <|im_end|>) are "added tokens" matched in the text
    before BPE runs. Which of them are BOS and EOS, and whether BOS starts every sequence, is written in
    `tokenizer_config.json` (SmolLM2 adds no BOS), and `generation_config.json` may list more ids that
    end a generation.

Whatever the backend, callers see the same few values: `bos_id`, `eos_id`, `add_bos`, `stop_ids` (every
id that ends an answer), `vocab_size`, never constants.
"""

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from sentencepiece import SentencePieceProcessor

from lit_lora.files.checkpoint import HF_TOKENIZER_NAME, TOKENIZER_NAME, tokenizer_file


# Tokens that close an assistant turn in the chat templates lit-lora lays out (lit_lora/prompts.py):
# Llama 3's and ChatML's. A model whose vocabulary has one stops generating there, even a base model
# whose generation_config names only its end-of-text token: these never occur inside ordinary text.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")


class Tokenizer:
    """The tokenizer in `path`: a checkpoint directory, a `tokenizer.model` or a `tokenizer.json`."""

    def __init__(self, path: Union[str, Path]) -> None:
        path = Path(path)
        if path.is_dir():
            found = tokenizer_file(path)
            if found is None:
                raise FileNotFoundError(f"no tokenizer in {path}: expected {TOKENIZER_NAME} (SentencePiece) or "
                                        f"{HF_TOKENIZER_NAME} (Hugging Face); download or copy it there")
            path = found
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (download or copy {path.name} there)")
        self.model_path = path
        if path.suffix == ".json":
            self._init_huggingface(path)
        else:
            self._init_sentencepiece(path)

    def _init_sentencepiece(self, path: Path) -> None:
        self.processor = SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path} is not a readable SentencePiece model ({error})") from None
        self.backend, self.vocab_size = "sentencepiece", self.processor.vocab_size()
        self.bos_id, self.eos_id, self.add_bos = self.processor.bos_id(), self.processor.eos_id(), True
        self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else None
        self.stop_ids: Tuple[int, ...] = (self.eos_id,)
        self.chat_template: Optional[str] = None
        self.special_tokens: Dict[str, str] = {}

    def _init_huggingface(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a readable Hugging Face tokenizer.json ({error})") from None
        self.backend, self.vocab_size = "huggingface", self.hf.get_vocab_size(with_added_tokens=True)
        settings = _read_json(path.parent / "tokenizer_config.json")
        generation = _read_json(path.parent / "generation_config.json")
        self.special_tokens = {}
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = settings.get(role)
            token = token.get("content") if isinstance(token, dict) else token  # saved as an AddedToken dict
            if isinstance(token, str):
                if self.hf.token_to_id(token) is None:
                    raise ValueError(f"{path.parent / 'tokenizer_config.json'}: {role} {token!r} is not in {path}")
                self.special_tokens[role] = token
        ids = {role: self.hf.token_to_id(token) for role, token in self.special_tokens.items()}
        self.bos_id = ids.get("bos_token", generation.get("bos_token_id"))
        eos_ids = generation.get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        self.eos_id = ids.get("eos_token", eos_ids[0] if eos_ids else None)
        if self.eos_id is None:
            raise ValueError(f"{path.parent}: no eos_token in tokenizer_config.json and no eos_token_id in "
                             "generation_config.json: the model's end of text is unknown")
        self.pad_id = ids.get("pad_token", generation.get("pad_token_id"))
        # Whether a sequence starts with BOS: tokenizer.json's post-processor decides when it adds special tokens
        # (Llama 3's adds <|begin_of_text|>), as in transformers; otherwise tokenizer_config.json's add_bos_token
        # (what llama.cpp's GGUF files and the older Llama tokenizer classes record), by default none.
        with_specials = self.hf.encode("a").ids
        if len(with_specials) > len(self.hf.encode("a", add_special_tokens=False).ids):
            self.add_bos = with_specials[0] == self.bos_id
        else:
            self.add_bos = settings.get("add_bos_token") is True and self.bos_id is not None
        end_of_turn = [self.hf.token_to_id(token) for token in END_OF_TURN_TOKENS]
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *eos_ids, *(i for i in end_of_turn if i is not None)]))
        self.chat_template = _chat_template(path.parent, settings)

    @property
    def special_tags(self) -> Tuple[str, ...]:
        """The text of every special token: a message containing one would smuggle a control token into a
        dialog (the tokenizer matches them inside text)."""
        if self.backend == "sentencepiece":
            return ()
        return tuple(token.content for token in self.hf.get_added_tokens_decoder().values() if token.special)

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a special token such as "<|eot_id|>", None when the vocabulary lacks it."""
        if self.backend == "sentencepiece":
            piece = self.processor.PieceToId(token)
            return None if piece == self.processor.unk_id() else piece
        return self.hf.token_to_id(token)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """The ids of each text, without BOS/EOS, in one call (SentencePiece on torch's threads, Hugging Face
        tokenizers on its own thread pool)."""
        if self.backend == "sentencepiece":
            return self.processor.encode(list(texts), out_type=int, num_threads=torch.get_num_threads())
        return [encoding.ids for encoding in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: Optional[int] = None) -> torch.Tensor:
        """Token ids of `text` as a 1-D LongTensor, cut to `max_length`. `bos`: start it as the model's
        sequences start (with BOS, unless the model adds none); `eos`: end it with EOS."""
        ids = self.encode_batch([text])[0]
        if bos and self.add_bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        if max_length is not None:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Union[torch.Tensor, Iterable[int]]) -> str:
        """Text of `ids`; BOS, EOS and the stop ids decode to nothing (other special tokens to their text)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self.backend == "sentencepiece":
            return self.processor.DecodeIds(list(ids))
        control = {self.bos_id, self.pad_id, *self.stop_ids}
        return self.hf.decode([i for i in ids if i not in control], skip_special_tokens=False)


def _read_json(path: Path) -> Dict[str, Any]:
    """A side file as a dict; {} when it is absent (each of them is optional)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _chat_template(directory: Path, settings: Dict[str, Any]) -> Optional[str]:
    """The model's chat template (Jinja): `chat_template.jinja` (newer transformers) or the tokenizer_config
    entry, which is a string or a list of named templates of which "default" is the chat format."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
