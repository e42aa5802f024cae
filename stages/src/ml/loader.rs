//! The loader: batches of augmented images made by worker threads ahead of the step
//! that consumes them, in a bounded queue, delivered in order.
//!
//! What it guarantees, and why:
//! - **Determinism whatever the thread count.** Each image's augmentation draws from
//!   its own stream, seeded by (salt, seed, epoch, index of the image in its set), never
//!   from which thread made it or when; the epoch's order is drawn from (salt, seed,
//!   epoch). The same seed gives byte-identical batches with 0, 1 or 16 threads
//!   (`tests::batches_do_not_depend_on_the_thread_count`).
//! - **Bounded memory.** Workers claim a batch only while fewer than `prefetch` batches
//!   are claimed and not yet handed over, so at most `prefetch` batches exist besides
//!   the one being consumed, whatever the data set's size.
//! - **Order.** Batch b is handed over before b + 1, whichever finished first.
//! - **No hang.** An error in a worker (an unreadable image) or in the consumer (a
//!   failed step) stops every thread and is returned; a panic is re-raised by the scope.
//!
//! Threads: `FGFLOW_LOADER_THREADS` (default 2; 0 makes batches on the consuming thread)
//! and `FGFLOW_LOADER_PREFETCH` (default 4), like PyTorch's `num_workers` and
//! `prefetch_factor`, except that they cannot change a result, so they are settings of
//! the machine, not parameters of a stage (and not part of its key).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::augment::AugmentConfig;
use super::data::Images;
use super::resize::{Target, fit};
use crate::artifact::ImageSet;
use crate::store::Image;

/// Images addressed by index, each at its own size (`fit` brings it to the model's).
/// `Sync`: workers read it concurrently.
pub trait ImageSource: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Image `i` decoded, or why it cannot be (naming the image).
    fn image(&self, i: usize) -> Result<Image<'_>, String>;
}

impl<T: ImageSource + ?Sized> ImageSource for &T {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn image(&self, i: usize) -> Result<Image<'_>, String> {
        (**self).image(i)
    }
}

impl ImageSource for Images<'_> {
    fn len(&self) -> usize {
        self.n
    }
    fn image(&self, i: usize) -> Result<Image<'_>, String> {
        if i >= self.n {
            return Err(format!("image {i} is out of range ({} images)", self.n));
        }
        Ok(Image { height: self.height, width: self.width, channels: self.channels, pixels: Cow::Borrowed(Images::image(self, i)) })
    }
}

impl ImageSource for ImageSet {
    fn len(&self) -> usize {
        self.n()
    }
    fn image(&self, i: usize) -> Result<Image<'_>, String> {
        ImageSet::image(self, i)
    }
}

/// Several sources as one (index = position in the concatenation), for MAE
/// pre-training on a pool of sets.
pub struct Concat<'a, S: ImageSource> {
    parts: &'a [S],
    starts: Vec<usize>,
}

impl<'a, S: ImageSource> Concat<'a, S> {
    pub fn new(parts: &'a [S]) -> Self {
        let mut starts = Vec::with_capacity(parts.len());
        let mut at = 0;
        for p in parts {
            starts.push(at);
            at += p.len();
        }
        Concat { parts, starts }
    }
}

impl<S: ImageSource> ImageSource for Concat<'_, S> {
    fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }
    fn image(&self, i: usize) -> Result<Image<'_>, String> {
        let part = self.starts.partition_point(|&s| s <= i).saturating_sub(1);
        self.parts.get(part).ok_or_else(|| format!("image {i} is out of range"))?.image(i - self.starts[part])
    }
}

/// Threads and queue depth (see the module's note).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    pub threads: usize,
    pub prefetch: usize,
}

