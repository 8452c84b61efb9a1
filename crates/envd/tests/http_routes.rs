//! The real envd binary's plain HTTP routes: `/health`, `/files` in every form, `/init` and the
//! access token, signed URLs, `/envs`, `/metrics`, and a full disk. The full disk and the
//! uploads as the test user need root (and the user); without them those tests are skipped with a
//! message, or failed where `WRENN_REQUIRE_PREREQUISITES=1`.

mod common;

use std::io::Write;

use common::{Envd, request, upload};

fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "wrenn-test-boundary";
    let mut body = Vec::new();
    for (filename, data) in parts {
        write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").unwrap();
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The query that signs `operation` on `path` with the access token `tok-1`, valid until
/// `expiration` (unix seconds).
fn signed_query(
    path: &str,
    operation: wrenn_envd::http::signature::Operation,
    expiration: i64,
) -> String {
    let signature =
        wrenn_envd::http::signature::sign(path, operation, "", "tok-1", Some(expiration));
    let encoded =
        percent_encoding::utf8_percent_encode(&signature, percent_encoding::NON_ALPHANUMERIC);
    format!("signature={encoded}&signature_expiration={expiration}")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn upload_and_download_every_way() {
    let envd = Envd::start();
    let dir = common::open_dir();
    let base = dir.path().to_str().unwrap();
    let files = format!("{}/files", envd.url());

    // Multipart with full paths in the filenames, parents created.
    let (content_type, body) = multipart(&[
        (&format!("{base}/x/one.txt"), b"first"),
        (&format!("{base}/y/two.bin"), &[0, 1, 2]),
    ]);
    let reply = request(
        "POST",
        &files,
        &[
            ("content-type", &content_type),
            ("x-metadata-Owner", "team-a"),
        ],
        body,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let listed = reply.json();
    assert_eq!(listed[0]["path"], format!("{base}/x/one.txt"));
    assert_eq!(listed[0]["name"], "one.txt");
    assert_eq!(listed[0]["type"], "file");
    assert_eq!(
        std::fs::read(format!("{base}/y/two.bin")).unwrap(),
        [0, 1, 2]
    );

    // The same path twice in one request is refused.
    let (content_type, body) = multipart(&[
        (&format!("{base}/dup"), b"a"),
        (&format!("{base}/dup"), b"b"),
    ]);
    let reply = request("POST", &files, &[("content-type", &content_type)], body).await;
    assert_eq!(reply.status, 400);

    // Raw body, gzip-encoded, overwriting with the mode kept.
    let target = format!("{base}/x/one.txt");
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let url = format!("{files}?path={target}");
    let gzipped = [("content-encoding", "gzip")];
    let reply = upload(&url, &gzipped, gzip(b"second version")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(std::fs::read(&target).unwrap(), b"second version");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&target).unwrap().permissions())
            & 0o777,
        0o600
    );
    // No temporary files are left behind.
    assert_eq!(std::fs::read_dir(format!("{base}/x")).unwrap().count(), 1);

    // Downloads: whole, range, gzip, missing, directory, refused encoding.
    let reply = request("GET", &url, &[], "").await;
    assert_eq!(
        (reply.status, &reply.body[..]),
        (200, &b"second version"[..])
    );
    assert_eq!(
        reply.headers["content-disposition"],
        "inline; filename=one.txt"
    );
    let reply = request("GET", &url, &[("range", "bytes=7-")], "").await;
    assert_eq!((reply.status, &reply.body[..]), (206, &b"version"[..]));
    let reply = request("GET", &url, &[("accept-encoding", "gzip")], "").await;
    assert_eq!(reply.headers["content-encoding"], "gzip");
    let mut plain = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&reply.body[..]),
        &mut plain,
    )
    .unwrap();
    assert_eq!(plain, b"second version");
    let reply = request("GET", &url, &[("accept-encoding", "br, identity;q=0")], "").await;
    assert_eq!(reply.status, 406);
    let reply = request("GET", &format!("{files}?path={base}/nope"), &[], "").await;
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.json()["message"],
        format!("path '{base}/nope' does not exist")
    );
    let reply = request("GET", &format!("{files}?path={base}"), &[], "").await;
    assert_eq!(
        (reply.status, reply.json()["code"].as_u64()),
        (400, Some(400))
    );
    // Writing to a directory, bad content types, bad metadata, unknown users.
    let reply = upload(&format!("{files}?path={base}/x"), &[], "data").await;
    assert_eq!(reply.status, 400);
    let reply = request("POST", &url, &[("content-type", "text/plain")], "data").await;
    assert_eq!(reply.status, 400);
    let reply = upload(&url, &[("x-metadata-k", "caf\u{e9}")], "data").await;
    assert_eq!(reply.status, 400);
    let reply = request("GET", &format!("{url}&username=ghost"), &[], "").await;
    assert_eq!(reply.status, 401);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"second version",
        "failed uploads must not touch the file"
    );
}

