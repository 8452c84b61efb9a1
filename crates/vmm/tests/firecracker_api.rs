//! The Firecracker API client against Firecracker's published contract (the Swagger file in
//! `tests/contract`): every kind of request the client sends, with every optional field and with
//! none, must name a documented path and method and carry a body its schema accepts (required
//! fields, no field the schema lacks, types, enums, bounds); the answers it parses must match the
//! documented ones. Then the client's transport, against an HTTP server on a Unix socket
//! answering as Firecracker does (204, 200 with a body, 400 with a `fault_message`).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use wrenn_vmm::firecracker::api::*;

const VARIANTS: usize = 23;

/// The index of `request`'s kind: an exhaustive match, so a new kind of request fails to compile
/// until it is listed here, and fails the test until it has an example.
fn variant(request: &Request) -> usize {
    match request {
        Request::DescribeInstance => 0,
        Request::Version => 1,
        Request::PutBootSource(_) => 2,
        Request::PutDrive(_) => 3,
        Request::PatchDrive(_) => 4,
        Request::PutMachineConfig(_) => 5,
        Request::GetMachineConfig => 6,
        Request::PutNetworkInterface(_) => 7,
        Request::PatchNetworkInterface(_) => 8,
        Request::PutMmdsConfig(_) => 9,
        Request::PutMmds(_) => 10,
        Request::PatchMmds(_) => 11,
        Request::GetMmds => 12,
        Request::PutEntropy(_) => 13,
        Request::PutLogger(_) => 14,
        Request::PutMetrics(_) => 15,
        Request::PutSerial(_) => 16,
        Request::PutBalloon(_) => 17,
        Request::PatchBalloon(_) => 18,
        Request::Action(_) => 19,
        Request::PatchVm(_) => 20,
        Request::CreateSnapshot(_) => 21,
        Request::LoadSnapshot(_) => 22,
    }
}

fn limiter() -> RateLimiter {
    RateLimiter {
        bandwidth: Some(TokenBucket {
            size: 209_715_200,
            refill_time: 1000,
            one_time_burst: Some(104_857_600),
        }),
        ops: Some(TokenBucket {
            size: 1000,
            refill_time: 100,
            one_time_burst: None,
        }),
    }
}

