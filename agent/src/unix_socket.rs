//! The agent's Unix sockets (control API, queries): bound replacing a stale
//! one a previous agent left, with the mode that says who may connect, and
//! removed at exit.

use std::{
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::Path,
};

use tokio::net::UnixListener;
use tracing::{info, warn};

/// Binds `path` with `mode`; a missing directory is created with `dir_mode`.
/// Refuses to replace anything but a socket.
pub fn bind(path: &Path, mode: u32, dir_mode: u32) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Removes the socket at exit, saying so (`what` names it in the log).
pub fn remove(path: &Path, what: &str) {
    match std::fs::remove_file(path) {
        Ok(()) => info!(socket = %path.display(), "{what} socket removed"),
        Err(e) => warn!(socket = %path.display(), error = %e, "cannot remove the {what} socket"),
    }
}