impl LoaderConfig {
    /// From `FGFLOW_LOADER_THREADS` and `FGFLOW_LOADER_PREFETCH`; unset or unreadable
    /// values take the defaults (they cannot change a result, only its speed).
    pub fn from_env() -> Self {
        let read = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(default);
        LoaderConfig { threads: read("FGFLOW_LOADER_THREADS", 2).min(64), prefetch: read("FGFLOW_LOADER_PREFETCH", 4).clamp(1, 64) }
    }
}

/// One batch: which images (indices into the source) and their augmented pixels as
/// normalised NCHW floats (`data::to_nchw`'s mapping).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub indices: Vec<usize>,
    pub nchw: Vec<f32>,
}

/// What a pass measured; `peak_ahead` is the most batches that were claimed by workers
/// and not yet handed over at once (never above `prefetch`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoaderStats {
    pub batches: usize,
    pub peak_ahead: usize,
}

/// A stream of its own per (salt, seed, a, b): splitmix64 finalisers over the words, so
/// neighbouring indices give unrelated streams.
pub fn stream(salt: u64, seed: u64, a: u64, b: u64) -> ChaCha8Rng {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let mut h = mix(salt);
    for w in [seed, a, b] {
        h = mix(h ^ w);
    }
    ChaCha8Rng::seed_from_u64(h)
}

/// The order of `n` images in `epoch`: a permutation drawn from (salt, seed, epoch) alone.
pub fn epoch_order(n: usize, salt: u64, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut stream(salt, seed, epoch as u64, u64::MAX));
    order
}

/// The augmentation of one pass: what to apply and the streams to draw from.
#[derive(Debug, Clone, Copy)]
pub struct Augmentation<'a> {
    pub config: &'a AugmentConfig,
    pub salt: u64,
    pub seed: u64,
    pub epoch: usize,
}

fn make_batch<S: ImageSource + ?Sized>(source: &S, indices: &[usize], target: Target, aug: Option<Augmentation<'_>>) -> Result<Batch, String> {
    let Target { height: h, width: w, channels: c } = target;
    let plane = h * w;
    let mut nchw = vec![0f32; indices.len() * c * plane];
    for (b, &i) in indices.iter().enumerate() {
        let img = source.image(i)?;
        let img = match aug {
            Some(a) => {
                let mut rng = stream(a.salt, a.seed, a.epoch as u64, i as u64);
                let random = (a.config.crop_scale > 0.0).then_some(a.config.crop_scale);
                let fitted = fit(img, target, random.map(|s| (s, &mut rng)))?;
                if a.config.is_none() { fitted } else { Cow::Owned(a.config.apply(&fitted, h, w, c, &mut rng)) }
            }
            None => fit(img, target, None)?,
        };
        if img.len() != plane * c {
            return Err(format!("image {i} has {} bytes, {h}x{w}x{c} needs {}", img.len(), plane * c));
        }
        super::data::hwc_to_chw(&img, plane, c, &mut nchw[b * c * plane..(b + 1) * c * plane]);
    }
    Ok(Batch { indices: indices.to_vec(), nchw })
}

/// Why a pass stopped: an image could not be read, or the consumer failed.
#[derive(Debug)]
pub enum PassError<E> {
    Image(String),
    Consumer(E),
}

impl PassError<fgflow_engine::StageError> {
    /// As the stage's error: an image's problem after `what` ("training set: ..."), or
    /// the consumer's own error as it was.
    pub fn into_stage(self, what: &str) -> fgflow_engine::StageError {
        match self {
            PassError::Image(e) => fgflow_engine::StageError::failed(format!("{what}: {e}")),
            PassError::Consumer(e) => e,
        }
    }
}

struct Shared {
    next: usize,
    handed: usize,
    ready: BTreeMap<usize, Result<Batch, String>>,
    stop: bool,
    peak_ahead: usize,
}

