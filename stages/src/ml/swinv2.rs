//! Swin Transformer V2 as timm implements it (`timm.models.swin_transformer_v2`), so
//! that timm's `model.safetensors` loads by name through `pretrained` and gives timm's
//! outputs (stages/tests/timm_parity.rs, within 1e-4 of timm's logits).
//!
//! What must match timm exactly: patch embedding (strided conv) + LayerNorm; stages of
//! blocks, each stage after the first opening with patch merging (2x2 neighbours
//! concatenated in timm's order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2],
//! then `reduction` and `norm`); windowed attention with every second block shifted by
//! half a window (cyclic roll, and the -100 mask between regions that the roll brought
//! together); scaled cosine attention with a per-head `logit_scale` clamped at ln(100);
//! the continuous position bias: log-spaced relative offsets (normalised by the
//! (pretrained) window - 1, times 8, sign(x) log2(1 + |x|) / 3) through `cpb_mlp`
//! (2 -> 512, ReLU, -> heads, no bias) and 16 sigmoid; q and v biases, no k bias;
//! res-post-norm (x + norm1(attn(x)), x + norm2(mlp(x))); LayerNorm eps 1e-5; a final
//! norm and the mean over positions. A stage whose feature map is not larger than the
//! window uses one window of the map's size and no shift (timm's `_calc_window_shift`).
//!
//! The attention runs as one op (`cosine_attention`), the roll and the window partition
//! as one row permutation each way (`rows`); both give timm's values (parity tests).
//!
//! The relative position tables and the masks are computed from the configuration,
//! never loaded: a checkpoint fine-tunes at another resolution or window by building
//! the network with the new sizes (and `pretrained_window` set to the checkpoint's
//! window, as timm's `pretrained_window_sizes`).
//!
//! Parameter layout is timm's ([out, in] linear weights, [heads, 1, 1] `logit_scale`);
//! the only names that differ are LayerNorm's `gamma`/`beta` and the position-bias MLP's
//! layers, which [`timm_name`] maps. Feature maps must be multiples of their window
//! (timm pads; fgflow refuses such sizes in `check`).
//!
//! MMPretrain's checkpoints (the seed trained with MMPretrain) name the same tensors
//! differently and store patch merging's `reduction` columns in another order;
//! [`adapt_checkpoint`] brings them to timm's layout before loading.

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::Initializer;
use burn::tensor::activation::{relu, sigmoid};

use super::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::kernels::KernelBackend;
use super::attention::Heads;
use super::cosine_attention::cosine_attention;
use super::linear::{Layout, dense, linear};
use super::rows::{RowPermutation, permute_rows};
use super::norm::LayerNorm;
use super::pretrained::{FileTensor, FileTensors};

/// LayerNorm epsilon of timm's Swin-V2 (torch's default).
const LN_EPS: f64 = 1e-5;
/// Hidden width of the continuous position bias MLP.
const CPB_HIDDEN: usize = 512;

/// Sizes of the network (stored in the model config JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwinV2Config {
    /// Images are resized to resolution x resolution (and gray replicated to RGB).
    pub resolution: usize,
    pub patch: usize,
    pub embed_dim: usize,
    /// Blocks per stage; the channel width doubles at every stage after the first.
    pub depths: Vec<usize>,
    /// Attention heads per stage.
    pub heads: Vec<usize>,
    /// Window side per stage (clamped to the feature map where the map is smaller).
    pub window: Vec<usize>,
    /// Window the position bias was trained with, per stage (0: the window itself);
    /// timm's `pretrained_window_sizes`.
    pub pretrained_window: Vec<usize>,
    pub mlp_ratio: f64,
}

