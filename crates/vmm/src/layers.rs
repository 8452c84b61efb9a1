//! Layered memory files: a snapshot's guest memory kept as a stack of layers, so that pausing a
//! restored sandbox writes only the blocks it changed. A **header** maps every block of the
//! guest's memory to the layer that holds it (or to nothing, for a block of zeros); a **layer**
//! is a file of blocks packed one after another, written once and never changed. The first
//! snapshot writes a base layer with the memory's non-zero blocks ([`write_base`]); each later
//! one writes the blocks that differ from its parent's as a new layer and a header naming the
//! parent's layers and the new one ([`write_layer`]). Once a header would name more than a
//! limit of layers (8 by default), they are merged into one. [`MemoryImage`] reads a layered
//! snapshot (or a plain memory file) through its header: the page server serves faults from it.
//!
//! ## The header, version 1 (little-endian)
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `WRNLAYER` |
//! | 4 | version (1; a reader refuses any other) |
//! | 4 | block size in bytes (a power of two, at least 4096) |
//! | 8 | the guest memory's size in bytes (a whole number of blocks) |
//! | 4 | generation: 0 for a base, the parent's plus one for each layer written on it |
//! | 4 | layer count L |
//! | 8 | extent count E |
//! | L × (2 + n) | each layer's path: its length n, then n bytes of UTF-8, relative to the header's directory |
//! | E × 32 | extents, in block order, covering every block once: first block (8), block count (8), layer index (4; `0xFFFFFFFF`: zeros, stored nowhere), reserved (4, zero), first block in the layer (8) |
//! | 32 | BLAKE3 of everything before |
//!
//! Headers and layers are written to a temporary file, synced and renamed into place: a reader
//! sees the old file or the new one, never a part. A layer never changes once written; deleting
//! the layers a header names is its owner's business (a parent's layers stay while a child names
//! them).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

/// The first bytes of a header.
pub const MAGIC: &[u8; 8] = b"WRNLAYER";
/// The header version this code writes and reads.
pub const VERSION: u32 = 1;
/// The layer index of blocks of zeros (stored nowhere).
pub const ZERO_LAYER: u32 = u32::MAX;
/// How many layers a header may name before [`write_layer`] merges them (the N).
pub const DEFAULT_MAX_LAYERS: usize = 8;
/// The block size snapshots use: a guest page.
pub const DEFAULT_BLOCK_BYTES: u32 = 4096;

const FIXED_BYTES: usize = 40;
const EXTENT_BYTES: usize = 32;
const CHECKSUM_BYTES: usize = 32;
/// How much is read from a memory file at once.
const CHUNK_BYTES: u64 = 1 << 20;

/// What can go wrong reading or writing layered memory.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Format { path: String, problem: String },
    #[error("{0}")]
    Invalid(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LayerError {
    let what = what.into();
    move |source| LayerError::Io { what, source }
}

/// A run of blocks stored together: `blocks` blocks from `start_block`, in `layer` from
/// `layer_block` on (or zeros, when `layer` is [`ZERO_LAYER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start_block: u64,
    pub blocks: u64,
    pub layer: u32,
    pub layer_block: u64,
}

/// Where one block is: in a layer at a block index, or nowhere (zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSource {
    Zero,
    Layer { layer: u32, block: u64 },
}

/// A layered snapshot's header (see the module's documentation for its format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerHeader {
    pub block_bytes: u32,
    pub memory_bytes: u64,
    pub generation: u32,
    /// The layers' paths, relative to the header's directory.
    pub layers: Vec<String>,
    pub extents: Vec<Extent>,
}

impl LayerHeader {
    /// The number of blocks of guest memory.
    pub fn blocks(&self) -> u64 {
        self.memory_bytes / u64::from(self.block_bytes)
    }

    /// Where `block` is.
    pub fn locate(&self, block: u64) -> BlockSource {
        let index = self
            .extents
            .partition_point(|extent| extent.start_block + extent.blocks <= block);
        match self.extents.get(index) {
            Some(extent) if extent.layer != ZERO_LAYER => BlockSource::Layer {
                layer: extent.layer,
                block: extent.layer_block + (block - extent.start_block),
            },
            _ => BlockSource::Zero,
        }
    }

    /// The layers' paths, for a header at `header_path`.
    pub fn layer_paths(&self, header_path: &Path) -> Vec<PathBuf> {
        let directory = header_path.parent().unwrap_or(Path::new("."));
        self.layers
            .iter()
            .map(|name| directory.join(name))
            .collect()
    }

