//! A `train` stage pointed at bad pretrained checkpoints, through the binary: each run
//! exits 1 with an error naming the file and what is wrong with it, and leaves the
//! cache as it was (the benchmark's entry, nothing of the failed stage).

use std::path::{Path, PathBuf};

use crate::cli::{walk_files, with_status, Dir};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/tests/fixtures/timm").join(name)
}

/// A benchmark and a Swin-V2 of the fixtures' sizes fine-tuned from `weights` (a path
/// relative to the pipeline file), the fixtures' sizes unless `sizes` replaces them.
fn pipeline(weights: &str, sizes: &str) -> String {
    let sizes = if sizes.is_empty() { r#""swin_embed_dim": 16, "swin_depths": [2, 2]"# } else { sizes };
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/quickdraw");
    format!(
        r#"(
    stages: {{
        "bench": (kind: "quickdraw", params: {{ "root": "{}", "seed": 3, "classes": 4, "train_max": 20, "val_per_class": 2, "testa_per_class": 2, "testb_per_class": 2 }}),
        "ft": (kind: "train", inputs: {{ "train": "bench.train" }}, params: {{
            "backbone": "swinv2", "swin_patch": 2, {sizes}, "swin_heads": [2, 4], "swin_window": [4], "swin_mlp_ratio": 4.0,
            "pretrained": ["{weights}"], "epochs": 1, "batch_size": 16, "keep_checkpoints": 0,
        }}),
    }},
)"#,
        data.display()
    )
}

/// The cache's entries and blobs (a failed stage may leave its log and job record
/// beside them, which `show` prints, but nothing here).
fn cache_files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = walk_files(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .filter(|p| p.starts_with("entries/") || p.starts_with("blobs/"))
        .collect();
    files.sort();
    files
}

#[test]
fn bad_pretrained_checkpoints_exit_1_name_the_problem_and_leave_the_cache_as_it_was() {
    let d = Dir::new();
    // The good checkpoint first: it fine-tunes (4 classes where the file has 5).
    std::fs::copy(fixture("swinv2.safetensors"), d.path().join("pipelines/w.safetensors")).unwrap();
    d.write("pipelines/p.ron", &pipeline("w.safetensors", ""));
    let r = d.json(&["run", "pipelines/p.ron", "--json"]);
    assert_eq!(with_status(&r, "ran"), ["bench", "ft"], "{r}");
    let show = d.ok(&["show", "ft"]);
    assert!(show.contains("77 tensors loaded") && show.contains("unused from the file: head.fc.bias, head.fc.weight"), "{show}");
    let cache = d.path().join(".fgflow");
    let before = cache_files(&cache);
    assert!(!before.is_empty());

    let cut = std::fs::read(fixture("swinv2_mm.pth")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str, Vec<&str>)> = vec![
        // Wrong shapes: the first stage 32 wide where the file's is 16.
        ("wide.safetensors", std::fs::read(fixture("swinv2.safetensors")).unwrap(), r#""swin_embed_dim": 32, "swin_depths": [2, 2]"#, vec!["patch_embed.proj.weight", "[16, 3, 2, 2]", "[32, 3, 2, 2]"]),
        // Missing tensors: a third block in the second stage, which the file lacks.
        ("deep.safetensors", std::fs::read(fixture("swinv2.safetensors")).unwrap(), r#""swin_embed_dim": 16, "swin_depths": [2, 3]"#, vec!["missing from the file", "`layers.1.blocks.2."]),
        ("text.safetensors", b"not weights at all".to_vec(), "", vec!["not a safetensors file"]),
        ("cut.pth", cut[..cut.len() / 2].to_vec(), "", vec!["not a readable PyTorch checkpoint"]),
        ("legacy.pth", std::fs::read(fixture("swinv2_mm_legacy.pth")).unwrap(), "", vec!["legacy format"]),
    ];
    for (name, bytes, sizes, wanted) in cases {
        std::fs::write(d.path().join("pipelines").join(name), bytes).unwrap();
        d.write("pipelines/p.ron", &pipeline(name, sizes));
        let o = d.run(&["run", "pipelines/p.ron"]);
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.status.code(), Some(1), "{name}: {text}");
        assert!(text.contains("FAILED   ft") && text.contains(name), "{name}: {text}");
        for w in wanted {
            assert!(text.contains(w), "{name}: `{w}` not in\n{text}");
        }
        assert_eq!(cache_files(&cache), before, "{name}: the cache changed");
    }
}
