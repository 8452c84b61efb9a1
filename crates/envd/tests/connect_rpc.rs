//! The real envd binary driven by the project's own Connect client, over HTTP/1.1 and h2c, with
//! both codecs: processes, terminals, filesystem calls, watch streams, deadlines, keepalives and
//! malformed input.

mod common;

use std::time::Duration;

use common::{
    Collected, Envd, collect, collect_from, collect_rest, connect_event, pid_selector, pty,
    request, run, start_event, start_request, start_stream,
};
use http::{HeaderMap, HeaderValue};
use wrenn_connect::client::{ConnectClient, HttpVersion, ResponseStream};
use wrenn_connect::{Code, Codec, ConnectError, envelope};
use wrenn_proto::filesystem as fs;
use wrenn_proto::filesystem::filesystem as fs_rpc;
use wrenn_proto::process as pb;
use wrenn_proto::process::process_event::{Event, StartEvent, data_event::Output};
use wrenn_proto::process::process_input::Input;

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

/// Runs `script` with `/bin/sh -c` through `Start` with `headers` and collects its stream.
async fn sh(client: &ConnectClient, script: &str, headers: &HeaderMap) -> Collected {
    run(client, &start_request("/bin/sh", &["-c", script]), headers).await
}

/// Calls the unary RPC `M` with `request` and no extra headers.
async fn call<M>(client: &ConnectClient, request: M::Request) -> Result<M::Response, ConnectError>
where
    M: wrenn_proto::Rpc,
    M::Request: wrenn_connect::Message,
    M::Response: wrenn_connect::Message,
{
    client.call::<M>(&request, &HeaderMap::new()).await
}

/// The pids of the processes envd lists.
async fn listed_pids(client: &ConnectClient) -> Vec<u32> {
    let list = call::<pb::process::List>(client, pb::ListRequest {}).await;
    list.unwrap().processes.iter().map(|p| p.pid).collect()
}

/// The response stream of `Connect` to the process `process` selects; panics if refused.
async fn connect_stream(
    client: &ConnectClient,
    process: Option<pb::ProcessSelector>,
) -> ResponseStream<pb::ConnectResponse> {
    let request = pb::ConnectRequest { process };
    client
        .call_streaming::<pb::process::Connect>(&request, &HeaderMap::new())
        .await
        .expect("Connect failed")
}

/// `SendInput` of `input` to the process `process` selects.
async fn send_input(
    client: &ConnectClient,
    process: Option<pb::ProcessSelector>,
    input: Input,
) -> Result<pb::SendInputResponse, ConnectError> {
    let input = Some(pb::ProcessInput { input: Some(input) });
    call::<pb::process::SendInput>(client, pb::SendInputRequest { process, input }).await
}

/// `CloseStdin` of the process `process` selects.
async fn close_stdin(
    client: &ConnectClient,
    process: Option<pb::ProcessSelector>,
) -> Result<pb::CloseStdinResponse, ConnectError> {
    call::<pb::process::CloseStdin>(client, pb::CloseStdinRequest { process }).await
}

/// `Stat` of `path`.
async fn stat(client: &ConnectClient, path: String) -> Result<fs::StatResponse, ConnectError> {
    call::<fs_rpc::Stat>(client, fs::StatRequest { path }).await
}

/// `MakeDir` of `path`.
async fn make_dir(
    client: &ConnectClient,
    path: String,
) -> Result<fs::MakeDirResponse, ConnectError> {
    call::<fs_rpc::MakeDir>(client, fs::MakeDirRequest { path }).await
}

/// `Move` of `source` to `destination`.
async fn move_entry(
    client: &ConnectClient,
    source: String,
    destination: String,
) -> Result<fs::MoveResponse, ConnectError> {
    let request = fs::MoveRequest {
        source,
        destination,
    };
    call::<fs_rpc::Move>(client, request).await
}

