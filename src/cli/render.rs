//! How the client shows what happens: progress bars on a terminal, plain
//! lines otherwise, or one JSON object per line with `--json`.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use crate::proto::{self, run_event::Event};

/// The output mode of a client command.
pub struct Render {
    mode: Mode,
    bars: HashMap<String, ProgressBar>,
    last_line: HashMap<String, Instant>,
}

enum Mode {
    Json,
    Bars(MultiProgress),
    Plain,
}

impl Render {
    /// JSON lines if `json`, bars on a terminal, plain lines otherwise.
    pub fn new(json: bool) -> Self {
        let mode = if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() {
            Mode::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Mode::Plain
        };
        Self {
            mode,
            bars: HashMap::new(),
            last_line: HashMap::new(),
        }
    }

    /// Whether JSON lines are printed.
    pub fn is_json(&self) -> bool {
        matches!(self.mode, Mode::Json)
    }

    /// Prints a JSON object as one line on standard output.
    pub fn json_line(&self, value: &Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
    }

    /// A human message on standard error (above any bars).
    pub fn note(&self, line: &str) {
        match &self.mode {
            Mode::Json => {}
            Mode::Bars(mp) => {
                let _ = mp.println(line);
            }
            Mode::Plain => eprintln!("{line}"),
        }
    }

    /// Shows byte progress of `label`.
    pub fn bytes(&mut self, label: &str, done: u64, total: u64) {
        match &self.mode {
            Mode::Json => {}
            Mode::Bars(mp) => {
                let bar = self.bars.entry(label.to_owned()).or_insert_with(|| {
                    let bar = mp.add(ProgressBar::new(total));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{msg:24!} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta}",
                        )
                        .expect("template is valid")
                        .progress_chars("=> "),
                    );
                    bar.set_message(label.to_owned());
                    bar
                });
                bar.set_length(total);
                bar.set_position(done);
                if done >= total {
                    bar.finish();
                }
            }
            Mode::Plain => {
                let due = self
                    .last_line
                    .get(label)
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due || done >= total {
                    self.last_line.insert(label.to_owned(), Instant::now());
                    eprintln!("{label}: {} / {}", size(done), size(total));
                }
            }
        }
    }

    /// Shows the function's progress.
    pub fn fraction(&mut self, label: &str, fraction: f64, message: &str) {
        match &self.mode {
            Mode::Json => {}
            Mode::Bars(mp) => {
                let bar = self.bars.entry(label.to_owned()).or_insert_with(|| {
                    let bar = mp.add(ProgressBar::new(1000));
                    bar.set_style(
                        ProgressStyle::with_template("{prefix:24!} [{bar:30}] {percent:>3}% {msg}")
                            .expect("template is valid")
                            .progress_chars("=> "),
                    );
                    bar.set_prefix(label.to_owned());
                    bar
                });
                bar.set_position((fraction.clamp(0.0, 1.0) * 1000.0) as u64);
                bar.set_message(message.to_owned());
            }
            Mode::Plain => {
                let due = self
                    .last_line
                    .get(label)
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due {
                    self.last_line.insert(label.to_owned(), Instant::now());
                    eprintln!("{label}: {:.0}% {message}", fraction.clamp(0.0, 1.0) * 100.0);
                }
            }
        }
    }

    /// Removes every bar.
    pub fn finish(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
    }

    /// Shows one Run event.
    pub fn event(&mut self, call_index: u32, event: &Event) {
        if self.is_json() {
            self.json_line(&event_json(call_index, event));
            return;
        }
        match event {
            Event::Accepted(a) => self.note(&format!("accepted: request {}", a.request_id)),
            Event::Staging(p) | Event::Uploading(p) if !p.retrying.is_empty() => self.note(&format!(
                "store unavailable for {}, retrying for {} more seconds: {}",
                p.parameter, p.retry_seconds_left, p.retrying
            )),
            Event::Staging(p) => self.bytes(&format!("stage {}", p.parameter), p.bytes_done, p.bytes_total),
            Event::Staged(s) => self.note(&format!(
                "staged {} ({}, crc64nvme {})",
                s.parameter,
                size(s.size),
                s.crc64nvme
            )),
            Event::Invoking(i) => self.note(&format!(
                "invoking {}@{} {}",
                i.prefab_id, i.version, i.function_name
            )),
            Event::RuntimeProgress(p) => self.fraction("running", p.fraction, &p.message),
            Event::RuntimeLog(l) => self.note(&format!("  | {}", l.line)),
            Event::Uploading(p) => {
                self.bytes(&format!("upload {}", p.parameter), p.bytes_done, p.bytes_total)
            }
            Event::Uploaded(u) => self.note(&format!(
                "uploaded {} -> {} ({})",
                u.parameter,
                u.url,
                size(u.size)
            )),
            Event::CallCompleted(_) | Event::RunCompleted(_) | Event::Heartbeat(_) => {}
        }
    }
}

