//! The image store: every image of a data set stored once, by content, and the only code
//! that reads or writes its files. A set (`artifact`) is a list of rows over a store.
//!
//! # Format (version 1): a directory `store/` inside every set artifact
//!
//! - `store.json`: `{"channels": 1, "encoding": "raw" | "file", "format":
//!   "fgflow.image_store", "height": 28, "n": N, "shards": ["shard-00000.bin", ...],
//!   "version": 1, "width": 28}` (`height`/`width` are 0 for `file`, whose images have any
//!   size; `channels` is what decoding gives: 1 gray, 3 RGB).
//! - `index.safetensors`: `shard` `U32 [N]`, `offset` `U64 [N]`, `length` `U64 [N]`,
//!   `blake3` `U8 [N, 32]`: where image i's bytes are, and their digest.
//! - `shard-NNNNN.bin`: images back to back. `raw`: `height*width*channels` bytes, HWC,
//!   row-major (the generated benchmark's small drawings); `file`: the file's bytes as they
//!   came (JPEG or PNG; decoding, cropping and resizing are the loader's, at the model's
//!   resolution).
//!
//! Why shards and not a file per image: a stage's inputs are laid out as one hard link
//! per file, and a capture hashes every file; 550,000 images would be 550,000 links per
//! input of every stage. A few shards of at most `SHARD_BYTES` cost nothing. Why the
//! files as they came: a JPEG is a tenth of its pixels, and one store then serves any
//! resolution. Identical images (same bytes) are stored once; rows that name them share
//! the record.
//!
//! Sharing: a set made from another (cleaning, pseudo-labels, merges) carries the same
//! store files, hard-linked, so the cache keeps their bytes once (a blob per shard) and
//! the new set costs its rows. Two separate imports do not share shards.
//!
//! ```python
//! import io, json, numpy as np
//! from PIL import Image
//! from safetensors.numpy import load_file
//! meta = json.load(open("train/store/store.json")); ix = load_file("train/store/index.safetensors")
//! def image(i):   # image i of the store, as a numpy array
//!     with open("train/store/" + meta["shards"][ix["shard"][i]], "rb") as f:
//!         f.seek(int(ix["offset"][i])); b = f.read(int(ix["length"][i]))
//!     if meta["encoding"] == "raw":
//!         return np.frombuffer(b, np.uint8).reshape(meta["height"], meta["width"], meta["channels"])
//!     return np.asarray(Image.open(io.BytesIO(b)).convert("L" if meta["channels"] == 1 else "RGB"))
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use fgflow_engine::StageError;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

pub const STORE_DIR: &str = "store";
const STORE_JSON: &str = "store.json";
const INDEX_FILE: &str = "index.safetensors";
const STORE_FORMAT: &str = "fgflow.image_store";
const STORE_VERSION: u32 = 1;
/// A shard is closed once it holds this much (an image never spans two).
pub const SHARD_BYTES: u64 = 256 << 20;

/// How a store's images are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Pixels, all `height x width x channels`.
    Raw { height: usize, width: usize, channels: usize },
    /// Image files (JPEG, PNG) as they came, decoded to `channels` (1 gray, 3 RGB).
    File { channels: usize },
}

impl Encoding {
    pub fn channels(self) -> usize {
        match self {
            Encoding::Raw { channels, .. } | Encoding::File { channels } => channels,
        }
    }
    /// The size every image has, when they all have one.
    pub fn size(self) -> Option<(usize, usize)> {
        match self {
            Encoding::Raw { height, width, .. } => Some((height, width)),
            Encoding::File { .. } => None,
        }
    }
}

/// The size and channels images are brought to: a model's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

/// One decoded image, HWC u8, at its own size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image<'a> {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub pixels: Cow<'a, [u8]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    shard: u32,
    offset: u64,
    length: u64,
}

enum Data {
    /// Raw stores are read whole: they hold small generated images, and training reads
    /// each one every epoch.
    Memory(Vec<Vec<u8>>),
    /// File stores are read an image at a time (positioned reads), so memory does not
    /// grow with the store: the loader holds only the batches in flight.
    Files(Vec<File>),
}