/// `ListDir` of `path`, `depth` levels deep.
async fn list_dir(
    client: &ConnectClient,
    path: String,
    depth: u32,
) -> Result<fs::ListDirResponse, ConnectError> {
    call::<fs_rpc::ListDir>(client, fs::ListDirRequest { path, depth }).await
}

/// `Remove` of `path`.
async fn remove(client: &ConnectClient, path: String) -> Result<fs::RemoveResponse, ConnectError> {
    call::<fs_rpc::Remove>(client, fs::RemoveRequest { path }).await
}

#[tokio::test]
async fn start_streams_output_and_exit_over_every_transport_and_codec() {
    let envd = Envd::start();
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        for codec in [Codec::Json, Codec::Proto] {
            let client = envd.client(version, codec);
            let out = run(
                &client,
                &start_request("/bin/sh", &["-c", "echo out; echo err >&2; exit 3"]),
                &HeaderMap::new(),
            )
            .await;
            assert!(out.pid.is_some(), "{version:?} {codec:?}");
            assert_eq!(out.stdout, b"out\n");
            assert_eq!(out.stderr, b"err\n");
            let end = out.end.expect("end event");
            assert_eq!(
                (end.exit_code, end.exited, end.status.as_str()),
                (3, true, "exit status 3")
            );
            assert_eq!(end.error.as_deref(), Some("exit status 3"));

            let ok = run(&client, &start_request("/bin/true", &[]), &HeaderMap::new()).await;
            let end = ok.end.unwrap();
            assert_eq!((end.exit_code, end.error), (0, None));
        }
    }
}

#[tokio::test]
async fn environment_cwd_and_users() {
    let envd = Envd::start();
    let client = envd.client(HttpVersion::Http1, Codec::Json);
    let mut request = start_request("/bin/sh", &["-c", "echo $GREETING:$USER:$HOME:$(pwd)"]);
    let config = request.process.as_mut().unwrap();
    config.envs.insert("GREETING".into(), "hi".into());
    config.cwd = Some("/tmp".into());
    let out = run(&client, &request, &HeaderMap::new()).await;
    // Without /init, calls that name no user run as `user` where it exists, else as root.
    let (default_user, default_home) = common::default_account();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hi:{default_user}:{default_home}:/tmp\n")
    );
    // With no cwd, a process starts in its user's home.
    let out = sh(&client, "id -un; pwd", &HeaderMap::new()).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{default_user}\n{default_home}\n")
    );
    // Naming root still runs as root.
    let as_root = headers(&[("authorization", "Basic cm9vdDo=")]);
    let out = sh(&client, "id -un; echo $HOME; pwd", &as_root).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "root\n/root\n/root\n");

    let mut missing = start_request("/bin/true", &[]);
    missing.process.as_mut().unwrap().cwd = Some("/does/not/exist".into());
    let out = run(&client, &missing, &HeaderMap::new()).await;
    assert_eq!(out.error.unwrap().code, Code::InvalidArgument);

    // An unknown Basic user is refused before anything runs.
    let ghost = headers(&[("authorization", "Basic Z2hvc3Q6")]);
    let error = client
        .call_streaming::<pb::process::Start>(&start_request("/bin/true", &[]), &ghost)
        .await
        .unwrap_err();
    assert_eq!(error.code, Code::Unauthenticated);

    if !(common::is_root() && common::test_user_exists()) {
        wrenn_testkit::missing_prerequisite(
            "running a process as the test user",
            "needs root and the test user 'user' (scripts/setup.sh creates it)",
        );
        return;
    }
    let as_user = headers(&[("authorization", "Basic dXNlcjo=")]);
    let out = sh(&client, "id -un; echo $HOME; pwd", &as_user).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "user\n/home/user\n/home/user\n"
    );
}

