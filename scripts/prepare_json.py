"""Step 3 (your own data): prepare any instruction dataset stored as a JSON list or JSON Lines.

    python scripts/prepare_json.py --data_file my_data.jsonl --destination_path data/mine \
        --instruction_key question --input_key context --output_key answer

See howto/prepare_data.md for the expected records, the template, masking and truncation.
"""

from pathlib import Path
from typing import Literal, Optional

from lit_lora.workflows.cli import run
from lit_lora.workflows.prepare import Fields, context_note, format_summary, prepare_instruction_data, resolve_tokenizer_path


def main(
    data_file: Path,
    destination_path: Path = Path("data/custom"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    tokenizer_path: Optional[Path] = None,
    file_format: Literal["auto", "json", "jsonl"] = "auto",
    instruction_key: str = "instruction",
    input_key: str = "input",
    output_key: str = "output",
    max_seq_length: int = 512,
    val_split_fraction: float = 0.03865,
    val_size: Optional[int] = None,
    seed: int = 42,
    mask_prompt: bool = True,
    prompt_style: str = "alpaca",
    truncation: Literal["drop", "truncate_response"] = "drop",
    strict: bool = False,
) -> dict:
    """Tokenize the records of `data_file` into train/val splits under `destination_path`.

    Args:
        data_file: a JSON list of records, or one JSON record per line (JSON Lines).
        destination_path: where train.safetensors, val.safetensors and prepare_config.json are written.
        checkpoint_dir: the model checkpoint whose tokenizer.model or tokenizer.json tokenizes the data.
        tokenizer_path: a tokenizer.model or tokenizer.json to use instead of the checkpoint's.
        file_format: "json" (a list), "jsonl" (a record per line), or "auto" (a list if the file starts with "[").
        instruction_key: the record field holding the instruction (required, a non-empty string).
        input_key: the record field holding the optional input/context (may be missing, null or empty).
        output_key: the record field holding the response (required, a non-empty string).
        max_seq_length: the longest sample in tokens (BOS + prompt + response + EOS).
        val_split_fraction: the fraction of records held out for validation.
        val_size: an exact number of validation records instead of `val_split_fraction`.
        seed: seeds the train/val split.
        mask_prompt: learn only the response and EOS (prompt labels set to -100); false: learn every token.
        prompt_style: the template from lit_lora/prompts.py.
        truncation: a sample longer than max_seq_length is dropped ("drop"), or its response is cut
            to fit, EOS kept ("truncate_response").
        strict: stop at the first malformed record instead of skipping and counting it.
    """
    context_note(checkpoint_dir, max_seq_length)
    config = prepare_instruction_data(
        data_file, destination_path, resolve_tokenizer_path(checkpoint_dir, tokenizer_path),
        fields=Fields(instruction=instruction_key, input=input_key, output=output_key), file_format=file_format,
        max_seq_length=max_seq_length, val_split_fraction=val_split_fraction, val_size=val_size, seed=seed,
        mask_prompt=mask_prompt, prompt_style=prompt_style, truncation=truncation, strict=strict)
    print(format_summary(config, destination_path))
    return config


if __name__ == "__main__":
    run(main)
