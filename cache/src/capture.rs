//! What a stage leaves behind, made safe to take into the store: symbolic links and
//! special files in an output directory, and the modes blobs get.
//!
//! A stage's output is captured by moving its files into the store. Two things must
//! never happen on the way: a file that does not belong to the stage (a link to the
//! user's home, a hard link to a file elsewhere) becoming a blob, and a part of the
//! output disappearing without a word. So a symbolic link is replaced by a copy of
//! its target when the target lies inside the stage's own directory, and is an error
//! naming the link otherwise; FIFOs, sockets and devices are errors too. Hard links
//! are handled where files are moved in (`Store::put_file` copies a file whose link
//! count is above one instead of taking the inode).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// An output that cannot be captured as it is.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("output `{}` is a symbolic link to `{}`, outside the stage's directory: write the file itself (fgflow never captures files it does not own)", link.display(), target.display())]
    LinkOutside { link: PathBuf, target: PathBuf },
    #[error("output `{}` is a symbolic link to `{}`, which does not exist", link.display(), target.display())]
    DanglingLink { link: PathBuf, target: PathBuf },
    #[error("output `{}` is a symbolic link to a directory that contains it", link.display())]
    LinkLoop { link: PathBuf },
    #[error("output `{}` is a {what}: only regular files and directories can be captured", path.display())]
    Special { path: PathBuf, what: &'static str },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Io { path: path.to_path_buf(), source }
}

/// What kind of non-regular file `ft` is, for messages; `None` for files, dirs, links.
pub fn special_kind(ft: &fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        Some("named pipe")
    } else if ft.is_socket() {
        Some("socket")
    } else if ft.is_block_device() || ft.is_char_device() {
        Some("device")
    } else {
        None
    }
}

/// Replace every symbolic link under `path` (or `path` itself) by a copy of its target,
/// provided the target resolves inside one of `allowed` (the stage's directory, and
/// for a command its inputs and deps: passing an input through is legitimate); any
/// other link, and any special file, is an error naming it. Returns how many links
/// were replaced.
pub fn resolve_links(path: &Path, allowed: &[&Path]) -> Result<usize, CaptureError> {
    let boundary: Vec<PathBuf> = allowed.iter().map(|b| fs::canonicalize(b).map_err(io_err(b))).collect::<Result<_, _>>()?;
    // Collect first, then replace: copies of directories never contain links (the
    // copy resolves them), so one pass sees every link there is.
    let mut links = Vec::new();
    let root_meta = fs::symlink_metadata(path).map_err(io_err(path))?;
    if root_meta.file_type().is_symlink() {
        links.push(path.to_path_buf());
    } else {
        for e in walkdir::WalkDir::new(path).follow_root_links(false).sort_by_file_name() {
            let e = e.map_err(|e| CaptureError::Io { path: path.to_path_buf(), source: e.into() })?;
            let ft = e.file_type();
            if ft.is_symlink() {
                links.push(e.path().to_path_buf());
            } else if let Some(what) = special_kind(&ft) {
                return Err(CaptureError::Special { path: e.path().to_path_buf(), what });
            }
        }
    }
    for link in &links {
        let written = fs::read_link(link).map_err(io_err(link))?;
        let target = match fs::canonicalize(link) {
            Ok(t) => t,
            Err(_) => return Err(CaptureError::DanglingLink { link: link.clone(), target: written }),
        };
        if !inside(&target, &boundary) {
            return Err(CaptureError::LinkOutside { link: link.clone(), target });
        }
        let link_dir = link.parent().and_then(|p| fs::canonicalize(p).ok()).unwrap_or_default();
        let meta = fs::metadata(&target).map_err(io_err(&target))?;
        if meta.is_dir() {
            if link_dir.starts_with(&target) {
                return Err(CaptureError::LinkLoop { link: link.clone() });
            }
            fs::remove_file(link).map_err(io_err(link))?;
            copy_dir(&target, link, &boundary)?;
        } else if meta.is_file() {
            fs::remove_file(link).map_err(io_err(link))?;
            fs::copy(&target, link).map_err(io_err(link))?;
        } else {
            let what = special_kind(&meta.file_type()).unwrap_or("special file");
            return Err(CaptureError::Special { path: target, what });
        }
    }
    Ok(links.len())
}

