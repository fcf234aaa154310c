"""Configuration as code: frozen dataclasses and the presets of docs/protocol.md sections 1 and 5-9.

`ModelConfig` fixes every shape of a model and the execution options of its traced program;
`LossConfig` every objective weight; `TrainConfig` the optimisation; `BertConfig` a BERT encoder.
Presets: `model_config(model, dataset)` (the papers' shapes), `LossConfig.preset` (released
weights or Eq. 13), and the small synthetic configuration of the default CPU run
(`SYNTHETIC_SMALL_MODEL`, `SYNTHETIC_SMALL_TRAIN`). Data only: this module imports no other module
of the project (docs/design.md "Layout").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASETS = ("mosi", "mosei", "sims")
MODELS = ("ease", "lnln")
TEXT_ENCODERS = ("bert", "features")
PRECISIONS = ("fp32", "bf16")
BERT_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
RATE_INPUTS = ("observed", "drawn")
TRAIN_MASKS = ("redrawn", "released")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder; the field names are those of Hugging Face `config.json`.

    Defaults are bert-base-uncased. `hidden_act`: "gelu" (exact erf GELU, as BERT),
    "gelu_new" / "gelu_pytorch_tanh" (tanh approximation) or "relu".
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Dropout of the checkpoint's config (0.1 for bert-base and MiniLM): after the embeddings and on
    # both residual branches (hidden), on the attention probabilities (attention). Active only when
    # BertModel runs with deterministic=False, as the papers' code fine-tunes BERT in train mode.
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self):
        if self.hidden_act not in BERT_ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r}; expected one of {sorted(BERT_ACTIVATIONS)}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def base_uncased(cls) -> BertConfig:
        """bert-base-uncased: 12 layers, 768 wide, 12 heads, vocabulary 30522 (109,482,240 params)."""
        return cls()

    @classmethod
    def base_chinese(cls) -> BertConfig:
        """bert-base-chinese: as bert-base-uncased with vocabulary 21128 (102,267,648 params)."""
        return cls(vocab_size=21128)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> BertConfig:
        """Reads the fields of this class from a Hugging Face config dict; other keys are ignored.

        Missing fields take the bert-base-uncased defaults (as Hugging Face's BertConfig does).
        Raises ValueError, naming `source`, for a `model_type` other than "bert" or a
        `position_embedding_type` other than "absolute" (relative position variants are not built).
        """
        model_type = d.get("model_type")
        if model_type is not None and model_type != "bert":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'bert'")
        position_type = d.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"{source}: position_embedding_type {position_type!r} is not supported "
                "(only 'absolute')"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in fields})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Reads a Hugging Face `config.json` (see `from_dict`)."""
        path = Path(path)
        with path.open() as f:
            return cls.from_dict(json.load(f), source=str(path))


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of EASE / LNLN (docs/protocol.md sections 5, 6, 8).

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
    # What EASE's gate reads as r_m and LNLN's L_cc targets (docs/protocol.md section 12 item 2):
    # "observed" = the dropped fraction of valid positions, computed from the input (default);
    # "drawn" = the released code's rate label: the sample's drawn training rate, and at
    # evaluation the condition's nominal rate (1.0 for a modality a kept subset leaves out).
    rate_input: str = "observed"
    bert: BertConfig | None = None  # BERT mode's encoder; None = bert-base-uncased
    # BERT dropout during training (section 5): None = the checkpoint config's rates (0.1 for
    # bert-base and MiniLM), as the papers' code fine-tunes BERT in train mode; a number sets both
    # hidden and attention dropout (0 turns dropout off). Evaluation never drops.
    bert_dropout: float | None = None
    # Matmul precision (`--precision`): "fp32", or "bf16" = bfloat16 matmul inputs with float32
    # parameters, residual stream, logits / softmax, LayerNorm statistics and outputs (for GPUs;
    # CPUs have no fast bfloat16 matmul).
    precision: str = "fp32"
    # Execution options (docs/design.md "Execution options"): they change the traced program, never
    # its numbers, and as fields they are part of every program cache key.
    # Encode a row whose incomplete input equals its clean input once (`models.common`); off when
    # runs are vmapped together (`lax.cond` would become a select running both branches).
    encode_once: bool = True
    # Row chunks of the encode-once path (`models.common.encode_rows_once`).
    encode_chunks: int = 8
    # Query lengths above this use the blockwise attention (`layers.multi_head_attention`).
    long_sequence: int = 128
    # BERT layers per iteration of its layer scan: 1 = one layer compiled once; 0 = all (no loop).
    scan_unroll: int = 1

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"ModelConfig.model must be one of {MODELS}, got {self.model!r}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(
                f"ModelConfig.text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}"
            )
        if self.rate_input not in RATE_INPUTS:
            raise ValueError(
                f"ModelConfig.rate_input must be one of {RATE_INPUTS}, got {self.rate_input!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"ModelConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.bert_dropout is not None and not 0.0 <= self.bert_dropout < 1.0:
            raise ValueError(f"ModelConfig.bert_dropout must be in [0, 1), got {self.bert_dropout}")
        for name in ("text_len", "text_dim", "audio_len", "audio_dim", "vision_len", "vision_dim",
                     "long_sequence", "encode_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.scan_unroll < 0:
            raise ValueError(f"ModelConfig.scan_unroll must be >= 0, got {self.scan_unroll}")

    def loop_free(self) -> ModelConfig:
        """The same model traced without loops: plain attention at every length, both encoder
        passes in full and BERT's layer scan unrolled. Same numbers; XLA's cost analysis counts a
        loop body once whatever its trip count, so only this program's count is the real FLOP
        count (the benchmark's)."""
        return dataclasses.replace(self, encode_once=False, long_sequence=2**31 - 1,
                                   scan_unroll=0)

    @property
    def compute_dtype(self):
        """The matmul dtype of `precision` (a jnp dtype)."""
        import jax.numpy as jnp

        return jnp.bfloat16 if self.precision == "bf16" else jnp.float32

    def bert_config(self):
        """The BERT architecture of BERT mode (bert-base-uncased unless `bert` is set), with
        `bert_dropout` applied when set."""
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
    """Objective weights (docs/protocol.md sections 7-8) and the fixed constants of the terms.

    The weights (`LOSS_WEIGHTS`) are numbers of a run (`train.run_hparams`): runs that differ only
    in them share one compiled program. A Table 4 ablation of a loss term sets its weight to 0
    (`studies.ABLATIONS`); the other fields shape the program.

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

    def weights(self) -> dict[str, float]:
        """{name: weight} of every term (`LOSS_WEIGHTS`)."""
        return {k: float(getattr(self, k)) for k in LOSS_WEIGHTS}

    @staticmethod
    def preset(name: str, dataset: str = "mosi") -> LossConfig:
        adv = 0.6 if dataset == "sims" else 0.8
        if name == "code":
            return LossConfig(adv=adv)
        if name == "paper":
            return LossConfig(anchor=0.2 * 0.02, cons=0.5, asym=0.5, adv=adv)
        raise ValueError(f"loss preset must be 'code' or 'paper', got {name!r}")


# The weights of `LossConfig`, in the order the objectives add their terms.
LOSS_WEIGHTS = ("sp", "ucmi", "uada", "anchor", "cons", "asym", "cc", "adv", "rec")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (docs/protocol.md section 9)."""

    epochs: int = 200
    batch_size: int = 64
    lr: float | None = None  # None = the model's default: 1e-5 EASE, 1e-4 LNLN
    weight_decay: float = 1e-4
    warmup_epochs: int = 20
    seeds: tuple[int, ...] = (1111, 1112, 1113)
    eval_rate: float = 0.5  # r at which checkpoints are selected (section 4)
    # Training masks (docs/protocol.md sections 2 and 12 item 1): "redrawn" = new rates and masks
    # every epoch from the run's JAX key (default); "released" = the released `generate_m` masks,
    # drawn once with NumPy from the run's seed and fixed for the whole run
    # (`data.missing.released_train_masks`).
    train_masks: str = "redrawn"

    def __post_init__(self):
        if self.train_masks not in TRAIN_MASKS:
            raise ValueError(
                f"TrainConfig.train_masks must be one of {TRAIN_MASKS}, got {self.train_masks!r}")

    def learning_rate(self, model: str) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-5 if model == "ease" else 1e-4


# The released code's behaviour and this project's default, as the switches that differ
# (docs/protocol.md section 12 items 1-3; `--behaviour`).
BEHAVIOURS = {
    "default": dict(train_masks="redrawn", rate_input="observed", sample_at_eval=False),
    "released": dict(train_masks="released", rate_input="drawn", sample_at_eval=True),
}


def behaviour(model: ModelConfig, train: TrainConfig) -> dict[str, str]:
    """The switches of a run as results files record them: {"train_masks": "redrawn" |
    "released", "rate_input": "observed" | "drawn", "eval_z": "mean" | "sampled", "name":
    "default" | "released" | "mixed"}."""
    switches = dict(train_masks=train.train_masks, rate_input=model.rate_input,
                    sample_at_eval=model.sample_at_eval)
    name = next((k for k, v in BEHAVIOURS.items() if v == switches), "mixed")
    return {"train_masks": train.train_masks, "rate_input": model.rate_input,
            "eval_z": "sampled" if model.sample_at_eval else "mean", "name": name}


def scaled_warmup(epochs: int, warmup: int = 20) -> int:
    """Warm-up epochs for a run shortened or lengthened to `epochs`: the released schedule warms
    up for 10% of the epochs (20 of 200), at least 1, and never longer than `warmup`."""
    return min(warmup, max(epochs // 10, 1))


# The small synthetic configuration of the default CPU run (no data): the papers' depths and token
# counts at width 64 with 4 heads of 16 (8x fewer FLOPs per position), 24 epochs, one seed.
SYNTHETIC_SMALL_MODEL = dict(dim=64, heads=4, dim_head=16, mlp_dim=64)
SYNTHETIC_SMALL_TRAIN = dict(epochs=24, warmup_epochs=3, lr=1e-3, seeds=(1111,))


# Data-set shapes (docs/protocol.md section 1, MMSA unaligned files).
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
