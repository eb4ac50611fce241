"""Step 3: prepare the Stanford Alpaca instruction data (52k records) for finetuning.

    python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

See howto/prepare_data.md for the template, the masking and the truncation policy.
"""

from pathlib import Path
from typing import Literal, Optional

from lit_lora.workflows.cli import run
from lit_lora.workflows.prepare import (ALPACA_FIELDS, ALPACA_URL, context_note, download_if_missing, format_summary,
                                        prepare_instruction_data, resolve_tokenizer_path)


def main(
    destination_path: Path = Path("data/alpaca"),
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    tokenizer_path: Optional[Path] = None,
    data_file: Optional[Path] = None,
    data_url: str = ALPACA_URL,
    max_seq_length: int = 512,
    val_split_fraction: float = 0.03865,
    val_size: Optional[int] = None,
    seed: int = 42,
    mask_prompt: bool = True,
    prompt_style: str = "alpaca",
    truncation: Literal["drop", "truncate_response"] = "drop",
    strict: bool = False,
) -> dict:
    """Tokenize Alpaca into train/val splits under `destination_path`.

    Args:
        destination_path: where train.safetensors, val.safetensors and prepare_config.json are written
            (and the downloaded alpaca_data.json, unless --data_file is given).
        checkpoint_dir: the model checkpoint whose tokenizer.model or tokenizer.json tokenizes the data.
        tokenizer_path: a tokenizer.model or tokenizer.json to use instead of the checkpoint's.
        data_file: a local copy of alpaca_data.json; without it the file is downloaded from `data_url`.
        data_url: where to download Alpaca from.
        max_seq_length: the longest sample in tokens (BOS + prompt + response + EOS).
        val_split_fraction: the fraction of records held out for validation (about 2,000 of 52,002).
        val_size: an exact number of validation records instead of `val_split_fraction`.
        seed: seeds the train/val split.
        mask_prompt: learn only the response and EOS (prompt labels set to -100); false: learn every token.
        prompt_style: the template from lit_lora/prompts.py.
        truncation: a sample longer than max_seq_length is dropped ("drop"), or its response is cut
            to fit, EOS kept ("truncate_response").
        strict: stop at the first malformed record instead of skipping and counting it.
    """
    if data_file is None:
        data_file = download_if_missing(data_url, destination_path / "alpaca_data.json")
    context_note(checkpoint_dir, max_seq_length)
    config = prepare_instruction_data(
        data_file, destination_path, resolve_tokenizer_path(checkpoint_dir, tokenizer_path), fields=ALPACA_FIELDS,
        max_seq_length=max_seq_length, val_split_fraction=val_split_fraction, val_size=val_size, seed=seed,
        mask_prompt=mask_prompt, prompt_style=prompt_style, truncation=truncation, strict=strict)
    print(format_summary(config, destination_path))
    return config


if __name__ == "__main__":
    run(main)
