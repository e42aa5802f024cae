//! What a hostile or careless `command` stage can do to the cache (issue 9, classes 1 to
//! 4): write to its inputs, hand over a hard link or a symbolic link to a file outside
//! its directory, keep writing after it exits, or observe something not in its key.
//! Each test runs as whoever runs the suite (root in CI, where modes do not protect).

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use crate::cli::{Dir, with_status};

fn pipeline(stages: &str) -> String {
    format!("(\n    stages: {{\n{stages}\n    }},\n)\n")
}

fn exported(d: &Dir, what: &str) -> String {
    let dest = d.path().join("exported").join(what.replace('.', "_"));
    d.ok(&["export", what, dest.to_str().unwrap()]);
    let file = if dest.is_dir() { std::fs::read_dir(&dest).unwrap().flatten().next().unwrap().path() } else { dest };
    std::fs::read_to_string(file).unwrap()
}

fn verify_clean(d: &Dir) {
    let v = d.run(&["verify"]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert_eq!(v.status.code(), Some(0), "verify found damage:\n{out}{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn a_command_writing_to_its_inputs_changes_its_copy_not_the_cache() {
    let d = Dir::new();
    d.write(
        "pipelines/p.ron",
        &pipeline(
            r#"        "a": (kind: "command", params: { "cmd": "printf original > o.bin", "outputs": { "o": "o.bin" } }),
        "b": (kind: "command", inputs: { "x": "a.o" }, params: { "cmd": "chmod u+w inputs/x/o.bin; printf X >> inputs/x/o.bin; cat inputs/x/o.bin > o.bin", "outputs": { "o": "o.bin" } }),
        "c": (kind: "command", inputs: { "x": "a.o" }, params: { "cmd": "cat inputs/x/o.bin > o.bin", "outputs": { "o": "o.bin" } }),"#,
        ),
    );
    let r = d.json(&["run", "pipelines/p.ron", "--json", "-j", "1"]);
    assert_eq!(with_status(&r, "ran"), ["a", "b", "c"]);
    assert_eq!(exported(&d, "a.o"), "original");
    assert_eq!(exported(&d, "b.o"), "originalX", "the stage sees its own write");
    assert_eq!(exported(&d, "c.o"), "original", "a later reader of the same input is not affected");
    verify_clean(&d);
}

#[test]
fn a_hard_link_to_a_file_outside_is_copied_and_the_file_stays_the_users() {
    let d = Dir::new();
    let notes = d.write("home/notes.txt", "my notes");
    let before = std::fs::metadata(&notes).unwrap();
    d.write(
        "pipelines/p.ron",
        &pipeline(&format!(r#"        "a": (kind: "command", params: {{ "cmd": "ln {} o.txt", "outputs": {{ "o": "o.txt" }} }}),"#, notes.display())),
    );
    d.ok(&["run", "pipelines/p.ron"]);
    let after = std::fs::metadata(&notes).unwrap();
    assert_eq!(after.permissions().mode(), before.permissions().mode(), "mode unchanged");
    assert_eq!(after.nlink(), 1, "no link left in the cache");
    std::fs::write(&notes, "edited later").unwrap();
    assert_eq!(exported(&d, "a.o"), "my notes");
    verify_clean(&d);
}

#[test]
fn symbolic_links_in_outputs_are_resolved_inside_and_refused_outside() {
    let d = Dir::new();
    let outside = d.write("home/secret.txt", "secret");
    d.write(
        "pipelines/p.ron",
        &pipeline(&format!(
            r#"        "file": (kind: "command", params: {{ "cmd": "printf data > real.txt; ln -s real.txt o.txt", "outputs": {{ "o": "o.txt" }} }}),
        "dir": (kind: "command", params: {{ "cmd": "mkdir -p out/sub; printf one > one.txt; ln -s ../../one.txt out/sub/link.txt; printf two > out/two.txt; ln -s two.txt out/also.txt", "outputs": {{ "o": "out" }} }}),
        "pass": (kind: "command", inputs: {{ "x": "file.o" }}, params: {{ "cmd": "ln -s inputs/x/o.txt o.txt", "outputs": {{ "o": "o.txt" }} }}),
        "leak": (kind: "command", params: {{ "cmd": "ln -s {} o.txt", "outputs": {{ "o": "o.txt" }} }}),
        "leak_in_dir": (kind: "command", params: {{ "cmd": "mkdir out; ln -s {} out/s.txt", "outputs": {{ "o": "out" }} }}),"#,
            outside.display(),
            outside.display()
        )),
    );
    let o = d.run(&["run", "pipelines/p.ron", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(with_status(&r, "ran"), ["dir", "file", "pass"]);
    assert_eq!(with_status(&r, "failed"), ["leak", "leak_in_dir"]);
    for s in r["stages"].as_array().unwrap().iter().filter(|s| s["status"] == "failed") {
        let e = s["error"].as_str().unwrap();
        assert!(e.contains("symbolic link") && e.contains("secret.txt") && e.contains("outside"), "{e}");
    }
    assert_eq!(exported(&d, "file.o"), "data");
    assert_eq!(exported(&d, "pass.o"), "data", "an input passed through by a link is copied");
    let dest = d.path().join("exported/dir");
    d.ok(&["export", "dir.o", dest.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(dest.join("sub/link.txt")).unwrap(), "one");
    assert_eq!(std::fs::read_to_string(dest.join("also.txt")).unwrap(), "two");
    assert_eq!(std::fs::read_to_string(dest.join("two.txt")).unwrap(), "two");
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret");
    verify_clean(&d);
}

#[test]
fn a_command_sees_only_its_keyed_environment() {
    let d = Dir::new();
    d.write(
        "pipelines/p.ron",
        &pipeline(
            r#"        "one": (kind: "command", params: { "cmd": "echo stage=$FGFLOW_STAGE home=$HOME user=$USER lang=$LANG > o.txt", "outputs": { "o": "o.txt" } }),
        "two": (kind: "command", params: { "cmd": "echo stage=$FGFLOW_STAGE home=$HOME user=$USER lang=$LANG > o.txt", "outputs": { "o": "o.txt" } }),
        "declared": (kind: "command", params: { "cmd": "echo v=$FGFLOW_TEST_VAR > o.txt", "env": ["FGFLOW_TEST_VAR"], "outputs": { "o": "o.txt" } }),"#,
        ),
    );
    let r = d.json(&["run", "pipelines/p.ron", "--json", "-j", "1"]);
    let key = |n: &str| r["stages"].as_array().unwrap().iter().find(|s| s["name"] == n).unwrap()["key"].clone();
    // Same command, nothing else observable: one result, and it is right for both.
    assert_eq!(key("one"), key("two"));
    assert_eq!(exported(&d, "one.o").trim(), "stage= home= user= lang=");
    assert_eq!(exported(&d, "two.o").trim(), "stage= home= user= lang=");
    // A declared variable is seen and keyed.
    let r2 = d.json(&["run", "pipelines/p.ron", "--json"]);
    assert_eq!(with_status(&r2, "ran"), Vec::<String>::new());
    let r3: serde_json::Value = serde_json::from_slice(&d.cmd(&["run", "pipelines/p.ron", "--json"]).env("FGFLOW_TEST_VAR", "7").output().unwrap().stdout).unwrap();
    assert_eq!(with_status(&r3, "ran"), ["declared"]);
}

#[test]
fn nothing_left_running_by_a_command_writes_to_its_output_after_capture() {
    // The background job holds the output open (fd 3) from before the capture: only
    // killing it stops the late write from reaching the blob the file became.
    let d = Dir::new();
    d.write(
        "pipelines/p.ron",
        &pipeline(r#"        "a": (kind: "command", params: { "cmd": "echo early > o.txt; (exec 3>>o.txt; touch opened; sleep 1; echo late >&3) > /dev/null 2>&1 & while [ ! -e opened ]; do sleep 0.01; done", "outputs": { "o": "o.txt" } }),"#),
    );
    d.ok(&["run", "pipelines/p.ron"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(exported(&d, "a.o").trim(), "early");
    verify_clean(&d);
}

#[test]
fn deps_naming_the_working_directory_itself_are_rejected_at_load() {
    let d = Dir::new();
    d.write("pipelines/p.ron", &pipeline(r#"        "a": (kind: "command", params: { "cmd": "true", "deps": ["."] }),"#));
    let o = d.run(&["status", "pipelines/p.ron"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("deps") && err.contains("p.ron"), "{err}");
}

#[test]
fn interrupting_a_run_stops_the_commands_it_started() {
    let d = Dir::new();
    let pid_file = d.path().join("pid");
    d.write(
        "pipelines/p.ron",
        &pipeline(&format!(r#"        "a": (kind: "command", params: {{ "cmd": "echo $$ > {}; exec sleep 60", "outputs": {{ "o": "o.txt" }} }}),"#, pid_file.display())),
    );
    let mut child = d.cmd(&["run", "pipelines/p.ron"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let pid: i32 = loop {
        if let Some(p) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok()) {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "the command never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // SIGINT, as Ctrl-C sends it to the terminal's foreground group (fgflow's; the
    // command has a group of its own, which the terminal does not reach).
    assert!(std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    child.wait().unwrap();
    let gone = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
    });
    assert!(gone, "the command (pid {pid}) outlived the interrupted run");
    let v = d.run(&["verify"]);
    assert_eq!(v.status.code(), Some(0));
}