fn inside(target: &Path, allowed: &[PathBuf]) -> bool {
    allowed.iter().any(|b| target.starts_with(b))
}

/// Copy a directory (following links inside `allowed`, refusing others).
fn copy_dir(from: &Path, to: &Path, allowed: &[PathBuf]) -> Result<(), CaptureError> {
    fs::create_dir_all(to).map_err(io_err(to))?;
    for e in walkdir::WalkDir::new(from).min_depth(1).follow_links(true).sort_by_file_name() {
        let e = e.map_err(|e| CaptureError::Io { path: from.to_path_buf(), source: e.into() })?;
        if e.path_is_symlink() {
            let target = fs::canonicalize(e.path()).map_err(io_err(e.path()))?;
            if !inside(&target, allowed) {
                return Err(CaptureError::LinkOutside { link: e.path().to_path_buf(), target });
            }
        }
        let rel = e.path().strip_prefix(from).expect("walkdir yields paths under its root");
        let dest = to.join(rel);
        let ft = e.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&dest).map_err(io_err(&dest))?;
        } else if ft.is_file() {
            fs::copy(e.path(), &dest).map_err(io_err(&dest))?;
        } else {
            let what = special_kind(&ft).unwrap_or("special file");
            return Err(CaptureError::Special { path: e.path().to_path_buf(), what });
        }
    }
    Ok(())
}

/// The mode of a new file under this process's umask (`0o666 & !umask`), found once by
/// creating a probe file: reading the umask through `umask(2)` would change it for every
/// thread for a moment.
fn umask_mode(tmp: &Path) -> u32 {
    static MODE: OnceLock<u32> = OnceLock::new();
    *MODE.get_or_init(|| {
        tempfile::Builder::new()
            .permissions(fs::Permissions::from_mode(0o666))
            .tempfile_in(tmp)
            .ok()
            .and_then(|f| f.as_file().metadata().ok())
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0o644)
    })
}

