//! fgflow's content-addressed store: digests, blobs, trees, entries, refs, the stat
//! cache, locks and garbage collection. Knows nothing of pipelines, stages or burn.

pub mod capture;
pub mod damage;
pub mod digest;
pub mod entry;
pub mod gc;
pub mod lock;
pub mod stat_cache;
pub mod store;
pub mod tree;

pub use digest::Digest;
pub use entry::Entry;
pub use gc::{GcReport, VerifyChecks, VerifyReport, gc, verify, verify_with};
pub use lock::FileLock;
pub use stat_cache::{HashCounts, StatCache};
pub use store::{BlobStamp, CacheError, Materialize, Store};
pub use tree::{Tree, TreeFile};
