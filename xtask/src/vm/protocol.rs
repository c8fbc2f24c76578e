//! What the VM says on its data serial port (ttyS0): the script's output, plus protocol lines
//! written by /init and tests/vm/lib.sh:
//!
//! - `KMODMON-VM-BOOTED release=R uptime=S` when /init is about to run the script;
//! - `KMODMON-VM-FILE-BEGIN NAME`, base64 lines, `KMODMON-VM-FILE-END NAME`: a file sent back;
//! - `KMODMON-VM-INIT-ERROR ...`: /init could not set something up;
//! - `KMODMON-VM-RESULT rc=N uptime=S`: the script's exit code, just before power-off.
use std::collections::BTreeMap;

use base64::Engine as _;

const BOOTED: &str = "KMODMON-VM-BOOTED ";
const RESULT: &str = "KMODMON-VM-RESULT ";
const FILE_BEGIN: &str = "KMODMON-VM-FILE-BEGIN ";
const FILE_END: &str = "KMODMON-VM-FILE-END ";
const INIT_ERROR: &str = "KMODMON-VM-INIT-ERROR ";

#[derive(Debug, Default)]
pub struct Transcript {
    /// The script's own output (protocol lines removed).
    pub output: Vec<String>,
    /// Files sent back by name.
    pub files: BTreeMap<String, Vec<u8>>,
    /// (kernel release, uptime in seconds) when the script started.
    pub booted: Option<(String, f64)>,
    /// (exit code, uptime in seconds) when the script ended.
    pub result: Option<(i32, Option<f64>)>,
    /// /init setup failures and malformed protocol lines.
    pub errors: Vec<String>,
    open_file: Option<(String, String)>,
}

/// `key=value` fields of a protocol line.
fn field<'a>(rest: &'a str, key: &str) -> Option<&'a str> {
    rest.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

impl Transcript {
    /// Takes one line (without its newline); returns it when it is script output.
    pub fn feed(&mut self, line: &str) -> Option<String> {
        let line = line.trim_end_matches('\r');
        if let Some((name, data)) = &mut self.open_file {
            if let Some(end) = line.strip_prefix(FILE_END) {
                if end.trim() != name {
                    self.errors
                        .push(format!("file {name:?} closed as {:?}", end.trim()));
                }
                let (name, data) = self.open_file.take().unwrap_or_default();
                match base64::engine::general_purpose::STANDARD.decode(data.as_bytes()) {
                    Ok(bytes) => {
                        self.files.insert(name, bytes);
                    }
                    Err(e) => self.errors.push(format!("file {name:?}: bad base64: {e}")),
                }
            } else {
                data.push_str(line.trim());
            }
            return None;
        }
        if let Some(rest) = line.strip_prefix(FILE_BEGIN) {
            self.open_file = Some((rest.trim().to_string(), String::new()));
        } else if let Some(rest) = line.strip_prefix(BOOTED) {
            let release = field(rest, "release").unwrap_or("?").to_string();
            let uptime = field(rest, "uptime")
                .and_then(|u| u.parse().ok())
                .unwrap_or(0.0);
            self.booted = Some((release, uptime));
        } else if let Some(rest) = line.strip_prefix(RESULT) {
            match field(rest, "rc").and_then(|rc| rc.parse().ok()) {
                Some(rc) => {
                    let uptime = field(rest, "uptime").and_then(|u| u.parse().ok());
                    self.result = Some((rc, uptime));
                }
                None => self.errors.push(format!("malformed result line {line:?}")),
            }
        } else if let Some(rest) = line.strip_prefix(INIT_ERROR) {
            self.errors.push(format!("/init: {rest}"));
        } else {
            self.output.push(line.to_string());
            return Some(line.to_string());
        }
        None
    }

    /// Called at the end of the stream.
    pub fn finish(&mut self) {
        if let Some((name, _)) = self.open_file.take() {
            self.errors
                .push(format!("file {name:?} was cut off (no end marker)"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_output_files_and_result() {
        let mut t = Transcript::default();
        let lines = [
            "KMODMON-VM-BOOTED release=6.1.0-56-cloud-amd64 uptime=1.93",
            "hello\r",
            "KMODMON-VM-FILE-BEGIN events.jsonl",
            "eyJraW5kIjoi",
            "bG9hZCJ9Cg==",
            "KMODMON-VM-FILE-END events.jsonl",
            "KMODMON-VM-INIT-ERROR failed: mount -t bpf bpf /sys/fs/bpf",
            "bye",
            "KMODMON-VM-RESULT rc=3 uptime=4.50",
        ];
        let echoed: Vec<String> = lines.iter().filter_map(|l| t.feed(l)).collect();
        t.finish();
        assert_eq!(echoed, ["hello", "bye"]);
        assert_eq!(t.output, ["hello", "bye"]);
        assert_eq!(t.files["events.jsonl"], b"{\"kind\":\"load\"}\n");
        assert_eq!(t.booted, Some(("6.1.0-56-cloud-amd64".to_string(), 1.93)));
        assert_eq!(t.result, Some((3, Some(4.5))));
        assert_eq!(t.errors, ["/init: failed: mount -t bpf bpf /sys/fs/bpf"]);
    }

    #[test]
    fn reports_cut_off_and_corrupt_files() {
        let mut t = Transcript::default();
        for l in [
            "KMODMON-VM-FILE-BEGIN a",
            "!!!",
            "KMODMON-VM-FILE-END a",
            "KMODMON-VM-FILE-BEGIN b",
            "QUJD",
        ] {
            t.feed(l);
        }
        t.finish();
        assert!(t.files.is_empty());
        assert_eq!(t.errors.len(), 2, "{:?}", t.errors);
        assert!(t.errors[0].contains("bad base64"));
        assert!(t.errors[1].contains("cut off"));
        assert_eq!(t.result, None);
    }

    #[test]
    fn malformed_result_is_an_error_not_a_result() {
        let mut t = Transcript::default();
        t.feed("KMODMON-VM-RESULT rc=x");
        assert_eq!(t.result, None);
        assert_eq!(t.errors.len(), 1);
    }
}
