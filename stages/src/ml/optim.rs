//! AdamW with the recipe's parameter groups: weight decay on weights, none on norm
//! parameters (BatchNorm/LayerNorm gamma and beta), biases, the class token and
//! position embeddings; optional layer-wise learning-rate decay (the seed fine-tuned
//! its MAE-pre-trained ViT with decay 0.75), per block of every backbone: the head and
//! whatever follows the last block get the full rate, block i of L (1-based, in
//! forward order) decay^(L + 1 - i), the stem or the ViT's embeddings decay^(L + 1).
//! Blocks are the ViT's transformer blocks, EfficientNet's MBConv blocks (L = 16 in
//! Lite0) and the CNN's (3x3 conv, BatchNorm) blocks across its stages; a backbone this
//! module does not know puts everything at the full rate. It also names the "stem" that
//! `freeze_epochs` freezes ([`stem_params`]).
//! burn's AdamW applies one decay and one rate to everything, so one AdamW instance
//! runs per (decay, rate) group, each stepping only its group's gradients. AdamW's
//! update is per parameter, so the grouping itself changes no number.
use std::collections::BTreeMap;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

/// Where a parameter goes: weight decay or not, and its layer (0 = the stem or the
/// ViT's embeddings, 1..=L the blocks in order, L + 1 = everything after the blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupKey {
    pub decayed: bool,
    pub layer: usize,
}

/// Where a parameter sits in its backbone, for layer-wise decay and freezing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Position {
    /// The ViT's patch embedding, class token and position embedding; EfficientNet's
    /// stem convolution and its BatchNorm.
    Stem,
    /// A block, ordered by (stage, block); `first_stage`: in the backbone's first stage.
    Block { at: (usize, usize), first_stage: bool },
    /// After the blocks (EfficientNet's 1x1 `top`, the ViT's final norm) and the head.
    Top,
}

/// What one pass over the model finds: every trainable parameter's group, its place in
/// the stem (see [`stem_params`]), and the depth L.
struct Layout {
    params: Vec<(ParamId, GroupKey, bool)>,
    depth: usize,
}

fn layout<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> Layout {
    let mut v = Groups { path: Vec::new(), params: Vec::new() };
    model.visit(&mut v);
    let mut blocks: Vec<(usize, usize)> = v.params.iter().filter_map(|(_, _, p)| if let Position::Block { at, .. } = p { Some(*at) } else { None }).collect();
    blocks.sort_unstable();
    blocks.dedup();
    let depth = blocks.len();
    let params = v
        .params
        .into_iter()
        .map(|(id, decayed, pos)| {
            let (layer, stem) = match pos {
                Position::Stem => (0, true),
                // `blocks` holds `at`: the search cannot fail.
                Position::Block { at, first_stage } => (blocks.binary_search(&at).map(|i| i + 1).unwrap_or(depth + 1), first_stage),
                Position::Top => (depth + 1, false),
            };
            (id, GroupKey { decayed, layer }, stem)
        })
        .collect();
    Layout { params, depth }
}

/// Every trainable parameter's group, and the depth L (0 for a backbone without blocks).
pub fn param_groups<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> (Vec<(ParamId, GroupKey)>, usize) {
    let l = layout::<B, M>(model);
    (l.params.into_iter().map(|(id, key, _)| (id, key)).collect(), l.depth)
}

/// The parameters `freeze_epochs` freezes: the backbone's "stem", the layers nearest the
/// pixels. EfficientNet: the stem convolution + BatchNorm and the first stage (one
/// depthwise-separable block at half the input resolution, 32 -> 16 channels). CNN (no
/// stem of its own): the blocks of its first stage. ViT: the patch embedding, class
/// token and position embedding.
pub fn stem_params<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> Vec<ParamId> {
    layout::<B, M>(model).params.into_iter().filter(|(_, _, stem)| *stem).map(|(id, _, _)| id).collect()
}

struct Groups {
    path: Vec<(String, String)>,
    /// (id, decayed, position).
    params: Vec<(ParamId, bool, Position)>,
}

impl Groups {
    /// burn names each step of the path by the field and the type holding it, so a
    /// backbone's own fields are the entries held by `Struct:Vit`, `Struct:EfficientNet`,
    /// `Struct:SwinV2` or `Struct:Cnn`.
    fn position(&self) -> Position {
        let index = |i: usize| self.path.get(i).and_then(|(n, _)| n.parse::<usize>().ok());
        for (at, (field, ty)) in self.path.iter().enumerate() {
            match (ty.as_str(), field.as_str()) {
                ("Struct:Vit", "patch_embed" | "cls_token" | "pos_embed") | ("Struct:EfficientNet", "stem") => return Position::Stem,
                ("Struct:Vit", "blocks") => {
                    return index(at + 1).map_or(Position::Top, |i| Position::Block { at: (i, 0), first_stage: false });
                }
                ("Struct:EfficientNet", "blocks") => {
                    return index(at + 1).map_or(Position::Top, |i| Position::Block { at: (i, 0), first_stage: i < super::efficientnet::FIRST_STAGE_BLOCKS });
                }
                ("Struct:SwinV2", "patch_embed") => return Position::Stem,
                // layers.S.blocks.B, and layers.S's patch merging with the stage's first
                // block (timm's grouping for layer decay).
                ("Struct:SwinV2", "layers") => {
                    return match (index(at + 1), self.path.get(at + 2).map(|(n, _)| n.as_str()), index(at + 3)) {
                        (Some(s), Some("blocks"), Some(b)) => Position::Block { at: (s, b), first_stage: s == 0 },
                        (Some(s), _, _) => Position::Block { at: (s, 0), first_stage: s == 0 },
                        _ => Position::Top,
                    };
                }
                // stages.S.blocks.B: the CNN's (3x3 conv, BatchNorm) block B of stage S.
                ("Struct:Cnn", "stages") => {
                    return match (index(at + 1), index(at + 3)) {
                        (Some(s), Some(b)) => Position::Block { at: (s, b), first_stage: s == 0 },
                        _ => Position::Top,
                    };
                }
                _ => {}
            }
        }
        Position::Top
    }
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
            || D == 1 // any other vector (norm scales under other names) is not a weight matrix
            // Swin-V2's attention temperature and its position-bias MLP (timm's
            // `no_weight_decay`: decaying them would pull the bias toward zero).
            || name == "logit_scale"
            || self.path.iter().any(|(n, _)| n == "cpb_mlp");
        self.params.push((param.id, !exempt, self.position()));
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
    /// Otherwise layer l of L gets lr * layer_decay^(L + 1 - l): the head and whatever
    /// follows the last block the full rate, block i (1-based) decay^(L + 1 - i), the
    /// stem decay^(L + 1).
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
