//! The data kinds run end to end through their `StageKind` interface: the benchmark's
//! statistics against its parameters, byte-identical rebuilds, and importing a tiny
//! folder of PNGs written here, good and bad.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fgflow_engine::{Params, StageError};
use fgflow_stages::artifact::{self, Band, Noise};
use fgflow_stages::data::benchmark::long_tail_counts;

use crate::support;
use support::{describe, files};

fn run(kind: &str, params: Params, root: &Path, out: &Path) -> Result<String, StageError> {
    support::run_kind(kind, params, &[], &[("root", root)], out)
}

fn quickdraw_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/quickdraw")
}


fn bench(seed: i64, extra: Params) -> (tempfile::TempDir, f64) {
    let out = tempfile::tempdir().unwrap();
    let mut p = Params::default().with("seed", seed);
    for (k, v) in extra.0 {
        p = p.with(&k, v);
    }
    let t = Instant::now();
    run("quickdraw", p, &quickdraw_root(), out.path()).unwrap();
    (out, t.elapsed().as_secs_f64())
}

#[test]
fn benchmark_statistics_match_parameters() {
    let (out, secs) = bench(7, Params::default());
    let dir = out.path();
    let train = artifact::read_labelled_set(&dir.join("train")).unwrap();
    let val = artifact::read_labelled_set(&dir.join("val")).unwrap();
    let testa = artifact::read_image_set(&dir.join("testa")).unwrap();
    let testb = artifact::read_image_set(&dir.join("testb")).unwrap();
    let truth = artifact::read_ground_truth(&dir.join("truth")).unwrap();
    let c = 300;
    assert_eq!(train.n_classes(), c);
    assert_eq!(truth.open_set_classes.len(), 45);
    assert!(truth.open_set_classes.iter().all(|o| !truth.classes.contains(o)));
    assert_eq!((train.images.native_size(), train.images.channels()), (Some((28, 28)), 1));

    // Long tail: clean per-class counts are exactly the formula, 60 down to 6.
    let clean: Vec<u32> = truth.train_clean_labels.iter().flatten().copied().collect();
    let mut counts = artifact::class_counts(&clean, c);
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let want = long_tail_counts(60, c, 10.0);
    assert_eq!(counts, want);
    assert_eq!((want[0], want[c - 1]), (60, 6));
    let n_in: usize = want.iter().sum();
    assert_eq!(clean.len(), n_in);

    // Noise: exact counts, each flag consistent with the labels.
    let count = |k: Noise| truth.train_noise.iter().filter(|&&x| x == k).count();
    let n_noisy = (0.2 * n_in as f64).round() as usize;
    assert_eq!(count(Noise::NearClass), (0.5 * n_noisy as f64).round() as usize);
    assert_eq!(count(Noise::Uniform) + count(Noise::NearClass), n_noisy);
    let n_open = count(Noise::OpenSet);
    assert_eq!(n_open, (0.1 * n_in as f64 / 0.9).round() as usize);
    assert_eq!(train.images.n(), n_in + n_open);
    let open_rate = n_open as f64 / train.images.n() as f64;
    assert!((open_rate - 0.1).abs() < 0.001, "open-set rate {open_rate}");
    for (i, noise) in truth.train_noise.iter().enumerate() {
        let (given, truth_label) = (train.labels[i], truth.train_clean_labels[i]);
        match noise {
            Noise::Clean => assert_eq!(Some(given), truth_label),
            Noise::Uniform => assert_ne!(Some(given), truth_label),
            Noise::NearClass => assert_eq!(given, truth.near_class[truth_label.unwrap() as usize]),
            Noise::OpenSet => assert!(truth_label.is_none()),
        }
    }
    assert!(truth.near_class.iter().enumerate().all(|(c, &n)| n as usize != c));

    // Validation and test sets: balanced, the asked sizes, no image in two sets.
    assert!(artifact::class_counts(&val.labels, c).iter().all(|&n| n == 10));
    assert!(artifact::class_counts(&truth.testa_labels, c).iter().all(|&n| n == 15));
    assert!(artifact::class_counts(&truth.testb_labels, c).iter().all(|&n| n == 15));
    assert_eq!((testa.n(), testb.n()), (4500, 4500));
    let mut seen = BTreeSet::new();
    for s in truth.train_sources.iter().chain(&truth.val_sources).chain(&truth.testa_sources).chain(&truth.testb_sources) {
        assert!(seen.insert(s.clone()), "{s} in two sets");
    }
    // Ids give nothing away.
    assert!(train.images.ids.iter().all(|id| id.starts_with("train/")));
    assert!(testa.ids.iter().all(|id| id.starts_with("testa/")));

    // Bands by given-label counts: 100 classes each.
    let bands = artifact::head_middle_tail(&artifact::class_counts(&train.labels, c));
    for b in Band::ALL {
        assert_eq!(bands.iter().filter(|&&x| x == b).count(), 100);
    }

    let wrong = train.images.n() - count(Noise::Clean);
    eprintln!(
        "benchmark (seed 7): built in {secs:.2}s; train {} = {n_in} in-vocabulary + {n_open} open-set; \
         uniform {} near {} open {}; wrong labels {wrong} ({:.1}%); val {}; test A {}; test B {}",
        train.images.n(),
        count(Noise::Uniform),
        count(Noise::NearClass),
        n_open,
        100.0 * wrong as f64 / train.images.n() as f64,
        val.images.n(),
        testa.n(),
        testb.n()
    );

    let shown = describe("quickdraw", "truth", &dir.join("truth"));
    assert!(shown.contains("open_set") && shown.contains("head"), "{shown}");
    eprintln!("{shown}");
    let shown = describe("quickdraw", "train", &dir.join("train"));
    assert!(shown.contains("tail"), "{shown}");
    eprintln!("{shown}");
}