    /// The header's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(
            FIXED_BYTES + self.extents.len() * EXTENT_BYTES + CHECKSUM_BYTES + 64,
        );
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&self.block_bytes.to_le_bytes());
        bytes.extend_from_slice(&self.memory_bytes.to_le_bytes());
        bytes.extend_from_slice(&self.generation.to_le_bytes());
        bytes.extend_from_slice(&(self.layers.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        for layer in &self.layers {
            bytes.extend_from_slice(&(layer.len() as u16).to_le_bytes());
            bytes.extend_from_slice(layer.as_bytes());
        }
        for extent in &self.extents {
            bytes.extend_from_slice(&extent.start_block.to_le_bytes());
            bytes.extend_from_slice(&extent.blocks.to_le_bytes());
            bytes.extend_from_slice(&extent.layer.to_le_bytes());
            bytes.extend_from_slice(&0u32.to_le_bytes());
            bytes.extend_from_slice(&extent.layer_block.to_le_bytes());
        }
        let checksum = blake3::hash(&bytes);
        bytes.extend_from_slice(checksum.as_bytes());
        bytes
    }

    /// Reads a header's bytes (`path` names it in errors), checking everything a reader relies
    /// on: magic, version, checksum, and extents that cover every block once, in order.
    pub fn decode(bytes: &[u8], path: &str) -> Result<Self, LayerError> {
        let bad = |problem: String| LayerError::Format {
            path: path.to_string(),
            problem,
        };
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(bad("not a layered memory header".into()));
        }
        if bytes.len() < FIXED_BYTES + CHECKSUM_BYTES {
            return Err(bad("truncated".into()));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
        let mut reader = Reader { bytes: body, at: 8 };
        let version = reader.u32();
        if version != VERSION {
            return Err(bad(format!(
                "header version {version}, but this wrenn reads version {VERSION}"
            )));
        }
        if blake3::hash(body).as_bytes() != checksum {
            return Err(bad(
                "its checksum does not match: the header is damaged".into()
            ));
        }
        let block_bytes = reader.u32();
        let memory_bytes = reader.u64();
        let generation = reader.u32();
        let layer_count = reader.u32() as usize;
        let extent_count = reader.u64();
        size_problem(memory_bytes, block_bytes).map_or(Ok(()), |problem| Err(bad(problem)))?;
        let mut layers = Vec::with_capacity(layer_count.min(1024));
        for _ in 0..layer_count {
            let len = reader
                .u16()
                .ok_or_else(|| bad("truncated layer list".into()))? as usize;
            let name = reader
                .take(len)
                .ok_or_else(|| bad("truncated layer list".into()))?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| bad("a layer's path is not UTF-8".into()))?;
            check_layer_name(&name).map_err(bad)?;
            layers.push(name);
        }
        let remaining = (body.len() - reader.at) as u64;
        if extent_count.checked_mul(EXTENT_BYTES as u64) != Some(remaining) {
            return Err(bad(format!(
                "{extent_count} extents do not fit its {remaining} bytes"
            )));
        }
        let mut extents = Vec::with_capacity(extent_count as usize);
        let mut next = 0u64;
        for _ in 0..extent_count {
            let extent = Extent {
                start_block: reader.u64(),
                blocks: reader.u64(),
                layer: reader.u32(),
                layer_block: {
                    reader.u32();
                    reader.u64()
                },
            };
            if extent.start_block != next || extent.blocks == 0 {
                return Err(bad(format!(
                    "extents leave a gap or overlap at block {next}"
                )));
            }
            if extent.layer != ZERO_LAYER && extent.layer as usize >= layers.len() {
                return Err(bad(format!("an extent names layer {}", extent.layer)));
            }
            next = extent
                .start_block
                .checked_add(extent.blocks)
                .ok_or_else(|| bad("an extent overflows".into()))?;
            extents.push(extent);
        }
        let header = LayerHeader {
            block_bytes,
            memory_bytes,
            generation,
            layers,
            extents,
        };
        if next != header.blocks() {
            return Err(bad(format!(
                "extents cover {next} blocks of {}",
                header.blocks()
            )));
        }
        Ok(header)
    }

    /// Reads the header at `path`.
    pub fn read(path: &Path) -> Result<Self, LayerError> {
        let bytes = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
        Self::decode(&bytes, &path.display().to_string())
    }

    /// Writes the header at `path`, atomically.
    pub fn write(&self, path: &Path) -> Result<(), LayerError> {
        write_atomically(path, |file| {
            file.write_all(&self.encode())
                .map_err(io(format!("writing {}", path.display())))
        })
    }

    /// Bytes the header's own layers hold (what a snapshot of it takes on disk, shared layers
    /// included).
    pub fn stored_blocks(&self) -> u64 {
        self.extents
            .iter()
            .filter(|extent| extent.layer != ZERO_LAYER)
            .map(|extent| extent.blocks)
            .sum()
    }
}

