//! The reference step (`bench/reference.py --bench --serve`) as a child process, driven one step at a time
//! over a pipe, and the lines of its protocol.
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the reference script is run: the project venv's Python and `bench/reference.py`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceCommand {
    /// The Python interpreter (needs torch and diffusers: `scripts/setup-reference.sh`).
    pub python: PathBuf,
    /// `bench/reference.py`.
    pub script: PathBuf,
}

impl ReferenceCommand {
    /// `<root>/.venv/bin/python` and `<root>/bench/reference.py`.
    pub fn in_repo(root: &Path) -> Self {
        Self { python: root.join(".venv").join("bin").join("python"), script: root.join("bench").join("reference.py") }
    }
}

/// The repository this binary was built from (where `.venv/` and `bench/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}


/// What the reference reported about itself, or why it did not run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceInfo {
    /// `ran`, `skipped` (it could not start: see `reason`) or `disabled` (`--no-reference`).
    pub status: String,
    /// Why it was skipped.
    pub reason: Option<String>,
    /// Its `ready` message (versions, parameter counts), when it ran.
    pub header: Option<serde_json::Value>,
    /// Its peak RSS (`getrusage` `ru_maxrss`), KiB.
    pub peak_rss_kib: Option<u64>,
}

/// One line of the reference's `--serve` protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum ReferenceMessage {
    /// Set up; its header.
    Ready(serde_json::Value),
    /// One step of `arm` took `seconds`.
    Step {
        /// `baseline` or `lisa`.
        arm: String,
        /// Its time.
        seconds: f64,
    },
    /// Finished; its peak RSS in KiB.
    Done {
        /// `ru_maxrss`.
        maxrss_kib: u64,
    },
    /// It rejected a command.
    Error(String),
}

/// Parses one line of `bench/reference.py --bench --serve`'s output.
pub fn parse_reference_line(line: &str) -> std::result::Result<ReferenceMessage, String> {
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("not a JSON line ({e}): {:?}", line.trim()))?;
    if v.get("ready").and_then(|r| r.as_bool()) == Some(true) {
        return Ok(ReferenceMessage::Ready(v));
    }
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Ok(ReferenceMessage::Error(e.into()));
    }
    if v.get("done").and_then(|d| d.as_bool()) == Some(true) {
        let k = v.get("maxrss_kib").and_then(|k| k.as_u64()).ok_or_else(|| format!("no maxrss_kib in {line:?}"))?;
        return Ok(ReferenceMessage::Done { maxrss_kib: k });
    }
    match (v.get("arm").and_then(|a| a.as_str()), v.get("seconds").and_then(|s| s.as_f64())) {
        (Some(arm), Some(seconds)) => Ok(ReferenceMessage::Step { arm: arm.into(), seconds }),
        _ => Err(format!("unexpected message {:?}", line.trim())),
    }
}

/// `bench/reference.py --bench --serve` as a child process, stepped over its stdin/stdout. While it
/// steps our process waits on the pipe, and while we step it waits on its stdin: the two never run at once.
pub(crate) struct ReferenceProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: Option<JoinHandle<String>>,
    /// What the reference said about itself when it was ready (versions, threads).
    pub(crate) header: serde_json::Value,
}

