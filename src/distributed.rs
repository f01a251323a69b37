//! Data-parallel training over PyTorch's own distributed engine, c10d: one process per device, launched
//! as `torchrun` launches them (the variables `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`), joined through c10d's `TCPStore` into a Gloo (CPU) or NCCL (CUDA) process group.
//! tch does not bind c10d; `csrc/dist.cpp`, compiled by `build.rs` against the same libtorch, does.
//!
//! Without those variables nothing here runs and training is the single-process path it always was.
//! A process joins at most one group, the first time the trainer needs it ([`join_from_env`]); the group
//! lives until [`leave`] or the end of the process.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Seconds a collective or the rendezvous waits for a peer that neither answers nor exits; overridden by
/// the environment variable `LISA_DIST_TIMEOUT_S`. A peer that exits is noticed at once (its sockets close).
pub const DEFAULT_TIMEOUT_S: u64 = 1800;

/// Gradient buckets all-reduced as one tensor each: fewer, larger messages than one per parameter.
const BUCKET_BYTES: i64 = 25 << 20;

/// This process's place in a multi-process launch, read from torchrun's environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// `RANK`: this process's index among all processes, 0-based.
    pub rank: usize,
    /// `WORLD_SIZE`: the number of processes.
    pub world_size: usize,
    /// `LOCAL_RANK`: this process's index on its machine (picks `cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// `MASTER_ADDR`: the host of rank 0, which serves the rendezvous store.
    pub master_addr: String,
    /// `MASTER_PORT`: the port of the rendezvous store.
    pub master_port: u16,
}

impl Launch {
    /// The launch described by the environment, or `None` when `WORLD_SIZE` is unset (a plain
    /// single-process run). `LOCAL_RANK` defaults to `RANK`, `MASTER_ADDR` to 127.0.0.1 and `MASTER_PORT`
    /// to 29500, as in `torch.distributed`.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Launch::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let bad = |name: &str, value: &str, want: &str| {
            Error::Distributed(format!(
                "environment variable {name}={value:?} is not {want}; launch with torchrun or lisa launch"
            ))
        };
        let int =
            |name: &str, value: String| value.trim().parse::<usize>().map_err(|_| bad(name, &value, "a number ≥ 0"));
        let world_size = int("WORLD_SIZE", world)?;
        if world_size == 0 {
            return Err(bad("WORLD_SIZE", "0", "≥ 1"));
        }
        let rank = int("RANK", var("RANK").ok_or_else(|| {
            Error::Distributed("WORLD_SIZE is set but RANK is not; launch with torchrun or lisa launch".into())
        })?)?;
        if rank >= world_size {
            return Err(bad("RANK", &rank.to_string(), &format!("below WORLD_SIZE = {world_size}")));
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => int("LOCAL_RANK", v)?,
            None => rank,
        };
        let master_addr = var("MASTER_ADDR").filter(|a| !a.is_empty()).unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match var("MASTER_PORT") {
            Some(p) => p.trim().parse::<u16>().map_err(|_| bad("MASTER_PORT", &p, "a port number"))?,
            None => 29500,
        };
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port }))
    }
}

/// This process's rank from the environment (0 without a launch): rank 0 alone writes run folders.
pub fn rank_from_env() -> usize {
    Launch::from_env().ok().flatten().map_or(0, |l| l.rank)
}

/// Whether this process writes the files of a run: true unless it is a launched process of rank > 0.
pub fn is_main_process() -> bool {
    rank_from_env() == 0
}

/// The CUDA device of this process: `cuda:LOCAL_RANK` in a launch, `cuda:0` otherwise.
pub fn local_cuda_device() -> Device {
    Device::Cuda(Launch::from_env().ok().flatten().map_or(0, |l| l.local_rank))
}

/// A c10d communication backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo, for tensors on the CPU.
    Gloo,
    /// NCCL, for tensors on CUDA devices.
    Nccl,
}

