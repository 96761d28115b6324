//! What the frozen layers below a directory of a layered view hold, by name.
//!
//! A directory changed between snapshots of its branch merges one part per
//! frozen layer that has a copy of it: a branch snapshotted a thousand times
//! while its root changes has a thousand parts at its root. Resolving a name
//! there, or checking that a new name is free, would try each part, and a
//! listing would read each. A [`LayerIndex`] lists, once, every name those
//! parts hold and which parts hold it, so that a lookup visits only those
//! (and main's part below them) and a listing reads no frozen part again.
//!
//! Frozen layers are never written again, so an index stays true for as
//! long as the directory merges the same parts; when the top layer freezes,
//! its copy of the directory goes on top with [`LayerIndex::push`]. The
//! index is plain data: [`crate::layered`] reads the parts and keeps it.

use std::collections::BTreeMap;

/// One entry of one part of a directory.
pub struct PartEntry {
    /// Its name.
    pub name: Vec<u8>,
    /// `DT_*`.
    pub d_type: u8,
    /// The object's id, `None` for a whiteout.
    pub id: Option<u64>,
}

/// The names held by the top `parts` frozen layer parts of a directory.
/// Ordered by name, so that a listing made from it comes out the same in
/// every worker (a worker taking over serves a directory read half way by
/// listing it again and going on at the kernel's offset).
#[derive(Clone, Default)]
pub struct LayerIndex {
    parts: usize,
    names: BTreeMap<Box<[u8]>, Held>,
}

/// Where the indexed parts hold one name.
#[derive(Clone)]
struct Held {
    /// The topmost part's entry: `DT_*` and id (`None`: a whiteout).
    top: (u8, Option<u64>),
    /// The parts holding an entry for the name, numbered from the bottom
    /// (so that a part pushed on top leaves the numbers as they are),
    /// bottom first.
    at: Vec<u32>,
}

impl LayerIndex {
    /// Indexes `parts`, each a part's entries, topmost part first.
    pub fn new(parts: Vec<Vec<PartEntry>>) -> LayerIndex {
        let mut ix = LayerIndex::default();
        for entries in parts.into_iter().rev() {
            ix.push(entries);
        }
        ix
    }

    /// Adds a part above those indexed, with its entries.
    pub fn push(&mut self, entries: Vec<PartEntry>) {
        let at = u32::try_from(self.parts).expect("fewer than 2^32 layers");
        for e in entries {
            let top = (e.d_type, e.id);
            self.names
                .entry(e.name.into_boxed_slice())
                .and_modify(|h| {
                    h.top = top;
                    h.at.push(at);
                })
                .or_insert_with(|| Held { top, at: vec![at] });
        }
        self.parts += 1;
    }

    /// How many parts it covers: the topmost ones of the directory.
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// The parts holding an entry (a whiteout included) for `name`,
    /// topmost first, as positions among the indexed parts (0: the top).
    pub fn holding<'a>(&'a self, name: &[u8]) -> impl Iterator<Item = usize> + 'a {
        let at = self.names.get(name).map_or(&[][..], |h| &h.at[..]);
        at.iter().rev().map(|&p| self.parts - 1 - p as usize)
    }

    /// The topmost entry of every name the indexed parts hold (what a
    /// listing of those parts, top first, would meet first), by name.
    pub fn entries(&self) -> impl Iterator<Item = PartEntry> + '_ {
        self.names.iter().map(|(name, h)| PartEntry {
            name: name.to_vec(),
            d_type: h.top.0,
            id: h.top.1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, id: Option<u64>) -> PartEntry {
        PartEntry {
            name: name.as_bytes().to_vec(),
            d_type: libc::DT_REG,
            id,
        }
    }

    fn holding(ix: &LayerIndex, name: &str) -> Vec<usize> {
        ix.holding(name.as_bytes()).collect()
    }

    #[test]
    fn finds_the_parts_holding_a_name_topmost_first() {
        // Part 0 is the top: it whites `b` out and has `a` again.
        let ix = LayerIndex::new(vec![
            vec![e("a", Some(10)), e("b", None)],
            vec![e("c", Some(3))],
            vec![e("a", Some(1)), e("b", Some(2))],
        ]);
        assert_eq!(ix.parts(), 3);
        assert_eq!(holding(&ix, "a"), [0, 2]);
        assert_eq!(holding(&ix, "b"), [0, 2]);
        assert_eq!(holding(&ix, "c"), [1]);
        assert!(holding(&ix, "d").is_empty());
        let mut top: Vec<_> = ix
            .entries()
            .map(|e| (String::from_utf8(e.name).unwrap(), e.id))
            .collect();
        top.sort();
        assert_eq!(
            top,
            [
                ("a".into(), Some(10)),
                ("b".into(), None),
                ("c".into(), Some(3))
            ]
        );
    }

    #[test]
    fn a_part_pushed_on_top_shifts_the_others_down() {
        let mut ix = LayerIndex::new(vec![vec![e("a", Some(1))], vec![e("b", Some(2))]]);
        ix.push(vec![e("b", None), e("n", Some(5))]);
        assert_eq!(ix.parts(), 3);
        assert_eq!(holding(&ix, "a"), [1]);
        assert_eq!(holding(&ix, "b"), [0, 2]);
        assert_eq!(holding(&ix, "n"), [0]);
        let b = ix.entries().find(|e| e.name == b"b").unwrap();
        assert_eq!(b.id, None, "the whiteout on top hides the file below");
    }
}
