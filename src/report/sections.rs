//! One section of the report per stage kind: what a person looks at to judge that
//! stage (class histograms, what cleaning dropped, what pseudo-labelling added and how
//! much of it was right, training curves, accuracies and confusions, ensemble weights,
//! soup members, the ablation's change against its first row). Kinds without a
//! section of their own show `fgflow show`'s summary of their outputs.
//!
//! Artifacts are read field by field from their JSON (missing fields are skipped), so
//! an artifact written by an older fgflow still gives what it has.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use fgflow_cache::Digest;
use fgflow_stages::artifact;
use serde_json::{Value, json};

use super::svg::{self, Bar, GREY, PALETTE, Series, esc, num};
use super::{Csvs, Reader, Section, StageView, png};

const HEAD: &str = "#4269d0";
const MIDDLE: &str = "#efb118";
const TAIL: &str = "#ff725c";
const GOOD: &str = "#3ca951";
const WRONG: &str = "#d62728";
/// At most this many classes get a confusion heat map (beyond it, the table of pairs).
const HEATMAP_CLASSES: usize = 30;
const THUMBS: usize = 24;

pub fn build(r: &Reader, v: &StageView, _all: &[StageView], csvs: &mut Csvs) -> Section {
    let result = match v.kind.as_str() {
        "quickdraw" | "import_folder" => dataset(r, v),
        "clean" => clean(r, v),
        "pseudo_label" => pseudo(r, v),
        "train" => train(r, v, csvs),
        "pretrain" => pretrain(r, v, csvs),
        "soup" => soup(r, v),
        "evaluate" => evaluate(r, v, csvs),
        "ensemble" => ensemble(r, v),
        "report" => table(r, v, csvs),
        _ => Err(String::new()),
    };
    match result {
        Ok(s) => s,
        // No section of its own (or its artifact could not be read): `show`'s summary.
        Err(why) => {
            let mut html = if why.is_empty() { String::new() } else { format!("<p class=\"note\">Could not read this stage's artifact: {}</p>", esc(&why)) };
            html.push_str(&described(r, v));
            Section { html, data: Value::Null }
        }
    }
}

fn described(r: &Reader, v: &StageView) -> String {
    let Some(e) = &v.entry else { return String::new() };
    let Some(kind) = r.app.registry.get(&e.kind) else { return String::new() };
    let mut s = String::new();
    for (name, d) in &e.outputs {
        let text = r.dir(d).ok().and_then(|dir| kind.describe_output(name, &dir));
        if let Some(t) = text {
            let _ = write!(s, "<h3>{}</h3><pre>{}</pre>", esc(name), esc(&t));
        }
    }
    s
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64).filter(|x| x.is_finite())
}

fn u(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.2}%", v * 100.0)).unwrap_or_else(|| "-".into())
}

fn pct_axis(v: f64) -> String {
    format!("{}%", num(v))
}

fn plain(v: f64) -> String {
    num(v)
}

fn out(v: &StageView, name: &str) -> Result<Digest, String> {
    v.output(name).ok_or_else(|| format!("no output `{name}` recorded"))
}

/// A table; cells are text (escaped), numbers right-aligned.
fn html_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let numeric = |c: &str| !c.is_empty() && c.trim_end_matches('%').trim_start_matches(['+', '-']).parse::<f64>().is_ok();
    let mut s = String::from("<table><tr>");
    for h in header {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td{}>{}</td>", if numeric(c) { " class=\"n\"" } else { "" }, esc(c));
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

fn big(items: &[(&str, String)]) -> String {
    let mut s = String::from("<div class=\"big\">");
    for (k, v) in items {
        let _ = write!(s, "<div>{}<b>{}</b></div>", esc(k), esc(v));
    }
    s.push_str("</div>");
    s
}

fn band_colour(b: &str) -> &'static str {
    match b {
        "head" => HEAD,
        "middle" => MIDDLE,
        "tail" => TAIL,
        _ => GREY,
    }
}

fn band_legend() -> Vec<(String, &'static str)> {
    vec![("head".into(), HEAD), ("middle".into(), MIDDLE), ("tail".into(), TAIL)]
}

/// Up to `n` indices spread evenly over `0..len` (thumbnails from every part of a list).
fn spread(len: usize, n: usize) -> Vec<usize> {
    if len <= n {
        return (0..len).collect();
    }
    (0..n).map(|k| k * len / n).collect()
}

/// Thumbnails are at most this many pixels on a side (imported photos are large).
const THUMB_SIDE: usize = 96;

