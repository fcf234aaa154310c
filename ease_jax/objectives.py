"""Model objectives assembled from `ease_jax.losses` and `ease_jax.anchors` (docs/protocol.md
sections 7-8).

`ease_loss(outputs, batch, anchors, cfg, weights=...)` and `lnln_loss(outputs, batch, anchors,
cfg, weights=...)` return `(total, terms, anchors)`: the weighted total, a dict of every
(unweighted) term, and the updated anchors (EASE; LNLN passes `anchors` through). `weights` maps
every name of `config.LOSS_WEIGHTS` to its weight, a number or a traced scalar (a run's
`TrainState.hparams`); default `cfg.weights()`. A Table 4 ablation of a term is its weight at 0.
`batch` needs `labels` [B], `missing_rate` [B, 3] and optionally `weight` [B] (0 for padding rows).

Data parallelism: with `axis_name`, every term is the GLOBAL batch's value scaled so that
`lax.pmean` of the per-device gradients is the gradient of the global objective: per-sample means
are normalised by the global weight (psum), and the batch-level kernel term (L_uada) all-gathers
its pooled features, so padding and the device count never change the objective.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from ease_jax import losses
from ease_jax.anchors import AnchorState, anchors_for, update_anchors
from ease_jax.config import LossConfig

EASE_TERMS = ("sp", "ucmi", "uada", "anchor", "cons", "asym")
LNLN_TERMS = ("sp", "cc", "adv", "rec")


def _weight(batch: dict) -> jax.Array:
    labels = batch["labels"]
    return batch.get("weight", jnp.ones_like(labels, jnp.float32)).astype(jnp.float32)


def _global_scale(w: jax.Array, axis_name: str | None) -> jax.Array:
    """Factor turning a local weighted mean into this device's share of the global mean, such that
    pmean over devices gives the global weighted mean: n_devices * W_local / W_global."""
    if axis_name is None:
        return jnp.ones((), jnp.float32)
    local = w.sum()
    return jax.lax.psum(1.0, axis_name) * local / jnp.maximum(jax.lax.psum(local, axis_name), 1e-12)


def weighted_mean(per_sample: jax.Array, w: jax.Array, axis_name: str | None = None) -> jax.Array:
    """sum_b w_b x_b / sum_b w_b over the global batch (see module docstring): [B] -> []. The local
    mean is `losses.weighted_mean`; the scale makes the pmean over devices the global mean."""
    return losses.weighted_mean(per_sample, w) * _global_scale(w, axis_name)


def _gather(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def ease_loss(
    outputs: dict,
    batch: dict,
    anchors: AnchorState,
    cfg: LossConfig = LossConfig(),
    *,
    weights: Mapping[str, jax.Array] | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict, AnchorState]:
    """EASE objective: sp L_sp + ucmi L_ucmi + uada L_uada + anchor L_anchor + cons L_cons
    + asym L_asym (`weights`, default `cfg.weights()`; the terms' constants from `cfg`).

    L_sp: MSE(pred, y). L_ucmi (Eq. 4): Gaussian NLL of the clean tokens, mean over elements and
    modalities. L_uada (Eq. 5-7): kernel CS divergence between mean-pooled clean tokens (u = 0) and
    mean-pooled imputation samples (u = sample uncertainty), mean over modalities. L_anchor (Eq. 8,
    24): closed-form CS divergence between N(pooled UCMI mean, v_hat I), v_hat = max(base + scale u,
    min), and the label bin's anchor, after the EMA update of the anchors with this batch's pooled
    clean features. L_cons (Eq. 10) over the full and subset views; L_asym (Eq. 11) towards the
    stop-gradient full prediction.
    """
    lam = cfg.weights() if weights is None else weights
    w = _weight(batch)
    y = batch["labels"].astype(jnp.float32)
    pred = outputs["pred"]
    terms = {"sp": weighted_mean((pred - y) ** 2, w, axis_name)}
    total = lam["sp"] * terms["sp"]

    if "imp_mean" in outputs and "clean_tokens" in outputs:
        clean = outputs["clean_tokens"]  # [3, B, K, d]
        mean, var, sample = outputs["imp_mean"], outputs["imp_var"], outputs["imp_sample"]
        d = clean.shape[-1]
        nll = losses.gaussian_nll(clean, mean, var) / d  # [3, B, K]: mean over d
        terms["ucmi"] = weighted_mean(nll.mean(axis=(0, 2)), w, axis_name)
        total = total + lam["ucmi"] * terms["ucmi"]

        pooled_clean = clean.mean(2)  # [3, B, d]
        pooled_sample = sample.mean(2)
        u = outputs["uncertainty"]  # [3, B]
        w_all = _gather(w, axis_name)
        uada = [
            losses.kernel_cs_divergence(
                _gather(pooled_clean[m], axis_name), _gather(pooled_sample[m], axis_name),
                u_y=_gather(u[m], axis_name), tau=cfg.tau, alpha=cfg.alpha,
                weight_x=w_all, weight_y=w_all,
            )
            for m in range(3)
        ]
        terms["uada"] = jnp.mean(jnp.stack(uada))

        anchors = update_anchors(anchors, pooled_clean, y, w, momentum=cfg.anchor_momentum,
                                 var_floor=cfg.anchor_var_floor, axis_name=axis_name)
        prior_mean, prior_var = anchors_for(anchors, y)  # [3, B, d]
        v_hat = jnp.maximum(cfg.anchor_base_var + cfg.anchor_var_scale * u, cfg.anchor_min_var)
        v_hat = jnp.broadcast_to(v_hat[..., None], prior_var.shape)
        cs = losses.gaussian_cs_divergence(mean.mean(2), v_hat, prior_mean, prior_var)  # [3, B]
        terms["anchor"] = weighted_mean(cs.mean(0), w, axis_name)
        total = total + lam["uada"] * terms["uada"] + lam["anchor"] * terms["anchor"]

    if "view_preds" in outputs:
        views = outputs["view_preds"]  # [V, B]
        local_w = w
        terms["cons"] = losses.consistency_mse(jnp.concatenate([pred[None], views], 0),
                                               weight=local_w) * _global_scale(w, axis_name)
        terms["asym"] = losses.distillation_mse(views, pred, weight=local_w) * _global_scale(
            w, axis_name)
        total = total + lam["cons"] * terms["cons"] + lam["asym"] * terms["asym"]
    terms["total"] = total
    return total, terms, anchors


def lnln_loss(
    outputs: dict,
    batch: dict,
    anchors=None,
    cfg: LossConfig = LossConfig(),
    *,
    weights: Mapping[str, jax.Array] | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict, object]:
    """LNLN objective: cc L_cc + adv L_adv + rec L_rec + sp L_sp (section 8; `weights`, default
    `cfg.weights()`).

    L_cc = MSE(w, 1 - r_l); L_adv = cross-entropy of the discriminator, label 1 for the corrected
    dominant tokens h_d and 0 for the clean language tokens, mean over the 2 K tokens of a sample;
    L_rec = MSE between the reconstructions and the clean tokens (not detached); L_sp = MSE.
    """
    lam = cfg.weights() if weights is None else weights
    w = _weight(batch)
    y = batch["labels"].astype(jnp.float32)
    terms = {"sp": weighted_mean((outputs["pred"] - y) ** 2, w, axis_name)}
    cc_target = 1.0 - batch["missing_rate"][:, 0]
    terms["cc"] = weighted_mean((outputs["completeness"] - cc_target) ** 2, w, axis_name)
    total = lam["sp"] * terms["sp"] + lam["cc"] * terms["cc"]
    if "disc_logits" in outputs:
        logp = jax.nn.log_softmax(outputs["disc_logits"].astype(jnp.float32), -1)  # [2, B, K, 2]
        nll = -jnp.stack([logp[0, ..., 1], logp[1, ..., 0]])  # h_d -> 1, clean -> 0
        terms["adv"] = weighted_mean(nll.mean(axis=(0, 2)), w, axis_name)
        rec_err = (outputs["reconstruction"] - outputs["clean_tokens"]) ** 2  # [3, B, K, d]
        terms["rec"] = weighted_mean(rec_err.mean(axis=(0, 2, 3)), w, axis_name)
        total = total + lam["adv"] * terms["adv"] + lam["rec"] * terms["rec"]
    terms["total"] = total
    return total, terms, anchors


def model_loss(model: str):
    """The objective function of `model` ("ease" | "lnln")."""
    return {"ease": ease_loss, "lnln": lnln_loss}[model]
