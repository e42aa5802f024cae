//! Maps the run's backend name (`ctx.backend`: "flex", "ndarray", "wgpu", "cuda") to a
//! concrete burn backend and runs a generic job on it. The job is a trait with a generic
//! method, so every model function is written once (`fn run<B: TrainBackend>`) and
//! instantiated per backend by the `match` in [`dispatch`].
//!
//! GPU backends exist only when the crate is built with the `wgpu` / `cuda` features,
//! and ndarray only with `ndarray` (every model function is instantiated once per
//! compiled backend, so each one costs compile time; flex is the default).
//! A binary built with them must still start on a machine without a GPU: burn's wgpu
//! panics on first use when there is no adapter and cuda panics on the first operation
//! when `libcuda` cannot be loaded, so the first tiny operation runs under
//! `catch_unwind` and a failure becomes a clear error instead of a crash.

use crate::ml::kernels::TrainBackend;
use fgflow_engine::StageError;

/// Every backend name the engine may pass, whether or not it is compiled in.
pub const BACKENDS: &[&str] = &["flex", "ndarray", "wgpu", "cuda"];

/// Work to run on whichever backend the run selected.
pub trait BackendJob {
    type Output;
    /// `B` is the autodiff backend for training; inference code uses `B::InnerBackend`.
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Self::Output, StageError>;
}

/// Run `job` on the backend called `name`.
pub fn dispatch<J: BackendJob>(name: &str, job: J) -> Result<J::Output, StageError> {
    use burn::backend::{Autodiff, Flex};
    match name {
        "flex" => job.run::<Autodiff<Flex>>(Default::default()),
        "ndarray" => run_ndarray(job),
        "wgpu" => run_wgpu(job),
        "cuda" => run_cuda(job),
        other => Err(StageError::failed(format!(
            "unknown backend `{other}`: expected one of {}",
            BACKENDS.iter().map(|b| format!("`{b}`")).collect::<Vec<_>>().join(", ")
        ))),
    }
}

#[cfg(feature = "ndarray")]
fn run_ndarray<J: BackendJob>(job: J) -> Result<J::Output, StageError> {
    job.run::<burn::backend::Autodiff<burn::backend::NdArray>>(Default::default())
}

#[cfg(not(feature = "ndarray"))]
fn run_ndarray<J: BackendJob>(_job: J) -> Result<J::Output, StageError> {
    Err(StageError::failed(
        "backend `ndarray`: this fgflow was built without the `ndarray` feature (rebuild with `cargo build --release --features ndarray`, or use `--backend flex`)",
    ))
}

#[cfg(feature = "wgpu")]
fn run_wgpu<J: BackendJob>(job: J) -> Result<J::Output, StageError> {
    use burn::backend::wgpu::{Wgpu, WgpuDevice};
    use burn::backend::Autodiff;
    let device = WgpuDevice::default();
    probe::<Wgpu>("wgpu", &device, "no usable GPU adapter was found (on a CPU-only machine, install a software Vulkan driver such as `mesa-vulkan-drivers`, or use `--backend flex`)")?;
    job.run::<Autodiff<Wgpu>>(device)
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<J: BackendJob>(_job: J) -> Result<J::Output, StageError> {
    Err(StageError::failed(
        "backend `wgpu`: this fgflow was built without the `wgpu` feature (rebuild with `cargo build --features wgpu`, or use `--backend flex`)",
    ))
}

#[cfg(feature = "cuda")]
fn run_cuda<J: BackendJob>(job: J) -> Result<J::Output, StageError> {
    use burn::backend::cuda::{Cuda, CudaDevice};
    use burn::backend::Autodiff;
    let device = CudaDevice::default();
    probe::<Cuda>("cuda", &device, "no CUDA device or driver (`libcuda`) is available on this machine; use `--backend flex`")?;
    job.run::<Autodiff<Cuda>>(device)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: BackendJob>(_job: J) -> Result<J::Output, StageError> {
    Err(StageError::failed(
        "backend `cuda`: this fgflow was built without the `cuda` feature (rebuild with `cargo build --features cuda`, or use `--backend flex`)",
    ))
}

/// Run one tiny operation on `device` and read it back; a panic (no adapter, no
/// driver) becomes an error. The result is remembered per backend name, so the
/// panic message, if any, is printed once per process.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn probe<B: burn::tensor::backend::Backend>(name: &'static str, device: &B::Device, why: &str) -> Result<(), StageError> {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    static PROBED: Mutex<BTreeMap<&'static str, bool>> = Mutex::new(BTreeMap::new());

    let mut probed = PROBED.lock().unwrap_or_else(|p| p.into_inner());
    let ok = *probed.entry(name).or_insert_with(|| {
        let device = device.clone();
        // AssertUnwindSafe: nothing shared is observed after a panic; the probe's
        // tensors are dropped with the unwound frame.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let t = burn::tensor::Tensor::<B, 1>::ones([4], &device);
            let v = t.sum().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
            v.first().copied() == Some(4.0)
        }))
        .unwrap_or(false)
    });
    if ok { Ok(()) } else { Err(StageError::failed(format!("backend `{name}` is not usable: {why}"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Name;
    impl BackendJob for Name {
        type Output = String;
        fn run<B: TrainBackend>(self, device: B::Device) -> Result<String, StageError> {
            Ok(B::name(&device))
        }
    }

    #[test]
    fn cpu_backends_dispatch_and_unknown_is_an_error() {
        assert!(dispatch("flex", Name).is_ok());
        let ndarray = dispatch("ndarray", Name);
        if cfg!(feature = "ndarray") {
            assert!(ndarray.is_ok());
        } else {
            assert!(ndarray.unwrap_err().to_string().contains("built without the `ndarray` feature"));
        }
        let err = dispatch("tpu", Name).unwrap_err().to_string();
        assert!(err.contains("unknown backend `tpu`"), "{err}");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_feature_is_a_clear_error() {
        let err = dispatch("wgpu", Name).unwrap_err().to_string();
        assert!(err.contains("built without the `wgpu` feature"), "{err}");
    }

    /// With the feature compiled in, a machine without the hardware gives an error,
    /// not a panic (on a machine with it, the job runs).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_feature_never_panics() {
        match dispatch("cuda", Name) {
            Ok(name) => eprintln!("cuda available: {name}"),
            Err(e) => assert!(e.to_string().contains("backend `cuda` is not usable"), "{e}"),
        }
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_feature_never_panics() {
        match dispatch("wgpu", Name) {
            Ok(name) => eprintln!("wgpu available: {name}"),
            Err(e) => assert!(e.to_string().contains("backend `wgpu` is not usable"), "{e}"),
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = dispatch("cuda", Name).unwrap_err().to_string();
        assert!(err.contains("built without the `cuda` feature"), "{err}");
    }
}
