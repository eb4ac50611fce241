"""Prepared instruction data: the on-disk format, and the batches finetuning trains on.

A prepared directory (written by scripts/prepare_alpaca.py, prepare_dolly.py or prepare_json.py):

    data/alpaca/
        train.safetensors      the training split
        val.safetensors        the validation split
        prepare_config.json    how it was made: tokenizer (path, sha256, size), max_seq_length,
                               prompt style, mask_prompt, seed, split, counts, length percentiles

Each split file holds every sample's token ids back to back, plus where each sample starts, so it
loads with one read and no pickle:

    input_ids       int32 (N_tokens,)   [BOS p p p r r EOS][BOS p p r r r r EOS] ...
    offsets         int64 (n + 1,)      sample i is input_ids[offsets[i] : offsets[i + 1]]
    prompt_lengths  int32 (n,)          BOS + prompt tokens of sample i (see lit_lora/prompts.py)

Labels are not stored: they are the ids themselves with the first `prompt_length` positions set to
IGNORE_INDEX when the file's header says `mask_prompt` (the default), so only the response and its EOS
are learned. Labels are aligned with input_ids (labels[t] is token t); the training loss shifts them,
comparing the logits at position t with labels[t + 1].
"""

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler

# The prepared sets are files like any checkpoint: read and written through lit_lora.files.
from lit_lora.files.checkpoint import load_json, load_tensors, save_tensors
from lit_lora.files.utils import PathLike, file_sha256, inside


IGNORE_INDEX = -100  # the default `ignore_index` of torch.nn.functional.cross_entropy
FORMAT_NAME = "lit-lora prepared instruction data"
FORMAT_VERSION = 1
HEADER_KEY = "lit_lora_prepared"  # one header entry holding sorted JSON, so files are byte-reproducible
PREPARE_CONFIG_NAME = "prepare_config.json"
GROUP_SIZE_IN_BATCHES = 50  # length grouping sorts within windows of this many batches (see BatchSampler)

Sample = Dict[str, torch.Tensor]


def save_prepared(path: PathLike, samples: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                  mask_prompt: bool, learned: Optional[Sequence[Sequence[bool]]] = None) -> None:
    """Write one split: `samples[i]` is the full id list of sample i (BOS ... EOS). `learned`, for
    conversations, says token by token which labels count (every answer and its EOS); without it the
    first `prompt_lengths[i]` labels are masked when `mask_prompt`."""
    offsets = [0]
    for ids in samples:
        offsets.append(offsets[-1] + len(ids))
    flat = torch.tensor([token for ids in samples for token in ids], dtype=torch.int32)
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "mask_prompt": mask_prompt, "ignore_index": IGNORE_INDEX}
    tensors = {"input_ids": flat, "offsets": torch.tensor(offsets, dtype=torch.int64),
               "prompt_lengths": torch.tensor(list(prompt_lengths), dtype=torch.int32)}
    if learned is not None:
        tensors["learned"] = torch.tensor([flag for flags in learned for flag in flags], dtype=torch.uint8)
    save_tensors(tensors, path, metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})