fn thumb(set: &artifact::ImageSet, i: usize, caption: &str) -> String {
    let Ok(img) = set.image(i) else { return String::new() };
    let (h, w, c) = (img.height, img.width, img.channels);
    let scale = (THUMB_SIDE as f64 / h.max(w) as f64).min(1.0);
    let target = fgflow_stages::store::Target { height: ((h as f64 * scale).round() as usize).max(1), width: ((w as f64 * scale).round() as usize).max(1), channels: c };
    let Ok(px) = fgflow_stages::ml::resize::fit(img, target, None) else { return String::new() };
    match png::data_uri(target.width, target.height, c, &px) {
        Some(uri) => {
            format!("<figure><img src=\"{uri}\" alt=\"{}\"><figcaption>{caption}</figcaption></figure>", esc(set.ids.get(i).map(String::as_str).unwrap_or("")))
        }
        None => String::new(),
    }
}

fn class_name(classes: &[String], k: usize) -> &str {
    classes.get(k).map(String::as_str).unwrap_or("?")
}

// ---------------------------------------------------------------------------------
// Data.

fn dataset(r: &Reader, v: &StageView) -> Result<Section, String> {
    let set = r.labelled(&out(v, "train")?)?;
    let counts = artifact::class_counts(&set.labels, set.n_classes());
    let bands = artifact::head_middle_tail(&counts);
    let order = artifact::rank_by_count(&counts);
    let bars: Vec<Bar> = order
        .iter()
        .map(|&k| Bar {
            label: class_name(&set.images.classes, k).to_string(),
            segments: vec![(counts[k] as f64, band_colour(bands[k].name()))],
            note: format!("{} images ({})", counts[k], bands[k].name()),
        })
        .collect();
    let mut html = String::new();
    let sorted: Vec<usize> = order.iter().map(|&k| counts[k]).collect();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    html.push_str(&big(&[
        ("training images", set.images.n().to_string()),
        ("classes", set.n_classes().to_string()),
        ("largest / median / smallest class", format!("{} / {median} / {}", sorted.first().copied().unwrap_or(0), sorted.last().copied().unwrap_or(0))),
    ]));
    html.push_str("<div class=\"charts\">");
    html.push_str(&svg::bar_chart(
        "Training set as imported: images per class (sorted, log scale)",
        "class rank",
        "images",
        &bars,
        true,
        &band_legend(),
        &plain,
    ));
    let mut data = json!({ "classes": order.iter().map(|&k| json!({ "class": class_name(&set.images.classes, k), "count": counts[k], "band": bands[k].name() })).collect::<Vec<_>>() });
    // Label noise by type, when the benchmark's hidden truth is there.
    if let Some(Ok(t)) = v.output("truth").map(|d| r.truth(&d)) {
        if t.train_noise.len() == set.images.n() {
            let names = ["clean", "uniform", "near_class", "open_set"];
            let colours = [HEAD, MIDDLE, TAIL, PALETTE[6]];
            let mut per: Vec<[usize; 4]> = vec![[0; 4]; set.n_classes()];
            for (i, n) in t.train_noise.iter().enumerate() {
                let slot = names.iter().position(|x| *x == n.name()).unwrap_or(0);
                if let Some(row) = per.get_mut(set.labels[i] as usize) {
                    row[slot] += 1;
                }
            }
            let bars: Vec<Bar> = order
                .iter()
                .map(|&k| Bar {
                    label: class_name(&set.images.classes, k).to_string(),
                    segments: (0..4).map(|j| (per[k][j] as f64, colours[j])).collect(),
                    note: names.iter().zip(per[k]).map(|(n, c)| format!("{n} {c}")).collect::<Vec<_>>().join(", "),
                })
                .collect();
            let legend: Vec<(String, &'static str)> = names.iter().zip(colours).map(|(n, c)| (n.to_string(), c)).collect();
            html.push_str(&svg::bar_chart("Given labels by kind of noise (hidden truth), per class", "class rank", "images", &bars, false, &legend, &plain));
            html.push_str("</div>");
            let total: Vec<usize> = (0..4).map(|j| per.iter().map(|r| r[j]).sum()).collect();
            let rows: Vec<Vec<String>> = names
                .iter()
                .zip(&total)
                .map(|(n, c)| vec![n.to_string(), c.to_string(), format!("{:.1}%", 100.0 * *c as f64 / set.images.n().max(1) as f64)])
                .collect();
            html.push_str(&html_table(&["label", "images", "share"], &rows));
            data["noise"] = json!(names.iter().zip(&total).map(|(n, c)| (n.to_string(), json!(c))).collect::<serde_json::Map<_, _>>());
        } else {
            html.push_str("</div>");
        }
    } else {
        html.push_str("</div>");
    }
    let mut sizes = Vec::new();
    for name in ["val", "testa", "testb"] {
        if let Some(Ok(m)) = v.output(name).map(|d| r.json(&d, "classes.json")) {
            sizes.push(vec![name.to_string(), u(&m, "n").map(|n| n.to_string()).unwrap_or_default()]);
        }
    }
    if !sizes.is_empty() {
        html.push_str(&html_table(&["other split", "images"], &sizes));
    }
    // A few training images, from head to tail.
    let picks: Vec<usize> = order
        .iter()
        .take(set.n_classes())
        .step_by((set.n_classes() / 12).max(1))
        .filter_map(|&k| set.labels.iter().position(|&l| l as usize == k))
        .take(12)
        .collect();
    if !picks.is_empty() {
        html.push_str("<h3>One training image of classes from head to tail</h3><div class=\"thumbs\">");
        for i in picks {
            html.push_str(&thumb(&set.images, i, &esc(class_name(&set.images.classes, set.labels[i] as usize))));
        }
        html.push_str("</div>");
    }
    Ok(Section { html, data })
}

fn clean(r: &Reader, v: &StageView) -> Result<Section, String> {
    let report_tree = out(v, "report")?;
    let rep = r.json(&report_tree, "clean.json")?;
    let before = r.labelled(&v.input("train").ok_or("no `train` input recorded")?)?;
    let after = r.labelled(&out(v, "train")?)?;
    let mut html = big(&[
        ("images", u(&rep, "n").unwrap_or(before.images.n() as u64).to_string()),
        ("kept", u(&rep, "kept").unwrap_or(after.images.n() as u64).to_string()),
        ("dropped", u(&rep, "dropped").unwrap_or((before.images.n() - after.images.n().min(before.images.n())) as u64).to_string()),
        ("precision of the drops", pct(rep.get("noise").and_then(|n| f(n, "precision")))),
        ("noisy labels caught", pct(rep.get("noise").and_then(|n| f(n, "recall")))),
    ]);
    let c = before.n_classes();
    let kept_ids: HashSet<&str> = after.images.ids.iter().map(String::as_str).collect();
    let dropped: Vec<usize> = (0..before.images.n()).filter(|&i| !kept_ids.contains(before.images.ids[i].as_str())).collect();
    let total = artifact::class_counts(&before.labels, c);
    let mut lost = vec![0usize; c];
    for &i in &dropped {
        if let Some(x) = lost.get_mut(before.labels[i] as usize) {
            *x += 1;
        }
    }
    let order = artifact::rank_by_count(&total);
    let bars: Vec<Bar> = order
        .iter()
        .map(|&k| Bar {
            label: class_name(&before.images.classes, k).to_string(),
            segments: vec![((total[k] - lost[k]) as f64, HEAD), (lost[k] as f64, WRONG)],
            note: format!("kept {} of {}, dropped {}", total[k] - lost[k], total[k], lost[k]),
        })
        .collect();
    html.push_str("<div class=\"charts\">");
    html.push_str(&svg::bar_chart(
        "Per class, kept and dropped (classes by size as imported)",
        "class rank",
        "images",
        &bars,
        false,
        &[("kept".into(), HEAD), ("dropped".into(), WRONG)],
        &plain,
    ));
    let by_type = rep.get("noise").and_then(|n| n.get("by_type")).and_then(Value::as_array).cloned().unwrap_or_default();
    if !by_type.is_empty() {
        let rows: Vec<(String, f64, &'static str)> = by_type
            .iter()
            .map(|t| {
                (
                    t.get("noise").and_then(Value::as_str).unwrap_or("?").to_string(),
                    f(t, "recall").unwrap_or(0.0) * 100.0,
                    if t.get("noise").and_then(Value::as_str) == Some("clean") { HEAD } else { WRONG },
                )
            })
            .collect();
        html.push_str(&svg::hbar_chart("Share of each kind of label dropped (hidden truth)", "% of that kind dropped", &rows, &pct_axis));
    }
    html.push_str("</div>");
    if !by_type.is_empty() {
        let rows: Vec<Vec<String>> = by_type
            .iter()
            .map(|t| {
                vec![
                    t.get("noise").and_then(Value::as_str).unwrap_or("?").to_string(),
                    u(t, "n").unwrap_or(0).to_string(),
                    u(t, "dropped").unwrap_or(0).to_string(),
                    pct(f(t, "recall")),
                    pct(f(t, "precision")),
                ]
            })
            .collect();
        html.push_str(&html_table(&["label as given", "images", "dropped", "share dropped", "share of all drops"], &rows));
    }
    // What was dropped, with the given label, the held-out model's class and the truth.
    let oof = r.predictions(&report_tree, "oof").ok();
    let truth = v.input("truth").and_then(|d| r.truth(&d).ok()).filter(|t| t.train_noise.len() == before.images.n());
    if !dropped.is_empty() {
        let _ = write!(
            html,
            "<h3>Dropped images ({} of {} shown): given label, <span class=\"muted\">held-out model's class</span></h3><div class=\"thumbs\">",
            dropped.len().min(THUMBS),
            dropped.len()
        );
        for k in spread(dropped.len(), THUMBS) {
            let i = dropped[k];
            let given = class_name(&before.images.classes, before.labels[i] as usize);
            let mut cap = esc(given);
            if let Some(p) = oof.as_ref().filter(|p| p.n() == before.images.n()) {
                let top = fgflow_stages::ml::predictions::argmax(p.probs_row(i));
                let _ = write!(cap, "<br><span class=\"muted\">{}</span>", esc(class_name(&p.classes, top)));
            }
            if let Some(t) = &truth {
                let noise = t.train_noise[i].name();
                let _ = write!(cap, "<br><span class=\"{}\">{}</span>", if noise == "clean" { "bad" } else { "ok" }, esc(noise));
            }
            html.push_str(&thumb(&before.images, i, &cap));
        }
        html.push_str("</div>");
        if truth.is_some() {
            html.push_str("<p class=\"muted\">Green: the label really was noisy (dropping it was right); red: a clean label was dropped.</p>");
        }
    }
    let data = json!({ "report": rep, "per_class": order.iter().map(|&k| json!({ "class": class_name(&before.images.classes, k), "before": total[k], "dropped": lost[k] })).collect::<Vec<_>>() });
    Ok(Section { html, data })
}

fn pseudo(r: &Reader, v: &StageView) -> Result<Section, String> {
    let rep = r.json(&out(v, "report")?, "report.json")?;
    let truth = rep.get("truth").filter(|t| !t.is_null());
    let mut html = big(&[
        ("pseudo-labels kept", format!("{} of {}", u(&rep, "kept").unwrap_or(0), u(&rep, "total").unwrap_or(0))),
        ("threshold", f(&rep, "threshold").map(num).unwrap_or_default()),
        ("right (hidden truth)", truth.map(|t| pct(f(t, "precision"))).unwrap_or_else(|| "-".into())),
        ("training set", format!("{} → {}", u(&rep, "previous_train").unwrap_or(0), u(&rep, "train").unwrap_or(0))),
    ]);
    let mut per: Vec<(String, u64, Option<u64>)> = rep
        .get("per_class")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|c| (c.get("class").and_then(Value::as_str).unwrap_or("?").to_string(), u(c, "kept").unwrap_or(0), u(c, "correct"))).collect())
        .unwrap_or_default();
    per.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let bars: Vec<Bar> = per
        .iter()
        .map(|(c, kept, right)| match right {
            Some(ok) => Bar {
                label: c.clone(),
                segments: vec![(*ok as f64, GOOD), (kept.saturating_sub(*ok) as f64, WRONG)],
                note: format!("{kept} added, {ok} right"),
            },
            None => Bar { label: c.clone(), segments: vec![(*kept as f64, HEAD)], note: format!("{kept} added") },
        })
        .collect();
    let legend: Vec<(String, &'static str)> =
        if per.iter().any(|p| p.2.is_some()) { vec![("right".into(), GOOD), ("wrong".into(), WRONG)] } else { Vec::new() };
    html.push_str(&svg::bar_chart("Pseudo-labels added per class (classes by images added)", "class rank", "images added", &bars, false, &legend, &plain));
    // The images this round added, with their pseudo-label (and whether it is right).
    if let (Ok(after), Some(before)) = (r.labelled(&out(v, "train")?), v.input("train")) {
        let before_ids: HashSet<String> = r.labelled(&before).map(|b| b.images.ids.iter().cloned().collect()).unwrap_or_default();
        let added: Vec<usize> =
            (0..after.images.n()).filter(|&i| after.images.ids[i].starts_with("pseudo:") && !before_ids.contains(&after.images.ids[i])).collect();
        // Truth of each test image, by id, through the `images` input (same order as the split's labels).
        let split = v
            .recorded()
            .and_then(|rec| rec.fingerprint.params.get("split").map(|s| s.to_string().trim_matches('"').to_string()))
            .unwrap_or_else(|| "testa".into());
        let true_class: HashMap<String, String> = match (v.input("images").map(|d| r.images(&d)), v.input("truth").map(|d| r.truth(&d))) {
            (Some(Ok(imgs)), Some(Ok(t))) => {
                let labels = if split == "testb" { &t.testb_labels } else { &t.testa_labels };
                imgs.ids.iter().zip(labels.iter()).map(|(id, &l)| (format!("pseudo:{id}"), class_name(&t.classes, l as usize).to_string())).collect()
            }
            _ => HashMap::new(),
        };
        if !added.is_empty() {
            let _ = write!(
                html,
                "<h3>Images added this round ({} of {} shown), with their pseudo-label</h3><div class=\"thumbs\">",
                added.len().min(THUMBS),
                added.len()
            );
            for k in spread(added.len(), THUMBS) {
                let i = added[k];
                let label = class_name(&after.images.classes, after.labels[i] as usize);
                let cap = match true_class.get(&after.images.ids[i]) {
                    Some(t) if t == label => format!("<span class=\"ok\">{}</span>", esc(label)),
                    Some(t) => format!("<span class=\"bad\">{}</span><br><span class=\"muted\">is {}</span>", esc(label), esc(t)),
                    None => esc(label),
                };
                html.push_str(&thumb(&after.images, i, &cap));
            }
            html.push_str("</div>");
        }
    }
    Ok(Section { html, data: rep })
}

// ---------------------------------------------------------------------------------
// Training.

fn epochs_of(log: &Value) -> Vec<Value> {
    log.get("epochs").and_then(Value::as_array).cloned().unwrap_or_default()
}

fn series(epochs: &[Value], key: &str, name: &str, scale: f64) -> Series {
    Series { name: name.into(), points: epochs.iter().filter_map(|e| Some((f(e, "epoch")?, f(e, key)? * scale))).collect() }
}

fn train(r: &Reader, v: &StageView, csvs: &mut Csvs) -> Result<Section, String> {
    let log = r.json(&out(v, "log")?, "log.json")?;
    let epochs = epochs_of(&log);
    let model = log.get("model").cloned().unwrap_or(Value::Null);
    let kind = |k: &str| model.get(k).and_then(|x| x.get("kind")).and_then(Value::as_str).unwrap_or("?").to_string();
    let last = epochs.last().cloned().unwrap_or(Value::Null);
    let mut html = big(&[
        ("model", format!("{}, {} head, {} loss", kind("backbone"), kind("head"), kind("loss"))),
        ("epochs", epochs.len().to_string()),
        ("final loss", f(&last, "loss").map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())),
        ("final train accuracy", pct(f(&last, "train_acc"))),
        ("final validation accuracy", pct(f(&last, "val_acc"))),
    ]);
    html.push_str("<div class=\"charts\">");
    html.push_str(&svg::line_chart("Training loss per epoch", "epoch", "loss", &[series(&epochs, "loss", "loss", 1.0)], false, &plain));
    let mut acc = vec![series(&epochs, "train_acc", "train (augmented)", 100.0)];
    let val = series(&epochs, "val_acc", "validation", 100.0);
    if !val.points.is_empty() {
        acc.push(val);
    }
    html.push_str(&svg::line_chart("Accuracy per epoch", "epoch", "accuracy %", &acc, false, &pct_axis));
    html.push_str(&svg::line_chart("Learning rate (last step of each epoch)", "epoch", "learning rate", &[series(&epochs, "lr", "lr", 1.0)], false, &plain));
    html.push_str("</div>");
    for e in &epochs {
        let g = |k: &str| f(e, k).map(|x| x.to_string()).unwrap_or_default();
        csvs.epochs.push(vec![v.name.clone(), g("epoch"), g("loss"), g("train_acc"), g("val_acc"), g("lr")]);
    }
    Ok(Section { html, data: json!({ "epochs": epochs }) })
}