/// Every kind of request, each with all its optional fields and with none.
fn examples() -> Vec<Request> {
    let mut requests = vec![
        Request::DescribeInstance,
        Request::Version,
        Request::GetMachineConfig,
        Request::GetMmds,
        Request::PutBootSource(BootSource {
            kernel_image_path: "/wrenn/vmlinux".into(),
            boot_args: Some("console=ttyS0 reboot=k panic=1".into()),
            initrd_path: Some("/wrenn/initrd".into()),
        }),
        Request::PutBootSource(BootSource {
            kernel_image_path: "/wrenn/vmlinux".into(),
            boot_args: None,
            initrd_path: None,
        }),
        Request::PutDrive(Drive {
            drive_id: "rootfs".into(),
            is_root_device: true,
            path_on_host: "/wrenn/rootfs.raw".into(),
            is_read_only: false,
            partuuid: Some("0eaa91a0-01".into()),
            cache_type: Some(CacheType::Writeback),
            io_engine: Some(IoEngine::Async),
            rate_limiter: Some(limiter()),
        }),
        Request::PutDrive(Drive {
            drive_id: "data_1".into(),
            is_root_device: false,
            path_on_host: "/wrenn/data.raw".into(),
            is_read_only: true,
            partuuid: None,
            cache_type: Some(CacheType::Unsafe),
            io_engine: Some(IoEngine::Sync),
            rate_limiter: None,
        }),
        Request::PatchDrive(DriveUpdate {
            drive_id: "rootfs".into(),
            path_on_host: Some("/wrenn/other.raw".into()),
            rate_limiter: Some(limiter()),
        }),
        Request::PatchDrive(DriveUpdate {
            drive_id: "rootfs".into(),
            path_on_host: None,
            rate_limiter: None,
        }),
        Request::PutMachineConfig(MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 1024,
            smt: Some(false),
            track_dirty_pages: true,
            huge_pages: Some(HugePages::TwoMiB),
        }),
        Request::PutMachineConfig(MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 512,
            smt: None,
            track_dirty_pages: false,
            huge_pages: Some(HugePages::None),
        }),
        Request::PutNetworkInterface(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("02:FC:00:00:00:05".into()),
            mtu: Some(1500),
            rx_rate_limiter: Some(limiter()),
            tx_rate_limiter: Some(limiter()),
        }),
        Request::PutNetworkInterface(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }),
        Request::PatchNetworkInterface(NetworkInterfaceUpdate {
            iface_id: "eth0".into(),
            rx_rate_limiter: Some(limiter()),
            tx_rate_limiter: Some(RateLimiter::default()),
        }),
        Request::PutMmdsConfig(MmdsConfig {
            network_interfaces: vec!["eth0".into()],
            version: Some(MmdsVersion::V2),
            ipv4_address: Some("169.254.169.254".into()),
            imds_compat: Some(false),
        }),
        Request::PutMmdsConfig(MmdsConfig {
            network_interfaces: vec!["eth0".into()],
            version: Some(MmdsVersion::V1),
            ipv4_address: None,
            imds_compat: None,
        }),
        Request::PutMmds(json!({"instanceID": "sbx", "envID": "base", "nested": {"a": [1, 2]}})),
        Request::PatchMmds(json!({"instanceID": "sbx-2"})),
        Request::PutEntropy(EntropyDevice {
            rate_limiter: Some(limiter()),
        }),
        Request::PutEntropy(EntropyDevice::default()),
        Request::PutLogger(Logger {
            log_path: Some("/wrenn/vmm.log".into()),
            level: Some(LogLevel::Warning),
            show_level: Some(true),
            show_log_origin: Some(false),
            module: Some("api_server".into()),
        }),
        Request::PutLogger(Logger::default()),
        Request::PutMetrics(Metrics {
            metrics_path: "/wrenn/metrics.fifo".into(),
        }),
        Request::PutSerial(SerialDevice {
            serial_out_path: "/wrenn/console.log".into(),
            rate_limiter: limiter().bandwidth,
        }),
        Request::PutSerial(SerialDevice {
            serial_out_path: "/wrenn/console.log".into(),
            rate_limiter: None,
        }),
        Request::PutBalloon(Balloon {
            amount_mib: 64,
            deflate_on_oom: true,
            stats_polling_interval_s: Some(5),
            free_page_reporting: Some(true),
        }),
        Request::PutBalloon(Balloon {
            amount_mib: 0,
            deflate_on_oom: false,
            stats_polling_interval_s: None,
            free_page_reporting: None,
        }),
        Request::PatchBalloon(BalloonUpdate { amount_mib: 128 }),
        Request::PatchVm(VmState::Paused),
        Request::PatchVm(VmState::Resumed),
        Request::CreateSnapshot(SnapshotCreate {
            snapshot_type: SnapshotType::Full,
            snapshot_path: "/wrenn/vm.snap".into(),
            mem_file_path: "/wrenn/vm.mem".into(),
        }),
        Request::CreateSnapshot(SnapshotCreate {
            snapshot_type: SnapshotType::Diff,
            snapshot_path: "/wrenn/vm.snap".into(),
            mem_file_path: "/wrenn/vm.diff".into(),
        }),
        Request::LoadSnapshot(SnapshotLoad {
            snapshot_path: "/wrenn/vm.snap".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::Uffd,
                backend_path: "/wrenn/uffd.sock".into(),
            },
            track_dirty_pages: true,
            resume_vm: false,
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap1".into(),
            }],
            clock_realtime: Some(true),
        }),
        Request::LoadSnapshot(SnapshotLoad {
            snapshot_path: "/wrenn/vm.snap".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/wrenn/vm.mem".into(),
            },
            track_dirty_pages: false,
            resume_vm: true,
            network_overrides: Vec::new(),
            clock_realtime: None,
        }),
    ];
    for action in [
        Action::InstanceStart,
        Action::FlushMetrics,
        Action::SendCtrlAltDel,
    ] {
        requests.push(Request::Action(action));
    }
    requests
}

