//! The `process.Process` service: maps Connect messages to the process manager and back.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use http::HeaderMap;
use wrenn_connect::{Code, ConnectError, server};
use wrenn_proto::process as pb;
use wrenn_proto::process::process_event::{
    DataEvent, EndEvent, Event, KeepAlive, StartEvent, data_event,
};

use super::{Call, CallContext, RequestStream, Responses, with_deadline, with_keepalive};
use crate::cgroups::Group;
use crate::envs;
use crate::process::spawn::SpawnError;
use crate::process::{
    ManagedProcess, ProcessConfig, ProcessError, ProcessEvent, PtySize, Selector, SpawnSpec,
    Subscription,
};
use crate::state::{Envd, is_dir};

/// The OOM score of user processes: they go before envd when memory runs out.
const USER_PROCESS_OOM_SCORE: i32 = 100;
/// The terminal size when a PTY request gives none.
const DEFAULT_PTY_SIZE: PtySize = PtySize { cols: 80, rows: 24 };

pub(crate) fn process_error(error: ProcessError) -> ConnectError {
    let code = match &error {
        ProcessError::PidNotFound(_) | ProcessError::TagNotFound(_) => Code::NotFound,
        ProcessError::Spawn(SpawnError::NotRoot { .. }) => Code::PermissionDenied,
        ProcessError::Spawn(SpawnError::Pty(_)) => Code::InvalidArgument,
        ProcessError::Spawn(SpawnError::Exec { source, .. }) => match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                Code::InvalidArgument
            }
            _ => Code::Internal,
        },
        // E2B's codes, which clients may match on.
        ProcessError::IsPty => Code::Unknown,
        ProcessError::StdinClosed
        | ProcessError::NotPty
        | ProcessError::InputToPty
        | ProcessError::Write(_)
        | ProcessError::Resize(_)
        | ProcessError::Signal { .. } => Code::Internal,
    };
    ConnectError::new(code, error.to_string())
}

fn selector(selector: Option<pb::ProcessSelector>) -> Result<Selector, ConnectError> {
    match selector.and_then(|s| s.selector) {
        Some(pb::process_selector::Selector::Pid(pid)) => Ok(Selector::Pid(pid)),
        Some(pb::process_selector::Selector::Tag(tag)) => Ok(Selector::Tag(tag)),
        None => Err(ConnectError::new(
            Code::Unimplemented,
            "invalid input type: a process selector (pid or tag) is required",
        )),
    }
}

fn pty_size(pty: &pb::Pty) -> PtySize {
    match pty.size {
        Some(size) if size.cols > 0 && size.rows > 0 => PtySize {
            cols: u16::try_from(size.cols).unwrap_or(u16::MAX),
            rows: u16::try_from(size.rows).unwrap_or(u16::MAX),
        },
        _ => DEFAULT_PTY_SIZE,
    }
}

fn event(event: Event) -> pb::ProcessEvent {
    pb::ProcessEvent { event: Some(event) }
}

/// A process's events as the wire sees them: `start`, then output, then exactly one `end`.
fn process_events(
    pid: u32,
    subscription: Subscription,
) -> impl Stream<Item = Result<pb::ProcessEvent, ConnectError>> {
    enum Phase {
        Start(Subscription),
        Running(Subscription),
        Done,
    }
    futures_util::stream::unfold(Phase::Start(subscription), move |phase| async move {
        match phase {
            Phase::Start(subscription) => Some((
                Ok(event(Event::Start(StartEvent { pid }))),
                Phase::Running(subscription),
            )),
            Phase::Running(mut subscription) => {
                let output = |o| Ok(event(Event::Data(DataEvent { output: Some(o) })));
                let item = match subscription.next().await? {
                    ProcessEvent::Stdout(bytes) => {
                        output(data_event::Output::Stdout(bytes.to_vec()))
                    }
                    ProcessEvent::Stderr(bytes) => {
                        output(data_event::Output::Stderr(bytes.to_vec()))
                    }
                    ProcessEvent::Pty(bytes) => output(data_event::Output::Pty(bytes.to_vec())),
                    ProcessEvent::End(report) => {
                        let end = EndEvent {
                            exit_code: report.exit_code,
                            exited: report.exited,
                            status: report.status,
                            error: report.error,
                        };
                        return Some((Ok(event(Event::End(end))), Phase::Done));
                    }
                    ProcessEvent::Overflowed => {
                        let error = ConnectError::new(
                            Code::ResourceExhausted,
                            "the client read the output too slowly and fell too far behind; the process goes on",
                        );
                        return Some((Err(error), Phase::Done));
                    }
                };
                Some((item, Phase::Running(subscription)))
            }
            Phase::Done => None,
        }
    })
}