#[tokio::test]
async fn deadline_kills_the_process_and_fails_the_stream() {
    let envd = Envd::start();
    let client = envd.client(HttpVersion::Http1, Codec::Json);
    let mut request = start_request("/bin/sleep", &["30"]);
    request.tag = Some("doomed".into());
    let out = run(
        &client,
        &request,
        &headers(&[("connect-timeout-ms", "300")]),
    )
    .await;
    assert_eq!(
        out.error.expect("deadline error").code,
        Code::DeadlineExceeded
    );
    let pid = out.pid.unwrap();
    wrenn_testkit::wait_until(
        "the end of the process whose deadline passed",
        Duration::from_secs(15),
        async || !listed_pids(&client).await.contains(&pid),
    )
    .await;
    // The late Connect sees how it ended.
    let late = collect(
        connect_stream(&client, pid_selector(pid)).await,
        connect_event,
    )
    .await;
    let end = late.end.expect("a late Connect gets the end");
    assert_eq!((end.exit_code, end.status.as_str()), (-1, "signal: killed"));
}

#[tokio::test]
async fn dropped_stream_keeps_the_process_and_connect_by_tag_follows_it() {
    let envd = Envd::start();
    let client = envd.client(HttpVersion::Http2, Codec::Json);
    // The process speaks only once the test lets it (a file appears), after the Connect.
    let gate = tempfile::tempdir().unwrap();
    let go = gate.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo late",
        go.display()
    );
    let mut request = start_request("/bin/sh", &["-c", &script]);
    request.tag = Some("survivor".into());
    let mut stream = start_stream(&client, &request, &HeaderMap::new()).await;
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event.unwrap().event, Some(Event::Start(_))));
    drop(stream);

    let survivor = Some(pb::ProcessSelector {
        selector: Some(pb::process_selector::Selector::Tag("survivor".into())),
    });
    let following = connect_stream(&client, survivor).await;
    std::fs::write(&go, "").unwrap();
    let followed = collect(following, connect_event).await;
    assert_eq!(followed.stdout, b"late\n");
    assert_eq!(followed.end.unwrap().exit_code, 0);
}

#[tokio::test]
async fn stdin_input_and_close() {
    let envd = Envd::start();
    let client = envd.client(HttpVersion::Http1, Codec::Json);
    let mut request = start_request("/bin/cat", &[]);
    request.stdin = Some(true);
    let mut stream = start_stream(&client, &request, &HeaderMap::new()).await;
    let pid = wrenn_testkit::started_pid(&mut stream).await;
    let echoed = Input::Stdin(b"echoed\n".to_vec());
    send_input(&client, pid_selector(pid), echoed)
        .await
        .unwrap();
    close_stdin(&client, pid_selector(pid)).await.unwrap();
    let rest = collect_rest(stream, pid).await;
    assert_eq!(rest.stdout, b"echoed\n");
    assert_eq!(rest.end.unwrap().exit_code, 0);

    // Input to a process without stdin, and to one that is gone.
    let mut no_stdin = start_request("/bin/sleep", &["5"]);
    no_stdin.stdin = Some(false);
    let mut stream = start_stream(&client, &no_stdin, &HeaderMap::new()).await;
    let pid = wrenn_testkit::started_pid(&mut stream).await;
    let error = send_input(&client, pid_selector(pid), Input::Stdin(b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(error.code, Code::Internal);
    common::send_signal(&client, pid, pb::Signal::Sigkill)
        .await
        .unwrap();
    let end = collect_rest(stream, pid).await.end.unwrap();
    assert_eq!(end.status, "signal: killed");
    let error = common::send_signal(&client, 999_999, pb::Signal::Sigkill)
        .await
        .unwrap_err();
    assert_eq!(error.code, Code::NotFound);
}

#[tokio::test]
async fn pty_input_resize_and_keepalive() {
    let envd = Envd::start();
    let client = envd.client(HttpVersion::Http1, Codec::Json);
    let mut request = start_request("/bin/sh", &[]);
    request.pty = pty(80, 24);
    let keepalive = headers(&[("keepalive-ping-interval", "1")]);
    let mut stream = start_stream(&client, &request, &keepalive).await;
    let pid = wrenn_testkit::started_pid(&mut stream).await;
    let resize = pb::UpdateRequest {
        process: pid_selector(pid),
        pty: pty(100, 40),
    };
    call::<pb::process::Update>(&client, resize).await.unwrap();
    // Stay silent long enough for a keepalive, then ask the terminal its size and leave.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let keys = Input::Pty(b"stty size; echo $((6*7)); exit\n".to_vec());
    send_input(&client, pid_selector(pid), keys).await.unwrap();
    // The shell may already have exited; if not, closing a PTY's stdin is refused.
    if let Err(error) = close_stdin(&client, pid_selector(pid)).await {
        assert!(
            matches!(error.code, Code::Unknown | Code::NotFound),
            "{error}"
        );
    }
    let rest = collect_rest(stream, pid).await;
    let screen = String::from_utf8_lossy(&rest.pty);
    assert!(screen.contains("40 100"), "{screen}");
    assert!(screen.contains("42"), "{screen}");
    assert!(rest.keepalives >= 1, "no keepalive on a silent stream");
    assert_eq!(rest.end.unwrap().exit_code, 0);
}

/// The lines of terminal output with escape sequences and carriage returns taken out.
fn screen_lines(pty: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(pty);
    let mut plain = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters, then one final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC (the window title): up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => {}
            c => plain.push(c),
        }
    }
    plain.lines().map(str::to_owned).collect()
}

