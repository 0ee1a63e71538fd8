//! What each worker took from the request queue, in memory it shares with the broker: one
//! single-producer ring per worker, written without a system call.
//!
//! The broker needs these records to know whose requests died with a worker, and close
//! those connections. A record sent over a socket cost a worker a system call per request,
//! about a tenth of its time; here it costs two memory stores. The broker reads a worker's
//! ring whenever that worker's replies arrive, and when the worker is gone.
//!
//! Each ring is a memfd of its own: a worker (and the app it runs) can map its own ring and
//! nobody else's.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Records per ring. A worker writes one per request, and the broker reads the ring with
/// every reply it gets from that worker, so the ring never holds more than a few.
const CAPACITY: u64 = 1024;
/// Head (written by the worker), tail (by the broker), the "taking" mark (by the worker),
/// the service word and the held connection in service (see `Ring::busy`) on cache lines
/// of their own, then the records.
const LINE: usize = 64;
const RECORDS: usize = 5 * LINE;
const RING_BYTES: usize = RECORDS + CAPACITY as usize * 8;

/// The service word: the worker is between requests, and may read the connections it holds.
const IDLE: u64 = 0;
/// The service word: the broker took the worker's held connections back (but the one in
/// service) while the worker was busy. Busy is odd: `generation << 1 | 1`.
const TAKEN_BACK: u64 = 2;

/// One ring's memory, mapped.
struct Mapping {
    base: NonNull<u8>,
}

impl Mapping {
    fn new(file: &impl AsFd) -> std::io::Result<Mapping> {
        let len = NonZeroUsize::new(RING_BYTES).expect("not zero");
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
        assert!(offset + 8 <= RING_BYTES && offset.is_multiple_of(8));
        // SAFETY: in bounds and aligned (checked; the mapping is page-aligned), valid while
        // the mapping lives, and only ever accessed atomically, by every process.
        unsafe { &*(self.base.as_ptr().add(offset) as *const AtomicU64) }
    }

    fn head(&self) -> &AtomicU64 {
        self.word(0)
    }

    fn tail(&self) -> &AtomicU64 {
        self.word(LINE)
    }

    fn taking(&self) -> &AtomicU64 {
        self.word(2 * LINE)
    }

    fn service(&self) -> &AtomicU64 {
        self.word(3 * LINE)
    }

    fn serving(&self) -> &AtomicU64 {
        self.word(4 * LINE)
    }

    fn entry(&self, index: u64) -> &AtomicU64 {
        self.word(RECORDS + (index % CAPACITY) as usize * 8)
    }
}

// SAFETY: the mapping is memory of the whole process, only ever accessed through atomics.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length, and no reference outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), RING_BYTES) };
    }
}

/// The broker's end of one worker's ring.
pub struct RingReader {
    map: Mapping,
}