/// The Swagger file as JSON.
fn swagger() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/contract/firecracker-swagger-1.16.1.yaml"
    );
    let text = std::fs::read_to_string(path).expect("reading the Swagger file");
    let documents = yaml_rust2::YamlLoader::load_from_str(&text).expect("parsing the Swagger file");
    json_of(&documents[0])
}

fn json_of(yaml: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match yaml {
        Yaml::Real(text) => json!(text.parse::<f64>().expect("a YAML real")),
        Yaml::Integer(number) => json!(number),
        Yaml::String(text) => json!(text),
        Yaml::Boolean(flag) => json!(flag),
        Yaml::Array(items) => Value::Array(items.iter().map(json_of).collect()),
        Yaml::Hash(entries) => {
            let mut object = serde_json::Map::new();
            for (key, value) in entries {
                let key = match key {
                    Yaml::String(text) => text.clone(),
                    Yaml::Integer(number) => number.to_string(),
                    other => panic!("unexpected YAML key {other:?}"),
                };
                object.insert(key, json_of(value));
            }
            Value::Object(object)
        }
        Yaml::Null => Value::Null,
        other => panic!("unexpected YAML node {other:?}"),
    }
}

/// The operation documented for `method` on the path template matching `path`, with the
/// values of its path parameters.
fn operation<'a>(
    spec: &'a Value,
    method: &str,
    path: &str,
) -> Result<(&'a Value, BTreeMap<String, String>), String> {
    let segments: Vec<&str> = path.split('/').collect();
    for (template, item) in spec["paths"].as_object().expect("paths") {
        let parts: Vec<&str> = template.split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut parameters = BTreeMap::new();
        let matched = parts.iter().zip(&segments).all(|(part, segment)| {
            if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                parameters.insert(name.to_string(), segment.to_string());
                !segment.is_empty()
            } else {
                part == segment
            }
        });
        if !matched {
            continue;
        }
        return match item.get(method.to_ascii_lowercase()) {
            Some(operation) => Ok((operation, parameters)),
            None => Err(format!("{method} is not documented on {template}")),
        };
    }
    Err(format!("no documented path matches {path}"))
}

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/definitions/")
                .expect("a local reference");
            let target = &spec["definitions"][name];
            assert!(!target.is_null(), "{reference} is not defined");
            resolve(spec, target)
        }
        None => schema,
    }
}

/// Checks `value` against `schema`, adding what does not match to `problems`.
fn validate(spec: &Value, value: &Value, schema: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    let kind = schema
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("object");
    match kind {
        "object" => {
            let Some(object) = value.as_object() else {
                problems.push(format!("{at}: {value} is not an object"));
                return;
            };
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().expect("a required field's name");
                if !object.contains_key(name) {
                    problems.push(format!("{at}: the required field {name} is missing"));
                }
            }
            let free = schema.get("additionalProperties") == Some(&json!(true));
            for (name, field) in object {
                match schema.get("properties").and_then(|p| p.get(name)) {
                    Some(field_schema) => {
                        validate(spec, field, field_schema, &format!("{at}.{name}"), problems)
                    }
                    None if free => {}
                    None => problems.push(format!("{at}: the field {name} is not documented")),
                }
            }
        }
        "string" => {
            if !value.is_string() {
                problems.push(format!("{at}: {value} is not a string"));
            }
        }
        "boolean" => {
            if !value.is_boolean() {
                problems.push(format!("{at}: {value} is not a boolean"));
            }
        }
        "integer" => match value.as_i64() {
            None => problems.push(format!("{at}: {value} is not an integer")),
            Some(number) => {
                if let Some(minimum) = schema.get("minimum").and_then(Value::as_i64)
                    && number < minimum
                {
                    problems.push(format!("{at}: {number} is below the minimum {minimum}"));
                }
                if let Some(maximum) = schema.get("maximum").and_then(Value::as_i64)
                    && number > maximum
                {
                    problems.push(format!("{at}: {number} is above the maximum {maximum}"));
                }
                if schema.get("format") == Some(&json!("int32")) && i32::try_from(number).is_err() {
                    problems.push(format!("{at}: {number} does not fit an int32"));
                }
            }
        },
        "array" => match value.as_array() {
            None => problems.push(format!("{at}: {value} is not an array")),
            Some(items) => {
                for (index, item) in items.iter().enumerate() {
                    validate(
                        spec,
                        item,
                        &schema["items"],
                        &format!("{at}[{index}]"),
                        problems,
                    );
                }
            }
        },
        other => problems.push(format!("{at}: the schema's type {other} is not checked")),
    }
}

