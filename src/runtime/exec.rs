//! `prefab runtime exec`: any command-line program as a prefab. A TOML
//! manifest declares the functions, their typed parameters and the command
//! line of each; parameters are templated into the arguments (never through
//! a shell), secrets become environment variables, output lines become log
//! and progress events, and cancellation sends SIGTERM to the program's
//! process group, then SIGKILL after a grace period.
//!
//! Lines a program prints on standard output that start with
//! `::progress <fraction> [message]` become progress events, and
//! `::output <name> <value>` sets a returned value (JSON, or else a string).

use std::{
    collections::VecDeque,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
};

use super::{InputReader, Invocation, Outputs, Prefab, PrefabError};
use crate::{
    manifest::{ExecSpec, FunctionSpec, Manifest, ParamKind},
    proto::{self, LogStream},
    server::BoxError,
    workspace::{RelPath, access, open_regular},
};

/// Time between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Longest output line kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 16 << 10;
/// Standard error lines quoted when a program fails.
const STDERR_TAIL: usize = 20;
/// How long to wait before looking again whether a program has read all
/// of a streaming input from its named pipe, or opened it, at first and at
/// most.
const DRAIN_WAIT: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(20));

/// A prefab defined by an exec manifest.
#[derive(Debug, Clone)]
pub struct ExecPrefab {
    manifest: Manifest,
}

impl ExecPrefab {
    /// Reads and checks a manifest file.
    pub async fn load(path: &Path) -> Result<Self, BoxError> {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("cannot read manifest {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("manifest {}: {e}", path.display()).into())
    }

    /// Parses and checks a manifest.
    pub fn parse(text: &str) -> Result<Self, String> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| e.to_string())?;
        manifest.validate().map_err(|e| e.to_string())?;
        for f in &manifest.functions {
            check_function(f)?;
        }
        Ok(Self { manifest })
    }

    /// The prefab id.
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// The prefab version.
    pub fn version(&self) -> &str {
        &self.manifest.version
    }
}

fn check_function(f: &FunctionSpec) -> Result<(), String> {
    let exec = f
        .exec
        .as_ref()
        .ok_or_else(|| format!("function {} has no [function.exec] table", f.name))?;
    if exec
        .command
        .first()
        .is_none_or(|p| p.is_empty() || p.contains(['{', '}']))
    {
        return Err(format!(
            "function {}: exec.command needs a fixed program name as its first element",
            f.name
        ));
    }
    for arg in &exec.command {
        for name in placeholders(arg)? {
            if f.parameter(&name).is_none() {
                return Err(format!(
                    "function {}: {{{name}}} in {arg:?} is not a parameter",
                    f.name
                ));
            }
        }
    }
    if let Some(out) = &exec.stdout
        && f.parameter(out).is_none_or(|p| p.kind != ParamKind::OutputFile)
    {
        return Err(format!(
            "function {}: exec.stdout {out:?} is not an OutputFile parameter",
            f.name
        ));
    }
    if let Some(input) = &exec.stdin
        && f.parameter(input).is_none_or(|p| p.kind != ParamKind::InputFile)
    {
        return Err(format!(
            "function {}: exec.stdin {input:?} is not an InputFile parameter",
            f.name
        ));
    }
    // A streaming input is read once, front to back: on standard input, or
    // through the one argument its path is in (a named pipe then).
    for p in f.parameters.iter().filter(|p| p.streaming) {
        let in_command = exec
            .command
            .iter()
            .map(|arg| placeholders(arg).map_or(0, |names| names.iter().filter(|n| **n == p.name).count()))
            .sum::<usize>();
        let on_stdin = exec.stdin.as_ref() == Some(&p.name);
        match (on_stdin, in_command) {
            (true, 0) | (false, 1) => {}
            (false, 0) => {
                return Err(format!(
                    "function {}: streaming input {:?} is read on standard input (exec.stdin = {:?}) \
                     or through its path in the command ({{{}}}), and neither names it",
                    f.name, p.name, p.name, p.name
                ));
            }
            _ => {
                return Err(format!(
                    "function {}: streaming input {:?} is read once, front to back: \
                     on standard input or through its path once in the command, not both nor twice",
                    f.name, p.name
                ));
            }
        }
    }
    Ok(())
}

