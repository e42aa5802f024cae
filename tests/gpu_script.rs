//! `benches/gpu/run.sh` on a machine without a GPU: its arguments, and that it fails
//! clearly and quickly, never hangs, when there is no GPU, a broken driver or a wedged
//! `nvidia-smi`. (What it does with a GPU is run by hand where one is lent.)

use crate::cli::Dir;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gpu/run.sh")
}

fn executable(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A bundle of stand-ins (never reached: the script stops before running them) and a
/// PATH of the system's tools plus `fake` (which may hold an `nvidia-smi`).
fn setup(d: &Dir) -> (PathBuf, String) {
    let bundle = d.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    for exe in ["fgflow", "train_speed"] {
        executable(&bundle.join(exe), "echo must not run >&2; exit 99");
    }
    let fake = d.path().join("fake");
    std::fs::create_dir_all(&fake).unwrap();
    (bundle, format!("{}:/usr/local/bin:/usr/bin:/bin", fake.display()))
}

fn run(args: &[&str], path: &str, env: &[(&str, &str)]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new("bash").arg(script()).args(args).env("PATH", path).envs(env.iter().copied()).output().unwrap();
    (out, start.elapsed())
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn arguments_are_checked_before_anything_runs() {
    let d = Dir::new();
    let (bundle, path) = setup(&d);
    let (out, _) = run(&["--help"], &path, &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).contains("bundle.sh") && text(&out).contains("Exit status"), "{}", text(&out));
    for (args, says) in [
        (vec!["--bogus"], "unknown argument `--bogus`"),
        (vec!["--images", "0"], "--images needs a whole number"),
        (vec!["--images", "1e20"], "--images needs a whole number"),
        (vec!["--epochs", "1"], "--epochs needs a whole number from 2"),
        (vec!["--bundle"], "--bundle needs a directory"),
    ] {
        let (out, _) = run(&args, &path, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
    }
    let missing = d.path().join("nowhere");
    let (out, _) = run(&["--bundle", missing.to_str().unwrap()], &path, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("nowhere/fgflow") && text(&out).contains("benches/gpu/bundle.sh"), "{}", text(&out));
    assert!(bundle.join("fgflow").exists());
}

#[test]
fn no_gpu_is_a_clear_failure_not_a_hang() {
    let d = Dir::new();
    let (bundle, path) = setup(&d);
    let b = bundle.to_str().unwrap();
    let fake = d.path().join("fake/nvidia-smi");
    let system_has_one = std::env::split_paths("/usr/local/bin:/usr/bin:/bin").any(|p| p.join("nvidia-smi").exists());
    if !system_has_one {
        let (out, _) = run(&["--bundle", b], &path, &[]);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        assert!(text(&out).contains("no NVIDIA GPU found: nvidia-smi is not on PATH"), "{}", text(&out));
    }
    // A driver that is installed but does not answer the tool, as nvidia-smi prints it.
    executable(&fake, "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9");
    let (out, _) = run(&["--bundle", b], &path, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("nvidia-smi failed (exit 9): NVIDIA-SMI has failed"), "{}", text(&out));
    // A wedged driver: nvidia-smi never returns. The probe is bounded.
    executable(&fake, "sleep 60");
    let (out, took) = run(&["--bundle", b], &path, &[("FGFLOW_GPU_PROBE_TIMEOUT", "1")]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("did not answer within 1 s"), "{}", text(&out));
    assert!(took < Duration::from_secs(30), "the probe took {took:?}");
    // A GPU but no CUDA driver library where the loader looks (this machine has none).
    let has_libcuda = Command::new("sh").args(["-c", "ldconfig -p 2>/dev/null | grep -q libcuda.so || ls /usr/lib*/*/libcuda.so* /usr/local/cuda*/lib64/libcuda.so* >/dev/null 2>&1"]).status().unwrap().success();
    if !has_libcuda {
        executable(&fake, "echo 'NVIDIA H200, 570.00, 143771 MiB'");
        let (out, _) = run(&["--bundle", b], &path, &[]);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        assert!(text(&out).contains("no CUDA driver library (libcuda.so)"), "{}", text(&out));
        assert!(!text(&out).contains("must not run"), "{}", text(&out));
    }
}
