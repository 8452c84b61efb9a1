//! Guest memory kept in files, so that a restore maps it instead of reading it. A template's VM
//! runs with its RAM in a memory file ([`create`]) that it writes through; its snapshot then
//! holds device state only, and the memory file is sealed ([`seal`]: no write, no change of
//! size, by anyone) and written next to the snapshot ([`save`]). Each sandbox restored from the
//! template maps the sealed file privately: the guest reads the template's pages where they
//! are (one copy in the host's memory for every sandbox of the template) and its writes are
//! copied on write, its own. A host that restarts makes the sealed file again from the saved
//! one ([`load`]).
//!
//! Memory files are memfds: a file that is no path, which the VMM (another user) opens through
//! the descriptor it is handed, and which seals make safe to hand to every sandbox's VMM at
//! once.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::VmmError;

/// The unit memory files are compared and written in: a guest page.
const PAGE_BYTES: usize = 4096;
/// How much is read or written at once.
const CHUNK_BYTES: usize = 1 << 20;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let context = context.into();
    move |error| VmmError::io(context, error)
}

/// A new, empty (all zero) memory file of `bytes`, named `name` in `/proc` listings. Its
/// pages take host memory only once written.
pub fn create(name: &str, bytes: u64) -> Result<OwnedFd, VmmError> {
    let name = std::ffi::CString::new(format!("wrenn-{name}"))
        .map_err(|_| VmmError::Invalid(format!("{name:?} cannot name a memory file")))?;
    // SAFETY: `name` is a NUL-terminated string alive for the call; the result is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(VmmError::io(
            "making a memory file",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(bytes)
        .map_err(io(format!("sizing a memory file to {bytes} bytes")))?;
    Ok(file.into())
}

