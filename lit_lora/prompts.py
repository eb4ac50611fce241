"""The prompt template, in one place: data preparation, finetuning and generation all format through here.

A prompt style turns an (instruction, input) pair into the text the model reads before it answers.
Lit-lora ships the Stanford Alpaca template; `register_prompt_style` adds others in one process.

How the response joins the prompt (the one rule every part of lit-lora follows):

    ids = [BOS] + sp.encode(prompt) + sp.encode(response) + [EOS]
          `---------- prompt_length ----------'
    labels[:prompt_length] = IGNORE_INDEX     (with mask_prompt: only the response and EOS are learned)

Prompt and response are tokenized *separately* and their ids concatenated. We do not tokenize the
joined string `prompt + response` and mask its first `len(encode(prompt))` tokens (Lit-LLaMA's way):
SentencePiece may merge characters across the boundary ("Response:" + "- a bulleted answer" gives the
piece ":-"), so the first `len(encode(prompt))` tokens of the joined string are not always the prompt's
tokens. On the 110 real Alpaca and Dolly sample records that happens 7 times: the mask then covers part
of the response, or leaves a prompt token unmasked. Concatenating ids makes the mask exact by construction, and
generation, which encodes the prompt alone with `Tokenizer.encode(prompt, bos=True)`, feeds the model
exactly the first `prompt_length` ids it was trained on.

What text does the model see? SentencePiece starts every encoded string with a word-boundary marker
"▁" (a space), so the response's ids read as " " + response: decode(ids) == prompt + " " + response.
Decoding the generated ids alone drops that leading marker again and gives back the response verbatim.
"""

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class PromptStyle:
    """Two templates: one for an instruction alone, one for an instruction with an input (context).

    Both must contain `{instruction}`; `template_with_input` must also contain `{input}`. An empty or
    whitespace-only input selects the template without input, as in Stanford Alpaca's training.
    """

    name: str
    template: str
    template_with_input: str

    def format(self, instruction: str, input: str = "") -> str:
        """The prompt text for one example; the response follows it (see the module docstring)."""
        if input.strip():
            return self.template_with_input.format(instruction=instruction, input=input)
        return self.template.format(instruction=instruction)


# Stanford Alpaca's templates, verbatim (https://github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA = PromptStyle(
    name="alpaca",
    template=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
    template_with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
)

PROMPT_STYLES: Dict[str, PromptStyle] = {ALPACA.name: ALPACA}


def register_prompt_style(style: PromptStyle) -> PromptStyle:
    """Make `style` known by its name in this Python process, e.g. to `prepare_instruction_data(...,
    prompt_style="mine")` called from your own code. The command-line scripts start new processes that
    know only the styles defined in this file: add a style here to use it with `--prompt_style`."""
    for template in (style.template, style.template_with_input):
        if "{instruction}" not in template:
            raise ValueError(f"prompt style {style.name!r}: every template needs an {{instruction}} field")
    if "{input}" not in style.template_with_input:
        raise ValueError(f"prompt style {style.name!r}: template_with_input needs an {{input}} field")
    PROMPT_STYLES[style.name] = style
    return style


def get_prompt_style(name: str = "alpaca") -> PromptStyle:
    if name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {name!r}; known styles: {', '.join(sorted(PROMPT_STYLES))}")
    return PROMPT_STYLES[name]
