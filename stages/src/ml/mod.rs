//! The machine-learning core behind the `train`, `predict` and `evaluate` kinds: models
//! (CNN, ViT, EfficientNet-Lite, Swin-V2, heads), losses, optimiser and schedule,
//! augmentation, the training loop, and the on-disk formats of models, predictions and metrics. Everything here is
//! generic over a burn backend; `backend` picks the concrete one at run time.
//!
//! Later stages (ensemble, soup, pseudo-labels) reuse `checkpoint`, `predictions` and
//! `metrics` to read what these kinds write.

pub mod activation;
pub mod allocator;
pub mod attention;
pub mod augment;
pub mod backend;
pub mod checkpoint;
pub mod cnn;
pub mod conv;
pub mod cosine_attention;
pub mod cpu;
pub mod data;
pub mod efficientnet;
pub mod fastmath;
pub mod head;
pub mod init;
pub mod kernels;
pub mod linear;
pub mod loader;
pub mod loss;
pub mod mae;
pub mod metrics;
pub mod model;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod predictions;
pub mod pretrained;
pub mod randaugment;
pub mod resize;
pub mod rows;
pub mod schedule;
pub mod step_pool;
pub mod swinv2;
pub mod tokens;
pub mod train_loop;
pub mod vit;
