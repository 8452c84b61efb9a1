//! Layered memory files, by property: random writes across generations of Full and Diff
//! snapshots, written as layers in several directories and merged past a random limit, read back
//! (through [`MemoryImage`], as the page server reads them) exactly what was last written, at
//! every generation, and every earlier header still reads its own generation's memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use wrenn_vmm::layers::{self, Changed, LayerHeader, MemoryImage};

const PAGE: u64 = 4096;

/// One write of a page: zeros, or a page filled from `seed`.
#[derive(Debug, Clone)]
struct PageWrite {
    page: u64,
    seed: Option<u8>,
}

#[derive(Debug, Clone)]
struct Generation {
    full: bool,
    directory: usize,
    writes: Vec<PageWrite>,
    merge_after: bool,
}

fn fill(page: &mut [u8], seed: Option<u8>) {
    match seed {
        None => page.fill(0),
        Some(seed) => {
            for (index, byte) in page.iter_mut().enumerate() {
                *byte = seed.wrapping_add((index / 7) as u8);
            }
            page[0] = seed | 1; // never all zeros
        }
    }
}

fn generation(pages: u64) -> impl Strategy<Value = Generation> {
    (
        any::<bool>(),
        0..3usize,
        prop::collection::vec(
            (0..pages, prop::option::weighted(0.8, any::<u8>()))
                .prop_map(|(page, seed)| PageWrite { page, seed }),
            0..24,
        ),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(full, directory, writes, merge_after)| Generation {
            full,
            directory,
            writes,
            merge_after,
        })
}

fn check_reads(header: &Path, model: &[u8]) {
    let image = MemoryImage::open(header).unwrap();
    assert_eq!(image.len(), model.len() as u64);
    let mut read = vec![0u8; model.len()];
    image.read_at(0, &mut read);
    if let Some(at) = read.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{}: byte {at} reads {} where {} was written",
            header.display(),
            read[at],
            model[at]
        );
    }
    // Page by page too, through the page server's calls.
    for page in 0..model.len() as u64 / PAGE {
        let expected = &model[(page * PAGE) as usize..((page + 1) * PAGE) as usize];
        let zero = expected.iter().all(|&b| b == 0);
        if image.is_zero(page * PAGE, PAGE) {
            assert!(zero, "page {page} is mapped as zeros but was written");
        }
        if let Some(pointer) = image.contiguous(page * PAGE, PAGE) {
            // SAFETY: the image promises PAGE readable bytes there while it lives.
            let stored = unsafe { std::slice::from_raw_parts(pointer, PAGE as usize) };
            assert_eq!(stored, expected, "page {page}");
        }
    }
}