/// A layer's path must stay relative: no absolute path, no empty one.
fn check_layer_name(name: &str) -> Result<(), String> {
    let path = Path::new(name);
    if name.is_empty() || path.is_absolute() || name.contains('\0') {
        return Err(format!("a layer's path {name:?} is not a relative path"));
    }
    if !path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::ParentDir))
    {
        return Err(format!(
            "a layer's path {name:?} is not a plain relative path"
        ));
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(len)?)?;
        self.at += len;
        Some(slice)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|b| u16::from_le_bytes(b.try_into().expect("2 bytes")))
    }
    /// The fixed fields are read only after their length was checked.
    fn u32(&mut self) -> u32 {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .unwrap_or(0)
    }
    fn u64(&mut self) -> u64 {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .unwrap_or(0)
    }
}

/// Whether `path` is a layered memory header (by its magic).
pub fn is_header(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|file| file.read_exact_at(&mut magic, 0))
        .is_ok_and(|()| &magic == MAGIC)
}

/// Writes `path` through a temporary file beside it, synced, then renamed into place.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut File) -> Result<(), LayerError>,
) -> Result<(), LayerError> {
    let name = path
        .file_name()
        .ok_or_else(|| LayerError::Invalid(format!("{} names no file", path.display())))?;
    let temporary = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let outcome = (|| {
        let mut file =
            File::create(&temporary).map_err(io(format!("creating {}", temporary.display())))?;
        fill(&mut file)?;
        file.sync_all()
            .map_err(io(format!("syncing {}", temporary.display())))?;
        std::fs::rename(&temporary, path).map_err(io(format!("writing {}", path.display())))
    })();
    if outcome.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    outcome
}

/// The layer of generation `generation` of the snapshot whose state is `snapshot_file`
/// (`memory.snap` → `memory.g3.layer`): every generation's layer has a name of its own.
pub fn layer_path(snapshot_file: &Path, generation: u32) -> PathBuf {
    let stem = snapshot_file
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| "memory".into());
    snapshot_file.with_file_name(format!("{stem}.g{generation}.layer"))
}

/// Removes the layers of `snapshot_file`'s generations (its directory's `<stem>.g<N>.layer`)
/// that `kept`, the header just written beside it, no longer names (merged away, or of an
/// earlier pause): nothing else names them, since each directory holds one such header.
pub fn remove_unnamed_layers(snapshot_file: &Path, kept: &LayerHeader) {
    let Some(directory) = snapshot_file.parent() else {
        return;
    };
    let stem = snapshot_file
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!("{stem}.g");
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let generation = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".layer"));
        if generation.is_some_and(|g| g.parse::<u32>().is_ok()) && !kept.layers.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Which blocks of a memory file a snapshot may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    /// Any: the file holds all the guest's memory (a Full snapshot); blocks equal to the
    /// parent's are found by comparing.
    All,
    /// Only those where the file has data (a Diff snapshot written into a new sparse file: the
    /// pages dirtied since the last snapshot, holes elsewhere).
    DataOnly,
}

fn is_zero(block: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bytes are a valid u64; align_to only splits the slice where u64s align.
        unsafe { block.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Reads `buffer.len()` bytes at `offset`, zeros past the end of the file.
fn read_or_zeros(
    file: &File,
    buffer: &mut [u8],
    offset: u64,
    path: &Path,
) -> Result<(), LayerError> {
    let mut done = 0;
    while done < buffer.len() {
        match file.read_at(&mut buffer[done..], offset + done as u64) {
            Ok(0) => {
                buffer[done..].fill(0);
                break;
            }
            Ok(read) => done += read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(io(format!("reading {}", path.display()))(error)),
        }
    }
    Ok(())
}

/// The sorted `[start, end)` ranges of `file` that hold data (`SEEK_DATA`/`SEEK_HOLE`; a
/// filesystem without holes reports all of it).
pub fn data_ranges(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut at: i64 = 0;
    while (at as u64) < len {
        // SAFETY: lseek on a descriptor we hold; no memory is involved.
        let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if start < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENXIO) {
                break; // No data after `at`.
            }
            return Err(error);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        ranges.push((start as u64, (end as u64).min(len)));
        at = end;
    }
    Ok(ranges)
}

/// Builds extents from each block's source, in block order.
fn extents_of(sources: &[BlockSource]) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for (block, source) in sources.iter().enumerate() {
        let block = block as u64;
        let (layer, layer_block) = match *source {
            BlockSource::Zero => (ZERO_LAYER, 0),
            BlockSource::Layer { layer, block } => (layer, block),
        };
        if let Some(last) = extents.last_mut()
            && last.layer == layer
            && (layer == ZERO_LAYER || last.layer_block + last.blocks == layer_block)
        {
            last.blocks += 1;
            continue;
        }
        extents.push(Extent {
            start_block: block,
            blocks: 1,
            layer,
            layer_block,
        });
    }
    extents
}

