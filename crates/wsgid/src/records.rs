//! What each worker took from the request queue and finished, in memory it shares with the
//! broker: one single-producer ring per worker, written without a system call.
//!
//! The broker needs these records to keep the pipelined requests of a connection in order
//! (the next one waits until the previous is done) and to free the requests of a worker that
//! died. A record sent over a socket cost a worker a system call per request, about a tenth
//! of its time; here it costs two memory stores. The broker reads the rings whenever it is
//! awake; when it waits for a record it raises a flag, and only then does a worker ring the
//! doorbell (a byte on a socket) after writing one.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Rings in the shared file: the most workers one broker serves at once.
pub const SLOTS: usize = 512;
/// Records per ring. A worker writes two per request, and the broker reads them every time
/// it wakes, which it must do to queue more requests; the queue holds a few hundred.
const CAPACITY: u64 = 2048;
/// The flag, then per ring: head (written by the worker) and tail (by the broker) on cache
/// lines of their own, then the records.
const LINE: usize = 64;
const RING_BYTES: usize = 2 * LINE + CAPACITY as usize * 8;
const FILE_BYTES: usize = LINE + SLOTS * RING_BYTES;

const DONE_BIT: u64 = 1;

/// What a worker recorded, by sequence number of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Took(u64),
    Done(u64),
}

impl Record {
    fn encode(self) -> u64 {
        match self {
            Record::Took(seq) => seq << 1,
            Record::Done(seq) => seq << 1 | DONE_BIT,
        }
    }

    fn decode(raw: u64) -> Record {
        if raw & DONE_BIT == 0 {
            Record::Took(raw >> 1)
        } else {
            Record::Done(raw >> 1)
        }
    }
}

/// The shared file, mapped.
struct Mapping {
    base: NonNull<u8>,
}

impl Mapping {
    fn new(file: &impl AsFd) -> std::io::Result<Mapping> {
        let len = NonZeroUsize::new(FILE_BYTES).expect("not zero");
        // SAFETY: a fresh shared mapping of a file we hold, at an address the kernel picks.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file,
                0,
            )?
        };
        Ok(Mapping { base: base.cast() })
    }

    /// The 8-byte word at `offset`.
    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset + 8 <= FILE_BYTES && offset.is_multiple_of(8));
        // SAFETY: in bounds and aligned (checked; the mapping is page-aligned), valid while
        // the mapping lives, and only ever accessed atomically, by every process.
        unsafe { &*(self.base.as_ptr().add(offset) as *const AtomicU64) }
    }

    fn wake_wanted(&self) -> &AtomicU64 {
        self.word(0)
    }

    fn head(&self, slot: usize) -> &AtomicU64 {
        self.word(LINE + slot * RING_BYTES)
    }

    fn tail(&self, slot: usize) -> &AtomicU64 {
        self.word(LINE + slot * RING_BYTES + LINE)
    }

    fn entry(&self, slot: usize, index: u64) -> &AtomicU64 {
        self.word(LINE + slot * RING_BYTES + 2 * LINE + (index % CAPACITY) as usize * 8)
    }
}

// SAFETY: the mapping is memory of the whole process, only ever accessed through atomics.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length, and no reference outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), FILE_BYTES) };
    }
}

/// The broker's view: every ring, and the file to hand to workers.
pub struct Rings {
    file: OwnedFd,
    map: Mapping,
    free: Vec<usize>,
}

