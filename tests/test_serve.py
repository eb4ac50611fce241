"""generate/serve.py, the real server on 127.0.0.1 called with the real `openai` client: every answer equals
`generate()` with the same adapter applied alone; concurrent requests batch together, adapters mixed; bad
input gets OpenAI-format errors and the server goes on; disconnects and SIGTERM end cleanly."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import assert_greedy_tokens

from lit_lora.adapter import AdapterConfig, add_adapter, remove_adapter
from lit_lora.files.checkpoint import load_checkpoint, save_checkpoint
from lit_lora.generate import generate
from lit_lora.lora import LoRAConfig, add_lora, lora_layers, remove_lora
from lit_lora.methods import apply_weights, save_weights
from lit_lora.model import Config, Llama
from lit_lora.prompts import encode_dialog
from lit_lora.tokenizer import Tokenizer
from lit_lora.workflows.inference import decode_new
from lit_lora.workflows.serve import TextOutput, free_port, parse_adapters, wait_until_serving

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("base", "lora", "dora", "prompt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama2_tokenizer_path):
    """A tiny random Llama with the real tokenizer, a LoRA, a DoRA and a LLaMA-Adapter file for it."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    config = Config.from_name("tiny", vocab_size=32000, block_size=512)
    model = Llama(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)  # confident logits: varied greedy answers
    save_checkpoint(root / "base", model.state_dict(), config, tokenizer_path=llama2_tokenizer_path)
    for name, lora in (("lora", LoRAConfig(r=4, alpha=8, targets=("q", "v", "head"))),
                       ("dora", LoRAConfig(r=2, alpha=4, targets=("q", "k", "v", "o", "mlp"), use_dora=True))):
        add_lora(model, lora)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_A.normal_(0.0, 0.3)
                layer.lora_B.normal_(0.0, 0.3)
                if layer.lora_magnitude is not None:  # a trained magnitude: not the norm of W any more
                    layer.lora_magnitude.mul_(torch.empty_like(layer.lora_magnitude).uniform_(0.7, 1.3))
        save_weights(root / f"{name}.safetensors", model, "lora", lora)
        remove_lora(model)
    add_adapter(model, AdapterConfig(prompt_length=4, start_layer=1))
    with torch.no_grad():
        model.layers[1].attn.adapter.gate.fill_(0.8)
    save_weights(root / "prompt.safetensors", model, "adapter", AdapterConfig(prompt_length=4, start_layer=1))
    remove_adapter(model)
    return root


def start_server(checkpoint, log_path, *options):
    """generate/serve.py in a process of its own, once it answers /v1/models: (process, base URL)."""
    port = free_port()
    adapters = [f"{name}={checkpoint / name}.safetensors" for name in MODELS[1:]]
    command = [sys.executable, str(ROOT / "generate" / "serve.py"), "--checkpoint_dir", str(checkpoint / "base"),
               "--name", "base", "--adapters", json.dumps(adapters), "--port", str(port), "--dtype", "float32", *options]
    log = open(log_path, "w")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matrices: threads would only contend with the tests
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url, Path(log_path), timeout=90)
    except RuntimeError:
        process.kill()
        raise
    return process, url


def stop_server(process) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    process, url = start_server(checkpoint, tmp_path_factory.mktemp("log") / "server.log",
                                "--max_batch_size", "8", "--max_waiting", "24")
    yield url
    stop_server(process)


def runpy_main(script):
    return runpy.run_path(str(ROOT / script))["main"]


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def metrics(url):
    return json.loads(urllib.request.urlopen(url + "/metrics", timeout=10).read())


