//! `fgflow report` / `run --report` (a self-contained page built from the cache alone)
//! and `fgflow compare` (cached runs side by side), on a recipe small enough to train
//! in about a second: 8 classes, a CNN of widths [4, 8], a few epochs.

use std::path::Path;

use crate::cli::Dir;

/// Every kind with a section of its own: benchmark, MAE, cleaning, training, soup,
/// predictions, evaluation (on labels and on the hidden truth), ensemble, pseudo-labels,
/// an ablation report.
fn tiny_recipe(root: &str, lr: &str) -> String {
    format!(
        r#"(
  stages: {{
    "bench": (kind: "quickdraw", params: {{ "root": "{root}", "seed": 7, "classes": 8, "val_per_class": 3, "testa_per_class": 3, "testb_per_class": 3, "train_max": 12 }}),
    "mae": (kind: "pretrain", inputs: {{ "labelled": ["bench.train"] }}, params: {{ "vit_patch": 7, "vit_dim": 16, "vit_depth": 1, "vit_heads": 2, "decoder_dim": 16, "decoder_heads": 2, "epochs": 2, "seed": 2 }}),
    "clean": (kind: "clean", inputs: {{ "train": "bench.train", "truth": "bench.truth" }}, params: {{ "folds": 2, "cnn_widths": [4, 8], "cnn_blocks": 1, "epochs": 1, "min_label_prob": 0.12, "max_other_prob": 0.5, "seed": 1 }}),
    "net": (kind: "train", inputs: {{ "train": "clean.train", "val": "bench.val" }}, params: {{ "cnn_widths": [4, 8], "cnn_blocks": 1, "epochs": 3, "batch_size": 16, "lr": {lr}, "keep_checkpoints": 2, "seed": 1 }}),
    "soup": (kind: "soup", inputs: {{ "checkpoints": "net.checkpoints", "val": "bench.val" }}),
    "pv": (kind: "predict", inputs: {{ "model": "soup.model", "labelled": "bench.val" }}),
    "ev": (kind: "evaluate", inputs: {{ "predictions": "pv.predictions", "labels": "bench.val" }}),
    "pa": (kind: "predict", inputs: {{ "model": "soup.model", "images": "bench.testa" }}),
    "pa2": (kind: "predict", inputs: {{ "model": "net.model", "images": "bench.testa" }}),
    "ens": (kind: "ensemble", inputs: {{ "predictions": ["pa.predictions", "pa2.predictions"] }}, params: {{ "f": 0.0 }}),
    "pl": (kind: "pseudo_label", inputs: {{ "predictions": "ens.predictions", "images": "bench.testa", "train": "clean.train", "truth": "bench.truth" }}, params: {{ "threshold": 0.05, "split": "testa" }}),
    "e_a": (kind: "evaluate", inputs: {{ "predictions": "pa.predictions", "truth": "bench.truth", "train": "bench.train" }}),
    "e_ens": (kind: "evaluate", inputs: {{ "predictions": "ens.predictions", "truth": "bench.truth", "train": "bench.train" }}),
    "ablation": (kind: "report", params: {{ "title": "Tiny ablation", "rows": ["soup", "ensemble"] }}, inputs: {{ "metrics": ["e_a.metrics", "e_ens.metrics"] }}),
  }},
)"#
    )
}

/// A private copy of the benchmark's drawings, so a test can take them away.
fn copy_quickdraw(d: &Dir) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/quickdraw");
    let dst = d.path().join("qd");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["quickdraw.png", "classes.txt"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    "../qd".to_string()
}

/// What makes a page self-contained: no URL with a scheme anywhere, no script, every
/// `src` a `data:` URI, every `href` an anchor on the page or a file written beside it.
fn assert_self_contained(html: &str, dir: &Path) {
    let lower = html.to_ascii_lowercase();
    assert!(!lower.contains("http:") && !lower.contains("https:") && !lower.contains("http"), "a URL in the page");
    assert!(!lower.contains("<script"), "a script in the page");
    assert!(!lower.contains("<link") && !lower.contains("@import") && !lower.contains("url(http"), "an external style");
    for (attr, rest) in [("src=\"", lower.split("src=\"").skip(1)), ("href=\"", lower.split("href=\"").skip(1))] {
        for r in rest {
            let value = &r[..r.find('"').unwrap()];
            match attr {
                "src=\"" => assert!(value.starts_with("data:image/png;base64,"), "src {value}"),
                _ => {
                    if let Some(id) = value.strip_prefix('#') {
                        assert!(html.contains(&format!("id=\"{id}\"")), "a link to #{id}, which is not on the page");
                    } else {
                        assert!(!value.contains(':') && !value.contains('/') && dir.join(value).is_file(), "href {value}: not a file beside the page");
                    }
                }
            }
        }
    }
}

