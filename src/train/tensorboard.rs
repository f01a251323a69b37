//! TensorBoard event files beside a run's `metrics.csv`, written by the `tboard` crate when `train.report_to`
//! includes `tensorboard`; read them with `tensorboard --logdir runs/`.
//!
//! A run folder has one event file at a time, shared by every log of the run (training metrics, fidelity,
//! validation images): TensorBoard reads one run's files in name order and may skip events of a file that another
//! file of the same folder overtook. Resuming writes what PyTorch's `SummaryWriter(purge_step=…)` writes, a file
//! version and a session start at the first step not covered by the checkpoint, so TensorBoard drops the points that
//! the interrupted run logged after its last checkpoint, as `metrics.csv` does.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use tboard::tensorboard::{event::What, session_log::SessionStatus, SessionLog};
use tboard::EventWriter;

use crate::{Error, Result};

/// Where a run's metrics go besides its CSV/JSONL log (diffusers' `--report_to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportTo {
    /// TensorBoard event files in the run folder.
    Tensorboard,
}

/// The event file of one run folder, shared by the run's logs (see [`open`]).
pub struct EventLog {
    writer: EventWriter<File>,
    path: PathBuf,
}

/// Event files open in this process, by run folder; a folder's file closes when its last user drops it.
static OPEN: Mutex<Vec<(PathBuf, Weak<Mutex<EventLog>>)>> = Mutex::new(Vec::new());

/// The event log of the run folder `dir`: the one already open in this process, or a new event file. When
/// `resume_step` is given, events after it (logged by an interrupted run) are marked to be purged.
pub fn open(dir: &Path, resume_step: Option<u64>) -> Result<Arc<Mutex<EventLog>>> {
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    open.retain(|(_, log)| log.strong_count() > 0);
    if let Some(log) = open.iter().find(|(d, _)| d == dir).and_then(|(_, log)| log.upgrade()) {
        return Ok(log);
    }
    let fail = |e| io(dir, e);
    let mut writer = EventWriter::create(dir).map_err(fail)?;
    let path = writer.filename().cloned().unwrap_or_else(|| dir.to_path_buf());
    if let Some(step) = resume_step {
        let purge_from = step as i64 + 1;
        writer.write(purge_from, What::FileVersion("brain.Event:2".into())).map_err(fail)?;
        let start = SessionLog { status: SessionStatus::Start as i32, checkpoint_path: String::new(), msg: String::new() };
        writer.write(purge_from, What::SessionLog(start)).map_err(fail)?;
    }
    let log = Arc::new(Mutex::new(EventLog { writer, path }));
    open.push((dir.to_path_buf(), Arc::downgrade(&log)));
    Ok(log)
}

/// The event log already open for `dir` in this process, if any.
pub fn opened(dir: &Path) -> Option<Arc<Mutex<EventLog>>> {
    let open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    open.iter().find(|(d, _)| d == dir).and_then(|(_, log)| log.upgrade())
}

impl EventLog {
    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `value` under `tag` at `step`; non-finite values (metrics not measured at this step) are left out.
    pub fn scalar(&mut self, step: u64, tag: &str, value: f64) -> Result<()> {
        if !value.is_finite() {
            return Ok(());
        }
        let path = self.path.clone();
        self.writer.write_scalar(step as i64, tag, value as f32).map_err(|e| io(&path, e))
    }

    /// Writes the PNG file at `png` as an image under `tag` at `step`.
    pub fn image(&mut self, step: u64, tag: &str, png: &Path) -> Result<()> {
        let bytes = std::fs::read(png).map_err(|e| Error::io(png, e))?;
        let decoder = png::Decoder::new(bytes.as_slice());
        let info = decoder.read_info().map_err(|e| Error::format(png, format!("not a readable PNG: {e}")))?;
        let (width, height) = (info.info().width as i32, info.info().height as i32);
        let colorspace = info.info().color_type.samples() as i32;
        drop(info);
        let path = self.path.clone();
        self.writer.write_image(step as i64, tag, width, height, colorspace, bytes).map_err(|e| io(&path, e))
    }

    /// Flushes written events to disk.
    pub fn flush(&mut self) -> Result<()> {
        let path = self.path.clone();
        self.writer.flush().map_err(|e| io(&path, e))
    }
}

fn io(path: &Path, e: tboard::Error) -> Error {
    match e {
        tboard::Error::Io(e) => Error::io(path, e),
        e => Error::format(path, format!("writing TensorBoard events: {e}")),
    }
}

/// Mirrors a validation image written at `png` into the event log of run folder `dir`, if one is open.
pub fn mirror_image(dir: &Path, step: u64, tag: &str, png: &Path) -> Result<()> {
    match opened(dir) {
        Some(log) => {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            log.image(step, tag, png)?;
            log.flush()
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tboard::tensorboard::summary::value::Value;

    fn events(dir: &Path) -> Vec<tboard::tensorboard::Event> {
        let mut out = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files.iter().filter(|f| f.file_name().unwrap().to_string_lossy().starts_with("events.out")) {
            out.extend(tboard::SummaryReader::new(File::open(f).unwrap()).map(|e| e.unwrap()));
        }
        out
    }

    #[test]
    fn logs_of_one_folder_share_one_file_and_resuming_marks_the_purge() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(dir.path(), None).unwrap();
        let b = open(dir.path(), None).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        a.lock().unwrap().scalar(10, "train/loss", 0.5).unwrap();
        b.lock().unwrap().scalar(10, "fidelity/edge_f1", f64::NAN).unwrap();
        a.lock().unwrap().flush().unwrap();
        drop((a, b));
        assert!(opened(dir.path()).is_none());
        let first = events(dir.path());
        let scalars: Vec<(i64, String, f32)> = first
            .iter()
            .filter_map(|e| match &e.what {
                Some(What::Summary(s)) => s.value.first().map(|v| match v.value {
                    Some(Value::SimpleValue(x)) => (e.step, v.tag.clone(), x),
                    _ => panic!("not a scalar"),
                }),
                _ => None,
            })
            .collect();
        assert_eq!(scalars, vec![(10, "train/loss".to_string(), 0.5)]);

        std::thread::sleep(std::time::Duration::from_millis(1100)); // event file names carry the second
        let c = open(dir.path(), Some(7)).unwrap();
        c.lock().unwrap().flush().unwrap();
        let path = c.lock().unwrap().path().to_path_buf();
        let resumed: Vec<_> = tboard::SummaryReader::new(File::open(path).unwrap()).map(|e| e.unwrap()).collect();
        assert!(resumed.iter().any(|e| e.step == 8
            && matches!(&e.what, Some(What::SessionLog(s)) if s.status == SessionStatus::Start as i32)));
    }
}