fn run(
    block_bytes: u32,
    pages: u64,
    max_layers: usize,
    base: Vec<PageWrite>,
    generations: Vec<Generation>,
) {
    let root = tempfile::tempdir().unwrap();
    let directories: Vec<PathBuf> = (0..3)
        .map(|i| {
            let directory = root.path().join(format!("d{i}"));
            std::fs::create_dir(&directory).unwrap();
            directory
        })
        .collect();
    let memory_bytes = pages * PAGE;
    let mut model = vec![0u8; memory_bytes as usize];
    for write in &base {
        let at = (write.page * PAGE) as usize;
        fill(&mut model[at..at + PAGE as usize], write.seed);
    }
    let full_path = root.path().join("memory.full");
    std::fs::write(&full_path, &model).unwrap();
    let mut header = directories[0].join("g0.header");
    let written = layers::write_base(
        &full_path,
        memory_bytes,
        block_bytes,
        &header,
        &directories[0].join("g0.layer"),
    )
    .unwrap();
    assert_eq!(written.generation, 0);
    let stored: usize = model
        .chunks(block_bytes as usize)
        .filter(|block| block.iter().any(|&b| b != 0))
        .count();
    assert_eq!(
        written.stored_blocks(),
        stored as u64,
        "the base stores exactly its non-zero blocks"
    );
    check_reads(&header, &model);
    let mut history = vec![(header.clone(), model.clone())];

    for (number, step) in generations.iter().enumerate() {
        let number = number + 1;
        for write in &step.writes {
            let at = (write.page * PAGE) as usize;
            fill(&mut model[at..at + PAGE as usize], write.seed);
        }
        let snapshot = root.path().join(format!("memory.{number}"));
        if step.full {
            std::fs::write(&snapshot, &model).unwrap();
        } else {
            // As Firecracker writes a Diff into a new file: the dirtied pages, holes elsewhere.
            let file = File::create(&snapshot).unwrap();
            file.set_len(memory_bytes).unwrap();
            for write in &step.writes {
                let at = write.page * PAGE;
                file.write_all_at(&model[at as usize..(at + PAGE) as usize], at)
                    .unwrap();
            }
        }
        let directory = &directories[step.directory];
        let next = directory.join(format!("g{number}.header"));
        let changed = if step.full {
            Changed::All
        } else {
            Changed::DataOnly
        };
        let written = layers::write_layer(
            &header,
            &snapshot,
            changed,
            &next,
            &directory.join(format!("g{number}.layer")),
            max_layers,
        )
        .unwrap();
        assert_eq!(written.generation as usize, number);
        assert!(
            written.layers.len() <= max_layers,
            "{} layers over {max_layers}",
            written.layers.len()
        );
        assert_eq!(LayerHeader::read(&next).unwrap(), written);
        header = next;
        check_reads(&header, &model);
        if step.merge_after {
            let merged_header = directory.join(format!("g{number}.merged.header"));
            let merged = layers::merge(
                &header,
                &merged_header,
                &directory.join(format!("g{number}.merged.layer")),
            )
            .unwrap();
            assert_eq!(merged.layers.len(), 1);
            assert_eq!(merged.generation as usize, number);
            check_reads(&merged_header, &model);
            header = merged_header;
        }
        history.push((header.clone(), model.clone()));
    }
    // Layers are never changed: every earlier snapshot still reads as it was taken.
    for (old_header, old_model) in &history {
        check_reads(old_header, old_model);
    }
    // No partial file is left behind.
    for directory in &directories {
        for entry in std::fs::read_dir(directory).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(".partial"), "{name} left behind");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn layers_read_back_what_was_last_written(
        block_pages in prop::sample::select(vec![1u64, 2, 4]),
        blocks in 1u64..24,
        max_layers in 1usize..5,
        base in prop::collection::vec((0u64..96, prop::option::weighted(0.8, any::<u8>())), 0..32),
        generations in prop::collection::vec(generation(96), 1..12),
    ) {
        let pages = block_pages * blocks;
        let base: Vec<PageWrite> = base
            .into_iter()
            .map(|(page, seed)| PageWrite { page: page % pages, seed })
            .collect();
        let generations: Vec<Generation> = generations
            .into_iter()
            .map(|mut generation| {
                for write in &mut generation.writes {
                    write.page %= pages;
                }
                generation
            })
            .collect();
        run((block_pages * PAGE) as u32, pages, max_layers, base, generations);
    }
}

/// A Diff snapshot that wrote nothing makes an empty layer and changes nothing; a header whose
/// layer lost bytes is refused at open, naming the layer.
#[test]
fn empty_diffs_and_truncated_layers() {
    let root = tempfile::tempdir().unwrap();
    let memory = root.path().join("memory");
    let mut bytes = vec![0u8; 16 * PAGE as usize];
    bytes[5 * PAGE as usize] = 9;
    std::fs::write(&memory, &bytes).unwrap();
    let base = root.path().join("base.header");
    let layer = root.path().join("base.layer");
    layers::write_base(&memory, 16 * PAGE, 4096, &base, &layer).unwrap();
    assert_eq!(std::fs::metadata(&layer).unwrap().len(), PAGE);

    let diff = root.path().join("diff");
    File::create(&diff).unwrap().set_len(16 * PAGE).unwrap();
    let next = root.path().join("next.header");
    let written = layers::write_layer(
        &base,
        &diff,
        Changed::DataOnly,
        &next,
        &root.path().join("next.layer"),
        8,
    )
    .unwrap();
    assert_eq!(
        written.layers,
        vec!["base.layer".to_string()],
        "an unused empty layer is not named"
    );
    check_reads(&next, &bytes);

    File::options()
        .write(true)
        .open(&layer)
        .unwrap()
        .set_len(100)
        .unwrap();
    let error = MemoryImage::open(&base).unwrap_err().to_string();
    assert!(
        error.contains("base.layer") && error.contains("holds 100 bytes"),
        "{error}"
    );
}
