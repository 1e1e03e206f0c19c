//! [`Name`]: a shared, immutable string in one pointer. Every identity
//! and rule name is one, referred to from several indexes, so its block's
//! header counts: four bytes of reference count and four of length, where
//! `Arc<str>` takes a fat pointer and two words of counts, and `arcstr` a
//! thin pointer and two words. A short name such as `id12345` fits a
//! 16-byte block, not 24 (1.6 MB at 100,000 identities and rules).

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering, fence};

/// The block's start; the name's bytes follow it.
#[repr(C)]
struct Header {
    count: AtomicU32,
    len: u32,
}

/// More references than this abort, as `Arc` does: a count that wrapped
/// would free a block still in use.
const MAX_COUNT: u32 = i32::MAX as u32;

/// A shared name (see the module documentation).
pub struct Name(NonNull<Header>);

// SAFETY: the bytes never change after the block is made, and the count is
// atomic: a `Name` is as shareable as an `Arc<str>`.
unsafe impl Send for Name {}
// SAFETY: as above.
unsafe impl Sync for Name {}

impl Name {
    fn layout(len: usize) -> Layout {
        match Layout::new::<Header>().extend(Layout::array::<u8>(len).unwrap_or_else(|_| too_long())) {
            Ok((layout, _)) => layout,
            Err(_) => too_long(),
        }
    }

    fn header(&self) -> &Header {
        // SAFETY: the block lives while any `Name` points to it.
        unsafe { self.0.as_ref() }
    }

    /// The number of `Name`s sharing this one's block.
    #[must_use]
    pub fn strong_count(this: &Self) -> usize {
        this.header().count.load(Ordering::Acquire) as usize
    }

    /// Whether two names share one block.
    #[must_use]
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.0 == b.0
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        self
    }
}

/// A name of 4 GiB or more: no policy text holds one, and the block's
/// length could not say it.
#[cold]
fn too_long() -> ! {
    std::process::abort()
}

impl From<&str> for Name {
    fn from(text: &str) -> Self {
        let len = u32::try_from(text.len()).unwrap_or_else(|_| too_long());
        let layout = Self::layout(text.len());
        #[allow(clippy::cast_ptr_alignment, reason = "the block is allocated with the header's alignment")]
        // SAFETY: the layout is never zero-sized (it holds the header); the
        // header is written before any read, and the bytes are copied into
        // the room the layout gives after it.
        unsafe {
            let block = alloc(layout);
            let Some(header) = NonNull::new(block.cast::<Header>()) else { handle_alloc_error(layout) };
            header.as_ptr().write(Header { count: AtomicU32::new(1), len });
            let bytes = block.add(size_of::<Header>());
            std::ptr::copy_nonoverlapping(text.as_ptr(), bytes, text.len());
            Self(header)
        }
    }
}

impl From<String> for Name {
    fn from(text: String) -> Self {
        Self::from(text.as_str())
    }
}

impl Clone for Name {
    fn clone(&self) -> Self {
        // As `Arc`: a new reference needs no ordering with other memory.
        if self.header().count.fetch_add(1, Ordering::Relaxed) >= MAX_COUNT {
            std::process::abort();
        }
        Self(self.0)
    }
}

impl Drop for Name {
    fn drop(&mut self) {
        if self.header().count.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // The last reference: every other drop happened before this one.
        fence(Ordering::Acquire);
        let layout = Self::layout(self.len());
        // SAFETY: no other `Name` points to the block any more, and it was
        // allocated with this layout.
        unsafe { dealloc(self.0.as_ptr().cast::<u8>(), layout) };
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        let len = self.header().len as usize;
        // SAFETY: the block holds `len` bytes after its header, copied from
        // a `str` and never changed.
        unsafe {
            let bytes = self.0.as_ptr().cast::<u8>().add(size_of::<Header>());
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(bytes, len))
        }
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        Self::ptr_eq(self, other) || **self == **other
    }
}

impl Eq for Name {}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &**self == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &**self == *other
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl Hash for Name {
    /// As the `str` it holds, so a set of names is searched by `&str`.
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&**self, f)
    }
}

impl Default for Name {
    fn default() -> Self {
        Self::from("")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::Name;

    #[test]
    fn holds_its_text_and_counts_its_references() {
        for text in ["", "a", "id12345", "a name longer than sixteen bytes", "ünïcødé"] {
            let name = Name::from(text);
            assert_eq!(&*name, text);
            assert_eq!(name.to_string(), text);
            assert_eq!(format!("{name:?}"), format!("{text:?}"));
            let copy = Name::clone(&name);
            assert!(Name::ptr_eq(&name, &copy));
            assert_eq!(Name::strong_count(&name), 2);
            drop(copy);
            assert_eq!(Name::strong_count(&name), 1);
            let other = Name::from(text.to_owned());
            assert!(!Name::ptr_eq(&name, &other));
            assert_eq!(name, other);
        }
        assert_eq!(Name::from("a").cmp(&Name::from("b")), std::cmp::Ordering::Less);
        assert_eq!(size_of::<Name>(), 8);
        assert_eq!(size_of::<Option<Name>>(), 8);
    }

    #[test]
    fn is_found_by_its_text() {
        let names: HashSet<Name> = ["x", "y"].into_iter().map(Name::from).collect();
        assert!(names.contains("x") && !names.contains("z"));
        assert_eq!(names.get("y").map(|name| &**name), Some("y"));
    }

    /// Clones and drops on many threads leave the count where it started:
    /// the block is freed once, after the last.
    #[test]
    fn is_shared_across_threads() {
        let name = Name::from("shared");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        let copy = Name::clone(&name);
                        assert_eq!(&*copy, "shared");
                    }
                });
            }
        });
        assert_eq!(Name::strong_count(&name), 1);
    }
}