/// What does not match the contract in `request`.
fn problems_of(spec: &Value, method: &str, path: &str, body: Option<&Value>) -> Vec<String> {
    let (operation, path_values) = match operation(spec, method, path) {
        Ok(found) => found,
        Err(problem) => return vec![problem],
    };
    let mut problems = Vec::new();
    let parameters = operation["parameters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let body_parameter = parameters.iter().find(|p| p["in"] == "body");
    for parameter in parameters.iter().filter(|p| p["in"] == "path") {
        let name = parameter["name"].as_str().expect("a path parameter's name");
        let Some(value) = path_values.get(name) else {
            problems.push(format!("the path parameter {name} is missing"));
            continue;
        };
        // Where the body repeats the id (drive_id, iface_id), both must be the same.
        if let Some(in_body) = body.and_then(|b| b.get(name)).and_then(Value::as_str)
            && in_body != value
        {
            problems.push(format!("the path says {name} {value}, the body {in_body}"));
        }
    }
    match (body_parameter, body) {
        (None, Some(_)) => problems.push(format!("{method} {path} takes no body")),
        (Some(parameter), None) if parameter["required"] == json!(true) => {
            problems.push(format!("{method} {path} needs a body"))
        }
        (Some(parameter), Some(body)) => {
            validate(spec, body, &parameter["schema"], "body", &mut problems)
        }
        _ => {}
    }
    problems
}

#[test]
fn every_request_the_client_sends_is_documented() {
    let spec = swagger();
    assert_eq!(spec["info"]["version"], "1.16.1");
    let mut covered = [false; VARIANTS];
    for request in examples() {
        covered[variant(&request)] = true;
        let body = request.body();
        let problems = problems_of(
            &spec,
            request.method().as_str(),
            &request.path(),
            body.as_ref(),
        );
        assert!(
            problems.is_empty(),
            "{} drifts from Firecracker's API: {problems:#?}\nbody: {body:?}",
            request.describe()
        );
    }
    let missing: Vec<usize> = (0..VARIANTS).filter(|&i| !covered[i]).collect();
    assert!(
        missing.is_empty(),
        "request kinds without an example: {missing:?}"
    );
}

#[test]
fn the_answers_the_client_reads_are_the_documented_ones() {
    let spec = swagger();
    let answers = [
        (
            "/",
            serde_json::to_value(InstanceInfo {
                app_name: "Firecracker".into(),
                id: "anonymous-instance".into(),
                state: "Paused".into(),
                vmm_version: "1.16.1".into(),
            })
            .unwrap(),
        ),
        (
            "/version",
            serde_json::to_value(FirecrackerVersion {
                firecracker_version: "1.16.1".into(),
            })
            .unwrap(),
        ),
        (
            "/machine-config",
            serde_json::to_value(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 512,
                smt: Some(false),
                track_dirty_pages: false,
                huge_pages: Some(HugePages::None),
            })
            .unwrap(),
        ),
    ];
    for (path, answer) in answers {
        let (operation, _) = operation(&spec, "GET", path).unwrap();
        let schema = &operation["responses"]["200"]["schema"];
        let mut problems = Vec::new();
        validate(&spec, &answer, schema, "answer", &mut problems);
        assert!(problems.is_empty(), "GET {path}: {problems:#?}");
    }
    // Every state Firecracker reports is one the client knows.
    let states = &spec["definitions"]["InstanceInfo"]["properties"]["state"]["enum"];
    assert_eq!(states, &json!(["Not started", "Running", "Paused"]));
}

