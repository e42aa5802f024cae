//! Reports over benchmark seeds: a row measured on each of two benchmark draws gives
//! means, spreads and how many seeds agree with each change; metrics listed in the
//! wrong order (seed by seed instead of row by row) or two "seeds" that are one draw
//! fail the report instead of averaging the wrong numbers; one seed is a load error.
//! Tiny benchmarks (4 classes) and CNNs of widths [4, 8] trained for one epoch.

use std::path::Path;

use crate::cli::Dir;

fn pipeline(report: &str) -> String {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/quickdraw");
    let bench = |name: &str, seed: u32| {
        format!(
            r#""{name}": (kind: "quickdraw", params: {{ "root": "{}", "seed": {seed}, "classes": 4, "train_max": 20, "val_per_class": 2, "testa_per_class": 2, "testb_per_class": 2 }}),"#,
            data.display()
        )
    };
    format!(
        r#"(
  stages: {{
    {}
    {}
    "t": (foreach: ["s1", "s2"], kind: "train", inputs: {{ "train": "b_{{item}}.train" }}, params: {{ "cnn_widths": [4, 8], "cnn_blocks": 1, "epochs": 1, "batch_size": 8, "keep_checkpoints": 1 }}),
    "p": (foreach: ["s1", "s2"], kind: "predict", inputs: {{ "model": "t@{{item}}.model", "images": "b_{{item}}.testb" }}, params: {{ "flip_tta": false }}),
    "pf": (foreach: ["s1", "s2"], kind: "predict", inputs: {{ "model": "t@{{item}}.model", "images": "b_{{item}}.testb" }}, params: {{ "flip_tta": true }}),
    "e": (foreach: ["s1", "s2"], kind: "evaluate", inputs: {{ "predictions": "p@{{item}}.predictions", "truth": "b_{{item}}.truth" }}, params: {{ "split": "testb" }}),
    "ef": (foreach: ["s1", "s2"], kind: "evaluate", inputs: {{ "predictions": "pf@{{item}}.predictions", "truth": "b_{{item}}.truth" }}, params: {{ "split": "testb" }}),
    {report}
  }},
)
"#,
        bench("b_s1", 1),
        bench("b_s2", 2)
    )
}

fn report(seeds: &str, metrics: &str) -> String {
    format!(r#""r": (kind: "report", params: {{ "title": "T", "seeds": {seeds}, "rows": ["plain", "+ flip TTA"] }}, inputs: {{ "metrics": {metrics} }}),"#)
}

#[test]
fn a_report_over_seeds_gives_means_and_refuses_inputs_in_the_wrong_order() {
    let d = Dir::new();
    let good = report(r#"["1", "2"]"#, r#"["e@s1.metrics", "e@s2.metrics", "ef@s1.metrics", "ef@s2.metrics"]"#);
    d.write("pipelines/p.ron", &pipeline(&good));
    d.ok(&["run", "pipelines/p.ron", "-q"]);
    let shown = d.ok(&["show", "r"]);
    assert!(shown.contains("| seed 1 % | seed 2 % |") && shown.contains("of 2)"), "{shown}");
    d.ok(&["export", "r.report", "x"]);
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(d.path().join("x/table.json")).unwrap()).unwrap();
    assert_eq!(t["seeds"], serde_json::json!(["1", "2"]));
    for row in t["rows"].as_array().unwrap() {
        let per: Vec<f64> = row["per_seed"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(per.len(), 2);
        let mean = row["top1"].as_f64().unwrap();
        assert!((mean - (per[0] + per[1]) / 2.0).abs() < 1e-12, "{row}");
    }

    // Seed by seed instead of row by row: row 1 would average two rows of seed 1.
    let wrong = report(r#"["1", "2"]"#, r#"["e@s1.metrics", "ef@s1.metrics", "e@s2.metrics", "ef@s2.metrics"]"#);
    d.write("pipelines/p.ron", &pipeline(&wrong));
    let o = d.run(&["run", "pipelines/p.ron"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // Caught by the column check (seed 1's column mixes draws) or the row check.
    assert!(err.contains("true labels") && err.contains("row by row"), "{err}");

    // Two "seeds" that are one draw: each column is consistent, each row is not two draws.
    let same = report(r#"["1", "2"]"#, r#"["e@s1.metrics", "e@s1.metrics", "ef@s1.metrics", "ef@s1.metrics"]"#);
    d.write("pipelines/p.ron", &pipeline(&same));
    let o = d.run(&["run", "pipelines/p.ron"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("seeds 1 and 2 were scored against the same true labels"), "{err}");

    // Too few inputs for rows x seeds.
    let short = report(r#"["1", "2"]"#, r#"["e@s1.metrics", "e@s2.metrics", "ef@s1.metrics"]"#);
    d.write("pipelines/p.ron", &pipeline(&short));
    let o = d.run(&["run", "pipelines/p.ron"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("2 labels x 2 seeds = 4 metrics inputs expected, 3 connected"), "{err}");
}

#[test]
fn one_seed_or_a_repeated_seed_is_a_load_error() {
    let d = Dir::new();
    for (seeds, msg) in [(r#"["1"]"#, "one seed is no spread"), (r#"["1", "1"]"#, "seed `1` appears twice")] {
        d.write("pipelines/p.ron", &pipeline(&report(seeds, r#"["e@s1.metrics", "ef@s1.metrics"]"#)));
        let o = d.run(&["status", "pipelines/p.ron"]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(msg) && err.contains("seeds"), "{err}");
    }
}
