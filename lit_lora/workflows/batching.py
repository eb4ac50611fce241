"""Continuous batching: requests join the running batch between decoding steps, and leave it when done.

Why batch at all. Decoding one token is a matrix-vector product against every weight: its speed is
bounded by how fast the weights stream from memory (lit_lora/generate.py). Sixteen rows decoded together
read the weights once for all sixteen, so one step costs little more than a step of one row: the
throughput of a server grows almost with the number of rows it decodes together.

Why continuously. `generate()` with a list of prompts is static batching: the batch starts together and
lasts until its longest answer ends; a request arriving meanwhile waits for all of it, and rows that
finished early idle. Here (as in Orca, Yu et al. 2022, and vLLM) the batch is re-formed between any two
steps: a finished row leaves at once and a waiting request joins at the next step.

    step        1    2    3    4    5    6    7
    request a   d    d    d    d    EOS                    d: one decoded token
    request b        P    d    d    d    d    d            P: prefill (the prompt in one forward pass)
    request c                       P    d    d            c joins while b is still decoding

The KV cache rows it reuses. The batch's KV cache (one per layer, `max_batch_size` rows x
`cache_length` positions) is allocated once. Every row writes its next key and value into the same
column s (one `input_pos` for the batch, as `Llama.forward` takes it), so rows of different lengths are
left-padded, exactly as `generate()` pads prompts of different lengths: row b's tokens fill the
columns just before s, `left_pad[b]` columns before them are skipped by the mask, and its rotary
positions count from its own first token, so every row computes what it would alone.

    columns       0  1  2  3  4  5  6  7  8 | s = 9
    row 0 (a)     .  .  .  p  p  p  d  d  d |          left_pad 3
    row 1 (b)     p  p  p  p  p  p  p  d  d |          left_pad 0
    row 2 (c)     .  .  .  .  .  .  p  p  p |          joined at step 7: its prompt's keys and values,
                                                       prefilled apart, copied into the columns before s

A new request is prefilled on its own small KV cache (with the other newcomers of that step, left-padded
together), then its keys and values are copied into a free row of the batch's cache, ending at column s
(if its prompt is longer than s, all rows first move right to make room); the row a finished request
leaves is filled by the batch's last row, so the rows stay contiguous. When s
would pass the end of the cache, or the padding every row skips grows past half of s, all rows move left
by the padding they share (`_realign`): the attention then reads only useful columns again.

What it does not do (vLLM does): paged KV memory (here each row reserves `cache_length` positions),
prefill in chunks mixed with decoding steps (here a long prompt's prefill delays one step of the others),
and sharing the keys of a common prompt prefix between rows.

Rows of one batch may use different adapters (lit_lora/workflows/row_adapters.py). Sampling is per row,
with each request's own settings and random generator (a seed gives the same answer in any batch).
"""

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lit_lora.generate import sample_next_token
from lit_lora.model import KVCache, Llama
from lit_lora.workflows.row_adapters import RowAdapters


log = logging.getLogger("lit_lora.serve")


@dataclass(eq=False)
class Request:
    """One generation. `emit(token_id, finish_reason)` is called from the engine's thread after every new
    token (finish_reason None while it continues, else "stop" for a stop token, "length" for
    max_new_tokens or the end of the context, "cancelled"), or `emit(None, "error: <message>")` once on
    a failure of the engine."""

    prompt_ids: List[int]
    max_new_tokens: int
    emit: Callable[[Optional[int], Optional[str]], None]
    adapter: int = 0  # 0: the base model; i: RowAdapters.names[i - 1]
    temperature: float = 0.0
    top_p: Optional[float] = None
    generator: Optional[torch.Generator] = None
    ignore_stop: bool = False  # decode all max_new_tokens (benchmarks)
    generated: int = 0
    cancelled: bool = False
    done: bool = False  # emitted its finish_reason


@dataclass
class Metrics:
    """What the engine did: forward passes (decoding steps and prefills) and how full they were."""

    decode_steps: int = 0
    rows_decoded: int = 0  # sum over steps of the rows in the step
    max_rows: int = 0
    mixed_steps: int = 0  # steps whose rows used more than one adapter (or the base and an adapter)
    max_adapters: int = 0  # the most different adapters in one step
    prefills: int = 0
    prefilled_requests: int = 0
    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    in_flight: int = 0
    waiting: int = 0

    def as_dict(self) -> Dict[str, object]:
        values = dict(self.__dict__)
        values["mean_rows"] = self.rows_decoded / self.decode_steps if self.decode_steps else 0.0
        return values


