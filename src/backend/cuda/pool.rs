//! The caching device allocator: freed blocks are kept, by size class, for the next request of
//! that class, so a training step in steady state allocates nothing from the driver.
//!
//! Size classes: requests up to 1 MiB round up to 512 B; larger ones to the next of
//! `{1, 1.25, 1.5, 1.75}·2^k` (at most 25% waste), so similar shapes share blocks. A request the
//! driver refuses (out of memory) releases every cached block back to it and is tried once more.
//! The pool is generic over its source of raw memory so that its bookkeeping is tested on the CPU.
//!
//! CUDA graph capture ([`Pool::begin_capture`]): while a capture runs, requests never reach the
//! driver (a capture that would need a fresh block is refused: the driver call would invalidate
//! it); they are served from blocks the capture itself freed, then from the cache. Every block
//! handed out or freed during the capture belongs to the graph: it is parked, not cached, when
//! freed, so eager work never reuses memory that the graph's replays write or read, until the
//! graph is dropped ([`Pool::drop_graph`]) and its blocks return to the cache. Within the capture,
//! a block freed and requested again is reused (the graph replays in stream order).
//!
//! Testing hook: [`Pool::fail_alloc_after`] makes a chosen later request fail as if the driver
//! were out of memory (the cache is bypassed, released and the request retried, as for a real
//! refusal), so that callers' error paths can be exercised without filling a GPU.

use std::collections::HashMap;

use anyhow::{Result, anyhow};

/// Raw device memory: the driver, or a fake in tests.
pub trait RawAlloc {
    fn alloc(&mut self, bytes: usize) -> Result<u64>;
    fn free(&mut self, ptr: u64, bytes: usize);
}

/// Counters of a pool (shown by `devices --json` and the GPU check).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// blocks obtained from the driver
    pub raw_allocs: u64,
    /// requests served from the cache
    pub reuses: u64,
    /// bytes handed out and not yet returned
    pub bytes_in_use: usize,
    /// bytes held in the cache
    pub bytes_cached: usize,
    /// the most bytes ever obtained from the driver at once
    pub peak_reserved: usize,
    /// bytes owned by live CUDA graphs (handed out during their capture), in use or parked
    pub bytes_in_graphs: usize,
}

/// The memory of one graph: the blocks it owns and, of those, the ones freed (parked) by size class.
#[derive(Default)]
struct GraphMem {
    owned: HashMap<u64, usize>,
    parked: HashMap<usize, Vec<u64>>,
}

/// The size class (in bytes) that serves a request of `bytes`.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= 1 << 20 {
        return bytes.div_ceil(512) * 512;
    }
    let p = usize::BITS - 1 - (bytes - 1).leading_zeros(); // 2^p < bytes ≤ 2^(p+1)
    let base = 1usize << p;
    let step = base / 4;
    base + (bytes - base).div_ceil(step) * step
}

pub struct Pool<A: RawAlloc> {
    raw: A,
    free: HashMap<usize, Vec<u64>>,
    stats: PoolStats,
    /// requests until an injected out-of-memory failure (1: the next one)
    fail_in: Option<usize>,
    /// live graphs' memory, by graph id
    graphs: HashMap<u64, GraphMem>,
    /// the graph owning each of their blocks
    owner: HashMap<u64, u64>,
}

impl<A: RawAlloc> Pool<A> {
    pub fn new(raw: A) -> Self {
        Pool { raw, free: HashMap::new(), stats: PoolStats::default(), fail_in: None, graphs: HashMap::new(), owner: HashMap::new() }
    }

    /// Testing hook: make the `n`-th following request (`Some(1)`: the next one; `Some(0)` counts
    /// as 1) fail with an out-of-memory error, once, whether or not the cache could serve it; the
    /// failure goes through the out-of-memory path (cache released, request retried and refused
    /// again). `None` cancels a pending failure.
    pub fn fail_alloc_after(&mut self, n: Option<usize>) {
        self.fail_in = n.map(|n| n.max(1));
    }

    /// Whether a failure is still pending (and after how many requests).
    pub fn pending_failure(&self) -> Option<usize> {
        self.fail_in
    }