#[test]
fn benchmark_rebuild_is_byte_identical() {
    let (a, _) = bench(11, Params::default());
    let (b, _) = bench(11, Params::default());
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    // Five sets of five files (rows, classes, and the store's json, index and shard), the
    // ground truth's two, and the oracle set's mark.
    assert_eq!(fa.len(), 28, "{:?}", fa.keys());
    for (name, bytes) in &fa {
        assert!(bytes == &fb[name], "{name} differs between two builds");
    }
    let (c, _) = bench(12, Params::default());
    assert_ne!(fa["train/store/shard-00000.bin"], files(c.path())["train/store/shard-00000.bin"]);
    // Every split is rows over one store: the same shard in every set.
    for set in ["val", "testa", "testb", "oracle"] {
        assert!(fa[&format!("{set}/store/shard-00000.bin")] == fa["train/store/shard-00000.bin"], "{set} has another store");
    }
}

#[test]
fn noise_parameters_do_not_move_evaluation_images() {
    let (a, _) = bench(5, Params::default());
    let (b, _) = bench(5, Params::default().with("noise", 0.4).with("open_set", 0.2).with("imbalance", 20.0));
    // The store holds the training images too, so it changes; the evaluation sets' rows
    // name the same images, pixel for pixel.
    for name in ["val", "testa", "testb"] {
        let (x, y) = (artifact::read_image_set(&a.path().join(name)).unwrap(), artifact::read_image_set(&b.path().join(name)).unwrap());
        assert_eq!(x.ids, y.ids, "{name}");
        for i in 0..x.n() {
            assert!(x.image(i).unwrap() == y.image(i).unwrap(), "{name} image {i} changed with the noise parameters");
        }
    }
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_ne!(fa["train/rows.safetensors"], fb["train/rows.safetensors"]);
}

#[test]
fn benchmark_rejects_impossible_configs() {
    let out = tempfile::tempdir().unwrap();
    let err = run("quickdraw", Params::default().with("seed", 1).with("noise", 1.5), &quickdraw_root(), out.path()).unwrap_err();
    assert!(err.to_string().contains("noise"), "{err}");
    let err = run("quickdraw", Params::default().with("seed", 1).with("train_max", 80), &quickdraw_root(), out.path()).unwrap_err();
    assert!(err.to_string().contains("drawings per class"), "{err}");
}

// ---------------------------------------------------------------------------------
// Import.

fn png(path: &Path, w: u32, h: u32, shade: u8) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([shade, (x * 10) as u8, (y * 10) as u8]));
    img.save(path).unwrap();
}

fn gray_png(path: &Path, w: u32, h: u32, shade: u8) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_pixel(w, h, image::Luma([shade])).save(path).unwrap();
}