#[test]
fn run_report_writes_a_self_contained_page_with_every_section_and_its_data() {
    let d = Dir::new();
    let root = copy_quickdraw(&d);
    let file = d.write("pipelines/tiny.ron", &tiny_recipe(&root, "0.01"));
    let out = d.ok(&["run", file.to_str().unwrap(), "-q", "--report", "rep"]);
    assert!(out.contains("report: rep/index.html"), "{out}");
    let html = std::fs::read_to_string(d.path().join("rep/index.html")).unwrap();
    assert_self_contained(&html, &d.path().join("rep"));
    for id in ["dag", "data", "training", "evaluation", "reports"] {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "no section {id}");
    }
    // The DAG links each stage to its section, with its status.
    for stage in ["bench", "mae", "clean", "net", "soup", "ev", "ens", "pl", "e_a", "ablation"] {
        assert!(html.contains(&format!("<b>{stage}</b>")), "no section for {stage}");
    }
    assert!(html.matches("class=\"badge st-ran\"").count() >= 14, "every stage ran");
    // Real charts, with axes and labels, for each kind.
    for title in [
        "images per class (sorted, log scale)",
        "Per class, kept and dropped",
        "Pseudo-labels added per class",
        "Training loss per epoch",
        "Accuracy per epoch",
        "Learning rate",
        "Reconstruction loss",
        "Per-class accuracy",
        "Confusions",
        "Share of each model in the ensemble",
        "Top-1 change against the first row",
        "Validation accuracy of each checkpoint",
    ] {
        assert!(html.contains(title), "no chart `{title}`");
    }
    assert!(html.contains("class=\"ax\"") && html.contains("class=\"tk\"") && html.contains("class=\"al\""), "axes, ticks and labels");
    assert!(html.contains("Dropped images") && html.contains("Images added this round") && html.contains("data:image/png;base64,"), "thumbnails");
    assert!(html.contains("Most confused class pairs"));
    // The data beside it.
    let data: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("rep/data.json")).unwrap()).unwrap();
    assert_eq!(data["stages"].as_array().unwrap().len(), 14);
    let net = data["stages"].as_array().unwrap().iter().find(|s| s["name"] == "net").unwrap();
    assert_eq!(net["data"]["epochs"].as_array().unwrap().len(), 3, "{net}");
    let epochs = std::fs::read_to_string(d.path().join("rep/epochs.csv")).unwrap();
    assert!(epochs.starts_with("stage,epoch,loss,train_acc,val_acc,lr\n") && epochs.lines().filter(|l| l.starts_with("net,")).count() == 3, "{epochs}");
    let tables = std::fs::read_to_string(d.path().join("rep/tables.csv")).unwrap();
    assert_eq!(tables.lines().filter(|l| l.starts_with("ablation,")).count(), 2, "{tables}");
    for f in ["stages.csv", "metrics.csv", "per_class.csv"] {
        assert!(std::fs::read_to_string(d.path().join("rep").join(f)).unwrap().lines().count() > 1, "{f} is empty");
    }
}

#[test]
fn report_reads_the_cache_only_and_never_needs_the_data_or_runs_a_stage() {
    let d = Dir::new();
    let root = copy_quickdraw(&d);
    let file = d.write("pipelines/tiny.ron", &tiny_recipe(&root, "0.01"));
    d.ok(&["run", file.to_str().unwrap(), "-q"]);
    let entries = d.ok(&["ls"]);
    // Without the data folder the pipeline could not run; its report still builds.
    std::fs::rename(d.path().join("qd"), d.path().join("qd-gone")).unwrap();
    let out = d.ok(&["report", file.to_str().unwrap(), "-o", "page"]);
    assert!(out.trim_end().ends_with("page/index.html"), "{out}");
    assert_eq!(d.ok(&["ls"]), entries, "the report ran or changed nothing");
    let html = std::fs::read_to_string(d.path().join("page/index.html")).unwrap();
    assert_self_contained(&html, &d.path().join("page"));
    assert!(html.matches("class=\"badge st-cached\"").count() >= 14 && !html.contains("class=\"badge st-ran\""), "statuses of the last run from the cache");
    assert!(html.contains("Training loss per epoch") && html.contains("Tiny ablation"));
    // `report` defaults to the pipeline last run.
    assert!(d.ok(&["report", "-o", "again"]).contains("again/index.html"));
}