/// Mode of a blob: readable as a new file would be under the umask (so a cache shared
/// by a group is readable by its members where the umask allows), never writable, and
/// group-readable whenever the cache directory itself is shared with its group
/// (group-writable or setgid), whatever the umask of the process that wrote the blob.
pub fn blob_mode(cache_root: &Path) -> u32 {
    let mut mode = (umask_mode(&cache_root.join("tmp")) & 0o444) | 0o400;
    if let Ok(m) = fs::metadata(cache_root) {
        let dir = m.permissions().mode();
        if dir & 0o020 != 0 || dir & 0o2000 != 0 {
            mode |= 0o040;
        }
    }
    mode
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_inside_are_copied_and_links_outside_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let out = work.join("out");
        fs::create_dir_all(out.join("sub")).unwrap();
        fs::write(work.join("data.bin"), "inside").unwrap();
        fs::create_dir_all(work.join("d")).unwrap();
        fs::write(work.join("d/f.txt"), "in d").unwrap();
        std::os::unix::fs::symlink("../data.bin", out.join("a.bin")).unwrap();
        std::os::unix::fs::symlink("../../d", out.join("sub/d")).unwrap();
        assert_eq!(resolve_links(&out, &[&work]).unwrap(), 2);
        assert_eq!(fs::read_to_string(out.join("a.bin")).unwrap(), "inside");
        assert!(!fs::symlink_metadata(out.join("a.bin")).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(out.join("sub/d/f.txt")).unwrap(), "in d");

        let secret = dir.path().join("secret.txt");
        fs::write(&secret, "mine").unwrap();
        std::os::unix::fs::symlink(&secret, out.join("leak.txt")).unwrap();
        let e = resolve_links(&out, &[&work]).unwrap_err();
        assert!(matches!(e, CaptureError::LinkOutside { .. }), "{e}");
        assert!(e.to_string().contains("leak.txt"), "{e}");
        assert_eq!(fs::read_to_string(&secret).unwrap(), "mine");

        fs::remove_file(out.join("leak.txt")).unwrap();
        std::os::unix::fs::symlink("nowhere", out.join("dangling")).unwrap();
        assert!(matches!(resolve_links(&out, &[&work]).unwrap_err(), CaptureError::DanglingLink { .. }));
        fs::remove_file(out.join("dangling")).unwrap();
        std::os::unix::fs::symlink("..", out.join("sub/up")).unwrap();
        assert!(matches!(resolve_links(&out, &[&work]).unwrap_err(), CaptureError::LinkLoop { .. }));
    }

    #[test]
    fn a_link_as_the_output_itself_is_resolved() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("real.txt"), "x").unwrap();
        std::os::unix::fs::symlink("real.txt", dir.path().join("o.txt")).unwrap();
        resolve_links(&dir.path().join("o.txt"), &[dir.path()]).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("o.txt")).unwrap(), "x");
    }

    #[test]
    fn fifos_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("p");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = resolve_links(dir.path(), &[dir.path()]).unwrap_err();
        assert!(matches!(e, CaptureError::Special { what: "named pipe", .. }), "{e}");
    }

    #[test]
    fn a_hard_linked_output_is_copied_not_taken() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path().join("c")).unwrap();
        let notes = dir.path().join("notes.txt");
        fs::write(&notes, "my notes").unwrap();
        let out = dir.path().join("c/tmp/out");
        fs::create_dir_all(&out).unwrap();
        fs::hard_link(&notes, out.join("o.txt")).unwrap();
        let (d, _) = store.put_tree(&out, true).unwrap();
        let tree = store.read_tree(&d).unwrap();
        let blob = store.blob_path(&tree.files[0].digest);
        // The user's file is still theirs: writable, one link, not the blob's inode.
        let m = fs::metadata(&notes).unwrap();
        assert_eq!(m.nlink(), 1);
        assert!(!m.permissions().readonly());
        assert_ne!(m.ino(), fs::metadata(&blob).unwrap().ino());
        fs::write(&notes, "edited later").unwrap();
        assert_eq!(fs::read_to_string(&blob).unwrap(), "my notes");
    }

    #[test]
    fn links_and_fifos_in_a_tree_are_refused_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path().join("c")).unwrap();
        let out = dir.path().join("out");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("a.txt"), "a").unwrap();
        std::os::unix::fs::symlink("a.txt", out.join("b.txt")).unwrap();
        let e = store.put_tree(&out, true).unwrap_err().to_string();
        assert!(e.contains("b.txt") && e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn blobs_are_never_writable_and_readable_by_the_group_of_a_shared_cache() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("c");
        let store = crate::Store::open(&root).unwrap();
        let src = dir.path().join("x");
        fs::write(&src, "x").unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o777)).unwrap();
        let (d, _) = store.put_file(&src, true).unwrap();
        let mode = fs::metadata(store.blob_path(&d)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode & 0o222, 0, "{mode:o}");
        assert_eq!(mode & 0o111, 0, "{mode:o}");
        assert_ne!(mode & 0o400, 0, "{mode:o}");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2770)).unwrap();
        let d2 = store.put_bytes(b"group").unwrap();
        let mode = fs::metadata(store.blob_path(&d2)).unwrap().permissions().mode();
        assert_ne!(mode & 0o040, 0, "{mode:o}");
    }

    #[test]
    fn a_directory_where_a_blob_belongs_is_moved_aside_and_the_blob_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path().join("c")).unwrap();
        let d = crate::Digest::of_bytes(b"content");
        fs::create_dir_all(store.blob_path(&d)).unwrap();
        assert_eq!(store.put_bytes(b"content").unwrap(), d);
        assert_eq!(store.read_blob(&d).unwrap(), b"content");
    }

    #[test]
    fn names_that_are_not_utf8_are_refused_not_mangled() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path().join("c")).unwrap();
        let out = dir.path().join("out");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join(std::ffi::OsStr::from_bytes(b"a\xff.txt")), "x").unwrap();
        let e = store.put_tree(&out, true).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