/// The parameter names a template argument refers to.
fn placeholders(arg: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    render(arg, &mut |name| {
        names.push(name.to_owned());
        Ok(Some(String::new()))
    })?;
    Ok(names)
}

/// Expands `{name}` in `arg` through `value`; `None` from `value` (an absent
/// optional parameter) drops the whole argument.
fn render(
    arg: &str,
    value: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
) -> Result<Option<String>, String> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
        } else if tail.starts_with('}') {
            return Err(format!("unmatched '}}' in {arg:?}; write '}}}}' for a brace"));
        } else {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {arg:?}"))?;
            match value(&tail[1..end])? {
                Some(v) => out.push_str(&v),
                None => return Ok(None),
            }
            rest = &tail[end + 1..];
        }
    }
    out.push_str(rest);
    Ok(Some(out))
}

/// The text a parameter's value takes on a command line.
fn arg_text(call: &Invocation, spec: &FunctionSpec, name: &str) -> Result<Option<String>, String> {
    if let Some(path) = call.files().get(name) {
        return Ok(Some(path.to_string_lossy().into_owned()));
    }
    let is_file = spec
        .parameter(name)
        .is_some_and(|p| matches!(p.kind, ParamKind::InputFile | ParamKind::OutputFile));
    Ok(match call.arg(name) {
        None | Some(Value::Null) => None,
        Some(_) if is_file => None,
        Some(Value::String(s)) => Some(s.clone()),
        // Whole numbers arrive as integers (`proto::value_to_json`): `6`.
        Some(v) => Some(v.to_string()),
    })
}

impl Prefab for ExecPrefab {
    fn manifest(&self) -> Manifest {
        self.manifest.clone()
    }

    async fn invoke(&self, call: Invocation) -> Result<Outputs, PrefabError> {
        let spec = self
            .manifest
            .function(call.function())
            .ok_or_else(|| PrefabError::InvalidArgument(format!("no function {}", call.function())))?;
        let exec = spec.exec.as_ref().expect("load checked every function has exec");
        // The streaming inputs this call has, each with where the program
        // reads it.
        let mut pipes = NamedPipes::default();
        let mut streamed = Vec::new();
        for p in spec.parameters.iter().filter(|p| p.streaming) {
            let Some(path) = call.files().get(&p.name) else {
                continue;
            };
            let sink = if exec.stdin.as_ref() == Some(&p.name) {
                Sink::Stdin
            } else {
                Sink::Pipe(pipes.create(&p.name, path).await?)
            };
            let reader = call.open_input(&p.name).await?;
            streamed.push(Streamed {
                name: p.name.clone(),
                reader,
                sink,
            });
        }
        let mut argv = Vec::with_capacity(exec.command.len());
        for arg in &exec.command {
            let rendered = render(arg, &mut |name| match pipes.path(name) {
                Some(pipe) => Ok(Some(pipe.to_string_lossy().into_owned())),
                None => arg_text(&call, spec, name),
            })
            .map_err(PrefabError::InvalidArgument)?;
            argv.extend(rendered);
        }
        let stdin = match &exec.stdin {
            Some(name) if streamed.iter().any(|s| &s.name == name) => Stdin::Streamed,
            Some(name) if call.files().contains_key(name) => Stdin::File(open_input_file(&call, name).await?),
            _ => Stdin::Empty,
        };
        let result = run(&call, exec, argv, stdin, streamed).await;
        pipes.remove().await;
        result
    }
}

/// What a program reads on standard input.
enum Stdin {
    Empty,
    /// A complete input file.
    File(std::fs::File),
    /// A streaming input, fed through a pipe as it is staged.
    Streamed,
}

