"""Flax Linen building blocks shared by EASE and LNLN (docs/protocol.md sections 5, 6, 8).

Shapes: B batch, T sequence length, d model width (128), H heads, K tokens per modality (8).

Initialisation follows PyTorch's defaults where it shapes training: Linear kernels are uniform with
variance 1 / (3 fan_in) (torch's kaiming-uniform with a = sqrt(5)); biases start at 0 (torch draws
them uniformly; the difference is immaterial at these widths); learnable extra tokens start at 0
and positional tables at N(0, 1), as in LNLN's `basic_layers`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def Dense(features: int, *, use_bias: bool = True, name: str | None = None,
          dtype: Any = jnp.float32) -> nn.Dense:
    """`nn.Dense` with the PyTorch-like kernel initialisation used across the project; `dtype`
    is the matmul dtype (float32 parameters either way)."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=torch_kernel_init, name=name,
                    dtype=dtype, param_dtype=jnp.float32)


def LayerNorm(name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with PyTorch's epsilon (1e-5; Flax's default is 1e-6), computed and returned in
    float32 whatever the matmul precision."""
    return nn.LayerNorm(epsilon=1e-5, name=name, dtype=jnp.float32)


# Memory-efficient attention for long sequences. The audio / vision encoders' first layers attend
# 383 / 508 positions: autodiff of the plain attention keeps the (B, H, Tq, Tk) softmax weights of
# every such layer for the backward pass (1 GiB per layer at batch 2 x 64). `blockwise_attention`
# keeps only q, k, v, the output and the row log-sum-exp, and recomputes the weights in the
# backward pass, one block of at most ATTENTION_BLOCK query rows at a time.
ATTENTION_BLOCK = 512  # query rows per block at most (one block for MOSI's 508 and 383 ...)
BLOCK_ELEMENTS = 2**26  # ... and at most this many logits per block (256 MiB in float32)
LONG_SEQUENCE = 128  # default: query lengths above this use `blockwise_attention`


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, H*E] -> [B, H, T, E]."""
    b, t, inner = x.shape
    return x.reshape(b, t, heads, inner // heads).transpose(0, 2, 1, 3)


def _merge_heads(x: jax.Array) -> jax.Array:
    """[B, H, T, E] -> [B, T, H*E]."""
    b, h, t, e = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * e)