impl SwinV2Config {
    /// A named size: `tiny` (CPU-sized, 32 px), `base` and `large` (the seed's
    /// Swin-V2-B/L as timm's `swinv2_{base,large}_window12to24_192to384`: window 24 at
    /// 384 px, position bias pre-trained at window 12).
    pub fn preset(name: &str) -> Option<Self> {
        let big = |embed_dim: usize, heads: [usize; 4]| SwinV2Config {
            resolution: 384,
            patch: 4,
            embed_dim,
            depths: vec![2, 2, 18, 2],
            heads: heads.to_vec(),
            window: vec![24; 4],
            pretrained_window: vec![12, 12, 12, 6],
            mlp_ratio: 4.0,
        };
        match name {
            "tiny" => Some(SwinV2Config {
                resolution: 32,
                patch: 2,
                embed_dim: 32,
                depths: vec![2, 2],
                heads: vec![2, 4],
                window: vec![4, 4],
                pretrained_window: vec![0, 0],
                mlp_ratio: 2.0,
            }),
            "base" => Some(big(128, [4, 8, 16, 32])),
            "large" => Some(big(192, [6, 12, 24, 48])),
            _ => None,
        }
    }

    pub fn feature_dim(&self) -> usize {
        self.stage_dim(self.depths.len().saturating_sub(1))
    }

    fn stage_dim(&self, stage: usize) -> usize {
        self.embed_dim << stage
    }

    /// Feature map side of each stage.
    pub fn stage_sides(&self) -> Vec<usize> {
        let grid = self.resolution / self.patch.max(1);
        (0..self.depths.len()).map(|i| grid >> i).collect()
    }

    /// (window, shift) of a block: timm's clamp to the map, shift on odd blocks only.
    fn window_shift(&self, stage: usize, block: usize) -> (usize, usize) {
        let side = self.stage_sides()[stage];
        let target = self.window[stage];
        if side <= target { (side, 0) } else { (target, if block % 2 == 1 { target / 2 } else { 0 }) }
    }

    pub fn check(&self, channels: usize) -> Result<(), String> {
        if channels != 1 && channels != 3 {
            return Err(format!("swinv2 takes 1- or 3-channel images, found {channels}"));
        }
        let stages = self.depths.len();
        if stages == 0 || self.heads.len() != stages || self.window.len() != stages || self.pretrained_window.len() != stages {
            return Err(format!(
                "swinv2 depths, heads, window and pretrained_window need one entry per stage (found {}, {}, {}, {})",
                stages,
                self.heads.len(),
                self.window.len(),
                self.pretrained_window.len()
            ));
        }
        if self.patch == 0 || self.embed_dim == 0 || self.depths.contains(&0) || self.heads.contains(&0) || self.window.contains(&0) {
            return Err("swinv2 patch, embed_dim, depths, heads and window must be positive".into());
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 {
            return Err("swinv2 mlp_ratio must be positive".into());
        }
        let grid = self.resolution / self.patch;
        if grid * self.patch != self.resolution || grid % (1 << (stages - 1)) != 0 {
            return Err(format!(
                "swinv2 resolution {} must be a multiple of patch {} times 2^{} (one halving per later stage)",
                self.resolution,
                self.patch,
                stages - 1
            ));
        }
        for (i, side) in self.stage_sides().into_iter().enumerate() {
            let (window, _) = self.window_shift(i, 0);
            if side % window != 0 {
                return Err(format!("swinv2 stage {i}: the {side}x{side} feature map is not a multiple of window {window}"));
            }
            if self.stage_dim(i) % self.heads[i] != 0 {
                return Err(format!("swinv2 stage {i}: width {} is not divisible by {} heads", self.stage_dim(i), self.heads[i]));
            }
        }
        Ok(())
    }

    /// A network with zero weights, unit norms and `logit_scale` ln(10) (timm's
    /// constructor value); `ModelConfig::init` then draws the weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> SwinV2<B> {
        let mut layers = Vec::new();
        for (i, &depth) in self.depths.iter().enumerate() {
            let dim = self.stage_dim(i);
            let hidden = ((dim as f64) * self.mlp_ratio) as usize;
            let blocks = (0..depth)
                .map(|j| {
                    let (window, shift) = self.window_shift(i, j);
                    let geometry = Geometry::new(self.stage_sides()[i], window, shift, self.pretrained_window[i]);
                    SwinBlock {
                        attn: WindowAttention {
                            logit_scale: param(Tensor::full([self.heads[i], 1, 1], 10f32.ln(), device)),
                            cpb_mlp: CpbMlp { fc1: TLinear::new(2, CPB_HIDDEN, true, device), fc2: TLinear::new(CPB_HIDDEN, self.heads[i], false, device) },
                            qkv: TLinear::new(dim, 3 * dim, false, device),
                            q_bias: param(Tensor::zeros([dim], device)),
                            v_bias: param(Tensor::zeros([dim], device)),
                            proj: TLinear::new(dim, dim, true, device),
                            heads: self.heads[i],
                            geometry,
                        },
                        norm1: LayerNorm::new(dim, LN_EPS, device),
                        mlp: Mlp { fc1: TLinear::new(dim, hidden, true, device), fc2: TLinear::new(hidden, dim, true, device) },
                        norm2: LayerNorm::new(dim, LN_EPS, device),
                    }
                })
                .collect();
            let downsample = (i > 0).then(|| PatchMerging {
                reduction: TLinear::new(4 * self.stage_dim(i - 1), dim, false, device),
                norm: LayerNorm::new(dim, LN_EPS, device),
            });
            layers.push(SwinStage { downsample, blocks });
        }
        SwinV2 {
            patch_embed: PatchEmbed {
                proj: Conv2dConfig::new([3, self.embed_dim], [self.patch, self.patch])
                    .with_stride([self.patch, self.patch])
                    .with_initializer(Initializer::Zeros)
                    .init(device),
                norm: LayerNorm::new(self.embed_dim, LN_EPS, device),
            },
            layers,
            norm: LayerNorm::new(self.feature_dim(), LN_EPS, device),
            resolution: self.resolution,
        }
    }
}