/// The file at `memory`, opened, and its length.
fn open_memory(memory: &Path) -> Result<(File, u64), LayerError> {
    let file = File::open(memory).map_err(io(format!("opening {}", memory.display())))?;
    let len = file
        .metadata()
        .map_err(io(format!("reading {}", memory.display())))?
        .len();
    Ok((file, len))
}

/// A layer being written: blocks appended to a temporary file, renamed into place at the end.
struct LayerWriter {
    file: File,
    temporary: PathBuf,
    path: PathBuf,
    blocks: u64,
    pending: Vec<u8>,
}

impl LayerWriter {
    fn create(path: &Path) -> Result<Self, LayerError> {
        let name = path
            .file_name()
            .ok_or_else(|| LayerError::Invalid(format!("{} names no file", path.display())))?;
        let temporary = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
        let file =
            File::create(&temporary).map_err(io(format!("creating {}", temporary.display())))?;
        Ok(LayerWriter {
            file,
            temporary,
            path: path.to_path_buf(),
            blocks: 0,
            pending: Vec::with_capacity(CHUNK_BYTES as usize),
        })
    }

    /// Appends a block; returns its index in the layer.
    fn append(&mut self, block: &[u8]) -> Result<u64, LayerError> {
        self.pending.extend_from_slice(block);
        if self.pending.len() >= CHUNK_BYTES as usize {
            self.flush()?;
        }
        self.blocks += 1;
        Ok(self.blocks - 1)
    }

