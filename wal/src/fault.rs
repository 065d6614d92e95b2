//! A fault-injecting, in-memory [`Storage`] for tests: it keeps written bytes apart from durable
//! bytes and can produce the disk image a crash would leave at any moment.
//!
//! The crash model: bytes written but not yet synced may survive in any subset of 512-byte
//! blocks (all, none or some), and the last write may be torn at any byte. A file's length
//! change is durable only after a sync of that file. Creations, removals and renames are durable
//! only after a directory sync; before it, each survives a crash or not, independently.
//! Failures: the n-th `sync_data` or `write_at` can be made to fail.
//!
//! A hook sees every mutating operation before it happens and can take crash images from there,
//! so one run of a workload yields a crash state at every write and sync point.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{Mapping, Storage, StorageFile};

/// Granularity at which unsynced bytes survive or vanish in a crash.
pub const BLOCK_BYTES: u64 = 512;

/// How a crash image treats bytes that were written but not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Every unsynced block is lost.
    All,
    /// Every unsynced block survives.
    None,
    /// Each unsynced block survives with probability one half.
    Some,
}

/// The shape of one crash image; the random choices come from `seed`.
#[derive(Clone, Copy, Debug)]
pub struct CrashSpec {
    /// What happens to unsynced blocks.
    pub loss: Loss,
    /// Whether the last write, if unsynced, is torn at a random byte.
    pub tear_last_write: bool,
    /// Seed for every random choice.
    pub seed: u64,
}

type Hook = Box<dyn FnMut(&CrashPoint<'_>) + Send>;

/// An in-memory directory with a crash model. Clones share the same directory.
#[derive(Clone)]
pub struct FaultStorage {
    fs: Arc<Mutex<SimFs>>,
}

impl fmt::Debug for FaultStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultStorage").finish_non_exhaustive()
    }
}

#[derive(Clone, Default)]
struct SimFile {
    data: Vec<u8>,
    durable: Vec<u8>,
    dirty: BTreeSet<u64>,
    last_write: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
enum DirOp {
    Create { name: String, id: u64 },
    Remove { name: String },
    Rename { from: String, to: String },
}

#[derive(Default)]
struct SimFs {
    next_id: u64,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    pending: Vec<DirOp>,
    files: BTreeMap<u64, SimFile>,
    locked: bool,
    syncs: u64,
    writes: u64,
    fail_sync_at: Option<u64>,
    fail_write_at: Option<u64>,
    /// The next creates fail with this OS error: (errno, how many).
    fail_creates: Option<(i32, u64)>,
    hook: Option<Hook>,
}

/// A moment just before a mutating operation, from which crash images can be taken.
pub struct CrashPoint<'a> {
    fs: &'a SimFs,
    op: &'static str,
}

impl fmt::Debug for CrashPoint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrashPoint").field("op", &self.op).finish()
    }
}

impl CrashPoint<'_> {
    /// The operation about to run ("write", "sync", "allocate", "create", "remove", "rename",
    /// "sync_dir").
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The disk a crash at this point would leave, as a fresh storage.
    pub fn image(&self, spec: CrashSpec) -> FaultStorage {
        self.fs.crash_image(spec)
    }

    /// What a process crash (the machine stays up) at this point leaves: every write is still
    /// readable from the page cache but only what was synced is durable. A later
    /// [`FaultStorage::crash_image`] of it models a power loss after the restart.
    pub fn process_crash_image(&self) -> FaultStorage {
        self.fs.process_crash_image()
    }
}

/// A small deterministic generator (splitmix64), so the crash model needs no dependency.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