fn pretrain(r: &Reader, v: &StageView, csvs: &mut Csvs) -> Result<Section, String> {
    let log = r.json(&out(v, "log")?, "log.json")?;
    let epochs = epochs_of(&log);
    let last = epochs.last().cloned().unwrap_or(Value::Null);
    let mut html = big(&[
        ("masked autoencoder", format!("mask ratio {}", log.get("mae").and_then(|m| f(m, "mask_ratio")).map(num).unwrap_or_else(|| "?".into()))),
        ("epochs", epochs.len().to_string()),
        ("final reconstruction loss", f(&last, "loss").map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())),
    ]);
    html.push_str("<div class=\"charts\">");
    html.push_str(&svg::line_chart("Reconstruction loss (hidden patches) per epoch", "epoch", "loss", &[series(&epochs, "loss", "loss", 1.0)], false, &plain));
    html.push_str(&svg::line_chart("Learning rate (last step of each epoch)", "epoch", "learning rate", &[series(&epochs, "lr", "lr", 1.0)], false, &plain));
    html.push_str("</div>");
    for e in &epochs {
        let g = |k: &str| f(e, k).map(|x| x.to_string()).unwrap_or_default();
        csvs.epochs.push(vec![v.name.clone(), g("epoch"), g("loss"), String::new(), String::new(), g("lr")]);
    }
    Ok(Section { html, data: json!({ "epochs": epochs }) })
}