impl Backend {
    /// The backend for tensors on `device`.
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "Gloo",
            Backend::Nccl => "NCCL",
        }
    }

    /// Whether this build has the backend (see `build.rs`).
    pub fn is_available(self) -> bool {
        let bit = match self {
            Backend::Gloo => 1,
            Backend::Nccl => 2,
        };
        ffi::backends() & bit != 0
    }

    /// What to install for a build that lacks the backend.
    fn missing(self) -> String {
        let what = match self {
            Backend::Gloo => {
                "this build of lisa has no Gloo backend (its headers were missing at build time): install them \
                 (`sudo apt-get install libgloo-dev`, or set GLOO_INCLUDE_DIR) and rebuild"
            }
            Backend::Nccl => {
                "this build of lisa has no NCCL backend (the CUDA and NCCL headers of the torch wheel's CUDA \
                 dependencies were missing at build time): run `LISA_TORCH=full bash scripts/setup.sh` and rebuild"
            }
        };
        if ffi::COMPILED {
            what.to_owned()
        } else {
            "this build of lisa has no distributed support (libtorch's c10d headers were not found at build time): \
             run `bash scripts/setup.sh` and rebuild"
                .to_owned()
        }
    }
}

/// A joined c10d process group.
pub struct ProcessGroup {
    raw: Mutex<ffi::Raw>,
    rank: usize,
    world_size: usize,
    backend: Backend,
    /// "host pid" of every rank, shared at the rendezvous.
    peers: Vec<String>,
    timeout: Duration,
}

