"""A small synthetic world the quickstart builds itself: a corpus, a tokenizer and a tiny Llama pretrained
on it, so LoRA and LLaMA-Adapter can be tried and compared offline, on a laptop CPU, in minutes.

Why a made-up world instead of a small real model? Finetuning teaches a pretrained model to *use* what
it knows in a new format. To watch that happen and score it exactly, the knowledge and the format must
be separable and the answers checkable. Here they are, by construction:

    facts of 5 tasks with checkable answers                   e.g. addition, key (7, 5)
      │
      ├─ pretraining corpus: every fact stated as prose       "7 plus 5 equals 12."
      │    for training keys, some documents are a quiz       "Question:\nWhat is 7 plus 5?\n\nAnswer: 12."
      │
      ├─ train instructions (Alpaca records)                  {"instruction": "What is 7 plus 5?", "output": "12"}
      │
      └─ held-out test instructions: keys that are in no      {"instruction": "What is 3 plus 9?", "output": "12"}
         instruction and no quiz, only in the prose

The base model learns the facts from the corpus, but asked through the Alpaca template, which it has
never seen, it does not answer in the expected format (it answers quiz-style, "12.", or rambles on in
corpus style). A finetuned model has to learn the format *and* to reach the base model's knowledge
through it. Scoring on held-out keys checks the second: answers learned by heart do not help there.

The quiz documents are the "mixed training" of Allen-Zhu & Li 2023 ("Physics of Language Models, Part
3.1"): facts seen only as prose are hard to reach by a question; a share of question/answer documents
in pretraining teaches the model to store facts so that a question reaches them, also for the keys
that were never asked about. Without them the finetuned model answers held-out keys far less often.

The tasks (`TASKS`) are chosen to be learnable by a one-million-parameter model in a few hundred
optimizer steps: addition of two digits, the larger of two numbers, counting the words of a list,
reversing two words, and metric-style unit conversion (the amount followed by zeros). Tasks that take
longer to learn get more corpus documents (`WorldConfig.corpus_weights`). The tokenizer does not split
numbers into digits (Llama's does): with a few hundred pieces, most numbers here become one or two
pieces, and the same model learns the arithmetic several times faster than from single digits.

Everything is seeded: the same seed gives the same files, byte for byte, and the same tokenizer.
"""

import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import sentencepiece as spm
import torch

from lit_lora.files.checkpoint import atomic_path, save_checkpoint, save_json
from lit_lora.files.utils import PathLike
from lit_lora.model import Config, Llama
from lit_lora.prompts import PromptStyle
from lit_lora.tokenizer import Tokenizer
from lit_lora.train import TrainArgs, answer_sampler, fit, setup_fabric


# ----------------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------------

NOUNS = ("cat", "dog", "sun", "hat", "pen", "cup", "box", "map", "car", "bus", "egg", "fig")
# Metric-style conversions (from unit, to unit, factor): the answer is the amount followed by zeros, a
# rule the model can apply to amounts it was never asked about, once it knows each unit's factor.
UNITS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("centimeters", "millimeters", 10),
         ("kilograms", "grams", 1000), ("liters", "milliliters", 1000), ("dollars", "cents", 100),
         ("decades", "years", 10), ("centuries", "years", 100))


@dataclass(frozen=True)
class Fact:
    """One checkable fact, in the three surface forms the world uses."""

    task: str
    key: Tuple  # what identifies the fact: the held-out split is made over keys
    statement: str  # how the pretraining corpus states it
    instruction: str  # how an instruction asks for it
    answer: str  # the exact expected response


def addition(rng: random.Random) -> Fact:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return Fact("addition", (a, b), f"{a} plus {b} equals {a + b}.", f"What is {a} plus {b}?", str(a + b))


def larger(rng: random.Random) -> Fact:
    a, b = rng.sample(range(1, 21), 2)
    return Fact("larger", (a, b), f"the larger of {a} and {b} is {max(a, b)}.", f"Which is larger, {a} or {b}?",
                str(max(a, b)))