/// An open store.
pub struct Store {
    encoding: Encoding,
    records: Vec<Record>,
    digests: Vec<[u8; 32]>,
    shard_names: Vec<String>,
    data: Data,
    /// Where its files are (None: built in memory, not yet written).
    dir: Option<PathBuf>,
    /// blake3 of the index: equal for equal stores, to check that merged sets share one.
    identity: [u8; 32],
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("encoding", &self.encoding).field("n", &self.records.len()).field("dir", &self.dir).finish()
    }
}

#[derive(Serialize, Deserialize)]
struct StoreMeta {
    channels: usize,
    encoding: String,
    format: String,
    height: usize,
    n: usize,
    shards: Vec<String>,
    version: u32,
    width: usize,
}

fn corrupt(path: &Path, msg: impl std::fmt::Display) -> StageError {
    StageError::failed(format!("{}: {msg}", path.display()))
}

fn io(path: &Path, what: &str, e: std::io::Error) -> StageError {
    StageError::io(format!("{what} {}", path.display()), e)
}

fn shard_name(i: usize) -> String {
    format!("shard-{i:05}.bin")
}

fn identity_of(records: &[Record], digests: &[[u8; 32]], encoding: Encoding) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(format!("{encoding:?}").as_bytes());
    for (r, d) in records.iter().zip(digests) {
        h.update(&r.shard.to_le_bytes());
        h.update(&r.offset.to_le_bytes());
        h.update(&r.length.to_le_bytes());
        h.update(d);
    }
    *h.finalize().as_bytes()
}

/// Writes a store's shards as images arrive; identical images are stored once.
pub struct StoreBuilder {
    dir: PathBuf,
    encoding: Encoding,
    records: Vec<Record>,
    digests: Vec<[u8; 32]>,
    seen: HashMap<[u8; 32], u32>,
    shard: Option<(BufWriter<File>, u64)>,
    shards: usize,
}

impl StoreBuilder {
    /// A new store in `dir` (created; it must not hold one already).
    pub fn create(dir: &Path, encoding: Encoding) -> Result<StoreBuilder, StageError> {
        if !matches!(encoding.channels(), 1 | 3) {
            return Err(StageError::failed(format!("an image store holds 1 or 3 channels, not {}", encoding.channels())));
        }
        fs::create_dir_all(dir).map_err(|e| io(dir, "creating", e))?;
        Ok(StoreBuilder { dir: dir.to_path_buf(), encoding, records: Vec::new(), digests: Vec::new(), seen: HashMap::new(), shard: None, shards: 0 })
    }

    /// Adds one image (raw pixels or a file's bytes, per the encoding) and returns its
    /// index in the store; the same bytes again return the first index.
    pub fn push(&mut self, bytes: &[u8]) -> Result<u32, StageError> {
        if let Encoding::Raw { height, width, channels } = self.encoding
            && bytes.len() != height * width * channels
        {
            return Err(StageError::failed(format!("a raw image of {} bytes in a store of {height}x{width}x{channels}", bytes.len())));
        }
        let digest = *blake3::hash(bytes).as_bytes();
        if let Some(&i) = self.seen.get(&digest) {
            return Ok(i);
        }
        let full = matches!(&self.shard, Some((_, at)) if *at > 0 && *at + bytes.len() as u64 > SHARD_BYTES);
        if full || self.shard.is_none() {
            self.close_shard()?;
            let path = self.dir.join(shard_name(self.shards));
            let f = File::create(&path).map_err(|e| io(&path, "creating", e))?;
            self.shard = Some((BufWriter::with_capacity(1 << 20, f), 0));
            self.shards += 1;
        }
        let index = u32::try_from(self.records.len()).map_err(|_| StageError::failed("an image store holds at most 2^32 images"))?;
        let path = self.dir.join(shard_name(self.shards - 1));
        let Some((w, at)) = self.shard.as_mut() else { return Err(StageError::failed("no open shard")) };
        w.write_all(bytes).map_err(|e| io(&path, "writing", e))?;
        self.records.push(Record { shard: (self.shards - 1) as u32, offset: *at, length: bytes.len() as u64 });
        *at += bytes.len() as u64;
        self.digests.push(digest);
        self.seen.insert(digest, index);
        Ok(index)
    }