class Engine:
    """Decodes every admitted `Request` in one continuously re-formed batch, on a thread of its own.

    submit() queues a request (False when `max_batch_size + max_waiting` requests are already in flight),
    cancel() frees its row at the next step, close() stops the thread (cancelling what is left)."""

    def __init__(self, model: Llama, adapters: Optional[RowAdapters], stop_ids: Sequence[int],
                 max_batch_size: int = 16, max_waiting: int = 64, cache_length: Optional[int] = None) -> None:
        if max_batch_size < 1 or max_waiting < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_waiting >= 0, got {max_batch_size}, {max_waiting}")
        self.model, self.adapters, self.stop_ids = model, adapters, set(stop_ids)
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.cache_length = min(cache_length or model.config.block_size, model.config.block_size)
        self.device = model.tok_embeddings.weight.device
        model.set_kv_cache(max_batch_size, self.cache_length, device=self.device)
        self.caches = [block.attn.kv_cache for block in model.layers]
        self.rows: List[Request] = []  # row b of the batch's KV cache decodes rows[b]
        self.left_pad = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,)
        self.last_ids: List[int] = []  # each row's newest token, not yet fed to the model
        self.write_slot = 0  # the cache column every row writes its next key and value to
        self.waiting: List[Request] = []
        self.metrics = Metrics()
        self.lock = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="lit-lora-engine", daemon=True)

    # --- the other threads' side ---------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> bool:
        with self.lock:
            if self.closing or self.metrics.in_flight >= self.max_batch_size + self.max_waiting:
                self.metrics.rejected += 1
                return False
            self.waiting.append(request)
            self.metrics.in_flight += 1
            self.metrics.waiting = len(self.waiting)
            self.lock.notify()
            return True

    def cancel(self, request: Request) -> None:
        with self.lock:
            request.cancelled = True
            self.lock.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # --- the engine's thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.rows or self.closing):
                    self.lock.wait()
                if self.closing:
                    break
                self._finish([r for r in self.waiting if r.cancelled], "cancelled")
                self.waiting = [r for r in self.waiting if not r.cancelled]
                room = self.max_batch_size - len(self.rows)
                newcomers, self.waiting = self.waiting[:room], self.waiting[room:]
                self.metrics.waiting = len(self.waiting)
            try:
                if newcomers:
                    self._prefill(newcomers)
                self._leave([b for b, r in enumerate(self.rows) if r.cancelled], "cancelled")
                if self.rows:
                    self._decode_step()
            except Exception as error:  # a failure (out of memory...) ends the requests it touched, not the server
                log.exception("engine step failed")
                failed = newcomers + self.rows
                self.rows, self.last_ids, self.write_slot = [], [], 0
                self.left_pad = self.left_pad[:0]
                self._finish(failed, f"error: {error}")
        with self.lock:
            self._finish(self.rows + self.waiting, "cancelled")
            self.rows, self.waiting = [], []

    def _finish(self, requests: Sequence[Request], reason: str, token: Optional[int] = None) -> None:
        for request in (r for r in requests if not r.done):
            request.done = True
            request.emit(token, reason)
            with self.lock:
                self.metrics.in_flight -= 1
                self.metrics.finished += reason in ("stop", "length")
                self.metrics.cancelled += reason == "cancelled"

    def _forward(self, ids: torch.Tensor, input_pos: torch.Tensor, left_pad: torch.Tensor,
                 adapters: Sequence[int]) -> torch.Tensor:
        """Logits of the last position (B, V) of `ids` (B, T), each row with its own adapter."""
        if self.adapters is not None:
            self.adapters.use(adapters)
        with torch.inference_mode():
            return self.model(ids, input_pos, left_pad=left_pad)[:, -1]

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> List[int]:
        """Each row's next token with its own settings: greedy rows by one argmax, sampled rows one by one."""
        chosen = logits.float().argmax(dim=-1)  # (B,)
        for b, request in enumerate(requests):
            if request.temperature > 0:
                chosen[b] = sample_next_token(logits[b:b + 1], request.temperature, None, request.top_p, request.generator)[0]
        return chosen.tolist()

    def _advance(self, requests: Sequence[Request], tokens: Sequence[int]) -> List[bool]:
        """Hand every request its new token; returns for each whether it goes on."""
        going_on = []
        for request, token in zip(requests, tokens):
            request.generated += 1
            self.metrics.tokens += 1
            length = len(request.prompt_ids) + request.generated
            reason = None
            if token in self.stop_ids and not request.ignore_stop:
                reason = "stop"
            elif request.generated >= request.max_new_tokens or length >= self.cache_length:
                reason = "length"
            if reason is None:
                request.emit(token, None)
            else:
                self._finish([request], reason, token)
            going_on.append(reason is None)
        return going_on

    def _prefill(self, newcomers: List[Request]) -> None:
        """Run the newcomers' prompts in one left-padded forward pass on a KV cache of their own, sample
        their first tokens, and copy the keys and values of those that go on into free rows of the batch."""
        lengths = [len(r.prompt_ids) for r in newcomers]
        width = max(lengths)
        pad = torch.tensor([width - n for n in lengths], device=self.device)  # (k,)
        tokens = torch.zeros(len(newcomers), width, dtype=torch.long, device=self.device)  # (k, width)
        for row, request in enumerate(newcomers):
            tokens[row, width - lengths[row]:] = torch.tensor(request.prompt_ids, device=self.device)
        config = self.model.config
        own = [KVCache(len(newcomers), config.n_kv_heads, width, config.head_size, device=self.device,
                       dtype=cache.k.dtype) for cache in self.caches]
        for block, cache in zip(self.model.layers, own):
            block.attn.kv_cache = cache
        try:
            logits = self._forward(tokens, torch.arange(width, device=self.device), pad, [r.adapter for r in newcomers])
        finally:
            for block, cache in zip(self.model.layers, self.caches):
                block.attn.kv_cache = cache
        self.metrics.prefills += 1
        self.metrics.prefilled_requests += len(newcomers)
        first = self._sample(logits, newcomers)
        going_on = [b for b, on in enumerate(self._advance(newcomers, first)) if on]
        if not going_on:
            return
        if not self.rows:
            self.write_slot = width
        elif self.write_slot < width:  # room for the longest prompt before the shared column
            self._realign(max(width, self._longest()))
        start, count = len(self.rows), len(going_on)
        index = torch.tensor(going_on, device=self.device)
        for cache, theirs in zip(self.caches, own):
            columns = slice(self.write_slot - width, self.write_slot)
            cache.k[start:start + count, :, columns] = theirs.k[index]
            cache.v[start:start + count, :, columns] = theirs.v[index]
        self.rows += [newcomers[b] for b in going_on]
        self.last_ids += [first[b] for b in going_on]
        self.left_pad = torch.cat([self.left_pad, self.write_slot - width + pad[index]])

    def _longest(self) -> int:
        """The most cache columns any row fills (its tokens so far but the newest)."""
        return self.write_slot - int(self.left_pad.min())

    def _realign(self, write_slot: int) -> None:
        """Move every row's keys and values so that they end just before column `write_slot`."""
        keep = self._longest()
        B, old = len(self.rows), slice(self.write_slot - keep, self.write_slot)
        for cache in self.caches:
            cache.k[:B, :, write_slot - keep:write_slot] = cache.k[:B, :, old].clone()
            cache.v[:B, :, write_slot - keep:write_slot] = cache.v[:B, :, old].clone()
        self.left_pad += write_slot - self.write_slot
        self.write_slot = write_slot

    def _decode_step(self) -> None:
        """Feed every row its newest token at the shared column, sample the next, and let finished rows leave."""
        if self.write_slot >= self.cache_length or int(self.left_pad.min()) > self.write_slot // 2:
            self._realign(self._longest())
        adapters = [r.adapter for r in self.rows]
        ids = torch.tensor(self.last_ids, device=self.device)[:, None]  # (B, 1)
        logits = self._forward(ids, torch.tensor([self.write_slot], device=self.device), self.left_pad, adapters)
        self.write_slot += 1
        self._count(adapters)
        self.last_ids = self._sample(logits, self.rows)
        going_on = self._advance(self.rows, self.last_ids)
        self._leave([b for b, on in enumerate(going_on) if not on], reason=None)

    def _count(self, adapters: Sequence[int]) -> None:
        metrics, distinct = self.metrics, len(set(adapters))
        metrics.decode_steps += 1
        metrics.rows_decoded += len(adapters)
        metrics.max_rows = max(metrics.max_rows, len(adapters))
        metrics.mixed_steps += distinct > 1
        metrics.max_adapters = max(metrics.max_adapters, distinct)
        if metrics.decode_steps % 500 == 0:
            log.info("%d decoding steps, %.1f rows on average; this one: %d rows, %d adapters", metrics.decode_steps,
                     metrics.rows_decoded / metrics.decode_steps, len(adapters), distinct)

    def _leave(self, rows: Sequence[int], reason: Optional[str]) -> None:
        """Free the batch rows `rows` (finishing their requests with `reason`, unless already finished): the
        last rows of the batch move into the holes, so the rows in use stay 0..B-1."""
        if reason is not None:
            self._finish([self.rows[b] for b in rows], reason)
        for b in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if b != last:
                for cache in self.caches:
                    cache.k[b, :, :self.write_slot] = cache.k[last, :, :self.write_slot]
                    cache.v[b, :, :self.write_slot] = cache.v[last, :, :self.write_slot]
                self.rows[b], self.last_ids[b] = self.rows[last], self.last_ids[last]
                self.left_pad[b] = self.left_pad[last]
            self.rows.pop()
            self.last_ids.pop()
            self.left_pad = self.left_pad[:last]
