//! One 64-bit name for "this connection slot": a kind byte, the slot, and the low 24 bits of
//! the connection's id (slots are reused; a stale tag carries an old generation and is ignored).
//!
//! The io_uring worker puts one in every operation's `user_data` (kind: the operation), and
//! the splice program carries one per socket (kind: the worker that owns it) back on the
//! pressure ring.

/// A tagged connection slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// What the tag is for: an operation kind, or a worker index.
    pub kind: u8,
    /// Connection (or listener) slot.
    pub slot: u32,
    /// Low 24 bits of the connection id.
    pub generation: u32,
}

const GENERATION_MASK: u64 = 0xff_ffff;

/// Most worker threads a proxy runs: the splice program names a socket's worker in the tag's
/// `kind` byte.
pub const MAX_WORKERS: usize = u8::MAX as usize + 1;

impl Tag {
    /// A tag of `kind` for `slot` of connection `id`.
    pub fn new(kind: u8, slot: u32, id: u64) -> Tag {
        Tag {
            kind,
            slot,
            generation: (id & GENERATION_MASK) as u32,
        }
    }

    /// Packs into 64 bits (io_uring `user_data`, the program's `owner` field).
    pub fn encode(self) -> u64 {
        u64::from(self.kind) << 56 | u64::from(self.slot) << 24 | u64::from(self.generation)
    }

    /// Unpacks 64 bits made by [`Tag::encode`].
    pub fn decode(value: u64) -> Tag {
        Tag {
            kind: (value >> 56) as u8,
            slot: ((value >> 24) & 0xffff_ffff) as u32,
            generation: (value & GENERATION_MASK) as u32,
        }
    }

    /// Whether this tag belongs to connection `id`.
    pub fn is_for(&self, id: u64) -> bool {
        u64::from(self.generation) == id & GENERATION_MASK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_tell_generations_apart() {
        let tag = Tag::new(12, 0xdead_beef, 0x1234_5678_9abc);
        let back = Tag::decode(tag.encode());
        assert_eq!(back, tag);
        assert!(back.is_for(0x1234_5678_9abc));
        assert!(!back.is_for(0x1234_5678_9abd));
        assert_eq!(
            Tag::decode(Tag::new(3, 123_456, 0xab_cdef).encode()).slot,
            123_456
        );
    }
}