    fn close_shard(&mut self) -> Result<(), StageError> {
        if let Some((mut w, _)) = self.shard.take() {
            let path = self.dir.join(shard_name(self.shards - 1));
            w.flush().map_err(|e| io(&path, "writing", e))?;
        }
        Ok(())
    }

    /// Writes the index and `store.json`, and opens the store for reading.
    pub fn finish(mut self) -> Result<Store, StageError> {
        self.close_shard()?;
        let n = self.records.len();
        let shard: Vec<u8> = self.records.iter().flat_map(|r| r.shard.to_le_bytes()).collect();
        let offset: Vec<u8> = self.records.iter().flat_map(|r| r.offset.to_le_bytes()).collect();
        let length: Vec<u8> = self.records.iter().flat_map(|r| r.length.to_le_bytes()).collect();
        let blake: Vec<u8> = self.digests.iter().flatten().copied().collect();
        let index_path = self.dir.join(INDEX_FILE);
        let views = vec![
            ("blake3".to_string(), TensorView::new(Dtype::U8, vec![n, 32], &blake)),
            ("length".to_string(), TensorView::new(Dtype::U64, vec![n], &length)),
            ("offset".to_string(), TensorView::new(Dtype::U64, vec![n], &offset)),
            ("shard".to_string(), TensorView::new(Dtype::U32, vec![n], &shard)),
        ];
        let views = views.into_iter().map(|(k, v)| v.map(|v| (k, v))).collect::<Result<Vec<_>, _>>().map_err(|e| corrupt(&index_path, e))?;
        let bytes = safetensors::serialize(views, None).map_err(|e| corrupt(&index_path, e))?;
        fs::write(&index_path, bytes).map_err(|e| io(&index_path, "writing", e))?;
        let (height, width) = self.encoding.size().unwrap_or((0, 0));
        let meta = StoreMeta {
            channels: self.encoding.channels(),
            encoding: if matches!(self.encoding, Encoding::Raw { .. }) { "raw" } else { "file" }.into(),
            format: STORE_FORMAT.into(),
            height,
            n,
            shards: (0..self.shards).map(shard_name).collect(),
            version: STORE_VERSION,
            width,
        };
        let json_path = self.dir.join(STORE_JSON);
        let mut json = serde_json::to_vec_pretty(&meta).map_err(|e| corrupt(&json_path, e))?;
        json.push(b'\n');
        fs::write(&json_path, json).map_err(|e| io(&json_path, "writing", e))?;
        Store::open(&self.dir)
    }
}

