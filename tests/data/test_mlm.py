"""BERT masking: exact counts per sequence, 80/10/10 treatments, seeds independent of any
RNG stream, the mask id rule."""

import itertools

import pytest
import torch

from xpar.data.mlm import (
    IGNORE,
    chosen_count,
    mask_id_for,
    mask_tokens,
    mlm_generator,
    mlm_seed,
    split_counts,
)
from xpar.errors import XparConfigError

VOCAB = 50
MASK = 64


def masked(tokens, seed=0, **kw):
    kw = {"mask_id": MASK, "vocab_size": VOCAB, **kw}
    return mask_tokens(tokens, generator=torch.Generator().manual_seed(seed), **kw)


def test_counts_by_hand():
    assert chosen_count(128, 0.15) == 19  # round(19.2)
    assert split_counts(19, 0.8, 0.1) == (15, 2, 2)  # round(15.2), round(1.9), the rest
    assert chosen_count(5, 0.15) == 1  # round(0.75) = 1
    assert chosen_count(3, 0.15) == 1  # round(0.45) = 0 -> at least 1
    assert chosen_count(10, 1.0) == 10
    assert split_counts(1, 0.8, 0.1) == (1, 0, 0)
    assert split_counts(10, 0.5, 0.5) == (5, 5, 0)
    assert split_counts(3, 0.0, 0.0) == (0, 0, 3)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("L", [3, 20, 128])
def test_every_row_gets_exact_counts(seed, L):
    # Originals outside [0, VOCAB) and != MASK: a random replacement always shows.
    orig = torch.full((6, L), VOCAB + 3, dtype=torch.long)
    orig += torch.arange(L)  # distinct per position, still >= VOCAB
    orig[orig == MASK] = VOCAB + 1000
    inputs, labels = masked(orig, seed)
    n = chosen_count(L, 0.15)
    n_mask, n_random, n_keep = split_counts(n, 0.8, 0.1)
    for b in range(orig.shape[0]):
        chosen = labels[b] != IGNORE
        assert int(chosen.sum()) == n
        assert torch.equal(labels[b][chosen], orig[b][chosen])
        assert torch.equal(inputs[b][~chosen], orig[b][~chosen])  # unchosen untouched
        x = inputs[b][chosen]
        assert int((x == MASK).sum()) == n_mask
        is_random = (x >= 0) & (x < VOCAB)
        assert int(is_random.sum()) == n_random
        assert int((x == orig[b][chosen]).sum()) == n_keep
    assert inputs.dtype == labels.dtype == orig.dtype


def test_deterministic_and_seed_dependent():
    tokens = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(9))
    a, la = masked(tokens, 5)
    b, lb = masked(tokens, 5)
    assert torch.equal(a, b) and torch.equal(la, lb)
    c, lc = masked(tokens, 6)
    assert not torch.equal(lc, la)
    assert torch.equal(tokens, tokens.clone())  # input not modified in place


def test_positions_and_random_ids_are_uniform():
    # 4000 rows of 40: each position chosen with probability 6/40 and, given chosen, masked
    # with 5/6, random 1/6 (split_counts(6) = (5, 1, 0)); random ids uniform over VOCAB.
    L, rows = 40, 4000
    orig = torch.full((rows, L), 1000, dtype=torch.long)
    inputs, labels = masked(orig, 1)
    n = chosen_count(L, 0.15)
    assert split_counts(n, 0.8, 0.1) == (5, 1, 0)
    freq_L = (labels != IGNORE).float().mean(0)
    assert torch.allclose(freq_L, torch.full((L,), n / L), atol=0.025)  # 4.4 sigma
    mask_share_L = (inputs == MASK).float().sum(0) / (labels != IGNORE).float().sum(0)
    assert torch.allclose(mask_share_L, torch.full((L,), 5 / 6), atol=0.08)
    rand = inputs[(inputs != MASK) & (inputs != 1000)]
    assert rand.numel() == rows and int(rand.min()) >= 0 and int(rand.max()) < VOCAB
    counts_V = torch.bincount(rand, minlength=VOCAB).float()
    assert counts_V.min() > 0.6 * rows / VOCAB and counts_V.max() < 1.4 * rows / VOCAB


def test_full_rate_and_all_mask():
    tokens = torch.arange(12).view(2, 6)
    inputs, labels = masked(tokens, 0, rate=1.0, p_mask=1.0, p_random=0.0)
    assert torch.equal(labels, tokens) and bool((inputs == MASK).all())


def test_bad_rates_refused():
    t = torch.zeros(2, 8, dtype=torch.long)
    for kw in ({"rate": 0.0}, {"rate": 1.5}, {"p_mask": 0.9, "p_random": 0.2}, {"p_random": -0.1}):
        with pytest.raises(ValueError, match="masking rates"):
            masked(t, 0, **kw)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        masked(torch.zeros(8, dtype=torch.long))


def test_mlm_seed_is_stable_and_distinct():
    # Pinned: a change here changes every masked-LM run's masks (and breaks bitwise resume
    # of runs saved before it).
    assert mlm_seed(0, 0, 0, 0) == 1142238336808750994
    assert mlm_seed(1234, 17, 1, 3) == 660659111652235495
    grid = list(itertools.product(range(4), repeat=4))
    seeds = {mlm_seed(*g) for g in grid}
    assert len(seeds) == len(grid)  # (1, 0, ...) and (0, 1, ...) differ: not a plain sum
    assert all(0 <= s < 2**63 for s in seeds)


def test_masks_do_not_depend_on_earlier_draws():
    """A resumed run masks step 5 as the uninterrupted run did: the generator is rebuilt
    from (seed, step, micro, rank), not carried along."""
    tokens = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(2))

    def at(step):
        return mask_tokens(
            tokens, mask_id=MASK, vocab_size=VOCAB, generator=mlm_generator(7, step, 0, 1)
        )

    for s in range(1, 5):
        at(s)
    torch.manual_seed(123)  # the global RNG plays no part either
    after = at(5)
    torch.manual_seed(999)
    fresh = at(5)
    assert torch.equal(after[0], fresh[0]) and torch.equal(after[1], fresh[1])
    other = mask_tokens(tokens, mask_id=MASK, vocab_size=VOCAB, generator=mlm_generator(7, 5, 0, 0))
    assert not torch.equal(other[1], fresh[1])  # another rank masks differently


def test_mask_id_rule():
    assert mask_id_for(257, 320) == 257
    assert mask_id_for(319, 320) == 319
    with pytest.raises(
        XparConfigError, match=r"model.vocab_size=320 .* set model.vocab_size >= 321 .* 384"
    ):
        mask_id_for(320, 320)
    with pytest.raises(XparConfigError, match="model.vocab_size=100"):
        mask_id_for(257, 100)
