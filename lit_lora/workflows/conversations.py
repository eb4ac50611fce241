"""Conversation data for chat finetuning: read OpenAI- or ShareGPT-style records, lay each dialog out in the
model's chat format (lit_lora/prompts.py: Llama 2's, or the checkpoint's Llama 3 or ChatML template), learn
every answer and its EOS or end-of-turn token, and write the usual prepared train/val files.

Two record shapes are read, from a JSON list or JSON Lines, and give identical samples:

    OpenAI     {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (or content as a
               list of parts, [{"type": "text", "text": "..."}, ...]: their text, joined)
    ShareGPT   {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}

A usable conversation is an optional system message, then user and assistant turns alternating, ending
with an answer; every content non-empty and free of the format's tags ([INST], <|eot_id|>, ...). Anything
else is skipped and counted (or, with `strict`, stops with a one-line error naming the record).

Truncation policy: a conversation longer than `max_seq_length` tokens keeps the longest prefix of whole
(user, answer) exchanges that fits, never half an exchange, since a cut answer would teach the model to
stop mid-sentence with EOS; one whose first exchange alone does not fit is dropped. Both are counted.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lit_lora.data import IGNORE_INDEX
from lit_lora.files.utils import PathLike
from lit_lora.prompts import LLAMA2_CHAT, SPECIAL_TAGS, chat_style, check_dialog, dialog_tags, encode_dialog
from lit_lora.tokenizer import Tokenizer
from lit_lora.workflows.prepare import (MAX_LISTED_PROBLEMS, choose_val_positions, describe_inputs, length_percentiles,
                                        read_records, write_prepared_set)


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
Messages = List[Dict[str, str]]


def to_messages(record: Any, tags: Sequence[str] = SPECIAL_TAGS) -> Messages:
    """The dialog of one record as [{"role", "content"}, ...], checked (no content may hold one of the chat
    format's `tags`); a ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    if isinstance(record.get("messages"), list):
        turns = record["messages"]
        messages = [{"role": t.get("role"), "content": text_of(t.get("content"))} if isinstance(t, dict) else {"role": None}
                    for t in turns]
    elif isinstance(record.get("conversations"), list):
        turns = record["conversations"]
        messages = [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")) if isinstance(t.get("from"), str) else None,
                     "content": t.get("value")} if isinstance(t, dict) else {"role": None} for t in turns]
    else:
        raise ValueError("expected a 'messages' list (OpenAI) or a 'conversations' list (ShareGPT)")
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            try:
                content.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a message holds a lone UTF-16 surrogate, which is not a character") from None
    check_dialog(messages, ends_with="assistant", tags=tags)
    return messages


def text_of(content: Any) -> Any:
    """OpenAI content as text: a string as it is; a list of parts, the text of its text parts joined (a part
    of another type, e.g. an image, leaves the message without usable content)."""
    if not isinstance(content, list):
        return content
    texts = [part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None for part in content]
    return "".join(texts) if texts and all(isinstance(text, str) for text in texts) else None


def fit_dialog(tokenizer: Tokenizer, messages: Messages, max_seq_length: int
               ) -> Tuple[Optional[List[int]], Optional[List[bool]], int, int]:
    """(ids, learned, exchanges dropped, length of the whole dialog) for the longest prefix of whole exchanges
    within `max_seq_length`; ids and learned are None when not even the first exchange fits.

    The whole dialog is encoded once. When it is too long, where its answers end says how many exchanges
    can fit (the ids of a prefix of exchanges are a prefix of the ids), and only that prefix is encoded
    again, on its own, so that it ends as the chat format ends a dialog (ChatML's newline after
    <|im_end|>, say): a few encodings per dialog, not one per exchange."""
    ids, learned = encode_dialog(tokenizer, messages)
    ends = [i + 1 for i in range(len(ids)) if learned[i] and (i + 1 == len(ids) or not learned[i + 1])]
    if len(ids) <= max_seq_length:
        return ids, learned, 0, len(ids)
    system = 1 if messages[0]["role"] == "system" else 0
    kept = sum(1 for end in ends if end <= max_seq_length)
    while kept:
        prefix_ids, prefix_learned = encode_dialog(tokenizer, messages[: system + 2 * kept])
        if len(prefix_ids) <= max_seq_length:
            return prefix_ids, prefix_learned, len(ends) - kept, len(ids)
        kept -= 1
    return None, None, len(ends), len(ids)


def prepare_conversation_data(data_file: PathLike, destination_path: PathLike, tokenizer_path: PathLike, *,
                              file_format: str = "auto", max_seq_length: int = 512,
                              val_split_fraction: float = 0.03865, val_size: Optional[int] = None, seed: int = 42,
                              strict: bool = False) -> Dict[str, Any]:
    """Read, check, split, lay out and write one conversation dataset; returns what prepare_config.json holds."""
    data_file, destination_path = Path(data_file), Path(destination_path)
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    tokenizer = Tokenizer(tokenizer_path)
    style, tags = chat_style(tokenizer), dialog_tags(tokenizer)
    rows = read_records(data_file, file_format)
    val_positions = choose_val_positions(len(rows), val_split_fraction, val_size, seed)

    splits: Dict[str, Tuple[list, list, list]] = {"train": ([], [], []), "val": ([], [], [])}
    counts = {"records_read": len(rows), "kept": 0, "truncated": 0, "turns_dropped": 0, "dropped_malformed": 0,
              "dropped_too_long": 0, "dropped_prompt_too_long": 0}
    problems, lengths = [], []
    for position, (where, record, parse_error) in enumerate(rows):
        try:
            if parse_error is not None:
                raise ValueError(parse_error)
            messages = to_messages(record, tags)
        except ValueError as problem:
            if strict:
                raise ValueError(f"{data_file}: {where}: {problem} (fix it, or leave out --strict to skip bad records)") from None
            problems.append(f"{where}: {problem}")
            counts["dropped_malformed"] += 1
            continue
        ids, learned, dropped, length = fit_dialog(tokenizer, messages, max_seq_length)
        lengths.append(length)
        if ids is None:
            counts["dropped_too_long"] += 1
            continue
        counts["kept"] += 1
        counts["truncated"] += dropped > 0
        counts["turns_dropped"] += 2 * dropped
        samples, prompt_lengths, masks = splits["val" if position in val_positions else "train"]
        samples.append(ids)
        prompt_lengths.append(learned.index(True))  # the labels before the first answer are all masked
        masks.append(learned)
    if not splits["train"][0]:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise ValueError(f"{data_file}: no usable conversation among {len(rows)} records for training "
                         f"with max_seq_length={max_seq_length}{first}")
    counts.update(train=len(splits["train"][0]), val=len(splits["val"][0]))
    config = {
        **describe_inputs(data_file, tokenizer, {"openai": "messages", "sharegpt": "conversations"}),
        "prompt_style": style.name,
        "sample_layout": ("per exchange: [BOS] + encode('[INST] {user} [/INST] {answer} ') + [EOS]" if style is LLAMA2_CHAT
                          else "the model's chat template, rendered and tokenized whole (as apply_chat_template)"),
        "mask_prompt": True, "ignore_index": IGNORE_INDEX,
        "learned": f"every answer and its {style.end_of_turn or 'EOS'}",
        "max_seq_length": max_seq_length, "truncation": "keep the longest prefix of whole exchanges",
        "seed": seed, "val_split_fraction": val_split_fraction, "val_size": val_size,
        "counts": counts, "token_lengths": length_percentiles(lengths) if lengths else {},
        "skipped": problems[:MAX_LISTED_PROBLEMS],
    }
    write_prepared_set(destination_path, splits, config)
    return config