impl Store {
    /// Raw pixels held in memory (a generated set, or a test's): `height*width*channels`
    /// bytes per image, one after another. Identical images are kept once; the second
    /// value gives each given image's index in the store.
    pub fn in_memory(height: usize, width: usize, channels: usize, pixels: Vec<u8>) -> Result<(Store, Vec<u32>), String> {
        let len = height * width * channels;
        if len == 0 || pixels.len() % len != 0 {
            return Err(format!("{} bytes are not whole images of {height}x{width}x{channels}", pixels.len()));
        }
        let encoding = Encoding::Raw { height, width, channels };
        let (mut kept, mut records, mut digests, mut rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut seen: HashMap<[u8; 32], u32> = HashMap::new();
        for img in pixels.chunks(len) {
            let d = *blake3::hash(img).as_bytes();
            let next = records.len() as u32;
            let i = *seen.entry(d).or_insert(next);
            if i == next {
                records.push(Record { shard: 0, offset: kept.len() as u64, length: len as u64 });
                digests.push(d);
                kept.extend_from_slice(img);
            }
            rows.push(i);
        }
        let identity = identity_of(&records, &digests, encoding);
        Ok((Store { encoding, records, digests, shard_names: vec![shard_name(0)], data: Data::Memory(vec![kept]), dir: None, identity }, rows))
    }

    /// Opens the store in `dir`, checking its index against its shards.
    pub fn open(dir: &Path) -> Result<Store, StageError> {
        let json_path = dir.join(STORE_JSON);
        let bytes = fs::read(&json_path).map_err(|e| io(&json_path, "reading", e))?;
        let meta: StoreMeta = serde_json::from_slice(&bytes).map_err(|e| corrupt(&json_path, format!("not an image store: {e}")))?;
        if meta.format != STORE_FORMAT || meta.version != STORE_VERSION {
            return Err(corrupt(&json_path, format!("format {} version {}, this fgflow reads {STORE_FORMAT} version {STORE_VERSION}", meta.format, meta.version)));
        }
        let encoding = match meta.encoding.as_str() {
            "raw" => Encoding::Raw { height: meta.height, width: meta.width, channels: meta.channels },
            "file" => Encoding::File { channels: meta.channels },
            other => return Err(corrupt(&json_path, format!("unknown encoding `{other}` (raw or file)"))),
        };
        if !matches!(meta.channels, 1 | 3) || matches!(encoding, Encoding::Raw { height: 0, .. } | Encoding::Raw { width: 0, .. }) {
            return Err(corrupt(&json_path, format!("images of {}x{}x{} cannot be stored", meta.height, meta.width, meta.channels)));
        }
        for name in &meta.shards {
            if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(corrupt(&json_path, format!("shard name `{name}` is not a plain file name")));
            }
        }
        let index_path = dir.join(INDEX_FILE);
        let index = fs::read(&index_path).map_err(|e| io(&index_path, "reading", e))?;
        let st = SafeTensors::deserialize(&index).map_err(|e| corrupt(&index_path, format!("not a safetensors file: {e}")))?;
        let n = meta.n;
        let tensor = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>, StageError> {
            let t = st.tensor(name).map_err(|_| corrupt(&index_path, format!("no tensor `{name}`")))?;
            if t.dtype() != dtype || t.shape() != shape {
                return Err(corrupt(&index_path, format!("tensor `{name}` is {:?} {:?}, expected {dtype:?} {shape:?}", t.dtype(), t.shape())));
            }
            Ok(t.data().to_vec())
        };
        let u64s = |b: Vec<u8>| -> Vec<u64> { b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect() };
        let shard: Vec<u32> = tensor("shard", Dtype::U32, &[n])?.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect();
        let offset = u64s(tensor("offset", Dtype::U64, &[n])?);
        let length = u64s(tensor("length", Dtype::U64, &[n])?);
        let blake = tensor("blake3", Dtype::U8, &[n, 32])?;
        let digests: Vec<[u8; 32]> = blake.chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect();
        let mut sizes = Vec::with_capacity(meta.shards.len());
        for name in &meta.shards {
            let p = dir.join(name);
            sizes.push(fs::metadata(&p).map_err(|e| io(&p, "reading", e))?.len());
        }
        let mut records = Vec::with_capacity(n);
        for i in 0..n {
            let r = Record { shard: shard[i], offset: offset[i], length: length[i] };
            let size = sizes.get(r.shard as usize).copied();
            let end = r.offset.checked_add(r.length);
            if size.is_none() || end.is_none() || end > size {
                return Err(corrupt(&index_path, format!("image {i} lies outside its shard (shard {}, bytes {}..+{}): the store is damaged or cut short", r.shard, r.offset, r.length)));
            }
            if let Encoding::Raw { height, width, channels } = encoding
                && r.length != (height * width * channels) as u64
            {
                return Err(corrupt(&index_path, format!("raw image {i} has {} bytes, {height}x{width}x{channels} needs {}", r.length, height * width * channels)));
            }
            records.push(r);
        }
        let paths: Vec<PathBuf> = meta.shards.iter().map(|name| dir.join(name)).collect();
        let data = match encoding {
            Encoding::Raw { .. } => Data::Memory(paths.iter().map(|p| fs::read(p).map_err(|e| io(p, "reading", e))).collect::<Result<_, _>>()?),
            Encoding::File { .. } => Data::Files(paths.iter().map(|p| File::open(p).map_err(|e| io(p, "opening", e))).collect::<Result<_, _>>()?),
        };
        let identity = identity_of(&records, &digests, encoding);
        Ok(Store { encoding, records, digests, shard_names: meta.shards, data, dir: Some(dir.to_path_buf()), identity })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Equal for two stores with the same images in the same places.
    pub fn identity(&self) -> [u8; 32] {
        self.identity
    }

    /// The blake3 digest of image i's stored bytes.
    pub fn digest(&self, i: usize) -> Option<[u8; 32]> {
        self.digests.get(i).copied()
    }

    /// Total bytes of the images.
    pub fn bytes_total(&self) -> u64 {
        self.records.iter().map(|r| r.length).sum()
    }

    /// The stored bytes of image i (pixels or the file's bytes).
    pub fn bytes(&self, i: usize) -> Result<Cow<'_, [u8]>, String> {
        let r = *self.records.get(i).ok_or_else(|| format!("image {i} is not in the store ({} images)", self.records.len()))?;
        match &self.data {
            Data::Memory(shards) => {
                let s = shards.get(r.shard as usize).ok_or_else(|| format!("image {i}: no shard {}", r.shard))?;
                s.get(r.offset as usize..(r.offset + r.length) as usize).map(Cow::Borrowed).ok_or_else(|| format!("image {i} lies outside its shard"))
            }
            Data::Files(files) => {
                let f = files.get(r.shard as usize).ok_or_else(|| format!("image {i}: no shard {}", r.shard))?;
                let mut buf = vec![0u8; r.length as usize];
                read_at(f, &mut buf, r.offset).map_err(|e| format!("image {i}: reading {}: {e}", self.shard_names[r.shard as usize]))?;
                Ok(Cow::Owned(buf))
            }
        }
    }

