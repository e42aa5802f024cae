//! Classification heads and the long-tail adjustments that depend on class counts.
//!
//! - **linear**: a fully connected layer (also the base of **logit_adjusted**, whose
//!   adjustment is applied in the loss or post-hoc at prediction, see [`log_prior`]).
//! - **arcface**: sub-center ArcFace. Features and the (C*k, d) centre matrix are
//!   L2-normalised; cos(theta_c) is the max over a class's k centres. Training logit of
//!   the target y: s*cos(theta_y + m_y) when cos(theta_y) > cos(pi - m_y), else
//!   s*(cos(theta_y) - m_y*sin(pi - m_y)); other classes s*cos(theta_c). Inference:
//!   s*cos(theta_c), no margin. Margins are per class ([`adaptive_margins`]).

use burn::module::{Module, Param, ParamId};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// Which head, with its sizes (stored in the model config JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HeadConfig {
    Linear,
    #[serde(rename = "arcface")]
    ArcFace {
        /// Sub-centres per class.
        k: usize,
        /// Logit scale.
        s: f64,
    },
}

impl HeadConfig {
    pub fn init<B: Backend>(&self, dim: usize, classes: usize, device: &B::Device) -> Head<B> {
        match self {
            HeadConfig::Linear => Head::Linear(LinearHead {
                fc: LinearConfig::new(dim, classes).with_initializer(Initializer::Zeros).init(device),
            }),
            HeadConfig::ArcFace { k, s } => Head::ArcFace(ArcFaceHead {
                centres: Param::initialized(ParamId::new(), Tensor::zeros([classes * (*k).max(1), dim], device).require_grad()),
                k: (*k).max(1),
                s: *s,
            }),
        }
    }
}

#[derive(Module, Debug)]
pub struct LinearHead<B: Backend> {
    pub fc: Linear<B>,
}

#[derive(Module, Debug)]
pub struct ArcFaceHead<B: Backend> {
    /// Row c*k + j is centre j of class c.
    pub centres: Param<Tensor<B, 2>>,
    pub k: usize,
    pub s: f64,
}

#[derive(Module, Debug)]
pub enum Head<B: Backend> {
    Linear(LinearHead<B>),
    ArcFace(ArcFaceHead<B>),
}

impl<B: Backend> Head<B> {
    /// Inference logits [N, C].
    pub fn forward(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Head::Linear(h) => h.fc.forward(features),
            Head::ArcFace(h) => h.cosine(features).mul_scalar(h.s),
        }
    }

    /// Training logits [N, C]: the ArcFace margin applies to each sample's target.
    /// `margins` [C] is only read by ArcFace.
    pub fn forward_train(&self, features: Tensor<B, 2>, labels: Tensor<B, 1, Int>, margins: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
        match (self, margins) {
            (Head::ArcFace(h), Some(m)) => h.train_logits(h.cosine(features), labels, m),
            _ => self.forward(features),
        }
    }
}

impl<B: Backend> ArcFaceHead<B> {
    /// cos(theta) [N, C]: max over each class's k sub-centres of the cosine similarity.
    pub fn cosine(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = l2_normalize(features);
        let w = l2_normalize(self.centres.val());
        let [n, _] = x.dims();
        let [ck, _] = w.dims();
        let classes = ck / self.k;
        let cos = x.matmul(w.transpose()); // [N, C*k]
        if self.k == 1 {
            return cos;
        }
        cos.reshape([n, classes, self.k]).max_dim(2).reshape([n, classes])
    }

    /// s * (cos with the target entries replaced by the margin formula).
    pub fn train_logits(&self, cos: Tensor<B, 2>, labels: Tensor<B, 1, Int>, margins: Tensor<B, 1>) -> Tensor<B, 2> {
        arcface_logits(cos, labels, margins, self.s)
    }
}

/// The ArcFace training logits from cosines, as a free function so tests can feed
/// hand-made cosines.
pub fn arcface_logits<B: Backend>(cos: Tensor<B, 2>, labels: Tensor<B, 1, Int>, margins: Tensor<B, 1>, s: f64) -> Tensor<B, 2> {
    let [n, c] = cos.dims();
    let m = margins.select(0, labels.clone()).reshape([n, 1]); // per-sample margin
    let onehot = labels.clone().one_hot::<2>(c).float();
    let idx = labels.reshape([n, 1]);
    let cos_y = cos.clone().gather(1, idx.clone()); // [N, 1]
    // Clamp: rounding can push |cos| a hair over 1 and sqrt would give NaN.
    let sin_y = (cos_y.clone().powi_scalar(2).neg() + 1.0).clamp(0.0, 1.0).sqrt();
    let cos_m = m.clone().cos();
    let sin_m = m.clone().sin();
    let with_margin = cos_y.clone() * cos_m.clone() - sin_y * sin_m.clone(); // cos(theta + m)
    // cos(pi - m) = -cos(m); sin(pi - m) = sin(m).
    let fallback = cos_y.clone() - m * sin_m;
    let target = with_margin.mask_where(cos_y.clone().lower_equal(cos_m.neg()), fallback);
    let delta = (target - cos_y).expand([n, c]) * onehot;
    (cos + delta).mul_scalar(s)
}

/// x / max(||x||, 1e-12) row-wise.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Adaptive ArcFace margins from per-class training counts:
/// t_c = n_c^(-1/4); m_c = (t_c - min t)/(max t - min t) * m_x + m_y.
/// A class with no samples counts as one (the rarest possible). When every class has
/// the same count the normalised term is 0/0; it is taken as 0 (all margins m_y).
pub fn adaptive_margins(counts: &[u64], m_x: f64, m_y: f64) -> Vec<f32> {
    let t: Vec<f64> = counts.iter().map(|&n| (n.max(1) as f64).powf(-0.25)).collect();
    let lo = t.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    t.iter()
        .map(|&tc| {
            let r = if hi > lo { (tc - lo) / (hi - lo) } else { 0.0 };
            (r * m_x + m_y) as f32
        })
        .collect()
}

/// Long-tail logit adjustment a_c = tau * ln(n_c / N + 1e-12) (Menon et al.).
/// Post-hoc: logits - a at inference. In the loss: train on logits + a.
///
/// A class with no training image at all (cleaning can empty a tail class) counts as
/// half an image: with the bare formula its adjustment is ln(1e-12) = -27.6, which
/// post-hoc adds 27.6 to the logit of a class the model never saw and sends every
/// prediction there.
pub fn log_prior(counts: &[u64], tau: f64) -> Vec<f32> {
    let total: u64 = counts.iter().sum();
    let total = total.max(1) as f64;
    counts.iter().map(|&n| (tau * ((n as f64).max(0.5) / total + 1e-12).ln()) as f32).collect()
}