impl Rings {
    pub fn new() -> std::io::Result<Rings> {
        let file = nix::sys::memfd::memfd_create(
            c"wsgid-records",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        nix::unistd::ftruncate(&file, FILE_BYTES as i64)?;
        let map = Mapping::new(&file)?;
        Ok(Rings {
            file,
            map,
            free: (0..SLOTS).rev().collect(),
        })
    }

    pub fn file(&self) -> &OwnedFd {
        &self.file
    }

    /// A ring for a new worker, emptied.
    pub fn allocate(&mut self) -> Option<usize> {
        let slot = self.free.pop()?;
        self.map.head(slot).store(0, Ordering::Relaxed);
        self.map.tail(slot).store(0, Ordering::Relaxed);
        Some(slot)
    }

    /// Gives back the ring of a worker that has gone (read it first).
    pub fn release(&mut self, slot: usize) {
        self.free.push(slot);
    }

    /// Reads the records a worker wrote since the last call.
    pub fn read(&self, slot: usize, into: &mut impl FnMut(Record)) {
        let tail = self.map.tail(slot).load(Ordering::Relaxed);
        // The app shares the worker's memory and could scribble here: never read further
        // than one ring's worth.
        let head = self
            .map
            .head(slot)
            .load(Ordering::Acquire)
            .clamp(tail, tail.saturating_add(CAPACITY));
        for index in tail..head {
            into(Record::decode(
                self.map.entry(slot, index).load(Ordering::Relaxed),
            ));
        }
        self.map.tail(slot).store(head, Ordering::Release);
    }

    /// Asks workers to ring the doorbell after each record (or stops asking). Returns
    /// whether it was raised: the caller then reads the rings once more before it sleeps,
    /// for records written before the flag was seen.
    pub fn want_wake(&self, wanted: bool) -> bool {
        self.map
            .wake_wanted()
            .store(u64::from(wanted), Ordering::SeqCst);
        fence(Ordering::SeqCst);
        wanted
    }
}

/// A worker's ring.
pub struct Ring {
    map: Mapping,
    slot: usize,
}

/// What writing a record asks of the worker.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Quietly,
    /// The broker waits for records: ring the doorbell.
    RingDoorbell,
    /// The ring is full (the broker is not reading): ring, wait a little, write again.
    Full,
}

impl Ring {
    pub fn open(file: &OwnedFd, slot: usize) -> std::io::Result<Ring> {
        if slot >= SLOTS {
            return Err(std::io::Error::other(format!(
                "record ring {slot} out of range"
            )));
        }
        Ok(Ring {
            map: Mapping::new(file)?,
            slot,
        })
    }

    pub fn write(&self, record: Record) -> Written {
        let head = self.map.head(self.slot).load(Ordering::Relaxed);
        let tail = self.map.tail(self.slot).load(Ordering::Acquire);
        if head - tail >= CAPACITY {
            return Written::Full;
        }
        self.map
            .entry(self.slot, head)
            .store(record.encode(), Ordering::Relaxed);
        self.map.head(self.slot).store(head + 1, Ordering::Release);
        // Pairs with the broker's fence in `want_wake`: either it sees this record when it
        // reads the rings after raising the flag, or we see the flag here.
        fence(Ordering::SeqCst);
        if self.map.wake_wanted().load(Ordering::Relaxed) != 0 {
            Written::RingDoorbell
        } else {
            Written::Quietly
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_a_ring_and_a_full_ring_says_so() {
        let mut rings = Rings::new().unwrap();
        let slot = rings.allocate().unwrap();
        let ring = Ring::open(rings.file(), slot).unwrap();
        assert_eq!(ring.write(Record::Took(7)), Written::Quietly);
        assert_eq!(ring.write(Record::Done(7)), Written::Quietly);
        let mut seen = Vec::new();
        rings.read(slot, &mut |r| seen.push(r));
        assert_eq!(seen, [Record::Took(7), Record::Done(7)]);

        rings.want_wake(true);
        assert_eq!(
            ring.write(Record::Took(u64::MAX >> 1)),
            Written::RingDoorbell
        );
        rings.want_wake(false);
        for seq in 0..CAPACITY - 1 {
            assert_eq!(ring.write(Record::Done(seq)), Written::Quietly);
        }
        assert_eq!(ring.write(Record::Done(0)), Written::Full);
        seen.clear();
        rings.read(slot, &mut |r| seen.push(r));
        assert_eq!(seen.len() as u64, CAPACITY);
        assert_eq!(seen[0], Record::Took(u64::MAX >> 1));
        assert_eq!(ring.write(Record::Done(1)), Written::Quietly);
    }

    #[test]
    fn a_released_ring_is_handed_out_empty() {
        let mut rings = Rings::new().unwrap();
        let slot = rings.allocate().unwrap();
        Ring::open(rings.file(), slot)
            .unwrap()
            .write(Record::Took(1));
        rings.release(slot);
        let again = rings.allocate().unwrap();
        assert_eq!(again, slot);
        let mut seen = Vec::new();
        rings.read(again, &mut |r| seen.push(r));
        assert!(seen.is_empty());
    }
}