impl RingReader {
    /// A new, empty ring, and the file to hand to its worker.
    pub fn create() -> std::io::Result<(RingReader, OwnedFd)> {
        let file = nix::sys::memfd::memfd_create(
            c"wsgid-records",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        nix::unistd::ftruncate(&file, RING_BYTES as i64)?;
        let map = Mapping::new(&file)?;
        Ok((RingReader { map }, file))
    }

    /// Reads the sequence numbers the worker took since the last call.
    pub fn read(&self, into: &mut impl FnMut(u64)) {
        let tail = self.map.tail().load(Ordering::Relaxed);
        // The app shares the worker's memory and could scribble here: never read further
        // than one ring's worth.
        let head = self
            .map
            .head()
            .load(Ordering::Acquire)
            .clamp(tail, tail.saturating_add(CAPACITY));
        for index in tail..head {
            into(self.map.entry(index).load(Ordering::Relaxed));
        }
        self.map.tail().store(head, Ordering::Release);
    }

    /// The worker is between taking a request from the queue and recording it.
    pub fn taking(&self) -> bool {
        self.map.taking().load(Ordering::Acquire) != 0
    }

    /// What the worker does now: `Some(mark)` while it serves a request, a mark that
    /// differs from one request to the next; `None` between requests.
    pub fn busy(&self) -> Option<u64> {
        let mark = self.map.service().load(Ordering::Acquire);
        (mark & 1 == 1).then_some(mark)
    }

    /// The held connection whose request is in service (0: none), while `busy`.
    pub fn serving(&self) -> u64 {
        self.map.serving().load(Ordering::Acquire)
    }

    /// Takes the worker's held connections back, if it is still busy with the request
    /// `mark` names: from then on it reads none of them (but the one in service), and
    /// drops them when that request is over. False when that request is over already.
    pub fn take_back(&self, mark: u64) -> bool {
        self.map
            .service()
            .compare_exchange(mark, TAKEN_BACK, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A worker's end of its ring.
pub struct Ring {
    map: Mapping,
}

impl Ring {
    pub fn open(file: &OwnedFd) -> std::io::Result<Ring> {
        Ok(Ring {
            map: Mapping::new(file)?,
        })
    }

    /// Marks the start and the end of a take from the queue.
    pub fn set_taking(&self, taking: bool) {
        self.map
            .taking()
            .store(u64::from(taking), Ordering::Release);
    }

    /// A request is in service (`serving`: the held connection it came on, or 0): the
    /// broker may take the other held connections back from now on (see `idle`).
    pub fn busy(&self, generation: u64, serving: u64) {
        self.map.serving().store(serving, Ordering::Release);
        self.map
            .service()
            .store(generation << 1 | 1, Ordering::Release);
    }

    /// The request in service is over; false when the broker took the held connections
    /// back meanwhile (all but the one in service), which the worker then drops.
    pub fn idle(&self, generation: u64) -> bool {
        let mark = generation << 1 | 1;
        let kept = self
            .map
            .service()
            .compare_exchange(mark, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !kept {
            self.map.service().store(IDLE, Ordering::Release);
        }
        kept
    }

    /// Records `seq` as taken; `false` when the ring is full (the broker reads nothing).
    pub fn write(&self, seq: u64) -> bool {
        let head = self.map.head().load(Ordering::Relaxed);
        let tail = self.map.tail().load(Ordering::Acquire);
        if head.wrapping_sub(tail) >= CAPACITY {
            return false;
        }
        self.map.entry(head).store(seq, Ordering::Relaxed);
        self.map.head().store(head + 1, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_a_ring_and_a_full_ring_says_so() {
        let (reader, file) = RingReader::create().unwrap();
        let ring = Ring::open(&file).unwrap();
        assert!(!reader.taking());
        ring.set_taking(true);
        assert!(reader.taking());
        ring.set_taking(false);
        assert!(ring.write(7));
        assert!(ring.write(u64::MAX));
        let mut seen = Vec::new();
        reader.read(&mut |r| seen.push(r));
        assert_eq!(seen, [7, u64::MAX]);
        for seq in 0..CAPACITY {
            assert!(ring.write(seq));
        }
        assert!(!ring.write(0));
        seen.clear();
        reader.read(&mut |r| seen.push(r));
        assert_eq!(seen.len() as u64, CAPACITY);
        assert!(ring.write(1));
    }

    #[test]
    fn held_connections_are_taken_back_only_from_the_request_seen_busy() {
        let (reader, file) = RingReader::create().unwrap();
        let ring = Ring::open(&file).unwrap();
        assert_eq!(reader.busy(), None);
        ring.busy(1, 42);
        let mark = reader.busy().unwrap();
        assert_eq!(reader.serving(), 42);
        // Over before the broker looked again: nothing taken back.
        assert!(ring.idle(1));
        assert!(!reader.take_back(mark));
        ring.busy(2, 0);
        // A later request has another mark: what the broker saw before is not it.
        assert!(!reader.take_back(mark));
        let mark = reader.busy().unwrap();
        assert!(reader.take_back(mark));
        assert_eq!(reader.busy(), None);
        // The worker learns it when its request is over, and is idle after.
        assert!(!ring.idle(2));
        assert_eq!(reader.busy(), None);
        ring.busy(3, 0);
        assert!(ring.idle(3));
    }

    #[test]
    fn a_scribbled_head_never_reads_past_one_ring() {
        let (reader, file) = RingReader::create().unwrap();
        let ring = Ring::open(&file).unwrap();
        ring.map.head().store(u64::MAX, Ordering::Relaxed);
        let mut count = 0u64;
        reader.read(&mut |_| count += 1);
        assert_eq!(count, CAPACITY);
    }
}
