//! The `filesystem.Filesystem` service: maps Connect messages to `fs` and back.

use wrenn_connect::{Code, ConnectError};
use wrenn_proto::filesystem as pb;

use super::{Call, Responses, with_keepalive};
use crate::fs::watch::{FsEvent, WatchError, WatchSpec};
use crate::fs::{self, FsError};

/// The messages E2B's envd gives a call's failures, each followed by the path: a missing path
/// (quoted), an existing one, and one that is not a directory. `None` keeps the error's own.
#[derive(Debug, Clone, Copy)]
struct Wording {
    not_found: Option<&'static str>,
    exists: Option<&'static str>,
    not_a_directory: Option<&'static str>,
}

impl Wording {
    /// Every failure keeps its own message.
    const OWN: Wording = Wording {
        not_found: None,
        exists: None,
        not_a_directory: None,
    };

    /// Only a missing path has a message of its own.
    const fn not_found(message: &'static str) -> Wording {
        Wording {
            not_found: Some(message),
            ..Wording::OWN
        }
    }
}

fn fs_error(error: FsError, wording: Wording) -> ConnectError {
    let code = match &error {
        FsError::NotFound(_) => Code::NotFound,
        FsError::AlreadyExists(_) => Code::AlreadyExists,
        FsError::NotADirectory(_) | FsError::IsADirectory(_) => Code::InvalidArgument,
        FsError::PermissionDenied { .. } => Code::PermissionDenied,
        FsError::Io { source, .. } if source.raw_os_error() == Some(libc::ELOOP) => {
            Code::FailedPrecondition
        }
        FsError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            Code::ResourceExhausted
        }
        FsError::Io { .. } => Code::Internal,
    };
    let message = match (&error, wording) {
        (
            FsError::NotFound(path),
            Wording {
                not_found: Some(text),
                ..
            },
        ) => {
            format!("{text}: '{}'", path.display())
        }
        (
            FsError::AlreadyExists(path),
            Wording {
                exists: Some(text), ..
            },
        )
        | (
            FsError::NotADirectory(path),
            Wording {
                not_a_directory: Some(text),
                ..
            },
        ) => {
            format!("{text}: {}", path.display())
        }
        _ => error.to_string(),
    };
    ConnectError::new(code, message)
}

fn watch_error(error: WatchError) -> ConnectError {
    let code = match &error {
        WatchError::NotFound(_) | WatchError::UnknownWatcher(_) => Code::NotFound,
        WatchError::NotADirectory(_) | WatchError::NetworkMount(_) => Code::InvalidArgument,
        WatchError::Inotify { .. }
        | WatchError::RootGone(_)
        | WatchError::NoRandomness(_)
        | WatchError::Overflow
        | WatchError::Ended(_) => Code::Internal,
    };
    ConnectError::new(code, error.to_string())
}

/// Runs blocking filesystem work off the async threads; its failure is worded as `wording`
/// says.
async fn blocking<T: Send + 'static>(
    wording: Wording,
    work: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(move || work().map_err(|error| fs_error(error, wording)))
        .await
        .unwrap_or_else(|error| {
            Err(ConnectError::internal(format!(
                "filesystem task failed: {error}"
            )))
        })
}

/// E2B's wording of the failures of `Stat`, `MakeDir`, `Move` and `ListDir`.
const STAT: Wording = Wording::not_found("file not found");
const MAKE_DIR: Wording = Wording {
    exists: Some("directory already exists"),
    not_a_directory: Some("path already exists but it is not a directory"),
    ..Wording::OWN
};
const MOVE: Wording = Wording::not_found("source file not found");
const LIST_DIR: Wording = Wording {
    not_a_directory: Some("path is not a directory"),
    ..Wording::not_found("path not found")
};

pub(crate) async fn stat(call: Call<pb::StatRequest>) -> Result<pb::StatResponse, ConnectError> {
    let path = call.resolve(&call.request.path)?;
    let entry = blocking(STAT, move || fs::entry_info(&path, &call.envd.accounts)).await?;
    Ok(pb::StatResponse { entry: Some(entry) })
}

pub(crate) async fn make_dir(
    call: Call<pb::MakeDirRequest>,
) -> Result<pb::MakeDirResponse, ConnectError> {
    let path = call.resolve(&call.request.path)?;
    let entry = blocking(MAKE_DIR, move || {
        fs::make_dir(&path, &call.context.user, &call.envd.accounts)
    })
    .await?;
    Ok(pb::MakeDirResponse { entry: Some(entry) })
}

pub(crate) async fn move_entry(
    call: Call<pb::MoveRequest>,
) -> Result<pb::MoveResponse, ConnectError> {
    let source = call.resolve(&call.request.source)?;
    let destination = call.resolve(&call.request.destination)?;
    let entry = blocking(MOVE, move || {
        fs::move_entry(
            &source,
            &destination,
            &call.context.user,
            &call.envd.accounts,
        )
    })
    .await?;
    Ok(pb::MoveResponse { entry: Some(entry) })
}

