//! Starting a child process: as the requested user, in its own process group (or session, for a
//! PTY), with pipes or a pseudo-terminal for its standard streams.
//!
//! Everything that must happen between `fork` and `exec` is in one `pre_exec` hook, because
//! the order matters: the session and controlling terminal first, then the supplementary
//! groups, gid and uid (dropping root last), all with async-signal-safe calls only.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use nix::pty::{Winsize, openpty};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};

use crate::users::User;

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub cmd: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub user: User,
    /// Give the process a stdin pipe (otherwise it reads /dev/null). Ignored with a PTY.
    pub stdin: bool,
    pub pty: Option<PtySize>,
    /// Written to `/proc/self/oom_score_adj` in the child when envd may do so.
    pub oom_score_adj: Option<i32>,
    /// The cgroup (directory) the process starts in.
    pub cgroup: Option<PathBuf>,
}

/// The host side of a started process's standard streams.
#[derive(Debug)]
pub enum ChildIo {
    Pipes {
        stdin: Option<ChildStdin>,
        stdout: ChildStdout,
        stderr: ChildStderr,
    },
    Pty(PtyMaster),
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("envd runs as uid {envd_uid}, not root, so it cannot run processes as user '{user}'")]
    NotRoot { envd_uid: u32, user: String },
    #[error("failed to open a pseudo-terminal: {0}")]
    Pty(#[source] io::Error),
    #[error("failed to start '{cmd}': {source}")]
    Exec {
        cmd: String,
        #[source]
        source: io::Error,
    },
}

/// Starts the process.
pub fn spawn(spec: &SpawnSpec) -> Result<(Child, ChildIo), SpawnError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let envd_uid = unsafe { libc::geteuid() };
    let switch_user = envd_uid == 0;
    if !switch_user && spec.user.uid != envd_uid {
        return Err(SpawnError::NotRoot {
            envd_uid,
            user: spec.user.name.clone(),
        });
    }

    let mut command = std::process::Command::new(&spec.cmd);
    command
        .args(&spec.args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.cwd);

    let pty = match spec.pty {
        Some(size) => Some(open_pty(size).map_err(SpawnError::Pty)?),
        None => None,
    };
    match &pty {
        Some((_, slave)) => {
            let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(SpawnError::Pty);
            command
                .stdin(stdio(slave)?)
                .stdout(stdio(slave)?)
                .stderr(stdio(slave)?);
        }
        None => {
            command
                .stdin(if spec.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }

    // Opened before the fork: the child only writes "0" (itself) to it.
    let cgroup_procs = spec.cgroup.as_ref().and_then(|dir| {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join("cgroup.procs"))
            .map_err(|error| tracing::warn!(cgroup = %dir.display(), %error, "cannot place the process in its cgroup"))
            .ok()
    });
    let cgroup_fd = cgroup_procs.as_ref().map(|file| file.as_raw_fd());
    let uses_pty = pty.is_some();
    let groups: Vec<libc::gid_t> = spec.user.groups.clone();
    let (uid, gid) = (spec.user.uid, spec.user.gid);
    let oom = spec
        .oom_score_adj
        .filter(|_| switch_user)
        .map(|score| format!("{score}\n"));
    // SAFETY: the hook runs in the child between fork and exec and only makes async-signal-safe
    // system calls (setsid, setpgid, ioctl, open, write, close, setgroups, setgid, setuid) on data
    // and descriptors prepared before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if uses_pty {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // stdin is the PTY's slave: make it this new session's controlling terminal.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::setpgid(0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = cgroup_fd {
                // Best effort: a process outside its cgroup still runs.
                libc::write(fd, c"0".as_ptr().cast(), 1);
            }
            if let Some(score) = &oom {
                let fd = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if fd >= 0 {
                    libc::write(fd, score.as_ptr().cast(), score.len());
                    libc::close(fd);
                }
            }
            if switch_user
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| SpawnError::Exec {
            cmd: spec.cmd.clone(),
            source,
        })?;

    let io = match pty {
        // The slave is closed here, in envd; the child keeps its copies.
        Some((master, _slave)) => ChildIo::Pty(PtyMaster::new(master).map_err(SpawnError::Pty)?),
        None => ChildIo::Pipes {
            stdin: child.stdin.take(),
            stdout: child.stdout.take().expect("stdout is piped"),
            stderr: child.stderr.take().expect("stderr is piped"),
        },
    };
    Ok((child, io))
}

fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let winsize = Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&winsize), None).map_err(io::Error::from)?;
    // openpty's descriptors are inheritable: keep them out of every other child.
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(io::Error::from)?;
    }
    Ok((pty.master, pty.slave))
}

/// The master side of a pseudo-terminal, non-blocking and registered with tokio.
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags =
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        // SAFETY: `fd` is an open descriptor owned by the AsyncFd from here on, so it stays open
        // and refers to the same PTY master for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(PtyMaster { fd })
    }

    /// A reader of the terminal's output.
    pub fn reader(self: &Arc<Self>) -> PtyReader {
        PtyReader(self.clone())
    }

    /// Writes all of `data` to the terminal (the process's input).
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(written)) => data = &data[written..],
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Sets the terminal size (the kernel sends SIGWINCH to the foreground process group).
    pub fn resize(&self, size: PtySize) -> io::Result<()> {
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
        let result =
            unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// The output side of a [`PtyMaster`]; reaches end of file once every slave descriptor is closed
/// (Linux reports that as EIO on the master).
#[derive(Debug)]
pub struct PtyReader(Arc<PtyMaster>);

impl AsyncRead for PtyReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) if error.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => continue,
            }
        }
    }
}