def counting(rng: random.Random) -> Fact:
    words = tuple(rng.choice(NOUNS) for _ in range(rng.randint(1, 5)))
    listed = " ".join(words)
    return Fact("counting", words, f"the list {listed} has {len(words)} word{'s' if len(words) > 1 else ''}.",
                f"How many words are in this list: {listed}?", str(len(words)))


def reversing(rng: random.Random) -> Fact:
    words = tuple(rng.sample(NOUNS, 2))
    backwards = " ".join(reversed(words))
    return Fact("reversing", words, f"{' '.join(words)} reversed is {backwards}.",
                f"Reverse the words: {' '.join(words)}", backwards)


def conversion(rng: random.Random) -> Fact:
    source, target, factor = rng.choice(UNITS)
    amount = rng.randint(1, 20)
    return Fact("conversion", (source, amount), f"{amount} {source} is {amount * factor} {target}.",
                f"How many {target} are in {amount} {source}?", str(amount * factor))


TASKS: Dict[str, Callable[[random.Random], Fact]] = {
    "addition": addition, "larger": larger, "counting": counting,
    "reversing": reversing, "conversion": conversion,
}


def quiz_document(fact: Fact) -> str:
    """The question/answer form some corpus documents take (never for a held-out key)."""
    return f"Question:\n{fact.instruction}\n\nAnswer: {fact.answer}."


# ----------------------------------------------------------------------------------------------------
# The world: corpus, train instructions and held-out test instructions
# ----------------------------------------------------------------------------------------------------


@dataclass
class WorldConfig:
    """How big the world is. The defaults are the quickstart's."""

    seed: int = 1337
    corpus_rounds: int = 12000
    """Rounds of corpus documents; each round has `corpus_weights[task]` documents of every task."""
    keys_per_task: int = 100
    """Distinct keys drawn per task for instructions (fewer where the task has fewer)."""
    test_fraction: float = 0.25
    """Share of each task's keys held out for the test set."""
    quiz_fraction: float = 0.3
    """Share of corpus documents about a training key written as a quiz instead of prose."""
    tasks: Sequence[str] = tuple(TASKS)
    corpus_weights: Dict[str, int] = field(default_factory=lambda: {"addition": 2, "reversing": 3, "conversion": 2})
    """Documents per round for a task (1 if not listed): more for the tasks that take longer to learn."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"unknown tasks {unknown or '(none given)'}; choose from {', '.join(TASKS)}")
        if not 0 < self.test_fraction < 1 or not 0 <= self.quiz_fraction <= 1:
            raise ValueError("test_fraction must be in (0, 1) and quiz_fraction in [0, 1]")
        if not set(self.corpus_weights) <= set(TASKS) or any(w < 1 for w in self.corpus_weights.values()):
            raise ValueError(f"corpus_weights {self.corpus_weights}: give tasks of {', '.join(TASKS)} a weight >= 1")
        self.tasks = tuple(self.tasks)


@dataclass
class World:
    config: WorldConfig
    corpus: List[str]  # pretraining documents
    train: List[Fact]  # the instructions to finetune on (prepared into train and validation splits)
    test: List[Fact]  # held-out instructions: their keys are in no train instruction and no quiz


def draw_keys(task: str, count: int, rng: random.Random, max_draws: int = 20000) -> List[Fact]:
    """Up to `count` facts of `task` with distinct keys (all of them when the task has fewer)."""
    facts: Dict[Tuple, Fact] = {}
    for _ in range(max_draws):
        if len(facts) == count:
            break
        fact = TASKS[task](rng)
        facts.setdefault(fact.key, fact)
    return list(facts.values())


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Draw the instructions, split their keys into train and held-out test, then write the corpus."""
    rng = random.Random(config.seed)
    train, test = [], []
    for task in config.tasks:
        facts = draw_keys(task, config.keys_per_task, rng)
        n_test = max(1, round(config.test_fraction * len(facts)))
        test += facts[:n_test]
        train += facts[n_test:]
    held_out = {(fact.task, fact.key) for fact in test}

    corpus = []
    for _ in range(config.corpus_rounds):
        for task in config.tasks:  # interleaved, so any slice of the corpus covers every task
            for _ in range(config.corpus_weights.get(task, 1)):
                fact = TASKS[task](rng)
                quiz = (task, fact.key) not in held_out and rng.random() < config.quiz_fraction
                corpus.append(quiz_document(fact) if quiz else fact.statement)
    return World(config, corpus, train, test)