class Reference:
    """`generate()` in this process, with one adapter applied alone (unmerged), greedy."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.tokenizer = Tokenizer(checkpoint / "base" / "tokenizer.model")
        self.models = {}

    def model(self, name):
        if name not in self.models:
            model = load_checkpoint(self.checkpoint / "base").eval()
            if name != "base":
                apply_weights(model, self.checkpoint / f"{name}.safetensors")
            self.models[name] = model
        return self.models[name]

    def answer(self, name, prompt_ids, max_tokens):
        output = generate(self.model(name), torch.tensor(prompt_ids), max_tokens, temperature=0.0,
                          eos_id=self.tokenizer.eos_id)
        return output[len(prompt_ids):].tolist()

    def check(self, name, prompt_ids, max_tokens, token_ids, text, continuation):
        """The server's ids equal the reference's (up to near-ties of two paths); its text is their decoding."""
        expected = self.answer(name, prompt_ids, max_tokens)
        prompt = torch.tensor(prompt_ids)
        assert_greedy_tokens(torch.tensor(prompt_ids + token_ids), torch.tensor(prompt_ids + expected),
                             lambda ids: self.model(name)(ids[None])[0], len(prompt_ids), eos_id=self.tokenizer.eos_id)
        new = [t for t in token_ids if t != self.tokenizer.eos_id]
        assert text == decode_new(self.tokenizer, new, prompt if continuation else None)
        return token_ids == expected


@pytest.fixture(scope="module")
def reference(checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server runs beside these tests on the same cores
    yield Reference(checkpoint)
    torch.set_num_threads(threads)


def test_every_model_answers_as_generate_with_its_adapter_alone(server, reference):
    """Completions and chat completions, whole and streamed, for the base, a LoRA, a DoRA and a LLaMA-Adapter."""
    api = client(server)
    tokenizer = reference.tokenizer
    assert [m.id for m in api.models.list().data] == list(MODELS)
    prompt = "The llama is a domesticated South American camelid"
    messages = [{"role": "user", "content": "Name three colours."}]
    chat_ids = encode_dialog(tokenizer, messages)[0]
    answers = {}
    for name in MODELS:
        for stream in (False, True):
            options = dict(model=name, max_tokens=24, temperature=0, stream=stream, extra_body={"return_token_ids": True})
            completion = api.completions.create(prompt=prompt, **options)
            chat = api.chat.completions.create(messages=messages, **options)
            if stream:
                chunks, chat_chunks = list(completion), list(chat)
                text = "".join(c.choices[0].text for c in chunks)
                ids = [t for c in chunks for t in c.choices[0].token_ids]
                chat_text = "".join(c.choices[0].delta.content or "" for c in chat_chunks)
                chat_ids_out = [t for c in chat_chunks for t in (getattr(c.choices[0], "token_ids", None) or [])]
                assert chunks[-1].choices[0].finish_reason in ("stop", "length") and len(chunks) > 3
                assert chat_chunks[0].choices[0].delta.role == "assistant"
            else:
                text, ids = completion.choices[0].text, completion.choices[0].token_ids
                chat_text, chat_ids_out = chat.choices[0].message.content, chat.choices[0].token_ids
                assert completion.usage.completion_tokens == len(ids) and chat.usage.prompt_tokens == len(chat_ids)
            reference.check(name, tokenizer.encode(prompt, bos=True).tolist(), 24, ids, text, continuation=True)
            reference.check(name, chat_ids, 24, chat_ids_out, chat_text, continuation=False)
            answers[name, stream] = ids
    assert len({tuple(answers[name, False]) for name in MODELS}) == 4  # every adapter changes the answer


def test_concurrent_requests_mixed_across_adapters_batch_together(server, reference):
    """24 requests at once over 4 models, prompts of 1..40 tokens, 1..48 new tokens: none lost, each
    equals its single greedy answer, and the server's metrics show steps with several rows and adapters."""
    api = client(server)
    generator = torch.Generator().manual_seed(7)
    jobs = []
    for i in range(24):
        length, max_tokens = int(torch.randint(1, 41, (1,), generator=generator)), int(torch.randint(1, 49, (1,), generator=generator))
        prompt = [1] + torch.randint(3, 32000, (length,), generator=generator).tolist()
        jobs.append((MODELS[i % 4], prompt, max_tokens))
    before = metrics(server)

    def ask(job):
        name, prompt, max_tokens = job
        return api.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body={"return_token_ids": True})

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(ask, jobs, timeout=120))
    exact = 0
    for (name, prompt, max_tokens), result in zip(jobs, results):
        choice = result.choices[0]
        assert choice.finish_reason in ("stop", "length")
        exact += reference.check(name, prompt, max_tokens, choice.token_ids, choice.text, continuation=True)
    assert exact >= 20  # a near-tie may part a few; most are identical token for token
    after = metrics(server)
    assert after["finished"] - before["finished"] == 24 and after["in_flight"] == 0
    assert after["max_rows"] >= 4 and after["max_adapters"] >= 3 and after["mixed_steps"] > before["mixed_steps"]


