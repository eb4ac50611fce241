"""Turn an instruction dataset (Alpaca, Dolly, any JSON list or JSON Lines file) into token ids.

One code path serves scripts/prepare_alpaca.py, prepare_dolly.py and prepare_json.py:

    read the file -> check every record (skip a bad one, or with strict stop at it, naming its line/record)
    -> choose the validation records: a seeded permutation of record positions
    -> format prompts (lit_lora/prompts.py) -> tokenize prompts and responses, in batches
    -> fit max_seq_length (drop the record, or truncate its response and keep EOS)
    -> write train/val splits (lit_lora/data.py) and prepare_config.json, each atomically

Every sample is `[BOS] + encode(prompt) + encode(response) + [EOS]`; lit_lora/prompts.py explains why
prompt and response are tokenized separately.
"""

import json
import sys
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from lit_lora.data import FORMAT_NAME, FORMAT_VERSION, IGNORE_INDEX, PREPARE_CONFIG_NAME, file_sha256, save_prepared
from lit_lora.files.checkpoint import CONFIG_NAME, atomic_path, removed_on_failure, save_json, tokenizer_file
from lit_lora.files.utils import PathLike
from lit_lora.prompts import get_prompt_style
from lit_lora.tokenizer import Tokenizer


ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
DOLLY_URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"
TRUNCATION_POLICIES = ("drop", "truncate_response")
FILE_FORMATS = ("auto", "json", "jsonl")
MAX_LISTED_PROBLEMS = 100  # skipped records named in prepare_config.json; the count is always exact



@dataclass(frozen=True)
class Fields:
    """Which keys of a record hold the instruction, the optional input (context) and the response."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"


ALPACA_FIELDS = Fields()
DOLLY_FIELDS = Fields(instruction="instruction", input="context", output="response")


@dataclass(frozen=True)
class Example:
    position: int  # index among the file's records, counting bad ones, from 0: decides the split
    instruction: str
    input: str
    output: str


def download_if_missing(url: str, path: PathLike) -> Path:
    """Download `url` to `path` (atomically: an interrupted download leaves nothing) unless it is there."""
    path = Path(path)
    if path.is_file():
        print(f"using {path} (already downloaded)")
        return path
    print(f"downloading {url} to {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(path) as tmp:
            tmp.write_bytes(response.read())
    except (OSError, ValueError) as error:  # URLError, HTTPError and timeouts are OSErrors
        reason = getattr(error, "reason", error)
        raise OSError(f"could not download {url} ({reason}): check your connection, "
                      "or download the file yourself and pass --data_file PATH") from None
    return path


def resolve_tokenizer_path(checkpoint_dir: PathLike, tokenizer_path: Optional[PathLike] = None) -> Path:
    """`tokenizer_path` if given, else the checkpoint's tokenizer.model or tokenizer.json."""
    path = Path(tokenizer_path) if tokenizer_path is not None else tokenizer_file(checkpoint_dir)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path or Path(checkpoint_dir) / 'tokenizer.model'} (pass "
                                "--checkpoint_dir holding tokenizer.model or tokenizer.json, or --tokenizer_path)")
    return path


def context_note(checkpoint_dir: PathLike, max_seq_length: int) -> Optional[str]:
    """A note, printed to stderr and returned, when `max_seq_length` is above the context of the model in
    `checkpoint_dir` (when it holds a model config): finetuning would refuse samples longer than that."""
    config_path = Path(checkpoint_dir) / CONFIG_NAME
    if not config_path.is_file():
        return None
    try:
        block_size = json.loads(config_path.read_text()).get("block_size")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(block_size, int) or max_seq_length <= block_size:
        return None
    note = (f"note: --max_seq_length {max_seq_length} is above the context of the model in {checkpoint_dir} "
            f"({block_size} tokens): finetuning refuses samples longer than that; use --max_seq_length {block_size}")
    print(note, file=sys.stderr)
    return note


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # utf-8-sig: a leading byte-order mark is dropped
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {error.start}): save it as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path} is empty: expected a JSON list of records or one JSON record per line")
    return text


