//! Identities that cross the crate's APIs, as newtypes so raw integers and strings never get mixed up.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest space id accepted, in bytes.
pub const MAX_SPACE_ID_LEN: usize = 64;

/// Why a string is not a valid [`SpaceId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpaceIdError {
    /// The id was empty.
    #[error("space id is empty; use 1 to 64 characters of [A-Za-z0-9._-]")]
    Empty,
    /// The id was longer than [`MAX_SPACE_ID_LEN`] bytes.
    #[error("space id is {0} bytes long; the limit is 64")]
    TooLong(usize),
    /// The id held a character outside `[A-Za-z0-9._-]`.
    #[error("space id contains {0:?} at byte {1}; only [A-Za-z0-9._-] is allowed")]
    BadChar(char, usize),
}

/// Name of a memory space: 1..=64 bytes of `[A-Za-z0-9._-]`.
///
/// The charset keeps ids safe to use as folder names and log fields. Cloning is cheap (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SpaceId(Arc<str>);

impl SpaceId {
    /// Validates `s` and makes a space id of it.
    pub fn new(s: &str) -> Result<Self, SpaceIdError> {
        if s.is_empty() {
            return Err(SpaceIdError::Empty);
        }
        if s.len() > MAX_SPACE_ID_LEN {
            return Err(SpaceIdError::TooLong(s.len()));
        }
        if let Some((i, c)) =
            s.char_indices().find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(SpaceIdError::BadChar(c, i));
        }
        // "." and ".." are valid by charset but would be folder aliases on disk.
        if s == "." || s == ".." {
            return Err(SpaceIdError::BadChar('.', 0));
        }
        Ok(Self(Arc::from(s)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SpaceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        SpaceId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for SpaceId {
    type Err = SpaceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpaceId::new(s)
    }
}

impl fmt::Display for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpaceId({})", &self.0)
    }
}

macro_rules! u64_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

u64_newtype!(
    /// Position of an entry in a space's log. The first entry is 1; `Seq(0)` means "nothing yet".
    Seq
);
u64_newtype!(
    /// Term of a primary's authority over its logs. Every record and batch carries the epoch it was
    /// written in, so a replica never resumes against a log that is not the one it copied.
    Epoch
);
u64_newtype!(
    /// Identity of a node, derived from its name with [`NodeId::from_name`].
    NodeId
);

impl Seq {
    /// "No entry yet": the position of an empty log.
    pub const ZERO: Seq = Seq(0);

    /// The sequence after this one (saturating: no log reaches `u64::MAX`, and a peer's word
    /// that claims it must not wrap to zero).
    pub const fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }
}

impl NodeId {
    /// A stable 64-bit id for a node name (the name in its certificate), the same on every machine.
    pub fn from_name(name: &str) -> NodeId {
        NodeId(xxhash_rust::xxh3::xxh3_64(name.as_bytes()))
    }
}

/// Kind of an entry, defined by the embedding server (episode, update, delete, checkpoint...).
/// The transport carries it and never interprets it.
pub type EntryKind = u8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_id_accepts_the_charset() {
        for ok in ["a", "tenant-1", "A.b_c-9", &"x".repeat(64)] {
            assert_eq!(SpaceId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn space_id_rejects_bad_input() {
        assert_eq!(SpaceId::new(""), Err(SpaceIdError::Empty));
        assert_eq!(SpaceId::new(&"x".repeat(65)), Err(SpaceIdError::TooLong(65)));
        assert_eq!(SpaceId::new("a/b"), Err(SpaceIdError::BadChar('/', 1)));
        assert!(SpaceId::new("é").is_err());
        assert!(SpaceId::new("..").is_err());
        assert!(SpaceId::new("a b").is_err());
    }

    #[test]
    fn space_id_deserialize_validates() {
        let bytes = postcard::to_allocvec(&"bad/id").unwrap();
        assert!(postcard::from_bytes::<SpaceId>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&"good").unwrap();
        assert_eq!(postcard::from_bytes::<SpaceId>(&bytes).unwrap().as_str(), "good");
    }

    #[test]
    fn node_id_is_stable() {
        assert_eq!(NodeId::from_name("primary"), NodeId::from_name("primary"));
        assert_ne!(NodeId::from_name("primary"), NodeId::from_name("replica-1"));
    }
}
