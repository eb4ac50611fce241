"""A thin wrapper around SentencePiece, the tokenizer Llama 2 was trained with."""

from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from sentencepiece import SentencePieceProcessor


class Tokenizer:
    """Text <-> token ids with Llama 2's SentencePiece model (32,000 pieces; bos 1, eos 2, no pad)."""

    def __init__(self, model_path: Union[str, Path]) -> None:
        model_path = Path(model_path)
        if model_path.is_dir():
            model_path = model_path / "tokenizer.model"
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_path} (download or copy tokenizer.model there)")
        self.processor = SentencePieceProcessor()
        try:
            self.processor.Load(str(model_path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{model_path} is not a readable SentencePiece model ({error})") from None
        self.model_path = model_path

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False, max_length: Optional[int] = None) -> torch.Tensor:
        """Token ids of `text` as a 1-D LongTensor, with BOS/EOS if asked and cut to `max_length`."""
        ids = self.processor.EncodeAsIds(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        if max_length is not None:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Union[torch.Tensor, Iterable[int]]) -> str:
        """Text of `ids`; BOS/EOS and other control pieces decode to nothing."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.processor.DecodeIds(list(ids))
