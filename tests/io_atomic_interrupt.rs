//! The interrupt path of atomic writes: `remove_pending_temp_files` (what a Ctrl-C handler calls)
//! removes the temporary file of a write in progress and the target stays untouched.
//!
//! In its own test binary because the registry is process-wide: running it next to other writes
//! would remove their temporary files too.

use std::fs;
use std::io::Write;

use attnc::io::{remove_pending_temp_files, write_atomically_with};

#[test]
fn interrupt_removes_the_temp_file_and_keeps_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npy");
    fs::write(&path, b"old").unwrap();
    let mut seen_temp = Vec::new();
    let result = write_atomically_with(&path, |file| {
        file.write_all(b"half of the new da")?;
        seen_temp = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "out.npy")
            .collect();
        // What the interrupt handler does before exiting.
        assert_eq!(remove_pending_temp_files(), 1);
        Ok(())
    });
    assert_eq!(seen_temp.len(), 1, "{seen_temp:?}");
    assert!(
        seen_temp[0].starts_with(".out.npy.") && seen_temp[0].ends_with(".attnc-tmp"),
        "{seen_temp:?}"
    );
    // The rename found no temporary file: an error, and the target is the old file.
    assert!(result.is_err());
    assert_eq!(fs::read(&path).unwrap(), b"old");
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1);
    assert_eq!(remove_pending_temp_files(), 0);
}