    fn flush(&mut self) -> Result<(), LayerError> {
        self.file
            .write_all(&self.pending)
            .map_err(io(format!("writing {}", self.temporary.display())))?;
        self.pending.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<u64, LayerError> {
        self.flush()?;
        self.file
            .sync_all()
            .map_err(io(format!("syncing {}", self.temporary.display())))?;
        std::fs::rename(&self.temporary, &self.path)
            .map_err(io(format!("writing {}", self.path.display())))?;
        self.temporary = PathBuf::new();
        Ok(self.blocks)
    }
}

impl Drop for LayerWriter {
    fn drop(&mut self) {
        if !self.temporary.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// The file name of `path`, as the header names a layer beside it.
fn file_name_of(path: &Path) -> Result<String, LayerError> {
    path.file_name()
        .and_then(|name| name.to_str())
        .map(str::to_owned)
        .ok_or_else(|| LayerError::Invalid(format!("{} names no file", path.display())))
}

/// Writes the memory file `memory` (all of the guest's memory, `memory_bytes` of it: a Full
/// snapshot's) as a base: its non-zero blocks in the layer `layer` (beside the header), and
/// the header at `header`, generation 0.
pub fn write_base(
    memory: &Path,
    memory_bytes: u64,
    block_bytes: u32,
    header: &Path,
    layer: &Path,
) -> Result<LayerHeader, LayerError> {
    check_sizes(memory_bytes, block_bytes)?;
    same_directory(header, layer)?;
    let (file, _) = open_memory(memory)?;
    let block_len = block_bytes as usize;
    let blocks = memory_bytes / u64::from(block_bytes);
    let mut writer = LayerWriter::create(layer)?;
    let mut sources = vec![BlockSource::Zero; blocks as usize];
    let mut chunk = vec![0u8; CHUNK_BYTES.max(u64::from(block_bytes)) as usize];
    let blocks_per_chunk = (chunk.len() / block_len) as u64;
    let mut block = 0;
    while block < blocks {
        let count = blocks_per_chunk.min(blocks - block);
        let bytes = &mut chunk[..count as usize * block_len];
        read_or_zeros(&file, bytes, block * u64::from(block_bytes), memory)?;
        for (index, data) in bytes.chunks_exact(block_len).enumerate() {
            if !is_zero(data) {
                let stored = writer.append(data)?;
                sources[(block + index as u64) as usize] = BlockSource::Layer {
                    layer: 0,
                    block: stored,
                };
            }
        }
        block += count;
    }
    writer.finish()?;
    let written = LayerHeader {
        block_bytes,
        memory_bytes,
        generation: 0,
        layers: vec![file_name_of(layer)?],
        extents: extents_of(&sources),
    };
    written.write(header)?;
    Ok(written)
}

fn check_sizes(memory_bytes: u64, block_bytes: u32) -> Result<(), LayerError> {
    size_problem(memory_bytes, block_bytes)
        .map_or(Ok(()), |problem| Err(LayerError::Invalid(problem)))
}

/// What is wrong with a block size and a memory size, if anything: a block is a power of two
/// of at least a page, and the memory a whole number of blocks.
fn size_problem(memory_bytes: u64, block_bytes: u32) -> Option<String> {
    if !block_bytes.is_power_of_two() || block_bytes < 4096 {
        return Some(format!(
            "block size {block_bytes} is not a power of two ≥ 4096"
        ));
    }
    if memory_bytes == 0 || !memory_bytes.is_multiple_of(u64::from(block_bytes)) {
        return Some(format!(
            "memory size {memory_bytes} is not a whole number of {block_bytes}-byte blocks"
        ));
    }
    None
}

/// A new layer must be written beside its header (headers name their own layers by file name).
fn same_directory(header: &Path, layer: &Path) -> Result<(), LayerError> {
    if header.parent() != layer.parent() {
        return Err(LayerError::Invalid(format!(
            "the layer {} must be beside its header {}",
            layer.display(),
            header.display()
        )));
    }
    Ok(())
}

/// `target` relative to the directory `base` (both made absolute first).
fn relative_path(target: &Path, base: &Path) -> Result<String, LayerError> {
    let absolute = |path: &Path| {
        std::path::absolute(path).map_err(io(format!("resolving {}", path.display())))
    };
    let (target, base) = (absolute(target)?, absolute(base)?);
    let target: Vec<Component> = target.components().collect();
    let base: Vec<Component> = base.components().collect();
    let common = target.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut relative = PathBuf::new();
    for _ in common..base.len() {
        relative.push("..");
    }
    for component in &target[common..] {
        relative.push(component.as_os_str());
    }
    relative
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| LayerError::Invalid(format!("{} is not UTF-8", relative.display())))
}

/// Writes a snapshot taken of a VM restored from `parent` (a header): the blocks of `memory`
/// that `changed` may have touched and that differ from the parent's go into the new layer
/// `layer` (beside `header`); zeros are stored as nothing. The new header names the parent's
/// layers and the new one; when that would be more than `max_layers`, all are merged into
/// `layer` instead (the parent's layers stay for whoever else names them).
pub fn write_layer(
    parent: &Path,
    memory: &Path,
    changed: Changed,
    header: &Path,
    layer: &Path,
    max_layers: usize,
) -> Result<LayerHeader, LayerError> {
    same_directory(header, layer)?;
    let parent_header = LayerHeader::read(parent)?;
    let parent_image = MemoryImage::open(parent)?;
    let block_bytes = parent_header.block_bytes;
    let block_len = block_bytes as usize;
    let blocks = parent_header.blocks();
    let (file, file_len) = open_memory(memory)?;
    let block_size = u64::from(block_bytes);
    // The byte ranges the snapshot wrote, and the blocks they touch (merged, in order).
    let written: Vec<(u64, u64)> = match changed {
        Changed::All => vec![(0, parent_header.memory_bytes)],
        Changed::DataOnly => data_ranges(&file, file_len.min(parent_header.memory_bytes))
            .map_err(io(format!("finding the data of {}", memory.display())))?,
    };
    let mut candidates: Vec<(u64, u64)> = Vec::new();
    for &(start, end) in &written {
        let (first, last) = (start / block_size, end.div_ceil(block_size).min(blocks));
        match candidates.last_mut() {
            Some(previous) if previous.1 >= first => previous.1 = previous.1.max(last),
            _ => candidates.push((first, last)),
        }
    }

    let new_layer = parent_header.layers.len() as u32;
    let mut sources: Vec<BlockSource> = (0..blocks).map(|b| parent_header.locate(b)).collect();
    let mut writer = LayerWriter::create(layer)?;
    let mut chunk = vec![0u8; CHUNK_BYTES.max(block_size) as usize];
    let mut previous = vec![0u8; block_len];
    let mut assembled = vec![0u8; block_len];
    let blocks_per_chunk = (chunk.len() / block_len) as u64;
    for (first, last) in candidates {
        let mut block = first;
        while block < last {
            let count = blocks_per_chunk.min(last - block);
            let bytes = &mut chunk[..count as usize * block_len];
            read_or_zeros(&file, bytes, block * block_size, memory)?;
            for (index, file_block) in bytes.chunks_exact(block_len).enumerate() {
                let at = block + index as u64;
                let (block_start, block_end) = (at * block_size, (at + 1) * block_size);
                // A block the snapshot wrote only part of (a block larger than a page): the
                // parent's bytes with the written parts laid over them.
                let first_range = written.partition_point(|&(_, end)| end <= block_start);
                let whole = written
                    .get(first_range)
                    .is_some_and(|&(start, end)| start <= block_start && end >= block_end);
                let data: &[u8] = if whole {
                    file_block
                } else {
                    parent_image.read_at(block_start, &mut assembled);
                    for &(start, end) in written[first_range..]
                        .iter()
                        .take_while(|&&(start, _)| start < block_end)
                    {
                        let from = (start.max(block_start) - block_start) as usize;
                        let to = (end.min(block_end) - block_start) as usize;
                        assembled[from..to].copy_from_slice(&file_block[from..to]);
                    }
                    &assembled
                };
                let was = sources[at as usize];
                if is_zero(data) {
                    sources[at as usize] = BlockSource::Zero;
                    continue;
                }
                if was != BlockSource::Zero {
                    parent_image.read_at(block_start, &mut previous);
                    if previous == data {
                        continue;
                    }
                }
                let stored = writer.append(data)?;
                sources[at as usize] = BlockSource::Layer {
                    layer: new_layer,
                    block: stored,
                };
            }
            block += count;
        }
    }
    writer.finish()?;

    let header_directory = header.parent().unwrap_or(Path::new("."));
    let mut layers = Vec::with_capacity(parent_header.layers.len() + 1);
    for path in parent_header.layer_paths(parent) {
        layers.push(relative_path(&path, header_directory)?);
    }
    layers.push(file_name_of(layer)?);
    let mut written = LayerHeader {
        block_bytes,
        memory_bytes: parent_header.memory_bytes,
        generation: parent_header.generation + 1,
        layers,
        extents: extents_of(&sources),
    };
    drop(parent_image);
    compact_layer_list(&mut written);
    if written.layers.len() > max_layers.max(1) {
        written.write(header)?;
        return merge(header, header, layer);
    }
    written.write(header)?;
    Ok(written)
}

/// Drops the layers no extent uses any more (every block of theirs was overwritten), keeping
/// the others' order.
fn compact_layer_list(header: &mut LayerHeader) {
    let mut used = vec![false; header.layers.len()];
    for extent in &header.extents {
        if extent.layer != ZERO_LAYER {
            used[extent.layer as usize] = true;
        }
    }
    let mut renumbered = vec![ZERO_LAYER; header.layers.len()];
    let mut kept = Vec::new();
    for (index, name) in header.layers.iter().enumerate() {
        if used[index] {
            renumbered[index] = kept.len() as u32;
            kept.push(name.clone());
        }
    }
    for extent in &mut header.extents {
        if extent.layer != ZERO_LAYER {
            extent.layer = renumbered[extent.layer as usize];
        }
    }
    header.layers = kept;
}

/// Merges the layers `source` (a header) names into one: every non-zero block, read through
/// them, into the layer `layer`, with a header at `header` (it may be `source` itself, and
/// `layer` one of its layers: both are replaced atomically, after everything was read).
pub fn merge(source: &Path, header: &Path, layer: &Path) -> Result<LayerHeader, LayerError> {
    same_directory(header, layer)?;
    let from = LayerHeader::read(source)?;
    let image = MemoryImage::open(source)?;
    let block_len = from.block_bytes as usize;
    let mut writer = LayerWriter::create(layer)?;
    let mut sources = vec![BlockSource::Zero; from.blocks() as usize];
    let mut block = vec![0u8; block_len];
    for extent in &from.extents {
        if extent.layer == ZERO_LAYER {
            continue;
        }
        for at in extent.start_block..extent.start_block + extent.blocks {
            image.read_at(at * u64::from(from.block_bytes), &mut block);
            if !is_zero(&block) {
                let stored = writer.append(&block)?;
                sources[at as usize] = BlockSource::Layer {
                    layer: 0,
                    block: stored,
                };
            }
        }
    }
    // The old layer's mapping stays valid through the rename (it holds the old file).
    writer.finish()?;
    drop(image);
    let merged = LayerHeader {
        block_bytes: from.block_bytes,
        memory_bytes: from.memory_bytes,
        generation: from.generation,
        layers: vec![file_name_of(layer)?],
        extents: extents_of(&sources),
    };
    merged.write(header)?;
    Ok(merged)
}

/// One file mapped read-only (an empty file is not mapped).
#[derive(Debug)]
struct Mapping {
    base: *const u8,
    len: u64,
}

// SAFETY: the mapping is read-only and lives as long as the struct; reading it from several
// threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above: shared read-only memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn open(path: &Path) -> Result<Self, LayerError> {
        let (file, len) = open_memory(path)?;
        if len == 0 {
            return Ok(Mapping {
                base: std::ptr::null(),
                len: 0,
            });
        }
        // SAFETY: a fresh private read-only mapping of a file we hold open; the kernel picks the
        // address; the result is checked before use and unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io(format!("mapping {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Mapping {
            base: base as *const u8,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping made in `open`, of this length, unmapped once.
            unsafe {
                libc::munmap(self.base as *mut libc::c_void, self.len as usize);
            }
        }
    }
}

