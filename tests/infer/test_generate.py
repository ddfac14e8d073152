"""Generation: the KV cache gives the tokens of full recomputation, sampling is seeded, the
decoding knobs reduce to greedy where they should, encoders are refused; the CLI end to end."""

import pytest
import torch

from xpar.cli import main as xpar_main
from xpar.errors import XparConfigError
from xpar.infer import generate as gen
from xpar.infer.common import load_checkpoint
from xpar.models import MoETransformer
from xpar.models.config import ModelConfig
from xpar.moe import MoEConfig, MoELayer

PROMPT = "def main(argv):\n    "


def _loaded(ckpt):
    model, _, tok = load_checkpoint(ckpt.checkpoint, torch.device("cpu"))
    return model, tok, [tok.eod_id, *map(int, tok.encode(PROMPT))]


def random_model(moe: bool, n_kv_heads: int = 0, causal: bool = True) -> MoETransformer:
    """Random weights with a wide init, so the next-token distribution is far from flat and
    the greedy path wanders (a weak model repeats one id, which proves little)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=61,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        d_ff=64,
        max_seq_len=96,
        init_std=0.3,
        causal=causal,
    )
    # Capacity 1.0: in a full forward the experts drop tokens; generation must not.
    moe_cfg = MoEConfig(num_experts=4, top_k=2, d_ff=32, capacity_factor=1.0) if moe else None
    return MoETransformer(cfg, moe_cfg or MoEConfig(every=0), ep_group="local").eval()


@pytest.mark.parametrize("which", ["dense_ckpt", "moe_ckpt"])
def test_trained_greedy_with_cache_equals_full_recomputation(which, request):
    model, _, ids = _loaded(request.getfixturevalue(which))
    cached = gen.generate(model, ids, 48, use_cache=True)
    full = gen.generate(model, ids, 48, use_cache=False)
    assert len(cached) == 48
    assert cached == full


@pytest.mark.parametrize("moe,n_kv", [(False, 0), (False, 1), (True, 2)])
def test_random_model_cache_equals_recomputation_greedy_and_sampled(moe, n_kv):
    model = random_model(moe, n_kv)
    prompt = [3, 14, 15, 9, 26, 5]
    greedy = gen.generate(model, prompt, 60, use_cache=True)
    assert greedy == gen.generate(model, prompt, 60, use_cache=False)
    assert len(set(greedy)) > 5, greedy  # the path is not one repeated id
    sampled = [
        gen.generate(
            model,
            prompt,
            60,
            temperature=1.0,
            generator=torch.Generator().manual_seed(7),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert sampled[0] == sampled[1]


def test_generation_runs_the_moe_layers_dropless_and_restores_them():
    model = random_model(moe=True)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    with gen.dropless(model):
        assert all(m.cfg.capacity_factor_for(False) is None for m in layers)
    assert all(m.cfg.capacity_factor == 1.0 for m in layers)
    # With capacity, a full forward of the sequence routes differently from one-token steps.
    prompt = list(range(1, 40))
    with torch.no_grad():
        capped, aux = model(torch.tensor([prompt]))
        assert any(float(a.dropped_fraction) > 0 for a in aux)
        with gen.dropless(model):
            free, _ = model(torch.tensor([prompt]))
    assert not torch.allclose(capped, free)


def test_sampling_with_a_seed_is_reproducible():
    model = random_model(moe=True)
    prompt = [1, 2, 3]

    def draw(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return gen.generate(model, prompt, 40, temperature=1.0, generator=g, **kw)

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
    assert draw(5, top_p=0.9, top_k=10) == draw(5, top_p=0.9, top_k=10)


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    model = random_model(moe=False)
    prompt = [4, 8, 15, 16, 23, 42]
    greedy = gen.generate(model, prompt, 40)
    g = torch.Generator().manual_seed(0)
    assert gen.generate(model, prompt, 40, temperature=1.5, top_k=1, generator=g) == greedy
    assert gen.generate(model, prompt, 40, temperature=1.5, top_p=1e-6, generator=g) == greedy


def test_sample_next_keeps_only_the_top_k_and_the_nucleus():
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0, -1.0])
    g = torch.Generator().manual_seed(0)
    seen = {
        gen.sample_next(logits, temperature=1.0, top_k=2, top_p=1.0, generator=g)
        for _ in range(200)
    }
    assert seen == {1, 2}
    # softmax mass: 0.64, 0.24, 0.09, ...: top_p 0.8 keeps ids 1 and 2 (0.64 < 0.8)
    seen = {
        gen.sample_next(logits, temperature=1.0, top_k=0, top_p=0.8, generator=g)
        for _ in range(200)
    }
    assert seen == {1, 2}


def test_stop_id_and_vocab_limit():
    model = random_model(moe=False)
    prompt = [1, 2, 3]
    free = gen.generate(model, prompt, 40)
    stop = free[5]
    first = free.index(stop)
    assert gen.generate(model, prompt, 40, stop_ids=(stop,)) == free[: first + 1]
    limited = gen.generate(
        model,
        prompt,
        40,
        vocab_size=10,
        temperature=1.0,
        generator=torch.Generator().manual_seed(1),
    )
    assert max(limited) < 10


def test_an_encoder_is_refused():
    encoder = random_model(moe=False, causal=False)
    with pytest.raises(XparConfigError, match="model.causal=False.*encoder"):
        gen.generate(encoder, [1, 2], 4)


def test_too_many_new_tokens_is_refused_naming_the_room_left():
    with pytest.raises(XparConfigError, match="--max-new-tokens=95.*at most 94"):
        gen.generate(random_model(moe=False), [1, 2], 95)


def test_cli_streams_the_continuation_and_reports_speed(moe_ckpt, capsys):
    model, tok, ids = _loaded(moe_ckpt)
    want = tok.decode(gen.generate(model, ids, 24, vocab_size=tok.vocab_size))
    for extra in ([], ["--no-cache"]):
        with pytest.raises(SystemExit) as e:
            xpar_main(
                [
                    "generate",
                    moe_ckpt.checkpoint,
                    "--prompt",
                    PROMPT,
                    "--max-new-tokens",
                    "24",
                    "--ignore-eod",
                    *extra,
                ]
            )
        assert e.value.code == 0
        out, err = capsys.readouterr()
        assert out == PROMPT + want + "\n"
        assert "generated 24 tokens in" in err and "tokens/s" in err
        assert ("no cache" if extra else "KV cache") in err


def test_cli_prompt_file_sampling_and_errors(dense_ckpt, tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text("import os\n")
    argv = [
        "generate",
        dense_ckpt.checkpoint,
        "--prompt-file",
        str(f),
        "--max-new-tokens",
        "16",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--top-p",
        "0.95",
        "--seed",
        "3",
        "--ignore-eod",
    ]
    texts = []
    for _ in range(2):
        with pytest.raises(SystemExit) as e:
            xpar_main(argv)
        assert e.value.code == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("import os\n")
    with pytest.raises(SystemExit) as e:
        xpar_main(["generate", dense_ckpt.checkpoint, "--prompt", "x", "--top-p", "0"])
    assert e.value.code == 2
    assert "--top-p=0.0 is invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        xpar_main(["generate", str(tmp_path), "--prompt", "x"])
    assert e.value.code == 2
    assert "is not a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("command, flag", [("generate", "--max-new-tokens"), ("eval", "--data")])
def test_help_through_the_xpar_entry_point(command, flag, capsys):
    with pytest.raises(SystemExit) as e:
        xpar_main([command, "--help"])
    assert e.value.code == 0
    assert flag in capsys.readouterr().out


# --------------------------------------------- checkpoints written without a training run


def _byte_checkpoint(directory, causal=True, classifier=False):
    """A random model with the byte tokenizer, written as the trainer writes checkpoints."""
    import dataclasses

    from xpar.interop.checkpoint_io import write_checkpoint
    from xpar.models.classifier import SequenceClassifier

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=264,
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=48,
        init_std=0.3,
        causal=causal,
    )
    moe_cfg = MoEConfig(num_experts=4, top_k=2, d_ff=32, capacity_factor=1.0)
    model = MoETransformer(cfg, moe_cfg, ep_group="local")
    if classifier:
        model = SequenceClassifier(model, num_classes=3, pad_id=257)
    record = {
        "model": {"model": dataclasses.asdict(cfg), "moe": dataclasses.asdict(moe_cfg)},
        "tokenizer": {"spec": "byte", "fingerprint": "byte-v1", "vocab_size": 257},
    }
    return str(write_checkpoint(directory, model.state_dict(), record, ep_size=2))


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        xpar_main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize(
    "causal, classifier, says",
    [
        (False, False, "model.causal=False: this checkpoint is a bidirectional encoder"),
        (True, True, "is a sequence classifier's (task.kind=classify)"),
    ],
)
def test_cli_refuses_an_encoder_and_a_classifier_in_one_line(
    tmp_path, capsys, causal, classifier, says
):
    ckpt = _byte_checkpoint(tmp_path / "ckpt", causal, classifier)
    code, out, err = _run(["generate", ckpt, "--prompt", "x"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("xpar generate: ") and err.count("\n") == 1 and says in err
    if classifier:  # eval loads checkpoints the same way
        (tmp_path / "t.txt").write_text("some text\n")
        code, _, err = _run(["eval", ckpt, "--data", str(tmp_path / "t.txt")], capsys)
        assert code == 2 and says in err and "Traceback" not in err


def test_cli_runs_several_prompts_one_at_a_time_each_as_if_alone(tmp_path, capsys):
    ckpt = _byte_checkpoint(tmp_path / "ckpt")
    lines = tmp_path / "lines.txt"
    lines.write_text("x = \n\n   \nfor i in\n")  # blank lines are no prompts
    whole = tmp_path / "whole.txt"
    whole.write_text("two\nlines")
    knobs = ["--max-new-tokens", "12", "--temperature", "1.0", "--seed", "3", "--ignore-eod"]
    argv = ["generate", ckpt, "--prompt", "def ", "--prompt-lines", str(lines)]
    code, out, err = _run([*argv, "--prompt-file", str(whole), *knobs], capsys)
    assert code == 0
    alone = ""
    for prompt in ("def ", "x = ", "for i in"):
        c, o, e = _run(["generate", ckpt, "--prompt", prompt, *knobs], capsys)
        assert c == 0 and e.startswith("generated 12 tokens")
        alone += o
    c, o, _ = _run(["generate", ckpt, "--prompt-file", str(whole), *knobs], capsys)
    alone += o
    assert out == alone
    assert [ln.split(":")[0] for ln in err.splitlines()] == [f"prompt {n}/4" for n in (1, 2, 3, 4)]


def test_cli_refuses_a_long_later_prompt_before_writing_and_a_blank_prompt_file(tmp_path, capsys):
    ckpt = _byte_checkpoint(tmp_path / "ckpt")
    argv = ["generate", ckpt, "--prompt", "ok", "--prompt", "y" * 40, "--max-new-tokens", "8"]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert "--max-new-tokens=8 with prompt 2 of 2 of 41 tokens exceeds model.max_seq_len=48" in err
    (tmp_path / "blank.txt").write_text("\n  \n")
    code, _, err = _run(["generate", ckpt, "--prompt-lines", str(tmp_path / "blank.txt")], capsys)
    assert code == 2 and "holds no prompt" in err


def test_help_says_prompts_run_one_at_a_time(capsys):
    code, out, _ = _run(["generate", "--help"], capsys)
    assert code == 0
    assert "--prompt-lines" in out and "one at a time" in " ".join(out.split())