/// train/cat: 3 images, train/dog: 2 (one of them grayscale, one not square),
/// testa: 2, testb: 1, plus a stray text file.
fn tiny_folder() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    for i in 0..3 {
        png(&r.join(format!("train/cat/{i}.png")), 10, 10, 200);
    }
    gray_png(&r.join("train/dog/a.png"), 10, 10, 50);
    png(&r.join("train/dog/b.PNG"), 16, 10, 90);
    png(&r.join("testa/x.png"), 10, 10, 1);
    png(&r.join("testa/sub/y.png"), 12, 12, 2);
    png(&r.join("testb/z.png"), 10, 10, 3);
    fs::write(r.join("train/cat/notes.txt"), "not an image").unwrap();
    d
}

fn import(root: &Path, params: Params) -> Result<(tempfile::TempDir, String), StageError> {
    let out = tempfile::tempdir().unwrap();
    let log = run("import_folder", params, root, out.path())?;
    Ok((out, log))
}

#[test]
fn import_folder_layout() {
    let src = tiny_folder();
    let (out, log) = import(src.path(), Params::default().with("channels", 1).with("val_per_class", 1)).unwrap();
    let train = artifact::read_labelled_set(&out.path().join("train")).unwrap();
    let val = artifact::read_labelled_set(&out.path().join("val")).unwrap();
    let testa = artifact::read_image_set(&out.path().join("testa")).unwrap();
    let testb = artifact::read_image_set(&out.path().join("testb")).unwrap();
    assert_eq!(train.images.classes, vec!["cat", "dog"]);
    assert_eq!((train.images.n(), val.images.n()), (3, 2));
    assert_eq!(artifact::class_counts(&train.labels, 2), vec![2, 1]);
    assert_eq!(artifact::class_counts(&val.labels, 2), vec![1, 1]);
    // Files as they came: no one size; the model's `image_size` chooses the resolution.
    assert_eq!((train.images.native_size(), train.images.channels()), (None, 1));
    assert_eq!(testa.ids, vec!["testa/sub/y.png", "testa/x.png"]);
    assert_eq!(testb.n(), 1);
    let mut all_ids: Vec<String> = train.images.ids.iter().chain(&val.images.ids).cloned().collect();
    all_ids.sort();
    assert_eq!(all_ids, vec!["train/cat/0.png", "train/cat/1.png", "train/cat/2.png", "train/dog/a.png", "train/dog/b.PNG"]);
    // Every set carries the one store of all 8 files; the three cat files are the same
    // bytes, stored once.
    for set in ["train", "val", "testa", "testb"] {
        assert_eq!(fs::read(out.path().join(set).join("store/shard-00000.bin")).unwrap(), fs::read(out.path().join("train/store/shard-00000.bin")).unwrap());
    }
    assert_eq!(train.images.store.len(), 6);
    // The gray dog decodes to its shade at its own size (10x10).
    let i = train.images.ids.iter().chain(&val.images.ids).position(|id| id == "train/dog/a.png").unwrap();
    let img = if i < train.images.n() { train.images.image(i).unwrap() } else { val.images.image(i - train.images.n()).unwrap() };
    assert_eq!((img.height, img.width, img.channels), (10, 10, 1));
    assert!(img.pixels.iter().all(|&p| p == 50), "{:?}", img.pixels);
    assert!(log.contains("ignored 1 files"), "{log}");
    assert!(describe("import_folder", "train", &out.path().join("train")).contains("1 non-image files ignored"));

    // RGB from a grayscale file replicates the channel; twice gives the same bytes.
    let (rgb, _) = import(src.path(), Params::default().with("val_per_class", 0)).unwrap();
    let t = artifact::read_labelled_set(&rgb.path().join("train")).unwrap();
    assert_eq!(t.images.channels(), 3);
    let i = t.images.ids.iter().position(|id| id == "train/dog/a.png").unwrap();
    assert!(t.images.image(i).unwrap().pixels.iter().all(|&p| p == 50));
    let (again, _) = import(src.path(), Params::default().with("val_per_class", 0)).unwrap();
    assert_eq!(files(rgb.path()), files(again.path()));
}

#[test]
fn import_with_annotation_lists() {
    let src = tiny_folder();
    let r = src.path();
    fs::write(r.join("names.txt"), "cat\ndog\nbird\n").unwrap();
    fs::write(r.join("train.txt"), "# path index\ntrain/cat/0.png 0\ntrain/dog/b.PNG 1\n\ntrain/cat/1.png 2\n").unwrap();
    fs::write(r.join("testa.txt"), "testa/x.png\n").unwrap();
    let p = Params::default().with("classes", "names.txt").with("train_list", "train.txt").with("testa_list", "testa.txt").with("val_per_class", 0);
    let (out, log) = import(r, p).unwrap();
    let train = artifact::read_labelled_set(&out.path().join("train")).unwrap();
    assert_eq!(train.images.classes, vec!["cat", "dog", "bird"]);
    assert_eq!(train.labels, vec![0, 1, 2]);
    assert_eq!(train.images.ids, vec!["train/cat/0.png", "train/dog/b.PNG", "train/cat/1.png"]);
    assert_eq!(artifact::read_image_set(&out.path().join("testa")).unwrap().n(), 1);
    assert_eq!(artifact::read_image_set(&out.path().join("testb")).unwrap().n(), 1);
    assert!(!log.contains("no training image"), "{log}");
}