/// A run of guest memory stored in one place: `[start, end)` of the guest's memory, zeros or
/// bytes of one mapping from `offset` on.
#[derive(Debug, Clone, Copy)]
struct Piece {
    start: u64,
    end: u64,
    /// The mapping and the offset in it, or none for zeros.
    data: Option<(usize, u64)>,
}

/// A snapshot's guest memory, readable at any offset: a plain memory file (holes read as
/// zeros) or a layered one read through its header. Pieces are found by binary search; bytes
/// are read from read-only mappings, so faults are served without a system call to read.
#[derive(Debug)]
pub struct MemoryImage {
    mappings: Vec<Mapping>,
    pieces: Vec<Piece>,
    len: u64,
}

impl MemoryImage {
    /// Opens `path`: a layered memory header (by its magic) with its layers, or a plain memory
    /// file.
    pub fn open(path: &Path) -> Result<Self, LayerError> {
        if is_header(path) {
            Self::open_layered(path)
        } else {
            Self::open_plain(path)
        }
    }

    fn open_plain(path: &Path) -> Result<Self, LayerError> {
        let (file, len) = open_memory(path)?;
        if len == 0 {
            return Err(LayerError::Invalid(format!("{} is empty", path.display())));
        }
        let data = data_ranges(&file, len)
            .map_err(io(format!("finding the data of {}", path.display())))?;
        let mut pieces = Vec::with_capacity(data.len() * 2 + 1);
        let mut at = 0;
        for (start, end) in data {
            if start > at {
                pieces.push(Piece {
                    start: at,
                    end: start,
                    data: None,
                });
            }
            pieces.push(Piece {
                start,
                end,
                data: Some((0, start)),
            });
            at = end;
        }
        if at < len {
            pieces.push(Piece {
                start: at,
                end: len,
                data: None,
            });
        }
        Ok(MemoryImage {
            mappings: vec![Mapping::open(path)?],
            pieces,
            len,
        })
    }