    /// The driver's allocation, or the injected refusal.
    fn raw_alloc(&mut self, bytes: usize, injected: bool) -> Result<u64> {
        if injected {
            return Err(anyhow!("out of memory: {bytes} bytes refused (failure injected by fail_alloc_after)"));
        }
        self.raw.alloc(bytes)
    }

    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// A block of at least `bytes`; returns `(pointer, class)`. Give it back with [`Pool::release`].
    pub fn alloc(&mut self, bytes: usize) -> Result<(u64, usize)> {
        let class = size_class(bytes);
        let injected = match self.fail_in {
            Some(1) => {
                self.fail_in = None;
                true
            }
            Some(k) => {
                self.fail_in = Some(k - 1);
                false
            }
            None => false,
        };
        if !injected && let Some(p) = self.free.get_mut(&class).and_then(|v| v.pop()) {
            self.stats.reuses += 1;
            self.stats.bytes_cached -= class;
            self.stats.bytes_in_use += class;
            return Ok((p, class));
        }
        let p = match self.raw_alloc(class, injected) {
            Ok(p) => p,
            Err(first) => {
                if self.stats.bytes_cached == 0 {
                    return Err(first.context(format!("allocating {class} bytes ({} bytes in use, nothing cached)", self.stats.bytes_in_use)));
                }
                self.trim();
                self.raw_alloc(class, injected).map_err(|e| e.context(format!("allocating {class} bytes (after releasing the cache; {} bytes in use)", self.stats.bytes_in_use)))?
            }
        };
        self.stats.raw_allocs += 1;
        self.stats.bytes_in_use += class;
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.bytes_in_use + self.stats.bytes_cached);
        Ok((p, class))
    }

    /// Return a block to the cache (no driver call).
    pub fn release(&mut self, ptr: u64, class: usize) {
        self.stats.bytes_in_use -= class;
        self.stats.bytes_cached += class;
        self.free.entry(class).or_default().push(ptr);
    }

    /// Start the bookkeeping of graph `id`'s memory (a capture begins).
    pub fn begin_capture(&mut self, id: u64) {
        self.graphs.entry(id).or_default();
    }

    /// A block of at least `bytes` for the capture of graph `id`: a block the capture freed, else
    /// one from the cache (which then belongs to the graph); never the driver: when neither has
    /// a block of its size class, the request is refused.
    pub fn alloc_captured(&mut self, bytes: usize, id: u64) -> Result<(u64, usize)> {
        let class = size_class(bytes);
        let Some(gm) = self.graphs.get_mut(&id) else { return Err(anyhow!("no capture {id} is running")) };
        if let Some(p) = gm.parked.get_mut(&class).and_then(|v| v.pop()) {
            self.stats.reuses += 1;
            self.stats.bytes_in_use += class;
            return Ok((p, class));
        }
        let Some(p) = self.free.get_mut(&class).and_then(|v| v.pop()) else {
            return Err(anyhow!("a fresh driver allocation of {class} bytes (the cache has no free block of that size class: run the same work once before capturing)"));
        };
        gm.owned.insert(p, class);
        self.owner.insert(p, id);
        self.stats.reuses += 1;
        self.stats.bytes_cached -= class;
        self.stats.bytes_in_use += class;
        self.stats.bytes_in_graphs += class;
        Ok((p, class))
    }

    /// Return a block: parked in its graph when a live graph owns it, or when it is freed during
    /// the capture of graph `capturing` (work captured earlier may read it); otherwise cached.
    pub fn release_in(&mut self, ptr: u64, class: usize, capturing: Option<u64>) {
        let owner = self.owner.get(&ptr).copied().or_else(|| capturing.filter(|id| self.graphs.contains_key(id)));
        let Some(id) = owner else { return self.release(ptr, class) };
        let gm = self.graphs.get_mut(&id).expect("a live graph");
        if gm.owned.insert(ptr, class).is_none() {
            self.owner.insert(ptr, id);
            self.stats.bytes_in_graphs += class;
        }
        gm.parked.entry(class).or_default().push(ptr);
        self.stats.bytes_in_use -= class;
    }

    /// Graph `id` is gone (or its capture abandoned): its parked blocks return to the cache, and
    /// the ones still held by buffers return to it when those are dropped.
    pub fn drop_graph(&mut self, id: u64) {
        let Some(gm) = self.graphs.remove(&id) else { return };
        for (&p, &class) in &gm.owned {
            self.owner.remove(&p);
            self.stats.bytes_in_graphs -= class;
        }
        for (class, ptrs) in gm.parked {
            for p in ptrs {
                self.stats.bytes_cached += class;
                self.free.entry(class).or_default().push(p);
            }
        }
    }

    /// Give every cached block back to the driver (graphs' blocks stay).
    pub fn trim(&mut self) {
        for (class, ptrs) in self.free.drain() {
            for p in ptrs {
                self.raw.free(p, class);
                self.stats.bytes_cached -= class;
            }
        }
    }
}