impl SimFs {
    fn crash_image(&self, spec: CrashSpec) -> FaultStorage {
        let mut rng = Mix(spec.seed);
        let mut names = self.durable_names.clone();
        for op in &self.pending {
            if !rng.coin() {
                continue;
            }
            match op {
                DirOp::Create { name, id } => {
                    names.insert(name.clone(), *id);
                }
                DirOp::Remove { name } => {
                    names.remove(name);
                }
                DirOp::Rename { from, to } => {
                    if let Some(id) = names.remove(from) {
                        names.insert(to.clone(), id);
                    }
                }
            }
        }
        let mut files = BTreeMap::new();
        for &id in names.values() {
            if files.contains_key(&id) {
                continue;
            }
            let f = &self.files[&id];
            let keep_len = match spec.loss {
                Loss::All => false,
                Loss::None => true,
                Loss::Some => rng.coin(),
            };
            let len = if keep_len { f.data.len().max(f.durable.len()) } else { f.durable.len() };
            let mut img = f.durable.clone();
            img.resize(len, 0);
            for &block in &f.dirty {
                let keep = match spec.loss {
                    Loss::All => false,
                    Loss::None => true,
                    Loss::Some => rng.coin(),
                };
                if keep {
                    let start = (block * BLOCK_BYTES) as usize;
                    let end = (start + BLOCK_BYTES as usize).min(f.data.len()).min(len);
                    if start < end {
                        img[start..end].copy_from_slice(&f.data[start..end]);
                    }
                }
            }
            if spec.tear_last_write
                && let Some((off, wlen)) = f.last_write
                && wlen > 0
            {
                let cut = off + rng.next() % wlen;
                for pos in cut..(off + wlen).min(img.len() as u64) {
                    let p = pos as usize;
                    img[p] = f.durable.get(p).copied().unwrap_or(0);
                }
            }
            files.insert(id, SimFile { data: img.clone(), durable: img, ..SimFile::default() });
        }
        let next_id = files.keys().max().map_or(0, |m| m + 1);
        let fs = SimFs {
            next_id,
            names: names.clone(),
            durable_names: names,
            files,
            ..SimFs::default()
        };
        FaultStorage { fs: Arc::new(Mutex::new(fs)) }
    }

    fn process_crash_image(&self) -> FaultStorage {
        let fs = SimFs {
            next_id: self.next_id,
            names: self.names.clone(),
            durable_names: self.durable_names.clone(),
            pending: self.pending.clone(),
            files: self.files.clone(),
            ..SimFs::default()
        };
        FaultStorage { fs: Arc::new(Mutex::new(fs)) }
    }

    fn run_hook(&mut self, op: &'static str) {
        if let Some(mut hook) = self.hook.take() {
            hook(&CrashPoint { fs: self, op });
            self.hook = Some(hook);
        }
    }
}

fn crashed_io(what: &str) -> io::Error {
    io::Error::other(format!("injected failure: {what}"))
}

impl Default for FaultStorage {
    fn default() -> Self {
        FaultStorage::new()
    }
}

impl FaultStorage {
    /// An empty directory.
    pub fn new() -> FaultStorage {
        FaultStorage { fs: Arc::new(Mutex::new(SimFs::default())) }
    }