/// A streaming input, fed to the program as it is staged.
struct Streamed {
    /// Its parameter.
    name: String,
    reader: InputReader,
    sink: Sink,
}

/// Where a program reads a streaming input.
enum Sink {
    Stdin,
    Pipe(NamedPipe),
}

/// A named pipe whose path stands for a streaming input in the command,
/// open at both ends from before the program starts: the program finds a
/// writer whenever it opens it (one opening it without blocking would
/// otherwise read an empty file), and what is written waits in the pipe
/// until it does.
struct NamedPipe {
    path: PathBuf,
    writer: tokio::net::unix::pipe::Sender,
    /// This process's reading end, which keeps the pipe and what is in it.
    reader: std::os::fd::OwnedFd,
}

impl NamedPipe {
    /// Waits until the program has read everything written, and has the
    /// pipe open: only then can this side close without losing bytes or
    /// leaving a program that opens it later waiting for a writer forever.
    async fn drained(self) -> std::io::Result<()> {
        let mut wait = DRAIN_WAIT.0;
        let mut pause = || {
            let now = wait;
            wait = (wait * 2).min(DRAIN_WAIT.1);
            tokio::time::sleep(now)
        };
        while rustix::io::ioctl_fionread(&self.reader)? > 0 {
            pause().await;
        }
        drop(self.reader);
        while !read_elsewhere(&self.path)? {
            pause().await;
        }
        Ok(())
    }
}

/// Whether a process has the named pipe at `path` open for reading (this
/// one holding no reading end): opening a writer without blocking succeeds
/// only then.
fn read_elsewhere(path: &Path) -> std::io::Result<bool> {
    let flags = rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC;
    match rustix::fs::open(path, flags, rustix::fs::Mode::empty()) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NXIO) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The named pipes of one call's streaming inputs, in a private folder
/// under the temporary directory (not the workspace: a pipe is a local
/// thing, whatever volume the workspace is on), removed with this.
#[derive(Default)]
struct NamedPipes {
    dir: Option<PathBuf>,
    paths: Vec<(String, PathBuf)>,
}

impl NamedPipes {
    /// Makes the pipe standing for the streaming input `param`, staged at
    /// `staged`: named as the input is (a program may look at the
    /// extension), in a folder of the parameter's name.
    async fn create(&mut self, param: &str, staged: &Path) -> Result<NamedPipe, PrefabError> {
        let dir = match &self.dir {
            Some(dir) => dir.clone(),
            None => {
                let dir = std::env::temp_dir().join(format!("prefab-pipes-{}", uuid::Uuid::new_v4()));
                self.dir = Some(dir.clone());
                dir
            }
        };
        let name = staged.file_name().unwrap_or(param.as_ref()).to_owned();
        let path = dir.join(param).join(name);
        let made = path.clone();
        let made = tokio::task::spawn_blocking(move || {
            let private = |d: &Path| std::fs::DirBuilder::new().mode(0o700).create(d);
            if !dir.exists() {
                private(&dir)?;
            }
            private(made.parent().expect("a folder of the parameter's name"))?;
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &made,
                rustix::fs::FileType::Fifo,
                0o600.into(),
                0,
            )?;
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| PrefabError::Failed(e.to_string()))?;
        let pipe = made
            .and_then(|()| {
                // The reading end first: a writer cannot open without one.
                let flags =
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC;
                let reader = rustix::fs::open(&path, flags, rustix::fs::Mode::empty())?;
                let writer = tokio::net::unix::pipe::OpenOptions::new().open_sender(&path)?;
                Ok(NamedPipe {
                    path: path.clone(),
                    writer,
                    reader,
                })
            })
            .map_err(|e: std::io::Error| {
                PrefabError::Failed(format!(
                    "cannot make a named pipe for streaming input {param:?} at {}: {e}; \
                 the runtime needs a writable temporary directory (TMPDIR)",
                    path.display()
                ))
            })?;
        self.paths.push((param.to_owned(), path));
        Ok(pipe)
    }