def expect_error(call, status, code=None):
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    assert raised.value.status_code == status
    body = raised.value.body
    assert isinstance(body, dict) and body["message"] and "type" in body, body
    if code is not None:
        assert body["code"] == code
    return body


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    api = client(server)

    def good():
        answer = api.completions.create(model="lora", prompt="Hello", max_tokens=3, temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length")

    bad = [
        (lambda: api.completions.create(model="nope", prompt="Hi", max_tokens=3), 404, "model_not_found"),
        (lambda: api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}]), 404, "model_not_found"),
        (lambda: api.completions.create(model="base", prompt="word " * 600, max_tokens=3), 400, "context_length_exceeded"),
        (lambda: api.completions.create(model="base", prompt="Hi", temperature=-1), 400, None),
        (lambda: api.completions.create(model="base", prompt="Hi", top_p=0), 400, None),
        (lambda: api.completions.create(model="base", prompt="Hi", max_tokens=0), 400, None),
        (lambda: api.completions.create(model="base", prompt="Hi", n=2), 400, None),
        (lambda: api.completions.create(model="base", prompt="Hi", stop=["a", "b", "c", "d", "e"]), 400, None),
        (lambda: api.completions.create(model="base", prompt=[5, 99999]), 400, None),
        (lambda: api.completions.create(model="base", prompt="Hi", seed=2 ** 70), 400, None),
        (lambda: api.completions.create(model="base", prompt="Hi", extra_body={"max_tokens": "many"}), 400, None),
        (lambda: api.chat.completions.create(model="base", messages=[{"role": "assistant", "content": "Hi"}]), 400, None),
        (lambda: api.chat.completions.create(model="base", messages=[]), 400, None),
    ]
    for call, status, code in bad:
        expect_error(call, status, code)
        good()
    request = urllib.request.Request(server + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 400 and "message" in json.loads(raised.value.read())["error"]
    good()


def test_stop_strings_and_seeds(server, reference):
    api = client(server)
    full = api.completions.create(model="lora", prompt="Once upon a time", max_tokens=30, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    for stream in (False, True):
        answer = api.completions.create(model="lora", prompt="Once upon a time", max_tokens=30, temperature=0,
                                        stop=[stop], stream=stream)
        text = "".join(c.choices[0].text for c in answer) if stream else answer.choices[0].text
        assert text == full[:full.index(stop)]
    sampled = [api.completions.create(model="dora", prompt="Hi", max_tokens=20, temperature=1.0, top_p=0.9, seed=seed,
                                      extra_body={"return_token_ids": True}).choices[0].token_ids for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]
    prompt = reference.tokenizer.encode("Hi", bos=True)
    alone = generate(reference.model("dora"), prompt, 20, temperature=1.0, top_p=0.9, eos_id=reference.tokenizer.eos_id,
                     generator=torch.Generator().manual_seed(3))
    assert sampled[0] == alone[len(prompt):].tolist()  # the same seed samples as generate() alone


def test_a_client_that_goes_away_frees_its_row_and_the_others_go_on(server, reference):
    api = client(server)
    before = metrics(server)
    jobs = [("lora", "Tell me a story", 100), ("dora", "Write a poem", 480), ("base", "Count to ten", 100)]
    streams = [api.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
               for name, prompt, max_tokens in jobs]
    next(iter(streams[1]))
    streams[1].close()  # this client disconnects after its first chunk
    for (name, prompt, max_tokens), stream in zip(jobs[::2], streams[::2]):
        ids = [t for chunk in stream for t in chunk.choices[0].token_ids]
        prompt_ids = reference.tokenizer.encode(prompt, bos=True)
        expected = generate(reference.model(name), prompt_ids, max_tokens, temperature=0.0)
        assert_greedy_tokens(torch.cat([prompt_ids, torch.tensor(ids)]), expected,
                             lambda ids: reference.model(name)(ids[None])[0], len(prompt_ids))
    deadline = time.monotonic() + 20
    while metrics(server)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = metrics(server)
    assert after["in_flight"] == 0 and after["finished"] - before["finished"] == 2
    assert after["cancelled"] - before["cancelled"] == 1 and after["tokens"] - before["tokens"] < 200 + 480


def test_queue_limit_429_and_sigterm_finishes_what_is_in_flight(checkpoint, tmp_path):
    process, url = start_server(checkpoint, tmp_path / "server.log", "--max_batch_size", "1", "--max_waiting", "1")
    try:
        api = client(url)
        options = dict(model="base", prompt="Go on", max_tokens=480, temperature=0, stream=True,
                       extra_body={"ignore_eos": True})
        for attempt in range(3):  # two long answers in flight (one decoding, one waiting), then a third
            streams = [api.completions.create(**options), api.completions.create(**options)]
            if metrics(url)["in_flight"] == 2:
                expect_error(lambda: api.completions.create(model="base", prompt="Hi", max_tokens=3), 429, "rate_limit_exceeded")
                break
            for stream in streams:
                stream.close()
        else:
            pytest.fail("two requests never were in flight together")
        for stream in streams:
            stream.close()
        deadline = time.monotonic() + 20
        while metrics(url)["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metrics(url)["in_flight"] == 0  # both rows freed by the disconnects
        assert api.completions.create(model="base", prompt="Hi", max_tokens=3).choices[0].text is not None

        stream = iter(api.completions.create(**{**options, "extra_body": {"ignore_eos": True, "return_token_ids": True}}))
        received = list(next(stream).choices[0].token_ids)
        process.send_signal(signal.SIGTERM)  # in flight: it still gets its whole answer
        chunks = list(stream)
        received += [t for chunk in chunks for t in chunk.choices[0].token_ids]
        assert len(received) == 480 and chunks[-1].choices[0].finish_reason == "length"
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        stop_server(process)
    log = (tmp_path / "server.log").read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log


def test_text_is_released_piece_by_piece_and_held_back_at_a_possible_stop(llama2_tokenizer_path):
    tokenizer = Tokenizer(llama2_tokenizer_path)
    ids = tokenizer.encode("Hello world, café 😀 END more", bos=False).tolist()
    output = TextOutput(tokenizer, ["END"], context=None)
    pieces = [output.add(token, final=False) for token in ids]
    assert "".join(pieces) == "Hello world, café 😀 " and output.stopped
    assert all("\ufffd" not in piece for piece in pieces)
    with pytest.raises(ValueError, match="name=path"):
        parse_adapters(["lora"], "base")
    with pytest.raises(ValueError, match="given twice"):
        parse_adapters(["a=x", "a=y"], "base")


def test_exported_adapters_have_the_fields_and_names_vllm_reads(checkpoint, tmp_path):
    """scripts/export_peft.py writes what vLLM's multi-LoRA loader takes (howto/serve.md): adapter_config.json
    with r, lora_alpha and target_modules, no DoRA, no modules_to_save, one rank and alpha for every layer;
    tensors named base_model.model.<Hugging Face module>.lora_A/B.weight, (r, in) and (out, r)."""
    from safetensors.torch import load_file

    export = runpy_main("scripts/export_peft.py")
    export(lora_path=checkpoint / "lora.safetensors", output_dir=tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (config["r"], config["lora_alpha"]) == (4, 8)
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "lm_head"} and config["bias"] == "none"
    assert not config["use_dora"] and not config.get("modules_to_save") and not config["rank_pattern"]
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    for name, tensor in tensors.items():
        module, _, kind = name.removeprefix("base_model.model.").rpartition(".lora_")
        assert name.startswith("base_model.model.") and kind in ("A.weight", "B.weight"), name
        assert module in ("lm_head",) or module.startswith("model.layers."), name
        assert tensor.shape[0 if kind == "A.weight" else 1] == 4
    assert len(tensors) == 2 * (2 * 2 + 1)  # q and v in both layers, and the head
    export(lora_path=checkpoint / "dora.safetensors", output_dir=tmp_path / "dora")  # PEFT takes it; vLLM refuses DoRA
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"]


def test_row_adapters_follow_every_change_of_routing(checkpoint):
    """The same routing twice keeps its gathered rows; a new one (rows swapped) gathers again: every row
    computes as its adapter alone, in every order."""
    from lit_lora.workflows.row_adapters import RowAdapters

    files = {name: checkpoint / f"{name}.safetensors" for name in MODELS[1:]}
    model = load_checkpoint(checkpoint / "base").eval()
    rows = RowAdapters(model, files)
    ids = torch.randint(0, 32000, (3, 5), generator=torch.Generator().manual_seed(0))
    alone = {}
    for name in ("lora", "dora"):
        reference = load_checkpoint(checkpoint / "base").eval()
        apply_weights(reference, files[name])
        with torch.no_grad():
            alone[name] = reference(ids)
    for routing in (["lora", "dora", "lora"], ["lora", "dora", "lora"], ["dora", "lora", "dora"], ["lora"] * 3):
        rows.use([rows.names.index(name) + 1 for name in routing])
        with torch.no_grad():
            logits = model(ids)
        for b, name in enumerate(routing):
            torch.testing.assert_close(logits[b], alone[name][b], rtol=1e-4, atol=1e-4)