    fn fs(&self) -> MutexGuard<'_, SimFs> {
        self.fs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `hook` before every mutating operation (with the directory locked).
    pub fn set_hook(&self, hook: impl FnMut(&CrashPoint<'_>) + Send + 'static) {
        self.fs().hook = Some(Box::new(hook));
    }

    /// Removes the hook.
    pub fn clear_hook(&self) {
        self.fs().hook = None;
    }

    /// Makes the `n`-th `sync_data` from now (0 = the next one) fail with an IO error.
    pub fn fail_sync_after(&self, n: u64) {
        let mut fs = self.fs();
        fs.fail_sync_at = Some(fs.syncs.saturating_add(n));
    }

    /// Makes the `n`-th `write_at` from now (0 = the next one) fail with an IO error.
    pub fn fail_write_after(&self, n: u64) {
        let mut fs = self.fs();
        fs.fail_write_at = Some(fs.writes.saturating_add(n));
    }

    /// Makes the next `count` file creations fail with the OS error `errno` (EMFILE, ENOSPC,
    /// ...), as when a process runs out of file descriptors or the disk of space.
    pub fn fail_creates(&self, errno: i32, count: u64) {
        self.fs().fail_creates = (count > 0).then_some((errno, count));
    }

    /// The disk a crash right now would leave.
    pub fn crash_image(&self, spec: CrashSpec) -> FaultStorage {
        self.fs().crash_image(spec)
    }

    /// Flips one bit of a file, in both its written and durable bytes (media corruption).
    pub fn flip_bit(&self, name: &str, byte: u64, bit: u8) {
        let mut fs = self.fs();
        let id = fs.names[name];
        let f = fs.files.get_mut(&id).expect("named file exists");
        f.data[byte as usize] ^= 1 << bit;
        if let Some(b) = f.durable.get_mut(byte as usize) {
            *b ^= 1 << bit;
        }
    }

    /// Cuts a file to `len` bytes, written and durable alike (a file shortened behind the
    /// WAL's back).
    pub fn truncate_file(&self, name: &str, len: u64) {
        let mut fs = self.fs();
        let id = fs.names[name];
        let f = fs.files.get_mut(&id).expect("named file exists");
        f.data.truncate(len as usize);
        f.durable.truncate(len as usize);
    }

    /// The current (written) bytes of a file.
    pub fn file_bytes(&self, name: &str) -> Option<Vec<u8>> {
        let fs = self.fs();
        fs.names.get(name).map(|id| fs.files[id].data.clone())
    }

    /// Names of the files, sorted.
    pub fn names(&self) -> Vec<String> {
        self.fs().names.keys().cloned().collect()
    }
}

impl Storage for FaultStorage {
    fn lock(&self) -> io::Result<Option<Box<dyn Any + Send + Sync>>> {
        let mut fs = self.fs();
        if fs.locked {
            return Ok(None);
        }
        fs.locked = true;
        Ok(Some(Box::new(SimLock { fs: self.fs.clone() })))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.names())
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let mut fs = self.fs();
        if fs.names.contains_key(name) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        if let Some((errno, left)) = fs.fail_creates {
            fs.fail_creates = (left > 1).then_some((errno, left - 1));
            return Err(io::Error::from_raw_os_error(errno));
        }
        fs.run_hook("create");
        let id = fs.next_id;
        fs.next_id += 1;
        fs.files.insert(id, SimFile::default());
        fs.names.insert(name.to_string(), id);
        fs.pending.push(DirOp::Create { name: name.to_string(), id });
        Ok(Arc::new(SimHandle { fs: self.fs.clone(), id }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let fs = self.fs();
        let id = *fs.names.get(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(Arc::new(SimHandle { fs: self.fs.clone(), id }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut fs = self.fs();
        if !fs.names.contains_key(name) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        fs.run_hook("remove");
        fs.names.remove(name);
        fs.pending.push(DirOp::Remove { name: name.to_string() });
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut fs = self.fs();
        if !fs.names.contains_key(from) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        fs.run_hook("rename");
        let id = fs.names.remove(from).expect("checked above");
        fs.names.insert(to.to_string(), id);
        fs.pending.push(DirOp::Rename { from: from.to_string(), to: to.to_string() });
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut fs = self.fs();
        fs.run_hook("sync_dir");
        fs.durable_names = fs.names.clone();
        fs.pending.clear();
        Ok(())
    }
}

struct SimLock {
    fs: Arc<Mutex<SimFs>>,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.fs.lock().unwrap_or_else(|p| p.into_inner()).locked = false;
    }
}

struct SimHandle {
    fs: Arc<Mutex<SimFs>>,
    id: u64,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle").field("id", &self.id).finish()
    }
}

impl SimHandle {
    fn fs(&self) -> MutexGuard<'_, SimFs> {
        self.fs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StorageFile for SimHandle {
    fn size(&self) -> io::Result<u64> {
        Ok(self.fs().files[&self.id].data.len() as u64)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut fs = self.fs();
        fs.run_hook("allocate");
        let f = fs.files.get_mut(&self.id).expect("open file exists");
        if (f.data.len() as u64) < len {
            f.data.resize(len as usize, 0);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut fs = self.fs();
        fs.run_hook("write");
        fs.writes += 1;
        if fs.fail_write_at == Some(fs.writes - 1) {
            return Err(crashed_io("write"));
        }
        let f = fs.files.get_mut(&self.id).expect("open file exists");
        let end = offset as usize + buf.len();
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[offset as usize..end].copy_from_slice(buf);
        if !buf.is_empty() {
            let first = offset / BLOCK_BYTES;
            let last = (end as u64 - 1) / BLOCK_BYTES;
            f.dirty.extend(first..=last);
        }
        f.last_write = Some((offset, buf.len() as u64));
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let fs = self.fs();
        let data = &fs.files[&self.id].data;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut fs = self.fs();
        fs.run_hook("sync");
        fs.syncs += 1;
        if fs.fail_sync_at == Some(fs.syncs - 1) {
            // Like Linux after a failed fsync: the dirty state is gone and unknowable.
            return Err(crashed_io("sync"));
        }
        let f = fs.files.get_mut(&self.id).expect("open file exists");
        f.durable.clone_from(&f.data);
        f.dirty.clear();
        f.last_write = None;
        Ok(())
    }

    fn map(&self) -> io::Result<Arc<dyn Mapping>> {
        let fs = self.fs();
        Ok(Arc::new(SnapshotMap { bytes: fs.files[&self.id].data.clone() }))
    }
}

#[derive(Debug)]
struct SnapshotMap {
    bytes: Vec<u8>,
}

impl Mapping for SnapshotMap {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn is_live(&self) -> bool {
        false
    }
}
