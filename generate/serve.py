"""Step 5 (serving): an OpenAI-compatible server for a base model and any number of adapters on it.

    pip install -e ".[serve]"
    python generate/serve.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --adapters '[alpaca=out/lora/alpaca/lit_lora.safetensors, chat=out/lora/chat/lit_lora.safetensors]'

Then any OpenAI client talks to http://127.0.0.1:8000/v1 and picks the base or an adapter by its name in
the `model` field. Concurrent requests decode together in one batch, rows of different adapters
included (continuous batching). Stop it with Ctrl-C or SIGTERM: requests in flight finish first. See
howto/serve.md.
"""

from pathlib import Path
from typing import List, Optional

from lit_lora.workflows.cli import run
from lit_lora.workflows.serve import load_server, parse_adapters, serve


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    adapters: Optional[List[str]] = None,
    name: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_waiting: int = 64,
    max_seq_length: Optional[int] = None,
    device: str = "auto",
    dtype: str = "auto",
    shutdown_timeout: float = 30.0,
) -> None:
    """Serve `checkpoint_dir` and the adapters on it with OpenAI's HTTP API.

    Args:
        checkpoint_dir: the base model (a lit-lora checkpoint directory with its tokenizer).
        adapters: LoRA, DoRA or LLaMA-Adapter files as name=path ('[a=x.safetensors, b=y.safetensors]', or
            --adapters a=x.safetensors --adapters+ b=y.safetensors); a request's `model` picks one by name.
        name: the base model's name in requests (default: the checkpoint directory's name).
        host: the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: the TCP port.
        max_batch_size: the most requests decoded together (rows of the KV cache).
        max_waiting: requests queued beyond those; more get HTTP 429.
        max_seq_length: positions per row of the KV cache: prompt plus answer (default: the model's context).
        device: "auto" (a CUDA GPU if there is one), "cpu", "cuda" or "cuda:N".
        dtype: "auto", "float32", "bfloat16" or "float16".
        shutdown_timeout: seconds the requests in flight get to finish after SIGTERM or Ctrl-C.
    """
    base_name = name or checkpoint_dir.name
    server = load_server(checkpoint_dir, parse_adapters(adapters or [], base_name), base_name, device, dtype,
                         max_batch_size, max_waiting, max_seq_length)
    serve(server, host, port, shutdown_timeout)


if __name__ == "__main__":
    run(main)
