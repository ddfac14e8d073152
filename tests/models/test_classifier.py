"""SequenceClassifier: mean pooling over non-pad positions, pads out of the logits, the
backbone's names and loading an LM's weights into it."""

import ast
from pathlib import Path

import pytest
import torch

from xpar.errors import XparConfigError
from xpar.models.classifier import (
    HEAD_KEYS,
    SequenceClassifier,
    describe_load,
    load_backbone_state,
    mean_pool,
)
from xpar.models.config import ModelConfig
from xpar.models.transformer import MoETransformer
from xpar.moe import MoEConfig

DENSE = MoEConfig(every=0)
MOE = MoEConfig(num_experts=4, top_k=2, d_ff=32, every=2, capacity_factor=None)
PAD = 47
C = 5


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def build(seed=0, moe=DENSE, **kw) -> SequenceClassifier:
    torch.manual_seed(seed)
    return SequenceClassifier(MoETransformer(tiny(**kw), moe), num_classes=C, pad_id=PAD)


def padded(lengths, L, seed=0):
    """Rows of random non-pad ids (the same for any L), each followed by pads up to L."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((len(lengths), L), PAD)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randint(0, PAD, (n,), generator=g)
    return x


def test_mean_pool_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 6, 3, generator=g)
    keep = torch.rand(4, 6, generator=g) < 0.5
    keep[2] = False  # a row with nothing kept pools to zeros
    out = mean_pool(h, keep)
    for b in range(4):
        rows = [h[b, i] for i in range(6) if keep[b, i]]
        want = sum(rows) / len(rows) if rows else torch.zeros(3)
        torch.testing.assert_close(out[b], want)


@pytest.mark.parametrize("moe", [DENSE, MOE], ids=["dense", "moe"])
def test_forward_is_head_of_the_mean_of_hidden_states(moe):
    clf = build(moe=moe)
    x = padded([3, 8, 1], 8)
    logits, aux = clf(x)
    assert logits.shape == (3, C)
    assert len(aux) == (1 if moe is MOE else 0)  # every=2 of 2 blocks: one MoE block
    h, _ = clf.backbone.hidden(x)
    for b, n in enumerate([3, 8, 1]):
        pooled = sum(h[b, i] for i in range(n)) / n
        want = clf.head.weight @ pooled + clf.head.bias
        torch.testing.assert_close(logits[b], want, rtol=1e-5, atol=1e-6)


def test_pad_hidden_states_never_reach_the_logits(monkeypatch):
    """Whatever the backbone puts at pad positions, the logits are the same: the pooling
    leaves them out (this holds for any backbone, causal or not)."""
    clf = build(causal=False)
    x = padded([2, 5, 7], 7)
    base, _ = clf(x)
    hidden = clf.backbone.hidden

    def noisy(tokens):
        h, aux = hidden(tokens)
        noise = torch.randn_like(h) * 100
        return h + noise * (tokens == PAD).unsqueeze(-1), aux

    monkeypatch.setattr(clf.backbone, "hidden", noisy)
    assert torch.equal(clf(x)[0], base)


@pytest.mark.parametrize("moe", [DENSE, MOE], ids=["dense", "moe"])
def test_causal_backbone_logits_do_not_depend_on_padding(moe):
    clf = build(moe=moe)
    lengths = [3, 6, 1, 6]
    short, _ = clf(padded(lengths, 6))
    for L in (7, 12, 20):
        longer, _ = clf(padded(lengths, L))
        torch.testing.assert_close(longer, short, rtol=1e-5, atol=1e-6)


def test_all_pad_row_gives_the_bias():
    clf = build()
    with torch.no_grad():
        clf.head.bias.copy_(torch.arange(C, dtype=torch.float32))
    logits, _ = clf(torch.full((2, 4), PAD))
    assert torch.equal(logits, torch.arange(C, dtype=torch.float32).expand(2, C))


def test_head_init_and_every_parameter_trains():
    clf = build(seed=3, moe=MOE, d_model=64)
    assert torch.equal(clf.head.bias, torch.zeros(C))
    std = clf.head.weight.std().item()
    assert 0.7 * 0.02 < std < 1.3 * 0.02  # normal(init_std) over 320 draws
    logits, aux = clf(padded([4, 9, 2], 9))
    (logits.square().mean() + sum(a.loss for a in aux)).backward()
    no_grad = [n for n, p in clf.named_parameters() if p.grad is None]
    assert no_grad == []  # the LM head is gone, nothing sits unused


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("moe", [DENSE, MOE], ids=["dense", "moe"])
def test_names_are_the_lms_under_backbone(tie, moe):
    lm = MoETransformer(tiny(tie_embeddings=tie), moe)
    clf = build(moe=moe, tie_embeddings=tie)
    lm_keys = {k for k in lm.state_dict() if not k.startswith("lm_head.")}
    assert set(clf.state_dict()) == {"backbone." + k for k in lm_keys} | set(HEAD_KEYS)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("moe", [DENSE, MOE], ids=["dense", "moe"])
def test_loading_an_lm_leaves_the_backbone_bitwise_equal(tie, moe):
    torch.manual_seed(11)
    lm = MoETransformer(tiny(tie_embeddings=tie), moe)
    clf = build(seed=22, moe=moe, tie_embeddings=tie)
    head_before = {k: v.clone() for k, v in clf.head.state_dict().items()}
    own_before = clf.state_dict()["backbone.tok_emb.weight"].clone()
    assert not torch.equal(own_before, lm.tok_emb.weight)  # different seeds: a real copy
    missing, unexpected = load_backbone_state(clf, lm.state_dict())
    assert missing == sorted(HEAD_KEYS) and unexpected == ["lm_head.weight"]
    got = clf.state_dict()
    for k, v in lm.state_dict().items():
        if not k.startswith("lm_head."):
            assert torch.equal(got["backbone." + k], v), k
    for k, v in clf.head.state_dict().items():
        assert torch.equal(v, head_before[k])  # the head stays fresh
    # The loaded classifier computes on the LM's hidden states.
    x = padded([5, 2], 5)
    torch.testing.assert_close(clf.backbone.hidden(x)[0], lm.hidden(x)[0])
    n = len(lm.state_dict()) - len(unexpected)
    line = describe_load(n, missing, unexpected)
    assert f"{n} backbone tensors" in line and "lm_head.weight" in line and "head.bias" in line


def test_loading_another_shape_is_a_config_error():
    clf = build()
    deeper = MoETransformer(tiny(n_layers=3), DENSE).state_dict()
    with pytest.raises(XparConfigError, match=r"train.init_from: .*'blocks.2.* has no place"):
        load_backbone_state(clf, deeper)
    shallow = MoETransformer(tiny(n_layers=1), DENSE).state_dict()
    with pytest.raises(XparConfigError, match=r"'backbone.blocks.1.* is missing"):
        load_backbone_state(clf, shallow)
    wider = MoETransformer(tiny(d_ff=128), DENSE).state_dict()
    with pytest.raises(
        XparConfigError, match=r"has shape \(128, 32\) in the checkpoint but \(64, 32\)"
    ):
        load_backbone_state(clf, wider, where="train.init_from='x'")


def test_constructor_checks():
    with pytest.raises(ValueError, match="at least 2 classes"):
        SequenceClassifier(MoETransformer(tiny(), DENSE), num_classes=1, pad_id=0)


def test_no_distributed_imports():
    src = (Path(__file__).parents[2] / "xpar" / "models" / "classifier.py").read_text()
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    assert "xpar.models.transformer" in names  # the walk sees imports
    assert not [n for n in names if n.startswith(("torch.distributed", "deepspeed"))]
