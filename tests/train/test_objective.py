"""Loss functions of the objectives against hand-written per-token loops (values and
gradients), closed forms, and the configs of the objectives (task.*, train.distill.*)."""

import math

import pytest
import torch
import torch.nn.functional as F

from xpar.errors import XparConfigError
from xpar.train.objective import (
    IGNORE,
    accuracy,
    classify_loss,
    correct_count,
    distill_loss,
    distill_parts,
    lm_loss,
    mlm_loss,
)
from xpar.train.task_config import DistillConfig, TaskConfig

SEEDS = range(4)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def logits_and_targets(seed, shape=(3, 7), V=11, ignore_share=0.0):
    g = gen(seed)
    logits = (torch.randn(*shape, V, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, V, shape, generator=g)
    drop = torch.rand(shape, generator=g) < ignore_share
    return logits, targets.masked_fill(drop, IGNORE)


def ref_ce(logits, targets):
    """Mean over kept positions of -log softmax(logits)[target], one position at a time, in
    float64 (0 when nothing is kept)."""
    flat, ys = logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1).tolist()
    terms = []
    for row, y in zip(flat, ys, strict=True):
        if y == IGNORE:
            continue
        lse = torch.log(sum(torch.exp(row[v]) for v in range(row.shape[0])))
        terms.append(lse - row[y])
    return sum(terms) / len(terms) if terms else flat.sum() * 0.0


def ref_kl(student, teacher, targets, tau):
    """tau^2 * mean over kept positions of sum_v p_t (log p_t - log p_s), at temperature tau."""
    V = student.shape[-1]
    s_rows, t_rows = student.double().reshape(-1, V), teacher.double().reshape(-1, V)
    terms = []
    for s, t, y in zip(s_rows, t_rows, targets.reshape(-1).tolist(), strict=True):
        if y == IGNORE:
            continue
        zs = sum(math.exp(float(x) / tau) for x in t)
        kl = s.sum() * 0.0
        log_zs = torch.log(sum(torch.exp(s[v] / tau) for v in range(V)))
        for v in range(V):
            p_t = math.exp(float(t[v]) / tau) / zs
            kl = kl + p_t * (math.log(p_t) - (s[v] / tau - log_zs))
        terms.append(kl)
    return tau**2 * sum(terms) / len(terms) if terms else s_rows.sum() * 0.0


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_()
    fn(x).backward()
    return x.grad


@pytest.mark.parametrize("seed", SEEDS)
def test_lm_loss_matches_loop_and_the_trainers_formula(seed):
    logits, y = logits_and_targets(seed)
    loss = lm_loss(logits, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_ce(logits, y), rtol=1e-6, atol=1e-6)
    # Bitwise the LM task's formula, so the golden loss curve stays as it is.
    assert torch.equal(loss, F.cross_entropy(logits.float().flatten(0, 1), y.flatten()))
    g = grad_of(lambda x: lm_loss(x, y), logits)
    g_ref = grad_of(lambda x: ref_ce(x, y), logits.double())
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)


def test_lm_loss_computes_in_float32():
    logits, y = logits_and_targets(0)
    lb = logits.detach().bfloat16()
    assert lm_loss(lb, y).dtype == torch.float32
    assert torch.equal(lm_loss(lb, y), lm_loss(lb.float(), y))


def test_uniform_logits_give_log_v():
    y = torch.tensor([[1, 2, IGNORE]])
    for fn in (lm_loss, mlm_loss):
        torch.testing.assert_close(fn(torch.zeros(1, 3, 13), y), torch.tensor(math.log(13)))