impl<A: RawAlloc> Drop for Pool<A> {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.graphs.keys().copied().collect();
        for id in ids {
            self.drop_graph(id);
        }
        self.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake driver: hands out increasing addresses, tracks live blocks, fails above a capacity.
    struct Fake {
        next: u64,
        live: HashMap<u64, usize>,
        capacity: usize,
        calls: usize,
    }
    impl RawAlloc for Fake {
        fn alloc(&mut self, bytes: usize) -> Result<u64> {
            self.calls += 1;
            let used: usize = self.live.values().sum();
            if used + bytes > self.capacity {
                anyhow::bail!("out of memory");
            }
            let p = self.next;
            self.next += bytes as u64;
            self.live.insert(p, bytes);
            Ok(p)
        }
        fn free(&mut self, ptr: u64, bytes: usize) {
            assert_eq!(self.live.remove(&ptr), Some(bytes), "freed a block that was not live, or with the wrong size");
        }
    }
    fn pool(capacity: usize) -> Pool<Fake> {
        Pool::new(Fake { next: 4096, live: HashMap::new(), capacity, calls: 0 })
    }

    #[test]
    fn size_classes_cover_the_request_with_bounded_waste() {
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), (1 << 20) + (1 << 18));
        assert_eq!(size_class(3 << 20), 3 << 20);
        let mut b = 1usize;
        while b < 1 << 34 {
            for d in [0usize, 1, 7] {
                let r = b + d * (b / 8 + 1);
                let c = size_class(r);
                assert!(c >= r, "class {c} < request {r}");
                assert!(r <= 512 || (c as f64) <= r as f64 * 1.25 + 512.0, "class {c} wastes too much for {r}");
                assert_eq!(size_class(c), c, "a class is its own class");
            }
            b = b * 3 / 2 + 1;
        }
    }

    #[test]
    fn steady_state_allocates_nothing_from_the_driver() {
        let mut p = pool(1 << 30);
        let sizes = [4000usize, 123_456, 3 << 20, 4000, 77];
        for round in 0..5 {
            let blocks: Vec<(u64, usize)> = sizes.iter().map(|&s| p.alloc(s).unwrap()).collect();
            let mut ptrs: Vec<u64> = blocks.iter().map(|b| b.0).collect();
            ptrs.sort();
            ptrs.dedup();
            assert_eq!(ptrs.len(), sizes.len(), "two live blocks share an address");
            for (ptr, class) in blocks {
                p.release(ptr, class);
            }
            if round > 0 {
                assert_eq!(p.raw.calls, sizes.len(), "round {round} went to the driver");
            }
        }
        assert_eq!(p.stats().raw_allocs, 5);
        assert_eq!(p.stats().reuses, 20);
        assert_eq!(p.stats().bytes_in_use, 0);
    }

    #[test]
    fn out_of_memory_releases_the_cache_and_retries() {
        let mut p = pool(4 << 20);
        let (a, ca) = p.alloc(3 << 20).unwrap();
        p.release(a, ca);
        // a different class does not fit beside the cached 3 MiB block: the cache is released
        let (b, cb) = p.alloc(2 << 20).unwrap();
        assert_eq!(p.stats().bytes_cached, 0);
        assert_eq!(p.raw.live.len(), 1);
        // nothing cached and still too big: the driver's error comes back
        assert!(p.alloc(3 << 20).is_err());
        p.release(b, cb);
        drop(p); // returns everything; Fake::free checks every block
    }

    #[test]
    fn an_injected_failure_takes_the_out_of_memory_path_once() {
        let mut p = pool(1 << 30);
        let (a, ca) = p.alloc(4000).unwrap();
        p.release(a, ca);
        p.fail_alloc_after(Some(2));
        // the first request is served (from the cache), the second fails although the cache
        // could serve it: the cache is released and the retry refused too
        let (b, cb) = p.alloc(4000).unwrap();
        assert_eq!(p.stats().reuses, 1);
        assert_eq!(p.pending_failure(), Some(1));
        p.release(b, cb);
        let e = p.alloc(4000).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("out of memory") && msg.contains("after releasing the cache"), "{msg}");
        assert_eq!(p.stats().bytes_cached, 0, "the cache was not released");
        assert_eq!(p.pending_failure(), None);
        // with nothing cached, the refusal comes back directly
        p.fail_alloc_after(Some(1));
        let msg = format!("{:#}", p.alloc(4000).unwrap_err());
        assert!(msg.contains("out of memory") && msg.contains("nothing cached"), "{msg}");
        // one-shot: the next request succeeds
        let (d, cd) = p.alloc(4000).unwrap();
        p.release(d, cd);
        p.fail_alloc_after(Some(3));
        p.fail_alloc_after(None);
        for _ in 0..5 {
            let (x, cx) = p.alloc(64).unwrap();
            p.release(x, cx);
        }
    }

    #[test]
    fn a_capture_is_served_from_the_cache_and_its_blocks_stay_the_graphs_until_it_drops() {
        let mut p = pool(1 << 30);
        // the warm-up: two blocks of one class, one of another, cached; one block live across
        let w: Vec<(u64, usize)> = [4000usize, 4000, 100_000].iter().map(|&s| p.alloc(s).unwrap()).collect();
        let (pre, cpre) = p.alloc(4000).unwrap();
        for (ptr, c) in &w {
            p.release(*ptr, *c);
        }
        let calls = p.raw.calls;
        p.begin_capture(7);
        let (a, ca) = p.alloc_captured(4000, 7).unwrap();
        let (b, cb) = p.alloc_captured(100_000, 7).unwrap();
        p.release_in(a, ca, Some(7)); // freed inside the capture: reused inside it
        let (a2, ca2) = p.alloc_captured(4000, 7).unwrap();
        assert_eq!(a2, a, "a block freed in the capture was not reused by it");
        p.release_in(pre, cpre, Some(7)); // allocated before, freed during: the graph's now
        // nothing of this class is cached: refused, and the driver was never asked
        let e = p.alloc_captured(300_000, 7).unwrap_err();
        assert!(format!("{e}").contains("fresh driver allocation"), "{e}");
        assert_eq!(p.raw.calls, calls, "the capture reached the driver");
        p.release_in(a2, ca2, Some(7));
        assert_eq!(p.stats().bytes_in_graphs, 2 * 512 * 8 + size_class(100_000));
        // after the capture: eager requests never get the graph's blocks (parked or live)
        let mut eager = Vec::new();
        for _ in 0..3 {
            let (x, cx) = p.alloc(4000).unwrap();
            assert!(x != a && x != pre && x != b, "eager work got a graph's block");
            eager.push((x, cx));
        }
        for (x, cx) in eager {
            p.release_in(x, cx, None);
        }
        // `b` is still held by a buffer when the graph drops: it returns to the cache when freed
        p.drop_graph(7);
        assert_eq!(p.stats().bytes_in_graphs, 0);
        let cached = p.stats().bytes_cached;
        p.release_in(b, cb, None);
        assert_eq!(p.stats().bytes_cached, cached + cb);
        // and everything is the cache's again: a request of the class is served without the driver
        let calls = p.raw.calls;
        let (y, cy) = p.alloc(4000).unwrap();
        assert_eq!(p.raw.calls, calls);
        p.release(y, cy);
        assert_eq!(p.stats().bytes_in_use, 0);
        drop(p); // Fake::free checks every block once
    }
}
