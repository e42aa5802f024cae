//! `Digest`: a blake3 hash, the one identity used everywhere (blobs, trees, keys).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Files at least this big are hashed with blake3's memory-mapped, multi-threaded path.
const MMAP_THRESHOLD: u64 = 16 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Hash a file's content at blake3 speed (all cores for large files).
    pub fn of_file(path: &Path) -> io::Result<Digest> {
        let len = std::fs::metadata(path)?.len();
        let mut hasher = blake3::Hasher::new();
        if len >= MMAP_THRESHOLD {
            hasher.update_mmap_rayon(path)?;
        } else {
            let mut file = File::open(path)?;
            // No bigger than the file: a large zeroed buffer per small source costs
            // more than hashing it.
            let mut buf = vec![0u8; (len as usize).clamp(1, 256 << 10)];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        Ok(Digest(*hasher.finalize().as_bytes()))
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The first 12 hex digits, as printed in tables.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not a digest: `{0}` (expected 64 hex digits)")]
pub struct BadDigest(pub String);

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadDigest(s.to_string()));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| BadDigest(s.to_string()))?;
        }
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = Digest::of_bytes(b"fgflow");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!("xyz".parse::<Digest>().is_err());
    }

    #[test]
    fn file_and_bytes_agree_across_the_mmap_threshold() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 10, (MMAP_THRESHOLD + 7) as usize] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let p = dir.path().join("f");
            std::fs::write(&p, &data).unwrap();
            assert_eq!(Digest::of_file(&p).unwrap(), Digest::of_bytes(&data));
        }
    }
}