@pytest.mark.parametrize("seed", SEEDS)
def test_mlm_loss_is_mean_over_masked_positions(seed):
    logits, y = logits_and_targets(seed, shape=(4, 9), ignore_share=0.8)
    assert (y != IGNORE).any()
    loss = mlm_loss(logits, y)
    torch.testing.assert_close(loss.double(), ref_ce(logits, y), rtol=1e-6, atol=1e-6)
    g = grad_of(lambda x: mlm_loss(x, y), logits)
    g_ref = grad_of(lambda x: ref_ce(x, y), logits.double())
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)
    # Closed form: (softmax - onehot) / M at masked positions, 0 elsewhere.
    kept = y != IGNORE
    closed = torch.softmax(logits.detach(), -1) - F.one_hot(y.clamp(min=0), logits.shape[-1])
    closed = closed * kept.unsqueeze(-1) / kept.sum()
    torch.testing.assert_close(g, closed, rtol=1e-5, atol=1e-7)
    # Gathered logits [M, V] with labels [M] give the same loss.
    torch.testing.assert_close(mlm_loss(logits[kept], y[kept]), loss)


def test_mlm_loss_without_masked_positions_is_zero_not_nan():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    y = torch.full((2, 5), IGNORE)
    loss = mlm_loss(logits, y)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("seed", SEEDS)
def test_classify_loss_and_accuracy(seed):
    logits, y = logits_and_targets(seed, shape=(16,), V=5, ignore_share=0.25)
    torch.testing.assert_close(
        classify_loss(logits, y).double(), ref_ce(logits, y), rtol=1e-6, atol=1e-6
    )
    g = grad_of(lambda x: classify_loss(x, y), logits)
    g_ref = grad_of(lambda x: ref_ce(x, y), logits.double())
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)
    hits = n = 0
    for row, label in zip(logits.tolist(), y.tolist(), strict=True):
        if label != IGNORE:
            n += 1
            hits += max(range(len(row)), key=row.__getitem__) == label
    c, k = correct_count(logits, y)
    assert (int(c), int(k)) == (hits, n)
    assert accuracy(logits, y).item() == pytest.approx(hits / n)


def test_accuracy_by_hand():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, IGNORE, 1])
    assert accuracy(logits, y).item() == pytest.approx(2 / 3)
    assert accuracy(logits, torch.full((4,), IGNORE)).item() == 0.0
    assert classify_loss(logits, torch.full((4,), IGNORE)).item() == 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_distill_loss_matches_loop(seed, tau, alpha):
    student, y = logits_and_targets(seed, shape=(2, 5), V=7, ignore_share=0.3)
    teacher = (torch.randn(2, 5, 7, generator=gen(seed + 100)) * 2).requires_grad_()

    def ref(s):
        return alpha * ref_kl(s, teacher.detach(), y, tau) + (1 - alpha) * ref_ce(s, y)

    loss = distill_loss(student, teacher, y, alpha=alpha, temperature=tau)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref(student), rtol=1e-5, atol=1e-6)
    g = grad_of(lambda s: distill_loss(s, teacher, y, alpha=alpha, temperature=tau), student)
    torch.testing.assert_close(g.double(), grad_of(ref, student.double()), rtol=1e-4, atol=1e-7)
    loss.backward()
    assert teacher.grad is None  # detached


def test_distill_kl_gradient_closed_form():
    # d/ds tau^2 KL(p_t || softmax(s/tau)) = tau (softmax(s/tau) - p_t), averaged over kept.
    tau = 3.0
    s, y = logits_and_targets(7, shape=(6,), V=9, ignore_share=0.3)
    t = torch.randn(6, 9, generator=gen(8))
    g = grad_of(lambda x: distill_parts(x, t, y, temperature=tau)[0], s)
    kept = (y != IGNORE).unsqueeze(-1)
    closed = tau * (torch.softmax(s.detach() / tau, -1) - torch.softmax(t / tau, -1))
    torch.testing.assert_close(g, closed * kept / kept.sum(), rtol=1e-5, atol=1e-7)


def test_distill_edges():
    s, y = logits_and_targets(3)
    kl, ce = distill_parts(s, s.detach().clone(), y, temperature=2.0)
    assert abs(kl.item()) < 1e-6  # teacher == student
    torch.testing.assert_close(ce, lm_loss(s, y))
    # alpha=0 is the plain cross entropy whatever the teacher says.
    torch.testing.assert_close(
        distill_loss(s, torch.randn_like(s), y, alpha=0.0, temperature=2.0), mlm_loss(s, y)
    )
    none = torch.full_like(y, IGNORE)
    assert distill_loss(s, torch.randn_like(s), none, alpha=0.5, temperature=2.0).item() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        distill_parts(s, s, y, temperature=0.0)
    with pytest.raises(ValueError, match="same vocabulary"):
        distill_parts(s, torch.zeros(3, 7, 12), y, temperature=1.0)
    bf = distill_loss(s.detach().bfloat16(), s.detach().bfloat16(), y, alpha=0.5, temperature=1)
    assert bf.dtype == torch.float32