#[test]
fn report_of_a_pipeline_never_run_or_of_a_thousand_stages_stays_light() {
    let d = Dir::new();
    let mut stages = String::new();
    for i in 0..1000 {
        let input = if i == 0 { String::new() } else { format!(r#"inputs: {{ "x": "s{}.o" }}, "#, i - 1) };
        stages.push_str(&format!(r#"    "s{i}": (kind: "command", {input}params: {{ "cmd": "echo {i} > o.txt", "outputs": {{ "o": "o.txt" }} }}),"#));
        stages.push('\n');
    }
    let file = d.write("pipelines/big.ron", &format!("(\n  stages: {{\n{stages}  }},\n)\n"));
    let started = std::time::Instant::now();
    d.ok(&["report", file.to_str().unwrap(), "-o", "big"]);
    assert!(started.elapsed().as_secs() < 20, "took {:?}", started.elapsed());
    let html = std::fs::read_to_string(d.path().join("big/index.html")).unwrap();
    assert_self_contained(&html, &d.path().join("big"));
    assert!(html.contains("1000 stages: the graph is listed, not drawn"), "too many stages to draw");
    assert_eq!(html.matches("<details class=\"stage\"").count(), 1000);
    assert!(!html.contains("class=\"stage\" id=\"stage-999-s999\" open"), "sections start collapsed");
    assert_eq!(html.matches("class=\"badge st-not-run\"").count(), 2001, "the header, 1000 rows of the table, 1000 sections");
    assert!(html.len() < 3_000_000, "{} bytes", html.len());
}

#[test]
fn compare_shows_the_changed_parameter_and_both_results_after_an_edit() {
    let d = Dir::new();
    // Two rates whose tiny models differ in their test-A metrics (equal metrics would
    // give the report one key, rightly, and one run to compare).
    let root = copy_quickdraw(&d);
    let file = d.write("pipelines/tiny.ron", &tiny_recipe(&root, "0.003"));
    let f = file.to_str().unwrap();
    d.ok(&["run", f, "-q"]);
    d.write("pipelines/tiny.ron", &tiny_recipe(&root, "0.01"));
    d.ok(&["run", f, "-q"]);
    let j = d.json(&["compare", f, "--stage", "e_a", "--stage", "net", "--json"]);
    let groups = j["stages"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{j}");
    for g in groups {
        let mut runs = g["runs"].as_array().unwrap().clone();
        // Both runs may fall in the same second: order them by the edit.
        runs.sort_by_key(|r| r["params"]["net.lr"].as_str().unwrap_or("").to_string());
        assert_eq!(runs.len(), 2, "both runs of {}: {j}", g["stage"]);
        assert_eq!(g["changed"], serde_json::json!(["net.lr"]), "only the edited parameter: {j}");
        assert_eq!(runs[0]["params"]["net.lr"], "0.003");
        assert_eq!(runs[1]["params"]["net.lr"], "0.01");
        assert_eq!(runs[0]["last_run_of"].as_array().unwrap().len(), 0);
        assert_eq!(runs[1]["last_run_of"][0], f);
        let metric = if g["stage"] == "net" { "loss" } else { "top1" };
        assert!(runs.iter().all(|r| r["metrics"][metric].is_number()), "{metric} of both runs: {j}");
    }
    // Nothing ran: compare reads the cache.
    let entries = d.ok(&["ls"]);
    let text = d.ok(&["compare", f]);
    assert_eq!(d.ok(&["ls"]), entries);
    assert!(text.contains("net (train): 2 runs, 1 parameter(s) differ") && text.contains("net.lr"), "{text}");
    let md = d.ok(&["compare", f, "-s", "ablation", "--md"]);
    assert!(md.contains("### ablation (report)") && md.contains("| net.lr |") && md.contains("top1 soup"), "{md}");
    let csv = d.ok(&["compare", f, "-s", "net", "--csv"]);
    assert!(csv.starts_with("stage,kind,key,created_unix,last_run_of,net.lr,loss,train_acc,val_acc\n") && csv.lines().count() == 3, "{csv}");
}

#[test]
fn report_and_compare_usage_errors_exit_2() {
    let d = Dir::new();
    let o = d.run(&["report", "-o", "x"]);
    assert_eq!(o.status.code(), Some(2), "no pipeline given, none run");
    let file = d.write("pipelines/one.ron", r#"(stages: { "a": (kind: "command", params: { "cmd": "echo 1 > a.txt", "outputs": { "a": "a.txt" } }) })"#);
    let o = d.run(&["compare", file.to_str().unwrap(), "--stage", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no stage `nope`"));
    assert!(d.ok(&["compare", file.to_str().unwrap(), "--all"]).contains("no cached run"));
}
