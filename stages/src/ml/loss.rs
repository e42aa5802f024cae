//! Training losses on logits [N, C] and integer labels [N]:
//! - cross-entropy with label smoothing: -((1-e) * log p_y + e * mean_c log p_c);
//! - balanced softmax: cross-entropy on logits + log prior (the prior from the training
//!   class counts);
//! - softmax equalization loss (EQL v2, softmax form): non-target logit z_j of a sample
//!   labelled y gets + tau*log(max(g_j, eps)/max(g_y, eps)), then cross-entropy. g comes
//!   from running per-class sums of |dL/dz| (positive: samples of the class; negative:
//!   samples of other classes). dL/dz = softmax(z') - onehot(y) is computed in the
//!   forward pass, so no autograd hooks are needed. The sums are buffers of the model
//!   (`Classifier::eql_pos`/`eql_neg`) so they are saved, restored and souped with it.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// Which of the running sums the EQL adjustment reads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EqlIndicator {
    Pos,
    Neg,
    /// pos / neg.
    Ratio,
}

/// The loss a run trains with (stored in the model config JSON for the record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LossConfig {
    Ce,
    Eql { tau: f64, eps: f64, indicator: EqlIndicator },
    BalancedSoftmax,
}

/// Mean cross-entropy with label smoothing `smoothing` in [0, 1).
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>, smoothing: f64) -> Tensor<B, 1> {
    let [n, c] = logits.dims();
    let logp = log_softmax(logits, 1);
    let onehot = labels.one_hot::<2>(c).float();
    // Smoothed target: (1-e) on the label plus e/C everywhere.
    let target = onehot.mul_scalar(1.0 - smoothing).add_scalar(smoothing / c as f64);
    (logp * target).sum().neg().div_scalar(n.max(1) as f64)
}

/// Logits shifted by a per-class vector (log prior for balanced softmax and the in-loss
/// logit adjustment; minus the prior for post-hoc adjustment).
pub fn add_per_class<B: Backend>(logits: Tensor<B, 2>, shift: Tensor<B, 1>) -> Tensor<B, 2> {
    let [n, c] = logits.dims();
    logits + shift.reshape([1, c]).expand([n, c])
}

/// The EQL indicator g [C] from the running sums.
pub fn eql_indicator<B: Backend>(pos: Tensor<B, 1>, neg: Tensor<B, 1>, which: EqlIndicator, eps: f64) -> Tensor<B, 1> {
    match which {
        EqlIndicator::Pos => pos,
        EqlIndicator::Neg => neg,
        EqlIndicator::Ratio => pos / neg.clamp_min(eps),
    }
}

/// z' = z + tau*log(max(g_j,eps)/max(g_y,eps)) on non-target entries (the target
/// entry's shift is log(1) = 0 anyway). `g` must be detached (it is a buffer).
pub fn eql_adjust<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>, g: Tensor<B, 1>, tau: f64, eps: f64) -> Tensor<B, 2> {
    let [n, c] = logits.dims();
    let lg = g.clamp_min(eps).log().mul_scalar(tau); // [C]
    let lg_y = lg.clone().select(0, labels).reshape([n, 1]).expand([n, c]);
    let shift = lg.reshape([1, c]).expand([n, c]) - lg_y;
    logits + shift
}

/// The increments of the running sums from one batch: (pos [C], neg [C]) with
/// pos[c] = sum over samples labelled c of |p_c - 1|, neg[c] = sum over the others of p_c,
/// where p = softmax(adjusted logits). Computed on detached values.
pub fn eql_increments<B: Backend>(adjusted: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [_, c] = adjusted.dims();
    let p = softmax(adjusted, 1);
    let onehot = labels.one_hot::<2>(c).float();
    let grad = (p - onehot.clone()).abs();
    let pos = (grad.clone() * onehot.clone()).sum_dim(0).reshape([c]);
    let neg = (grad * (onehot.neg() + 1.0)).sum_dim(0).reshape([c]);
    (pos, neg)
}
