//! Files the daemon and the CLI write for later readers (a node's state,
//! a signed set's manifest): whole or not at all, so a reader, or the next
//! start after a crash, never sees half of one.

use std::path::Path;

/// Writes `bytes` to `path` through a temporary file beside it and a
/// rename, creating the directory if it is not there.
///
/// # Errors
/// The directory or the file cannot be written.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}