impl ReferenceProcess {
    /// Starts the reference and waits until its arms are built; `Err` says why it cannot run.
    pub(crate) fn start(
        cmd: &ReferenceCommand,
        main_dir: &Path,
        batch: i64,
        threads: i32,
        seed: u64,
    ) -> std::result::Result<Self, String> {
        const SETUP: &str = "create the project venv with scripts/setup-reference.sh, or pass --python";
        if !cmd.python.is_file() {
            return Err(format!("no Python at {} ({SETUP})", cmd.python.display()));
        }
        if !cmd.script.is_file() {
            return Err(format!("no reference script at {}", cmd.script.display()));
        }
        let config = main_dir.join(crate::pipeline::CONFIG_FILE);
        let mut child = Command::new(&cmd.python)
            .arg(&cmd.script)
            .args(["--bench", "--serve", "--batch", &batch.to_string(), "--threads", &threads.to_string()])
            .args(["--seed", &seed.to_string(), "--config"])
            .arg(&config)
            // The allocator settings our binary uses (crate::allocator), so that both sides differ in
            // compute alone; a GLIBC_TUNABLES the user set is passed on as it is.
            .env("GLIBC_TUNABLES", crate::allocator::glibc_tunables_for_children())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e} ({SETUP})", cmd.python.display()))?;
        let (stdin, stdout, mut stderr) = (
            child.stdin.take().expect("piped stdin"),
            child.stdout.take().expect("piped stdout"),
            child.stderr.take().expect("piped stderr"),
        );
        // Drained on a thread so that warnings cannot fill the pipe and block the child.
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut p = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stderr: Some(stderr),
            header: serde_json::Value::Null,
        };
        match p.read_message() {
            Ok(ReferenceMessage::Ready(h)) => {
                p.header = h;
                Ok(p)
            }
            Ok(other) => Err(format!("{} sent {other:?} instead of `ready`", cmd.script.display())),
            Err(e) => {
                let hint = if e.contains("No module named") { format!(" ({SETUP})") } else { String::new() };
                Err(format!("{} did not start: {e}{hint}", cmd.script.display()))
            }
        }
    }

    /// The next protocol message; on end of output, the child's exit status and last stderr line.
    fn read_message(&mut self) -> std::result::Result<ReferenceMessage, String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).map_err(|e| format!("reading its output: {e}"))?;
        if n == 0 {
            let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim().to_string();
            return Err(format!("it exited ({status}): {last}"));
        }
        parse_reference_line(&line)
    }

    fn send(&mut self, command: &str) -> std::result::Result<(), String> {
        writeln!(self.stdin, "{command}").and_then(|_| self.stdin.flush()).map_err(|e| format!("writing to it: {e}"))
    }

    /// One step of `arm`; its seconds (measured inside the reference).
    pub(crate) fn step(&mut self, arm: &str) -> Result<f64> {
        let fail = |e: String| Error::Training(format!("the reference failed during the benchmark: {e}"));
        self.send(&format!("step {arm}")).map_err(fail)?;
        match self.read_message().map_err(fail)? {
            ReferenceMessage::Step { arm: a, seconds } if a == arm => Ok(seconds),
            other => Err(fail(format!("expected a step of {arm}, got {other:?}"))),
        }
    }

    /// Ends the child; its peak RSS, KiB.
    pub(crate) fn finish(mut self) -> Result<u64> {
        let fail = |e: String| Error::Training(format!("the reference failed at the end of the benchmark: {e}"));
        self.send("quit").map_err(fail)?;
        match self.read_message().map_err(fail)? {
            ReferenceMessage::Done { maxrss_kib } => {
                let _ = self.child.wait();
                Ok(maxrss_kib)
            }
            other => Err(fail(format!("expected `done`, got {other:?}"))),
        }
    }
}

impl Drop for ReferenceProcess {
    fn drop(&mut self) {
        // After `finish` the child has exited; on an early error it must not outlive us.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_protocol_parses() {
        assert!(matches!(
            parse_reference_line("{\"ready\": true, \"torch\": \"2\"}\n"),
            Ok(ReferenceMessage::Ready(_))
        ));
        assert_eq!(
            parse_reference_line("{\"arm\": \"lisa\", \"seconds\": 1.5}"),
            Ok(ReferenceMessage::Step { arm: "lisa".into(), seconds: 1.5 })
        );
        assert_eq!(
            parse_reference_line("{\"done\": true, \"maxrss_kib\": 7}"),
            Ok(ReferenceMessage::Done { maxrss_kib: 7 })
        );
        assert_eq!(parse_reference_line("{\"error\": \"bad\"}"), Ok(ReferenceMessage::Error("bad".into())));
        assert!(parse_reference_line("Traceback (most recent call last):").is_err());
        assert!(parse_reference_line("{\"arm\": \"lisa\"}").is_err());
    }

}