# --------------------------------------------------------------------------- configs


def test_task_config_defaults():
    t = TaskConfig()
    assert (t.kind, t.mask_rate, t.mask_random, t.mask_keep) == ("lm", 0.15, 0.1, 0.1)
    assert t.mask_token_share == pytest.approx(0.8)
    assert not t.shipped and TaskConfig(kind="classify").shipped
    assert t.notes(causal=True) == [] and t.notes(causal=False) == []
    note = TaskConfig(mask_rate=0.3).notes(causal=True)
    assert len(note) == 1 and "task.mask_rate" in note[0] and "ignored" in note[0]
    assert TaskConfig(mask_rate=0.3).notes(causal=False) == []


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"kind": "mlm"}, "task.kind='mlm'"),
        ({"mask_rate": 0.0}, "task.mask_rate=0.0"),
        ({"mask_rate": 1.2}, "task.mask_rate=1.2"),
        ({"mask_rate": float("nan")}, "task.mask_rate=nan"),
        ({"mask_rate": True}, "task.mask_rate=True"),
        ({"mask_random": -0.1}, "task.mask_random=-0.1"),
        ({"mask_keep": 1.5}, "task.mask_keep=1.5"),
        ({"mask_random": 0.6, "mask_keep": 0.5}, "task.mask_keep=0.5"),
        ({"text_field": ""}, "task.text_field=''"),
        ({"label_field": 3}, "task.label_field=3"),
        ({"kind": "classify", "train_file": "/no/such.jsonl"}, "task.train_file='/no/such.jsonl'"),
    ],
)
def test_task_config_errors_name_field_and_value(kw, field):
    with pytest.raises(XparConfigError, match=r"is invalid: \w") as e:
        TaskConfig(**kw)
    assert str(e.value).startswith(field)


def test_task_config_file_rules(tmp_path):
    tr, va = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    tr.write_text("{}\n")
    va.write_text("{}\n")
    ok = TaskConfig(kind="classify", train_file=str(tr), val_file=str(va))
    assert not ok.shipped
    with pytest.raises(XparConfigError, match="task.val_file='' .*needs a validation file"):
        TaskConfig(kind="classify", train_file=str(tr))
    with pytest.raises(XparConfigError, match="task.train_file='' .*shipped"):
        TaskConfig(kind="classify", val_file=str(va))
    with pytest.raises(XparConfigError, match="task.train_file=.*only task.kind=classify"):
        TaskConfig(kind="lm", train_file=str(tr), val_file=str(va))
    with pytest.raises(XparConfigError, match="task.val_file=.*is invalid"):
        TaskConfig(kind="classify", train_file=str(tr), val_file=str(tmp_path))  # a directory


def test_distill_config(tmp_path):
    d = DistillConfig()
    assert (d.teacher, d.alpha, d.temperature, d.enabled) == ("", 0.5, 2.0, False)
    assert DistillConfig(teacher=str(tmp_path), alpha=1, temperature=1).enabled
    cases = [
        ({"teacher": str(tmp_path / "nope")}, "train.distill.teacher="),
        ({"teacher": 5}, "train.distill.teacher=5"),
        ({"alpha": 1.5}, "train.distill.alpha=1.5"),
        ({"alpha": -0.1}, "train.distill.alpha=-0.1"),
        ({"alpha": "0.5"}, "train.distill.alpha='0.5'"),
        ({"temperature": 0.0}, "train.distill.temperature=0.0"),
        ({"temperature": float("inf")}, "train.distill.temperature=inf"),
    ]
    for kw, field in cases:
        with pytest.raises(XparConfigError, match="is invalid: ") as e:
            DistillConfig(**kw)
        assert str(e.value).startswith(field), str(e.value)
