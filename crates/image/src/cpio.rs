//! A writer of `newc` cpio archives, the format the kernel unpacks as an initramfs. Entries get
//! fixed owners and times, so the same inputs give the same bytes.

use std::io::{self, Write};

/// Writes an initramfs archive entry by entry; `finish` adds the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_inode: 1,
            written: 0,
        }
    }

    /// A directory, `mode` being its permission bits.
    pub fn directory(&mut self, path: &str, mode: u32) -> io::Result<()> {
        self.entry(path, 0o040000 | (mode & 0o7777), 2, &[])
    }

    /// A regular file with its contents.
    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) -> io::Result<()> {
        self.entry(path, 0o100000 | (mode & 0o7777), 1, contents)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, 0o120777, 1, target.as_bytes())
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, &[])?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, links: u32, data: &[u8]) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        let inode = if mode == 0 { 0 } else { self.next_inode };
        self.next_inode += 1;
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let name_size = path.len() + 1;
        let header = format!(
            "070701{inode:08x}{mode:08x}{uid:08x}{gid:08x}{links:08x}{mtime:08x}{size:08x}{major:08x}{minor:08x}{rmajor:08x}{rminor:08x}{name_size:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            major = 0,
            minor = 0,
            rmajor = 0,
            rminor = 0,
            check = 0,
        );
        self.write(header.as_bytes())?;
        self.write(path.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Pads to the next multiple of four bytes.
    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_read_back_by_cpio() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.directory("bin", 0o755).unwrap();
        writer
            .file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        writer.symlink("bin/sh", "hello").unwrap();
        writer.file("odd", 0o644, b"abc").unwrap();
        let bytes = writer.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        if !std::path::Path::new("/usr/bin/cpio").exists() {
            eprintln!("cpio is not installed: checked the framing only");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-id", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("bin/hello")).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        assert_eq!(std::fs::read(dir.path().join("odd")).unwrap(), b"abc");
        assert_eq!(
            std::fs::read_link(dir.path().join("bin/sh")).unwrap(),
            std::path::PathBuf::from("hello")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("bin/hello"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn written_archives_read_back() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.directory("etc", 0o755).unwrap();
        writer.file("etc/a", 0o600, b"12345").unwrap();
        let bytes = writer.finish().unwrap();
        let entries = read_archive(&bytes).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].path, "etc/a");
        assert_eq!(entries[1].mode, 0o100600);
        assert_eq!(entries[1].data, b"12345");
        assert!(read_archive(&bytes[..50]).is_err());
        assert!(read_archive(b"not an archive at all, certainly not one with a header").is_err());
    }
}

/// One entry read back from a `newc` archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// Reads every entry of a `newc` archive (up to the trailer).
pub fn read_archive(bytes: &[u8]) -> io::Result<Vec<CpioEntry>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let field = |header: &[u8], index: usize| -> io::Result<u32> {
        let text = std::str::from_utf8(&header[6 + index * 8..6 + (index + 1) * 8])
            .map_err(|_| invalid("cpio header is not ASCII"))?;
        u32::from_str_radix(text, 16).map_err(|_| invalid("cpio header field is not hex"))
    };
    let align = |offset: usize| offset.div_ceil(4) * 4;
    let mut entries = Vec::new();
    let mut offset = 0;
    loop {
        let header = bytes
            .get(offset..offset + 110)
            .ok_or_else(|| invalid("cpio archive ends inside a header"))?;
        if &header[..6] != b"070701" && &header[..6] != b"070702" {
            return Err(invalid("not a newc cpio archive"));
        }
        let mode = field(header, 1)?;
        let size = field(header, 6)? as usize;
        let name_size = field(header, 11)? as usize;
        let name_start = offset + 110;
        let name = bytes
            .get(name_start..name_start + name_size.saturating_sub(1))
            .ok_or_else(|| invalid("cpio archive ends inside a name"))?;
        let path = String::from_utf8_lossy(name).into_owned();
        let data_start = align(name_start + name_size);
        let data = bytes
            .get(data_start..data_start + size)
            .ok_or_else(|| invalid("cpio archive ends inside a file"))?;
        if path == "TRAILER!!!" {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            path,
            mode,
            data: data.to_vec(),
        });
        offset = align(data_start + size);
    }
}
