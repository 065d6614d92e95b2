//! Disk faults: damage to a stopped node's files (a bit flipped in a sealed WAL segment, a
//! truncated segment, a damaged meta file or log-start file), each undoable from a backup of
//! the file, and a full disk (each node's data directory on its own small tmpfs, which the
//! harness fills with a ballast file, then frees).
//!
//! File layout (docs/node-format.md, docs/wal-format.md): `<data_dir>/wal/NNNN.wal` segments
//! (20-digit ids), `<data_dir>/wal/meta` (two 512-byte slots, each 64 bytes with a CRC at 60),
//! `<data_dir>/log-start` (only after a trim or a log restart).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rand::Rng;

/// A tmpfs mounted at a directory; unmounted (lazily) on drop.
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size_mb: u64) -> anyhow::Result<Tmpfs> {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(path)
            .status()
            .context("run mount")?;
        if !status.success() {
            bail!("mount -t tmpfs -o size={size_mb}m tmpfs {} failed ({status})", path.display());
        }
        Ok(Tmpfs { path: path.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The ballast file that fills a node's tmpfs.
fn ballast_path(mount: &Path) -> PathBuf {
    mount.join("ballast")
}

/// Writes zeros into `mount`/ballast until the file system is full; the bytes written.
pub fn fill(mount: &Path) -> anyhow::Result<u64> {
    let path = ballast_path(mount);
    let mut file =
        std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC: full, as intended
            Err(e) => return Err(e).with_context(|| format!("write {}", path.display())),
        }
    }
    // Fill the last partial page too.
    for size in [4096usize, 512, 1] {
        while let Ok(n) = file.write(&chunk[..size]) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
    }
    Ok(written)
}

/// Removes the ballast file.
pub fn free(mount: &Path) {
    let _ = std::fs::remove_file(ballast_path(mount));
}

/// A damaged file and how to undo it.
#[derive(Debug)]
pub struct Damage {
    /// What was done, for the report.
    pub detail: String,
    /// The file and its bytes before (None: the file did not exist).
    backup: (PathBuf, Option<Vec<u8>>),
}

impl Damage {
    /// Puts the file back as it was.
    pub fn undo(&self) -> anyhow::Result<()> {
        let (path, bytes) = &self.backup;
        match bytes {
            Some(b) => {
                std::fs::write(path, b).with_context(|| format!("restore {}", path.display()))
            }
            None => {
                std::fs::remove_file(path).with_context(|| format!("remove {}", path.display()))
            }
        }
    }
}

/// The node's segments in id order.
fn segments(data_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let wal = data_dir.join("wal");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&wal)
        .with_context(|| format!("list {}", wal.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    out.sort();
    Ok(out)
}

/// A sealed segment (any but the last) if there is one, else the active one; and which.
fn pick_segment(data_dir: &Path, rng: &mut impl Rng) -> anyhow::Result<(PathBuf, &'static str)> {
    let segs = segments(data_dir)?;
    match segs.len() {
        0 => bail!("{} has no WAL segment", data_dir.display()),
        1 => Ok((segs[0].clone(), "the only (active, unsealed) segment")),
        n => Ok((segs[rng.random_range(0..n - 1)].clone(), "a sealed segment")),
    }
}

/// The bytes a segment's frames take: up to the last non-zero byte (segments are
/// preallocated, so the file size says nothing).
fn used_bytes(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

fn backup(path: &Path) -> anyhow::Result<(PathBuf, Option<Vec<u8>>)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    Ok((path.to_path_buf(), bytes))
}

const SEGMENT_HEADER_BYTES: usize = 64;

/// Flips one bit in the written part of a segment (past its header).
pub fn flip_segment_bit(data_dir: &Path, rng: &mut impl Rng) -> anyhow::Result<Damage> {
    let (path, which) = pick_segment(data_dir, rng)?;
    let backup = backup(&path)?;
    let mut bytes = backup.1.clone().context("the segment vanished")?;
    let used = used_bytes(&bytes);
    if used <= SEGMENT_HEADER_BYTES + 1 {
        bail!("{} holds no frames yet", path.display());
    }
    let at = rng.random_range(SEGMENT_HEADER_BYTES..used);
    let bit = rng.random_range(0..8u8);
    bytes[at] ^= 1 << bit;
    write_in_place(&path, at, &bytes[at..=at])?;
    Ok(Damage {
        detail: format!(
            "flipped bit {bit} of byte {at} of {} ({which}, {used} bytes written)",
            file_name(&path)
        ),
        backup,
    })
}

/// Truncates a segment to a random length inside its written part.
pub fn truncate_segment(data_dir: &Path, rng: &mut impl Rng) -> anyhow::Result<Damage> {
    let (path, which) = pick_segment(data_dir, rng)?;
    let backup = backup(&path)?;
    let bytes = backup.1.as_ref().context("the segment vanished")?;
    let used = used_bytes(bytes);
    if used <= SEGMENT_HEADER_BYTES + 1 {
        bail!("{} holds no frames yet", path.display());
    }
    let len = rng.random_range(SEGMENT_HEADER_BYTES..used) as u64;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    file.set_len(len).with_context(|| format!("truncate {}", path.display()))?;
    Ok(Damage {
        detail: format!(
            "truncated {} ({which}) from {} to {len} bytes ({used} were written)",
            file_name(&path),
            bytes.len()
        ),
        backup,
    })
}

/// Flips one bit in one of the meta file's two slots (the winning slot or the other).
pub fn damage_meta(data_dir: &Path, rng: &mut impl Rng) -> anyhow::Result<Damage> {
    let path = data_dir.join("wal/meta");
    let backup = backup(&path)?;
    let bytes = backup.1.as_ref().with_context(|| format!("{} is missing", path.display()))?;
    if bytes.len() < 1024 {
        bail!("{} is {} bytes, expected 1024", path.display(), bytes.len());
    }
    let seq = |slot: usize| {
        let o = slot * 512 + 8;
        u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]))
    };
    let newest = if seq(1) > seq(0) { 1 } else { 0 };
    let slot = if rng.random_bool(0.5) { newest } else { 1 - newest };
    let at = slot * 512 + rng.random_range(8..60);
    let bit = rng.random_range(0..8u8);
    let byte = [bytes[at] ^ (1 << bit)];
    write_in_place(&path, at, &byte)?;
    Ok(Damage {
        detail: format!(
            "flipped bit {bit} of byte {at} of wal/meta (slot {slot}, {} slot; seqs {} and {})",
            if slot == newest { "the newest" } else { "the older" },
            seq(0),
            seq(1)
        ),
        backup,
    })
}