#[tokio::test]
async fn init_token_and_signed_urls() {
    let envd = Envd::start();
    let dir = tempfile::tempdir().unwrap();
    let path = format!("{}/signed.txt", dir.path().display());
    std::fs::write(&path, b"secret data").unwrap();

    // Before /init everything is open; /init sets the token, env vars and defaults.
    assert_eq!(envd.request("GET", "/envs", &[], "").await.status, 200);
    let init = format!(
        r#"{{"accessToken":"tok-1","envVars":{{"TEAM":"blue"}},"defaultWorkdir":"/tmp","timestamp":"{}"}}"#,
        chrono::Utc::now().to_rfc3339()
    );
    let json = ("content-type", "application/json");
    let reply = envd.request("POST", "/init", &[json], init.clone()).await;
    assert_eq!(reply.status, 204);
    assert_eq!(reply.headers["x-envd-version"], wrenn_envd::ENVD_VERSION);

    // Now the token guards everything but /health, /files (token or signature) and /init.
    assert_eq!(envd.request("GET", "/health", &[], "").await.status, 204);
    let reply = envd.request("GET", "/envs", &[], "").await;
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.json()["message"],
        "unauthorized access, please provide a valid access token or method signing if supported"
    );
    let token = ("x-access-token", "tok-1");
    let reply = envd.request("GET", "/envs", &[token], "").await;
    assert_eq!(reply.json()["TEAM"], "blue");
    assert_eq!(reply.json()["E2B_SANDBOX"], "true");
    let wrong = [json, ("x-access-token", "wrong")];
    let reply = envd
        .request("POST", "/filesystem.Filesystem/Stat", &wrong, "{}")
        .await;
    assert_eq!(reply.status, 401);

    // A different token is refused; the same one is accepted again.
    let other = init.replace("tok-1", "tok-2");
    for (body, status) in [
        (other.as_str(), 401),
        ("{}", 401),
        (&init, 204),
        ("{broken", 400),
    ] {
        let reply = envd.request("POST", "/init", &[], body.to_owned()).await;
        assert_eq!(reply.status, status, "/init with {body}");
    }

    // Signed downloads.
    let files = format!("{}/files?path={path}", envd.url());
    let reply = request("GET", &files, &[], "").await;
    assert_eq!(
        (reply.status, reply.json()["message"].as_str()),
        (401, Some("missing signature query parameter"))
    );
    use wrenn_envd::http::signature::Operation;
    let future = chrono::Utc::now().timestamp() + 60;
    let readable = format!("{files}&{}", signed_query(&path, Operation::Read, future));
    let reply = request("GET", &readable, &[], "").await;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"secret data"[..]));
    let past = chrono::Utc::now().timestamp() - 1;
    let expired = format!("{files}&{}", signed_query(&path, Operation::Read, past));
    let reply = request("GET", &expired, &[], "").await;
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.text(),
        "{\"code\":401,\"message\":\"signature is already expired\"}\n"
    );
    let reply = request("GET", &format!("{files}&signature=v1_forged"), &[], "").await;
    assert_eq!(reply.json()["message"], "invalid signature");
    // A read signature does not allow writing.
    let reply = upload(&readable, &[], "overwrite").await;
    assert_eq!(reply.status, 401);
    assert_eq!(std::fs::read(&path).unwrap(), b"secret data");

    let metrics = envd.request("GET", "/metrics", &[token], "").await.json();
    for field in [
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total",
        "mem_used",
        "mem_cache",
        "mem_total_mib",
        "mem_used_mib",
        "disk_used",
        "disk_total",
    ] {
        assert!(
            metrics.get(field).is_some(),
            "{field} missing from {metrics}"
        );
    }
    assert!(metrics["mem_total"].as_u64().unwrap() > 0);
}

