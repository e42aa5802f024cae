//! Hostile pipelines and command lines (issue 9, items 7, 10, 11, 13-16, 18): every
//! malformed input is an error at load time (exit 2, file:line:col) that creates and
//! changes nothing in the cache; reading verbs never write; huge values and control
//! characters never reach the terminal raw; writing a default changes no key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::cli::Dir;

const OK: &str = r#"(
    stages: {
        "gen": (kind: "command", params: { "cmd": "seq 1 5 > nums.txt", "outputs": { "nums": "nums.txt" } }),
        "sum": (kind: "command", inputs: { "nums": "gen.nums" }, params: { "cmd": "awk '{s+=$1} END {print s}' inputs/nums/nums.txt > sum.txt", "outputs": { "sum": "sum.txt" } }),
    },
)"#;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 2, the file named with a line and column, and no `.fgflow` left behind.
fn rejected(d: &Dir, args: &[&str], file: &str, needle: &str) -> String {
    let o = d.run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "fgflow {args:?}:\n{err}");
    assert!(err.contains(needle), "fgflow {args:?}: no {needle:?} in:\n{err}");
    let located = err.lines().any(|l| l.split(&format!("{file}:")).nth(1).is_some_and(|rest| {
        let mut parts = rest.split(':');
        parts.next().is_some_and(|x| x.parse::<usize>().is_ok()) && parts.next().is_some_and(|x| x.trim_end_matches(']').parse::<usize>().is_ok())
    }));
    assert!(located, "fgflow {args:?}: not located as {file}:line:col:\n{err}");
    assert!(!d.path().join(".fgflow").exists(), "fgflow {args:?} left a cache behind");
    err
}

