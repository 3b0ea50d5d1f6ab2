"""BERT-style token masking for the MLM loss."""
from __future__ import annotations

import torch

from retrieval.train.losses import SpecialTokenIds, mask_tokens

VOCAB = 100


def test_mask_tokens_statistics():
    special = SpecialTokenIds(pad=0, cls=2, sep=3, mask=4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (400, 50), generator=generator)
    ids[:, 0], ids[:, 40], ids[:, 41:] = special.cls, special.sep, special.pad
    masked, labels = mask_tokens(ids, special, VOCAB, mask_prob=0.5, generator=generator)

    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, 40:].any()  # never CLS, SEP, PAD
    assert torch.equal(masked[:, 0], ids[:, 0]) and torch.equal(masked[:, 40:], ids[:, 40:])
    torch.testing.assert_close(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])

    rate = selected[:, 1:40].float().mean().item()
    assert abs(rate - 0.5) < 0.02
    n = selected.sum().item()
    as_mask = (masked[selected] == special.mask).sum().item() / n
    kept = (masked[selected] == ids[selected]).sum().item() / n  # includes random draws of the same id
    assert abs(as_mask - 0.8) < 0.02
    assert abs(kept - 0.1) < 0.02
    assert abs(1 - as_mask - kept - 0.1) < 0.02  # the rest: random ids
    assert ids.max() < VOCAB and masked.max() < VOCAB


def test_mask_tokens_is_reproducible_and_leaves_input_alone():
    special = SpecialTokenIds(pad=0, cls=2, sep=3, mask=4)
    ids = torch.tensor([[2, 11, 12, 13, 14, 15, 3], [2, 21, 22, 3, 0, 0, 0]])
    original = ids.clone()
    first = mask_tokens(ids, special, VOCAB, generator=torch.Generator().manual_seed(5))
    second = mask_tokens(ids, special, VOCAB, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(ids, original)
