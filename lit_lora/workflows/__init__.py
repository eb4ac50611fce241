"""The library side of the journey's scripts: what the numbered steps do, callable from Python too.

    cli.py            how every script starts: typed arguments and one-line errors
    prepare.py        step 3: instruction datasets (Alpaca, Dolly, your JSON) into prepared, verified sets
    conversations.py  step 3: conversation datasets (OpenAI and ShareGPT shapes) in a chat format
    inference.py      step 5: device and dtype, checks before loading, streaming, prompts files, several adapters
    chat.py           step 5: a conversation that keeps its keys and values in the KV cache between turns
    serve.py          step 5: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra)
    batching.py       step 5: its continuous batching, requests joining and leaving between decoding steps
    row_adapters.py   step 5: many adapters over one base model, each row of a batch with its own
    peft.py           step 6: LoRA adapters to and from Hugging Face PEFT's format

May import: the teaching files, `lit_lora.files`, `lit_lora.speed`. Nothing below imports this package.
"""
