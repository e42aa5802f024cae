//! The benchmark's ceiling (issue 10): `quickdraw`'s `oracle` output holds the training
//! images with their true labels, open-set images removed; its type fits no port of the
//! recipe (a load error, exit 2), `train` takes it only on its own `oracle` input
//! (exactly one of `train` and `oracle`), and everything trained on it carries the
//! oracle mark, which the recipe's kinds refuse and `report` shows as "(oracle)".
//! Tiny benchmark (4 classes) and a CNN of widths [4, 8] trained for one epoch.

use std::path::Path;

use fgflow_stages::artifact::{self, Noise};

use crate::cli::{Dir, with_status};

fn bench() -> String {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/quickdraw");
    format!(
        r#""bench": (kind: "quickdraw", params: {{ "root": "{}", "seed": 3, "classes": 4, "train_max": 20, "val_per_class": 2, "testa_per_class": 2, "testb_per_class": 2, "open_set": 0.2 }}),"#,
        data.display()
    )
}

const NET: &str = r#""cnn_widths": [4, 8], "cnn_blocks": 1, "epochs": 1, "batch_size": 8, "keep_checkpoints": 1"#;

fn pipeline(stages: &str) -> String {
    format!("(\n  stages: {{\n    {}\n{stages}\n  }},\n)\n", bench())
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the benchmark and `stages`, where some stage fails: the `run --json` report.
fn run_failing(d: &Dir, stages: &str) -> serde_json::Value {
    d.write("pipelines/p.ron", &pipeline(stages));
    let o = d.run(&["run", "pipelines/p.ron", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn oracle_set_has_the_true_labels_and_no_open_set_image() {
    let d = Dir::new();
    d.write("pipelines/p.ron", &pipeline(""));
    d.ok(&["run", "pipelines/p.ron", "-q"]);
    for out in ["train", "oracle", "truth"] {
        d.ok(&["export", &format!("bench.{out}"), &format!("x/{out}")]);
    }
    let x = d.path().join("x");
    let train = artifact::read_labelled_set(&x.join("train")).unwrap();
    let truth = artifact::read_ground_truth(&x.join("truth")).unwrap();
    let oracle = artifact::read_oracle_set(&x.join("oracle")).unwrap();
    assert!(artifact::is_oracle(&x.join("oracle")) && !artifact::is_oracle(&x.join("train")));
    let kept: Vec<usize> = (0..train.images.n()).filter(|&i| truth.train_noise[i] != Noise::OpenSet).collect();
    assert!(kept.len() < train.images.n(), "the benchmark has open-set images");
    assert_eq!(oracle.images.n(), kept.len());
    assert_eq!(oracle.images.classes, train.images.classes);
    for (j, &i) in kept.iter().enumerate() {
        assert_eq!(oracle.images.ids[j], train.images.ids[i]);
        assert_eq!(oracle.images.image(j), train.images.image(i));
        assert_eq!(Some(oracle.labels[j]), truth.train_clean_labels[i], "image {}", oracle.images.ids[j]);
    }
    let noisy = kept.iter().filter(|&&i| truth.train_noise[i] != Noise::Clean).count();
    assert!(noisy > 0 && kept.iter().zip(&oracle.labels).any(|(&i, &l)| train.labels[i] != l), "some given labels were wrong");
    let show = d.ok(&["show", "bench"]);
    assert!(show.contains("oracle"), "{show}");
}

#[test]
fn oracle_set_cannot_be_wired_into_the_recipe() {
    let d = Dir::new();
    let cases = [
        ("clean", r#""clean": (kind: "clean", inputs: { "train": "bench.oracle" }),"#, "train"),
        ("pl", r#""pl": (kind: "pseudo_label", inputs: { "predictions": "p.predictions", "images": "bench.testa", "train": "bench.oracle" }),"#, "train"),
        ("p", r#""p": (kind: "predict", inputs: { "model": "m.model", "labelled": "bench.oracle" }),"#, "labelled"),
        ("t", r#""t": (kind: "train", inputs: { "train": "bench.oracle" }),"#, "train"),
        ("mae", r#""mae": (kind: "pretrain", inputs: { "labelled": ["bench.oracle"] }),"#, "labelled"),
        ("e", r#""e": (kind: "evaluate", inputs: { "predictions": "p.predictions", "labels": "bench.oracle" }),"#, "labels"),
    ];
    for (stage, decl, port) in cases {
        // The others the case refers to, wired correctly.
        let rest = r#""m": (kind: "train", inputs: { "train": "bench.train" }), "p": (kind: "predict", inputs: { "model": "m.model", "images": "bench.testa" }),"#;
        let rest = if stage == "p" { r#""m": (kind: "train", inputs: { "train": "bench.train" }),"# } else { rest };
        let file = d.write(&format!("pipelines/{stage}.ron"), &pipeline(&format!("    {rest}\n    {decl}")));
        for verb in ["status", "run"] {
            let o = d.run(&[verb, file.to_str().unwrap()]);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{verb} {stage}: {err}");
            let want = format!("stage `{stage}`: input `{port}` expects");
            assert!(err.contains(&want) && err.contains("oracle_set"), "{verb} {stage}: wanted `{want}`:\n{err}");
        }
    }
    assert!(!d.path().join(".fgflow").exists(), "an invalid pipeline touches no cache");
}

#[test]
fn train_takes_exactly_one_of_train_and_oracle() {
    let d = Dir::new();
    let r = run_failing(
        &d,
        &format!(
            r#"    "both": (kind: "train", inputs: {{ "train": "bench.train", "oracle": "bench.oracle" }}, params: {{ {NET} }}),
    "neither": (kind: "train", inputs: {{ "val": "bench.val" }}, params: {{ {NET} }}),"#
        ),
    );
    assert_eq!(with_status(&r, "failed"), ["both", "neither"]);
    let error = |name: &str| r["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["error"].as_str().unwrap().to_string();
    let both = error("both");
    assert!(both.contains("input `oracle`") && both.contains("both `train` and `oracle`"), "{both}");
    let neither = error("neither");
    assert!(neither.contains("input `train`") && neither.contains("neither `train` nor `oracle`"), "{neither}");
    // The console names the stage with the field.
    let o = d.run(&["run", "pipelines/p.ron"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let line = |stage: &str| out.lines().find(|l| l.contains("FAILED") && l.contains(stage)).unwrap_or_default().to_string();
    assert!(line("both").contains("input `oracle`"), "{out}");
    assert!(line("neither").contains("input `train`"), "{out}");
}

#[test]
fn what_is_trained_on_the_oracle_is_marked_and_the_recipe_refuses_it() {
    let d = Dir::new();
    let r = run_failing(
        &d,
        &format!(
            r#"    "o": (kind: "train", inputs: {{ "oracle": "bench.oracle", "val": "bench.val" }}, params: {{ {NET} }}),
    "po": (kind: "predict", inputs: {{ "model": "o.model", "images": "bench.testb" }}, params: {{ "flip_tta": true }}),
    "eo": (kind: "evaluate", inputs: {{ "predictions": "po.predictions", "truth": "bench.truth", "train": "bench.train" }}, params: {{ "split": "testb" }}),
    "n": (kind: "train", inputs: {{ "train": "bench.train" }}, params: {{ {NET} }}),
    "pn": (kind: "predict", inputs: {{ "model": "n.model", "images": "bench.testb" }}),
    "en": (kind: "evaluate", inputs: {{ "predictions": "pn.predictions", "truth": "bench.truth", "train": "bench.train" }}, params: {{ "split": "testb" }}),
    "table": (kind: "report", params: {{ "rows": ["noisy labels", "ceiling"] }}, inputs: {{ "metrics": ["en.metrics", "eo.metrics"] }}),
    "soup": (kind: "soup", inputs: {{ "checkpoints": "o.checkpoints" }}),
    "ens": (kind: "ensemble", inputs: {{ "predictions": ["pn.predictions", "po.predictions"] }}, params: {{ "f": 0.0 }}),
    "pl": (kind: "pseudo_label", inputs: {{ "predictions": "po.predictions", "images": "bench.testb", "train": "bench.train" }}),
    "rd": (kind: "redistribute", inputs: {{ "predictions": "po.predictions" }}),
    "ft": (kind: "train", inputs: {{ "train": "bench.train", "init": "o.model" }}, params: {{ {NET} }}),
    "cl": (kind: "clean", inputs: {{ "train": "bench.train", "init": "o.model" }}, params: {{ "cnn_widths": [4, 8], "cnn_blocks": 1, "epochs": 1 }}),"#
        ),
    );
    assert_eq!(with_status(&r, "failed"), ["cl", "ens", "ft", "pl", "rd", "soup"]);
    for s in r["stages"].as_array().unwrap().iter().filter(|s| s["status"] == "failed") {
        let e = s["error"].as_str().unwrap();
        assert!(e.contains("oracle.json") && e.contains("true labels") && e.contains("input `"), "{}: {e}", s["name"]);
    }
    assert_eq!(with_status(&r, "ran"), ["bench", "en", "eo", "n", "o", "pn", "po", "table"]);
    for (what, marked) in [("o.model", true), ("o.checkpoints", true), ("po.predictions", true), ("eo.metrics", true), ("n.model", false), ("pn.predictions", false), ("en.metrics", false)] {
        let dest = d.path().join("x").join(what);
        d.ok(&["export", what, dest.to_str().unwrap()]);
        assert_eq!(artifact::is_oracle(&dest), marked, "{what}");
    }
    let table = d.ok(&["show", "table"]);
    assert!(table.contains("| ceiling (oracle) |") && table.contains("| noisy labels |"), "{table}");
    let model = d.ok(&["show", "o"]);
    assert!(model.contains("ORACLE"), "{model}");
}