def _one_multiline_object(text: str) -> bool:
    """Whether `text` is one JSON object spread over several lines: a JSON document, not JSON Lines (whose
    records take one line each), so that it gets the "expected a JSON list" message, not a parse error per line."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2 or not lines[0].lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _one_json_document(text: str) -> bool:
    """Whether `text` parses as one JSON document (a `.json` file holding it is read as JSON, not JSON Lines)."""
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _parse_records(path: Path, text: str, file_format: str) -> List[Tuple[str, Any, Optional[str]]]:
    """(where, record, parse error) per record; `where` names it for messages: "record 3" or "line 3"."""
    if file_format == "auto":
        file_format = ("json" if text.lstrip().startswith("[") or _one_multiline_object(text)
                       or (path.suffix.lower() == ".json" and _one_json_document(text)) else "jsonl")
    if file_format == "json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
        except RecursionError:
            raise ValueError(f"{path} is nested too deeply to be instruction data") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, found a JSON {_json_type(records)}")
        return [(f"record {number}", record, None) for number, record in enumerate(records, start=1)]

    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which splitlines() breaks on
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")  # CRLF line endings
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line), None))
        except json.JSONDecodeError as error:
            rows.append((f"line {number}", None, f"not valid JSON ({error.msg} at column {error.colno})"))
        except RecursionError:
            rows.append((f"line {number}", None, "nested too deeply"))
    return rows


def _check_record(record: Any, fields: Fields) -> Tuple[str, str, str]:
    """(instruction, input, output) of a well-formed record; a ValueError saying what is wrong otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found a JSON {_json_type(record)}")
    values = []
    for key, required in ((fields.instruction, True), (fields.input, False), (fields.output, True)):
        if key not in record:
            if required:
                raise ValueError(f"missing field {key!r} (the record has: {', '.join(map(str, record)) or 'nothing'})")
            values.append("")
            continue
        value = record[key]
        if value is None and not required:
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"field {key!r} is a JSON {_json_type(value)}, expected a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows "\ud800" alone; no tokenizer can encode it
            raise ValueError(f"field {key!r} holds a lone UTF-16 surrogate, which is not a character") from None
        if required and not value.strip():
            raise ValueError(f"field {key!r} is empty")
        values.append(value)
    return values[0], values[1], values[2]


def read_records(path: PathLike, file_format: str = "auto") -> List[Tuple[str, Any, Optional[str]]]:
    """The records of a JSON list or JSON Lines file as (where, record, parse error) rows: "record 3" or
    "line 3" names each for messages. A file that cannot be read at all raises a one-line error."""
    if file_format not in FILE_FORMATS:
        raise ValueError(f"unknown file format {file_format!r}; choose one of {', '.join(FILE_FORMATS)}")
    return _parse_records(Path(path), _read_text(Path(path)), file_format)


def read_examples(path: PathLike, fields: Fields = ALPACA_FIELDS, strict: bool = False,
                  file_format: str = "auto") -> Tuple[List[Example], int, List[str]]:
    """The well-formed examples of a JSON list or JSON Lines file, the number of records read, and one
    message per skipped record ("line 7: missing field 'output' ..."). With `strict`, the first bad
    record raises a ValueError instead. A file that cannot be read at all always raises."""
    path = Path(path)
    rows = read_records(path, file_format)
    examples, problems = [], []
    for position, (where, record, parse_error) in enumerate(rows):
        try:
            if parse_error is not None:
                raise ValueError(parse_error)
            examples.append(Example(position, *_check_record(record, fields)))
        except ValueError as problem:
            if strict:
                raise ValueError(f"{path}: {where}: {problem} (fix it, or leave out --strict to skip bad records)") from None
            problems.append(f"{where}: {problem}")
    return examples, len(rows), problems


def choose_val_positions(n_records: int, val_split_fraction: float, val_size: Optional[int], seed: int) -> Set[int]:
    """Positions of the validation records: the first `val_size` (or fraction x n) of a seeded permutation.

    Positions count every record read, before any is skipped or dropped, so the split depends only on
    the file and the seed: changing max_seq_length or fixing a bad record does not reshuffle it.
    """
    if val_size is None:
        if not 0 <= val_split_fraction < 1:
            raise ValueError(f"val_split_fraction must be in [0, 1), got {val_split_fraction}")
        val_size = round(val_split_fraction * n_records)
    elif not 0 <= val_size < n_records:
        raise ValueError(f"val_size must be in [0, {n_records}) for {n_records} records, got {val_size}")
    permutation = np.random.default_rng(seed).permutation(n_records)
    return set(permutation[:val_size].tolist())


