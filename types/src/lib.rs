//! raftwal-types: the domain integers every raftwal crate speaks, and the Raft hard state.
//!
//! What it is: `Term`, `LogIndex` and `NodeId` newtypes (a bare `u64` never means one of them)
//! and [`HardState`]. It exists so that the WAL and consensus share one vocabulary without either
//! depending on the other. What it is not: a home for anything with behaviour beyond arithmetic
//! on these integers.

#![forbid(unsafe_code)]

/// Defines a `u64` newtype with `get`, ordering, hashing, `Debug` as `Name(n)` and `Display`
/// as the number: the shape of every domain integer here and in raftwal-client.
#[macro_export]
macro_rules! newtype_u64 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value, for encoding.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                ::std::fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

newtype_u64!(
    /// A Raft term.
    Term
);
newtype_u64!(
    /// The position of an entry in the log. The first entry of a new log has index 1; index 0
    /// means "before the first entry".
    LogIndex
);
newtype_u64!(
    /// A node id. Zero is reserved for "none" (no vote).
    NodeId
);

impl LogIndex {
    /// The index after this one (saturating: indexes near `u64::MAX` come only from bad input,
    /// which is refused elsewhere, never a panic).
    pub const fn next(self) -> LogIndex {
        LogIndex(self.0.saturating_add(1))
    }

    /// The index before this one (saturating at zero).
    pub const fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }
}

/// The Raft hard state: what must be durable before a vote or an acknowledgement leaves the node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// The current term.
    pub term: Term,
    /// The node voted for in `term`, if any.
    pub vote: Option<NodeId>,
    /// The highest index known committed.
    pub commit: LogIndex,
}