fn soup(r: &Reader, v: &StageView) -> Result<Section, String> {
    let rep = r.json(&out(v, "report")?, "soup.json")?;
    let cands = rep.get("candidates").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut html = big(&[
        ("method", rep.get("method").and_then(Value::as_str).unwrap_or("?").to_string()),
        ("members", format!("{} of {}", cands.iter().filter(|c| c.get("in_soup").and_then(Value::as_bool) == Some(true)).count(), cands.len())),
        ("soup validation accuracy", pct(f(&rep, "soup_val_acc"))),
    ]);
    let mut bars: Vec<(String, f64, &'static str)> = cands
        .iter()
        .filter_map(|c| {
            let inside = c.get("in_soup").and_then(Value::as_bool) == Some(true);
            Some((
                format!("epoch {}{}", u(c, "epoch")?, if inside { " (in the soup)" } else { "" }),
                f(c, "val_acc")? * 100.0,
                if inside { HEAD } else { GREY },
            ))
        })
        .collect();
    if let Some(s) = f(&rep, "soup_val_acc") {
        bars.push(("the soup".into(), s * 100.0, GOOD));
    }
    if !bars.is_empty() {
        html.push_str(&svg::hbar_chart("Validation accuracy of each checkpoint and of the soup", "validation accuracy %", &bars, &pct_axis));
    }
    let rows: Vec<Vec<String>> = cands
        .iter()
        .map(|c| {
            vec![
                u(c, "epoch").map(|e| e.to_string()).unwrap_or_default(),
                pct(f(c, "val_acc")),
                pct(f(c, "val_acc_with")),
                if c.get("in_soup").and_then(Value::as_bool) == Some(true) { "yes".into() } else { "no".into() },
            ]
        })
        .collect();
    html.push_str(&html_table(&["checkpoint epoch", "val accuracy", "soup with it (greedy)", "in the soup"], &rows));
    Ok(Section { html, data: rep })
}

// ---------------------------------------------------------------------------------
// Evaluation.

fn evaluate(r: &Reader, v: &StageView, csvs: &mut Csvs) -> Result<Section, String> {
    let m = r.json(&out(v, "metrics")?, "metrics.json")?;
    let truth_name = m.get("truth").and_then(Value::as_str).unwrap_or("?").to_string();
    let mut html = big(&[
        ("top-1", pct(f(&m, "top1"))),
        ("top-5", pct(f(&m, "top5"))),
        ("mean class accuracy", pct(f(&m, "mean_class_acc"))),
        ("images", u(&m, "n").unwrap_or(0).to_string()),
        ("evaluated against", truth_name.clone()),
    ]);
    let groups = m.get("groups").and_then(Value::as_array).cloned().unwrap_or_default();
    let group_acc = |g: &str| groups.iter().find(|x| x.get("group").and_then(Value::as_str) == Some(g)).and_then(|x| f(x, "acc"));
    csvs.metrics.push(vec![
        v.name.clone(),
        truth_name,
        u(&m, "n").unwrap_or(0).to_string(),
        f(&m, "top1").map(|x| x.to_string()).unwrap_or_default(),
        f(&m, "top5").map(|x| x.to_string()).unwrap_or_default(),
        f(&m, "mean_class_acc").map(|x| x.to_string()).unwrap_or_default(),
        group_acc("head").map(|x| x.to_string()).unwrap_or_default(),
        group_acc("middle").map(|x| x.to_string()).unwrap_or_default(),
        group_acc("tail").map(|x| x.to_string()).unwrap_or_default(),
    ]);
    let mut per = m.get("per_class").and_then(Value::as_array).cloned().unwrap_or_default();
    for c in &per {
        let g = |k: &str| c.get(k).map(|x| x.to_string().trim_matches('"').to_string()).filter(|x| x != "null").unwrap_or_default();
        csvs.per_class.push(vec![v.name.clone(), g("class"), g("n"), g("correct"), g("acc"), g("train_count"), g("group")]);
    }
    let by_count = per.iter().any(|c| u(c, "train_count").is_some());
    if by_count {
        per.sort_by_key(|c| std::cmp::Reverse(u(c, "train_count").unwrap_or(0)));
    } else {
        per.sort_by(|a, b| f(b, "acc").unwrap_or(0.0).total_cmp(&f(a, "acc").unwrap_or(0.0)));
    }
    let bars: Vec<Bar> = per
        .iter()
        .map(|c| {
            let name = c.get("class").and_then(Value::as_str).unwrap_or("?").to_string();
            let group = c.get("group").and_then(Value::as_str).unwrap_or("");
            Bar {
                note: format!(
                    "{} ({} of {}{})",
                    pct(f(c, "acc")),
                    u(c, "correct").unwrap_or(0),
                    u(c, "n").unwrap_or(0),
                    u(c, "train_count").map(|t| format!(", {t} training images")).unwrap_or_default()
                ),
                label: name,
                segments: vec![(f(c, "acc").unwrap_or(0.0) * 100.0, band_colour(group))],
            }
        })
        .collect();
    html.push_str("<div class=\"charts\">");
    let title = if by_count { "Per-class accuracy (classes by training-set size, head to tail)" } else { "Per-class accuracy (best first)" };
    let legend = if by_count { band_legend() } else { Vec::new() };
    html.push_str(&svg::bar_chart(
        title,
        if by_count { "class rank by training images" } else { "class rank" },
        "accuracy %",
        &bars,
        false,
        &legend,
        &pct_axis,
    ));
    let pairs = confusion(r, v);
    if let Ok((classes, matrix)) = &pairs {
        if classes.len() <= HEATMAP_CLASSES && !classes.is_empty() {
            html.push_str(&svg::heatmap("Confusions (true → predicted; red: errors)", classes, matrix));
        }
    }
    html.push_str("</div>");
    if !groups.is_empty() {
        let rows: Vec<Vec<String>> = groups
            .iter()
            .map(|g| {
                vec![
                    g.get("group").and_then(Value::as_str).unwrap_or("?").to_string(),
                    u(g, "classes").unwrap_or(0).to_string(),
                    u(g, "n").unwrap_or(0).to_string(),
                    pct(f(g, "acc")),
                    pct(f(g, "mean_class_acc")),
                ]
            })
            .collect();
        html.push_str("<h3>Head, middle and tail (thirds of the classes by training images)</h3>");
        html.push_str(&html_table(&["band", "classes", "images", "accuracy", "mean class accuracy"], &rows));
    }
    let mut data = json!({ "metrics": m });
    match pairs {
        Ok((classes, matrix)) => {
            let mut list: Vec<(usize, usize, f64)> = Vec::new();
            for (i, row) in matrix.iter().enumerate() {
                for (j, &n) in row.iter().enumerate() {
                    if i != j && n > 0.0 {
                        list.push((i, j, n));
                    }
                }
            }
            list.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
            list.truncate(10);
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|&(i, j, n)| {
                    let of: f64 = matrix[i].iter().sum();
                    vec![classes[i].clone(), classes[j].clone(), num(n), format!("{:.1}%", 100.0 * n / of.max(1.0))]
                })
                .collect();
            if !rows.is_empty() {
                html.push_str("<h3>Most confused class pairs</h3>");
                html.push_str(&html_table(&["true class", "predicted as", "images", "share of the true class"], &rows));
            }
            data["confused"] = json!(list.iter().map(|&(i, j, n)| json!({ "true": classes[i], "predicted": classes[j], "n": n })).collect::<Vec<_>>());
        }
        Err(why) => {
            let _ = write!(html, "<p class=\"muted\">No confusion table: {}</p>", esc(&why));
        }
    }
    Ok(Section { html, data })
}