def load_prepared(path: PathLike) -> List[Sample]:
    """The samples of one prepared split, each {"input_ids": LongTensor(T), "labels": LongTensor(T)}.

    A missing, truncated or foreign file raises a one-line ValueError/FileNotFoundError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared data not found: {path} (run scripts/prepare_alpaca.py, "
                                "prepare_dolly.py or prepare_json.py first)")
    tensors, metadata = load_tensors(path)  # a CheckpointError (ValueError) if truncated or corrupt
    try:
        header = json.loads(metadata[HEADER_KEY])
        format_name, version = header["format"], header["version"]
        mask_prompt, ignore_index = header["mask_prompt"], header["ignore_index"]
        ids, offsets, prompt_lengths = tensors["input_ids"], tensors["offsets"], tensors["prompt_lengths"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a lit-lora prepared data file (prepare it again with scripts/prepare_*.py)") from None
    if (format_name, version) != (FORMAT_NAME, FORMAT_VERSION):
        raise ValueError(f"{path}: unsupported prepared data format {format_name!r} version {version!r} (prepare it again)")
    if (ids.dim() != 1 or offsets.dim() != 1 or len(offsets) != len(prompt_lengths) + 1 or offsets[0] != 0
            or offsets[-1] != len(ids) or (offsets.diff() < 1).any() or (prompt_lengths > offsets.diff()).any()):
        raise ValueError(f"{path} is corrupt: its offsets/prompt_lengths do not fit its input_ids (prepare it again)")

    learned = tensors.get("learned")
    if learned is not None and learned.shape != ids.shape:
        raise ValueError(f"{path} is corrupt: its learned-token mask does not fit its input_ids (prepare it again)")
    ids = ids.long()  # int32 on disk, int64 for nn.Embedding and cross_entropy
    samples = []
    for start, end, prompt_length in zip(offsets.tolist(), offsets[1:].tolist(), prompt_lengths.tolist()):
        input_ids = ids[start:end]  # a view: no copy
        labels = input_ids.clone()
        if learned is not None:  # a conversation: every answer and its EOS
            labels[learned[start:end] == 0] = ignore_index
        elif mask_prompt:
            labels[:prompt_length] = ignore_index
        samples.append({"input_ids": input_ids, "labels": labels})
    return samples


def load_prepare_config(prepared_dir: PathLike) -> Dict[str, Any]:
    """The prepare_config.json of a prepared directory (how its data was made)."""
    return load_json(Path(prepared_dir) / PREPARE_CONFIG_NAME)


def load_prepared_split(prepared_dir: PathLike, split: str, vocab_size: Optional[int] = None) -> List[Sample]:
    """The samples of one split ("train" or "val") of a prepared directory, checked against its
    prepare_config.json: the file must lie inside the directory and be the one the config was written with
    (its sha256: a preparation killed half-way leaves a new split beside an old config), and with
    `vocab_size` every token id must be one the model knows."""
    config_path = Path(prepared_dir) / PREPARE_CONFIG_NAME
    config = load_prepare_config(prepared_dir)
    try:
        name = config["files"][split]
    except (KeyError, TypeError):
        raise ValueError(f"{config_path} names no {split} file (prepare the data again)") from None
    path = inside(prepared_dir, str(name), str(config_path))
    expected = config.get("files_sha256", {}).get(split)
    if expected is not None and path.is_file() and file_sha256(path) != expected:
        raise ValueError(f"{path} is not the file {config_path} was written with (a preparation interrupted half-way?): "
                         "prepare the data again")
    samples = load_prepared(path)
    if vocab_size is not None and samples:
        ids = torch.cat([sample["input_ids"] for sample in samples])
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"{path} holds token id {int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())}, "
                             f"outside the model's vocabulary of {vocab_size}: prepare it with the model's tokenizer")
    return samples


def check_same_tokenizer(prepared_dir: PathLike, tokenizer_path: PathLike) -> None:
    """Refuse to train on ids made by another tokenizer than the model's (they would be silent garbage)."""
    prepared = load_prepare_config(prepared_dir)["tokenizer"]
    if file_sha256(tokenizer_path) != prepared["sha256"]:
        raise ValueError(f"{prepared_dir} was prepared with the tokenizer {prepared['path']}, which differs from "
                         f"{tokenizer_path}: prepare the data again with this checkpoint's tokenizer")


def collate(batch: Sequence[Sample], pad_id: int = 0, ignore_index: int = IGNORE_INDEX) -> Dict[str, torch.Tensor]:
    """Stack samples of different lengths into (B, T) tensors, padding on the right.

        input_ids  [BOS p p r r EOS pad pad]    labels  [-100 -100 -100 r r EOS -100 -100]
                   [BOS p p p r r  r   EOS]             [-100 -100 -100 -100 r r r EOS]

    Right padding needs no attention mask in a causal model: pads come after every real token, so no
    real token attends to them, and their labels are ignored. Llama 2 has no pad token; any id works.
    """
    longest = max(len(sample["input_ids"]) for sample in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), longest), ignore_index, dtype=torch.long)  # (B, T)
    for row, sample in enumerate(batch):
        length = len(sample["input_ids"])
        input_ids[row, :length] = sample["input_ids"]
        labels[row, :length] = sample["labels"]
    return {"input_ids": input_ids, "labels": labels}