pub(crate) async fn list_dir(
    call: Call<pb::ListDirRequest>,
) -> Result<pb::ListDirResponse, ConnectError> {
    let path = call.resolve(&call.request.path)?;
    let entries = blocking(LIST_DIR, move || {
        fs::list_dir(
            &path,
            call.request.depth,
            &call.context.user,
            &call.envd.accounts,
        )
    })
    .await?;
    Ok(pb::ListDirResponse { entries })
}

pub(crate) async fn remove(
    call: Call<pb::RemoveRequest>,
) -> Result<pb::RemoveResponse, ConnectError> {
    // An empty path would resolve to the working directory: refuse rather than delete it.
    if call.request.path.trim().is_empty() {
        return Err(ConnectError::invalid_argument("path is required"));
    }
    let path = call.resolve(&call.request.path)?;
    if path == std::path::Path::new("/") {
        return Err(ConnectError::invalid_argument("refusing to remove '/'"));
    }
    blocking(Wording::OWN, move || fs::remove(&path, &call.context.user)).await?;
    Ok(pb::RemoveResponse {})
}

/// The checked [`WatchSpec`] of a `WatchDir` or `CreateWatcher` call (two request types with
/// the same fields).
macro_rules! watch_spec_of {
    ($call:expr) => {
        watch_spec(
            &$call,
            &$call.request.path,
            $call.request.recursive,
            $call.request.include_entry,
            $call.request.allow_network_mounts,
        )
    };
}

fn watch_spec<Req>(
    call: &Call<Req>,
    path: &str,
    recursive: bool,
    include_entry: bool,
    allow_network_mounts: bool,
) -> Result<WatchSpec, ConnectError> {
    let root = call.resolve(path)?;
    let user = &call.context.user;
    match std::fs::metadata(&root) {
        Ok(metadata)
            if !crate::fs::access::allowed(&metadata, user, crate::fs::access::Want::Read) =>
        {
            return Err(ConnectError::new(
                Code::PermissionDenied,
                format!("user '{}' may not access '{}'", user.name, root.display()),
            ));
        }
        _ => {}
    }
    Ok(WatchSpec {
        root,
        recursive,
        include_entry,
        allow_network_mounts,
    })
}

fn event_message(event: FsEvent) -> pb::FilesystemEvent {
    pb::FilesystemEvent {
        name: event.name,
        r#type: event.kind as i32,
        entry: event.entry,
    }
}

pub(crate) async fn watch_dir(
    call: Call<pb::WatchDirRequest>,
) -> Result<impl Responses<pb::WatchDirResponse>, ConnectError> {
    use pb::watch_dir_response::{Event, KeepAlive, StartEvent};
    let spec = watch_spec_of!(call)?;
    let receiver =
        crate::fs::watch::watch(spec, call.envd.accounts.clone()).map_err(watch_error)?;
    let start = pb::WatchDirResponse {
        event: Some(Event::Start(StartEvent {})),
    };
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let item = receiver.recv().await?;
        let message = item
            .map(|event| pb::WatchDirResponse {
                event: Some(Event::Filesystem(event_message(event))),
            })
            .map_err(watch_error);
        Some((message, receiver))
    });
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { Ok(start) }),
        events,
    );
    let stream = super::with_deadline(stream, call.context.deadline);
    Ok(with_keepalive(stream, call.context.keepalive, || {
        pb::WatchDirResponse {
            event: Some(Event::Keepalive(KeepAlive {})),
        }
    }))
}

pub(crate) async fn create_watcher(
    call: Call<pb::CreateWatcherRequest>,
) -> Result<pb::CreateWatcherResponse, ConnectError> {
    let spec = watch_spec_of!(call)?;
    let watcher_id = call
        .envd
        .watchers
        .create(spec, call.envd.accounts.clone())
        .map_err(watch_error)?;
    Ok(pb::CreateWatcherResponse { watcher_id })
}

pub(crate) async fn get_watcher_events(
    call: Call<pb::GetWatcherEventsRequest>,
) -> Result<pb::GetWatcherEventsResponse, ConnectError> {
    let events = call
        .envd
        .watchers
        .take_events(&call.request.watcher_id)
        .map_err(watch_error)?;
    Ok(pb::GetWatcherEventsResponse {
        events: events.into_iter().map(event_message).collect(),
    })
}

pub(crate) async fn remove_watcher(
    call: Call<pb::RemoveWatcherRequest>,
) -> Result<pb::RemoveWatcherResponse, ConnectError> {
    call.envd
        .watchers
        .remove(&call.request.watcher_id)
        .map_err(watch_error)?;
    Ok(pb::RemoveWatcherResponse {})
}