// SAFETY: c10d process groups are used from any thread; every call goes through the mutex.
unsafe impl Send for ProcessGroup {}
// SAFETY: as above.
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group described by `launch`: rank 0 serves the rendezvous store at
    /// `MASTER_ADDR:MASTER_PORT`, every rank connects, then the backend connects the ranks to each other.
    /// Collectives, and the rendezvous itself, fail after `timeout` without an answer.
    pub fn join(launch: &Launch, backend: Backend, timeout: Duration) -> Result<Self> {
        if !backend.is_available() {
            return Err(Error::Distributed(format!(
                "{} processes asked for (WORLD_SIZE) but {}",
                launch.world_size,
                backend.missing()
            )));
        }
        let device = if backend == Backend::Nccl { launch.local_rank as i32 } else { -1 };
        let raw = ffi::join(backend, launch, timeout, device).map_err(|e| {
            Error::Distributed(format!(
                "rank {} of {} could not join the {} process group at {}:{} within {} s: {}; check that every \
                 rank runs with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE and that the port is free",
                launch.rank,
                launch.world_size,
                backend.name(),
                launch.master_addr,
                launch.master_port,
                timeout.as_secs(),
                one_line(&e)
            ))
        })?;
        let peers = (0..launch.world_size).map(|r| ffi::peer(&raw, r)).collect();
        Ok(Self { raw: Mutex::new(raw), rank: launch.rank, world_size: launch.world_size, backend, peers, timeout })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Replaces each tensor, in place, by its mean over the ranks. The tensors must be contiguous and
    /// of the same shapes on every rank, and every rank must make the same calls in the same order.
    pub fn all_reduce_mean(&self, tensors: &[&Tensor]) -> Result<()> {
        self.call("all-reduce", |raw| ffi::all_reduce(raw, tensors, true))
    }

    /// Replaces each tensor, in place, by `root`'s.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        self.call("broadcast", |raw| ffi::broadcast(raw, tensors, root))
    }

    /// Waits until every rank has reached the barrier.
    pub fn barrier(&self) -> Result<()> {
        self.call("barrier", ffi::barrier)
    }

    /// Averages the gradients of `params` over the ranks, in buckets of about 25 MB (one flat tensor per
    /// bucket, so the backend sends a few large messages). Parameters without a gradient are skipped;
    /// every rank must have gradients for the same parameters.
    pub fn average_gradients(&self, params: &[(String, Tensor)]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(Tensor::defined).collect();
        let mut start = 0;
        while start < grads.len() {
            let (kind, device) = (grads[start].kind(), grads[start].device());
            let mut end = start;
            let mut bytes = 0;
            let fits = |g: &Tensor, bytes: i64| g.kind() == kind && g.device() == device && bytes < BUCKET_BYTES;
            while end < grads.len() && (end == start || fits(&grads[end], bytes)) {
                bytes += grads[end].numel() as i64 * kind.elt_size_in_bytes() as i64;
                end += 1;
            }
            let bucket = &grads[start..end];
            let flat = Tensor::cat(&bucket.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
            self.all_reduce_mean(&[&flat])?;
            let mut offset = 0;
            for g in bucket {
                let n = g.numel() as i64;
                let mut g = g.shallow_clone();
                g.copy_(&flat.narrow(0, offset, n).view_as(&g));
                offset += n;
            }
            start = end;
        }
        Ok(())
    }

    /// Averages f64 values over the ranks (losses and logged statistics).
    pub fn mean_of(&self, values: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(values).to_kind(Kind::Double);
        let t = match self.backend {
            Backend::Nccl => t.to_device(Device::Cuda(self.local_device_index())),
            Backend::Gloo => t,
        };
        self.all_reduce_mean(&[&t])?;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu))?)
    }

    fn local_device_index(&self) -> usize {
        Launch::from_env().ok().flatten().map_or(0, |l| l.local_rank)
    }

    /// Runs a collective; a failure becomes one line naming the ranks whose processes are gone.
    fn call(&self, what: &str, f: impl FnOnce(&ffi::Raw) -> std::result::Result<(), String>) -> Result<()> {
        let raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        f(&raw).map_err(|e| {
            let gone = || -> Vec<String> {
                (0..self.world_size)
                    .filter(|&r| r != self.rank && peer_is_gone(&self.peers[r]))
                    .map(|r| format!("rank {r} (pid {})", self.peers[r].rsplit(' ').next().unwrap_or("?")))
                    .collect()
            };
            // A killed peer's connections close while it is still exiting, before it shows as gone: give it a
            // moment (longer on a loaded machine) before saying that no peer exited.
            let waited = std::time::Instant::now();
            let mut gone_now = gone();
            while gone_now.is_empty() && waited.elapsed() < PEER_EXIT_GRACE {
                std::thread::sleep(Duration::from_millis(50));
                gone_now = gone();
            }
            let gone = gone_now;
            let cause = if gone.is_empty() {
                format!("a peer exited or did not answer within {} s", self.timeout.as_secs())
            } else {
                format!("{} exited", gone.join(" and "))
            };
            Error::Distributed(format!(
                "rank {} of {}: {what} failed because {cause}; see that rank's output for its error ({})",
                self.rank,
                self.world_size,
                one_line(&e)
            ))
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let raw = self.raw.get_mut().unwrap_or_else(|e| e.into_inner());
        ffi::destroy(raw);
    }
}

/// How long a failed collective waits for an exiting peer to show as gone before blaming no one in particular.
const PEER_EXIT_GRACE: Duration = Duration::from_secs(3);

/// Whether the process of a peer ("host pid") on this host is no longer running (unknown for other hosts).
fn peer_is_gone(peer: &str) -> bool {
    let mut parts = peer.rsplitn(2, ' ');
    let (Some(pid), Some(host)) = (parts.next(), parts.next()) else { return false };
    let this_host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if host != this_host.trim() {
        return false;
    }
    // A killed child of the launcher stays a zombie until reaped: gone all the same.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The timeout of collectives: `LISA_DIST_TIMEOUT_S` seconds, else [`DEFAULT_TIMEOUT_S`].
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var("LISA_DIST_TIMEOUT_S") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) if s > 0 => Ok(Duration::from_secs(s)),
            _ => Err(Error::Distributed(format!("LISA_DIST_TIMEOUT_S={v:?} must be a whole number of seconds ≥ 1"))),
        },
        Err(_) => Ok(Duration::from_secs(DEFAULT_TIMEOUT_S)),
    }
}

static GROUP: Mutex<Option<Arc<ProcessGroup>>> = Mutex::new(None);

