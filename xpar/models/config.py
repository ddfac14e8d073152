"""ModelConfig: the decoder-only Transformer's shape; validates itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

from xpar.errors import XparConfigError
from xpar.moe.config import ACTIVATIONS


@dataclass
class ModelConfig:
    """Decoder-only Transformer (the MoE part lives in MoEConfig).

    vocab_size=0 means "take it from the tokenizer"; the model itself needs it > 0.
    d_ff is the width of the dense FFN blocks (MoE blocks use moe.d_ff).
    """

    vocab_size: int = 0
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    activation: str = "gelu"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "model") -> None:
        def bad(field: str, value: object, fix: str) -> XparConfigError:
            return XparConfigError(f"{prefix}.{field}={value!r} is invalid: {fix}")

        if not _is_int(self.vocab_size) or self.vocab_size < 0:
            raise bad("vocab_size", self.vocab_size, "use 0 (take it from the tokenizer) or >= 1")
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise bad(name, v, "use an integer >= 1")
        if self.d_model % self.n_heads != 0:
            raise bad(
                "n_heads",
                self.n_heads,
                f"model.d_model={self.d_model} must be divisible by n_heads; "
                "choose n_heads that divides d_model",
            )
        head_dim = self.d_model // self.n_heads
        if head_dim % 2 != 0:
            raise bad(
                "n_heads",
                self.n_heads,
                f"head dim d_model/n_heads={head_dim} is odd but rotary embedding needs it even; "
                "change d_model or n_heads",
            )
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if not _is_number(v) or not v > 0 or math.isinf(v):
                raise bad(name, v, "use a finite number > 0")
        if not isinstance(self.tie_embeddings, bool):
            raise bad("tie_embeddings", self.tie_embeddings, "use true or false")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", self.activation, f"choose one of {', '.join(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