fn error_of(root: &Path, params: Params) -> String {
    match import(root, params) {
        Ok(_) => panic!("import should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_image_is_an_error_naming_the_file() {
    let src = tiny_folder();
    fs::write(src.path().join("train/cat/broken.png"), b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    let err = error_of(src.path(), Params::default());
    assert!(err.contains("train/cat/broken.png") && err.contains("not a readable image"), "{err}");
}

#[test]
fn missing_listed_file_is_an_error_naming_list_line_and_file() {
    let src = tiny_folder();
    fs::write(src.path().join("train.txt"), "train/cat/0.png 0\ntrain/cat/gone.png 0\n").unwrap();
    let err = error_of(src.path(), Params::default().with("train_list", "train.txt"));
    assert!(err.contains("train.txt:2") && err.contains("gone.png") && err.contains("cannot read"), "{err}");
}

#[test]
fn wrong_class_index_is_an_error_naming_the_line() {
    let src = tiny_folder();
    fs::write(src.path().join("train.txt"), "train/cat/0.png 0\ntrain/cat/1.png 7\n").unwrap();
    let err = error_of(src.path(), Params::default().with("train_list", "train.txt"));
    assert!(err.contains("train.txt:2") && err.contains("class index 7 out of range (2 classes"), "{err}");
    fs::write(src.path().join("train.txt"), "train/cat/0.png cat\n").unwrap();
    let err = error_of(src.path(), Params::default().with("train_list", "train.txt"));
    assert!(err.contains("train.txt:1") && err.contains("`cat` is not a non-negative integer"), "{err}");
    fs::write(src.path().join("train.txt"), "../outside.png 0\n").unwrap();
    let err = error_of(src.path(), Params::default().with("train_list", "train.txt"));
    assert!(err.contains("train.txt:1") && err.contains("not relative"), "{err}");
}

#[test]
fn empty_class_folder_is_an_error_naming_it() {
    let src = tiny_folder();
    fs::create_dir_all(src.path().join("train/emu")).unwrap();
    fs::write(src.path().join("train/emu/readme.md"), "no images").unwrap();
    let err = error_of(src.path(), Params::default());
    assert!(err.contains("train/emu") && err.contains("empty class folder"), "{err}");
}

#[test]
fn truncated_image_is_an_error_naming_the_file() {
    let src = tiny_folder();
    let good = fs::read(src.path().join("train/cat/0.png")).unwrap();
    fs::write(src.path().join("train/cat/0.png"), &good[..good.len() - 20]).unwrap();
    let err = error_of(src.path(), Params::default());
    assert!(err.contains("train/cat/0.png") && err.contains("cut short"), "{err}");
    // A JPEG cut short too.
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(12, 12, image::Rgb([200, 10, 10])).write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
    let j = jpeg.into_inner();
    fs::write(src.path().join("train/cat/0.png"), &good).unwrap();
    fs::write(src.path().join("train/dog/c.jpg"), &j[..j.len() * 2 / 3]).unwrap();
    let err = error_of(src.path(), Params::default());
    assert!(err.contains("train/dog/c.jpg"), "{err}");
}

#[cfg(unix)]
#[test]
fn a_symlink_leaving_the_data_folder_is_a_bad_image() {
    let src = tiny_folder();
    let outside = tempfile::tempdir().unwrap();
    png(&outside.path().join("secret.png"), 10, 10, 3);
    std::os::unix::fs::symlink(outside.path().join("secret.png"), src.path().join("train/cat/link.png")).unwrap();
    let err = error_of(src.path(), Params::default());
    assert!(err.contains("train/cat/link.png") && err.contains("leaves the data folder"), "{err}");
    // A link that stays inside is an image like any other.
    fs::remove_file(src.path().join("train/cat/link.png")).unwrap();
    std::os::unix::fs::symlink(src.path().join("train/cat/0.png"), src.path().join("train/cat/link.png")).unwrap();
    let (out, _) = import(src.path(), Params::default().with("val_per_class", 0)).unwrap();
    let train = artifact::read_labelled_set(&out.path().join("train")).unwrap();
    assert!(train.images.ids.contains(&"train/cat/link.png".to_string()));
    // The same bytes again are stored once: still 6 images in the store.
    assert_eq!((train.images.n(), train.images.store.len()), (6, 6));
}

#[test]
fn skip_mode_leaves_bad_images_out_and_counts_them() {
    let src = tiny_folder();
    let r = src.path();
    fs::write(r.join("train/cat/broken.png"), b"garbage").unwrap();
    fs::write(r.join("train/dog/broken.jpg"), b"").unwrap();
    fs::create_dir_all(r.join("train/emu")).unwrap();
    fs::write(r.join("testb/bad.png"), b"nope").unwrap();
    let (out, log) = import(r, Params::default().with("on_bad_image", "skip").with("val_per_class", 0)).unwrap();
    let train = artifact::read_labelled_set(&out.path().join("train")).unwrap();
    // cat: 3 good + broken.png; dog: a.png, b.PNG good, broken.jpg (empty); emu: empty.
    assert_eq!(train.images.n(), 5);
    assert_eq!(train.images.classes, vec!["cat", "dog", "emu"]);
    let report: serde_json::Value = serde_json::from_slice(&fs::read(out.path().join("train/import_report.json")).unwrap()).unwrap();
    assert_eq!(report["skipped"].as_array().unwrap().len(), 3, "{report}");
    assert_eq!(report["empty_classes"], serde_json::json!(["emu"]));
    let testa = artifact::read_image_set(&out.path().join("testa")).unwrap();
    assert_eq!(testa.ids, vec!["testa/sub/y.png", "testa/x.png"], "images of any size are kept");
    let testb = artifact::read_image_set(&out.path().join("testb")).unwrap();
    assert_eq!(testb.n(), 1);
    assert!(log.contains("train: skipped 3 bad entries"), "{log}");
    assert!(log.contains("testb: skipped 1 bad entries"), "{log}");
    let shown = describe("import_folder", "train", &out.path().join("train"));
    assert!(shown.contains("3 bad entries skipped") && shown.contains("1 classes without images"), "{shown}");
}

#[test]
fn import_params_are_validated() {
    let src = tiny_folder();
    let err = error_of(src.path(), Params::default().with("channels", 2));
    assert!(err.contains("channels") && err.contains("1 or 3"), "{err}");
}

// ---------------------------------------------------------------------------------
// Imported photos through the recipe: one store, any sizes, the model's resolution.

fn jpeg(path: &Path, w: u32, h: u32, class: usize, k: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = ((x * 7 + y * 3 + k * 11) % 64) as u8;
        let mut px = [v, v, v];
        px[class % 3] = 160 + v;
        image::Rgb(px)
    });
    img.save(path).unwrap();
}

/// 3 classes x 8 JPEGs of mixed sizes in train/<class>/, 6 in testa/.
fn photo_folder() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (c, name) in ["fox", "owl", "elk"].iter().enumerate() {
        for k in 0..8u32 {
            jpeg(&d.path().join(format!("train/{name}/{k}.jpg")), 20 + 3 * k, 24 + 2 * c as u32, c, k);
        }
        for k in 0..2u32 {
            jpeg(&d.path().join(format!("testa/{name}{k}.jpg")), 30, 26 + k, c, 100 + k);
        }
    }
    d
}

