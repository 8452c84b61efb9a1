//! `wrenn image check` against the built base image and copies of it that were damaged on
//! purpose: a flipped byte in the root filesystem, an envd of another version, an initramfs that
//! lost a module. Needs the image (see boot.rs for when a missing one skips or fails).

use std::path::{Path, PathBuf};
use std::process::Command;

use wrenn_image::Manifest;
use wrenn_image::manifest::describe_file;

fn image_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("WRENN_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(wrenn_image::default_image_dir);
    if dir.join("manifest.json").is_file() {
        return Some(dir);
    }
    wrenn_testkit::missing_prerequisite(
        "the image check tests",
        &format!("no image in {} (run `wrenn image build`)", dir.display()),
    );
    None
}

/// A sparse copy of the image directory.
fn copy_image(from: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(entry.path())
            .arg(copy.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
    copy
}

fn problems(dir: &Path, expected: &str) -> Vec<String> {
    wrenn_image::check(dir, expected)
        .unwrap()
        .into_iter()
        .map(|problem| problem.0)
        .collect()
}

/// Checks `dir` against this wrenn's envd version, asserts that one of the problems found
/// satisfies `expected`, and returns them all.
fn assert_found(dir: &Path, expected: impl Fn(&str) -> bool) -> Vec<String> {
    let found = problems(dir, wrenn_envd::ENVD_VERSION);
    assert!(found.iter().any(|p| expected(p)), "{found:?}");
    found
}

#[test]
fn the_built_image_passes_and_another_expected_version_is_named() {
    let Some(image) = image_dir() else { return };
    assert_eq!(
        problems(&image, wrenn_envd::ENVD_VERSION),
        Vec::<String>::new()
    );
    let wrong = problems(&image, "9.9.9");
    assert!(
        wrong.iter().any(|p| p.contains(&format!(
            "envd is version {}, this wrenn expects 9.9.9",
            wrenn_envd::ENVD_VERSION
        ))),
        "{wrong:?}"
    );
}

#[test]
fn a_flipped_byte_in_the_rootfs_is_reported_as_corruption() {
    let Some(image) = image_dir() else { return };
    let copy = copy_image(&image);
    let rootfs = copy.path().join("rootfs.ext4");
    let mut bytes = std::fs::read(&rootfs).unwrap();
    // A byte inside the first used block group's data, well past the superblock.
    let offset = bytes.iter().skip(4 << 20).position(|&b| b != 0).unwrap() + (4 << 20);
    bytes[offset] ^= 0x5a;
    std::fs::write(&rootfs, &bytes).unwrap();
    drop(bytes);
    assert_found(copy.path(), |p| p.starts_with("rootfs.ext4 is corrupted"));

    std::fs::remove_file(copy.path().join("vmlinuz")).unwrap();
    assert_found(copy.path(), |p| p == "vmlinuz is missing");
}

#[test]
fn an_envd_of_another_version_inside_the_image_is_caught() {
    let Some(image) = image_dir() else { return };
    let copy = copy_image(&image);
    let rootfs = copy.path().join("rootfs.ext4");
    let manifest = Manifest::read(copy.path()).unwrap();
    // An envd whose marker says 0.0.1, written into the image in place of the real one.
    let dumped = copy.path().join("envd.real");
    let status = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /usr/bin/envd {}", dumped.display()))
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(status.status.success() && dumped.is_file());
    let mut envd = std::fs::read(&dumped).unwrap();
    let marker = wrenn_image::ENVD_VERSION_MARKER;
    let at = envd
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap()
        + marker.len();
    envd[at..at + 5].copy_from_slice(b"0.0.1");
    let old = copy.path().join("envd.old");
    std::fs::write(&old, &envd).unwrap();
    for request in [
        "rm /usr/bin/envd".to_string(),
        format!("write {} /usr/bin/envd", old.display()),
    ] {
        let output = Command::new("debugfs")
            .args(["-w", "-R", &request])
            .arg(&rootfs)
            .output()
            .unwrap();
        assert!(output.status.success(), "{request}: {output:?}");
    }
    std::fs::remove_file(&dumped).unwrap();
    std::fs::remove_file(&old).unwrap();
    // The manifest is regenerated to match the files, as a build with the old envd would have.
    let mut rewritten = manifest.clone();
    rewritten
        .files
        .insert("rootfs.ext4".into(), describe_file(&rootfs).unwrap());
    rewritten.write(copy.path()).unwrap();
    let expected = format!(
        "the image's envd is version 0.0.1, this wrenn expects {}",
        wrenn_envd::ENVD_VERSION
    );
    let found = assert_found(copy.path(), |p| p.contains(&expected));
    assert!(!found.iter().any(|p| p.contains("corrupted")), "{found:?}");
}

#[test]
fn an_initramfs_without_ext4_is_caught() {
    let Some(image) = image_dir() else { return };
    let copy = copy_image(&image);
    let initrd = copy.path().join("initrd.img");
    let mut archive = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(&initrd).unwrap()),
        &mut archive,
    )
    .unwrap();
    let entries = wrenn_image::cpio::read_archive(&archive).unwrap();
    let mut writer = wrenn_image::cpio::CpioWriter::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for entry in entries
        .iter()
        .filter(|entry| !entry.path.ends_with("/ext4.ko"))
    {
        match entry.mode & 0o170000 {
            0o040000 => writer.directory(&entry.path, entry.mode).unwrap(),
            0o120000 => writer
                .symlink(&entry.path, &String::from_utf8_lossy(&entry.data))
                .unwrap(),
            _ => writer.file(&entry.path, entry.mode, &entry.data).unwrap(),
        }
    }
    std::fs::write(&initrd, writer.finish().unwrap().finish().unwrap()).unwrap();
    let mut manifest = Manifest::read(copy.path()).unwrap();
    manifest
        .files
        .insert("initrd.img".into(), describe_file(&initrd).unwrap());
    manifest.write(copy.path()).unwrap();
    assert_found(copy.path(), |p| {
        p.contains("module ext4 is missing from initrd.img")
    });
}