fn param<B: Backend, const D: usize>(t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::initialized(ParamId::new(), t.require_grad())
}

/// The timm name of a parameter of [`SwinV2`] (or of the ViT), given its field path:
/// LayerNorm's `gamma`/`beta` are `weight`/`bias`, the position-bias MLP's layers are
/// `cpb_mlp.0` and `cpb_mlp.2` (a torch `Sequential` with the ReLU at 1).
pub fn timm_name(path: &str) -> String {
    let name = path.replace("cpb_mlp.fc1.", "cpb_mlp.0.").replace("cpb_mlp.fc2.", "cpb_mlp.2.");
    if let Some(stem) = name.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = name.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        name
    }
}

/// Whether a checkpoint's names are MMPretrain's (`backbone.stages.N.blocks.M.attn.w_msa`,
/// `patch_embed.projection`) rather than timm's.
fn is_mmpretrain(file: &FileTensors) -> bool {
    file.keys().any(|k| k.starts_with("backbone.") || k.contains(".attn.w_msa.") || k.starts_with("patch_embed.projection."))
}

/// A checkpoint in timm's names and layout, whichever of timm's or MMPretrain's it came
/// in. MMPretrain (`mmpretrain.models.SwinTransformerV2`, as saved by mmengine):
///
/// | MMPretrain | timm |
/// |---|---|
/// | `backbone.` prefix | none |
/// | `patch_embed.projection` | `patch_embed.proj` |
/// | `stages.N` | `layers.N` (both open stage N > 0 with `downsample`) |
/// | `attn.w_msa.{qkv,q_bias,v_bias,logit_scale,cpb_mlp,proj}` | `attn.*` |
/// | `ffn.layers.0.0`, `ffn.layers.1` | `mlp.fc1`, `mlp.fc2` |
/// | `norm{i}` for the last stage i (its `out_indices`) | `norm` |
/// | `relative_coords_table`, `relative_position_index` | computed here, dropped |
///
/// Patch merging: MMPretrain gathers each 2x2 neighbourhood with `nn.Unfold`, so input
/// column `c*4 + dy*2 + dx` of `reduction` reads channel c at row offset dy, column
/// offset dx; timm's reshape makes it column `dx*2C + dy*C + c`. The columns are
/// permuted accordingly (the inverse of MMPretrain's own `swin2mmpretrain.py`
/// `correct_unfold_reduction_order`). Norms come after the reduction in Swin-V2, so
/// they need no change. A timm checkpoint is returned unchanged.
pub fn adapt_checkpoint(file: FileTensors) -> Result<FileTensors, String> {
    if !is_mmpretrain(&file) {
        return Ok(file);
    }
    let strip = |k: &str| k.strip_prefix("backbone.").unwrap_or(k).to_string();
    let last_stage = file
        .keys()
        .filter_map(|k| strip(k).strip_prefix("stages.")?.split('.').next()?.parse::<usize>().ok())
        .max();
    let final_norm = last_stage.map(|i| format!("norm{i}."));
    let mut out = FileTensors::new();
    for (name, tensor) in file {
        let mut n = strip(&name);
        if n.ends_with("relative_coords_table") || n.ends_with("relative_position_index") {
            continue;
        }
        if let Some(rest) = final_norm.as_deref().and_then(|p| n.strip_prefix(p)) {
            n = format!("norm.{rest}");
        }
        if let Some(rest) = n.strip_prefix("stages.") {
            n = format!("layers.{rest}");
        }
        n = n
            .replace("patch_embed.projection.", "patch_embed.proj.")
            .replace(".attn.w_msa.", ".attn.")
            .replace(".ffn.layers.0.0.", ".mlp.fc1.")
            .replace(".ffn.layers.1.", ".mlp.fc2.");
        let tensor = if n.ends_with(".downsample.reduction.weight") { unfold_to_timm(&n, tensor)? } else { tensor };
        if out.insert(n.clone(), tensor).is_some() {
            return Err(format!("MMPretrain checkpoint: two tensors map to `{n}`"));
        }
    }
    Ok(out)
}