    /// Image i decoded, at its own size, with the store's channels.
    pub fn decode(&self, i: usize) -> Result<Image<'_>, String> {
        let bytes = self.bytes(i)?;
        match self.encoding {
            Encoding::Raw { height, width, channels } => Ok(Image { height, width, channels, pixels: bytes }),
            Encoding::File { channels } => decode_file(&bytes, channels),
        }
    }

    /// Puts this store's files into `dir` (created): hard links to the files it was
    /// opened from (so the cache stores them once), copies where linking fails, or the
    /// bytes of a store built in memory.
    pub fn write_to(&self, dir: &Path) -> Result<(), StageError> {
        fs::create_dir_all(dir).map_err(|e| io(dir, "creating", e))?;
        match (&self.dir, &self.data) {
            (Some(src), _) => {
                let mut names = self.shard_names.clone();
                names.extend([STORE_JSON.to_string(), INDEX_FILE.to_string()]);
                for name in names {
                    let (from, to) = (src.join(&name), dir.join(&name));
                    if fs::hard_link(&from, &to).is_err() {
                        fs::copy(&from, &to).map_err(|e| io(&to, "writing", e))?;
                    }
                }
                Ok(())
            }
            (None, Data::Memory(shards)) => {
                let Encoding::Raw { .. } = self.encoding else { return Err(StageError::failed("an in-memory store holds raw pixels")) };
                let mut b = StoreBuilder::create(dir, self.encoding)?;
                // Its images are distinct already, so each keeps its index.
                for (i, r) in self.records.iter().enumerate() {
                    let s = &shards[r.shard as usize];
                    if b.push(&s[r.offset as usize..(r.offset + r.length) as usize])? as usize != i {
                        return Err(StageError::failed("an in-memory store held an image twice"));
                    }
                }
                let written = b.finish()?;
                if written.identity() != self.identity {
                    return Err(StageError::failed(format!("the image store written to {} differs from the one in memory", dir.display())));
                }
                Ok(())
            }
            (None, Data::Files(_)) => Err(StageError::failed("a file store has a directory")),
        }
    }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

#[cfg(not(unix))]
fn read_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = std::os::windows::fs::FileExt::seek_read(f, &mut buf[done..], offset + done as u64)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        done += n;
    }
    Ok(())
}

/// A JPEG or PNG file's bytes decoded to gray (1) or RGB (3).
pub fn decode_file(bytes: &[u8], channels: usize) -> Result<Image<'static>, String> {
    let img = image::load_from_memory(bytes).map_err(|e| format!("cannot decode: {e}"))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let pixels = if channels == 1 { img.into_luma8().into_raw() } else { img.into_rgb8().into_raw() };
    Ok(Image { height: h, width: w, channels, pixels: Cow::Owned(pixels) })
}

