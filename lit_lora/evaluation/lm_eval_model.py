"""A lit-lora model as an EleutherAI lm-evaluation-harness model, so the harness's tasks run on it.

The harness asks three kinds of question; the log-likelihoods are computed the way its own Hugging Face
model (`HFLM`) computes them (equal within 1e-4 on the same weights), so scores are comparable:

    loglikelihood(context, continuation)   log P(continuation | context) summed over its tokens, and
                                           whether greedy decoding would have produced it
    loglikelihood_rolling(text)            log P(text), over windows of the model's context length
    generate_until(context, until=...)     a greedy (or sampled) continuation, cut at the first stop string

Tokenization follows the harness (`TemplateLM`): context and continuation are encoded together and
split where the context's own ids end, so a continuation whose first characters merge with the
context's last ones ("Answer:" + "- yes") is scored on the ids the model really sees. Contexts start
with BOS, as Llama 2's tokenizer does. lm-eval is an optional extra: `pip install -e ".[eval]"`.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM

from lit_lora.generate import generate
from lit_lora.model import Llama
from lit_lora.tokenizer import Tokenizer


class LitLM(TemplateLM):
    """`model` (any lit-lora Llama, with or without an adapter) and its tokenizer for the harness."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, batch_size: int = 1) -> None:
        super().__init__()
        self.model, self.tokenizer_, self.batch_size = model.eval(), tokenizer, max(1, int(batch_size))
        self._device = model.tok_embeddings.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context, or a rolling window, starts with: BOS, or EOS for a model without one (SmolLM2).
        return self.tokenizer_.bos_id if self.tokenizer_.add_bos else self.tokenizer_.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> List[int]:
        return self.tokenizer_.encode(string, bos=add_special_tokens is not False).tolist()

    def tok_decode(self, tokens: List[int], **kwargs: Any) -> str:
        return self.tokenizer_.decode(tokens)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: List[Tuple[Any, List[int], List[int]]], **kwargs: Any) -> List[Tuple[float, bool]]:
        """Score each (context ids, continuation ids), longest first, `batch_size` rows per forward pass
        (right-padded: a causal model's earlier positions never see the padding)."""
        scored: Dict[int, Tuple[float, bool]] = {}
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            # The model reads every token but the last, at most max_length of them (the context cut on the left).
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chunk]
            batch = torch.zeros(len(chunk), max(map(len, inputs)), dtype=torch.long)  # (B, T)
            for row, ids in enumerate(inputs):
                batch[row, : len(ids)] = torch.tensor(ids)
            logprobs = F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1)  # (B, T, V)
            for row, i in enumerate(chunk):
                continuation = torch.tensor(requests[i][2], device=self._device)
                positions = slice(len(inputs[row]) - len(continuation), len(inputs[row]))  # they predict the continuation
                rows = logprobs[row, positions]  # (len(continuation), V)
                greedy = bool((rows.argmax(dim=-1) == continuation).all())
                scored[i] = (float(rows.gather(1, continuation[:, None]).sum()), greedy)
        return [scored[i] for i in range(len(requests))]

    def loglikelihood_rolling(self, requests: List[Any], disable_tqdm: bool = False) -> List[float]:
        """log P(text) of each request's text, scored in disjoint windows of the context length, each
        predicting its tokens from the ones before (the harness's rolling windows)."""
        results = []
        for (text,) in [request.args for request in requests]:
            windows = [harness_utils.make_disjoint_window(window) for window in harness_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            results.append(sum(logprob for logprob, _ in self._loglikelihood_tokens([(None, *w) for w in windows])))
        return results

    def generate_until(self, requests: List[Any], disable_tqdm: bool = False) -> List[str]:
        """A continuation of each context with the project's `generate` (greedy unless the task asks to
        sample), cut before the first of the task's stop strings. One request at a time: generative tasks
        are the small part of most evaluations."""
        answers = []
        for context, settings in [request.args for request in requests]:
            until = settings.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(settings.get("max_gen_toks", 256))
            temperature = float(settings.get("temperature", 1.0)) if settings.get("do_sample") else 0.0
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new):]  # room for the answer, as HFLM
            output = generate(self.model, torch.tensor(prompt), max_new, temperature=temperature,
                              eos_id=self.tokenizer_.stop_ids)
            text = self.tok_decode(output[len(prompt):].tolist())
            for stop in until:
                text = text.split(stop)[0] if stop else text
            answers.append(text)
        return answers