def instruction_records(facts: Sequence[Fact]) -> List[Dict[str, str]]:
    """Alpaca-format records (instruction, input, output), plus the task name for per-task scores."""
    return [{"instruction": f.instruction, "input": "", "output": f.answer, "task": f.task} for f in facts]


def write_world(world: World, directory: PathLike) -> Dict[str, Path]:
    """corpus.jsonl (one JSON string per document: quizzes hold newlines), train.json and test.json
    (Alpaca format), world.json (the settings and counts)."""
    directory = Path(directory)
    paths = {"corpus": directory / "corpus.jsonl", "train": directory / "train.json", "test": directory / "test.json",
             "config": directory / "world.json"}
    with atomic_path(paths["corpus"]) as tmp:
        tmp.write_text("".join(json.dumps(document) + "\n" for document in world.corpus))
    for split, facts in (("train", world.train), ("test", world.test)):
        with atomic_path(paths[split]) as tmp:
            tmp.write_text(json.dumps(instruction_records(facts), indent=1) + "\n")
    counts = {task: {"train": sum(f.task == task for f in world.train), "test": sum(f.task == task for f in world.test)}
              for task in world.config.tasks}
    save_json({"config": asdict(world.config), "counts": counts, "corpus_documents": len(world.corpus)}, paths["config"])
    return paths


# ----------------------------------------------------------------------------------------------------
# Tokenizer and pretraining data
# ----------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], path: PathLike, vocab_size: int = 512) -> Path:
    """Train a Llama-style SentencePiece BPE model on `texts` and write it to `path` (tokenizer.model).

    As in Llama: unk 0, bos 1, eos 2, no pad piece, byte fallback (any character encodes, as UTF-8
    bytes if it is not a piece; the 256 byte pieces are why the vocabulary is not smaller). Unlike
    Llama, digits are not split, so frequent numbers become single pieces ("▁13", "00"): fewer tokens
    per answer, and facts about numbers are learned several times faster. Newlines are kept (identity
    normalisation, "\\n" a piece of its own): the Alpaca template and the quizzes are made of them.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=["\n"],
        character_coverage=1.0, max_sentence_length=8192, num_threads=1, minloglevel=2)
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.getvalue())
    return Path(path)


def tokenizer_texts(world: World, style: PromptStyle, corpus_sample: int = 3000) -> List[str]:
    """What the tokenizer learns its pieces from: a sample of the corpus and the training instructions
    as the model will read them. Mixing the two matters: on the whole corpus alone, the template's
    words ("instruction", "appropriately") would be rare and split into letters, doubling every
    prompt's length; Llama's tokenizer, trained on general text, has them as pieces too."""
    return world.corpus[:corpus_sample] + [f"{style.format(f.instruction)} {f.answer}" for f in world.train]


def pack_corpus(documents: Sequence[str], tokenizer: Tokenizer, sequence_length: int, val_fraction: float = 0.02
                ) -> Tuple[List[Dict[str, torch.Tensor]], List[Dict[str, torch.Tensor]]]:
    """Pretraining samples: every document becomes [BOS] ids [EOS], all are concatenated and cut into
    `sequence_length`-token blocks (no padding is wasted); the last `val_fraction` of blocks validate.
    Every token is a label: the model learns the whole text, not a response."""
    encoded = tokenizer.processor.encode(list(documents), out_type=int, num_threads=1)
    stream = [token for ids in encoded for token in (tokenizer.bos_id, *ids, tokenizer.eos_id)]
    n_blocks = len(stream) // sequence_length
    if n_blocks < 2:
        raise ValueError(f"the corpus has {len(stream)} tokens: too few for two blocks of {sequence_length}")
    blocks = torch.tensor(stream[: n_blocks * sequence_length]).view(n_blocks, sequence_length)  # (N, T)
    n_val = max(1, round(val_fraction * n_blocks))
    samples = [{"input_ids": block, "labels": block} for block in blocks]
    return samples[:-n_val], samples[-n_val:]


def fingerprint(*parts: object) -> str:
    """A short hash of JSON-able settings and texts: the pretrained base is reused only if it matches."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Pretraining the tiny base model
