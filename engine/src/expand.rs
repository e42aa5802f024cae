//! Templates, before checking: `extends` (inherit another declaration, override what
//! differs) and `foreach` (one stage per item, named `name@item`, with `{item}`,
//! `{index}` and `{prev_item}` substituted). Expanded names depend only on the items,
//! so adding a round keeps the names, and so the cache, of the existing ones.

use std::collections::{HashMap, HashSet};

use crate::spec::{Entries, InputDecl, Raw, StageDecl, StageMap};

/// A problem found while expanding: (declaration name, section, field, message).
pub type ExpandError = (String, &'static str, Option<String>, String);

pub struct Expanded {
    /// The declarations, moved out of the file's map (only bases of `extends` are
    /// copied), so the parsed file is not kept beside them.
    pub stages: Vec<(String, StageDecl)>,
    /// Expanded stage name (`round@2`) -> the declaration it came from (for error
    /// spans); a stage named as declared has no entry.
    pub origin: HashMap<String, String>,
    pub errors: Vec<ExpandError>,
}

pub fn expand(map: StageMap) -> Expanded {
    // Nothing to expand (the usual long generated file): the declarations are the
    // stages as they are, and their vector is not copied.
    if map.0.iter().all(|(_, d)| d.extends.is_none() && d.foreach.is_none() && !d.template && d.kind.is_some()) {
        return Expanded { stages: map.0, origin: HashMap::new(), errors: Vec::new() };
    }
    // Only declarations that something `extends` are looked up by name; the last one
    // of a repeated name is the base (as a map of all declarations would keep it).
    let wanted: HashSet<&str> = map.0.iter().filter_map(|(_, d)| d.extends.as_deref()).collect();
    let mut bases: HashMap<String, StageDecl> = HashMap::with_capacity(wanted.len());
    for (n, d) in &map.0 {
        if wanted.contains(n.as_str()) {
            bases.insert(n.clone(), d.clone());
        }
    }
    drop(wanted);
    let mut errors = Vec::new();
    let mut stages = Vec::with_capacity(map.0.len());
    let mut origin = HashMap::new();
    for (name, decl) in map.0 {
        let resolved = match inherit(&name, decl, &bases) {
            Ok(d) => d,
            Err(msg) => {
                errors.push((name, "extends", None, msg));
                continue;
            }
        };
        if resolved.template {
            continue;
        }
        if resolved.kind.is_none() {
            let msg = format!("stage `{name}` has no `kind` (give one, or `extends` a declaration that has)");
            errors.push((name, "kind", None, msg));
            continue;
        }
        match &resolved.foreach {
            None => {
                stages.push((name, resolved));
            }
            Some(items) if items.is_empty() => {
                // Zero items would silently declare zero stages.
                errors.push((name.clone(), "foreach", None, format!("stage `{name}`: `foreach` has no items, so it declares no stage (give at least one item, or remove the stage)")));
            }
            Some(items) => {
                let mut seen_items = std::collections::HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    if item.is_empty() || item.contains(['.', '@']) || item.chars().any(char::is_control) {
                        errors.push((name.clone(), "foreach", None, format!("stage `{name}`: foreach item `{item}` must be non-empty, without `.`, `@` or control characters")));
                        continue;
                    }
                    if !seen_items.insert(item.as_str()) {
                        errors.push((name.clone(), "foreach", None, format!("stage `{name}`: foreach item `{item}` appears twice")));
                        continue;
                    }
                    let prev = if i > 0 { Some(items[i - 1].as_str()) } else { None };
                    let sub = |s: &str| -> String {
                        let s = s.replace("{item}", item).replace("{index}", &i.to_string());
                        match prev {
                            Some(p) => s.replace("{prev_item}", p),
                            None => s,
                        }
                    };
                    let mut d = resolved.clone();
                    d.foreach = None;
                    d.params = d.params.iter().map(|(k, v)| (k.clone(), subst_value(v, &sub, i))).collect();
                    let mut inputs = Entries::default();
                    for (port, decl_in) in &resolved.inputs {
                        let mentions_prev = decl_in.refs().iter().any(|r| r.contains("{prev_item}"));
                        let chosen = if mentions_prev && prev.is_none() {
                            match resolved.first.get(port) {
                                Some(f) => f.clone(),
                                None => {
                                    errors.push((name.clone(), "inputs", Some(port.clone()), format!("stage `{name}`: input `{port}` mentions {{prev_item}}, which the first item `{item}` lacks: give it in `first`")));
                                    continue;
                                }
                            }
                        } else {
                            match decl_in {
                                InputDecl::One(r) => InputDecl::One(sub(r)),
                                InputDecl::Many(v) => InputDecl::Many(v.iter().map(|r| sub(r)).collect()),
                            }
                        };
                        inputs.insert(port.clone(), chosen);
                    }
                    if prev.is_none() {
                        for (port, f) in &resolved.first {
                            if !inputs.contains_key(port) {
                                inputs.insert(port.clone(), f.clone());
                            }
                        }
                    }
                    d.inputs = inputs;
                    d.first = Entries::default();
                    let full = format!("{name}@{item}");
                    origin.insert(full.clone(), name.clone());
                    stages.push((full, d));
                }
            }
        }
    }
    Expanded { stages, origin, errors }
}

/// Follow `extends` to its root, merging on the way; reports cycles and missing bases.
fn inherit(name: &str, decl: StageDecl, decls: &HashMap<String, StageDecl>) -> Result<StageDecl, String> {
    if decl.extends.is_none() {
        return Ok(decl);
    }
    let mut chain = vec![name.to_string()];
    let mut layers = vec![&decl];
    let mut cur = &decl;
    while let Some(base) = &cur.extends {
        if chain.contains(base) {
            chain.push(base.clone());
            return Err(format!("`extends` forms a cycle: {}", chain.join(" -> ")));
        }
        let Some(b) = decls.get(base.as_str()) else {
            return Err(format!("stage `{name}` extends `{base}`, which is not declared"));
        };
        chain.push(base.clone());
        layers.push(b);
        cur = b;
    }
    let mut out = (*layers.pop().expect("the chain holds at least the declaration itself")).clone();
    for layer in layers.into_iter().rev() {
        if layer.kind.is_some() {
            out.kind = layer.kind.clone();
        }
        for (k, v) in &layer.params {
            out.params.insert(k.clone(), v.clone());
        }
        for (k, v) in &layer.inputs {
            out.inputs.insert(k.clone(), v.clone());
        }
        for (k, v) in &layer.first {
            out.first.insert(k.clone(), v.clone());
        }
        if layer.resources.is_some() {
            out.resources = layer.resources;
        }
        if layer.job.is_some() {
            out.job = layer.job.clone();
        }
        if layer.local.is_some() {
            out.local = layer.local;
        }
    }
    out.extends = None;
    out.template = decl.template;
    out.foreach = decl.foreach.clone();
    Ok(out)
}

fn subst_value(v: &Raw, sub: &dyn Fn(&str) -> String, index: usize) -> Raw {
    match v {
        Raw::Str(s) if s == "{index}" => Raw::Int(index as i64),
        Raw::Str(s) => Raw::Str(sub(s)),
        Raw::Seq(items) => Raw::Seq(items.iter().map(|x| subst_value(x, sub, index)).collect()),
        Raw::Map(m) => Raw::Map(m.iter().map(|(k, x)| (k.clone(), subst_value(x, sub, index))).collect()),
        other => other.clone(),
    }
}