    fn path(&self, param: &str) -> Option<&Path> {
        self.paths
            .iter()
            .find(|(p, _)| p == param)
            .map(|(_, path)| path.as_path())
    }
}

impl NamedPipes {
    /// Removes the pipes' folder, when the call is over.
    async fn remove(mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = tokio::task::spawn_blocking(move || remove_pipes(&dir)).await;
        }
    }
}

/// A call dropped before its end (its runtime going away) removes its
/// pipes here, where there may be no blocking pool left to do it: a folder
/// of one or two pipes on the local temporary directory.
impl Drop for NamedPipes {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            remove_pipes(&dir);
        }
    }
}

fn remove_pipes(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), "cannot remove named pipes: {e}");
    }
}

/// Opens the complete input file `name`, following no link.
async fn open_input_file(call: &Invocation, name: &str) -> Result<std::fs::File, PrefabError> {
    let rel = call
        .arg(name)
        .and_then(Value::as_str)
        .ok_or_else(|| PrefabError::InvalidArgument(format!("file parameter {name:?} is missing")))?;
    let rel = RelPath::parse(rel).map_err(|e| PrefabError::InvalidArgument(e.to_string()))?;
    let workspace = call.workspace().to_owned();
    let opened = tokio::task::spawn_blocking(move || open_regular(&workspace, &rel))
        .await
        .map_err(|e| PrefabError::Failed(e.to_string()))?;
    let (file, _) = opened.map_err(|e| PrefabError::Failed(format!("cannot open input {name:?}: {e}")))?;
    Ok(file)
}

/// Copies a streaming input into the program as it is staged: into its
/// standard input, or into its named pipe. A program that stops reading (or
/// never opens its pipe) is its own business: the feeding stops when it
/// exits. A failure is sent on `failed`, and the feeding then holds the
/// program's end open until it is stopped, so that the program never takes
/// a cut-off input for a whole one.
async fn feed(input: Streamed, stdin: Option<ChildStdin>, failed: tokio::sync::mpsc::Sender<PrefabError>) {
    let Streamed {
        name,
        mut reader,
        sink,
    } = input;
    // On failure, the program's end goes with the error, to be held.
    let fed: Result<(), (PrefabError, Box<dyn Send>)> = match sink {
        Sink::Stdin => match stdin {
            Some(mut stdin) => match copy(&name, &mut reader, &mut stdin).await {
                Ok(()) => Ok(()),
                Err(e) => Err((e, Box::new(stdin))),
            },
            None => Ok(()),
        },
        Sink::Pipe(mut pipe) => match copy(&name, &mut reader, &mut pipe.writer).await {
            Ok(()) => pipe.drained().await.map_err(|e| {
                let e = PrefabError::Failed(format!("cannot feed input {name:?} to the program: {e}"));
                (e, Box::new(()) as Box<dyn Send>)
            }),
            Err(e) => Err((e, Box::new(pipe))),
        },
    };
    if let Err((e, _held)) = fed {
        let _ = failed.send(e).await;
        std::future::pending::<()>().await;
    }
}

/// Copies the streaming input `name` from `reader` into `to` as it is
/// staged, until its end or until the program closes its standard input
/// (a named pipe, which this process also holds open, never closes so).
async fn copy(
    name: &str,
    reader: &mut InputReader,
    to: &mut (impl AsyncWrite + Unpin),
) -> Result<(), PrefabError> {
    let failed = |e: std::io::Error| PrefabError::Failed(format!("cannot read input {name:?}: {e}"));
    while let Some(chunk) = reader.chunk().await.map_err(failed)? {
        match to.write_all(&chunk).await {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            written => written.map_err(|e| {
                PrefabError::Failed(format!("cannot feed input {name:?} to the program: {e}"))
            })?,
        }
    }
    Ok(())
}

