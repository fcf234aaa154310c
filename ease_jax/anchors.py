"""Class-conditional Gaussian anchors of EASE (docs/protocol.md section 7; Eq. 8, 24-29).

Per modality m and sentiment bin k (y <= -0.1, -0.1 < y <= 0.1, y > 0.1) a diagonal Gaussian
prior (mean[m, k], var[m, k]) tracks the pooled CLEAN features of that bin by an exponential moving
average. The state is a small pytree; `update_anchors` is pure and jit-able, runs without gradient,
and (given `axis_name`) pools the batch statistics over devices so that every replica holds the
same anchors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

N_BINS = 3
BIN_EDGES = (-0.1, 0.1)  # right-closed: y <= -0.1 | -0.1 < y <= 0.1 | y > 0.1


class AnchorState(NamedTuple):
    """mean, var: [M, K, D] float32; visited: [M, K] bool (False until a bin is first seen)."""

    mean: jax.Array
    var: jax.Array
    visited: jax.Array


def init_anchors(n_modalities: int = 3, dim: int = 128, n_bins: int = N_BINS) -> AnchorState:
    """Priors start at mean 0, var 1, unvisited."""
    return AnchorState(
        mean=jnp.zeros((n_modalities, n_bins, dim), jnp.float32),
        var=jnp.ones((n_modalities, n_bins, dim), jnp.float32),
        visited=jnp.zeros((n_modalities, n_bins), bool),
    )


def label_bins(labels: jax.Array) -> jax.Array:
    """Sentiment bin of each label: [B] float -> [B] int32 in {0, 1, 2} (right-closed bins)."""
    return (labels > BIN_EDGES[0]).astype(jnp.int32) + (labels > BIN_EDGES[1]).astype(jnp.int32)


def update_anchors(
    state: AnchorState,
    features: jax.Array,
    labels: jax.Array,
    weight: jax.Array | None = None,
    *,
    momentum: float = 0.99,
    var_floor: float = 1e-4,
    axis_name: str | None = None,
) -> AnchorState:
    """EMA update of the anchors from one batch (no gradient flows into the state).

    features: [M, B, D] pooled clean features; labels: [B]; weight: [B] (0 for padding rows).
    Batch statistics per (m, k): weighted mean and population variance (clamped >= `var_floor`).
    A bin seen for the first time copies them; afterwards state = momentum * state + (1 - momentum)
    * batch. Bins absent from the batch keep their state.
    """
    m, b, d = features.shape
    if state.mean.shape[0] != m or state.mean.shape[2] != d:
        raise ValueError(f"features {features.shape} do not match anchors {state.mean.shape}")
    if labels.shape != (b,):
        raise ValueError(f"labels must have shape ({b},), got {labels.shape}")
    features = jax.lax.stop_gradient(features.astype(jnp.float32))
    w = jnp.ones((b,), jnp.float32) if weight is None else weight.astype(jnp.float32)
    onehot = jax.nn.one_hot(label_bins(labels), state.mean.shape[1], dtype=jnp.float32) * w[:, None]

    def pool(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    count = pool(onehot.sum(0))  # [K]
    safe = jnp.maximum(count, 1e-12)[None, :, None]
    batch_mean = pool(jnp.einsum("bk,mbd->mkd", onehot, features)) / safe
    # Two-pass variance: centre on the bin mean before squaring (float32 stays accurate).
    centred = features[:, :, None, :] - batch_mean[:, None, :, :]  # [M, B, K, D]
    batch_var = pool(jnp.einsum("bk,mbkd->mkd", onehot, centred**2)) / safe
    batch_var = jnp.maximum(batch_var, var_floor)

    present = jnp.broadcast_to(count > 0, state.visited.shape)  # [M, K]
    blend = jnp.where(state.visited, momentum, 0.0)[..., None]  # first visit copies the batch
    new_mean = blend * state.mean + (1.0 - blend) * batch_mean
    new_var = blend * state.var + (1.0 - blend) * batch_var
    keep = ~present[..., None]
    return AnchorState(
        mean=jnp.where(keep, state.mean, new_mean),
        var=jnp.where(keep, state.var, new_var),
        visited=state.visited | present,
    )


def anchors_for(state: AnchorState, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each sample's anchor: labels [B] -> (mean [M, B, D], var [M, B, D]), gradient-free."""
    bins = label_bins(labels)
    mean = jax.lax.stop_gradient(state.mean[:, bins])
    var = jax.lax.stop_gradient(state.var[:, bins])
    return mean, var
