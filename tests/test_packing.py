"""Packed rows: several samples per row, each computed exactly as if it were alone."""

import pytest
import torch
import torch.nn.functional as F

from lit_lora.data import IGNORE_INDEX, BatchSampler, PackedBatchSampler, load_prepared_split
from lit_lora.lora import LoRAConfig, add_lora
from lit_lora.model import Config, Llama, packed_positions_and_mask
from lit_lora.workflows.prepare import prepare_instruction_data


def _samples(lengths, vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for length in lengths:
        ids = torch.randint(3, vocab_size, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 3] = IGNORE_INDEX  # a masked prompt
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def _token_losses(logits, labels):
    """Per-position next-token losses (B, T), 0 where nothing is counted: the terms loss_fn averages."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)


def _model(n_kv_heads):
    torch.manual_seed(0)
    model = Llama(Config(block_size=128, vocab_size=96, n_layer=2, n_head=4, n_embd=64, n_kv_heads=n_kv_heads,
                         intermediate_size=160))
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.2)  # logits with spread: a sample seeing another moves them visibly
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=("q", "k", "v", "o")))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # a trained adapter, not the zero start
    return model.eval()


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_every_sample_in_a_packed_row_has_its_loss_alone(n_kv_heads):
    model = _model(n_kv_heads)
    samples = _samples([23, 7, 40, 12, 31, 5, 18, 26, 9, 33], vocab_size=96)
    sampler = PackedBatchSampler([len(s["input_ids"]) for s in samples], batch_size=2, row_length=64, seed=0)
    seen = []
    for batch in sampler.batches(epoch=0):
        packed = sampler.collate(samples, batch)
        with torch.no_grad():
            losses = _token_losses(model(packed["input_ids"], segment_ids=packed["segment_ids"]), packed["labels"])
            naive = _token_losses(model(packed["input_ids"]), packed["labels"])  # one long causal sequence
        for r, row in enumerate(batch):
            for segment, i in enumerate(row):
                alone_ids, alone_labels = samples[i]["input_ids"][None], samples[i]["labels"][None]
                with torch.no_grad():
                    alone = _token_losses(model(alone_ids), alone_labels).sum()
                in_row = packed["segment_ids"][r] == segment
                torch.testing.assert_close(losses[r][in_row].sum(), alone, rtol=1e-5, atol=0)
                if segment > 0:  # the pitfall: without the block-diagonal mask, later samples see earlier ones
                    assert abs(naive[r][in_row].sum() - alone) > 1e-3 * alone
                seen.append(i)
    assert sorted(seen) == list(range(len(samples)))


def test_packed_positions_restart_and_the_mask_is_block_diagonal():
    positions, mask = packed_positions_and_mask(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]]))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for start, end in [(0, 3), (3, 5), (5, 8)]:
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expected)


def test_collate_ignores_the_first_label_of_every_sample_and_pads_as_its_own_segment():
    samples = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([1, 5, 6])},
               {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([1, 7])}]
    sampler = PackedBatchSampler([3, 2], batch_size=1, row_length=7, seed=0)
    packed = sampler.collate(samples, [[0, 1]])
    assert packed["input_ids"].tolist() == [[1, 5, 6, 1, 7, 0, 0]]
    assert packed["labels"].tolist() == [[-100, 5, 6, -100, 7, -100, -100]]
    assert packed["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2]]


def test_packed_batches_hold_every_sample_once_and_fill_the_rows(shared_data, llama2_tokenizer_path, tmp_path):
    prepare_instruction_data(shared_data / "alpaca" / "alpaca_data_sample.json", tmp_path, llama2_tokenizer_path,
                             max_seq_length=256, val_size=8, seed=42)
    lengths = [len(s["input_ids"]) for s in load_prepared_split(tmp_path, "train")]
    sampler = PackedBatchSampler(lengths, batch_size=4, row_length=max(lengths), seed=3)
    padded = BatchSampler(lengths, 4, shuffle=True, seed=3).batches(0)
    padded_fill = sum(lengths) / sum(max(lengths[i] for i in batch) * len(batch) for batch in padded)
    epochs = [sampler.batches(epoch) for epoch in range(2)]
    for batches in epochs:
        rows = [row for batch in batches for row in batch]
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
        assert all(len(batch) <= 4 for batch in batches)
        fill = sum(lengths) / (len(rows) * max(lengths))
        assert fill > 0.9 and fill > 1.3 * padded_fill, (fill, padded_fill)  # measured: 0.94 and 0.66
    assert epochs[0] != epochs[1]  # a new order every epoch...
    assert sampler.batches(0) == epochs[0]  # ...the same for the same seed and epoch (resume)
    with pytest.raises(ValueError, match="more than a packed row"):
        PackedBatchSampler(lengths, batch_size=4, row_length=max(lengths) - 1, seed=0)