/// Reads a process stream until its terminal output has a line `line` on its own; returns the
/// output read. Fails on the stream's end or error, or after 20 s.
async fn read_pty_until_line<M: wrenn_connect::Message>(
    stream: &mut ResponseStream<M>,
    event_of: fn(M) -> Option<pb::ProcessEvent>,
    line: &str,
) -> Vec<u8> {
    let mut pty = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !screen_lines(&pty).iter().any(|l| l == line) {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no line {line:?} within 20 s; output: {:?}",
                    String::from_utf8_lossy(&pty)
                )
            })
            .unwrap_or_else(|| panic!("stream ended; output: {:?}", String::from_utf8_lossy(&pty)))
            .unwrap();
        match event_of(message).and_then(|e| e.event) {
            Some(Event::Data(pb::process_event::DataEvent {
                output: Some(Output::Pty(bytes)),
            })) => pty.extend(bytes),
            Some(Event::Keepalive(_)) => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
    pty
}

/// A second handle on a terminal (`Connect`) gets everything the terminal prints from then on,
/// as the first one (`Start`) does, whether the first is still open (and unread) or was
/// dropped: E2B's SDK test `test_connect_to_pty` and the issue's `export FOO=bar`, `echo $FOO`.
#[tokio::test]
async fn pty_output_reaches_every_connected_stream() {
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        for drop_original in [false, true] {
            let envd = Envd::start();
            let client = envd.client(version, Codec::Json);
            let mut request = start_request("/bin/bash", &["-i", "-l"]);
            let config = request.process.as_mut().unwrap();
            config.envs.insert("TERM".into(), "xterm-256color".into());
            config.envs.insert("LANG".into(), "C.UTF-8".into());
            request.pty = pty(80, 24);
            let mut original = start_stream(&client, &request, &HeaderMap::new()).await;
            let pid = wrenn_testkit::started_pid(&mut original).await;
            let mut connected = Vec::new();
            for _ in 0..2 {
                let mut stream = connect_stream(&client, pid_selector(pid)).await;
                // Connect's first message names the process.
                let first = stream.message().await.unwrap().unwrap().event.unwrap();
                assert_eq!(first.event, Some(Event::Start(StartEvent { pid })));
                connected.push(stream);
            }
            let mut original = (!drop_original).then_some(original);

            for keys in [&b"export FOO=bar\n"[..], b"echo $FOO\n"] {
                let keys = Input::Pty(keys.to_vec());
                send_input(&client, pid_selector(pid), keys).await.unwrap();
            }
            let case = format!("{version:?}, original dropped: {drop_original}");
            for stream in &mut connected {
                let pty = read_pty_until_line(stream, connect_event, "bar").await;
                eprintln!("{case}: {:?}", String::from_utf8_lossy(&pty));
            }
            if let Some(stream) = &mut original {
                read_pty_until_line(stream, start_event, "bar").await;
            }

            // One connected stream goes away; the other still gets everything, to the end.
            connected.remove(0);
            let keys = Input::Pty(b"echo $((6*7))$FOO; exit\n".to_vec());
            send_input(&client, pid_selector(pid), keys).await.unwrap();
            let rest = collect_from(
                connected.pop().unwrap(),
                connect_event,
                Collected {
                    pid: Some(pid),
                    ..Collected::default()
                },
            )
            .await;
            assert!(
                screen_lines(&rest.pty).iter().any(|l| l == "42bar"),
                "{case}: {:?}",
                String::from_utf8_lossy(&rest.pty)
            );
            assert_eq!(rest.end.expect("end").exit_code, 0, "{case}");
        }
    }
}

