//! The `command` kind: runs a user's program (`sh -c cmd`) in a scratch directory.
//! Declared inputs appear read-only under `inputs/<name>/` (a list input under
//! `inputs/<name>/<i>/`), declared `deps` (scripts, configs) are linked in at their
//! relative path and content-hashed into the key, and each declared output path is
//! captured into the cache. The command line and the values of the named `env`
//! variables are part of the key; `PATH` is passed through but not keyed (like DVC
//! and Snakemake; Bazel's `--action_env` is the stricter alternative).

use std::fs;
use std::path::{Component, Path};
use std::process::{Command as Process, Stdio};

use fgflow_engine::{ArtifactType, ParamSpec, ParamType, Params, PortSpec, RunContext, StageError, StageKind, Value};

pub struct Command;

/// Variables every command sees, unkeyed: enough to find programs and a temp dir.
const PASSTHROUGH: &[&str] = &["PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV"];

fn relative_and_inside(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty() && path.is_relative() && path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

impl StageKind for Command {
    fn name(&self) -> &'static str {
        "command"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "run a shell command on materialised inputs and capture declared output files"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required("cmd", ParamType::Str, "shell command, run with `sh -c` in the stage's scratch directory"),
            ParamSpec::optional("outputs", ParamType::StrMap, Value::Map(Default::default()), "output name -> file or directory the command writes (relative)"),
            ParamSpec::optional("deps", ParamType::List(&ParamType::Path), Value::List(vec![]), "files or directories (relative to the pipeline file) linked into the working directory and hashed into the key"),
            ParamSpec::optional("env", ParamType::List(&ParamType::Str), Value::List(vec![]), "environment variables passed to the command; their values are part of the key"),
        ]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![PortSpec::many("*", ArtifactType::ANY, "any artifact, materialised under inputs/<name>/").optional()]
    }
    fn outputs(&self, params: &Params) -> Vec<PortSpec> {
        params.str_map("outputs").unwrap_or_default().into_keys().map(|n| PortSpec::one(n, ArtifactType::ANY, "captured from the command's working directory")).collect()
    }
    fn env(&self, params: &Params) -> Vec<String> {
        params.strs("env").map(|v| v.into_iter().map(String::from).collect()).unwrap_or_default()
    }
    fn validate(&self, params: &Params) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        for (name, path) in params.str_map("outputs").unwrap_or_default() {
            if !relative_and_inside(&path) {
                errs.push(("outputs".into(), format!("output `{name}`: `{path}` must be a relative path inside the working directory")));
            }
            if name.is_empty() || name.contains(['.', '/']) {
                errs.push(("outputs".into(), format!("output name `{name}` must be non-empty without `.` or `/`")));
            }
        }
        for dep in params.strs("deps").unwrap_or_default() {
            if !relative_and_inside(dep) {
                errs.push(("deps".into(), format!("`{dep}` must be a relative path below the pipeline file's directory")));
            }
        }
        errs
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let work = ctx.scratch_dir().join("work");
        fs::create_dir_all(work.join("inputs")).map_err(|e| StageError::io("creating the working directory", e))?;
        for (port, dirs) in ctx_inputs(ctx) {
            let link = work.join("inputs").join(&port);
            let target = if dirs.len() == 1 { dirs[0].clone() } else { dirs[0].parent().map(Path::to_path_buf).unwrap_or_default() };
            std::os::unix::fs::symlink(&target, &link).map_err(|e| StageError::io(format!("linking input `{port}`"), e))?;
        }
        for (written, abs) in ctx.sources("deps") {
            let link = work.join(written);
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent).map_err(|e| StageError::io("creating dep directory", e))?;
            }
            std::os::unix::fs::symlink(abs, &link).map_err(|e| StageError::io(format!("linking dep `{written}`"), e))?;
        }
        let cmd = ctx.params.str("cmd")?;
        let mut process = Process::new("sh");
        process.arg("-c").arg(cmd).current_dir(&work).env_clear().stdin(Stdio::null());
        for var in PASSTHROUGH.iter().map(|s| s.to_string()).chain(ctx.params.strs("env")?.into_iter().map(String::from)) {
            if let Ok(v) = std::env::var(&var) {
                process.env(&var, v);
            }
        }
        process.env("FGFLOW_STAGE", &ctx.stage);
        ctx.log(format!("$ {cmd}"));
        let out = process.output().map_err(|e| StageError::io("starting `sh`", e))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stdout.is_empty() {
            ctx.log(stdout.trim_end());
        }
        if !stderr.is_empty() {
            ctx.log(stderr.trim_end());
        }
        if !out.status.success() {
            let last = stderr.lines().last().or_else(|| stdout.lines().last()).unwrap_or("");
            return Err(StageError::failed(format!("command exited with {}{}", out.status, if last.is_empty() { String::new() } else { format!(": {last}") })));
        }
        for (name, rel) in ctx.params.str_map("outputs")? {
            let produced = work.join(&rel);
            let meta = fs::symlink_metadata(&produced).map_err(|_| StageError::failed(format!("the command did not write its output `{name}` (`{rel}`)")))?;
            let dest = ctx.output_dir(&name)?;
            let file_name = produced.file_name().map(|f| f.to_os_string()).unwrap_or_else(|| name.clone().into());
            if meta.is_dir() {
                fs::remove_dir(&dest).map_err(|e| StageError::io("preparing output", e))?;
                fs::rename(&produced, &dest).map_err(|e| StageError::io(format!("capturing `{rel}`"), e))?;
            } else {
                fs::rename(&produced, dest.join(file_name)).map_err(|e| StageError::io(format!("capturing `{rel}`"), e))?;
            }
        }
        Ok(())
    }
}

fn ctx_inputs(ctx: &RunContext) -> Vec<(String, Vec<std::path::PathBuf>)> {
    ctx.input_names().into_iter().map(|n| (n.clone(), ctx.inputs(&n).to_vec())).collect()
}
