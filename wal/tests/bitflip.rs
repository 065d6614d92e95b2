//! Media corruption: a single-bit flip at every byte of the last few frames, and random flips
//! anywhere in the written part of sealed segments. Every flip is detected and never served as
//! data; a flip followed by a valid frame of a later write group is reported as corruption with
//! its location, never cut as a torn tail.

use std::sync::Arc;

use raftwal_wal::fault::{CrashSpec, FaultStorage, Loss};
use raftwal_wal::{Entry, Error, LogIndex, Options, Term, Wal, frame_bytes};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn opts(segment_bytes: u64) -> Options {
    Options { segment_bytes, record_bytes_max: 1024, group_bytes_max: 4096, ..Options::default() }
}

fn payload(i: u64) -> Vec<u8> {
    (0..(i * 37 % 300) as usize).map(|b| (b as u64 * 31 + i) as u8).collect()
}

/// Appends `n` entries, one write group each, and returns the storage and each frame's
/// (segment, offset, bytes).
fn build(n: u64, segment_bytes: u64) -> (FaultStorage, Vec<(String, u64, u64)>) {
    let storage = FaultStorage::new();
    let wal = Wal::open_with(Arc::new(storage.clone()), opts(segment_bytes)).expect("open");
    for i in 1..=n {
        let p = payload(i);
        wal.append(&[Entry { term: Term(1 + i / 10), index: LogIndex(i), payload: &p }])
            .expect("append");
    }
    drop(wal);
    // Frame locations, derived from the layout: each segment's frames follow its 64-byte header.
    let mut frames = Vec::new();
    let mut segs: Vec<String> =
        storage.names().into_iter().filter(|s| s.ends_with(".wal")).collect();
    segs.sort();
    let mut i = 1;
    for seg in &segs {
        let bytes = storage.file_bytes(seg).expect("segment exists");
        let mut off = 64u64;
        while i <= n {
            let len = frame_bytes(payload(i).len() as u64);
            if off + len > bytes.len() as u64 {
                break;
            }
            let got_index = u64::from_le_bytes(
                bytes[off as usize + 16..off as usize + 24].try_into().expect("8"),
            );
            if got_index != i {
                break;
            }
            frames.push((seg.clone(), off, len));
            off += len;
            i += 1;
        }
    }
    assert_eq!(frames.len() as u64, n, "located every frame");
    (storage, frames)
}

fn copy(storage: &FaultStorage) -> FaultStorage {
    storage.crash_image(CrashSpec { loss: Loss::None, tear_last_write: false, seed: 0 })
}

/// Every record served must be the one written.
fn assert_served_correctly(wal: &Wal) {
    let (first, last) = (wal.first_index(), wal.last_index());
    if last < first {
        return;
    }
    for r in wal.read(first..last.next(), u64::MAX).expect("read verified records") {
        assert_eq!(r.payload(), payload(r.index().get()).as_slice(), "index {}", r.index());
    }
}