/// The validator itself catches drift: an unknown field, a missing required one, a wrong type,
/// a value outside an enum or bounds, a wrong path or method, a body where none is taken.
#[test]
fn the_contract_check_catches_drift() {
    let spec = swagger();
    let drifted = [
        ("PUT", "/boot-source", Some(json!({"kernel_path": "/k"}))),
        ("PUT", "/boot-source", Some(json!({"kernel_image_path": 7}))),
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 64, "mem_size_mib": 1})),
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": "1"})),
        ),
        ("PATCH", "/vm", Some(json!({"state": "Stopped"}))),
        (
            "PUT",
            "/snapshot/create",
            Some(json!({"snapshot_path": "/s"})),
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(
                json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "Mmap", "backend_path": "/m"}}),
            ),
        ),
        (
            "PUT",
            "/drives/rootfs",
            Some(json!({"drive_id": "other", "is_root_device": true})),
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(json!({"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 20})),
        ),
        (
            "POST",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
        ),
        ("PUT", "/snapshot/restore", Some(json!({}))),
        ("GET", "/version", Some(json!({}))),
        ("PUT", "/actions", None),
    ];
    for (method, path, body) in drifted {
        let problems = problems_of(&spec, method, path, body.as_ref());
        assert!(
            !problems.is_empty(),
            "{method} {path} {body:?} passed the contract check"
        );
    }
}

mod transport {
    //! The client's HTTP over a Unix socket, against a server answering as Firecracker does.

    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;

    type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

    async fn answer(
        request: hyper::Request<hyper::body::Incoming>,
        seen: Seen,
    ) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
        let method = request.method().to_string();
        let path = request.uri().path().to_string();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        seen.lock()
            .unwrap()
            .push((method.clone(), path.clone(), body.clone()));
        let (status, text) = match (method.as_str(), path.as_str()) {
            ("GET", "/") => (
                200,
                r#"{"app_name":"Firecracker","id":"anonymous-instance","state":"Not started","vmm_version":"1.16.1"}"#.to_string(),
            ),
            ("PUT", "/snapshot/load") => (
                400,
                r#"{"fault_message":"Load snapshot error: Cannot load snapshot on a started microVM."}"#
                    .to_string(),
            ),
            ("GET", "/mmds") => (200, r#"{"instanceID":"sbx"}"#.to_string()),
            _ => (204, String::new()),
        };
        Ok(hyper::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(text)))
            .unwrap())
    }

    #[tokio::test]
    async fn requests_and_answers_cross_the_socket() {
        let directory = tempfile::tempdir().unwrap();
        let socket = directory.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let seen: Seen = Arc::default();
        let server_seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let seen = server_seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(request, seen.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        let client = FirecrackerClient::new(&socket);
        let info = client
            .wait_ready(std::time::Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(info.state, "Not started");
        client
            .apply(Request::PatchVm(VmState::Paused))
            .await
            .unwrap();
        assert_eq!(client.mmds().await.unwrap(), json!({"instanceID": "sbx"}));
        let refused = client
            .apply(Request::LoadSnapshot(SnapshotLoad {
                snapshot_path: "/s".into(),
                mem_backend: MemoryBackend {
                    backend_type: MemoryBackendType::Uffd,
                    backend_path: "/u".into(),
                },
                track_dirty_pages: false,
                resume_vm: false,
                network_overrides: Vec::new(),
                clock_realtime: None,
            }))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("Cannot load snapshot on a started microVM")
                && refused.contains("400"),
            "{refused}"
        );
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.contains(&("PATCH".into(), "/vm".into(), r#"{"state":"Paused"}"#.into())),
            "{seen:?}"
        );
        assert!(
            seen.iter()
                .any(|(method, path, body)| method == "GET" && path == "/mmds" && body.is_empty())
        );

        // A socket nobody listens on is an error naming it, not a hang.
        let gone = FirecrackerClient::new(&directory.path().join("none.sock"));
        let error = gone.describe_instance().await.unwrap_err().to_string();
        assert!(error.contains("none.sock"), "{error}");
    }
}
