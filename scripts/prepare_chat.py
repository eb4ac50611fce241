"""Step 3 (conversations): prepare multi-turn chat data in the model's chat format for finetuning.

    python scripts/prepare_chat.py --data_file conversations.jsonl --destination_path data/chat \
        --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
    python scripts/prepare_chat.py --data_file conversations.jsonl --destination_path data/chat-smollm2 \
        --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The checkpoint's tokenizer chooses the format: Llama 2's [INST] layout for a tokenizer.model, the chat
template in tokenizer_config.json (Llama 3's or ChatML) for a tokenizer.json.

Reads OpenAI-style {"messages": [{"role", "content"}, ...]} or ShareGPT-style
{"conversations": [{"from", "value"}, ...]} records (a JSON list or JSON Lines). The loss covers every
answer and the EOS or end-of-turn token closing it; long conversations keep their longest prefix of whole exchanges that
fits. See howto/chat.md.
"""

from pathlib import Path
from typing import Literal, Optional

from lit_lora.workflows.cli import run
from lit_lora.workflows.conversations import prepare_conversation_data
from lit_lora.workflows.prepare import context_note, format_summary, resolve_tokenizer_path


def main(
    data_file: Path,
    destination_path: Path = Path("data/chat"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    tokenizer_path: Optional[Path] = None,
    file_format: Literal["auto", "json", "jsonl"] = "auto",
    max_seq_length: int = 1024,
    val_split_fraction: float = 0.03865,
    val_size: Optional[int] = None,
    seed: int = 42,
    strict: bool = False,
) -> dict:
    """Lay out the conversations of `data_file` as train/val splits under `destination_path`.

    Args:
        data_file: a JSON list of conversation records, or one record per line (JSON Lines).
        destination_path: where train.safetensors, val.safetensors and prepare_config.json are written.
        checkpoint_dir: the model checkpoint whose tokenizer (tokenizer.model or tokenizer.json) lays out the data.
        tokenizer_path: a tokenizer.model or tokenizer.json to use instead of the checkpoint's.
        file_format: "json" (a list), "jsonl" (a record per line), or "auto".
        max_seq_length: the longest sample in tokens; longer conversations keep their first exchanges.
        val_split_fraction: the fraction of records held out for validation.
        val_size: an exact number of validation records instead of `val_split_fraction`.
        seed: seeds the train/val split.
        strict: stop at the first unusable conversation instead of skipping and counting it.
    """
    context_note(checkpoint_dir, max_seq_length)
    config = prepare_conversation_data(
        data_file, destination_path, resolve_tokenizer_path(checkpoint_dir, tokenizer_path), file_format=file_format,
        max_seq_length=max_seq_length, val_split_fraction=val_split_fraction, val_size=val_size, seed=seed,
        strict=strict)
    print(format_summary(config, destination_path))
    return config


if __name__ == "__main__":
    run(main)