# ----------------------------------------------------------------------------------------------------

# ~1M parameters: big enough to learn the world's facts, small enough to pretrain on a CPU in a minute.
TINY_BASE = Config(name="synthetic-tiny", block_size=128, vocab_size=512, n_layer=4, n_head=4, n_embd=128)

# Pretraining recipe: 500 steps of 32 blocks of 64 tokens (~1M tokens, most of one pass over the corpus).
# A tiny model trained from scratch takes a far higher learning rate than finetuning a 7B one; the
# learning rate decays to a tenth, not to zero, so the last steps still learn.
PRETRAIN_ARGS = TrainArgs(learning_rate=6e-3, min_learning_rate=6e-4, weight_decay=0.0, global_batch_size=32,
                          micro_batch_size=32, warmup_steps=20, max_steps=500, eval_interval=100, eval_iters=8,
                          save_interval=100_000, log_interval=10, seed=1337)
WEIGHTS_DIR_NAME = "checkpoint"


def pretrain(out_dir: PathLike, corpus: Sequence[str], tokenizer_path: PathLike, config: Config = TINY_BASE,
             train: TrainArgs = PRETRAIN_ARGS, sequence_length: int = 64, accelerator: str = "auto",
             probe: str = "7 plus 5 equals") -> Dict:
    """Pretrain a freshly initialised Llama on `corpus` through the shared training loop (lit_lora.train.fit,
    every weight trainable, as in finetune/full.py) and save it as an ordinary lit-lora checkpoint in
    `out_dir/checkpoint` (weights, model_config.json, tokenizer.model). Returns fit's final metrics.

    The evaluation log shows the greedy continuation of `probe`, to watch the facts being learned."""
    out_dir, tokenizer = Path(out_dir), Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size} pieces; the model only {config.vocab_size}")
    if sequence_length > config.block_size:
        raise ValueError(f"sequence_length {sequence_length} exceeds the model's block_size {config.block_size}")
    train_data, val_data = pack_corpus(corpus, tokenizer, sequence_length)
    fabric = setup_fabric(out_dir, "32-true", devices=1, num_nodes=1, strategy="auto", accelerator=accelerator,
                          activation_checkpointing=False)
    fabric.seed_everything(train.seed)  # the random initial weights
    model = Llama(config)
    print(f"pretraining a {config.n_layer}-layer, {config.n_embd}-wide Llama on {len(train_data)} blocks of "
          f"{sequence_length} tokens ({len(corpus):,} documents)")

    def save_weights(path: Path, trained: torch.nn.Module) -> None:
        save_checkpoint(path, trained.state_dict(), trained.config, tokenizer_path)

    continue_probe = answer_sampler(tokenizer, probe, max_new_tokens=8)  # does it know the fact yet?
    return fit(fabric, model, train_data, val_data, train, out_dir, save_weights=save_weights,
               weights_name=WEIGHTS_DIR_NAME, sample=lambda m: f"{probe} {continue_probe(m)}", overwrite=True)
