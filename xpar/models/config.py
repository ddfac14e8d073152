"""ModelConfig: the decoder-only Transformer's shape; validates itself.

Attention variants come from the attention registry (xpar.models.attention),
activations from xpar.activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xpar.activations import ACTIVATIONS
from xpar.config.checks import (
    bad,
    build_options,
    is_int,
    need_bool,
    need_choice,
    need_ints,
    need_positive,
)
from xpar.errors import XparConfigError

if TYPE_CHECKING:
    from xpar.moe.config import MoEConfig


@dataclass
class ModelConfig:
    """Decoder-only Transformer (the MoE part lives in MoEConfig).

    vocab_size=0 means "take it from the tokenizer"; the model itself needs it > 0.
    d_ff is the width of the dense FFN blocks (MoE blocks use moe.d_ff).
    attention names a registered variant; attention_options are that variant's own.
    """

    vocab_size: int = 0
    d_model: int = 256  # width of the residual stream
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4  # attention heads (d_model / n_heads must be even, for rotary)
    # Key/value heads (grouped-query attention): 0 means n_heads (plain multi-head); else a
    # divisor of n_heads, each k/v head shared by n_heads / n_kv_heads query heads.
    n_kv_heads: int = 0
    d_ff: int = 1024
    max_seq_len: int = 256  # longest sequence the model accepts (>= data.seq_len)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the embedding table with the LM head
    init_std: float = 0.02  # normal init std (residual outputs: / sqrt(2 n_layers))
    activation: str = "gelu"  # dense FFN activation: gelu, relu, squared_relu, swiglu
    attention: str = "dense"
    # false: a bidirectional encoder (masked-LM objective); non-causal routers need it.
    causal: bool = True
    attention_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "model") -> None:
        from xpar.models.attention import attention_names, get_attention

        if not is_int(self.vocab_size) or self.vocab_size < 0:
            raise bad(
                prefix, "vocab_size", self.vocab_size, "use 0 (take it from the tokenizer) or >= 1"
            )
        need_ints(prefix, self, ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"), 1)
        self._check_heads(prefix)
        for name in ("rope_theta", "norm_eps", "init_std"):
            need_positive(prefix, self, name)
        need_bool(prefix, self, "tie_embeddings")
        need_bool(prefix, self, "causal")
        need_choice(prefix, self, "activation", ACTIVATIONS)
        need_choice(prefix, self, "attention", attention_names())
        get_attention(self.attention).check(self, prefix)
        self.attention_opts(prefix)

    def _check_heads(self, prefix: str) -> None:
        if self.d_model % self.n_heads != 0:
            raise bad(
                prefix,
                "n_heads",
                self.n_heads,
                f"model.d_model={self.d_model} must be divisible by n_heads; "
                "choose n_heads that divides d_model",
            )
        if self.head_dim % 2 != 0:
            raise bad(
                prefix,
                "n_heads",
                self.n_heads,
                f"head dim d_model/n_heads={self.head_dim} is odd but rotary embedding needs it "
                "even; change d_model or n_heads",
            )
        kv = self.n_kv_heads
        if not is_int(kv) or kv < 0 or (kv > 0 and self.n_heads % kv != 0):
            raise bad(
                prefix,
                "n_kv_heads",
                kv,
                f"it must divide model.n_heads={self.n_heads} (each key/value head serves "
                "n_heads / n_kv_heads query heads); use 0 (= n_heads) or a divisor of n_heads",
            )

    def attention_opts(self, prefix: str = "model") -> Any:
        """model.attention_options as the variant's typed Options (unknown keys refused)."""
        from xpar.models.attention import get_attention

        return build_options(
            get_attention(self.attention).Options,
            self.attention_options,
            f"{prefix}.attention_options",
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when it is 0."""
        return self.n_kv_heads or self.n_heads


def moe_block_ids(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> list[int]:
    """Indices of the blocks whose FFN is an MoE layer: (i + 1) % every == 0."""
    if moe_cfg.every <= 0:
        return []
    return [i for i in range(model_cfg.n_layers) if (i + 1) % moe_cfg.every == 0]


def check_causal(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
    """A causal decoder refuses routers whose choice for a token depends on other tokens."""
    if model_cfg.causal and moe_block_ids(model_cfg, moe_cfg) and not moe_cfg.is_causal:
        raise XparConfigError(
            f"moe.router={moe_cfg.router!r} is not allowed in this decoder-only (causal) model: "
            "its routing of a token depends on other tokens in the batch, future tokens "
            "included, so a token's output would leak the future; set model.causal=false "
            "(a bidirectional encoder trained as a masked LM) or use a causal (token-choice) "
            "router such as moe=topk or moe=switch"
        )
