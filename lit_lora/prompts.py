"""The prompt template, in one place: data preparation, finetuning and generation all format through here.

A prompt style turns an (instruction, input) pair into the text the model reads before it answers.
Lit-lora ships the Stanford Alpaca template and three chat formats, which also lay out whole conversations
(second half of this file): Llama 2's ("llama2-chat"), Llama 3's ("llama3") and ChatML ("chatml", SmolLM2
and many others); `register_prompt_style` adds others in one process.

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
Byte-level BPE (Llama 3, SmolLM2; lit_lora/tokenizer.py) adds no marker: decode(ids) == prompt + response.
"""

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lit_lora.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptStyle:
    """Two templates: one for an instruction alone, one for an instruction with an input (context).

    Both must contain `{instruction}`; `template_with_input` must also contain `{input}`. An empty or
    whitespace-only input selects the template without input, as in Stanford Alpaca's training.
    A chat format's style also names the special token that ends an answer (`end_of_turn`; None: EOS) and
    a Jinja chat template for tokenizers that ship none.
    """

    name: str
    template: str
    template_with_input: str
    end_of_turn: Optional[str] = None
    chat_template: Optional[str] = None

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


# ----------------------------------------------------------------------------------------------------
# Conversations: the Llama 2 chat format
# ----------------------------------------------------------------------------------------------------
#
# Llama-2-chat models were trained on dialogs laid out as Meta's reference code lays them out
# (facebookresearch/llama, `chat_completion`). Each completed exchange is one [INST] block and its answer:
#
#     <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user 1} [/INST] {answer 1} </s><s>[INST] {user 2} [/INST] {answer 2} </s>
#        `------------- only in the first user turn -------------'
#
# BOS (<s>) and EOS (</s>) are token ids added around each pair, never text. Why is every (user, answer)
# pair tokenized on its own, with its own BOS and EOS, instead of encoding the whole dialog as one string?
#   * The model learns that an answer ends with EOS, and that a new exchange starts with BOS: at
#     generation time, EOS is the signal to stop, and each new user turn opens with BOS as in training.
#   * Encoding pair by pair keeps token boundaries where the turns are: SentencePiece cannot merge the
#     end of one answer with the next "[INST]", so the ids of a conversation so far are always a prefix
#     of the ids of the conversation continued. That is what lets a chat keep its KV cache between
#     turns and feed the model only each turn's new tokens (generate/chat.py).
# What the model learns: the loss covers each answer and the EOS that closes it, never the user's turns
# or the system message (they are masked like an instruction prompt), so it learns to answer, in
# context, and to stop. Meta's pair text ends with a space ("{answer} "), so the learned ids end with a
# lone "▁" piece before EOS; single-turn llama2-chat instruction data (prepare_*.py) has no such piece.

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

# Single-turn use of the same format (finetuning on instruction data, generate/*.py): one [INST] block.
LLAMA2_CHAT = register_prompt_style(PromptStyle(
    name="llama2-chat",
    template=f"{B_INST} {{instruction}} {E_INST}",
    template_with_input=f"{B_INST} {{instruction}}\n\n{{input}} {E_INST}",
))


def check_dialog(messages: Sequence[Dict[str, str]], ends_with: str, tags: Sequence[str] = SPECIAL_TAGS) -> None:
    """A ValueError saying what is wrong unless `messages` is a dialog the format can lay out: an optional
    leading system message, then user and assistant alternating, ending with `ends_with`'s role, every
    content a non-empty string without the format's `tags` (`dialog_tags(tokenizer)`)."""
    roles = [message.get("role") for message in messages]
    for number, message in enumerate(messages, start=1):
        if message.get("role") not in ROLES:
            raise ValueError(f"message {number}: unknown role {message.get('role')!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {number} ({message['role']}) has no content")
        found = next((tag for tag in tags if tag in content), None)
        if found is not None:
            raise ValueError(f"message {number} ({message['role']}) contains one of the format's tags ({found})")
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[: len(turns)]:
        raise ValueError(f"roles must be an optional system message, then user and assistant alternating; got {roles}")
    if turns[-1] != ends_with:
        raise ValueError(f"the dialog must end with a{'n' if ends_with == 'assistant' else ''} {ends_with} message, "
                         f"got {turns[-1]}")


def encode_dialog(tokenizer: Tokenizer, messages: Sequence[Dict[str, str]],
                  check: bool = True) -> Tuple[List[int], List[bool]]:
    """The ids of a dialog in the Llama 2 chat format, and for each id whether the model learns it.

    A dialog ending with an assistant message is a training sample: every answer and its EOS are learned.
    One ending with a user message is a prompt for generation: it ends with that turn's "[/INST]", and
    nothing is learned. The system message, if any, is folded into the first user message. `check=False`
    skips `check_dialog` (a chat whose own model gave an empty answer). A tokenizer with a chat template
    (Llama 3, ChatML) lays the dialog out with that template instead: `encode_with_template`."""
    if check:
        check_dialog(messages, ends_with=messages[-1].get("role", "user") if messages else "user",
                     tags=dialog_tags(tokenizer))
    if chat_style(tokenizer) is not LLAMA2_CHAT:
        return encode_with_template(tokenizer, messages)
    if messages[0]["role"] == "system":
        first = messages[1]
        messages = [{"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + first["content"]},
                    *messages[2:]]
    ids: List[int] = []
    learned: List[bool] = []
    for position in range(0, len(messages), 2):
        user = messages[position]["content"].strip()
        question = tokenizer.encode(f"{B_INST} {user} {E_INST}", bos=True).tolist()
        if position + 1 == len(messages):  # the open question the model is to answer
            ids += question
            learned += [False] * len(question)
            break
        answer = messages[position + 1]["content"].strip()
        pair = tokenizer.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True).tolist()
        # The answer's ids are those after the question's: "[/INST]" ends in "]" and the answer begins a new
        # word, so SentencePiece never merges across that boundary (the length check guards the assumption).
        if pair[: len(question)] != question:
            raise ValueError(f"message {position + 2}: its first characters merge with the question's end")
        ids += pair
        learned += [False] * len(question) + [True] * (len(pair) - len(question))
    return ids, learned