async fn run(
    call: &Invocation,
    exec: &ExecSpec,
    argv: Vec<String>,
    stdin: Stdin,
    streamed: Vec<Streamed>,
) -> Result<Outputs, PrefabError> {
    let program = argv[0].clone();
    let mut cmd = Command::new(&program);
    cmd.args(&argv[1..])
        .current_dir(call.workspace())
        .env("PREFAB_WORKSPACE", call.workspace())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    // What the program creates in the workspace must stay usable by the
    // workspace group (the gateway uploads and removes it), whatever umask
    // this runtime was started with.
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(access::PROGRAM_UMASK));
            Ok(())
        });
    }
    // The program continues the call's trace, never one this runtime was
    // started in.
    cmd.env_remove("TRACEPARENT")
        .env_remove("TRACESTATE")
        .envs(call.trace().env());
    for (name, value) in call.secrets() {
        cmd.env(name, value);
    }
    match &exec.stdout {
        Some(param) => cmd.stdout(capture(call.output(param)?, param).await?),
        None => cmd.stdout(Stdio::piped()),
    };
    match stdin {
        Stdin::Empty => cmd.stdin(Stdio::null()),
        Stdin::File(file) => cmd.stdin(file),
        Stdin::Streamed => cmd.stdin(Stdio::piped()),
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| PrefabError::Failed(format!("cannot start {program}: {e}")))?;
    tracing::info!(program, pid = child.id(), "started");
    let group = ProcessGroup(child.id());
    // Feeding stops when this ends, however it ends.
    let mut feeding = tokio::task::JoinSet::new();
    let (failing, mut feed_failed) = tokio::sync::mpsc::channel(1);
    let mut pipe = child.stdin.take();
    for input in streamed {
        let stdin = matches!(input.sink, Sink::Stdin).then(|| pipe.take()).flatten();
        feeding.spawn(feed(input, stdin, failing.clone()));
    }
    drop(failing);
    let stdout = child.stdout.take().map(BufReader::new);
    let stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let timeout = exec.timeout_seconds.map(Duration::from_secs);

    let mut outputs = Outputs::new();
    // Bytes of values still taken in; `None` once the program printed more
    // than a result may hold.
    let mut room = Some(proto::MAX_RESULT);
    let mut tail = VecDeque::with_capacity(STDERR_TAIL);
    let status = {
        let io = async {
            tokio::join!(
                async {
                    if let Some(mut out) = stdout {
                        let mut buf = Vec::new();
                        while let Some(line) = read_line(&mut out, &mut buf).await {
                            handle_stdout(call, line, &mut outputs, &mut room).await;
                        }
                    }
                },
                async {
                    let (mut err, mut buf) = (stderr, Vec::new());
                    while let Some(line) = read_line(&mut err, &mut buf).await {
                        if tail.len() == STDERR_TAIL {
                            tail.pop_front();
                        }
                        tail.push_back(line.clone());
                        call.log(LogStream::Stderr, line).await;
                    }
                },
            );
        };
        let mut io = std::pin::pin!(io);
        // One limit for the whole run: the loop goes round again when the
        // program closes its output, and must not start a new one then.
        let mut limit = std::pin::pin!(sleep_opt(timeout));
        let mut drained = false;
        let exited = loop {
            tokio::select! {
                () = &mut io, if !drained => drained = true,
                Some(e) = feed_failed.recv() => break Err(e),
                Some(Err(e)) = feeding.join_next() => {
                    break Err(PrefabError::Failed(format!("feeding an input failed: {e}")));
                }
                // A feeding that failed as the program exited counts.
                status = child.wait() => match feed_failed.try_recv() {
                    Ok(e) => break Err(e),
                    Err(_) => break Ok(status?),
                },
                () = call.cancellation().cancelled() => break Err(PrefabError::Cancelled),
                () = &mut limit => break Err(PrefabError::TimedOut(timeout.unwrap_or_default())),
            }
        };
        if exited.is_err() {
            // The output is still read meanwhile: a program with much to
            // say as it stops must not block on a full pipe.
            let mut stop = std::pin::pin!(terminate(&mut child, &group));
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    () = &mut io, if !drained => drained = true,
                }
            }
        }
        // Leave nothing behind, even processes the program started; then
        // the pipes close and the last lines drain.
        group.signal(rustix::process::Signal::KILL);
        // A helper that left the group may hold the pipes open: stop
        // reading after a grace period rather than hang.
        if !drained && tokio::time::timeout(KILL_GRACE, io).await.is_err() {
            tracing::warn!("output pipes still open after the program exited; stopped reading them");
        }
        exited?
    };
    if !status.success() {
        let lines: Vec<_> = tail.into_iter().collect();
        return Err(PrefabError::Failed(format!(
            "{program} exited with {status}; last lines of its standard error:\n{}",
            lines.join("\n")
        )));
    }
    let result = proto::InvokeResult {
        outputs: Some(proto::json_to_struct(outputs.clone())),
    };
    if room.is_none() || prost::Message::encoded_len(&result) > proto::MAX_RESULT {
        return Err(PrefabError::Failed(format!(
            "{program} printed more than the {} bytes of ::output values a result may hold; \
             write large values to an output file",
            proto::MAX_RESULT
        )));
    }
    Ok(outputs)
}

