"""Training batches of similar length: every sample once per epoch, on every rank the same number of batches,
seeded, and far less padding than random batches; and finetune really trains on them."""

import torch
from torch.utils.data import DistributedSampler

import nmcli.train.engine
from nmcli.data.batches import LengthGroupedBatches


def _batches(lengths, batch_size, seed=0, epoch=0, world=1, rank=0):
    order = DistributedSampler(range(len(lengths)), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    batches = LengthGroupedBatches(order, lengths, batch_size, seed)
    batches.set_epoch(epoch)
    return list(batches), len(batches)


def _real_fraction(batches, lengths):
    return sum(lengths[i] for b in batches for i in b) / sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_every_sample_once_seeded_and_tightly_packed():
    g = torch.Generator().manual_seed(0)
    # two populations, as MiniLM's mix: long paragraphs and short sentences
    mixed = torch.cat([torch.randint(90, 129, (300,), generator=g), torch.randint(5, 30, (700,), generator=g)])
    lengths = mixed[torch.randperm(1000, generator=g)].tolist()
    batches, count = _batches(lengths, 16)
    assert count == len(batches) == 63 and sorted(i for b in batches for i in b) == list(range(1000))
    assert sum(len(b) < 16 for b in batches) == 1  # only the last megabatch's remainder is short
    assert _real_fraction(batches, lengths) > 0.9
    shuffled = torch.randperm(1000, generator=g).tolist()
    assert _real_fraction([shuffled[i : i + 16] for i in range(0, 1000, 16)], lengths) < 0.5  # random batches
    assert _batches(lengths, 16)[0] == batches
    assert _batches(lengths, 16, epoch=1)[0] != batches and _batches(lengths, 16, seed=1)[0] != batches
    # batches are not ordered by length: long and short ones alternate through the epoch
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_ranks_share_the_samples_with_equal_batch_counts():
    lengths = [1 + (7 * i) % 50 for i in range(101)]
    per_rank = [_batches(lengths, 8, world=3, rank=r) for r in range(3)]
    assert len({count for _, count in per_rank}) == 1 and all(len(b) == count for b, count in per_rank)
    seen = [i for batches, _ in per_rank for b in batches for i in b]
    assert set(seen) == set(range(101)) and len(seen) == 102  # DistributedSampler repeats one sample to even out


def test_finetune_trains_text_in_batches_grouped_by_length(cli, tmp_path, tiny_bert, monkeypatch):
    """16 samples, batch 4: one megabatch, so the 4 batches are exactly the sorted lengths cut in 4."""
    seen = []
    real = nmcli.train.engine.train_step

    def spy(model, batch, optimizer, **kwargs):
        seen.append(sorted(batch["attention_mask"].sum(1).tolist()))
        return real(model, batch, optimizer, **kwargs)

    monkeypatch.setattr(nmcli.train.engine, "train_step", spy)
    r = cli("finetune", "--model", tiny_bert, "--recipe", "fixed-mask", "--epochs", "1", "--pattern", "2:4",
            "--batch-size", "4", "--seq-len", "64", "--limit", "16", "--data", "python-help", "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    from nmcli.data.text import PYTHON_HELP
    from nmcli.quality.text_data import text_data
    from nmcli.models.architecture import ModelKind
    from nmcli.train.tasks import limit_samples

    train = limit_samples(text_data(ModelKind.ENCODER, tiny_bert, PYTHON_HELP, 64, None).train, 16)
    lengths = sorted(len(train[i]) for i in range(16))
    assert sorted(seen) == sorted(sorted(lengths[i : i + 4]) for i in range(0, 16, 4))
    assert len(set(lengths)) > 4  # the check could fail: the samples differ in length
