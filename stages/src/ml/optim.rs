//! AdamW with the recipe's parameter groups: weight decay on weights, none on norm
//! parameters (BatchNorm/LayerNorm gamma and beta), biases, the class token and
//! position embeddings. burn's AdamW applies one decay to everything, so two AdamW
//! instances run side by side, each stepping only its group's gradients.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

/// Parameter ids split into (decayed, not decayed).
pub fn decay_groups<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> (Vec<ParamId>, Vec<ParamId>) {
    let mut v = Groups { path: Vec::new(), decay: Vec::new(), no_decay: Vec::new() };
    model.visit(&mut v);
    (v.decay, v.no_decay)
}

struct Groups {
    path: Vec<(String, String)>,
    decay: Vec<ParamId>,
    no_decay: Vec<ParamId>,
}

impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Groups {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.to_string(), container_type.to_string()));
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let (name, holder) = self.path.last().map(|(n, h)| (n.as_str(), h.as_str())).unwrap_or(("", ""));
        let exempt = name == "bias"
            || name == "cls_token"
            || name == "pos_embed"
            || holder.contains("BatchNorm")
            || holder.ends_with(":LayerNorm")
            || D == 1; // any other vector (norm scales under other names) is not a weight matrix
        if exempt { self.no_decay.push(param.id) } else { self.decay.push(param.id) }
    }
}

/// Two AdamW optimisers over disjoint parameter groups.
pub struct GroupedAdamW<B: AutodiffBackend, M: AutodiffModule<B>> {
    decay: OptimizerAdaptor<AdamW, M, B>,
    no_decay: OptimizerAdaptor<AdamW, M, B>,
    decay_ids: Vec<ParamId>,
    no_decay_ids: Vec<ParamId>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> GroupedAdamW<B, M> {
    pub fn new(model: &M, weight_decay: f64) -> Self {
        let (decay_ids, no_decay_ids) = decay_groups::<B, M>(model);
        let base = || AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8);
        GroupedAdamW {
            decay: base().with_weight_decay(weight_decay as f32).init(),
            no_decay: base().with_weight_decay(0.0).init(),
            decay_ids,
            no_decay_ids,
        }
    }

    /// One optimiser step from the gradients of a backward pass.
    pub fn step(&mut self, lr: f64, model: M, mut grads: B::Gradients) -> M {
        let g1 = GradientsParams::from_params(&mut grads, &model, &self.decay_ids);
        let g2 = GradientsParams::from_params(&mut grads, &model, &self.no_decay_ids);
        let model = self.decay.step(lr, model, g1);
        self.no_decay.step(lr, model, g2)
    }

    pub fn group_sizes(&self) -> (usize, usize) {
        (self.decay_ids.len(), self.no_decay_ids.len())
    }
}