#[test]
fn a_flip_at_every_byte_of_the_last_frames_is_detected() {
    let n = 40;
    let (storage, frames) = build(n, 1 << 20);
    let last_few = 4;
    let mut corrupt = 0;
    let mut torn = 0;
    for (k, (seg, off, len)) in frames.iter().enumerate().skip(n as usize - last_few) {
        let index = k as u64 + 1;
        for byte in *off..off + len {
            let image = copy(&storage);
            image.flip_bit(seg, byte, (byte % 8) as u8);
            match Wal::open_with(Arc::new(image), opts(1 << 20)) {
                Err(Error::Corrupt { segment, offset, .. }) => {
                    assert!(index < n, "flip in the very last frame must be a torn tail");
                    assert_eq!((&segment, offset), (seg, *off), "corruption located at its frame");
                    corrupt += 1;
                }
                Ok(wal) => {
                    assert_eq!(
                        index, n,
                        "flip at byte {byte} of index {index} followed by valid frames was cut as a tail"
                    );
                    let torn_tail = wal.recovery().torn_tail.clone().expect("reported as torn");
                    assert_eq!(torn_tail.offset, *off);
                    assert_eq!(wal.last_index(), LogIndex(n - 1));
                    assert_served_correctly(&wal);
                    torn += 1;
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }
    assert!(corrupt > 0 && torn > 0);
}

#[test]
fn random_flips_in_sealed_segments_are_reported_as_corruption() {
    let n = 200;
    let segment_bytes = 4096;
    let (storage, frames) = build(n, segment_bytes);
    let last_seg = frames.last().expect("frames").0.clone();
    let sealed: Vec<_> = frames.iter().filter(|f| f.0 != last_seg).collect();
    assert!(sealed.len() > 50, "several sealed segments");
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..1000 {
        let (seg, off, len) = sealed[rng.random_range(0..sealed.len())];
        // Anywhere in the frame, or in the segment header.
        let byte = if rng.random_range(0..10) == 0 {
            rng.random_range(0..64)
        } else {
            rng.random_range(*off..off + len)
        };
        let image = copy(&storage);
        image.flip_bit(seg, byte, rng.random_range(0..8));
        match Wal::open_with(Arc::new(image), opts(segment_bytes)) {
            Err(Error::Corrupt { segment, .. }) => assert_eq!(&segment, seg),
            Ok(wal) => {
                panic!("flip at {seg}:{byte} went undetected (last index {})", wal.last_index())
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

/// A frame as an attacker would forge it inside a record's payload: index 7, claiming write
/// group 1000, checksummed with `salt` (the attacker does not know the real one).
fn forged_frame(salt: u32) -> Vec<u8> {
    let payload = [7u8; 8];
    let mut f = vec![0u8; 40];
    f[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    f[8..16].copy_from_slice(&1u64.to_le_bytes());
    f[16..24].copy_from_slice(&7u64.to_le_bytes());
    f[24..32].copy_from_slice(&1000u64.to_le_bytes());
    f[36..40].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&f[0..4]);
    h.update(&f[8..40]);
    f[4..8].copy_from_slice(&h.finalize().to_le_bytes());
    f.extend_from_slice(&payload);
    f
}

/// The salt from the newest hard-state slot: only a test (or someone with the disk) can read it.
fn real_salt(storage: &FaultStorage) -> u32 {
    let meta = storage.file_bytes("meta").expect("meta file");
    let slot = |at: usize| (u64::from_le_bytes(meta[at + 8..at + 16].try_into().expect("8")), at);
    let (_, at) = [slot(0), slot(512)].into_iter().max().expect("two slots");
    u32::from_le_bytes(meta[at + 56..at + 60].try_into().expect("4"))
}

#[test]
fn a_frame_forged_inside_a_payload_cannot_turn_a_torn_tail_into_corruption() {
    let run = |salt_of: &dyn Fn(&FaultStorage) -> u32| {
        let storage = FaultStorage::new();
        let wal = Wal::open_with(Arc::new(storage.clone()), opts(1 << 20)).expect("open");
        for i in 1..=5u64 {
            wal.append(&[Entry { term: Term(1), index: LogIndex(i), payload: &[i as u8; 16] }])
                .expect("append");
        }
        let forged = forged_frame(salt_of(&storage));
        wal.append(&[Entry { term: Term(1), index: LogIndex(6), payload: &forged }])
            .expect("append");
        drop(wal);
        // Frames of 16-byte payloads take 56 bytes: frame 6 starts at 64 + 5 * 56. Damage its
        // header, as a crash tearing the last group would; its payload (the forgery) survives.
        let image = copy(&storage);
        let seg = storage.names().into_iter().find(|n| n.ends_with(".wal")).expect("segment");
        image.flip_bit(&seg, 64 + 5 * 56 + 20, 0);
        Wal::open_with(Arc::new(image), opts(1 << 20))
    };
    // The attacker's guesses: no salt, and a fixed one.
    for guess in [0u32, 0xdead_beef] {
        let wal = run(&|_| guess).expect("a forged frame must not make a torn tail look corrupt");
        assert_eq!(wal.last_index(), LogIndex(5));
        assert!(wal.recovery().torn_tail.is_some());
    }
    // Control: with the real salt the forgery would be taken for a later group.
    assert!(
        matches!(run(&real_salt), Err(Error::Corrupt { .. })),
        "the scan does look inside payloads"
    );
}
