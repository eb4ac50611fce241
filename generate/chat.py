"""Step 5 (conversation): chat with a model in the terminal, turn after turn, in the model's chat format.

    python generate/chat.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-chat-hf
    python generate/chat.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B-Instruct    # Llama 3's template
    python generate/chat.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct  # ChatML
    python generate/chat.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --lora_path out/lora/chat/lit_lora.safetensors --system "You are a concise assistant."
    printf 'Hi!\nTell me more.\n' | python generate/chat.py ...          # scripted: one user turn per line

Answers stream as they are generated. The conversation's keys and values stay in the KV cache between
turns, so each turn feeds the model only its new tokens (the count goes to stderr). Type /reset to start
afresh and /quit (or end the input, or Ctrl-C at the prompt) to leave; Ctrl-C while it answers drops that
answer. A note warns when the context is nearly full. See howto/chat.md.
"""

import sys
from pathlib import Path
from typing import List, Optional

import torch

from lit_lora.generate import NonFiniteLogits, check_generation_settings
from lit_lora.prompts import chat_style
from lit_lora.speed.quantize import QuantizeMode
from lit_lora.workflows.chat import Chat
from lit_lora.workflows.cli import run
from lit_lora.workflows.inference import TextStreamer, apply_adapter_file, blame_weights, encode_prompts, load_for_generation


COMMANDS = "/reset starts afresh, /quit leaves"


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-chat-hf"),
    lora_path: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    system: Optional[str] = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: Optional[int] = 50,
    top_p: Optional[float] = None,
    seed: int = 1234,
    device: str = "auto",
    dtype: str = "auto",
    quantize: Optional[QuantizeMode] = None,
) -> List[str]:
    """Chat with a lit-lora checkpoint, with or without a LoRA or LLaMA-Adapter file; returns the answers.

    Args:
        checkpoint_dir: the model (a chat model, a merged checkpoint, or the base of the adapter).
        lora_path: a LoRA file (finetune/lora.py) to apply, merged into the weights.
        adapter_path: a LLaMA-Adapter file (finetune/adapter.py) to apply.
        system: a system message (Llama 2 chat folds it into the first user turn).
        max_new_tokens: the longest answer per turn.
        temperature: 0 is greedy decoding; below 1 sharper, above 1 more random.
        top_k: sample only among the k most likely tokens (null: all).
        top_p: sample only among the most likely tokens whose probability reaches p (nucleus sampling).
        seed: random seed, for reproducible sampling.
        device: "auto" (a CUDA GPU if there is one), "cpu", "cuda" or "cuda:N".
        dtype: "auto", "float32", "bfloat16" or "float16".
        quantize: keep the linear layers in 4 bits (nf4, nf4-dq) or 8 bits (int8).
    """
    check_generation_settings(max_new_tokens, temperature, top_k, top_p)
    if sys.stdin is None or sys.stdin.closed:
        raise ValueError("the chat reads your turns from standard input, which is closed: run it in a terminal or "
                         "pipe the turns in, one per line")
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused below, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    tokenizer, _ = encode_prompts(checkpoint_dir, [], max_new_tokens)
    model = load_for_generation(checkpoint_dir, device, dtype, quantize)
    weights = apply_adapter_file(model, lora_path, adapter_path)
    style = chat_style(tokenizer)
    if weights is not None and weights.prompt_style not in (None, style.name):
        print(f"note: {lora_path or adapter_path} was trained with the {weights.prompt_style!r} prompt style; this "
              f"chat speaks {style.name!r}", file=sys.stderr)
    torch.manual_seed(seed)
    chat = Chat(model, tokenizer, system, max_new_tokens, temperature, top_k, top_p)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {checkpoint_dir} ({COMMANDS}).", file=sys.stderr)
    answers = []
    while True:
        try:
            text = input("You: " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):  # end of input, or Ctrl-C at the prompt: leave
            print(file=sys.stderr)
            break
        if text in ("/quit", "/exit"):
            break
        if not is_utf8(text):
            print("note: that line is not UTF-8 text; type it again", file=sys.stderr)
            continue
        if text == "/reset":
            chat.reset()
            print("(the conversation starts afresh)", file=sys.stderr)
            continue
        if not text:
            continue
        streamer = TextStreamer(tokenizer)
        if interactive:
            print("Model: ", end="", flush=True)
        try:
            with blame_weights(checkpoint_dir, lora_path, adapter_path):
                turn = chat.respond(text, on_token=streamer)
        except KeyboardInterrupt:  # Ctrl-C while answering: this answer stops and is forgotten
            print("\n(interrupted: that answer is dropped; /quit to leave)", file=sys.stderr)
            continue
        except NonFiniteLogits:  # the weights overflow: every turn would, so stop with the files named
            raise
        except ValueError as problem:  # a tag of the format in the text, or a full context
            print(f"note: {problem}", file=sys.stderr)
            continue
        streamer.finish()
        answers.append(turn.answer)
        print(f"(fed {turn.prefilled} new prompt tokens, generated {turn.generated}; {turn.room_left} of "
              f"{model.config.block_size} context positions left)", file=sys.stderr)
        if turn.room_left < min(max_new_tokens, model.config.block_size // 4):
            print(f"note: the context is nearly full ({turn.room_left} positions left): /reset to start afresh",
                  file=sys.stderr)
    return answers


def is_utf8(text: str) -> bool:
    """Whether a line read with errors="surrogateescape" was valid UTF-8 (its bad bytes become surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


if __name__ == "__main__":
    run(main)