#[tokio::test]
async fn filesystem_calls_and_watch_stream() {
    let (_envd, _dir, base, client, mut events) = watched_dir(Codec::Json, true, true).await;

    let made = make_dir(&client, format!("{base}/a/b")).await.unwrap();
    assert_eq!(made.entry.unwrap().r#type, fs::FileType::Directory as i32);
    let again = make_dir(&client, format!("{base}/a/b")).await.unwrap_err();
    assert_eq!(again.code, Code::AlreadyExists);
    std::fs::write(format!("{base}/a/b/f.txt"), b"12345").unwrap();

    let listed = list_dir(&client, base.clone(), 3).await.unwrap();
    let paths: Vec<_> = listed
        .entries
        .iter()
        .map(|e| e.path.trim_start_matches(&base).to_owned())
        .collect();
    assert_eq!(paths, vec!["/a", "/a/b", "/a/b/f.txt"]);
    // MakeDir made `a` and `b` as the default user; the test itself (root) wrote the file.
    let (default_user, _) = common::default_account();
    let made_dir = &listed.entries[0];
    assert_eq!(
        (made_dir.owner.as_str(), made_dir.permissions.as_str()),
        (default_user, "drwxr-xr-x")
    );
    let file = &listed.entries[2];
    assert_eq!(
        (file.size, file.permissions.len(), file.owner.as_str()),
        (5, 10, "root")
    );

    let moved = move_entry(
        &client,
        format!("{base}/a/b/f.txt"),
        format!("{base}/g.txt"),
    )
    .await
    .unwrap();
    assert_eq!(moved.entry.unwrap().name, "g.txt");
    let missing = stat(&client, format!("{base}/a/b/f.txt"))
        .await
        .unwrap_err();
    assert_eq!(missing.code, Code::NotFound);
    remove(&client, format!("{base}/a")).await.unwrap();

    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(name, kind): &(String, i32)| name == "a" && *kind == fs::EventType::Remove as i32)
    {
        let message = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("watch stalled")
            .unwrap()
            .unwrap();
        if let Some(fs::watch_dir_response::Event::Filesystem(event)) = message.event {
            seen.push((event.name, event.r#type));
        }
    }
    let create = fs::EventType::Create as i32;
    assert!(seen.contains(&("a".to_owned(), create)), "{seen:?}");
    assert!(seen.contains(&("a/b".to_owned(), create)), "{seen:?}");
    assert!(seen.contains(&("a/b/f.txt".to_owned(), create)), "{seen:?}");
    assert!(seen.contains(&("g.txt".to_owned(), create)), "{seen:?}");
}

/// The events of a watch stream up to (without) the creation of `sentinel`, which this makes:
/// exactly what the operations before it caused.
async fn watch_events_until_sentinel(
    events: &mut ResponseStream<fs::WatchDirResponse>,
    base: &str,
) -> Vec<(String, fs::EventType)> {
    std::fs::write(format!("{base}/sentinel"), b"").unwrap();
    let mut seen = Vec::new();
    let mut sentinel_made = false;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("watch stalled")
            .unwrap()
            .unwrap();
        let Some(fs::watch_dir_response::Event::Filesystem(event)) = message.event else {
            continue;
        };
        let kind = fs::EventType::try_from(event.r#type).unwrap();
        match (event.name == "sentinel", sentinel_made) {
            (false, false) => seen.push((event.name, kind)),
            (true, false) => {
                assert_eq!(kind, fs::EventType::Create);
                sentinel_made = true;
                // Leave nothing queued for the next round.
                std::fs::remove_file(format!("{base}/sentinel")).unwrap();
            }
            (true, true) if kind == fs::EventType::Remove => return seen,
            (_, true) => panic!("unexpected {} {kind:?} after the sentinel", event.name),
        }
    }
}

/// What a watcher sees of uploads and filesystem calls, as E2B's envd shows them: an upload of
/// a new file is CREATE, CHMOD, WRITE (no WRITE when empty), of an existing one CHMOD, WRITE,
/// each with one more CHMOD when metadata is written; never the upload's temporary file.
#[tokio::test]
async fn watch_events_of_uploads_and_calls_follow_e2b() {
    use fs::EventType::{Chmod, Create, Remove, Rename, Write};
    let (envd, _dir, base, client, mut events) = watched_dir(Codec::Proto, false, false).await;
    let expect = |list: &[(&str, fs::EventType)]| -> Vec<(String, fs::EventType)> {
        list.iter().map(|(n, k)| (n.to_string(), *k)).collect()
    };

    // Uploads: the path, the content, whether metadata comes with it, and the events seen of
    // the entry in the watched directory.
    let uploads: [(&str, &str, bool, &[fs::EventType]); 6] = [
        ("f.txt", "new", false, &[Create, Chmod, Write]),
        ("f.txt", "again", false, &[Chmod, Write]),
        ("f.txt", "tagged", true, &[Chmod, Write, Chmod]),
        ("empty.txt", "", false, &[Create, Chmod]),
        ("meta.txt", "m", true, &[Create, Chmod, Write, Chmod]),
        // Into a new directory: the directory's CREATE and CHMOD (the file is below the watch).
        ("new/inner.txt", "in", false, &[Create, Chmod]),
    ];
    for (name, body, metadata, seen) in uploads {
        let url = format!("{}/files?path={base}/{name}", envd.url());
        let tag = [("x-metadata-team", "blue")];
        let reply = common::upload(&url, if metadata { &tag } else { &[] }, body).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let entry = name.split('/').next().unwrap();
        let seen: Vec<_> = seen.iter().map(|kind| (entry, *kind)).collect();
        assert_eq!(
            watch_events_until_sentinel(&mut events, &base).await,
            expect(&seen),
            "upload of {body:?} to {name}, metadata: {metadata}"
        );
    }

    make_dir(&client, format!("{base}/m/n")).await.unwrap();
    let seen = watch_events_until_sentinel(&mut events, &base).await;
    assert_eq!(seen, expect(&[("m", Create), ("m", Chmod)]));
    move_entry(&client, format!("{base}/f.txt"), format!("{base}/g.txt"))
        .await
        .unwrap();
    let seen = watch_events_until_sentinel(&mut events, &base).await;
    assert_eq!(seen, expect(&[("f.txt", Rename), ("g.txt", Create)]));
    let chmod = run(
        &client,
        &start_request("/bin/chmod", &["600", &format!("{base}/g.txt")]),
        &HeaderMap::new(),
    )
    .await;
    assert_eq!(chmod.end.unwrap().exit_code, 0);
    let seen = watch_events_until_sentinel(&mut events, &base).await;
    assert_eq!(seen, expect(&[("g.txt", Chmod)]));
    remove(&client, format!("{base}/g.txt")).await.unwrap();
    let seen = watch_events_until_sentinel(&mut events, &base).await;
    assert_eq!(seen, expect(&[("g.txt", Remove)]));
}

#[tokio::test]
async fn malformed_requests_get_connect_errors() {
    let envd = Envd::start();
    let stat = format!("{}/filesystem.Filesystem/Stat", envd.url());
    let json = [("content-type", "application/json")];
    let reply = request("POST", &stat, &json, "{not json").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["code"], "invalid_argument");
    let reply = request("POST", &stat, &json, r#"{"path":5}"#).await;
    assert_eq!(reply.json()["code"], "invalid_argument");
    let reply = request("POST", &stat, &[("content-type", "text/plain")], "{}").await;
    assert_eq!(reply.status, 415);
    let huge = format!(r#"{{"path":"{}"}}"#, "a".repeat(5 * 1024 * 1024));
    let reply = request("POST", &stat, &json, huge).await;
    assert_eq!(reply.json()["code"], "resource_exhausted");
    let reply = request(
        "POST",
        &stat,
        &[
            ("content-type", "application/json"),
            ("connect-timeout-ms", "soon"),
        ],
        "{}",
    )
    .await;
    assert_eq!(reply.json()["code"], "invalid_argument");

    // Streaming: a truncated envelope, a lying length, a compressed flag, an unknown oneof.
    let start = format!("{}/process.Process/Start", envd.url());
    let streaming = [("content-type", "application/connect+json")];
    let body = envelope::encode(0, br#"{"process":{"cmd":"/bin/true"}}"#);
    for broken in [
        body.slice(..8),
        {
            let mut lying = body.to_vec();
            lying[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
            lying.into()
        },
        envelope::encode(1, b"{}"),
    ] {
        let reply = request("POST", &start, &streaming, broken).await;
        assert_eq!(reply.status, 200);
        let mut decoder = envelope::EnvelopeDecoder::new(1 << 20);
        decoder.push(&reply.body);
        let end = decoder.next_envelope().unwrap().unwrap();
        assert!(end.is_end_stream());
        let error = wrenn_connect::ConnectError::parse_end_stream(&end.payload)
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                error.code,
                Code::InvalidArgument | Code::ResourceExhausted | Code::Unimplemented
            ),
            "{error}"
        );
    }
    let reply = request(
        "POST",
        &format!("{}/process.Process/SendSignal", envd.url()),
        &json,
        r#"{"process":{}}"#,
    )
    .await;
    assert_eq!(reply.json()["code"], "unimplemented");
    // envd is still alive and well.
    assert_eq!(
        request("GET", &format!("{}/health", envd.url()), &[], "")
            .await
            .status,
        204
    );
}

/// A new envd; a directory every user may write in, and its path; a client of the envd over
/// h2c with `codec`; and a watch of the directory, past its start event.
async fn watched_dir(
    codec: Codec,
    recursive: bool,
    include_entry: bool,
) -> (
    Envd,
    tempfile::TempDir,
    String,
    ConnectClient,
    ResponseStream<fs::WatchDirResponse>,
) {
    let envd = Envd::start();
    let dir = common::open_dir();
    let base = dir.path().to_str().unwrap().to_owned();
    let client = envd.client(HttpVersion::Http2, codec);
    let watch = fs::WatchDirRequest {
        path: base.clone(),
        recursive,
        include_entry,
        allow_network_mounts: false,
    };
    let mut events = client
        .call_streaming::<fs_rpc::WatchDir>(&watch, &HeaderMap::new())
        .await
        .unwrap();
    assert!(matches!(
        events.message().await.unwrap().unwrap().event,
        Some(fs::watch_dir_response::Event::Start(_))
    ));
    (envd, dir, base, client, events)
}
