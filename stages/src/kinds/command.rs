//! The `command` kind: runs a user's program (`sh -c cmd`) in a scratch directory.
//! Declared inputs appear read-only under `inputs/<name>/` (a list input under
//! `inputs/<name>/<i>/`), declared `deps` (scripts, configs) are linked in at their
//! relative path and content-hashed into the key, and each declared output path is
//! captured into the cache. The command line and the values of the named `env`
//! variables are part of the key.
//!
//! What a command can observe must be in its key or not be given to it: its inputs are
//! private copies (it may write to them; the cache's blobs are out of its reach), its
//! environment is empty but for the declared `env` variables (keyed), `PATH` (passed
//! through unkeyed, like DVC and Snakemake: keying it would re-run everything on every
//! virtualenv activation) and `TMPDIR`, a private empty directory. In particular it
//! does not see the stage's name: two stages with the same command and inputs share one
//! result. When the shell exits, whatever it left running in the background is killed
//! (its process group), so nothing writes to an output after it was captured.

use std::fs;
use std::path::{Component, Path};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::process::{Command as Process, Stdio};

use fgflow_engine::{ArtifactType, ParamSpec, ParamType, Params, PortSpec, RunContext, StageError, StageKind, Value};

pub struct Command;

/// The one variable every command sees unkeyed (see the module doc).
const PASSTHROUGH: &str = "PATH";

/// A relative path naming something below the working directory (not `.` itself).
fn relative_and_inside(p: &str) -> bool {
    let path = Path::new(p);
    path.is_relative()
        && path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && path.components().any(|c| matches!(c, Component::Normal(_)))
}

impl StageKind for Command {
    fn name(&self) -> &'static str {
        "command"
    }
    fn version(&self) -> u32 {
        // 2: no FGFLOW_STAGE, HOME, USER, LANG... in the environment; inputs are copies.
        2
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
    fn runs_foreign_code(&self) -> bool {
        true
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
                errs.push(("deps".into(), format!("`{dep}` must be a relative path below the pipeline file's directory (not `.` itself: list the files or folders the command needs)")));
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
        let tmpdir = ctx.scratch_dir().join("tmp");
        fs::create_dir_all(&tmpdir).map_err(|e| StageError::io("creating the command's TMPDIR", e))?;
        let mut process = Process::new("sh");
        process.arg("-c").arg(cmd).current_dir(&work).env_clear().stdin(Stdio::null()).process_group(0);
        for var in std::iter::once(PASSTHROUGH).chain(ctx.params.strs("env")?) {
            if let Some(v) = std::env::var_os(var) {
                process.env(var, v);
            }
        }
        process.env("TMPDIR", &tmpdir);
        ctx.log(format!("$ {cmd}"));
        let out = run_in_own_group(&mut process).map_err(|e| StageError::io("running `sh`", e))?;
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
        // An output may be a link to the working directory, an input or a dep (its
        // target is copied); a link anywhere else is refused.
        let mut allowed: Vec<&Path> = vec![&work];
        for port in ctx.input_names() {
            allowed.extend(ctx.inputs(&port).iter().map(|p| p.as_path()));
        }
        allowed.extend(ctx.sources("deps").iter().map(|(_, abs)| abs.as_path()));
        for (name, rel) in ctx.params.str_map("outputs")? {
            let produced = work.join(&rel);
            fs::symlink_metadata(&produced).map_err(|_| StageError::failed(format!("the command did not write its output `{name}` (`{rel}`)")))?;
            // Before the move: a relative link to elsewhere in the working directory
            // would point to nothing once moved.
            fgflow_cache::capture::resolve_links(&produced, &allowed).map_err(|e| StageError::failed(format!("output `{name}`: {e}")))?;
            let meta = fs::symlink_metadata(&produced).map_err(|e| StageError::io(format!("reading output `{name}`"), e))?;
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

/// Process groups of the commands running now, for the interrupt handler (a fixed
/// array of atomics: all a signal handler may touch).
static GROUPS: [AtomicI32; 256] = [const { AtomicI32::new(0) }; 256];

/// Run the shell in a process group of its own, reading its output while it runs,
/// and when it exits kill whatever it left in the group (background jobs that could
/// still write to an output after it was captured).
fn run_in_own_group(process: &mut Process) -> std::io::Result<std::process::Output> {
    let mut child = process.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pgid = i32::try_from(child.id()).unwrap_or(0);
    let slot = GROUPS.iter().find(|g| g.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst).is_ok());
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = child.wait();
    // SAFETY: kill(2) on a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    if let Some(slot) = slot {
        slot.store(0, Ordering::SeqCst);
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok(std::process::Output { status: status?, stdout, stderr })
}

extern "C" fn on_interrupt(sig: libc::c_int) {
    for g in &GROUPS {
        let pgid = g.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill, signal and raise are async-signal-safe.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
    // SAFETY: as above; re-raising with the default action ends the process as the
    // signal would have, with the usual exit status.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Make Ctrl-C (and SIGTERM, SIGHUP) also stop the commands running now: they run in
/// process groups of their own, which a terminal's signal does not reach. The cache
/// stays consistent as after any crash (nothing of an unfinished stage is recorded).
pub fn stop_commands_on_interrupt() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe {
            libc::signal(sig, on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }
}

fn ctx_inputs(ctx: &RunContext) -> Vec<(String, Vec<std::path::PathBuf>)> {
    ctx.input_names().into_iter().map(|n| (n.clone(), ctx.inputs(&n).to_vec())).collect()
}
