//! [`Buf`]: a view `[off, off + len)` of host values shared by `Arc` (copy on write), so that many
//! tensors (a model's parameters) can be zero-copy views of one flat arena.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Source of [`Buf`] stamps: every creation and every write takes the next one, so no two
/// contents ever share a stamp.
static NEXT_STAMP: AtomicU64 = AtomicU64::new(1);

fn next_stamp() -> u64 {
    NEXT_STAMP.fetch_add(1, Ordering::Relaxed)
}

/// `len` values from `off` of a shared vector. Reading yields just the view; writing
/// ([`Buf::make_mut`]) is in place when this is the vector's only holder, and otherwise copies
/// just the view first (copy on write, as a whole-vector storage behaves).
#[derive(Clone, Debug)]
pub struct Buf<T> {
    data: Arc<Vec<T>>,
    /// Lives exactly as long as `data` (created and shared with it): caches watch it through a
    /// [`Weak`] ([`Buf::weak`]). A `Weak` of `data` itself would make every write a copy, since
    /// [`Arc::get_mut`] refuses while weak pointers exist.
    alive: Arc<()>,
    off: usize,
    len: usize,
    /// Names these values: a new stamp on creation and on every [`Buf::make_mut`]; clones and
    /// views keep it (they see the same values, and nobody writes while they share them).
    stamp: u64,
}

/// What [`Buf::key`] returns: equal keys mean equal values, for as long as the process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufKey {
    stamp: u64,
    off: usize,
    len: usize,
}

impl BufKey {
    /// Whether both name the same range of their vectors (whatever the values).
    pub fn same_range(&self, o: &BufKey) -> bool {
        self.off == o.off && self.len == o.len
    }
}

impl<T: Clone> Buf<T> {
    /// The whole of `v`.
    pub fn new(v: Vec<T>) -> Self {
        let len = v.len();
        Buf { data: Arc::new(v), alive: Arc::new(()), off: 0, len, stamp: next_stamp() }
    }
    pub fn as_slice(&self) -> &[T] {
        &self.data[self.off..self.off + self.len]
    }
    /// The view for writing: in place when no other `Buf` holds the vector, else a copy of
    /// just this view first.
    pub fn make_mut(&mut self) -> &mut [T] {
        if Arc::get_mut(&mut self.data).is_none() {
            *self = Buf::new(self.as_slice().to_vec());
        }
        self.stamp = next_stamp();
        let (off, len) = (self.off, self.len);
        let d = Arc::get_mut(&mut self.data).expect("unique after the copy");
        &mut d[off..off + len]
    }
    /// `[off, off + len)` of this view, sharing its memory; `None` when out of range.
    pub fn view(&self, off: usize, len: usize) -> Option<Self> {
        (off.checked_add(len)? <= self.len).then(|| Buf { data: self.data.clone(), alive: self.alive.clone(), off: self.off + off, len, stamp: self.stamp })
    }
    /// A key for caches of values derived from this view (a convolution's transformed kernel):
    /// two views with equal keys hold equal values. A write through [`Buf::make_mut`] (in place
    /// only while no other `Buf` shares the memory) gives the writer a new key; a vector freed
    /// and another allocated at its address get different stamps.
    pub fn key(&self) -> BufKey {
        BufKey { stamp: self.stamp, off: self.off, len: self.len }
    }
    /// A token of the shared vector, without keeping it alive or stopping writes in place: a
    /// cache entry derived from this view can tell that its source is gone
    /// ([`Weak::strong_count`] 0) or is the same memory written since ([`Weak::ptr_eq`] with a
    /// newer key).
    pub fn weak(&self) -> Weak<()> {
        Arc::downgrade(&self.alive)
    }
    /// The values, without a copy when this is the vector's only holder and views all of it.
    pub fn into_vec(self) -> Vec<T> {
        if self.off == 0 && self.len == self.data.len() { Arc::try_unwrap(self.data).unwrap_or_else(|a| (*a).clone()) } else { self.as_slice().to_vec() }
    }
    /// Whether both are the same view of the same memory.
    pub fn same_view(&self, o: &Buf<T>) -> bool {
        Arc::ptr_eq(&self.data, &o.data) && self.off == o.off && self.len == o.len
    }
    /// Whether this is the view `[off, off + len)` of `arena`.
    pub fn is_view_of(&self, arena: &Buf<T>, off: usize, len: usize) -> bool {
        Arc::ptr_eq(&self.data, &arena.data) && self.off == arena.off + off && self.len == len
    }
}