# ----------------------------------------------------------------------------------------------------
# Conversations: Llama 3 and ChatML, laid out by the model's own chat template
# ----------------------------------------------------------------------------------------------------
#
# Newer models ship their chat format as a Jinja template in tokenizer_config.json ("chat_template"), and
# transformers' `apply_chat_template` renders it to text and tokenizes that text in one piece. The two
# layouts lit-lora knows, one turn each (the special tokens are single ids, never text):
#
#   Llama 3   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>
#             <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
#   ChatML    <|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n
#
# Why render the template itself rather than write each layout by hand? The templates carry details a
# hand-written copy would have to chase model by model: Llama 3.1's always opens with a system block
# ("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", then the system message), Llama
# 3.2's puts today's date there, SmolLM2's adds a default system message when the dialog has none. Rendering
# the checkpoint's template with jinja2's sandbox (as transformers does: no template can run Python code)
# gives the exact text, and tokenizing it whole gives the exact ids; the tests compare both with
# `apply_chat_template`. Hand-written here are only the two facts a template does not state: which token
# ends an answer (`end_of_turn`), and which characters of the text are the answers (found by rendering the
# dialog up to each answer, see `encode_with_template`), so that the labels learn exactly each answer and
# its end-of-turn token, not the headers, the user's turns or the newline ChatML puts after <|im_end|>.

_LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n{instruction}"
_LLAMA3_ANSWER = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
# Single-turn use (instruction data, generate/*.py): one user turn, then the assistant header. Llama 3.1's
# template would add its system block in front; these prompts are the plain Llama 3 turn layout.
LLAMA3 = register_prompt_style(PromptStyle(
    name="llama3", template=_LLAMA3_USER + _LLAMA3_ANSWER,
    template_with_input=_LLAMA3_USER + "\n\n{input}" + _LLAMA3_ANSWER, end_of_turn="<|eot_id|>",
    chat_template=("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
                   "\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
))
CHATML = register_prompt_style(PromptStyle(
    name="chatml", template="<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    template_with_input="<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n",
    end_of_turn="<|im_end|>",
    chat_template=("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
))


def chat_style(tokenizer: Tokenizer) -> PromptStyle:
    """The chat format of a checkpoint, from its tokenizer: the one whose end-of-turn token its chat template
    uses (or, without a template, its vocabulary holds); Llama 2's for a SentencePiece tokenizer."""
    if tokenizer.backend == "sentencepiece":
        return LLAMA2_CHAT
    for style in (LLAMA3, CHATML):
        if style.end_of_turn in (tokenizer.chat_template or "") or (
                tokenizer.chat_template is None and tokenizer.token_to_id(style.end_of_turn) is not None):
            return style
    raise ValueError(f"the chat template of {tokenizer.model_path} is neither Llama 3's nor ChatML: lit-lora lays out "
                     "conversations in those two formats and Llama 2's")


def dialog_tags(tokenizer: Tokenizer) -> Tuple[str, ...]:
    """What no message may contain: the Llama 2 format's tags, or the text of any special token."""
    return SPECIAL_TAGS if tokenizer.backend == "sentencepiece" else tokenizer.special_tags


@lru_cache(maxsize=8)
def _compiled_template(template: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"the chat template refuses the dialog: {message}")

    # The settings transformers renders chat templates with, so that the whitespace comes out the same.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return environment.from_string(template)
    except TemplateError as error:
        raise ValueError(f"the chat template is not valid Jinja ({error})") from None


def render_chat(tokenizer: Tokenizer, messages: Sequence[Dict[str, str]], add_generation_prompt: bool) -> str:
    """The text the model's chat template makes of `messages` (with the assistant header after them when
    `add_generation_prompt`), as transformers' `apply_chat_template(..., tokenize=False)`."""
    template = tokenizer.chat_template or chat_style(tokenizer).chat_template
    return _compiled_template(template).render(messages=[dict(m) for m in messages],
                                               add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens)


def encode_with_template(tokenizer: Tokenizer, messages: Sequence[Dict[str, str]]) -> Tuple[List[int], List[bool]]:
    """`encode_dialog` for a model with a chat template: the ids of the rendered dialog (tokenized whole,
    as `apply_chat_template(tokenize=True)`), and which of them are learned: every answer and its
    end-of-turn token. A dialog ending with a user message gets the assistant header after it."""
    open_prompt = messages[-1]["role"] == "user"
    text = render_chat(tokenizer, messages, add_generation_prompt=open_prompt)
    end_of_turn = chat_style(tokenizer).end_of_turn
    answers = []  # (first, last + 1) character of each answer and its end-of-turn token in `text`
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:position], add_generation_prompt=True)  # ends with the header
        through = render_chat(tokenizer, messages[: position + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not lay a dialog out as its earlier turns followed by the new one")
        end = through.find(end_of_turn, len(before))
        answers.append((len(before), len(through) if end < 0 else end + len(end_of_turn)))
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    learned = []
    for start, stop in encoding.offsets:  # characters of the text each token covers
        if any(start < edge < stop for span in answers for edge in span):
            raise ValueError("a token of the rendered dialog straddles the start or end of an answer")
        learned.append(any(first <= start and stop <= last for first, last in answers))
    return encoding.ids, learned