/// Patch merging's `reduction` weight [out, 4C] from MMPretrain's column order to timm's.
fn unfold_to_timm(name: &str, t: FileTensor) -> Result<FileTensor, String> {
    let (rows, cols) = match t.shape[..] {
        [r, c] if c % 4 == 0 => (r, c),
        _ => return Err(format!("tensor `{name}` has shape {:?}, patch merging's reduction needs [out, 4 x channels]", t.shape)),
    };
    let c = cols / 4;
    let values = t.values.map(|v| {
        let mut w = vec![0.0f32; v.len()];
        for r in 0..rows {
            for ch in 0..c {
                for dy in 0..2 {
                    for dx in 0..2 {
                        w[r * cols + dx * 2 * c + dy * c + ch] = v[r * cols + ch * 4 + dy * 2 + dx];
                    }
                }
            }
        }
        w
    });
    Ok(FileTensor { shape: t.shape, values })
}

/// A linear layer in torch's layout: weight [out, in], y = x W^T + b, so timm's
/// tensors load as they are.
#[derive(Module, Debug)]
pub struct TLinear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> TLinear<B> {
    pub fn new(inputs: usize, outputs: usize, bias: bool, device: &B::Device) -> Self {
        TLinear { weight: param(Tensor::zeros([outputs, inputs], device)), bias: bias.then(|| param(Tensor::zeros([outputs], device))) }
    }

}

impl<B: KernelBackend> TLinear<B> {
    /// x [rows, in] -> [rows, out].
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        linear(x, &self.weight, self.bias.as_ref(), Layout::OutIn)
    }
}

/// Where a block's windows lie: the window and shift, the log-spaced relative
/// coordinates fed to `cpb_mlp`, the pair index into them, and the shift mask.
#[derive(Debug, Clone)]
pub struct Geometry {
    pub side: usize,
    pub window: usize,
    pub shift: usize,
    /// [(2w-1)^2, 2] row-major.
    coords: Vec<f32>,
    /// [w^2 * w^2] into the rows of `coords`.
    index: Vec<i64>,
    /// [windows, w^2, w^2] of 0 / -100, when shifted.
    mask: Option<Vec<f32>>,
    /// An image's rows [side * side] in window order: shifted by `shift` (the roll),
    /// then window by window, each window's tokens in row-major order.
    to_windows: RowPermutation,
}

