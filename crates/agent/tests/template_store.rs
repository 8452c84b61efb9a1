//! The template store's backends with real files: a local directory always, and S3 against the
//! S3-compatible server `scripts/s3.sh` starts (moto's, from PyPI), named by
//! `WRENN_TEST_S3_ENDPOINT` and `WRENN_TEST_S3_BUCKET` with the `AWS_*` credentials
//! `scripts/test.sh` exports. Without them the S3 case says so and passes, unless
//! `WRENN_REQUIRE_PREREQUISITES=1`, where it fails.

use std::path::Path;
use std::time::Duration;

use wrenn_agent::store::TemplateRecord;
use wrenn_agent::template_store::{Artifact, StoredFile, TemplateStore, hash_file};

/// A template record of `id` as a pushed one looks (its paths are file names).
fn record(id: &str) -> TemplateRecord {
    serde_json::from_value(serde_json::json!({
        "template_id": id,
        "machine": {
            "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0",
            "disk": "disk.qcow2", "memory_mib": 512, "vcpus": 1, "netns": null,
            "tap": "tap0", "mac": "02:00:00:00:00:01", "vmm_user": null
        },
        "accel": "tcg",
        "snapshot": { "memory": "memory.snap", "bytes": 3 },
        "created_at_ms": 1, "image_key": "k", "envd_version": "v", "build_ms": 1,
        "stored": true
    }))
    .expect("a template record")
}

fn file(dir: &Path, name: &str, bytes: &[u8]) -> StoredFile {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let (sha256, size) = hash_file(&path).unwrap();
    StoredFile {
        name: name.into(),
        sha256,
        size,
    }
}

/// Two templates sharing their kernel go in, come out whole, and a delete takes only what the
/// other does not name.
async fn templates_share_blobs_and_a_delete_keeps_what_another_names(store: &TemplateStore) {
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    let kernel = file(dir, "vmlinuz", b"the shared kernel");
    let one_disk = file(dir, "disk-one", &[7u8; 100_000]);
    let two_disk = file(dir, "disk-two", b"the second template's disk");
    let artifact = |id: &str, disk: &StoredFile| Artifact {
        format: wrenn_agent::template_store::ARTIFACT_FORMAT,
        record: record(id),
        files: vec![kernel.clone()],
        disk: vec![(
            StoredFile {
                name: "disk.qcow2".into(),
                ..disk.clone()
            },
            "raw".into(),
        )],
    };
    for (id, disk, path) in [
        ("one", &one_disk, dir.join("disk-one")),
        ("two", &two_disk, dir.join("disk-two")),
    ] {
        let sent = store.put_blob(&dir.join("vmlinuz"), &kernel).await.unwrap();
        assert_eq!(sent.files, u64::from(id == "one"), "the kernel goes once");
        store.put_blob(&path, disk).await.unwrap();
        store.put_artifact(&artifact(id, disk)).await.unwrap();
    }
    assert_eq!(store.template_ids().await.unwrap(), ["one", "two"]);
    let got = store.artifact("one").await.unwrap().expect("one is there");
    assert_eq!(got.disk[0].0.sha256, one_disk.sha256);
    assert_eq!(got.record.template_id, "one");
    let fetched = dir.join("fetched");
    store.get_blob(&got.disk[0].0, &fetched).await.unwrap();
    assert_eq!(std::fs::read(&fetched).unwrap(), vec![7u8; 100_000]);
    assert!(store.artifact("three").await.unwrap().is_none());

    // Young blobs no template names are kept (a template may be on its way); old ones go.
    assert!(
        store
            .delete("one", Duration::from_secs(3600))
            .await
            .unwrap()
    );
    assert!(store.has_blob(&one_disk.sha256).await.unwrap());
    assert_eq!(store.collect_garbage(Duration::ZERO).await.unwrap(), 1);
    assert!(!store.has_blob(&one_disk.sha256).await.unwrap());
    assert!(
        store.has_blob(&kernel.sha256).await.unwrap(),
        "two names it"
    );
    assert!(store.has_blob(&two_disk.sha256).await.unwrap());
    assert!(
        !store.delete("one", Duration::ZERO).await.unwrap(),
        "gone already"
    );
    assert!(store.delete("two", Duration::ZERO).await.unwrap());
    assert!(!store.has_blob(&kernel.sha256).await.unwrap());
    assert!(store.template_ids().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_directory_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(dir.path().join("store").to_str().unwrap()).unwrap();
    templates_share_blobs_and_a_delete_keeps_what_another_names(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_store() {
    let (Ok(_endpoint), Ok(bucket)) = (
        std::env::var("WRENN_TEST_S3_ENDPOINT"),
        std::env::var("WRENN_TEST_S3_BUCKET"),
    ) else {
        let why = "WRENN_TEST_S3_ENDPOINT and WRENN_TEST_S3_BUCKET are not set (scripts/s3.sh \
                   starts the server, scripts/test.sh sets them)";
        if std::env::var("WRENN_REQUIRE_PREREQUISITES").as_deref() == Ok("1") {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    };
    // A prefix of its own: runs do not meet each other's objects.
    let prefix = format!("store-test-{}", std::process::id());
    let store = TemplateStore::open(&format!("s3://{bucket}/{prefix}")).unwrap();
    store.check().await.unwrap();
    templates_share_blobs_and_a_delete_keeps_what_another_names(&store).await;

    // A bucket that is not there is a clear error.
    let missing = TemplateStore::open("s3://wrenn-no-such-bucket/x").unwrap();
    let error = missing.check().await.unwrap_err();
    assert!(error.to_string().contains("template store"), "{error}");
}