/// Make the batches `batches` (lists of indices into `source`) at `target` with `aug`
/// (None: the centre crop, unaugmented, as prediction wants them), and give each to `consume` in order.
pub fn run_pass<S, E>(
    source: &S,
    batches: &[Vec<usize>],
    target: Target,
    aug: Option<Augmentation<'_>>,
    config: LoaderConfig,
    mut consume: impl FnMut(usize, Batch) -> Result<(), E>,
) -> Result<LoaderStats, PassError<E>>
where
    S: ImageSource + ?Sized,
{
    if config.threads == 0 {
        for (b, indices) in batches.iter().enumerate() {
            let batch = make_batch(source, indices, target, aug).map_err(PassError::Image)?;
            consume(b, batch).map_err(PassError::Consumer)?;
        }
        return Ok(LoaderStats { batches: batches.len(), peak_ahead: 0 });
    }
    let prefetch = config.prefetch.max(1);
    let state = Mutex::new(Shared { next: 0, handed: 0, ready: BTreeMap::new(), stop: false, peak_ahead: 0 });
    let changed = Condvar::new();
    // Poisoning only follows a panic, which the scope re-raises anyway.
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    std::thread::scope(|scope| {
        for _ in 0..config.threads {
            scope.spawn(|| {
                loop {
                    let b = {
                        let mut s = lock();
                        while !s.stop && s.next < batches.len() && s.next >= s.handed + prefetch {
                            s = changed.wait(s).unwrap_or_else(|p| p.into_inner());
                        }
                        if s.stop || s.next >= batches.len() {
                            return;
                        }
                        s.next += 1;
                        s.peak_ahead = s.peak_ahead.max(s.next - s.handed);
                        s.next - 1
                    };
                    let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make_batch(source, &batches[b], target, aug)))
                        .unwrap_or_else(|_| Err(format!("making batch {b} panicked")));
                    let mut s = lock();
                    s.ready.insert(b, made);
                    changed.notify_all();
                }
            });
        }
        // Stops the workers however the consumer leaves (error, panic, or done).
        struct StopOnDrop<'a>(&'a Mutex<Shared>, &'a Condvar);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
                self.1.notify_all();
            }
        }
        let _stop = StopOnDrop(&state, &changed);
        for b in 0..batches.len() {
            let made = {
                let mut s = lock();
                loop {
                    if let Some(m) = s.ready.remove(&b) {
                        s.handed = b + 1;
                        changed.notify_all();
                        break m;
                    }
                    s = changed.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            };
            let batch = made.map_err(PassError::Image)?;
            consume(b, batch).map_err(PassError::Consumer)?;
        }
        Ok(LoaderStats { batches: batches.len(), peak_ahead: lock().peak_ahead })
    })
}