def fit_sample(prompt_ids: List[int], response_ids: List[int], bos_id: Optional[int], eos_id: int, max_seq_length: int,
               truncation: str) -> Tuple[Optional[List[int]], str]:
    """Build [BOS] + prompt + response + [EOS] within `max_seq_length` (no BOS when `bos_id` is None: SmolLM2
    starts a sequence without one). Returns (ids or None, outcome):

    "kept"             it fits as it is
    "truncated"        truncation="truncate_response": the response's tail is cut, EOS still ends it
    "too_long"         truncation="drop" and it does not fit: dropped whole
    "prompt_too_long"  not even BOS + prompt + one response token + EOS fit: dropped (a cut prompt would
                       teach the model a template it never sees at generation time)
    """
    bos = [] if bos_id is None else [bos_id]
    ids = bos + prompt_ids + response_ids + [eos_id]
    if len(ids) <= max_seq_length:
        return ids, "kept"
    if truncation == "drop":
        return None, "too_long"
    room = max_seq_length - len(bos) - len(prompt_ids) - 1  # response tokens that fit beside BOS, the prompt and EOS
    if room < 1:
        return None, "prompt_too_long"
    return bos + prompt_ids + response_ids[:room] + [eos_id], "truncated"


def length_percentiles(lengths: List[int]) -> Dict[str, int]:
    """p50/p90/p99/max of sample lengths in tokens (each an actual length: numpy's "higher" method)."""
    values = np.asarray(lengths)
    stats = {f"p{q}": int(np.percentile(values, q, method="higher")) for q in (50, 90, 99)}
    stats["max"] = int(values.max())
    return stats


def prepare_instruction_data(data_file: PathLike, destination_path: PathLike, tokenizer_path: PathLike, *,
                             fields: Fields = ALPACA_FIELDS, file_format: str = "auto", max_seq_length: int = 512,
                             val_split_fraction: float = 0.03865, val_size: Optional[int] = None, seed: int = 42,
                             mask_prompt: bool = True, prompt_style: str = "alpaca", truncation: str = "drop",
                             strict: bool = False) -> Dict[str, Any]:
    """Read, check, split, tokenize and write one dataset; returns what prepare_config.json holds."""
    data_file, destination_path = Path(data_file), Path(destination_path)
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATION_POLICIES)}")
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    style = get_prompt_style(prompt_style)
    tokenizer = Tokenizer(tokenizer_path)

    examples, n_records, problems = read_examples(data_file, fields, strict, file_format)
    if not examples:
        first = f" (first problem: {problems[0]})" if problems else ""
        raise ValueError(f"{data_file}: no usable record among {n_records}{first}")
    val_positions = choose_val_positions(n_records, val_split_fraction, val_size, seed)

    # One batched call per side: SentencePiece spreads it over `threads` C++ threads (as many as torch may
    # use). On a busy 2-core machine it is no faster than a loop (benchmarks/benchmark_prepare.py); the
    # whole 52k Alpaca still prepares in about 12 s there.
    prompt_ids = tokenizer.encode_batch([style.format(e.instruction, e.input) for e in examples])
    response_ids = tokenizer.encode_batch([e.output for e in examples])
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    eos_id = tokenizer.eos_id if style.end_of_turn is None else tokenizer.token_to_id(style.end_of_turn)
    if eos_id is None:
        raise ValueError(f"prompt style {style.name!r} ends an answer with {style.end_of_turn}, which the tokenizer "
                         f"{tokenizer.model_path} does not have: choose a prompt style of this model's family")

    splits = {"train": ([], []), "val": ([], [])}  # split -> (samples, prompt lengths)
    outcomes = {"kept": 0, "truncated": 0, "too_long": 0, "prompt_too_long": 0}
    for example, prompt, response in zip(examples, prompt_ids, response_ids):
        ids, outcome = fit_sample(prompt, response, bos_id, eos_id, max_seq_length, truncation)
        outcomes[outcome] += 1
        if ids is not None:
            samples, prompt_lengths = splits["val" if example.position in val_positions else "train"]
            samples.append(ids)
            prompt_lengths.append((bos_id is not None) + len(prompt))  # BOS + prompt: the positions whose labels are masked
    lengths = [(bos_id is not None) + len(p) + len(r) + 1 for p, r in zip(prompt_ids, response_ids)]
    if not splits["train"][0]:
        raise ValueError(f"{data_file}: no training sample left with max_seq_length={max_seq_length} (median "
                         f"record length {length_percentiles(lengths)['p50']} tokens): raise --max_seq_length")

    counts = {"records_read": n_records, "kept": outcomes["kept"] + outcomes["truncated"],
              "truncated": outcomes["truncated"], "dropped_malformed": len(problems),
              "dropped_too_long": outcomes["too_long"], "dropped_prompt_too_long": outcomes["prompt_too_long"],
              "train": len(splits["train"][0]), "val": len(splits["val"][0])}
    config = {
        **describe_inputs(data_file, tokenizer, asdict(fields)),
        "prompt_style": style.name,
        "sample_layout": "[BOS] + encode(prompt) + encode(response) + [EOS]",
        "mask_prompt": mask_prompt, "ignore_index": IGNORE_INDEX,
        "max_seq_length": max_seq_length, "truncation": truncation,
        "seed": seed, "val_split_fraction": val_split_fraction, "val_size": val_size,
        "counts": counts,
        "token_lengths": length_percentiles(lengths),
        "skipped": problems[:MAX_LISTED_PROBLEMS],
    }
    write_prepared_set(destination_path, {split: (samples, prompt_lengths, None)
                                          for split, (samples, prompt_lengths) in splits.items()}, config)
    return config


