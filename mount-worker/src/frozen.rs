//! The frozen layers under a view, as a stack that views share.
//!
//! A snapshot of a branch shows the layers the branch had frozen so far,
//! and each later snapshot the same ones with one more on top: held as a
//! list per view, n snapshots of one branch held n²/2 entries (20 MiB at
//! 1 000 snapshots), and each creation copied n of them. Here each frozen
//! layer is one node pointing at the layers below it, so a snapshot takes
//! its branch's stack as it is, and every view that shows a layer shares
//! its node and descriptors.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::snapshot::LayerId;

/// The frozen layers of a view, top first (none: the view sits on main).
#[derive(Clone, Default)]
pub struct FrozenStack(Option<Arc<Frozen>>);

/// One frozen layer, and the stack below it.
pub struct Frozen {
    /// Its id.
    pub id: LayerId,
    /// The root of its tree.
    pub tree: Arc<OwnedFd>,
    /// Its index of the copies of hard-linked files.
    pub index: Arc<OwnedFd>,
    below: FrozenStack,
    /// Layers in the stack this one tops, itself included.
    depth: usize,
}

impl FrozenStack {
    /// This stack with layer `id`, of `tree` and `index`, frozen on top.
    pub fn push(&self, id: LayerId, tree: Arc<OwnedFd>, index: Arc<OwnedFd>) -> FrozenStack {
        FrozenStack(Some(Arc::new(Frozen {
            id,
            tree,
            index,
            below: self.clone(),
            depth: self.len() + 1,
        })))
    }

    /// How many layers it holds.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |f| f.depth)
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Its layers, top first.
    pub fn iter(&self) -> impl Iterator<Item = &Frozen> {
        std::iter::successors(self.0.as_deref(), |f| f.below.0.as_deref())
    }
}

impl Drop for Frozen {
    /// Drops the layers below that nothing else holds one by one: dropped
    /// recursively, a stack of many thousand layers would overflow the
    /// thread's stack.
    fn drop(&mut self) {
        let mut below = self.below.0.take();
        while let Some(f) = below {
            below = match Arc::try_unwrap(f) {
                Ok(mut f) => f.below.0.take(),
                Err(_) => None,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> Arc<OwnedFd> {
        Arc::new(std::fs::File::open("/").unwrap().into())
    }

    #[test]
    fn stacks_share_the_layers_below_their_tops() {
        let one = FrozenStack::default().push(LayerId(1), fd(), fd());
        let two = one.push(LayerId(2), fd(), fd());
        let other = one.push(LayerId(3), fd(), fd());
        assert_eq!((one.len(), two.len(), other.len()), (1, 2, 2));
        assert!(FrozenStack::default().is_empty());
        let bottom = |s: &FrozenStack| Arc::as_ptr(&s.iter().last().unwrap().tree);
        assert_eq!(bottom(&two), bottom(&one));
        assert_eq!(bottom(&other), bottom(&one));
        let tops: Vec<_> = two.iter().map(|f| Arc::as_ptr(&f.tree)).collect();
        assert_eq!(tops[1], Arc::as_ptr(&one.iter().next().unwrap().tree));
    }

    #[test]
    fn a_deep_stack_drops_without_recursion() {
        let shared = fd();
        let mut s = FrozenStack::default();
        for _ in 0..200_000 {
            s = s.push(LayerId(1), shared.clone(), shared.clone());
        }
        let half = {
            let mut h = s.clone();
            for _ in 0..100_000 {
                h = FrozenStack(h.0.as_ref().unwrap().below.0.clone());
            }
            h
        };
        drop(s);
        assert_eq!(half.len(), 100_000);
        assert_eq!(Arc::strong_count(&shared), 1 + 2 * 100_000);
        drop(half);
        assert_eq!(Arc::strong_count(&shared), 1);
    }
}