/// A cheap check that a file is a whole JPEG or PNG, without decoding its pixels: the
/// header gives a format and a size, and the file ends as that format ends (a JPEG
/// with its end-of-image marker, a PNG with its IEND chunk), which catches a copy cut
/// short. Returns (width, height).
pub fn check_file(bytes: &[u8]) -> Result<(u32, u32), String> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot read: {e}"))?;
    let format = reader.format().ok_or("not a JPEG or PNG file")?;
    let complete = match format {
        image::ImageFormat::Jpeg => bytes.len() >= 4 && bytes.windows(2).rev().take(64).any(|w| w == [0xff, 0xd9]),
        image::ImageFormat::Png => bytes.len() >= 12 && &bytes[bytes.len() - 8..bytes.len() - 4] == b"IEND",
        other => return Err(format!("{other:?} images are not supported (JPEG or PNG)")),
    };
    let (w, h) = reader.into_dimensions().map_err(|e| format!("cannot decode its header: {e}"))?;
    if !complete {
        return Err(format!("the {format:?} file is cut short (no end marker)"));
    }
    if w == 0 || h == 0 {
        return Err(format!("an empty image ({w}x{h})"));
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_file_store_round_trips_dedups_and_shares_its_files() {
        let t = tempfile::tempdir().unwrap();
        let mut b = StoreBuilder::create(&t.path().join("a"), Encoding::File { channels: 3 }).unwrap();
        let (p1, p2) = (png(5, 3, 1), png(2, 4, 2));
        assert_eq!(b.push(&p1).unwrap(), 0);
        assert_eq!(b.push(&p2).unwrap(), 1);
        assert_eq!(b.push(&p1).unwrap(), 0, "the same bytes are stored once");
        let s = b.finish().unwrap();
        assert_eq!(s.len(), 2);
        let img = s.decode(1).unwrap();
        assert_eq!((img.height, img.width, img.channels, img.pixels.len()), (4, 2, 3, 24));
        s.write_to(&t.path().join("b")).unwrap();
        let again = Store::open(&t.path().join("b")).unwrap();
        assert_eq!(again.identity(), s.identity());
        assert_eq!(again.decode(0).unwrap(), s.decode(0).unwrap());
        assert!(s.decode(2).is_err());
    }

    #[test]
    fn a_damaged_store_is_an_error_naming_the_file() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("s");
        let mut b = StoreBuilder::create(&dir, Encoding::Raw { height: 2, width: 2, channels: 1 }).unwrap();
        b.push(&[1, 2, 3, 4]).unwrap();
        b.push(&[5, 6, 7, 8]).unwrap();
        assert!(b.push(&[1, 2, 3]).is_err(), "a raw image of the wrong size");
        b.finish().unwrap();
        // A shard cut short.
        let shard = dir.join("shard-00000.bin");
        fs::write(&shard, [1, 2, 3, 4, 5]).unwrap();
        let e = Store::open(&dir).unwrap_err().to_string();
        assert!(e.contains("index.safetensors") && e.contains("cut short"), "{e}");
        // A shard name that leaves the directory.
        let json = fs::read_to_string(dir.join(STORE_JSON)).unwrap().replace("shard-00000.bin", "../x");
        fs::write(dir.join(STORE_JSON), json).unwrap();
        assert!(Store::open(&dir).unwrap_err().to_string().contains("not a plain file name"));
    }

    #[test]
    fn check_file_catches_truncated_and_foreign_files() {
        let p = png(6, 5, 3);
        assert_eq!(check_file(&p).unwrap(), (6, 5));
        assert!(check_file(&p[..p.len() - 10]).unwrap_err().contains("cut short"));
        assert!(check_file(b"hello world, not an image").is_err());
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9])).write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
        let j = jpeg.into_inner();
        assert_eq!(check_file(&j).unwrap(), (8, 8));
        assert!(check_file(&j[..j.len() / 2]).is_err());
        assert!(decode_file(&j[..j.len() / 2], 3).is_err() || check_file(&j[..j.len() / 2]).is_err());
    }
}