/// Creates the file a program's standard output is written to: new (never
/// through a link planted at its path), group-writable whatever this
/// process's umask.
async fn capture(path: &Path, param: &str) -> Result<std::fs::File, PrefabError> {
    let created = async {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(access::OUTPUT_MODE)
            .open(path)
            .await?;
        file.set_permissions(std::fs::Permissions::from_mode(access::OUTPUT_MODE))
            .await?;
        Ok::<_, std::io::Error>(file.into_std().await)
    };
    match created.await {
        Ok(file) => Ok(file),
        Err(e) if access::is_denied(&e) => {
            let (doing, path) = (format!("cannot create output {param:?} at"), path.to_owned());
            let explained = tokio::task::spawn_blocking(move || access::explain_denied(&doing, &path))
                .await
                .map_err(|e| PrefabError::Failed(e.to_string()))?;
            Err(PrefabError::Workspace(explained))
        }
        Err(e) => Err(e.into()),
    }
}

async fn handle_stdout(call: &Invocation, line: String, outputs: &mut Outputs, room: &mut Option<usize>) {
    if let Some(rest) = line.strip_prefix("::progress ") {
        let (fraction, message) = rest.split_once(' ').unwrap_or((rest, ""));
        if let Ok(f) = fraction.parse::<f64>() {
            return call.progress(f, message).await;
        }
    }
    if let Some(rest) = line.strip_prefix("::output ") {
        let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
        // Every value printed counts, one that replaces another too.
        *room = room.and_then(|left| left.checked_sub(name.len() + value.len()));
        if room.is_none() {
            return;
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        outputs.insert(name.to_owned(), value);
        return;
    }
    call.log(LogStream::Stdout, line).await;
}

/// The next line of `reader`, lossily decoded and capped at [`MAX_LINE`]
/// bytes (the rest of a longer line is dropped); `None` at end of file.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, line: &mut Vec<u8>) -> Option<String> {
    line.clear();
    loop {
        let buf = match reader.fill_buf().await {
            Ok([]) | Err(_) if line.is_empty() => return None,
            Ok([]) | Err(_) => break,
            Ok(buf) => buf,
        };
        let (take, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&buf[..take.min(room)]);
        reader.consume(take);
        if end {
            break;
        }
    }
    Some(
        String::from_utf8_lossy(line)
            .trim_end_matches(['\n', '\r'])
            .to_owned(),
    )
}