/// The confusion matrix (rows: true class, columns: predicted), over the predictions'
/// classes, from the evaluate stage's own inputs.
fn confusion(r: &Reader, v: &StageView) -> Result<(Vec<String>, Vec<Vec<f64>>), String> {
    let pred = r.predictions(&v.input("predictions").ok_or("no predictions input recorded")?, "")?;
    let (labels, names): (Vec<u32>, Vec<String>) = if let Some(t) = v.input("truth") {
        let t = r.truth(&t)?;
        let split = v
            .recorded()
            .and_then(|rec| rec.fingerprint.params.get("split").map(|s| s.to_string().trim_matches('"').to_string()))
            .unwrap_or_else(|| "testa".into());
        (if split == "testb" { t.testb_labels.clone() } else { t.testa_labels.clone() }, t.classes.clone())
    } else if let Some(l) = v.input("labels") {
        let s = r.labelled(&l)?;
        (s.labels.clone(), s.images.classes.clone())
    } else {
        return Err("no truth input recorded".into());
    };
    if labels.len() != pred.n() {
        return Err(format!("{} labels for {} predictions", labels.len(), pred.n()));
    }
    let col: Vec<Option<usize>> = names.iter().map(|n| pred.classes.iter().position(|p| p == n)).collect();
    let c = pred.num_classes();
    let mut m = vec![vec![0.0; c]; c];
    for (i, top) in pred.top1().into_iter().enumerate() {
        if let Some(Some(t)) = col.get(labels[i] as usize) {
            m[*t][top] += 1.0;
        }
    }
    Ok((pred.classes.clone(), m))
}

