//! Removing a SQLite database with its WAL files: the tests' temporary
//! databases and the benchmarks' (`#[path]`-included by both).

use std::path::Path;

/// Removes `path` and its `-wal` and `-shm` files, whichever exist.
pub fn remove(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}