def describe_inputs(data_file: Path, tokenizer: Tokenizer, fields: Dict[str, str]) -> Dict[str, Any]:
    """The part of prepare_config.json that says where the data came from and which tokenizer made the ids."""
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "files": {"train": "train.safetensors", "val": "val.safetensors"},
        "source": {"path": str(data_file.resolve()), "sha256": file_sha256(data_file),
                   "size": data_file.stat().st_size, "fields": fields},
        "tokenizer": {"path": str(Path(tokenizer.model_path).resolve()), "sha256": file_sha256(tokenizer.model_path),
                      "size": Path(tokenizer.model_path).stat().st_size, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
    }


def write_prepared_set(destination_path: Path, splits: Dict[str, Tuple[List[List[int]], List[int], Optional[List[List[bool]]]]],
                       config: Dict[str, Any]) -> None:
    """Write each split (samples, prompt lengths, learned-token masks or None) and then prepare_config.json,
    which names the exact files it was written with."""
    with removed_on_failure(destination_path):  # a failed write (a full disk) leaves no new directory
        for split, (samples, prompt_lengths, learned) in splits.items():
            save_prepared(destination_path / config["files"][split], samples, prompt_lengths, config["mask_prompt"],
                          learned)
        # Written last, naming the exact files: a run killed before this line leaves the old config, which
        # then refuses the new split beside it (data.load_prepared_split).
        config["files_sha256"] = {split: file_sha256(destination_path / name) for split, name in config["files"].items()}
        save_json(config, destination_path / PREPARE_CONFIG_NAME)


def format_summary(config: Dict[str, Any], destination_path: PathLike) -> str:
    """What a preparer prints: records read, kept, truncated, dropped and why, token-length percentiles."""
    counts, lengths = config["counts"], config["token_lengths"]
    dropped = counts["dropped_malformed"] + counts["dropped_too_long"] + counts["dropped_prompt_too_long"]
    lines = [f"read {counts['records_read']} records from {config['source']['path']}"]
    lines += [f"  skipped {problem}" for problem in config["skipped"][:10]]
    if counts["dropped_malformed"] > 10:
        lines.append(f"  ... {counts['dropped_malformed'] - 10} more skipped records (see {PREPARE_CONFIG_NAME})")
    conversations = "turns_dropped" in counts
    lines += [
        f"kept {counts['kept']} (train {counts['train']}, val {counts['val']}), of which {counts['truncated']} "
        + (f"cut to their first turns ({counts['turns_dropped']} later turns dropped)" if conversations
           else "with a truncated response"),
        f"dropped {dropped}: {counts['dropped_malformed']} malformed, {counts['dropped_too_long']} longer than "
        f"max_seq_length={config['max_seq_length']}"
        + ("" if conversations else f", {counts['dropped_prompt_too_long']} with a prompt too long to leave room "
                                    "for a response"),
        ("tokens per conversation (all turns, before truncation): " if conversations
         else "tokens per record (BOS + prompt + response + EOS, before truncation): ")
        + ", ".join(f"{name} {value}" for name, value in lengths.items()),
        f"wrote {Path(destination_path) / config['files']['train']}, {config['files']['val']} and {PREPARE_CONFIG_NAME}",
    ]
    return "\n".join(lines)