/// A process's events as a call's response stream (`wrap` makes the response message): ended
/// by the call's deadline, with keepalives on silence.
fn event_responses<R: Send + 'static>(
    pid: u32,
    subscription: Subscription,
    context: &CallContext,
    wrap: fn(pb::ProcessEvent) -> R,
) -> impl Responses<R> + use<R> {
    let events = with_deadline(process_events(pid, subscription), context.deadline);
    let responses = futures_util::StreamExt::map(events, move |item| item.map(wrap));
    with_keepalive(responses, context.keepalive, move || {
        wrap(event(Event::Keepalive(KeepAlive {})))
    })
}

pub(crate) async fn start(
    mut call: Call<pb::StartRequest>,
) -> Result<impl Responses<pb::StartResponse>, ConnectError> {
    let config = call
        .request
        .process
        .take()
        .ok_or_else(|| ConnectError::invalid_argument("process config is required"))?;
    if config.cmd.is_empty() {
        return Err(ConnectError::invalid_argument("process cmd is empty"));
    }
    let cwd = match config.cwd.as_deref() {
        Some(cwd) => call.resolve(cwd)?,
        None => call.envd.default_cwd(&call.context.user),
    };
    let Call {
        envd,
        request,
        context,
    } = call;
    if !is_dir(&cwd) {
        return Err(ConnectError::invalid_argument(format!(
            "cwd '{}' does not exist",
            cwd.display()
        )));
    }
    let spec = SpawnSpec {
        cmd: config.cmd.clone(),
        args: config.args.clone(),
        env: envs::compose(
            envd.path_env(),
            &context.user,
            &envd.sandbox_env(),
            &config.envs,
        ),
        cwd,
        user: context.user.clone(),
        stdin: request.stdin.unwrap_or(true),
        pty: request.pty.as_ref().map(pty_size),
        oom_score_adj: Some(USER_PROCESS_OOM_SCORE),
        cgroup: envd.cgroups.as_ref().map(|cgroups| {
            let group = if request.pty.is_some() {
                Group::Ptys
            } else {
                Group::User
            };
            cgroups.path(group)
        }),
    };
    let recorded = ProcessConfig {
        cmd: config.cmd,
        args: config.args,
        envs: config.envs,
        cwd: config.cwd,
    };
    let (process, subscription) = envd
        .processes
        .start(&spec, request.tag, recorded)
        .map_err(process_error)?;
    // Its command, not its arguments or environment (which may carry secrets).
    tracing::info!(
        pid = process.pid,
        cmd = %spec.cmd,
        user = %spec.user.name,
        "process started"
    );

    // Connect-Timeout-Ms on Start is the process's lifetime, whether or not the client stays.
    if let Some(deadline) = context.deadline {
        let process = process.clone();
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            if process.is_running() {
                tracing::info!(
                    pid = process.pid,
                    ?deadline,
                    "killing process: its deadline passed"
                );
                let _ = process.signal(libc::SIGKILL);
            }
        });
    }
    Ok(event_responses(
        process.pid,
        subscription,
        &context,
        |event| pb::StartResponse { event: Some(event) },
    ))
}

pub(crate) async fn connect(
    call: Call<pb::ConnectRequest>,
) -> Result<impl Responses<pb::ConnectResponse>, ConnectError> {
    let process = call
        .envd
        .processes
        .find(&selector(call.request.process)?)
        .map_err(process_error)?;
    // The deadline ends this stream only; the process goes on.
    Ok(event_responses(
        process.pid,
        process.subscribe(),
        &call.context,
        |event| pb::ConnectResponse { event: Some(event) },
    ))
}

pub(crate) async fn list(call: Call<pb::ListRequest>) -> Result<pb::ListResponse, ConnectError> {
    let processes = call
        .envd
        .processes
        .list()
        .into_iter()
        .map(|p| pb::ProcessInfo {
            config: Some(pb::ProcessConfig {
                cmd: p.config.cmd.clone(),
                args: p.config.args.clone(),
                envs: p.config.envs.clone(),
                cwd: p.config.cwd.clone(),
            }),
            pid: p.pid,
            tag: p.tag.clone(),
        })
        .collect();
    Ok(pb::ListResponse { processes })
}