#[test]
fn imported_photos_train_predict_and_pseudo_label_over_one_store() {
    let src = photo_folder();
    let (imp, _) = import(src.path(), Params::default().with("val_per_class", 1)).unwrap();
    let (train_dir, testa_dir) = (imp.path().join("train"), imp.path().join("testa"));
    let t = tempfile::tempdir().unwrap();
    let net = Params::default().with("backbone", "cnn").with("cnn_widths", vec![4i64, 8]).with("cnn_blocks", 1).with("batch_size", 4).with("epochs", 10).with("keep_checkpoints", 1);

    // Files of any size need the resolution said.
    let err = support::run_kind("train", net.clone(), &[("train", vec![train_dir.clone()])], &[], &t.path().join("no_size")).unwrap_err().to_string();
    assert!(err.contains("image_size"), "{err}");

    // At 16 px with random resized crops, stopped after 5 steps (an epoch is 6).
    let p = net.with("image_size", 16).with("aug_crop_scale", 0.3).with("max_steps", 5);
    let out = t.path().join("train");
    let log = support::run_kind("train", p, &[("train", vec![train_dir.clone()])], &[], &out).unwrap();
    assert!(log.contains("21 images, 3 classes, 16x16x3"), "{log}");
    let model: serde_json::Value = serde_json::from_slice(&fs::read(out.join("model/model.json")).unwrap()).unwrap();
    assert_eq!((model["height"].as_u64(), model["width"].as_u64(), model["channels"].as_u64()), (Some(16), Some(16), Some(3)), "{model}");
    let epochs: serde_json::Value = serde_json::from_slice(&fs::read(out.join("log/log.json")).unwrap()).unwrap();
    assert_eq!(epochs["epochs"].as_array().map(|e| e.len()), Some(1), "5 steps end within the first epoch: {epochs}");

    // Prediction brings test A (30x26, 30x27) to the model's 16x16.
    let pred = t.path().join("predict");
    let log = support::run_kind("predict", Params::default(), &[("model", vec![out.join("model")]), ("images", vec![testa_dir.clone()])], &[], &pred).unwrap();
    assert!(log.contains("brought to the model's 16x16x3"), "{log}");
    let probs = fgflow_stages::ml::predictions::Predictions::read(&pred.join("predictions")).unwrap();
    assert_eq!(probs.n(), 6);

    // Pseudo-labels: the merged set is rows over the same store, a few hundred bytes new.
    let pl = t.path().join("pl");
    support::run_kind(
        "pseudo_label",
        Params::default().with("threshold", 0.0),
        &[("predictions", vec![pred.join("predictions")]), ("images", vec![testa_dir]), ("train", vec![train_dir.clone()])],
        &[],
        &pl,
    )
    .unwrap();
    let (before, after) = (files(&train_dir), files(&pl.join("train")));
    let mut new_bytes = 0;
    for (name, bytes) in &after {
        match before.get(name) {
            Some(b) if name.starts_with("store/") => assert!(b == bytes, "{name} is not the imported store's"),
            _ => new_bytes += bytes.len(),
        }
    }
    let store_bytes: usize = before.iter().filter(|(n, _)| n.starts_with("store/")).map(|(_, b)| b.len()).sum();
    assert!(new_bytes < 4096 && store_bytes > 10 * new_bytes, "new {new_bytes} bytes against a store of {store_bytes}");
    let merged = artifact::read_labelled_set(&pl.join("train")).unwrap();
    assert_eq!(merged.images.n(), 27);
    let shown = describe("pseudo_label", "train", &pl.join("train"));
    assert!(shown.contains("27 images") && shown.contains("rows over an image store of 30 images"), "{shown}");
}