#[test]
fn load_time_errors_are_located_exit_2_and_create_no_cache() {
    let d = Dir::new();
    let cases: &[(&str, &str, &str)] = &[
        // Zero stages from a foreach, or none at all.
        ("empty_foreach", r#"( stages: { "a": (kind: "command", foreach: [], params: { "cmd": "true" }) } )"#, "`foreach` has no items"),
        ("no_stage", r#"( stages: { "t": (template: true, kind: "command", params: { "cmd": "true" }) } )"#, "declares no stage"),
        // Repeated keys: ron alone would keep the last one.
        ("dup_param", r#"( stages: { "a": (kind: "command", params: { "cmd": "true", "cmd": "false" }) } )"#, "duplicate key \"cmd\""),
        (
            "dup_input",
            r#"( stages: { "a": (kind: "command", params: { "cmd": "echo > o", "outputs": { "o": "o" } }), "b": (kind: "command", inputs: { "x": "a.o", "x": "a.o" }, params: { "cmd": "true" }) } )"#,
            "duplicate key \"x\"",
        ),
        ("dup_in_value", r#"( stages: { "a": (kind: "command", params: { "cmd": "true", "outputs": { "o": "o", "o": "p" } }) } )"#, "duplicate key \"o\""),
        ("dup_first", r#"( stages: { "a": (kind: "command", foreach: ["x"], first: { "y": "a@x.o", "y": "a@x.o" }, params: { "cmd": "true" }) } )"#, "duplicate key \"y\""),
        // Backends: every name the stages know (also those not compiled in), nothing else.
        ("tpu", "(\n  backend: \"tpu\",\n  stages: { \"a\": (kind: \"command\", params: { \"cmd\": \"true\" }) },\n)", "unknown backend \"tpu\""),
        // The benchmark: every count checked against the committed data.
        ("classes", r#"( stages: { "b": (kind: "quickdraw", params: { "root": ".", "seed": 1, "classes": 100000 }) } )"#, "`classes`: must be at most 344"),
        ("negative", r#"( stages: { "b": (kind: "quickdraw", params: { "root": ".", "seed": 1, "train_max": -3, "val_per_class": -1 }) } )"#, "`val_per_class`: must be >= 0"),
        ("per_class", r#"( stages: { "b": (kind: "quickdraw", params: { "root": ".", "seed": 1, "train_max": 90 }) } )"#, "the data has 100 drawings per class"),
        ("open_set", r#"( stages: { "b": (kind: "quickdraw", params: { "root": ".", "seed": 1, "classes": 340, "open_set": 0.9 }) } )"#, "open-set images"),
        // Names that would drive the terminal.
        ("newline", "( stages: { \"a\nb\": (kind: \"command\", params: { \"cmd\": \"true\" }) } )", "no control characters"),
        ("escape", "( stages: { \"a\\u{1b}[31mred\": (kind: \"command\", params: { \"cmd\": \"true\" }) } )", "no control characters"),
        ("raw_escape", "( stages: { \"a\u{1b}[2Jb\": (kind: \"command\", params: { \"cmd\": \"true\" }) } )", "no control characters"),
    ];
    for (name, src, needle) in cases {
        let rel = format!("pipelines/{name}.ron");
        d.write(&rel, src);
        rejected(&d, &["run", &rel], &format!("{name}.ron"), needle);
        rejected(&d, &["status", &rel], &format!("{name}.ron"), needle);
        rejected(&d, &["graph", "-p", &rel], &format!("{name}.ron"), needle);
    }
    // The same for `--backend`, which has no line: a usage error naming the valid ones.
    d.write("pipelines/ok.ron", OK);
    for verb in ["run", "status"] {
        let o = d.run(&[verb, "pipelines/ok.ron", "--backend", "tpu"]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("unknown backend \"tpu\": expected one of \"flex\", \"ndarray\", \"wgpu\", \"cuda\""), "{}", stderr(&o));
        assert!(!d.path().join(".fgflow").exists());
    }
}

#[test]
fn a_rejected_pipeline_changes_nothing_in_an_existing_cache() {
    let d = Dir::new();
    d.write("pipelines/ok.ron", OK);
    d.ok(&["run", "pipelines/ok.ron"]);
    let before = snapshot(&d.path().join(".fgflow"));
    // Rejected at load, and rejected while hashing its sources (a missing `deps` file).
    d.write("pipelines/bad.ron", r#"( stages: { "a": (kind: "command", params: { "cmd": 3 }) } )"#);
    d.write("pipelines/nosrc.ron", r#"( stages: { "a": (kind: "command", params: { "cmd": "true", "deps": ["missing.txt"] }) } )"#);
    for f in ["pipelines/bad.ron", "pipelines/nosrc.ron"] {
        for verb in ["run", "status"] {
            let o = d.run(&[verb, f]);
            assert_eq!(o.status.code(), Some(2), "{verb} {f}: {}", stderr(&o));
        }
    }
    assert_eq!(snapshot(&d.path().join(".fgflow")), before, "a rejected pipeline changed the cache (last-pipeline included)");
    let last = std::fs::read(d.path().join(".fgflow/last-pipeline")).unwrap();
    assert!(last.ends_with(b"ok.ron"), "{}", String::from_utf8_lossy(&last));
}

/// Every file under `dir` with its size, mtime and mode.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            out.insert(e.path(), (if m.is_dir() { 0 } else { m.len() }, m.modified().unwrap(), m.permissions().mode()));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

fn is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(true)
}

#[test]
fn reading_verbs_never_write_into_the_cache() {
    let d = Dir::new();
    d.write("pipelines/ok.ron", OK);
    d.ok(&["run", "pipelines/ok.ron"]);
    let cache = d.path().join(".fgflow");
    // Even root cannot make a temp dir in the cache now.
    std::fs::remove_dir_all(cache.join("tmp")).unwrap();
    std::fs::write(cache.join("tmp"), "not a directory").unwrap();
    let key = d.json(&["ls", "--json"]).as_array().unwrap().iter().find(|e| e["stage"] == "sum").unwrap()["key"].as_str().unwrap()[..12].to_string();
    let before = snapshot(&cache);
    let reading: Vec<Vec<&str>> = vec![
        vec!["status", "pipelines/ok.ron"],
        vec!["status", "pipelines/ok.ron", "--json"],
        vec!["explain", "sum"],
        vec!["ls"],
        vec!["ls", "-p", "pipelines/ok.ron"],
        vec!["show", "sum"],
        vec!["show", &key, "--json"],
        vec!["diff", "gen", "sum"],
        vec!["graph"],
        vec!["graph", "--dot"],
        vec!["export", "sum.sum", "out/sum.txt"],
    ];
    for args in &reading {
        d.ok(args);
    }
    assert_eq!(std::fs::read_to_string(d.path().join("out/sum.txt")).unwrap().trim(), "15");
    assert_eq!(snapshot(&cache), before, "a reading verb wrote into the cache");
    // As an ordinary user, the same verbs on a cache nobody may write.
    if !is_root() {
        let chmod = |mode: &str| assert!(std::process::Command::new("chmod").args(["-R", mode, cache.to_str().unwrap()]).status().unwrap().success());
        chmod("a-w");
        for args in &reading {
            let o = d.run(args);
            chmod("u+w");
            assert!(o.status.success(), "{args:?} on a read-only cache: {}", stderr(&o));
            chmod("a-w");
        }
        chmod("u+w");
    }
}

#[test]
fn jobs_beyond_the_cap_never_abort_and_zero_is_a_usage_error() {
    let d = Dir::new();
    d.write("pipelines/ok.ron", OK);
    let o = d.run(&["run", "pipelines/ok.ron", "--jobs", "100000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("--jobs 100000 capped at 256 workers"), "{}", stderr(&o));
    for bad in ["0", "-1", "99999999999999999999999"] {
        let o = d.run(&["run", "pipelines/ok.ron", "--jobs", bad]);
        assert_eq!(o.status.code(), Some(2), "--jobs {bad}: {}", stderr(&o));
    }
}

#[test]
fn a_huge_value_of_the_wrong_type_prints_a_short_error() {
    let d = Dir::new();
    let big = "x".repeat(5 << 20);
    d.write("pipelines/big.ron", &format!(r#"( stages: {{ "a": (kind: "command", params: {{ "cmd": "true", "env": "{big}" }}) }} )"#));
    let err = rejected(&d, &["status", "pipelines/big.ron"], "big.ron", "parameter `env`: expected list of string");
    assert!(err.len() < 8_000, "{} bytes of error output", err.len());
    assert!(err.contains(&format!("({} bytes)", big.len())), "{err}");
    // A huge key and a huge unknown kind too.
    d.write("pipelines/key.ron", &format!(r#"( stages: {{ "{big}": (kind: "{big}") }} )"#));
    let err = rejected(&d, &["status", "pipelines/key.ron"], "key.ron", "unknown kind");
    assert!(err.len() < 8_000, "{} bytes of error output", err.len());
}

#[test]
fn unusable_cache_directories_are_usage_errors() {
    let d = Dir::new();
    d.write("pipelines/ok.ron", OK);
    let file = d.write("not-a-dir", "x");
    for verb in [vec!["run", "pipelines/ok.ron"], vec!["status", "pipelines/ok.ron"], vec!["ls"], vec!["gc"], vec!["verify"]] {
        let mut args = vec!["--cache-dir", file.to_str().unwrap()];
        args.extend(&verb);
        let o = d.run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("cache directory"), "{}", stderr(&o));
        // Under a regular file: a parent that can never be created.
        let o = d.cmd(&verb).env("FGFLOW_CACHE", file.join("cache")).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{verb:?} with FGFLOW_CACHE under a file: {}", stderr(&o));
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

#[test]
fn graph_takes_dash_p_and_a_non_utf8_pipeline_name_is_remembered() {
    let d = Dir::new();
    d.write("pipelines/ok.ron", OK);
    assert!(d.ok(&["graph", "-p", "pipelines/ok.ron"]).contains("sum (command)"));
    assert!(d.ok(&["graph", "pipelines/ok.ron"]).contains("sum (command)"));
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::OsStr::from_bytes(b"pipelines/p\xff\xfe.ron");
    std::fs::write(d.path().join(name), OK).unwrap();
    // `status` remembers the pipeline it planned (in an existing cache).
    d.ok(&["run", "pipelines/ok.ron"]);
    let o = d.cmd(&["status"]).arg(name).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let last = std::fs::read(d.path().join(".fgflow/last-pipeline")).unwrap();
    assert!(last.ends_with(b"p\xff\xfe.ron"), "stored lossily: {last:?}");
    assert!(d.ok(&["graph"]).contains("sum (command)"));
    assert!(d.ok(&["explain", "sum"]).contains("is fresh"));
}

#[test]
fn control_characters_from_files_and_stages_print_escaped() {
    let d = Dir::new();
    // A port name, a failing stage's log and a value, all with ESC.
    d.write(
        "pipelines/esc.ron",
        "( stages: {\n  \"a\": (kind: \"command\", params: { \"cmd\": \"printf 'x' > o\", \"outputs\": { \"o\": \"o\" } }),\n  \"b\": (kind: \"command\", inputs: { \"in\\u{1b}[31m\": \"a.o\" }, params: { \"cmd\": \"printf '\\\\033[2J\\\\033]0;pwned\\\\007 boom'; exit 1\" }),\n} )",
    );
    let o = d.run(&["run", "pipelines/esc.ron", "-j", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let all = [o.stdout.clone(), o.stderr.clone()].concat();
    assert!(!all.contains(&0x1b) && !all.contains(&0x07), "raw control bytes reached the terminal: {}", String::from_utf8_lossy(&all));
    assert!(String::from_utf8_lossy(&all).contains("\\u{1b}[2J"), "{}", String::from_utf8_lossy(&all));
    for args in [vec!["graph", "-p", "pipelines/esc.ron"], vec!["graph", "-p", "pipelines/esc.ron", "--dot"], vec!["status", "pipelines/esc.ron"]] {
        let o = d.run(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(!o.stdout.contains(&0x1b), "{args:?}: {}", String::from_utf8_lossy(&o.stdout));
    }
    assert!(d.ok(&["graph", "-p", "pipelines/esc.ron"]).contains("in\\u{1b}[31m"));
    // A rejected file's own text: the error shows it escaped, never raw.
    d.write("pipelines/raw.ron", "( stages: { \"a\": (kind: \"command\u{1b}[2J\", params: { \"cmd\": \"true\" }) } )");
    let o = d.run(&["status", "pipelines/raw.ron"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!o.stderr.contains(&0x1b), "{}", stderr(&o));
}

/// Item 7, the issue's example through the binary: `"deps": []` and no `deps` are one key.
#[test]
fn deps_written_empty_or_left_out_give_one_key() {
    let d = Dir::new();
    let key = |params: &str| {
        d.write("pipelines/p.ron", &format!(r#"( stages: {{ "a": (kind: "command", params: {{ "cmd": "true > o.txt", "outputs": {{ "o": "o.txt" }}{params} }}) }} )"#));
        d.json(&["status", "pipelines/p.ron", "--json"])["stages"][0]["key"].clone()
    };
    assert_eq!(key(""), key(r#", "deps": []"#));
    assert_eq!(key(""), key(r#", "env": []"#));
}

/// Item 7: for every parameter of every shipped kind, writing its default explicitly
/// gives the same key as leaving it out (one canonical form for both).
#[test]
fn writing_a_default_explicitly_never_changes_a_key() {
    use fgflow_engine::{ArtifactType, ParamType, Params, PortSpec, RunContext, StageError, StageKind, Value};

    /// Feeds any input port (its output type is `any`).
    struct Source;
    impl StageKind for Source {
        fn name(&self) -> &'static str {
            "test_source"
        }
        fn version(&self) -> u32 {
            1
        }
        fn summary(&self) -> &'static str {
            "test input"
        }
        fn params(&self) -> Vec<fgflow_engine::ParamSpec> {
            Vec::new()
        }
        fn inputs(&self) -> Vec<PortSpec> {
            Vec::new()
        }
        fn outputs(&self, _: &Params) -> Vec<PortSpec> {
            vec![PortSpec::one("out", ArtifactType::ANY, "")]
        }
        fn run(&self, _: &RunContext) -> Result<(), StageError> {
            Ok(())
        }
    }

    fn ron_of(v: &Value) -> String {
        match v {
            Value::Str(s) => format!("{s:?}"),
            Value::List(items) => format!("[{}]", items.iter().map(ron_of).collect::<Vec<_>>().join(", ")),
            Value::Map(m) => format!("{{{}}}", m.iter().map(|(k, x)| format!("{k:?}: {}", ron_of(x))).collect::<Vec<_>>().join(", ")),
            other => other.to_string(),
        }
    }
    /// A valid value for a required parameter, by type.
    fn sample(name: &str, ty: &ParamType) -> String {
        match ty {
            ParamType::Bool => "false".into(),
            ParamType::Int => "1".into(),
            ParamType::Float => "0.5".into(),
            ParamType::Str if name == "cmd" => "\"true\"".into(),
            ParamType::Str => "\"x\"".into(),
            ParamType::Enum(options) => format!("{:?}", options[0]),
            ParamType::Path => "\"data\"".into(),
            ParamType::List(t) => format!("[{}]", sample(name, t)),
            ParamType::StrMap => "{}".into(),
        }
    }

    let mut registry = fgflow_stages::registry();
    registry.register(Source);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/x.txt"), "x").unwrap();
    let key_of = |src: String| -> Result<fgflow_cache::Digest, String> {
        let file = dir.path().join("p.ron");
        let p = fgflow_engine::Pipeline::from_source(&file, src, &registry).map_err(|e| e.render_plain())?;
        let sources = fgflow_engine::resolve_sources(&p, &mut fgflow_cache::StatCache::default()).map_err(|e| e.render_plain())?;
        let s = p.stage("s").unwrap();
        Ok(fgflow_engine::plan::fingerprint(s, &sources["s"], &Default::default(), "flex").0.key())
    };
    let mut compared = 0;
    for kind in registry.iter().filter(|k| k.name() != "test_source") {
        let specs = kind.params();
        let required: Vec<String> = specs.iter().filter(|p| p.default.is_none()).map(|p| format!("{:?}: {}", p.name, sample(p.name, &p.ty))).collect();
        let inputs: Vec<String> =
            kind.inputs().iter().filter(|p| p.name != "*" && !p.optional).map(|p| format!("{:?}: {}", p.name, if p.many { "[\"src.out\"]" } else { "\"src.out\"" })).collect();
        let src = |extra: Option<String>| {
            let params: Vec<String> = required.iter().cloned().chain(extra).collect();
            format!(r#"( stages: {{ "src": (kind: "test_source"), "s": (kind: {:?}, inputs: {{ {} }}, params: {{ {} }}) }} )"#, kind.name(), inputs.join(", "), params.join(", "))
        };
        let base = match key_of(src(None)) {
            Ok(k) => k,
            Err(e) => panic!("kind `{}` with sample values does not load:\n{e}", kind.name()),
        };
        for p in specs.iter().filter(|p| p.default.is_some()) {
            let written = key_of(src(Some(format!("{:?}: {}", p.name, ron_of(p.default.as_ref().unwrap())))))
                .unwrap_or_else(|e| panic!("kind `{}`: writing the default of `{}` is rejected:\n{e}", kind.name(), p.name));
            assert_eq!(written, base, "kind `{}`: writing `{}`'s default changes the key", kind.name(), p.name);
            compared += 1;
        }
    }
    assert!(compared > 50, "only {compared} parameters compared");
}
