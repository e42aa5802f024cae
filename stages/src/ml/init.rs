//! Deterministic weight initialisation from the run's seed, independent of the backend.
//!
//! burn's initialisers draw from a process-global backend RNG (flex and ndarray keep one
//! seeded generator per process), so two models initialised in parallel threads, or on
//! two backends, would get different weights for the same seed. Modules here are built
//! with zero initialisers and then every parameter is overwritten from a ChaCha stream
//! seeded by the run: the same seed gives the same initial weights on every backend.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Re-initialise every parameter of `module` from `seed`.
///
/// Rules, by the parameter's name and the struct that holds it:
/// - rank-1 `bias` -> 0; other rank-1 tensors (norm gamma/beta, running statistics, loss
///   buffers) keep the constants their constructors gave them;
/// - `Conv2d` weights -> He uniform (ReLU follows every conv), fan-in = in*kh*kw;
/// - `Linear` weights (burn's row layout, [in, out]) -> uniform with variance 1/fan-in;
/// - anything else of rank >= 2 (position embeddings, class token, ArcFace centres)
///   -> normal with std 0.02, the usual ViT choice.
pub fn reinit<B: Backend, M: Module<B>>(module: M, seed: u64) -> M {
    let mut mapper = Reinit { rng: ChaCha8Rng::seed_from_u64(seed), path: Vec::new() };
    module.map(&mut mapper)
}

struct Reinit {
    rng: ChaCha8Rng,
    /// (field name, type of the struct holding it) from the root down.
    path: Vec<(String, String)>,
}

impl Reinit {
    fn values(&mut self, shape: &[usize]) -> Option<Vec<f32>> {
        let n: usize = shape.iter().product();
        let (name, holder) = self.path.last().map(|(n, h)| (n.as_str(), h.as_str())).unwrap_or(("", ""));
        if shape.len() == 1 {
            return (name == "bias").then(|| vec![0.0; n]);
        }
        let uniform = |rng: &mut ChaCha8Rng, bound: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
        };
        Some(match holder {
            "Struct:Conv2d" if shape.len() == 4 => {
                let fan_in = (shape[1] * shape[2] * shape[3]).max(1) as f32;
                uniform(&mut self.rng, (6.0 / fan_in).sqrt())
            }
            "Struct:Linear" if shape.len() == 2 => {
                let fan_in = shape[0].max(1) as f32;
                uniform(&mut self.rng, (3.0 / fan_in).sqrt())
            }
            _ => (0..n).map(|_| normal(&mut self.rng) * 0.02).collect(),
        })
    }
}

/// Standard normal by Box-Muller (rand_distr is not a dependency).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl<B: Backend> ModuleMapper<B> for Reinit {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let dims: Vec<usize> = shape.iter().copied().collect();
        let Some(values) = self.values(&dims) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let fresh = Tensor::<B, D>::from_data(TensorData::new(values, shape), &tensor.device());
        Param::from_mapped_value(id, fresh.set_require_grad(require_grad), mapper)
    }
}