def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """softmax(q k^T / sqrt(E)) v per head, softmax in float32: [B, Tq, H*E] -> [B, Tq, H*E]."""
    e = q.shape[-1] // heads
    logits = jnp.einsum("bhqe,bhke->bhqk", _split_heads(q, heads) * e**-0.5,
                        _split_heads(k, heads), preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return _merge_heads(jnp.einsum("bhqk,bhke->bhqe", weights, _split_heads(v, heads)))


def _to_blocks(x: jax.Array, n: int) -> jax.Array:
    """[B, H, n * T, ...] -> [n, B, H, T, ...]: query blocks on a leading axis."""
    b, h, t = x.shape[:3]
    return jnp.moveaxis(x.reshape(b, h, n, t // n, *x.shape[3:]), 2, 0)


def _from_blocks(x: jax.Array) -> jax.Array:
    """[n, B, H, T, ...] -> [B, H, n * T, ...]."""
    n, b, h, t = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape(b, h, n * t, *x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_softmax_attention(q, k, v, n_blocks):
    """softmax(q k^T) v over [B, H, T, E] inputs (q pre-scaled), `n_blocks` query blocks."""
    return _blocked_forward(q, k, v, n_blocks)[0]


def _blocked_forward(q, k, v, n_blocks):
    def one_block(q_block):
        logits = jnp.einsum("bhqe,bhke->bhqk", q_block, k, preferred_element_type=jnp.float32)
        row_max = logits.max(-1, keepdims=True)
        p = jnp.exp(logits - row_max)
        row_sum = p.sum(-1, keepdims=True)
        out = jnp.einsum("bhqk,bhke->bhqe", (p / row_sum).astype(v.dtype), v)
        return out, (row_max + jnp.log(row_sum))[..., 0]

    out, lse = jax.lax.map(one_block, _to_blocks(q, n_blocks))
    out, lse = _from_blocks(out), _from_blocks(lse)
    return out, (q, k, v, out, lse)


def _blocked_backward(n_blocks, residuals, d_out):
    """FlashAttention's backward pass (Dao et al. 2022, Alg. 4) over query blocks: with
    P = exp(S - lse) recomputed per block, dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q."""
    q, k, v, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, H, Tq]

    def one_block(carry, block):
        d_k, d_v = carry
        q_b, d_out_b, lse_b, delta_b = block
        logits = jnp.einsum("bhqe,bhke->bhqk", q_b, k, preferred_element_type=jnp.float32)
        p = jnp.exp(logits - lse_b[..., None])
        f32 = dict(preferred_element_type=jnp.float32)  # float32 accumulation over the blocks
        d_v = d_v + jnp.einsum("bhqk,bhqe->bhke", p.astype(d_out.dtype), d_out_b, **f32)
        d_p = jnp.einsum("bhqe,bhke->bhqk", d_out_b, v, **f32)
        d_s = (p * (d_p - delta_b[..., None])).astype(q.dtype)
        d_k = d_k + jnp.einsum("bhqk,bhqe->bhke", d_s, q_b, **f32)
        return (d_k, d_v), jnp.einsum("bhqk,bhke->bhqe", d_s, k).astype(q.dtype)

    blocks = tuple(_to_blocks(x, n_blocks) for x in (q, d_out, lse, delta))
    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (d_k, d_v), d_q = jax.lax.scan(one_block, zeros, blocks)
    return _from_blocks(d_q), d_k.astype(k.dtype), d_v.astype(v.dtype)


_blocked_softmax_attention.defvjp(_blocked_forward, _blocked_backward)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                        block: int = ATTENTION_BLOCK) -> jax.Array:
    """The same attention as `_attention_core`, with memory O(B H block Tk) instead of a kept
    (B, H, Tq, Tk) weight tensor.

    Each query row's softmax runs over all keys at once (no online rescaling), so every row's
    numbers are the plain attention's; the backward pass (custom VJP) recomputes the weights from
    the saved row log-sum-exp (FlashAttention's recomputation; Rabe & Staats 2021). Queries are
    split into ceil(Tq / block) equal blocks, zero-padded at the end; padded rows are dropped.
    `[B, Tq, H*E], [B, Tk, H*E] x2 -> [B, Tq, H*E]`.
    """
    tq, e = q.shape[1], q.shape[-1] // heads
    n_blocks = -(-tq // block)
    rows = -(-tq // n_blocks)
    q = _split_heads(q, heads) * e**-0.5
    q = jnp.pad(q, ((0, 0), (0, 0), (0, n_blocks * rows - tq), (0, 0)))
    out = _blocked_softmax_attention(q, _split_heads(k, heads), _split_heads(v, heads), n_blocks)
    return _merge_heads(out[:, :, :tq])


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                         long_sequence: int = LONG_SEQUENCE) -> jax.Array:
    """Scaled dot-product attention without mask: [B, Tq, H*E], [B, Tk, H*E] x2 -> [B, Tq, H*E].

    Query sequences longer than `long_sequence` rows use `blockwise_attention` (blocks of at most
    `ATTENTION_BLOCK` rows and `BLOCK_ELEMENTS` logits): equal numbers, a fraction of the memory.
    Matmuls run in the inputs' dtype (bfloat16 under `--precision bf16`); the logits and the
    softmax are float32.
    """
    if q.shape[1] > long_sequence:
        per_row = q.shape[0] * heads * k.shape[1]  # logits of one query row over the batch
        block = max(1, min(ATTENTION_BLOCK, BLOCK_ELEMENTS // per_row))
        return blockwise_attention(q, k, v, heads, block)
    return _attention_core(q, k, v, heads)


class Attention(nn.Module):
    """LNLN attention: separate LayerNorms on the q, k, v inputs, bias-free projections to
    `heads * dim_head`, attention, and a biased projection back to d (section 5).

    `__call__(x_q [B, Tq, d], x_kv [B, Tk, d]) -> [B, Tq, d]`; self-attention when x_kv is x_q.
    """

    dim: int = 128
    heads: int = 8
    dim_head: int = 64
    dtype: Any = jnp.float32  # matmul dtype
    long_sequence: int = LONG_SEQUENCE  # blockwise attention above this query length

    @nn.compact
    def __call__(self, x_q: jax.Array, x_kv: jax.Array) -> jax.Array:
        inner, dt = self.heads * self.dim_head, self.dtype
        q = Dense(inner, use_bias=False, name="to_q", dtype=dt)(LayerNorm("norm_q")(x_q))
        k = Dense(inner, use_bias=False, name="to_k", dtype=dt)(LayerNorm("norm_k")(x_kv))
        v = Dense(inner, use_bias=False, name="to_v", dtype=dt)(LayerNorm("norm_v")(x_kv))
        attended = multi_head_attention(q, k, v, self.heads, self.long_sequence)
        return Dense(self.dim, name="to_out", dtype=dt)(attended)


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm -> Linear(d, mlp) -> exact GELU -> Linear(mlp, d). [.., d] -> [.., d]."""

    dim: int = 128
    mlp_dim: int = 128
    dtype: Any = jnp.float32  # matmul dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.mlp_dim, name="fc1", dtype=self.dtype)(LayerNorm("norm")(x))
        return Dense(self.dim, name="fc2", dtype=self.dtype)(nn.gelu(h, approximate=False))


class Transformer(nn.Module):
    """LNLN Transformer (section 5): optional `token_len` zero-initialised learnable tokens are
    prepended, a learnable N(0, 1) positional table of `num_frames + token_len` rows is added
    (sliced to the actual length), then `depth` pre-norm blocks x += Attn(x); x += FF(x).
    No attention mask: padding and dropped frames are attended as zero vectors, as in the reference.

    `__call__(x [B, T, d]) -> [B, T + token_len, d]`, T <= num_frames. With `return_hidden`, returns
    the list [input (after tokens and positions), output of layer 1, ..., output of layer depth].
    With `outputs = n`, returns only the first n rows [B, n, d]: the last layer then computes
    queries, residuals and the feed-forward for those rows alone (keys and values still see every
    row), which gives the same numbers as slicing the full output at a fraction of the cost
    (a CLS read-out needs 1 of 25 rows of the fusion's last layer).
    """

    num_frames: int
    token_len: int = 0
    dim: int = 128
    depth: int = 2
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 128
    return_hidden: bool = False
    outputs: int | None = None
    dtype: Any = jnp.float32  # matmul dtype (the residual stream stays float32)
    long_sequence: int = LONG_SEQUENCE  # blockwise attention above this query length

    @nn.compact
    def __call__(self, x: jax.Array):
        x = x.astype(jnp.float32)  # the residual stream is float32 at any matmul precision
        b, t, _ = x.shape
        if t > self.num_frames:
            raise ValueError(f"Transformer got {t} frames but its table has {self.num_frames}")
        if self.token_len:
            tokens = self.param("extra_tokens", nn.initializers.zeros, (self.token_len, self.dim))
            x = jnp.concatenate([jnp.broadcast_to(tokens, (b, *tokens.shape)).astype(x.dtype), x], 1)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(1.0), (self.num_frames + self.token_len, self.dim)
        )
        x = x + pos[None, : x.shape[1]].astype(x.dtype)
        if self.outputs is not None and self.return_hidden:
            raise ValueError("Transformer: `outputs` and `return_hidden` exclude each other")
        hidden = [x]
        for i in range(self.depth):
            last = i == self.depth - 1
            x_q = x[:, : self.outputs] if last and self.outputs is not None else x
            x = x_q + Attention(self.dim, self.heads, self.dim_head, self.dtype, self.long_sequence,
                                name=f"attn_{i}")(x_q, x)
            x = x + FeedForward(self.dim, self.mlp_dim, self.dtype, name=f"ff_{i}")(x)
            hidden.append(x)
        return hidden if self.return_hidden else x


class CrossTransformer(nn.Module):
    """LNLN cross Transformer (section 8): ONE zero-initialised learnable token is prepended to
    both source and target; each gets its own N(0, 1) positional table of `num_frames + 1` rows;
    each of `depth` layers does target += Attn(q = target, k = v = source); target += FF(target).

    `__call__(source [B, S, d], target [B, T, d]) -> [B, T + 1, d]` (the target stream).
    """

    num_frames: int
    dim: int = 128
    depth: int = 2
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 128
    dtype: Any = jnp.float32  # matmul dtype

    @nn.compact
    def __call__(self, source: jax.Array, target: jax.Array) -> jax.Array:
        source, target = source.astype(jnp.float32), target.astype(jnp.float32)
        b = source.shape[0]
        token = self.param("extra_token", nn.initializers.zeros, (1, self.dim))
        token = jnp.broadcast_to(token, (b, 1, self.dim)).astype(source.dtype)
        source = jnp.concatenate([token, source], 1)
        target = jnp.concatenate([token, target], 1)
        rows = self.num_frames + 1
        pos_s = self.param("pos_source", nn.initializers.normal(1.0), (rows, self.dim))
        pos_t = self.param("pos_target", nn.initializers.normal(1.0), (rows, self.dim))
        source = source + pos_s[None, : source.shape[1]].astype(source.dtype)
        target = target + pos_t[None, : target.shape[1]].astype(target.dtype)
        for i in range(self.depth):
            target = target + Attention(self.dim, self.heads, self.dim_head, self.dtype,
                                        name=f"attn_{i}")(target, source)
            target = target + FeedForward(self.dim, self.mlp_dim, self.dtype,
                                          name=f"ff_{i}")(target)
        return target


class ModalityEncoder(nn.Module):
    """Linear(D_m -> d) -> Transformer(token_len K, depth 2) -> the first K output tokens (section 5).

    `__call__(x [B, T, D_m]) -> [B, K, d]`.
    """

    num_frames: int
    tokens: int = 8
    dim: int = 128
    depth: int = 2
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 128
    dtype: Any = jnp.float32  # matmul dtype
    long_sequence: int = LONG_SEQUENCE  # blockwise attention above this query length

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.dim, name="proj", dtype=self.dtype)(x)
        return Transformer(
            self.num_frames, self.tokens, self.dim, self.depth, self.heads, self.dim_head,
            self.mlp_dim, outputs=self.tokens, dtype=self.dtype, long_sequence=self.long_sequence,
            name="transformer",
        )(h)


class MLP(nn.Module):
    """Linear -> activation -> Linear ... over `features` (no activation after the last)."""

    features: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = jnp.float32  # matmul dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, f in enumerate(self.features):
            x = Dense(f, name=f"fc{i}", dtype=self.dtype)(x)
            if i < len(self.features) - 1:
                x = self.activation(x)
        return x


class GaussianHead(nn.Module):
    """Gaussian head (EASE Eq. 1-2): mean = MLP(d -> d -> d, ReLU)(h),
    var = Softplus(MLP(d -> d -> d, ReLU)(h)) + 1e-6. `[..., d] -> ([..., d], [..., d])`."""

    dim: int = 128
    min_var: float = 1e-6
    dtype: Any = jnp.float32  # matmul dtype; mean and var are float32 (the floor needs it)

    @nn.compact
    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = MLP((self.dim, self.dim), dtype=self.dtype, name="mean")(h).astype(jnp.float32)
        var = MLP((self.dim, self.dim), dtype=self.dtype, name="var")(h).astype(jnp.float32)
        return mean, nn.softplus(var) + self.min_var


class CompletenessGate(nn.Module):
    """Completeness estimator of LNLN (also EASE's gate): a Transformer with one learnable token
    over the K tokens of one modality (depth 2); the token's output -> Linear(d -> 64) ->
    LeakyReLU(0.1) -> Linear(64 -> 1) -> sigmoid. `[B, K, d] -> [B]` in (0, 1)."""

    tokens: int = 8
    dim: int = 128
    depth: int = 2
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 128
    dtype: Any = jnp.float32  # matmul dtype

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        out = Transformer(
            self.tokens, 1, self.dim, self.depth, self.heads, self.dim_head, self.mlp_dim,
            outputs=1, dtype=self.dtype, name="transformer",
        )(h)[:, 0]
        hidden = nn.leaky_relu(Dense(64, name="fc1", dtype=self.dtype)(out), 0.1)
        logit = Dense(1, name="fc2")(hidden)  # scalar read-outs stay float32
        return jax.nn.sigmoid(logit[:, 0])


class HyperModalityLayer(nn.Module):
    """One layer of LNLN's hyper-modality learner (section 8).

    Separate LayerNorms on the language state, audio, vision and the hyper tokens; queries from the
    language state; keys / values from audio and, with their own projections, from vision (no
    bias; `heads` of width `dim_head`); the two attention outputs are summed and projected (with
    bias); new hyper = LN(hyper) + projection (the residual adds to the normalised tokens).

    `__call__(lang [B, K, d], audio [B, K, d], vision [B, K, d], hyper [B, K, d]) -> [B, K, d]`.
    """

    dim: int = 128
    heads: int = 8
    dim_head: int = 16
    dtype: Any = jnp.float32  # matmul dtype

    @nn.compact
    def __call__(self, lang, audio, vision, hyper):
        inner = self.heads * self.dim_head
        lang, audio = LayerNorm("norm_lang")(lang), LayerNorm("norm_audio")(audio)
        vision, hyper = LayerNorm("norm_vision")(vision), LayerNorm("norm_hyper")(hyper)
        q = Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(lang)
        from_audio = multi_head_attention(
            q, Dense(inner, use_bias=False, dtype=self.dtype, name="to_k_audio")(audio),
            Dense(inner, use_bias=False, dtype=self.dtype, name="to_v_audio")(audio), self.heads,
        )
        from_vision = multi_head_attention(
            q, Dense(inner, use_bias=False, dtype=self.dtype, name="to_k_vision")(vision),
            Dense(inner, use_bias=False, dtype=self.dtype, name="to_v_vision")(vision), self.heads,
        )
        return hyper + Dense(self.dim, name="to_out", dtype=self.dtype)(from_audio + from_vision)


def per_modality(module: type[nn.Module], n: int = 3) -> type[nn.Module]:
    """`module` applied to `n` inputs stacked on axis 0, each with its own parameters.

    An `nn.vmap` over a leading modality axis: every parameter leaf gets a leading axis of `n`
    (independently initialised slices, so the counts equal `n` separate modules), inputs and
    outputs are stacked on axis 0, and XLA compiles the module once instead of `n` times.
    """
    return nn.vmap(module, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=0, out_axes=0, axis_size=n)


@jax.custom_vjp
def gradient_reversal(x: jax.Array) -> jax.Array:
    """Identity forward; the backward pass multiplies the cotangent by -1 (LNLN's GRL, alpha 1)."""
    return x


def _grl_fwd(x):
    return x, None


def _grl_bwd(_, g):
    return (jax.tree_util.tree_map(jnp.negative, g),)


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)