async fn sleep_opt(limit: Option<Duration>) {
    match limit {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// SIGTERM to the whole process group, SIGKILL after [`KILL_GRACE`]. The
/// grace lasts until the whole group is gone, not just the program: a shell
/// dies at once, while the worker it started finishes its file.
async fn terminate(child: &mut Child, group: &ProcessGroup) {
    group.signal(rustix::process::Signal::TERM);
    let ended = async {
        let _ = child.wait().await;
        while group.alive() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(KILL_GRACE, ended).await.is_err() {
        tracing::warn!("program ignored SIGTERM; killing it");
    }
    group.signal(rustix::process::Signal::KILL);
    let _ = child.wait().await;
}

/// The process group of a spawned program (its own, by `process_group(0)`).
struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    fn signal(&self, signal: rustix::process::Signal) {
        let Some(pid) = self.0.and_then(|p| rustix::process::Pid::from_raw(p as i32)) else {
            return;
        };
        // ESRCH means the group is already gone.
        let _ = rustix::process::kill_process_group(pid, signal);
    }

    /// Whether a process of the group is left (an exited one its parent
    /// has not reaped yet counts).
    fn alive(&self) -> bool {
        self.0
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            .is_some_and(|pid| rustix::process::test_kill_process_group(pid).is_ok())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(rustix::process::Signal::KILL);
    }
}

/// Settings of `prefab runtime exec`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// The prefab's manifest (TOML).
    #[arg(long, env = "PREFAB_MANIFEST")]
    pub manifest: PathBuf,
    /// Where to listen and the workspace root.
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(arg: &str) -> Result<Option<String>, String> {
        render(arg, &mut |name| {
            Ok(match name {
                "a" => Some("x y; z".into()),
                "absent" => None,
                other => Some(format!("<{other}>")),
            })
        })
    }

    #[test]
    fn templates_expand_whole_and_embedded_placeholders() {
        assert_eq!(expand("{a}").unwrap().unwrap(), "x y; z");
        assert_eq!(expand("--level={b}").unwrap().unwrap(), "--level=<b>");
        assert_eq!(expand("{{literal}}").unwrap().unwrap(), "{literal}");
        assert_eq!(expand("--opt={absent}").unwrap(), None);
        assert!(expand("{open").is_err());
        assert!(expand("close}").is_err());
    }

    #[test]
    fn manifests_are_checked() {
        let ok = r#"
id = "sorter"
version = "1.0.0"
[[function]]
name = "sort"
parameters = [
  { name = "text", type = "InputFile" },
  { name = "output", type = "OutputFile", extension = "txt" },
]
exec = { command = ["sort", "-o", "{output}", "{text}"] }
"#;
        assert!(ExecPrefab::parse(ok).is_ok());
        assert!(
            ExecPrefab::parse(&ok.replace("{text}\"]", "{nope}\"]"))
                .unwrap_err()
                .contains("{nope}")
        );
        assert!(ExecPrefab::parse(&ok.replace("exec = ", "bogus = ")).is_err());
        assert!(ExecPrefab::parse(&ok.replace("sorter", "Sorter")).is_err());

        // A streaming input is read once: on standard input, or through
        // its path in one argument.
        let by_path = ok.replace(
            r#"type = "InputFile" }"#,
            r#"type = "InputFile", streaming = true }"#,
        );
        assert!(ExecPrefab::parse(&by_path).is_ok(), "{by_path}");
        let streamed = by_path.replace(r#""{output}", "{text}"] }"#, r#""{output}"], stdin = "text" }"#);
        assert!(ExecPrefab::parse(&streamed).is_ok(), "{streamed}");
        for (bad, complaint) in [
            (streamed.replace(r#", stdin = "text""#, ""), "neither names it"),
            (
                streamed.replace(r#""{output}"]"#, r#""{output}", "{text}"]"#),
                "not both nor twice",
            ),
            (
                by_path.replace(r#""{text}"]"#, r#""{text}", "--again={text}"]"#),
                "not both nor twice",
            ),
            (
                streamed.replace(r#"stdin = "text""#, r#"stdin = "output""#),
                "not an InputFile",
            ),
            (
                ok.replace(
                    r#"type = "OutputFile", extension = "txt""#,
                    r#"type = "OutputFile", streaming = true"#,
                ),
                "only an InputFile can be streaming",
            ),
        ] {
            let e = ExecPrefab::parse(&bad).unwrap_err();
            assert!(e.contains(complaint), "{bad}: {e}");
        }
    }
}
