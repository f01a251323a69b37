//! Metric logs (CSV or JSON lines, optionally mirrored to TensorBoard), one row per logged step, and a progress bar.
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::tensorboard::EventLog;
use crate::{Error, Result};

/// The format of the metrics file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `metrics.csv` with a header row.
    #[default]
    Csv,
    /// `metrics.jsonl`, one JSON object a line.
    Jsonl,
}

/// Appends rows of `(name, value)` metrics to `metrics.csv` or `metrics.jsonl` in a run folder.
pub struct MetricsLog {
    path: PathBuf,
    format: LogFormat,
    columns: Option<Vec<String>>,
    file: fs::File,
    events: Option<(Arc<Mutex<EventLog>>, String)>,
}

impl MetricsLog {
    /// Opens the log in `dir`. When resuming from `resume_step`, rows logged after that step (by a run
    /// that was killed after its last checkpoint) are dropped so the log stays one consistent curve;
    /// without resuming, an existing log is replaced.
    pub fn open(dir: &Path, format: LogFormat, resume_step: Option<u64>) -> Result<Self> {
        let path = dir.join(match format {
            LogFormat::Csv => "metrics.csv",
            LogFormat::Jsonl => "metrics.jsonl",
        });
        Self::open_file(path, format, resume_step)
    }

    /// [`MetricsLog::open`] for a log of another name (e.g. `fidelity.csv`).
    pub fn open_file(path: PathBuf, format: LogFormat, resume_step: Option<u64>) -> Result<Self> {
        let mut kept = Vec::new();
        let mut columns = None;
        if let (Some(resume), true) = (resume_step, path.exists()) {
            let f = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let line = line.map_err(|e| Error::io(&path, e))?;
                if format == LogFormat::Csv && i == 0 {
                    columns = Some(line.split(',').map(str::to_owned).collect());
                    kept.push(line);
                    continue;
                }
                if row_step(&line, format).is_some_and(|s| s <= resume) {
                    kept.push(line);
                }
            }
        }
        let file = if resume_step.is_some() {
            // The kept rows go to a new file renamed over the old one: truncating and rewriting in place
            // would lose them if the run were killed in between.
            let text: String = kept.iter().map(|l| format!("{l}\n")).collect();
            crate::weights::write_atomic(&path, text.as_bytes())?;
            fs::OpenOptions::new().append(true).open(&path)
        } else {
            fs::File::create(&path)
        };
        let file = file.map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, format, columns, file, events: None })
    }

    /// Also writes every row to the TensorBoard event log `events`, each metric tagged `{section}/{name}`.
    pub fn mirror_to(&mut self, events: Arc<Mutex<EventLog>>, section: &str) {
        self.events = Some((events, section.to_owned()));
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one row. The first CSV row fixes the columns; later rows must use the same names.
    pub fn write(&mut self, step: u64, metrics: &[(String, f64)]) -> Result<()> {
        let line = match self.format {
            LogFormat::Csv => {
                if self.columns.is_none() {
                    let mut cols = vec!["step".to_string()];
                    cols.extend(metrics.iter().map(|(n, _)| n.clone()));
                    writeln!(self.file, "{}", cols.join(",")).map_err(|e| Error::io(&self.path, e))?;
                    self.columns = Some(cols);
                }
                let mut cells = vec![step.to_string()];
                cells.extend(metrics.iter().map(|(_, v)| format!("{v}")));
                cells.join(",")
            }
            LogFormat::Jsonl => {
                let mut obj = serde_json::Map::new();
                obj.insert("step".into(), step.into());
                for (n, v) in metrics {
                    obj.insert(n.clone(), serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into));
                }
                serde_json::Value::Object(obj).to_string()
            }
        };
        writeln!(self.file, "{line}").map_err(|e| Error::io(&self.path, e))?;
        if let Some((events, section)) = &self.events {
            let mut events = events.lock().unwrap_or_else(|e| e.into_inner());
            for (name, value) in metrics {
                events.scalar(step, &format!("{section}/{name}"), *value)?;
            }
        }
        Ok(())
    }

    /// Flushes buffered rows to disk (called at checkpoints).
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().and_then(|_| self.file.sync_data()).map_err(|e| Error::io(&self.path, e))?;
        match &self.events {
            Some((events, _)) => events.lock().unwrap_or_else(|e| e.into_inner()).flush(),
            None => Ok(()),
        }
    }
}

fn row_step(line: &str, format: LogFormat) -> Option<u64> {
    match format {
        LogFormat::Csv => line.split(',').next()?.parse().ok(),
        LogFormat::Jsonl => serde_json::from_str::<serde_json::Value>(line).ok()?.get("step")?.as_u64(),
    }
}

/// A progress bar on stderr showing step, loss and ETA; plain periodic lines when stderr is not a terminal.
pub struct Progress {
    bar: indicatif::ProgressBar,
    plain_every: u64,
    total: u64,
}

impl Progress {
    /// A bar for steps `start..total`.
    pub fn new(start: u64, total: u64, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = if quiet || !std::io::stderr().is_terminal() {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("static template"),
        );
        bar.set_position(start);
        let plain_every = if quiet || std::io::stderr().is_terminal() { 0 } else { (total / 20).max(1) };
        Self { bar, plain_every, total }
    }

    /// Reports that `step` finished with the given status message.
    pub fn update(&self, step: u64, msg: &str) {
        self.bar.set_position(step);
        self.bar.set_message(msg.to_owned());
        if self.plain_every > 0 && (step % self.plain_every == 0 || step == self.total) {
            eprintln!("step {step}/{}: {msg}", self.total);
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, msg: &str) {
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_drops_rows_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        for format in [LogFormat::Csv, LogFormat::Jsonl] {
            let mut log = MetricsLog::open(dir.path(), format, None).unwrap();
            for s in 1..=5 {
                log.write(s, &[("loss".into(), s as f64 / 10.0)]).unwrap();
            }
            drop(log);
            let mut log = MetricsLog::open(dir.path(), format, Some(3)).unwrap();
            log.write(4, &[("loss".into(), 9.0)]).unwrap();
            let text = fs::read_to_string(log.path()).unwrap();
            let rows: Vec<&str> = text.lines().collect();
            match format {
                LogFormat::Csv => assert_eq!(rows, vec!["step,loss", "1,0.1", "2,0.2", "3,0.3", "4,9"]),
                LogFormat::Jsonl => {
                    assert_eq!(rows.len(), 4);
                    assert_eq!(rows[3], r#"{"loss":9.0,"step":4}"#);
                }
            }
        }
    }
}