/// Seals a memory file: from now on nobody writes it, through a descriptor or a shared
/// mapping, or changes its size, and nobody lifts the seals. It must not be mapped shared and
/// writable any more (its VMM has ended).
pub fn seal(memory: &OwnedFd) -> Result<(), VmmError> {
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS on a descriptor we hold; the result is checked.
    if unsafe { libc::fcntl(memory.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(VmmError::io(
            "sealing a memory file",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Whether `memory` is sealed against writes (see [`seal`]).
pub fn is_sealed(memory: &OwnedFd) -> bool {
    // SAFETY: F_GET_SEALS on a descriptor we hold; the result is checked.
    let seals = unsafe { libc::fcntl(memory.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_WRITE != 0
}

/// The file's length in bytes.
pub fn len(memory: &OwnedFd) -> Result<u64, VmmError> {
    let file = File::from(memory.try_clone().map_err(io("reading a memory file"))?);
    Ok(file.metadata().map_err(io("reading a memory file"))?.len())
}

/// The next offset at or after `from` that has data (`None`: only a hole is left), by
/// `SEEK_DATA`; a file system without it has data everywhere.
fn next_data(file: &File, from: u64, length: u64) -> Option<u64> {
    if from >= length {
        return None;
    }
    // SAFETY: lseek on a descriptor we hold; the result is checked.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if at < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => None,
            _ => Some(from),
        };
    }
    Some(at as u64)
}

/// Copies `source` (of `length` bytes) into `target`, leaving out holes and zero pages (the
/// target reads zero there: it is new, or its length was set without data).
fn copy_data(source: &File, target: &File, length: u64) -> std::io::Result<()> {
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut at = 0u64;
    while let Some(start) = next_data(source, at, length) {
        let start = start - start % PAGE_BYTES as u64;
        let want = (length - start).min(CHUNK_BYTES as u64) as usize;
        let read = source.read_at(&mut buffer[..want], start)?;
        if read == 0 {
            break;
        }
        for (index, page) in buffer[..read].chunks(PAGE_BYTES).enumerate() {
            if page.iter().any(|byte| *byte != 0) {
                target.write_all_at(page, start + (index * PAGE_BYTES) as u64)?;
            }
        }
        at = start + read as u64;
    }
    Ok(())
}

/// Writes `memory` to `path` atomically (a whole new file or none), root's only (guest memory
/// holds the sandbox's secrets), with holes where the guest's memory is zero. Returns the
/// bytes written.
pub fn save(memory: &OwnedFd, path: &Path) -> Result<u64, VmmError> {
    let source = File::from(memory.try_clone().map_err(io("reading a memory file"))?);
    let length = source
        .metadata()
        .map_err(io("reading a memory file"))?
        .len();
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    let written = (|| -> std::io::Result<u64> {
        let target = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)?;
        target.set_len(length)?;
        copy_data(&source, &target, length)?;
        target.sync_all()?;
        Ok(target.metadata()?.len())
    })();
    let written = match written {
        Ok(written) => written,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(VmmError::io(format!("writing {}", path.display()), error));
        }
    };
    std::fs::rename(&partial, path).map_err(io(format!("putting {} in place", path.display())))?;
    if let Some(dir) = path.parent() {
        let _ = File::open(dir).and_then(|dir| dir.sync_all());
    }
    Ok(written)
}

/// A sealed memory file holding what `path` holds (written by [`save`]).
pub fn load(path: &Path, name: &str) -> Result<OwnedFd, VmmError> {
    let mut source = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let length = source
        .metadata()
        .map_err(io(format!("reading {}", path.display())))?
        .len();
    let memory = create(name, length)?;
    let target = File::from(memory.try_clone().map_err(io("copying a memory file"))?);
    copy_data(&source, &target, length).map_err(io(format!("loading {}", path.display())))?;
    // The file may not have changed length while it was read.
    let end = source
        .seek(SeekFrom::End(0))
        .map_err(io(format!("reading {}", path.display())))?;
    if end != length {
        return Err(VmmError::Invalid(format!(
            "{} changed while it was loaded",
            path.display()
        )));
    }
    drop(target);
    seal(&memory)?;
    Ok(memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(memory: &OwnedFd, page: u64) -> Vec<u8> {
        let file = File::from(memory.try_clone().unwrap());
        let mut bytes = vec![0u8; PAGE_BYTES];
        file.read_exact_at(&mut bytes, page * PAGE_BYTES as u64)
            .unwrap();
        bytes
    }

    #[test]
    fn memory_files_are_saved_sparse_and_load_back_sealed_and_identical() {
        let dir = tempfile::tempdir().unwrap();
        let length = 164 * PAGE_BYTES as u64;
        let memory = create("test", length).unwrap();
        assert!(!is_sealed(&memory));
        {
            let file = File::from(memory.try_clone().unwrap());
            file.write_all_at(&[7u8; PAGE_BYTES], 3 * PAGE_BYTES as u64)
                .unwrap();
            // A page written with zeros is left out like a hole.
            file.write_all_at(&[0u8; PAGE_BYTES], 5 * PAGE_BYTES as u64)
                .unwrap();
            file.write_all_at(b"end", length - 3).unwrap();
        }
        let path = dir.path().join("memory.ram");
        assert_eq!(save(&memory, &path).unwrap(), length);
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(&path).unwrap();
        assert_eq!(on_disk.mode() & 0o777, 0o600);
        assert!(
            on_disk.blocks() * 512 < 8 * PAGE_BYTES as u64,
            "{} blocks: not sparse",
            on_disk.blocks()
        );
        assert!(!dir.path().join("memory.ram.partial").exists());

        let loaded = load(&path, "loaded").unwrap();
        assert!(is_sealed(&loaded));
        assert_eq!(len(&loaded).unwrap(), length);
        assert_eq!(page_of(&loaded, 3), vec![7u8; PAGE_BYTES]);
        assert_eq!(page_of(&loaded, 5), vec![0u8; PAGE_BYTES]);
        assert_eq!(page_of(&loaded, 0), vec![0u8; PAGE_BYTES]);
        let file = File::from(loaded.try_clone().unwrap());
        let mut end = [0u8; 3];
        file.read_exact_at(&mut end, length - 3).unwrap();
        assert_eq!(&end, b"end");
    }

    #[test]
    fn a_sealed_memory_file_refuses_writes_resizes_and_shared_writable_maps() {
        let memory = create("sealed", 16 * PAGE_BYTES as u64).unwrap();
        seal(&memory).unwrap();
        let file = File::from(memory.try_clone().unwrap());
        assert!(file.write_all_at(b"x", 0).is_err());
        assert!(file.set_len(PAGE_BYTES as u64).is_err());
        assert!(file.set_len(32 * PAGE_BYTES as u64).is_err());
        // Reopened by path (as a VMM does), still no write.
        let again = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", memory.as_raw_fd()))
            .unwrap();
        assert!(again.write_all_at(b"x", 0).is_err());
        // SAFETY: a mapping request with valid arguments; a refusal returns MAP_FAILED, and a
        // mapping made is unmapped at once.
        unsafe {
            let length = 16 * PAGE_BYTES;
            let shared = libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memory.as_raw_fd(),
                0,
            );
            assert_eq!(shared, libc::MAP_FAILED, "a shared writable map was made");
            // A private one is what a sandbox's VMM makes: its writes are its own.
            let private = libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                memory.as_raw_fd(),
                0,
            );
            assert_ne!(private, libc::MAP_FAILED);
            *(private as *mut u8) = 9;
            libc::munmap(private, length);
        }
        assert_eq!(page_of(&memory, 0), vec![0u8; PAGE_BYTES]);
        // No unsealing.
        // SAFETY: F_ADD_SEALS on a descriptor we hold.
        let unseal = unsafe { libc::fcntl(memory.as_raw_fd(), libc::F_ADD_SEALS, 0) };
        assert!(unseal < 0);
    }
}
