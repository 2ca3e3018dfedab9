//! [`Buf`]: a view `[off, off + len)` of host values shared by `Arc` (copy on write), so that many
//! tensors (a model's parameters) can be zero-copy views of one flat arena.

use std::ops::Deref;
use std::sync::Arc;

/// `len` values from `off` of a shared vector. Reading yields just the view; writing
/// ([`Buf::make_mut`]) is in place when this is the vector's only holder, and otherwise copies
/// just the view first (copy on write, as a whole-vector storage behaves).
#[derive(Clone, Debug)]
pub struct Buf<T> {
    data: Arc<Vec<T>>,
    off: usize,
    len: usize,
}

impl<T: Clone> Buf<T> {
    /// The whole of `v`.
    pub fn new(v: Vec<T>) -> Self {
        let len = v.len();
        Buf { data: Arc::new(v), off: 0, len }
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
        let (off, len) = (self.off, self.len);
        let d = Arc::get_mut(&mut self.data).expect("unique after the copy");
        &mut d[off..off + len]
    }
    /// `[off, off + len)` of this view, sharing its memory; `None` when out of range.
    pub fn view(&self, off: usize, len: usize) -> Option<Self> {
        (off.checked_add(len)? <= self.len).then(|| Buf { data: self.data.clone(), off: self.off + off, len })
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
}
