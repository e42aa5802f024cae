//! The `import_folder` kind: a user's own images in the seed's layout become the same
//! artifacts the benchmark produces (minus ground truth). Layout and error handling
//! are documented in `crate::data::import`.

use std::path::Path;

use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, Resources, RunContext, StageError, StageKind};

use crate::artifact;
use crate::data::describe;
use crate::data::import::{self, ImportConfig};
use crate::types::{IMAGE_SET, LABELLED_SET};

pub struct ImportFolder;

fn optional_name(p: &Params, name: &str) -> Result<Option<String>, StageError> {
    let s = p.str(name)?;
    Ok(if s.is_empty() { None } else { Some(s.to_string()) })
}

fn config(p: &Params) -> Result<ImportConfig, StageError> {
    Ok(ImportConfig {
        channels: p.usize("channels")?,
        skip_bad: p.str("on_bad_image")? == "skip",
        classes_file: optional_name(p, "classes")?,
        train_list: optional_name(p, "train_list")?,
        testa_list: optional_name(p, "testa_list")?,
        testb_list: optional_name(p, "testb_list")?,
        val_per_class: p.usize("val_per_class")?,
        seed: p.int("seed")? as u64,
    })
}

impl StageKind for ImportFolder {
    fn name(&self) -> &'static str {
        "import_folder"
    }

    fn version(&self) -> u32 {
        // 2: the files go into an image store as they came (set format 2); `size` and
        //    `resize` left for the model's `image_size`; symbolic links leaving the root
        //    and truncated files are bad images.
        2
    }

    fn summary(&self) -> &'static str {
        "Imports an image folder (train/<class>/, testa/, testb/, or annotation lists) into training, validation and test sets"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required("root", ParamType::Path, "the data folder: train/<class>/*.jpg|png, testa/, testb/, annotation lists"),
            ParamSpec::optional("channels", ParamType::Int, 3, "what the images decode to: 1 (grayscale) or 3 (RGB); the resolution is the model's `image_size`"),
            ParamSpec::optional(
                "on_bad_image",
                ParamType::Enum(&["error", "skip"]),
                "error",
                "\"error\": stop at the first bad image or list line; \"skip\": leave it out and count it",
            ),
            ParamSpec::optional(
                "classes",
                ParamType::Str,
                "",
                "file (relative to root) of class names, one per line, line i = class i; default: the sorted train/ sub-folders",
            ),
            ParamSpec::optional(
                "train_list",
                ParamType::Str,
                "",
                "annotation list (relative to root) of `relative/path.jpg <class index>` lines; default: scan train/<class>/",
            ),
            ParamSpec::optional("testa_list", ParamType::Str, "", "list of test A image paths (relative to root); default: every image under testa/"),
            ParamSpec::optional("testb_list", ParamType::Str, "", "list of test B image paths (relative to root); default: every image under testb/"),
            ParamSpec::optional("val_per_class", ParamType::Int, 2, "training images per class moved to the validation set (a class keeps at least one)"),
            ParamSpec::optional("seed", ParamType::Int, 0, "seed of the validation split"),
        ]
    }

    fn inputs(&self) -> Vec<PortSpec> {
        Vec::new()
    }

    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![
            PortSpec::one("train", LABELLED_SET, "training images with their given (possibly noisy) labels"),
            PortSpec::one("val", LABELLED_SET, "validation images carved from training, labels as given"),
            PortSpec::one("testa", IMAGE_SET, "test A images, unlabelled"),
            PortSpec::one("testb", IMAGE_SET, "test B images, unlabelled"),
        ]
    }

    fn resources(&self, _params: &Params) -> Resources {
        // Decoding runs on every core.
        Resources::Heavy
    }

    fn validate(&self, params: &Params) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        if let Ok(c) = params.int("channels")
            && c != 1
            && c != 3
        {
            errs.push(("channels".into(), format!("must be 1 or 3, found {c}")));
        }
        errs
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let cfg = config(&ctx.params)?;
        let root = ctx.source("root")?;
        let progress = |done: u64, total: u64, what: &str| ctx.progress(done, total, what);
        let log = |line: String| ctx.log(line);
        let imported = import::import(root, &cfg, &ctx.scratch_dir().join("store"), &progress, &log)?;
        let store = &imported.train.images.store;
        ctx.log(format!(
            "train {}, val {}, test A {}, test B {} images; one image store of {} files ({:.1} MiB) as they came, decoded to {} channel(s)",
            imported.train.images.n(),
            imported.val.images.n(),
            imported.testa.n(),
            imported.testb.n(),
            store.len(),
            store.bytes_total() as f64 / (1 << 20) as f64,
            cfg.channels
        ));
        let train = ctx.output_dir("train")?;
        artifact::write_labelled_set(&train, &imported.train)?;
        import::write_report(&train, &imported.train_report)?;
        artifact::write_labelled_set(&ctx.output_dir("val")?, &imported.val)?;
        for (name, set, report) in [("testa", &imported.testa, &imported.testa_report), ("testb", &imported.testb, &imported.testb_report)] {
            let dir = ctx.output_dir(name)?;
            artifact::write_image_set(&dir, set)?;
            import::write_report(&dir, report)?;
        }
        Ok(())
    }

    fn describe_output(&self, output: &str, dir: &Path) -> Option<String> {
        let body = match output {
            "train" | "val" => describe::labelled_set(dir)?,
            "testa" | "testb" => describe::image_set(dir)?,
            _ => return None,
        };
        Some(match import::report_summary(dir) {
            Some(r) => format!("{body}{r}\n"),
            None => body,
        })
    }
}