fn ensemble(r: &Reader, v: &StageView) -> Result<Section, String> {
    let w = r.json(&out(v, "weights")?, "weights.json")?;
    let from = v.inputs("predictions");
    let models = w.get("models").and_then(Value::as_array).cloned().unwrap_or_default();
    let total: f64 = models.iter().filter_map(|m| f(m, "weight")).sum();
    let name =
        |m: &Value| u(m, "index").and_then(|i| from.get(i as usize)).map(|x| x.1.clone()).unwrap_or_else(|| format!("model {}", u(m, "index").unwrap_or(0)));
    let mut html = big(&[
        ("models", models.len().to_string()),
        ("f (weight = (acc / min acc)^f)", f(&w, "f").map(num).unwrap_or_default()),
        ("average of", w.get("average").and_then(Value::as_str).unwrap_or("?").to_string()),
    ]);
    let bars: Vec<(String, f64, &'static str)> =
        models.iter().enumerate().map(|(i, m)| (name(m), 100.0 * f(m, "weight").unwrap_or(0.0) / total.max(1e-12), PALETTE[i % PALETTE.len()])).collect();
    html.push_str(&svg::hbar_chart("Share of each model in the ensemble", "weight, % of the total", &bars, &pct_axis));
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| vec![name(m), pct(f(m, "accuracy")), f(m, "weight").map(|x| format!("{x:.4}")).unwrap_or_default(), pct(f(m, "agreement"))])
        .collect();
    html.push_str(&html_table(&["model (its predictions)", "validation accuracy", "weight", "agrees with the ensemble"], &rows));
    Ok(Section { html, data: w })
}