    fn open_layered(path: &Path) -> Result<Self, LayerError> {
        let header = LayerHeader::read(path)?;
        let block = u64::from(header.block_bytes);
        let mut mappings = Vec::with_capacity(header.layers.len());
        for layer in header.layer_paths(path) {
            mappings.push(Mapping::open(&layer)?);
        }
        let mut pieces = Vec::with_capacity(header.extents.len());
        for extent in &header.extents {
            let data = if extent.layer == ZERO_LAYER {
                None
            } else {
                let mapping = &mappings[extent.layer as usize];
                let needed = (extent.layer_block + extent.blocks) * block;
                if needed > mapping.len {
                    return Err(LayerError::Format {
                        path: path.display().to_string(),
                        problem: format!(
                            "layer {} holds {} bytes, its extents need {needed}",
                            header.layers[extent.layer as usize], mapping.len
                        ),
                    });
                }
                Some((extent.layer as usize, extent.layer_block * block))
            };
            pieces.push(Piece {
                start: extent.start_block * block,
                end: (extent.start_block + extent.blocks) * block,
                data,
            });
        }
        Ok(MemoryImage {
            mappings,
            pieces,
            len: header.memory_bytes,
        })
    }

    /// The guest memory's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn piece_index(&self, offset: u64) -> usize {
        self.pieces.partition_point(|piece| piece.end <= offset)
    }

    /// Whether `[offset, offset + len)` is all zeros by the image's map (holes, zero blocks).
    pub fn is_zero(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        self.pieces[self.piece_index(offset)..]
            .iter()
            .take_while(|piece| piece.start < end)
            .all(|piece| piece.data.is_none())
    }

    /// Where the run of memory stored in one place that holds `offset` ends.
    pub fn run_end(&self, offset: u64) -> u64 {
        self.pieces
            .get(self.piece_index(offset))
            .map_or(self.len, |piece| piece.end)
    }

    /// A pointer to `len` bytes at `offset` when they are stored together in one mapping.
    pub fn contiguous(&self, offset: u64, len: u64) -> Option<*const u8> {
        let piece = self.pieces.get(self.piece_index(offset))?;
        let (mapping, mapping_offset) = piece.data?;
        if offset + len > piece.end {
            return None;
        }
        // SAFETY: the piece's bytes lie inside the mapping (checked at open), and
        // `[offset, offset + len)` inside the piece.
        Some(unsafe {
            self.mappings[mapping]
                .base
                .add((mapping_offset + (offset - piece.start)) as usize)
        })
    }

    /// Reads `buffer.len()` bytes at `offset` (zeros where nothing is stored or past the end).
    pub fn read_at(&self, offset: u64, buffer: &mut [u8]) {
        let mut at = offset;
        let end = offset + buffer.len() as u64;
        let mut index = self.piece_index(offset);
        while at < end {
            let out = &mut buffer[(at - offset) as usize..];
            let Some(piece) = self.pieces.get(index) else {
                out.fill(0);
                return;
            };
            let take = (piece.end.min(end) - at) as usize;
            match piece.data {
                None => out[..take].fill(0),
                Some((mapping, mapping_offset)) => {
                    // SAFETY: as in `contiguous`: inside the piece, so inside the mapping.
                    let source = unsafe {
                        std::slice::from_raw_parts(
                            self.mappings[mapping]
                                .base
                                .add((mapping_offset + (at - piece.start)) as usize),
                            take,
                        )
                    };
                    out[..take].copy_from_slice(source);
                }
            }
            at += take as u64;
            index += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> LayerHeader {
        LayerHeader {
            block_bytes: 4096,
            memory_bytes: 10 * 4096,
            generation: 3,
            layers: vec!["base.layer".into(), "../other/gen1.layer".into()],
            extents: vec![
                Extent {
                    start_block: 0,
                    blocks: 4,
                    layer: 0,
                    layer_block: 0,
                },
                Extent {
                    start_block: 4,
                    blocks: 2,
                    layer: ZERO_LAYER,
                    layer_block: 0,
                },
                Extent {
                    start_block: 6,
                    blocks: 4,
                    layer: 1,
                    layer_block: 7,
                },
            ],
        }
    }

    #[test]
    fn a_header_reads_back_as_written() {
        let written = header();
        let read = LayerHeader::decode(&written.encode(), "h").unwrap();
        assert_eq!(read, written);
        assert_eq!(read.locate(2), BlockSource::Layer { layer: 0, block: 2 });
        assert_eq!(read.locate(5), BlockSource::Zero);
        assert_eq!(
            read.locate(9),
            BlockSource::Layer {
                layer: 1,
                block: 10
            }
        );
        assert_eq!(read.stored_blocks(), 8);
    }

    #[test]
    fn damaged_or_foreign_headers_are_refused_with_a_reason() {
        let bytes = header().encode();
        let mut flipped = bytes.clone();
        flipped[60] ^= 1;
        let error = LayerHeader::decode(&flipped, "h").unwrap_err().to_string();
        assert!(error.contains("damaged"), "{error}");
        let mut newer = bytes.clone();
        newer[8] = 2;
        let error = LayerHeader::decode(&newer, "h").unwrap_err().to_string();
        assert!(error.contains("version 2"), "{error}");
        let error = LayerHeader::decode(&bytes[..30], "h")
            .unwrap_err()
            .to_string();
        assert!(error.contains("truncated"), "{error}");
        assert!(LayerHeader::decode(b"QFI\xfb....", "h").is_err());
        // A gap in the extents, a layer out of range, a path out of the relative world.
        for broken in [
            {
                let mut h = header();
                h.extents[1].blocks = 1;
                h
            },
            {
                let mut h = header();
                h.extents[2].layer = 5;
                h
            },
            {
                let mut h = header();
                h.layers[0] = "/etc/passwd".into();
                h
            },
        ] {
            assert!(
                LayerHeader::decode(&broken.encode(), "h").is_err(),
                "{broken:?}"
            );
        }
    }

    #[test]
    fn layers_are_named_by_generation_and_unnamed_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("memory.snap");
        assert_eq!(layer_path(&snapshot, 3), dir.path().join("memory.g3.layer"));
        for name in [
            "memory.g0.layer",
            "memory.g1.layer",
            "memory.g2.layer",
            "other.g1.layer",
            "memory.gx.layer",
            "memory.header",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let mut kept = header();
        kept.layers = vec!["memory.g0.layer".into(), "memory.g2.layer".into()];
        remove_unnamed_layers(&snapshot, &kept);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "memory.g0.layer",
                "memory.g2.layer",
                "memory.gx.layer",
                "memory.header",
                "other.g1.layer"
            ]
        );
    }

    #[test]
    fn relative_paths_climb_out_of_the_header_directory() {
        assert_eq!(
            relative_path(Path::new("/a/b/c.layer"), Path::new("/a/d")).unwrap(),
            "../b/c.layer"
        );
        assert_eq!(
            relative_path(Path::new("/a/b/c.layer"), Path::new("/a/b")).unwrap(),
            "c.layer"
        );
    }
}