#[test]
fn the_loader_over_an_imported_folder_is_deterministic_and_bounded() {
    use fgflow_stages::ml::augment::AugmentConfig;
    use fgflow_stages::ml::loader::{Augmentation, LoaderConfig, run_pass};
    use fgflow_stages::store::Target;
    let src = photo_folder();
    let (imp, _) = import(src.path(), Params::default().with("val_per_class", 0)).unwrap();
    let set = artifact::read_image_set(&imp.path().join("train")).unwrap();
    let aug = AugmentConfig { shift: 1, flip: 0.5, erase: 0.3, randaugment_n: 2, randaugment_m: 9, crop_scale: 0.2 };
    let batches: Vec<Vec<usize>> = fgflow_stages::ml::loader::epoch_order(set.n(), 5, 1, 1).chunks(5).map(|c| c.to_vec()).collect();
    let target = Target { height: 12, width: 12, channels: 3 };
    let pass = |threads: usize, prefetch: usize| {
        let mut out = Vec::new();
        let stats = run_pass(&set, &batches, target, Some(Augmentation { config: &aug, salt: 5, seed: 1, epoch: 1 }), LoaderConfig { threads, prefetch }, |_, b| {
            // A slow step, so the workers run ahead as far as they may.
            std::thread::sleep(std::time::Duration::from_millis(5));
            out.push(b);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert!(stats.peak_ahead <= prefetch, "{threads} threads ran {} batches ahead, allowed {prefetch}", stats.peak_ahead);
        out
    };
    let one = pass(1, 2);
    assert_eq!(one.len(), 5);
    assert_eq!(pass(3, 2), one, "3 threads made other batches than 1");
    assert_eq!(pass(3, 4), one);
}