class BatchSampler(Sampler):
    """Batches of sample indices, the same for the same seed; optionally grouped by length.

    The k-th pass over the sampler (epoch k, counting from 0) draws its order from `seed + k`, so every
    epoch differs, and a run restarted with the same seed sees the same batches (set `.epoch` to resume).

    Length grouping cuts padding: a batch is as long as its longest sample. Sorting the whole dataset by
    length would give near-zero padding but the same batches, in the same order, every epoch. Instead:

        shuffle all indices -> cut into windows of 50 batches -> sort each window by length
        -> cut into batches -> shuffle the batch order -> move the longest batch first

    Batches hold similar lengths yet stay random, and the first step uses the most memory, so an
    out-of-memory error shows up at step 1 instead of hours in.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int,
                 group_by_length: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.shuffle, self.seed, self.group_by_length = batch_size, shuffle, seed, group_by_length
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)  # ceil: the last batch may be smaller

    def batches(self, epoch: int) -> List[List[int]]:
        n = len(self.lengths)
        if n == 0:  # an empty split (say, --val_size 0) has no batches
            return []
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        if self.group_by_length:
            windows = order.split(self.batch_size * GROUP_SIZE_IN_BATCHES)
            order = torch.cat([window[torch.sort(self.lengths[window], descending=True, stable=True).indices]
                               for window in windows])
        batches = list(order.split(self.batch_size))
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
            longest = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i]].max()))
            batches.insert(0, batches.pop(longest))
        return [batch.tolist() for batch in batches]

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def collate(self, data: Sequence[Sample], batch: List[int]) -> Dict[str, torch.Tensor]:
        """The (B, T) tensors of one of this sampler's batches, padded on the right (`collate`)."""
        return collate([data[i] for i in batch])


class PackedBatchSampler:
    """Batches of packed rows: several samples back to back in each row of `row_length` tokens.

    Padding wastes the compute of every pad token: Alpaca's samples vary from ~30 to ~500 tokens, so a
    padded batch is often half padding. Packing fills each row with whole samples instead:

        padded   [s1 s1 s1 pad pad pad pad pad]      packed   [s1 s1 s1 s2 s2 s3 s3 s3]
                 [s2 s2 pad pad pad pad pad pad]              [s4 s4 s4 s4 s4 s5 s5 pad]
                 [s3 s3 s3 pad pad pad pad pad]

    and the model keeps the samples apart (`segment_ids`, see `model.packed_positions_and_mask`), so the
    loss of every sample is what it would be alone: packing changes the speed, never the math. A sample
    is never split across rows. Each epoch shuffles the samples (seed + epoch, like `BatchSampler`), then
    fills rows first-fit, longest first, within windows of 50 batches' worth of samples (so the rows stay
    random across epochs), and shuffles the batch order.

    A batch is a list of rows, a row a list of sample indices; `micro_batch_size` counts rows.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, row_length: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = [int(n) for n in lengths]
        too_long = [i for i, n in enumerate(self.lengths) if n > row_length]
        if too_long:
            raise ValueError(f"sample {too_long[0]} has {self.lengths[too_long[0]]} tokens, more than a packed row "
                             f"of {row_length}")
        self.batch_size, self.row_length, self.seed = batch_size, row_length, seed

    def rows(self, epoch: int) -> List[List[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        rows: List[List[int]] = []
        window_size = self.batch_size * GROUP_SIZE_IN_BATCHES
        for start in range(0, len(order), window_size):
            window = sorted(order[start:start + window_size], key=lambda i: -self.lengths[i])  # longest first
            free: List[int] = []  # tokens left in each open row of this window
            first_row = len(rows)
            for i in window:
                row = next((r for r, room in enumerate(free) if room >= self.lengths[i]), None)
                if row is None:
                    rows.append([])
                    free.append(self.row_length)
                    row = len(free) - 1
                rows[first_row + row].append(i)
                free[row] -= self.lengths[i]
        return rows

    def batches(self, epoch: int) -> List[List[List[int]]]:
        rows = self.rows(epoch)
        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def collate(self, data: Sequence[Sample], batch: List[List[int]], pad_id: int = 0) -> Dict[str, torch.Tensor]:
        """(B, row_length) input_ids, labels and segment_ids for a batch of rows.

            input_ids    [BOS p r EOS BOS p p r EOS pad]      segment_ids  [0 0 0 0 1 1 1 1 1 2]
            labels       [-100 -100 r EOS -100 -100 -100 r EOS -100]

        The first label of every sample is IGNORE_INDEX: the loss compares the logits at t with the label
        at t + 1, and the last token of a sample must not learn to predict the next sample's first token.
        Trailing padding is a segment of its own, ignored by the loss.
        """
        shape = (len(batch), self.row_length)
        input_ids = torch.full(shape, pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.empty(shape, dtype=torch.long)
        for r, row in enumerate(batch):
            end = 0
            for segment, i in enumerate(row):
                length = len(data[i]["input_ids"])
                input_ids[r, end:end + length] = data[i]["input_ids"]
                labels[r, end:end + length] = data[i]["labels"]
                labels[r, end] = IGNORE_INDEX
                segment_ids[r, end:end + length] = segment
                end += length
            segment_ids[r, end:] = len(row)
        return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}