/// `order` cut into batches of `batch_size`; a last batch of one image is dropped when
/// the set has more (a lone sample gives BatchNorm a zero variance). The second value
/// says whether one was dropped.
pub fn batches_of(order: &[usize], batch_size: usize) -> (Vec<Vec<usize>>, bool) {
    let bs = batch_size.max(1);
    let mut out: Vec<Vec<usize>> = order.chunks(bs).map(|c| c.to_vec()).collect();
    let dropped = order.len() >= 2 && out.last().is_some_and(|c| c.len() < 2);
    if dropped {
        out.pop();
    }
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn images(n: usize) -> Vec<u8> {
        (0..n * 6 * 6).map(|v| (v * 37 % 251) as u8).collect()
    }

    fn all_batches(px: &[u8], n: usize, config: LoaderConfig, epoch: usize) -> Vec<Batch> {
        let src = Images::new(n, 6, 6, 1, px).unwrap();
        let aug = AugmentConfig { shift: 2, flip: 0.5, erase: 0.5, randaugment_n: 2, randaugment_m: 9, crop_scale: 0.3 };
        let (batches, _) = batches_of(&epoch_order(n, 1, 7, epoch), 4);
        let mut out = Vec::new();
        let target = Target { height: 5, width: 5, channels: 1 };
        run_pass(&src, &batches, target, Some(Augmentation { config: &aug, salt: 1, seed: 7, epoch }), config, |_, b| {
            out.push(b);
            Ok::<(), ()>(())
        })
        .unwrap();
        out
    }

    #[test]
    fn batches_do_not_depend_on_the_thread_count() {
        let px = images(37);
        let inline = all_batches(&px, 37, LoaderConfig { threads: 0, prefetch: 1 }, 2);
        assert_eq!(inline.len(), 9, "37 images in 4s: the lone last one is dropped");
        for threads in [1, 3] {
            for prefetch in [1, 5] {
                assert_eq!(all_batches(&px, 37, LoaderConfig { threads, prefetch }, 2), inline, "{threads} threads, prefetch {prefetch}");
            }
        }
        // Another epoch draws another order and other augmentations.
        assert_ne!(all_batches(&px, 37, LoaderConfig { threads: 3, prefetch: 2 }, 3), inline);
    }

    const SIX: Target = Target { height: 6, width: 6, channels: 1 };

    /// A source that counts the images being made at once, slowly.
    struct Slow<'a>(Images<'a>, AtomicUsize);
    impl ImageSource for Slow<'_> {
        fn len(&self) -> usize {
            self.0.n
        }
        fn image(&self, i: usize) -> Result<Image<'_>, String> {
            self.1.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(1));
            if i == 29 { Err("image 29 (a.jpg): truncated".into()) } else { ImageSource::image(&self.0, i) }
        }
    }

    #[test]
    fn the_queue_stays_bounded_behind_a_slow_consumer() {
        let px = images(28);
        let src = Slow(Images::new(28, 6, 6, 1, &px).unwrap(), AtomicUsize::new(0));
        let batches: Vec<Vec<usize>> = (0..28).map(|i| vec![i]).collect();
        let stats = run_pass(&src, &batches, SIX, None, LoaderConfig { threads: 3, prefetch: 2 }, |_, _| {
            std::thread::sleep(std::time::Duration::from_millis(3));
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(stats.batches, 28);
        assert!(stats.peak_ahead <= 2 && stats.peak_ahead >= 1, "{stats:?}");
    }

    #[test]
    fn an_unreadable_image_or_a_failing_consumer_stops_the_pass() {
        let px = images(40);
        let src = Slow(Images::new(40, 6, 6, 1, &px).unwrap(), AtomicUsize::new(0));
        let batches: Vec<Vec<usize>> = (0..40).map(|i| vec![i]).collect();
        let err = run_pass(&src, &batches, SIX, None, LoaderConfig { threads: 3, prefetch: 3 }, |_, _| Ok::<(), ()>(())).unwrap_err();
        assert!(matches!(&err, PassError::Image(m) if m.contains("a.jpg")), "{err:?}");
        // It stopped: not every image was read (29 and at most a queue's worth beyond).
        assert!(src.1.load(Ordering::SeqCst) <= 29 + 1 + 3 + 3);
        let err = run_pass(&src, &batches, SIX, None, LoaderConfig { threads: 2, prefetch: 2 }, |b, _| if b == 3 { Err("step failed") } else { Ok(()) }).unwrap_err();
        assert!(matches!(err, PassError::Consumer("step failed")));
    }

    #[test]
    fn a_lone_last_sample_is_dropped_and_concat_addresses_every_part() {
        let (b, dropped) = batches_of(&[0, 1, 2, 3, 4], 2);
        assert_eq!((b.len(), dropped), (2, true));
        let (b, dropped) = batches_of(&[0], 2);
        assert_eq!((b.len(), dropped), (1, false));
        let (a, c) = (images(3), images(2));
        let parts = [Images::new(3, 6, 6, 1, &a).unwrap(), Images::new(2, 6, 6, 1, &c).unwrap()];
        let cat = Concat::new(&parts);
        assert_eq!(cat.len(), 5);
        assert_eq!(cat.image(3).unwrap().pixels.as_ref(), parts[1].image(0));
        assert_eq!(cat.image(2).unwrap().pixels.as_ref(), parts[0].image(2));
        assert!(cat.image(5).is_err());
    }
}
