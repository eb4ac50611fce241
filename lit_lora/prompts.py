"""The prompt template, in one place: data preparation, finetuning and generation all format through here.

A prompt style turns an (instruction, input) pair into the text the model reads before it answers.
Lit-lora ships the Stanford Alpaca template and the Llama 2 chat format ("llama2-chat", which also lays
out whole conversations: second half of this file); `register_prompt_style` adds others in one process.

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
from typing import Dict, List, Sequence, Tuple

from lit_lora.tokenizer import Tokenizer


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


def check_dialog(messages: Sequence[Dict[str, str]], ends_with: str) -> None:
    """A ValueError saying what is wrong unless `messages` is a dialog the format can lay out: an optional
    leading system message, then user and assistant alternating, ending with `ends_with`'s role, every
    content a non-empty string without the format's tags."""
    roles = [message.get("role") for message in messages]
    for number, message in enumerate(messages, start=1):
        if message.get("role") not in ROLES:
            raise ValueError(f"message {number}: unknown role {message.get('role')!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {number} ({message['role']}) has no content")
        if any(tag in content for tag in SPECIAL_TAGS):
            raise ValueError(f"message {number} ({message['role']}) contains one of the format's tags {', '.join(SPECIAL_TAGS)}")
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
    skips `check_dialog` (a chat whose own model gave an empty answer)."""
    if check:
        check_dialog(messages, ends_with=messages[-1].get("role", "user") if messages else "user")
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
