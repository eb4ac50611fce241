"""A multi-turn conversation with a model, in its chat format (Llama 2's, Llama 3's or ChatML), its keys
and values kept in the KV cache from one turn to the next.

Each turn lays the whole dialog out again (`prompts.encode_dialog`: every finished exchange with its
BOS and EOS, or the chat template's end-of-turn token, then the new question), compares those ids with
the ones the KV cache already holds, and
feeds the model only the difference: usually the space and EOS that close the last answer, and the new
question. The answers are therefore exactly those of a generation from scratch over the formatted
history (greedy decoding gives the same tokens), at the cost of one turn's tokens instead of the whole
conversation's.

    turn 1   cache: []                           prefill  [BOS] [INST] hi [/INST]           then decode
    turn 2   cache: [BOS] [INST] hi [/INST] a1   prefill  ▁ [EOS] [BOS] [INST] more [/INST] then decode
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from lit_lora.generate import generate
from lit_lora.model import Llama
from lit_lora.prompts import check_dialog, dialog_tags, encode_dialog
from lit_lora.tokenizer import Tokenizer


@dataclass
class Turn:
    """What one turn did: the answer, how many tokens were fed to the model for it (the prompt tokens the
    cache did not hold yet), the new tokens generated, and the context positions left afterwards."""

    answer: str
    prefilled: int
    generated: int
    room_left: int


class Chat:
    """A conversation with `model`. `respond(text)` adds a user turn and returns the model's answer;
    `reset()` starts afresh. The model's KV cache belongs to the conversation while it lasts."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, system: Optional[str] = None, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> None:
        if system:  # refused now, not at every turn
            try:
                check_dialog([{"role": "system", "content": system}, {"role": "user", "content": "?"}], ends_with="user")
            except ValueError as problem:
                raise ValueError(f"the system message cannot be used: {problem}") from None
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_new_tokens = max_new_tokens
        self.block_size = model.config.block_size
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and empty the KV cache."""
        self.messages: List[Dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.cached_ids: List[int] = []  # the tokens whose keys and values the KV cache holds, in order
        device = self.model.tok_embeddings.weight.device
        self.model.set_kv_cache(batch_size=1, max_seq_length=self.block_size, device=device)

    def prompt_ids(self, text: str) -> List[int]:
        """The ids of the whole conversation with `text` as the next user turn (a ValueError for text the
        format cannot carry, e.g. one of its tags)."""
        question = {"role": "user", "content": text}
        check_dialog([*self.messages[:1], question] if self.system else [question], ends_with="user",
                     tags=dialog_tags(self.tokenizer))
        return encode_dialog(self.tokenizer, [*self.messages, question], check=False)[0]

    def respond(self, text: str, on_token: Optional[Callable[[torch.Tensor], None]] = None) -> Turn:
        """Answer the user's `text`, streaming each new token to `on_token`. A ValueError when the
        conversation so far and this turn no longer fit the model's context (then `reset()`)."""
        ids = self.prompt_ids(text)
        if len(ids) >= self.block_size:
            alone = encode_dialog(self.tokenizer, [*self.messages[:1], {"role": "user", "content": text}] if self.system
                                  else [{"role": "user", "content": text}], check=False)[0]
            if len(alone) >= self.block_size:  # starting afresh cannot help
                raise ValueError(f"this message alone takes {len(alone)} of the model's {self.block_size} context "
                                 "positions (with the system message, if any): shorten it")
            raise ValueError(f"the conversation would take {len(ids)} of the model's {self.block_size} context "
                             "positions: start afresh (/reset)")
        cached = 0
        while cached < min(len(self.cached_ids), len(ids) - 1) and self.cached_ids[cached] == ids[cached]:
            cached += 1  # the longest prefix the KV cache already holds (leaving at least one token to feed)
        output = generate(self.model, torch.tensor(ids), min(self.max_new_tokens, self.block_size - len(ids)),
                          eos_id=self.tokenizer.stop_ids, on_token=on_token, cached=cached, **self.sampling)
        new = output[len(ids):].tolist()
        self.cached_ids = output[:-1].tolist()  # the last token sampled was never fed to the model
        answer = self.tokenizer.decode([t for t in new if t not in self.tokenizer.stop_ids])
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return Turn(answer, len(ids) - cached, len(new), self.block_size - len(output))
