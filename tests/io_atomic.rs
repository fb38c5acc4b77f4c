//! Atomic output: complete new file or the old one untouched, never a partial file, never a
//! temporary file left behind.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::Path;

use attnc::io::{write_atomically, write_atomically_with, write_npy, IoError, Tensor};

/// The names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn writes_a_new_file_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npy");
    write_atomically(&path, b"hello").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"hello");
    assert_eq!(entries(dir.path()), vec!["out.npy"]);
}

#[test]
fn replaces_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npy");
    fs::write(&path, b"old contents, longer than the new ones").unwrap();
    write_atomically(&path, b"new").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(entries(dir.path()), vec!["out.npy"]);
}

#[cfg(unix)]
#[test]
fn keeps_the_mode_of_a_replaced_file_and_gives_new_files_a_normal_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npy");
    fs::write(&path, b"old").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    write_atomically(&path, b"new").unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );

    let fresh = dir.path().join("fresh.npy");
    write_atomically(&fresh, b"x").unwrap();
    let mode = fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    // 0o666 less the umask: at least the owner can read and write it, not just a 0o600 temp.
    assert_eq!(mode & 0o600, 0o600, "{mode:o}");
}

#[test]
fn failure_while_writing_leaves_the_old_file_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npy");
    fs::write(&path, b"precious").unwrap();
    let err = write_atomically_with(&path, |file| {
        file.write_all(b"partial data")?;
        Err(std::io::Error::new(
            ErrorKind::StorageFull,
            "no space left on device",
        ))
    })
    .unwrap_err();
    assert!(matches!(err, IoError::Write { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "output `{}`: disk full (while writing the temporary file)",
            path.display()
        )
    );
    assert_eq!(fs::read(&path).unwrap(), b"precious");
    assert_eq!(entries(dir.path()), vec!["out.npy"]);
}

#[test]
fn failure_while_writing_a_new_file_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npy");
    let err =
        write_atomically_with(&path, |_| Err(std::io::Error::other("something odd"))).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot write the file (while writing the temporary file: something odd)"),
        "{err}"
    );
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn dev_full_is_refused_and_left_alone() {
    // /dev/full is a character device: renaming a temporary file over it would replace the
    // device node (root can write in /dev), so the target must be a regular file or not exist.
    let target = Path::new("/dev/full");
    if !target.exists() {
        eprintln!("note: no /dev/full here; skipping");
        return;
    }
    let before = entries(Path::new("/dev"));
    let err = write_atomically(target, b"data").unwrap_err().to_string();
    assert!(
        err.starts_with("output `/dev/full`: not a regular file ("),
        "{err}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        assert!(fs::metadata(target).unwrap().file_type().is_char_device());
    }
    let after = entries(Path::new("/dev"));
    assert!(
        after.iter().all(|n| !n.ends_with(".attnc-tmp")),
        "{after:?}"
    );
    assert!(after.len() <= before.len() || after.iter().all(|n| !n.starts_with(".full.")));

    let t = Tensor::from_f32(vec![1], vec![1.0]).unwrap();
    let err = write_npy(target, &t).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/out.npy");
    let err = write_atomically(&path, b"x").unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "output `{}`: directory does not exist",
            path.display()
        )),
        "{err}"
    );
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn parent_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    fs::write(&file, b"x").unwrap();
    let err = write_atomically(&file.join("out.npy"), b"y")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a directory"), "{err}");
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn target_is_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let err = write_atomically(&sub, b"x").unwrap_err().to_string();
    assert_eq!(
        err,
        format!("output `{}`: is a directory, not a file", sub.display())
    );
    assert_eq!(entries(dir.path()), vec!["sub"]);
    assert!(entries(&sub).is_empty());
    let with_slash = format!("{}/", sub.display());
    assert!(write_atomically(Path::new(&with_slash), b"x").is_err());
    assert!(write_atomically(Path::new(""), b"x").is_err());
}

#[cfg(unix)]
#[test]
fn unwritable_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    fs::write(ro.join("out.npy"), b"old").unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
    let probe = ro.join("probe");
    if fs::write(&probe, b"").is_ok() {
        let _ = fs::remove_file(&probe);
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
        eprintln!(
            "note: running as root (permissions are not enforced); skipping unwritable_directory"
        );
        return;
    }
    let path = ro.join("out.npy");
    let err = write_atomically(&path, b"new").unwrap_err().to_string();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        err.starts_with(&format!("output `{}`: permission denied", path.display())),
        "{err}"
    );
    assert_eq!(fs::read(&path).unwrap(), b"old");
    assert_eq!(entries(&ro), vec!["out.npy"]);
}

#[cfg(unix)]
#[test]
fn read_only_existing_file_is_not_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npy");
    fs::write(&path, b"keep me").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
    let err = write_atomically(&path, b"new").unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "output `{}`: permission denied (the existing file is read-only)",
            path.display()
        )
    );
    assert_eq!(fs::read(&path).unwrap(), b"keep me");
    assert_eq!(entries(dir.path()), vec!["out.npy"]);
}

#[cfg(unix)]
#[test]
fn writes_through_a_symbolic_link() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.npy");
    let link = dir.path().join("link.npy");
    fs::write(&real, b"old").unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    write_atomically(&link, b"new").unwrap();
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(&real).unwrap(), b"new");

    let dangling = dir.path().join("dangling.npy");
    std::os::unix::fs::symlink(dir.path().join("nowhere/x.npy"), &dangling).unwrap();
    let err = write_atomically(&dangling, b"x").unwrap_err().to_string();
    assert!(err.contains("following the symbolic link"), "{err}");
}

#[test]
fn write_npy_failure_names_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::from_f32(vec![2], vec![1.0, 2.0]).unwrap();
    let err = write_npy(dir.path(), &t).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("output `{}`: ", dir.path().display())),
        "{err}"
    );
}

/// A real full disk: set `ATTNC_TEST_FULL_DIR` to a directory on a nearly full file system
/// (e.g. a 64 KiB tmpfs) to run it.
#[test]
fn real_full_disk_when_available() {
    let Some(dir) = std::env::var_os("ATTNC_TEST_FULL_DIR") else {
        eprintln!("note: ATTNC_TEST_FULL_DIR not set; skipping the real full-disk test");
        return;
    };
    let dir = Path::new(&dir);
    let path = dir.join("full.npy");
    fs::write(&path, b"old").unwrap();
    let before = entries(dir);
    let big = vec![0u8; 64 << 20];
    let err = write_atomically(&path, &big).unwrap_err().to_string();
    assert!(err.contains("disk full"), "{err}");
    assert_eq!(fs::read(&path).unwrap(), b"old");
    assert_eq!(entries(dir), before);
    fs::remove_file(&path).unwrap();
}