/// A full disk: the upload fails with 507 and the previous file is intact. Needs root (to
/// mount a tiny tmpfs).
#[tokio::test]
async fn full_disk_is_507_and_loses_nothing() {
    const WHAT: &str = "the full disk test";
    if !common::is_root() {
        wrenn_testkit::missing_prerequisite(WHAT, "mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().to_str().unwrap().to_owned();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", &mount])
        .status();
    if !mounted.as_ref().is_ok_and(|status| status.success()) {
        let reason = format!("could not mount a tmpfs at {mount}: {mounted:?}");
        wrenn_testkit::missing_prerequisite(WHAT, &reason);
        return;
    }
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    std::fs::write(format!("{mount}/keep.txt"), b"precious").unwrap();
    let envd = Envd::start();
    let url = format!("{}/files?path={mount}/keep.txt&username=root", envd.url());
    let reply = upload(&url, &[], vec![7u8; 2 * 1024 * 1024]).await;
    assert_eq!(reply.status, 507, "{}", reply.text());
    assert_eq!(reply.json()["message"], "not enough disk space available");
    assert_eq!(
        std::fs::read(format!("{mount}/keep.txt")).unwrap(),
        b"precious"
    );
    assert_eq!(
        std::fs::read_dir(&mount).unwrap().count(),
        1,
        "the temporary file was removed"
    );
}