/// A size in the unit that fits: `62 B`, `1.5 KiB`, `3.0 GiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A Run event as JSON, with the proto's field names in lowerCamelCase.
pub fn event_json(call_index: u32, event: &Event) -> Value {
    let transfer = |p: &proto::TransferProgress| {
        let mut body = json!({"parameter": p.parameter, "url": p.url, "bytesDone": p.bytes_done, "bytesTotal": p.bytes_total});
        if !p.retrying.is_empty() {
            body["retrying"] = json!(p.retrying);
            body["retrySecondsLeft"] = json!(p.retry_seconds_left);
        }
        body
    };
    let uploaded = |u: &proto::OutputUploaded| json!({"parameter": u.parameter, "url": u.url, "size": u.size, "crc64nvme": u.crc64nvme});
    let (kind, body) = match event {
        Event::Accepted(a) => ("accepted", json!({"requestId": a.request_id, "calls": a.calls})),
        Event::Staging(p) => ("staging", transfer(p)),
        Event::Staged(s) => (
            "staged",
            json!({"parameter": s.parameter, "url": s.url, "path": s.path, "size": s.size, "crc64nvme": s.crc64nvme}),
        ),
        Event::Invoking(i) => (
            "invoking",
            json!({"prefabId": i.prefab_id, "version": i.version, "functionName": i.function_name}),
        ),
        Event::RuntimeProgress(p) => (
            "runtimeProgress",
            json!({"fraction": p.fraction, "message": p.message}),
        ),
        Event::RuntimeLog(l) => (
            "runtimeLog",
            json!({"stream": l.stream().as_str_name(), "line": l.line}),
        ),
        Event::Uploading(p) => ("uploading", transfer(p)),
        Event::Uploaded(u) => ("uploaded", uploaded(u)),
        Event::CallCompleted(c) => (
            "callCompleted",
            json!({
                "outputs": c.outputs.clone().map(|s| Value::Object(proto::struct_to_json(s))),
                "files": c.files.iter().map(uploaded).collect::<Vec<_>>(),
            }),
        ),
        Event::RunCompleted(r) => (
            "runCompleted",
            json!({"requestId": r.request_id, "durationMs": r.duration_ms}),
        ),
        Event::Heartbeat(_) => ("heartbeat", json!({})),
    };
    json!({"callIndex": call_index, kind: body})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_shown_in_the_unit_that_fits() {
        assert_eq!(size(62), "62 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3 << 20), "3.0 MiB");
        assert_eq!(size(5 << 30), "5.0 GiB");
    }

    #[test]
    fn a_retrying_transfer_says_so_in_json_and_quiet_ones_do_not() {
        let mut p = proto::TransferProgress {
            parameter: "file".into(),
            url: "s3://b/k".into(),
            bytes_done: 10,
            bytes_total: 20,
            ..Default::default()
        };
        let quiet = event_json(0, &Event::Staging(p.clone()));
        assert!(quiet["staging"].get("retrying").is_none(), "{quiet}");
        p.retrying = "connection refused".into();
        p.retry_seconds_left = 95;
        let loud = event_json(0, &Event::Uploading(p));
        assert_eq!(loud["uploading"]["retrying"], "connection refused");
        assert_eq!(loud["uploading"]["retrySecondsLeft"], 95);
        assert_eq!(loud["uploading"]["bytesDone"], 10);
    }
}