/// Damages the log-start file: flips a bit if it exists, else writes 16 garbage bytes.
pub fn damage_log_start(data_dir: &Path, rng: &mut impl Rng) -> anyhow::Result<Damage> {
    let path = data_dir.join("log-start");
    let backup = backup(&path)?;
    let detail = match &backup.1 {
        Some(bytes) if !bytes.is_empty() => {
            let at = rng.random_range(0..bytes.len());
            let byte = [bytes[at] ^ 0x10];
            write_in_place(&path, at, &byte)?;
            format!("flipped bit 4 of byte {at} of log-start ({} bytes)", bytes.len())
        }
        _ => {
            let garbage: Vec<u8> = (0..16).map(|_| rng.random()).collect();
            std::fs::write(&path, &garbage).with_context(|| format!("write {}", path.display()))?;
            "wrote a 16-byte garbage log-start (the node had none: it never trimmed)".to_string()
        }
    };
    Ok(Damage { detail, backup })
}

fn write_in_place(path: &Path, at: usize, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    file.write_all_at(bytes, at as u64).with_context(|| format!("write {}", path.display()))?;
    file.sync_all().with_context(|| format!("sync {}", path.display()))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn damage_is_undone_byte_for_byte() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let wal = dir.path().join("wal");
        std::fs::create_dir_all(&wal)?;
        let mut seg = vec![7u8; 4096];
        seg.extend(vec![0u8; 4096]);
        std::fs::write(wal.join("00000000000000000001.wal"), &seg)?;
        std::fs::write(wal.join("00000000000000000002.wal"), &seg)?;
        std::fs::write(wal.join("meta"), vec![1u8; 1024])?;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let done = [
            flip_segment_bit(dir.path(), &mut rng)?,
            truncate_segment(dir.path(), &mut rng)?,
            damage_meta(dir.path(), &mut rng)?,
            damage_log_start(dir.path(), &mut rng)?,
        ];
        assert!(std::fs::read(wal.join("00000000000000000001.wal"))? != seg);
        assert!(std::fs::read(wal.join("meta"))? != vec![1u8; 1024]);
        // Each backup holds the file as the damage before it left it: undo in reverse.
        for damage in done.iter().rev() {
            damage.undo()?;
        }
        assert!(std::fs::read(wal.join("00000000000000000001.wal"))? == seg);
        assert!(std::fs::read(wal.join("00000000000000000002.wal"))? == seg);
        assert!(std::fs::read(wal.join("meta"))? == vec![1u8; 1024]);
        assert!(!dir.path().join("log-start").exists());
        Ok(())
    }
}
