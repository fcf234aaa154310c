"""Flax Linen building blocks shared by EASE and LNLN (PROTOCOL.md sections 5, 6, 8).

Shapes: B batch, T sequence length, d model width (128), H heads, K tokens per modality (8).

Initialisation follows PyTorch's defaults where it shapes training: Linear kernels are uniform with
variance 1 / (3 fan_in) (torch's kaiming-uniform with a = sqrt(5)); biases start at 0 (torch draws
them uniformly; the difference is immaterial at these widths); learnable extra tokens start at 0
and positional tables at N(0, 1), as in LNLN's `basic_layers`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def Dense(features: int, *, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    """`nn.Dense` with the PyTorch-like kernel initialisation used across the project."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=torch_kernel_init, name=name)


def LayerNorm(name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with PyTorch's epsilon (1e-5); Flax's default is 1e-6."""
    return nn.LayerNorm(epsilon=1e-5, name=name)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Scaled dot-product attention without mask: [B, Tq, H*E], [B, Tk, H*E] x2 -> [B, Tq, H*E]."""
    b, tq, inner = q.shape
    e = inner // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, e)
    logits = jnp.einsum("bqhe,bkhe->bhqk", split(q), split(k)) * (e**-0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhe->bqhe", weights, split(v))
    return out.reshape(b, tq, inner)


class Attention(nn.Module):
    """LNLN attention: separate LayerNorms on the q, k, v inputs, bias-free projections to
    `heads * dim_head`, attention, and a biased projection back to d (section 5).

    `__call__(x_q [B, Tq, d], x_kv [B, Tk, d]) -> [B, Tq, d]`; self-attention when x_kv is x_q.
    """

    dim: int = 128
    heads: int = 8
    dim_head: int = 64

    @nn.compact
    def __call__(self, x_q: jax.Array, x_kv: jax.Array) -> jax.Array:
        inner = self.heads * self.dim_head
        q = Dense(inner, use_bias=False, name="to_q")(LayerNorm("norm_q")(x_q))
        k = Dense(inner, use_bias=False, name="to_k")(LayerNorm("norm_k")(x_kv))
        v = Dense(inner, use_bias=False, name="to_v")(LayerNorm("norm_v")(x_kv))
        return Dense(self.dim, name="to_out")(multi_head_attention(q, k, v, self.heads))


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm -> Linear(d, mlp) -> exact GELU -> Linear(mlp, d). [.., d] -> [.., d]."""

    dim: int = 128
    mlp_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.mlp_dim, name="fc1")(LayerNorm("norm")(x))
        return Dense(self.dim, name="fc2")(nn.gelu(h, approximate=False))


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

    @nn.compact
    def __call__(self, x: jax.Array):
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
            x = x_q + Attention(self.dim, self.heads, self.dim_head, name=f"attn_{i}")(x_q, x)
            x = x + FeedForward(self.dim, self.mlp_dim, name=f"ff_{i}")(x)
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

    @nn.compact
    def __call__(self, source: jax.Array, target: jax.Array) -> jax.Array:
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
            target = target + Attention(self.dim, self.heads, self.dim_head, name=f"attn_{i}")(
                target, source
            )
            target = target + FeedForward(self.dim, self.mlp_dim, name=f"ff_{i}")(target)
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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.dim, name="proj")(x)
        return Transformer(
            self.num_frames, self.tokens, self.dim, self.depth, self.heads, self.dim_head,
            self.mlp_dim, outputs=self.tokens, name="transformer",
        )(h)


class MLP(nn.Module):
    """Linear -> activation -> Linear ... over `features` (no activation after the last)."""

    features: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, f in enumerate(self.features):
            x = Dense(f, name=f"fc{i}")(x)
            if i < len(self.features) - 1:
                x = self.activation(x)
        return x


class GaussianHead(nn.Module):
    """Gaussian head (EASE Eq. 1-2): mean = MLP(d -> d -> d, ReLU)(h),
    var = Softplus(MLP(d -> d -> d, ReLU)(h)) + 1e-6. `[..., d] -> ([..., d], [..., d])`."""

    dim: int = 128
    min_var: float = 1e-6

    @nn.compact
    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = MLP((self.dim, self.dim), name="mean")(h)
        var = nn.softplus(MLP((self.dim, self.dim), name="var")(h)) + self.min_var
        return mean, var


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

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        out = Transformer(
            self.tokens, 1, self.dim, self.depth, self.heads, self.dim_head, self.mlp_dim,
            outputs=1, name="transformer",
        )(h)[:, 0]
        logit = Dense(1, name="fc2")(nn.leaky_relu(Dense(64, name="fc1")(out), 0.1))
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

    @nn.compact
    def __call__(self, lang, audio, vision, hyper):
        inner = self.heads * self.dim_head
        lang, audio = LayerNorm("norm_lang")(lang), LayerNorm("norm_audio")(audio)
        vision, hyper = LayerNorm("norm_vision")(vision), LayerNorm("norm_hyper")(hyper)
        q = Dense(inner, use_bias=False, name="to_q")(lang)
        from_audio = multi_head_attention(
            q, Dense(inner, use_bias=False, name="to_k_audio")(audio),
            Dense(inner, use_bias=False, name="to_v_audio")(audio), self.heads,
        )
        from_vision = multi_head_attention(
            q, Dense(inner, use_bias=False, name="to_k_vision")(vision),
            Dense(inner, use_bias=False, name="to_v_vision")(vision), self.heads,
        )
        return hyper + Dense(self.dim, name="to_out")(from_audio + from_vision)


@jax.custom_vjp
def gradient_reversal(x: jax.Array) -> jax.Array:
    """Identity forward; the backward pass multiplies the cotangent by -1 (LNLN's GRL, alpha 1)."""
    return x


def _grl_fwd(x):
    return x, None


def _grl_bwd(_, g):
    return (jax.tree_util.tree_map(jnp.negative, g),)


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)