/// The running process `selector` names, or the error saying why there is none.
fn running(envd: &Envd, selector: &Selector) -> Result<Arc<ManagedProcess>, ConnectError> {
    envd.processes.find_running(selector).map_err(process_error)
}

async fn deliver_input(
    envd: &Envd,
    selector: Selector,
    input: Option<pb::ProcessInput>,
) -> Result<(), ConnectError> {
    let process = running(envd, &selector)?;
    match input.and_then(|i| i.input) {
        Some(pb::process_input::Input::Stdin(data)) => process.write_stdin(&data).await,
        Some(pb::process_input::Input::Pty(data)) => process.write_pty(&data).await,
        None => {
            return Err(ConnectError::new(
                Code::Unimplemented,
                "invalid input type: stdin or pty input is required",
            ));
        }
    }
    .map_err(process_error)
}

pub(crate) async fn send_input(
    call: Call<pb::SendInputRequest>,
) -> Result<pb::SendInputResponse, ConnectError> {
    let target = selector(call.request.process)?;
    deliver_input(&call.envd, target, call.request.input).await?;
    Ok(pb::SendInputResponse {})
}

pub(crate) async fn update(
    call: Call<pb::UpdateRequest>,
) -> Result<pb::UpdateResponse, ConnectError> {
    let process = running(&call.envd, &selector(call.request.process)?)?;
    if let Some(pty) = &call.request.pty {
        process.resize(pty_size(pty)).map_err(process_error)?;
    }
    Ok(pb::UpdateResponse {})
}

pub(crate) async fn send_signal(
    call: Call<pb::SendSignalRequest>,
) -> Result<pb::SendSignalResponse, ConnectError> {
    let request = call.request;
    let signal = match pb::Signal::try_from(request.signal) {
        Ok(pb::Signal::Sigkill) => libc::SIGKILL,
        Ok(pb::Signal::Sigterm) => libc::SIGTERM,
        _ => {
            return Err(ConnectError::new(
                Code::Unimplemented,
                format!("invalid signal: {}", request.signal),
            ));
        }
    };
    let process = running(&call.envd, &selector(request.process)?)?;
    process.signal(signal).map_err(process_error)?;
    Ok(pb::SendSignalResponse {})
}

pub(crate) async fn close_stdin(
    call: Call<pb::CloseStdinRequest>,
) -> Result<pb::CloseStdinResponse, ConnectError> {
    let process = running(&call.envd, &selector(call.request.process)?)?;
    process.close_stdin().await.map_err(process_error)?;
    Ok(pb::CloseStdinResponse {})
}

/// Client streaming: a `start` naming the process, then `data` messages with its input.
pub(crate) async fn stream_input(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let codec = match server::streaming_codec(&headers) {
        Ok(codec) => codec,
        Err(response) => return response.into_response(),
    };
    let result = async {
        server::check_no_compression(&headers, true)?;
        let mut messages = RequestStream::new(body, codec, envd.config.max_message_bytes);
        let first: Option<pb::StreamInputRequest> = messages.message().await?;
        let target = match first.and_then(|m| m.event) {
            Some(pb::stream_input_request::Event::Start(start)) => selector(start.process)?,
            _ => {
                return Err(ConnectError::invalid_argument(
                    "the first StreamInput message must be start",
                ));
            }
        };
        running(&envd, &target)?;
        while let Some(message) = messages.message::<pb::StreamInputRequest>().await? {
            match message.event {
                Some(pb::stream_input_request::Event::Data(data)) => {
                    deliver_input(&envd, target.clone(), data.input).await?;
                }
                Some(pb::stream_input_request::Event::Keepalive(_)) => {}
                Some(pb::stream_input_request::Event::Start(_)) => {
                    return Err(ConnectError::invalid_argument(
                        "StreamInput may start only once",
                    ));
                }
                None => return Err(ConnectError::invalid_argument("empty StreamInput message")),
            }
        }
        Ok(pb::StreamInputResponse {})
    }
    .await;
    let single = futures_util::stream::once(async move { result });
    server::streaming_response(codec, single).into_response()
}
