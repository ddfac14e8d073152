"""BERT-style masking for the masked-LM objective of the encoder (model.causal=false).

    inputs_BL, labels_BL = mask_tokens(tokens_BL, mask_id=m, vocab_size=v,
                                       generator=mlm_generator(seed, step, micro, rank))

Exact counts, not Bernoulli draws: every sequence of length L gets n = max(1, round(rate*L))
chosen positions (at most L), and of those exactly round(p_mask*n) become mask_id and
round(p_random*n) (at most what is left) a random id; the rest keep their token. So every
batch has the same number of predicted tokens, B*n: the loss scale does not jitter with the
draw. Which positions get which treatment comes from one random permutation per sequence.

The masks depend only on the generator's seed, never on an RNG stream that a resume would
have to restore: `mlm_seed(seed, step, micro, rank)` mixes the run's position into a seed.
Random numbers are drawn on the generator's device (a CPU generator gives the same masks
whatever device the tokens are on).

mask_id: the first id past the tokenizer's vocabulary (`mask_id_for`); the model's vocab is
padded to a multiple of 64, which usually leaves room.

Shape suffixes: B batch, L sequence, N chosen positions per sequence.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from xpar.errors import XparConfigError

IGNORE = -100  # label of the positions the loss skips (torch's cross_entropy default)


def chosen_count(seq_len: int, rate: float) -> int:
    """Positions masked per sequence: round(rate * L), at least 1, at most L."""
    return min(seq_len, max(1, round(rate * seq_len)))


def split_counts(n: int, p_mask: float, p_random: float) -> tuple[int, int, int]:
    """(to mask_id, to a random id, kept) among n chosen positions; they sum to n."""
    n_mask = min(n, round(p_mask * n))
    n_random = min(n - n_mask, round(p_random * n))
    return n_mask, n_random, n - n_mask - n_random


def mask_tokens(
    tokens_BL: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    rate: float = 0.15,
    p_mask: float = 0.8,
    p_random: float = 0.1,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BL, labels_BL): inputs with the chosen positions replaced; labels hold the
    original id at every chosen position and IGNORE (-100) elsewhere.

    vocab_size is the tokenizer's real vocabulary: random replacements are ids in
    [0, vocab_size), never padding ids or mask_id. Deterministic given the generator's state.
    """
    if tokens_BL.dim() != 2:
        raise ValueError(f"tokens_BL must be [B, L], got shape {tuple(tokens_BL.shape)}")
    if not 0.0 < rate <= 1.0 or p_mask < 0 or p_random < 0 or p_mask + p_random > 1.0:
        raise ValueError(
            f"bad masking rates rate={rate}, p_mask={p_mask}, p_random={p_random}: "
            "need 0 < rate <= 1 and p_mask, p_random >= 0 with p_mask + p_random <= 1"
        )
    B, L = tokens_BL.shape
    n = chosen_count(L, rate)
    n_mask, n_random, _ = split_counts(n, p_mask, p_random)
    dev = generator.device
    # One uniform permutation per row: its first n entries are the chosen positions, in an
    # order that also decides the treatment (first n_mask masked, next n_random random).
    perm_BL = torch.rand(B, L, generator=generator, device=dev).argsort(dim=1)
    random_ids_BN = torch.randint(0, vocab_size, (B, n_random), generator=generator, device=dev)
    perm_BL = perm_BL.to(tokens_BL.device)
    chosen_BN = perm_BL[:, :n]
    labels_BL = torch.full_like(tokens_BL, IGNORE)
    labels_BL.scatter_(1, chosen_BN, tokens_BL.gather(1, chosen_BN))
    inputs_BL = tokens_BL.clone()
    inputs_BL.scatter_(1, chosen_BN[:, :n_mask], mask_id)
    inputs_BL.scatter_(
        1,
        chosen_BN[:, n_mask : n_mask + n_random],
        random_ids_BN.to(device=tokens_BL.device, dtype=tokens_BL.dtype),
    )
    return inputs_BL, labels_BL


def mlm_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A stable 63-bit seed for one micro-batch of one rank: the same in every process and
    Python run (a hash, not Python's salted hash()), distinct for distinct inputs."""
    blob = struct.pack("<4q", int(seed), int(step), int(micro), int(rank))
    digest = hashlib.blake2b(blob, digest_size=8, person=b"xpar-mlm").digest()
    return int.from_bytes(digest, "little") >> 1


def mlm_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A CPU generator seeded by mlm_seed: pass it to mask_tokens."""
    return torch.Generator().manual_seed(mlm_seed(seed, step, micro, rank))


def mask_id_for(tokenizer_vocab: int, model_vocab: int) -> int:
    """The mask id: the first id past the tokenizer's vocabulary, which the model's (padded)
    embedding must hold; a config error with the fix when it does not."""
    if model_vocab <= tokenizer_vocab:
        raise XparConfigError(
            f"model.vocab_size={model_vocab} is invalid for a masked LM: the tokenizer has "
            f"{tokenizer_vocab} ids and the mask token needs one more (id {tokenizer_vocab}); "
            f"set model.vocab_size >= {tokenizer_vocab + 1} (a multiple of 64 such as "
            f"{-(-(tokenizer_vocab + 1) // 64) * 64})"
        )
    return tokenizer_vocab