impl Geometry {
    fn new(side: usize, window: usize, shift: usize, pretrained_window: usize) -> Self {
        let w = window as i64;
        let norm = if pretrained_window > 0 { pretrained_window } else { window };
        let norm = (norm.max(2) - 1) as f32;
        let log_spaced = |d: i64| {
            let x = d as f32 / norm * 8.0;
            x.signum() * (x.abs() + 1.0).log2() / 8f32.log2()
        };
        let mut coords = Vec::new();
        for dh in -(w - 1)..w {
            for dw in -(w - 1)..w {
                coords.push(if dh == 0 { 0.0 } else { log_spaced(dh) });
                coords.push(if dw == 0 { 0.0 } else { log_spaced(dw) });
            }
        }
        let n = (w * w) as usize;
        let mut index = Vec::with_capacity(n * n);
        for a in 0..w * w {
            for b in 0..w * w {
                let (dh, dw) = (a / w - b / w + w - 1, a % w - b % w + w - 1);
                index.push(dh * (2 * w - 1) + dw);
            }
        }
        let mask = (shift > 0).then(|| {
            // Region labels of the rolled map: three bands per axis, as timm slices them.
            let band = |i: usize| if i < side - window { 0 } else if i < side - shift { 1 } else { 2 };
            let per = side / window;
            let mut out = Vec::with_capacity(per * per * n * n);
            for wy in 0..per {
                for wx in 0..per {
                    let label = |k: usize| band(wy * window + k / window) * 3 + band(wx * window + k % window);
                    for a in 0..n {
                        for b in 0..n {
                            out.push(if label(a) == label(b) { 0.0 } else { -100.0 });
                        }
                    }
                }
            }
            out
        });
        // torch.roll by -shift: the shifted map's (y, x) is the map's (y + shift, x + shift).
        let per = side / window;
        let mut to = Vec::with_capacity(side * side);
        for gy in 0..per {
            for gx in 0..per {
                for k in 0..window * window {
                    let (y, x) = (gy * window + k / window, gx * window + k % window);
                    to.push(((y + shift) % side) * side + (x + shift) % side);
                }
            }
        }
        Geometry { side, window, shift, coords, index, mask, to_windows: RowPermutation::new(to) }
    }
}

#[derive(Module, Debug)]
pub struct CpbMlp<B: Backend> {
    pub fc1: TLinear<B>,
    pub fc2: TLinear<B>,
}

#[derive(Module, Debug)]
pub struct WindowAttention<B: Backend> {
    pub logit_scale: Param<Tensor<B, 3>>,
    pub cpb_mlp: CpbMlp<B>,
    pub qkv: TLinear<B>,
    pub q_bias: Param<Tensor<B, 1>>,
    pub v_bias: Param<Tensor<B, 1>>,
    pub proj: TLinear<B>,
    #[module(skip)]
    pub heads: usize,
    #[module(skip)]
    pub geometry: Geometry,
}

impl<B: KernelBackend> WindowAttention<B> {
    /// The position bias plus the shift mask, per window: [windows or 1, heads, n, n].
    fn bias(&self, device: &B::Device) -> Tensor<B, 4> {
        let g = &self.geometry;
        let n = g.window * g.window;
        let rows = g.coords.len() / 2;
        let coords = Tensor::<B, 2>::from_data(TensorData::new(g.coords.clone(), [rows, 2]), device);
        let table = self.cpb_mlp.fc2.forward(relu(self.cpb_mlp.fc1.forward(coords))); // [rows, heads]
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(g.index.clone(), [n * n]), device);
        let bias = sigmoid(table.select(0, index).transpose().reshape([1, self.heads, n, n])).mul_scalar(16.0);
        match &g.mask {
            Some(mask) => {
                let windows = mask.len() / (n * n);
                let mask = Tensor::<B, 3>::from_data(TensorData::new(mask.clone(), [windows, n, n]), device);
                bias + mask.unsqueeze_dim::<4>(1)
            }
            None => bias,
        }
    }

    /// x [images * windows * n, dim] (windows in order, tokens of a window in row-major
    /// order) -> the same shape.
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [rows, d] = x.dims();
        let n = self.geometry.window * self.geometry.window;
        let h = self.heads;
        let zeros = Tensor::<B, 1>::zeros([d], &x.device());
        let qkv_bias = Tensor::cat(vec![self.q_bias.val(), zeros, self.v_bias.val()], 0);
        let qkv = dense(x, self.qkv.weight.val(), Some(qkv_bias), Layout::OutIn);
        let scale = self.logit_scale.val().clamp_max(100f32.ln()).exp().reshape([h]);
        let bias = self.bias(&qkv.device());
        let out = cosine_attention(qkv, scale, bias, Heads { n: rows / n, t: n, heads: h });
        self.proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: TLinear<B>,
    pub fc2: TLinear<B>,
}