impl<T: Clone> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Clone> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf::new(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_to_a_shared_view_copies_just_that_view() {
        let arena = Buf::new((0..10).map(|i| i as f32).collect::<Vec<_>>());
        let mut a = arena.view(2, 3).unwrap();
        let b = arena.view(5, 5).unwrap();
        assert_eq!(&*a, &[2.0, 3.0, 4.0]);
        assert!(a.is_view_of(&arena, 2, 3) && !a.is_view_of(&arena, 5, 3));
        a.make_mut()[0] = -1.0;
        assert_eq!(a.len(), 3);
        assert_eq!(&*a, &[-1.0, 3.0, 4.0]);
        assert_eq!(arena[2], 2.0, "the arena is unchanged");
        assert!(!a.is_view_of(&arena, 2, 3) && b.is_view_of(&arena, 5, 5));
        assert!(arena.view(8, 3).is_none());
    }

    #[test]
    fn keys_change_with_every_write_and_only_then() {
        let mut a = Buf::new(vec![1.0f32; 8]);
        let k0 = a.key();
        let c = a.clone();
        assert_eq!(c.key(), k0, "a clone holds the same values");
        assert_ne!(a.view(2, 3).unwrap().key(), k0, "another range");
        assert_eq!(a.view(2, 3).unwrap().key(), a.view(2, 3).unwrap().key());
        drop(c);
        let p = a.as_ptr();
        a.make_mut()[0] = 2.0;
        assert_eq!(a.as_ptr(), p, "written in place");
        assert_ne!(a.key(), k0, "a write in place renames the values");
        let k1 = a.key();
        let shared = a.clone();
        a.make_mut()[1] = 3.0;
        assert_ne!(a.key(), k1, "a copy on write too");
        assert_eq!(shared.key(), k1, "the other holder still sees the old values");
        assert_ne!(Buf::new(vec![1.0f32; 8]).key(), Buf::new(vec![1.0f32; 8]).key(), "every vector its own");
    }

    #[test]
    fn a_unique_arena_is_written_in_place() {
        let mut arena = Buf::new(vec![1.0f32; 8]);
        let p = arena.as_ptr();
        arena.make_mut()[3] = 2.0;
        assert_eq!(arena.as_ptr(), p);
        let mut v = arena.view(4, 4).unwrap();
        drop(arena);
        v.make_mut()[0] = 5.0;
        assert_eq!(v.as_ptr(), unsafe { p.add(4) }, "the last view of a vector writes in place");
        assert_eq!(v.into_vec(), vec![5.0, 1.0, 1.0, 1.0]);
    }

    /// A cache's watch on the memory ([`Buf::weak`]) neither stops a write in place nor outlives
    /// the memory.
    #[test]
    fn a_watched_buffer_is_still_written_in_place() {
        let mut a = Buf::new(vec![1.0f32; 8]);
        let watch = a.weak();
        let p = a.as_ptr();
        a.make_mut()[0] = 2.0;
        assert_eq!(a.as_ptr(), p, "written in place while watched");
        assert!(watch.ptr_eq(&a.weak()) && watch.strong_count() == 1);
        let v = a.view(2, 2).unwrap();
        drop(a);
        assert_eq!(watch.strong_count(), 1, "a view keeps the memory");
        drop(v);
        assert_eq!(watch.strong_count(), 0, "gone with the last holder");
    }
}
