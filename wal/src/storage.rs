//! The small storage trait the WAL does all its IO through, and its real implementation.
//!
//! The trait exists so tests can put a fault-injecting storage under the WAL
//! ([`crate::fault::FaultStorage`]) that keeps written bytes apart from durable bytes. The real
//! implementation is plain files in one directory: positioned writes, `fallocate`, `fdatasync`,
//! a directory `fsync`, `flock` on a lock file, and read-only shared memory maps.

use std::any::Any;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A directory of files. Names are plain file names, never paths.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Takes an exclusive lock on the directory. `Ok(None)` when someone else holds it. The
    /// lock is released when the returned guard is dropped.
    fn lock(&self) -> io::Result<Option<Box<dyn Any + Send + Sync>>>;
    /// Names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates a new, empty file; fails if it exists.
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Removes a file (durable after [`Storage::sync_dir`]).
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Renames a file, replacing `to` (durable after [`Storage::sync_dir`]).
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes creations, removals and renames durable.
    fn sync_dir(&self) -> io::Result<()>;
}

/// One open file.
pub trait StorageFile: Send + Sync + fmt::Debug {
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Reserves real blocks for `[0, len)` so later writes and maps never meet a hole.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads into `buf` from `offset`; returns the bytes read (short at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Makes written data (and the metadata needed to read it) durable: `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// Maps the whole file read-only.
    fn map(&self) -> io::Result<Arc<dyn Mapping>>;
}

/// A read-only view of a whole file.
pub trait Mapping: Send + Sync + fmt::Debug {
    /// The bytes of the file as of the map (or live, see [`Mapping::is_live`]).
    fn bytes(&self) -> &[u8];
    /// Whether writes made after the map show up in [`Mapping::bytes`] (true for a shared
    /// memory map; false for a snapshot, which the WAL then refreshes after each write).
    fn is_live(&self) -> bool;
}

/// Files in a directory on the real filesystem.
#[derive(Debug, Clone)]
pub struct FsStorage {
    dir: PathBuf,
}

impl FsStorage {
    /// Uses `dir`, creating it (and its parents) if missing.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<FsStorage> {
        std::fs::create_dir_all(dir.as_ref())?;
        Ok(FsStorage { dir: dir.as_ref().to_path_buf() })
    }

    fn path(&self, name: &str) -> PathBuf {
        debug_assert!(!name.contains('/'), "storage names are plain file names");
        self.dir.join(name)
    }
}

const LOCK_FILE: &str = "LOCK";

impl Storage for FsStorage {
    fn lock(&self) -> io::Result<Option<Box<dyn Any + Send + Sync>>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path(LOCK_FILE))?;
        // flock locks belong to the open file description, so a second open of the directory
        // in this same process is refused too, not only one from another process.
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Box::new(file))),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Ok(name) = entry.file_name().into_string()
                && name != LOCK_FILE
            {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(self.path(name))?;
        Ok(Arc::new(FsFile { file }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).open(self.path(name))?;
        Ok(Arc::new(FsFile { file }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path(name))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path(from), self.path(to))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

#[derive(Debug)]
struct FsFile {
    file: File,
}

impl StorageFile for FsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, len)?;
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn map(&self) -> io::Result<Arc<dyn Mapping>> {
        if self.size()? == 0 {
            return Ok(Arc::new(EmptyMap));
        }
        // SAFETY: a mapped file must not be truncated or changed by anyone else while mapped.
        // The WAL holds the directory's exclusive lock, never truncates or shrinks a segment,
        // preallocates every segment with fallocate before mapping it (so no page of the map is
        // a hole that a full disk could fail to back), and only writes bytes beyond everything
        // it has handed out to readers (segments are written once, front to back).
        let map = unsafe { memmap2::Mmap::map(&self.file)? };
        Ok(Arc::new(FsMap { map }))
    }
}

struct FsMap {
    map: memmap2::Mmap,
}

impl fmt::Debug for FsMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsMap").field("len", &self.map.len()).finish()
    }
}

impl Mapping for FsMap {
    fn bytes(&self) -> &[u8] {
        &self.map
    }

    fn is_live(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct EmptyMap;

impl Mapping for EmptyMap {
    fn bytes(&self) -> &[u8] {
        &[]
    }

    fn is_live(&self) -> bool {
        false
    }
}