/// The process group this process joined, if any.
pub fn current() -> Option<Arc<ProcessGroup>> {
    GROUP.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Joins the group the environment describes, once per process, with the backend for tensors on
/// `device`; `None` for a plain single-process run. Later calls return the same group (they must ask
/// for the same backend).
pub fn join_from_env(device: Device) -> Result<Option<Arc<ProcessGroup>>> {
    let Some(launch) = Launch::from_env()? else { return Ok(None) };
    let mut slot = GROUP.lock().unwrap_or_else(|e| e.into_inner());
    let backend = Backend::for_device(device);
    if let Some(g) = slot.as_ref() {
        if g.backend != backend {
            return Err(Error::Distributed(format!(
                "this process joined a {} group but now trains on {device:?}; keep every run of one launch on one \
                 kind of device",
                g.backend.name()
            )));
        }
        return Ok(Some(g.clone()));
    }
    let g = Arc::new(ProcessGroup::join(&launch, backend, timeout_from_env()?)?);
    *slot = Some(g.clone());
    Ok(Some(g))
}

/// Leaves the group joined by [`join_from_env`] (after a last barrier, so that no rank tears down its
/// connections while another still uses them); nothing without one.
pub fn leave() -> Result<()> {
    let g = GROUP.lock().unwrap_or_else(|e| e.into_inner()).take();
    match g {
        Some(g) => g.barrier(),
        None => Ok(()),
    }
}

/// How long the other processes of a launch get to stop by themselves once one has failed (they fail at
/// their next collective, naming it) before they are killed.
const LAUNCH_GRACE: Duration = Duration::from_secs(30);

/// Runs `command` as `nproc` processes on this machine, as `torchrun --nproc-per-node` does: each gets
/// `RANK` = `LOCAL_RANK` = its index, `WORLD_SIZE` = `nproc`, `MASTER_ADDR` = 127.0.0.1 and `MASTER_PORT` =
/// `port` (a free one when `None`). Waits for all; once one fails the others get a grace period to stop,
/// then are killed. Returns the exit code of the first process to fail (0 when all succeed; 128 + N for one
/// killed by signal N, as a shell reports it).
pub fn launch(nproc: usize, port: Option<u16>, command: &[String]) -> Result<i32> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| Error::Config("lisa launch needs a command after `--`, e.g. `-- lisa train ...`".into()))?;
    if nproc == 0 {
        return Err(Error::Config("--nproc must be at least 1".into()));
    }
    let port = match port {
        Some(p) => p,
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::Distributed(format!("no free port for the rendezvous ({e}); pass --master-port")))?
            .port(),
    };
    // `lisa` means this program, wherever it is installed.
    let exe = match program.as_str() {
        "lisa" => std::env::current_exe().map_err(|e| Error::io("lisa", e))?,
        p => p.into(),
    };
    let mut children = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let child = std::process::Command::new(&exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .map_err(|e| Error::io(&exe, e))?;
        children.push(Some(child));
    }
    let mut first_failure: Option<(usize, std::process::ExitStatus)> = None;
    let mut failed_at = None;
    loop {
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait().map_err(|e| Error::io(&exe, e))? {
                *slot = None;
                if !status.success() && first_failure.is_none() {
                    first_failure = Some((rank, status));
                    failed_at = Some(std::time::Instant::now());
                }
            }
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        if failed_at.is_some_and(|t| t.elapsed() > LAUNCH_GRACE) {
            for child in children.iter_mut().flatten() {
                let _ = child.kill();
                let _ = child.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match first_failure {
        Some((rank, status)) => {
            let (how, code) = failure(status);
            eprintln!("lisa launch: rank {rank} of {nproc} failed first ({how})");
            Ok(code)
        }
        None => Ok(0),
    }
}

/// How a failed process ended, in words, and the exit code that reports it (never 0).
fn failure(status: std::process::ExitStatus) -> (String, i32) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (format!("exit code {code}"), if code == 0 { 1 } else { code }),
        (None, Some(sig)) => {
            let name = match sig {
                1 => " (SIGHUP)",
                2 => " (SIGINT)",
                6 => " (SIGABRT)",
                9 => " (SIGKILL, e.g. the out-of-memory killer)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            (format!("killed by signal {sig}{name}"), 128 + sig)
        }
        (None, None) => ("ended without an exit code".into(), 1),
    }
}

#[cfg(lisa_c10d)]
mod ffi {
    use std::ffi::{c_char, c_int, c_longlong, c_void, CStr, CString};
    use std::time::Duration;

    use tch::Tensor;

    use super::{Backend, Launch};

    pub const COMPILED: bool = true;

    /// The shim's `Group*`.
    pub struct Raw(*mut c_void);

    extern "C" {
        fn lisa_dist_backends() -> c_int;
        fn lisa_dist_free(s: *mut c_char);
        fn lisa_dist_join(
            backend: c_int,
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            timeout_ms: c_longlong,
            device: c_int,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        fn lisa_dist_peer(g: *mut c_void, rank: c_int) -> *const c_char;
        fn lisa_dist_all_reduce(
            g: *mut c_void,
            t: *const *mut c_void,
            n: c_int,
            avg: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        fn lisa_dist_broadcast(
            g: *mut c_void,
            t: *const *mut c_void,
            n: c_int,
            root: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        fn lisa_dist_barrier(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        fn lisa_dist_destroy(g: *mut c_void);
    }

    fn take(err: *mut c_char) -> String {
        if err.is_null() {
            return "unknown error".into();
        }
        // SAFETY: the shim hands out NUL-terminated strings from malloc, freed here once.
        let s = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
        unsafe { lisa_dist_free(err) };
        s
    }

    fn status(rc: c_int, err: *mut c_char) -> Result<(), String> {
        if rc == 0 {
            Ok(())
        } else {
            Err(take(err))
        }
    }

    /// tch's tensor handle is a `torch::Tensor*`, what the shim takes.
    fn ptrs(tensors: &[&Tensor]) -> Vec<*mut c_void> {
        tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect()
    }

    pub fn backends() -> i32 {
        // SAFETY: no arguments, no state.
        unsafe { lisa_dist_backends() }
    }

    pub fn join(backend: Backend, l: &Launch, timeout: Duration, device: i32) -> Result<Raw, String> {
        let host = CString::new(l.master_addr.as_str()).map_err(|_| "MASTER_ADDR contains a NUL byte".to_string())?;
        let mut err = std::ptr::null_mut();
        let b = match backend {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        };
        let ms = timeout.as_millis().min(i64::MAX as u128) as c_longlong;
        // SAFETY: valid C string and out-pointer; the shim catches every C++ exception.
        let g = unsafe {
            let (rank, world) = (l.rank as c_int, l.world_size as c_int);
            lisa_dist_join(b, host.as_ptr(), l.master_port.into(), rank, world, ms, device, &mut err)
        };
        if g.is_null() {
            Err(take(err))
        } else {
            Ok(Raw(g))
        }
    }

    pub fn peer(g: &Raw, rank: usize) -> String {
        // SAFETY: the string lives as long as the group.
        let p = unsafe { lisa_dist_peer(g.0, rank as c_int) };
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    }

    pub fn all_reduce(g: &Raw, tensors: &[&Tensor], average: bool) -> Result<(), String> {
        let p = ptrs(tensors);
        let mut err = std::ptr::null_mut();
        // SAFETY: live tensors for the duration of the call.
        let rc = unsafe { lisa_dist_all_reduce(g.0, p.as_ptr(), p.len() as c_int, average.into(), &mut err) };
        status(rc, err)
    }

    pub fn broadcast(g: &Raw, tensors: &[&Tensor], root: usize) -> Result<(), String> {
        let p = ptrs(tensors);
        let mut err = std::ptr::null_mut();
        // SAFETY: live tensors for the duration of the call.
        let rc = unsafe { lisa_dist_broadcast(g.0, p.as_ptr(), p.len() as c_int, root as c_int, &mut err) };
        status(rc, err)
    }

    pub fn barrier(g: &Raw) -> Result<(), String> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a live group.
        let rc = unsafe { lisa_dist_barrier(g.0, &mut err) };
        status(rc, err)
    }

    pub fn destroy(g: &mut Raw) {
        if !g.0.is_null() {
            // SAFETY: destroyed once; the pointer is cleared.
            unsafe { lisa_dist_destroy(g.0) };
            g.0 = std::ptr::null_mut();
        }
    }
}

/// Without the shim (libtorch's c10d headers missing at build time) every backend is absent.
#[cfg(not(lisa_c10d))]
mod ffi {
    use std::time::Duration;

    use tch::Tensor;

    use super::{Backend, Launch};

    pub const COMPILED: bool = false;

    pub struct Raw;

    pub fn backends() -> i32 {
        0
    }
    pub fn join(_: Backend, _: &Launch, _: Duration, _: i32) -> Result<Raw, String> {
        Err("no distributed support in this build".into())
    }
    pub fn peer(_: &Raw, _: usize) -> String {
        String::new()
    }
    pub fn all_reduce(_: &Raw, _: &[&Tensor], _: bool) -> Result<(), String> {
        Err("no distributed support in this build".into())
    }
    pub fn broadcast(_: &Raw, _: &[&Tensor], _: usize) -> Result<(), String> {
        Err("no distributed support in this build".into())
    }
    pub fn barrier(_: &Raw) -> Result<(), String> {
        Err("no distributed support in this build".into())
    }
    pub fn destroy(_: &mut Raw) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    #[test]
    fn the_launch_comes_from_torchruns_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        let l = Launch::from_vars(vars(&[("WORLD_SIZE", "4"), ("RANK", "3"), ("MASTER_PORT", "1234")]));
        let l = l.unwrap().unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank, l.master_port), (3, 4, 3, 1234));
        assert_eq!(l.master_addr, "127.0.0.1");
        let bad_launches: [&'static [(&str, &str)]; 3] =
            [&[("WORLD_SIZE", "2")], &[("WORLD_SIZE", "2"), ("RANK", "2")], &[("WORLD_SIZE", "x"), ("RANK", "0")]];
        for bad in bad_launches {
            let e = Launch::from_vars(vars(bad)).unwrap_err().to_string();
            assert!(!e.contains('\n') && e.contains("launch with torchrun"), "{e}");
        }
        // A backend this build lacks is refused before any connection, saying what to install.
        for backend in [Backend::Gloo, Backend::Nccl].into_iter().filter(|b| !b.is_available()) {
            let e = ProcessGroup::join(&l, backend, Duration::from_secs(1)).err().unwrap().to_string();
            assert!(!e.contains('\n') && e.contains("4 processes asked for") && e.contains("rebuild"), "{e}");
        }
    }

    /// The role a re-invoked test binary plays (see [`spawn_rank`]); unset in a normal test run.
    const ROLE: &str = "LISA_TEST_DIST_ROLE";

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Runs this test binary's `test` alone as rank `rank` of `world`, in role `role`.
    fn spawn_rank(test: &str, role: &str, rank: usize, world: usize, port: u16) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("LISA_DIST_TIMEOUT_S", "30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits for `child` at most `limit`, killing it past that; (success, stdout + stderr).
    fn wait_for(mut child: Child, limit: Duration) -> (bool, String) {
        let start = Instant::now();
        let ok = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status.success();
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut text = String::new();
        use std::io::Read;
        child.stdout.take().unwrap().read_to_string(&mut text).unwrap();
        child.stderr.take().unwrap().read_to_string(&mut text).unwrap();
        (ok, text)
    }

    fn collectives_as_a_rank() {
        let g = join_from_env(Device::Cpu).unwrap().unwrap();
        let r = g.rank() as f64;
        let t = Tensor::from_slice(&[r + 1.0, 10.0 * (r + 1.0)]);
        g.all_reduce_mean(&[&t]).unwrap();
        assert_eq!(Vec::<f64>::try_from(&t).unwrap(), vec![1.5, 15.0]);
        let b = Tensor::from_slice(&[r as f32; 3]);
        g.broadcast(&[&b], 1).unwrap();
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![1.0; 3]);
        // Gradients of two kinds (two buckets), averaged in place.
        let w = Tensor::full([2, 3], r + 1.0, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let v = Tensor::full([4], 2.0 * r, (Kind::Double, Device::Cpu)).set_requires_grad(true);
        ((&w * &w).sum(Kind::Float) + v.sum(Kind::Double).to_kind(Kind::Float) * (r + 1.0)).backward();
        g.average_gradients(&[("w".into(), w.shallow_clone()), ("v".into(), v.shallow_clone())]).unwrap();
        assert_eq!(Vec::<f32>::try_from(w.grad().reshape([-1])).unwrap(), vec![3.0; 6], "mean of 2·1 and 2·2");
        assert_eq!(Vec::<f64>::try_from(v.grad()).unwrap(), vec![1.5; 4], "mean of 1 and 2");
        assert_eq!(g.mean_of(&[r, 4.0]).unwrap(), vec![0.5, 4.0]);
        leave().unwrap();
        println!("rank {} done", g.rank());
    }

    /// Rank 0 keeps all-reducing; rank 1 joins and then stalls until it is killed.
    fn wait_for_a_dead_peer_as_a_rank() {
        let g = join_from_env(Device::Cpu).unwrap().unwrap();
        println!("joined");
        if g.rank() == 1 {
            std::thread::sleep(Duration::from_secs(120));
            return;
        }
        let t = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let e = g.all_reduce_mean(&[&t]).unwrap_err();
        println!("ERROR: {e}");
        std::process::exit(1);
    }

    #[test]
    fn two_processes_all_reduce_broadcast_and_wait_at_a_barrier_over_gloo() {
        match std::env::var(ROLE).as_deref() {
            Ok("collectives") => return collectives_as_a_rank(),
            Ok(_) => return,
            Err(_) => {}
        }
        if !Backend::Gloo.is_available() {
            eprintln!("skipped: this build has no Gloo backend");
            return;
        }
        let test = "distributed::tests::two_processes_all_reduce_broadcast_and_wait_at_a_barrier_over_gloo";
        let port = free_port();
        let ranks: Vec<Child> = (0..2).map(|r| spawn_rank(test, "collectives", r, 2, port)).collect();
        for (r, child) in ranks.into_iter().enumerate() {
            let (ok, text) = wait_for(child, Duration::from_secs(60));
            assert!(ok && text.contains(&format!("rank {r} done")), "rank {r}:\n{text}");
        }
    }

    #[test]
    fn a_killed_rank_makes_the_other_fail_naming_it_instead_of_hanging() {
        match std::env::var(ROLE).as_deref() {
            Ok("dead-peer") => return wait_for_a_dead_peer_as_a_rank(),
            Ok(_) => return,
            Err(_) => {}
        }
        if !Backend::Gloo.is_available() {
            eprintln!("skipped: this build has no Gloo backend");
            return;
        }
        let test = "distributed::tests::a_killed_rank_makes_the_other_fail_naming_it_instead_of_hanging";
        let port = free_port();
        let rank0 = spawn_rank(test, "dead-peer", 0, 2, port);
        let mut rank1 = spawn_rank(test, "dead-peer", 1, 2, port);
        // Killed once it has joined (its stdout says so), while rank 0 waits in an all-reduce.
        let mut out = rank1.stdout.take().unwrap();
        let mut seen = String::new();
        let start = Instant::now();
        while !seen.contains("joined") && start.elapsed() < Duration::from_secs(60) {
            let mut buf = [0u8; 256];
            use std::io::Read;
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(seen.contains("joined"), "rank 1 did not join: {seen}");
        std::thread::sleep(Duration::from_millis(300));
        let pid = rank1.id();
        rank1.kill().unwrap();
        let started = Instant::now();
        // Within the timeout of collectives (30 s here), not a hang.
        let (ok, text) = wait_for(rank0, Duration::from_secs(45));
        let _ = rank1.wait();
        assert!(!ok, "rank 0 should fail:\n{text}");
        let line = text.lines().find(|l| l.starts_with("ERROR: ")).unwrap_or_else(|| panic!("no error line:\n{text}"));
        assert!(line.contains(&format!("rank 1 (pid {pid}) exited")), "{line}");
        assert!(started.elapsed() < Duration::from_secs(40));
    }
}
