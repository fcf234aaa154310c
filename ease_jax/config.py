"""Configuration as code: frozen dataclasses and the presets of PROTOCOL.md sections 1 and 5-9.

`ModelConfig` fixes every shape of a model; `LossConfig` every objective weight and ablation switch;
`TrainConfig` the optimisation. Presets: `mosi()`, `mosei()`, `sims()` (the papers' settings) and
`synthetic()` (small and fast, for the default CPU run without data).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DATASETS = ("mosi", "mosei", "sims")
MODELS = ("ease", "lnln")
TEXT_ENCODERS = ("bert", "features")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of EASE / LNLN (PROTOCOL.md sections 5, 6, 8).

    `text_len` is the token length L (BERT mode) or the feature length L_f (features mode);
    `text_dim` is BERT's hidden width (BERT mode) or the feature width D_t (features mode).
    """

    model: str = "ease"
    text_encoder: str = "bert"
    text_len: int = 50
    text_dim: int = 768
    audio_len: int = 375
    audio_dim: int = 5
    vision_len: int = 500
    vision_dim: int = 20
    dim: int = 128  # d of every Transformer block
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 128
    tokens: int = 8  # learnable tokens per modality encoder = tokens per modality
    encoder_depth: int = 2
    fusion_depth: int = 4  # EASE fusion Transformer
    cross_depth: int = 2  # LNLN cross Transformer: 2 on MOSI, 4 on MOSEI / SIMS
    hyper_layers: int = 3  # LNLN hyper-modality learner
    hyper_dim_head: int = 16
    n_views: int = 2  # EASE subset views for cross-view consistency
    view_keep_prob: float = 0.5
    use_ucmi: bool = True  # EASE ablation "w/o UCMI": no imputer, no gate; fusion sees h_m
    sample_at_eval: bool = False  # EASE: z_hat = mu at evaluation unless True
    bert: Any = None  # ease_jax.bert.BertConfig for BERT mode; None = bert-base-uncased
    # BERT dropout during training (section 5): None = the checkpoint config's rates (0.1 for
    # bert-base and MiniLM), as the papers' code fine-tunes BERT in train mode; a number sets both
    # hidden and attention dropout (0 turns dropout off). Evaluation never drops.
    bert_dropout: float | None = None
    # Matmul precision (`--precision`): "fp32", or "bf16" = bfloat16 matmul inputs with float32
    # parameters, residual stream, logits / softmax, LayerNorm statistics and outputs (for GPUs;
    # CPUs have no fast bfloat16 matmul).
    precision: str = "fp32"

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"ModelConfig.model must be one of {MODELS}, got {self.model!r}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(
                f"ModelConfig.text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"ModelConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.bert_dropout is not None and not 0.0 <= self.bert_dropout < 1.0:
            raise ValueError(f"ModelConfig.bert_dropout must be in [0, 1), got {self.bert_dropout}")
        for name in ("text_len", "text_dim", "audio_len", "audio_dim", "vision_len", "vision_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def compute_dtype(self):
        """The matmul dtype of `precision` (a jnp dtype)."""
        import jax.numpy as jnp

        return jnp.bfloat16 if self.precision == "bf16" else jnp.float32

    def bert_config(self):
        """The BERT architecture of BERT mode (bert-base-uncased unless `bert` is set), with
        `bert_dropout` applied when set."""
        from ease_jax.bert import BertConfig

        cfg = self.bert if self.bert is not None else BertConfig.base_uncased()
        if self.bert_dropout is not None:
            cfg = dataclasses.replace(cfg, hidden_dropout_prob=self.bert_dropout,
                                      attention_probs_dropout_prob=self.bert_dropout)
        if cfg.hidden_size != self.text_dim:
            raise ValueError(
                f"ModelConfig.text_dim={self.text_dim} but the BERT hidden size is {cfg.hidden_size}"
            )
        return cfg


@dataclass(frozen=True)
class LossConfig:
    """Objective weights (PROTOCOL.md sections 7-8) and EASE Table 4 ablation switches.

    Preset "code" = the released configs: 1.0 L_sp + 0.5 L_ucmi + 0.2 L_uada + 0.005 L_anchor
    + 2 L_cons + 2 L_asym. Preset "paper" = Eq. 13 with the paper's values:
    L_sp + 0.5 L_ucmi + 0.2 (L_uada + 0.02 L_anchor) + 0.5 (L_cons + L_asym).
    """

    sp: float = 1.0
    ucmi: float = 0.5
    uada: float = 0.2
    anchor: float = 0.005
    cons: float = 2.0
    asym: float = 2.0
    # Switches (EASE Table 4): off removes the named component's terms.
    use_ucsa: bool = True  # L_uada + L_anchor
    use_mipc: bool = True  # L_cons + L_asym (the subset views are then not computed)
    # EASE kernel (Eq. 5-6) and anchors (Eq. 8, 24-29).
    tau: float = 1.0
    alpha: float = 1.0
    anchor_momentum: float = 0.99
    anchor_var_floor: float = 1e-4
    anchor_base_var: float = 0.1**2
    anchor_var_scale: float = 1.0
    anchor_min_var: float = 1e-3
    # LNLN (section 8).
    cc: float = 0.9
    adv: float = 0.8
    rec: float = 0.1

    @staticmethod
    def preset(name: str, dataset: str = "mosi") -> LossConfig:
        adv = 0.6 if dataset == "sims" else 0.8
        if name == "code":
            return LossConfig(adv=adv)
        if name == "paper":
            return LossConfig(anchor=0.2 * 0.02, cons=0.5, asym=0.5, adv=adv)
        raise ValueError(f"loss preset must be 'code' or 'paper', got {name!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (PROTOCOL.md section 9)."""

    epochs: int = 200
    batch_size: int = 64
    lr: float | None = None  # None = the model's default: 1e-5 EASE, 1e-4 LNLN
    weight_decay: float = 1e-4
    warmup_epochs: int = 20
    seeds: tuple[int, ...] = (1111, 1112, 1113)
    eval_rate: float = 0.5  # r at which checkpoints are selected (section 4)

    def learning_rate(self, model: str) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-5 if model == "ease" else 1e-4


# Data-set shapes (PROTOCOL.md section 1, MMSA unaligned files).
DATASET_DIMS = {
    "mosi": dict(text_len=50, audio_len=375, audio_dim=5, vision_len=500, vision_dim=20),
    "mosei": dict(text_len=50, audio_len=500, audio_dim=74, vision_len=500, vision_dim=35),
    "sims": dict(text_len=39, audio_len=400, audio_dim=33, vision_len=55, vision_dim=709),
}
CROSS_DEPTH = {"mosi": 2, "mosei": 4, "sims": 4}


def model_config(model: str, dataset: str, **overrides) -> ModelConfig:
    """The papers' model shapes for `dataset`, with `overrides` applied (e.g. data dims)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    base = dict(model=model, cross_depth=CROSS_DEPTH[dataset], **DATASET_DIMS[dataset])
    base.update(overrides)
    return ModelConfig(**base)


def replace(cfg, **changes):
    """`dataclasses.replace` re-exported so callers need one import."""
    return dataclasses.replace(cfg, **changes)


@dataclass(frozen=True)
class RunConfig:
    """Everything one sweep run needs, serialised into results.json."""

    dataset: str
    model: ModelConfig
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