impl<B: KernelBackend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct SwinBlock<B: Backend> {
    pub attn: WindowAttention<B>,
    pub norm1: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub norm2: LayerNorm<B>,
}

impl<B: KernelBackend> SwinBlock<B> {
    /// x [N, H, W, C] -> the same shape.
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, h, w, c] = x.dims();
        let side = self.attn.geometry.side;
        assert!(h == side && w == side, "a Swin-V2 block built for a {side}x{side} map was given {h}x{w}");
        let x = x.reshape([n * h * w, c]);
        let to_windows = &self.attn.geometry.to_windows;
        let a = self.attn.forward(permute_rows(x.clone(), to_windows));
        let a = permute_rows(a, &to_windows.inverse());
        let x = x + self.norm1.forward(a);
        let x = x.clone() + self.norm2.forward(self.mlp.forward(x));
        x.reshape([n, h, w, c])
    }
}

#[derive(Module, Debug)]
pub struct PatchMerging<B: Backend> {
    pub reduction: TLinear<B>,
    pub norm: LayerNorm<B>,
}

impl<B: KernelBackend> PatchMerging<B> {
    /// [N, H, W, C] -> [N, H/2, W/2, 2C]; the 4C inputs in timm's order (column
    /// offset, then row offset, then channel).
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, h, w, c] = x.dims();
        let x = x.reshape([n, h / 2, 2, w / 2, 2, c]).permute([0, 1, 3, 4, 2, 5]).reshape([n * (h / 2) * (w / 2), 4 * c]);
        let y = self.norm.forward(self.reduction.forward(x));
        let d = y.dims()[1];
        y.reshape([n, h / 2, w / 2, d])
    }
}

#[derive(Module, Debug)]
pub struct SwinStage<B: Backend> {
    pub downsample: Option<PatchMerging<B>>,
    pub blocks: Vec<SwinBlock<B>>,
}

#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: Conv2d<B>,
    pub norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct SwinV2<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub layers: Vec<SwinStage<B>>,
    pub norm: LayerNorm<B>,
    #[module(skip)]
    pub resolution: usize,
}

impl<B: KernelBackend> SwinV2<B> {
    /// [N, 1 or 3, H, W] -> the final normed feature map [N, h, w, C].
    pub fn feature_map(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = super::data::rgb_at(x, self.resolution);
        let p = self.patch_embed.proj.forward(x); // [N, C, h, w]
        let [n, d, h, w] = p.dims();
        let tokens = p.reshape([n, d, h * w]).swap_dims(1, 2).reshape([n * h * w, d]);
        let mut x = self.patch_embed.norm.forward(tokens).reshape([n, h, w, d]);
        for stage in &self.layers {
            if let Some(merge) = &stage.downsample {
                x = merge.forward(x);
            }
            for block in &stage.blocks {
                x = block.forward(x);
            }
        }
        let [n, h, w, d] = x.dims();
        self.norm.forward(x.reshape([n * h * w, d])).reshape([n, h, w, d])
    }

    /// [N, 1 or 3, H, W] -> features [N, C] (mean over positions).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let y = self.feature_map(x);
        let [n, h, w, d] = y.dims();
        y.reshape([n, h * w, d]).mean_dim(1).reshape([n, d])
    }
}

/// After `init::reinit` (which draws every matrix from N(0, 0.02)): `logit_scale`
/// back to timm's ln(10), the value the clamp and the position bias are sized for.
pub fn fix_init<B: Backend>(mut net: SwinV2<B>) -> SwinV2<B> {
    for block in net.layers.iter_mut().flat_map(|s| s.blocks.iter_mut()) {
        let scale = &mut block.attn.logit_scale;
        let t = scale.val();
        *scale = Param::initialized(scale.id, Tensor::full(t.shape(), 10f32.ln(), &t.device()).require_grad());
    }
    net
}