// ---------------------------------------------------------------------------------
// Reports.

fn table(r: &Reader, v: &StageView, csvs: &mut Csvs) -> Result<Section, String> {
    let t = r.json(&out(v, "report")?, "table.json")?;
    let title = t.get("title").and_then(Value::as_str).unwrap_or("Report").to_string();
    let rows = t.get("rows").and_then(Value::as_array).cloned().unwrap_or_default();
    let base = rows.first().and_then(|x| f(x, "top1")).unwrap_or(0.0);
    let label = |x: &Value| x.get("label").and_then(Value::as_str).unwrap_or("?").to_string();
    let mut html = format!("<h3>{}</h3>", esc(&title));
    let bars: Vec<(String, f64, &'static str)> = rows
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let d = (f(x, "top1").unwrap_or(0.0) - base) * 100.0;
            (
                label(x),
                d,
                if i == 0 {
                    GREY
                } else if d >= 0.0 {
                    GOOD
                } else {
                    WRONG
                },
            )
        })
        .collect();
    let first = rows.first().map(label).unwrap_or_default();
    html.push_str(&svg::hbar_chart(
        &format!("Top-1 change against the first row ({first}: {})", pct(Some(base))),
        "top-1 change, percentage points",
        &bars,
        &|x| format!("{}{}", if x > 0.0 { "+" } else { "" }, num(x)),
    ));
    let mut out_rows = Vec::new();
    for x in &rows {
        let d = (f(x, "top1").unwrap_or(0.0) - base) * 100.0;
        out_rows.push(vec![
            label(x),
            pct(f(x, "top1")),
            format!("{d:+.2}"),
            pct(f(x, "top5")),
            pct(f(x, "mean_class_acc")),
            pct(f(x, "head")),
            pct(f(x, "middle")),
            pct(f(x, "tail")),
        ]);
        let g = |k: &str| f(x, k).map(|y| y.to_string()).unwrap_or_default();
        csvs.tables.push(vec![
            v.name.clone(),
            title.clone(),
            label(x),
            x.get("evaluated_on").and_then(Value::as_str).unwrap_or("").to_string(),
            g("top1"),
            format!("{}", d / 100.0),
            g("top5"),
            g("mean_class_acc"),
            g("head"),
            g("middle"),
            g("tail"),
        ]);
    }
    html.push_str(&html_table(&["", "top-1", "vs first row (pp)", "top-5", "mean class acc", "head", "middle", "tail"], &out_rows));
    Ok(Section { html, data: t })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_covers_the_list_evenly() {
        assert_eq!(spread(3, 5), vec![0, 1, 2]);
        assert_eq!(spread(10, 5), vec![0, 2, 4, 6, 8]);
        assert!(spread(0, 5).is_empty());
    }

    #[test]
    fn tables_escape_and_align_numbers() {
        let t = html_table(&["a<b"], &[vec!["12.5%".into()], vec!["<x>".into()]]);
        assert!(t.contains("a&lt;b") && t.contains("<td class=\"n\">12.5%</td>") && t.contains("<td>&lt;x&gt;</td>"));
    }
}