/// Uploads into directories that do not exist create every missing level (0755, owned by the
/// uploading user) even where the user may not write the deepest existing one, as E2B's envd
/// does (the SDK's users write e.g. `/0/file.txt` as `user`), whatever the form of the upload;
/// into existing directories the permission checks stay. Needs root and the test user.
#[tokio::test]
async fn uploads_create_missing_parents_for_the_user() {
    let Some((uid, gid)) = common::test_user_ids().filter(|_| common::is_root()) else {
        wrenn_testkit::missing_prerequisite(
            "the uploads as the test user",
            "needs root and the test user 'user' (scripts/setup.sh creates it)",
        );
        return;
    };
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let envd = Envd::start();
    let dir = tempfile::tempdir().unwrap();
    // Like `/`: root's, and not writable by `user`.
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let base = dir.path().to_str().unwrap().to_owned();
    let files = format!("{}/files", envd.url());
    let as_user = format!("{files}?username=user");
    let created_for_user = |levels: &[&str]| {
        for level in levels {
            let metadata = std::fs::metadata(format!("{base}/{level}")).unwrap();
            assert!(metadata.is_dir(), "{level}");
            assert_eq!(
                (metadata.uid(), metadata.gid(), metadata.mode() & 0o777),
                (uid, gid, 0o755),
                "{level}"
            );
        }
    };
    let owned_by_user = |path: &str, content: &[u8]| {
        let metadata = std::fs::metadata(format!("{base}/{path}")).unwrap();
        assert_eq!((metadata.uid(), metadata.gid()), (uid, gid), "{path}");
        assert_eq!(std::fs::read(format!("{base}/{path}")).unwrap(), content);
    };

    // A raw body.
    let reply = upload(&format!("{as_user}&path={base}/raw/a/b/f.txt"), &[], "raw").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    created_for_user(&["raw", "raw/a", "raw/a/b"]);
    owned_by_user("raw/a/b/f.txt", b"raw");

    // A gzip-encoded raw body.
    let gzipped = [("content-encoding", "gzip")];
    let reply = upload(
        &format!("{as_user}&path={base}/gz/x/f.txt"),
        &gzipped,
        gzip(b"zipped"),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    created_for_user(&["gz", "gz/x"]);
    owned_by_user("gz/x/f.txt", b"zipped");

    // Multipart, one part, the destination in the query.
    let (content_type, body) = multipart(&[("ignored", b"one part")]);
    let reply = request(
        "POST",
        &format!("{as_user}&path={base}/one/f.txt"),
        &[("content-type", &content_type)],
        body,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    created_for_user(&["one"]);
    owned_by_user("one/f.txt", b"one part");

    // Multipart, many parts, each naming its destination, sharing and not sharing parents.
    let (content_type, body) = multipart(&[
        (&format!("{base}/0/multi_test_file0.txt"), b"zero"),
        (&format!("{base}/1/multi_test_file1.txt"), b"one"),
        (&format!("{base}/1/deeper/multi_test_file2.txt"), b"two"),
    ]);
    let reply = request("POST", &as_user, &[("content-type", &content_type)], body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json().as_array().unwrap().len(), 3);
    created_for_user(&["0", "1", "1/deeper"]);
    owned_by_user("0/multi_test_file0.txt", b"zero");
    owned_by_user("1/multi_test_file1.txt", b"one");
    owned_by_user("1/deeper/multi_test_file2.txt", b"two");

    // Into an existing directory the user may not write, or over a file they may not write:
    // refused, as before.
    std::fs::write(format!("{base}/0/roots.txt"), b"root's").unwrap();
    for path in ["top.txt", "0/roots.txt"] {
        let reply = upload(&format!("{as_user}&path={base}/{path}"), &[], "no").await;
        assert_eq!(reply.status, 403, "{path}: {}", reply.text());
    }
    assert_eq!(
        std::fs::read(format!("{base}/0/roots.txt")).unwrap(),
        b"root's"
    );

    // A file on the way is an error, whether it is the parent or further up.
    for path in ["0/roots.txt/f.txt", "0/roots.txt/deeper/f.txt"] {
        let reply = upload(&format!("{as_user}&path={base}/{path}"), &[], "no").await;
        assert_eq!(reply.status, 500, "{path}: {}", reply.text());
        assert!(
            reply.json()["message"]
                .as_str()
                .unwrap()
                .contains("is not a directory"),
            "{}",
            reply.text()
        );
    }
}

/// `/init`'s `caBundle` joins the trust store (the authority's own file and the system bundle,
/// given here as temporary paths); a second `/init` with another replaces it; one that is not
/// PEM certificates is refused with a 400 and changes nothing.
#[tokio::test]
async fn init_installs_the_sandbox_authority_in_the_trust_store() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("local/wrenn.crt");
    let bundle = dir.path().join("bundle.crt");
    std::fs::write(&bundle, "SYSTEM ROOTS\n").unwrap();
    let envd = Envd::start_with(&[
        "--trust-ca-file",
        ca_file.to_str().unwrap(),
        "--trust-bundle",
        bundle.to_str().unwrap(),
    ]);
    let pem =
        |tag: &str| format!("-----BEGIN CERTIFICATE-----\nMIIB{tag}\n-----END CERTIFICATE-----\n");
    let init = |ca: &str| serde_json::json!({ "accessToken": "tok", "caBundle": ca }).to_string();
    let json = ("content-type", "application/json");
    assert_eq!(
        envd.request("POST", "/init", &[json], init(&pem("One")))
            .await
            .status,
        204
    );
    assert_eq!(std::fs::read_to_string(&ca_file).unwrap(), pem("One"));
    let installed = std::fs::read_to_string(&bundle).unwrap();
    assert!(installed.starts_with("SYSTEM ROOTS\n") && installed.contains(&pem("One")));
    // Processes are pointed at it (Node's extra roots, Python requests' bundle).
    let envs = envd
        .request("GET", "/envs", &[("x-access-token", "tok")], "")
        .await
        .json();
    assert_eq!(envs["NODE_EXTRA_CA_CERTS"], ca_file.to_str().unwrap());
    assert_eq!(envs["REQUESTS_CA_BUNDLE"], bundle.to_str().unwrap());

    assert_eq!(
        envd.request("POST", "/init", &[json], init(&pem("Two")))
            .await
            .status,
        204
    );
    let replaced = std::fs::read_to_string(&bundle).unwrap();
    assert!(replaced.contains(&pem("Two")) && !replaced.contains("MIIBOne"));
    assert!(replaced.starts_with("SYSTEM ROOTS\n"));

    let reply = envd
        .request("POST", "/init", &[json], init("not a certificate"))
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(std::fs::read_to_string(&bundle).unwrap(), replaced);
}
