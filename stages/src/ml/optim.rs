//! AdamW with the recipe's parameter groups: weight decay on weights, none on norm
//! parameters (BatchNorm/LayerNorm gamma and beta), biases, the class token and
//! position embeddings; and, for the ViT, optional layer-wise learning-rate decay (the
//! seed fine-tuned its MAE-pre-trained ViT with decay 0.75): the head and final norm
//! get the full rate, block i of L gets decay^(L - i), the embeddings decay^(L + 1).
//! burn's AdamW applies one decay and one rate to everything, so one AdamW instance
//! runs per (decay, rate) group, each stepping only its group's gradients. AdamW's
//! update is per parameter, so the grouping itself changes no number.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

/// Where a parameter goes: weight decay or not, and its ViT layer (0 = embeddings,
/// 1..=L blocks, L + 1 = everything after the blocks; always L + 1 outside a ViT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupKey {
    pub decayed: bool,
    pub layer: usize,
}

/// Every trainable parameter's group, and the ViT depth L (0 without a ViT).
pub fn param_groups<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> (Vec<(ParamId, GroupKey)>, usize) {
    let mut v = Groups { path: Vec::new(), params: Vec::new(), depth: 0 };
    model.visit(&mut v);
    let top = v.depth + 1;
    let params = v.params.into_iter().map(|(id, decayed, layer)| (id, GroupKey { decayed, layer: layer.unwrap_or(top) })).collect();
    (params, v.depth)
}

struct Groups {
    path: Vec<(String, String)>,
    /// (id, decayed, ViT layer if inside a ViT's embeddings or blocks).
    params: Vec<(ParamId, bool, Option<usize>)>,
    depth: usize,
}

impl Groups {
    /// burn names each step of the path by the field and the type holding it, so the
    /// ViT's own fields are the entries held by `Struct:Vit`.
    fn vit_layer(&self) -> Option<usize> {
        let at = self.path.iter().position(|(_, ty)| ty == "Struct:Vit")?;
        match self.path[at].0.as_str() {
            "patch_embed" | "cls_token" | "pos_embed" => Some(0),
            "blocks" => self.path.get(at + 1).and_then(|(n, _)| n.parse::<usize>().ok()).map(|i| i + 1),
            _ => None,
        }
    }
}

impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Groups {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        // The ViT's depth: the highest block index seen, plus one.
        if let Some((field, ty)) = self.path.last()
            && field == "blocks"
            && ty == "Struct:Vit"
            && let Ok(i) = name.parse::<usize>()
        {
            self.depth = self.depth.max(i + 1);
        }
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
        self.params.push((param.id, !exempt, self.vit_layer()));
    }
}

struct Group<B: AutodiffBackend, M: AutodiffModule<B>> {
    optim: OptimizerAdaptor<AdamW, M, B>,
    ids: Vec<ParamId>,
    /// Multiplies the scheduled learning rate.
    scale: f64,
}

/// AdamW optimisers over disjoint parameter groups.
pub struct GroupedAdamW<B: AutodiffBackend, M: AutodiffModule<B>> {
    groups: Vec<Group<B, M>>,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> GroupedAdamW<B, M> {
    /// `layer_decay` 1.0 turns layer-wise decay off (two groups: decayed or not).
    pub fn new(model: &M, weight_decay: f64, layer_decay: f64) -> Self {
        let (params, depth) = param_groups::<B, M>(model);
        let layered = layer_decay != 1.0 && depth > 0;
        let mut by_key: BTreeMap<GroupKey, Vec<ParamId>> = BTreeMap::new();
        for (id, mut key) in params {
            if !layered {
                key.layer = 0;
            }
            by_key.entry(key).or_default().push(id);
        }
        let groups = by_key
            .into_iter()
            .map(|(key, ids)| Group {
                optim: AdamWConfig::new()
                    .with_beta_1(0.9)
                    .with_beta_2(0.999)
                    .with_epsilon(1e-8)
                    .with_weight_decay(if key.decayed { weight_decay as f32 } else { 0.0 })
                    .init(),
                ids,
                scale: if layered { layer_decay.powi((depth + 1 - key.layer) as i32) } else { 1.0 },
            })
            .collect();
        GroupedAdamW { groups }
    }

    /// One optimiser step from the gradients of a backward pass.
    pub fn step(&mut self, lr: f64, mut model: M, mut grads: B::Gradients) -> M {
        for g in &mut self.groups {
            let gp = GradientsParams::from_params(&mut grads, &model, &g.ids);
            model = g.optim.step(lr * g.scale, model, gp);
        }
        model
    }

    /// The learning-rate multiplier of every parameter.
    pub fn lr_scales(&self) -> BTreeMap<ParamId, f64> {
        self.groups.iter().flat_map(|g| g.ids.iter().map(move |&id| (id, g.scale))).collect()
    }
}
