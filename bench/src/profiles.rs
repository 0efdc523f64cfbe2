//! The fio profiles: which job file, with which environment, what it measures, and how to read
//! a number out of fio's JSON.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::proc;

/// What a profile's number mostly reflects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Measures {
    /// Cached data or metadata: warmed through the target right before measuring.
    PageCache,
    /// The device: O_DIRECT or fsync-bound; caches dropped right before measuring.
    Device,
}

impl Measures {
    /// Label for reports.
    pub fn label(self) -> &'static str {
        match self {
            Measures::PageCache => "page-cache",
            Measures::Device => "device",
        }
    }
}

/// Which fio number is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Metric {
    /// Read + write bandwidth, MiB/s.
    Bandwidth,
    /// Read + write I/O operations per second (files per second for the metadata engines).
    Iops,
}

impl Metric {
    /// Unit label.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Bandwidth => "MiB/s",
            Metric::Iops => "IOPS",
        }
    }
}

/// How many parallel jobs a profile runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Jobs {
    /// One job.
    One,
    /// `--many-jobs` jobs (default 4).
    Many,
}

/// Which file count the profile's `NRFILES` gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Files {
    /// The profile uses no `NRFILES`.
    None,
    /// `--meta-files`, split across the jobs.
    Meta,
    /// `--small-files` files of this many bytes each (`FILESET` = count x size).
    Small(u64),
}

/// One fio profile.
#[derive(Debug)]
pub(crate) struct Profile {
    /// Name used on the command line and in reports.
    pub name: &'static str,
    /// Job file in the fio directory.
    pub file: &'static str,
    /// Parallelism.
    pub jobs: Jobs,
    /// File count.
    pub files: Files,
    /// Page cache or device.
    pub measures: Measures,
    /// Reported number.
    pub metric: Metric,
    /// When not empty, one result row per fio job name (reporting group) in this list,
    /// instead of one row summed over all jobs.
    pub per_job: &'static [&'static str],
}

const fn p(name: &'static str, file: &'static str, jobs: Jobs, measures: Measures, metric: Metric) -> Profile {
    Profile { name, file, jobs, files: Files::None, measures, metric, per_job: &[] }
}

use Jobs::{Many, One};
use Measures::{Device, PageCache};
use Metric::{Bandwidth, Iops};

/// Every profile, in report order.
pub(crate) const PROFILES: &[Profile] = &[
    p("seq-read-1m", "seq-read-1m.fio", One, PageCache, Bandwidth),
    p("seq-read-1m-4j", "seq-read-1m.fio", Many, PageCache, Bandwidth),
    p("seq-write-1m", "seq-write-1m.fio", One, PageCache, Bandwidth),
    p("seq-write-1m-4j", "seq-write-1m.fio", Many, PageCache, Bandwidth),
    p("rand-read-4k", "rand-read-4k.fio", One, PageCache, Iops),
    p("rand-read-4k-uring", "rand-read-4k-uring.fio", One, PageCache, Iops),
    p("rand-write-4k", "rand-write-4k.fio", One, PageCache, Iops),
    p("rand-write-4k-uring", "rand-write-4k-uring.fio", One, PageCache, Iops),
    p("mixed-70-30", "mixed-70-30.fio", One, PageCache, Iops),
    p("seq-read-1m-direct", "seq-read-1m-direct.fio", One, Device, Bandwidth),
    p("seq-write-1m-direct", "seq-write-1m-direct.fio", One, Device, Bandwidth),
    p("rand-read-4k-direct", "rand-read-4k-direct.fio", One, Device, Iops),
    p("rand-write-4k-direct", "rand-write-4k-direct.fio", One, Device, Iops),
    p("fsync-write-4k", "fsync-write-4k.fio", One, Device, Iops),
    Profile {
        name: "meta-storm",
        file: "meta-storm.fio",
        jobs: One,
        files: Files::Meta,
        measures: PageCache,
        metric: Iops,
        per_job: &["create", "stat", "delete"],
    },
    Profile {
        name: "meta-storm-4j",
        file: "meta-storm.fio",
        jobs: Many,
        files: Files::Meta,
        measures: PageCache,
        metric: Iops,
        per_job: &["create", "stat", "delete"],
    },
    Profile { files: Files::Small(16 << 10), ..p("smallfile-read", "smallfile-read.fio", One, PageCache, Iops) },
    Profile { files: Files::Small(128 << 10), ..p("fileserver", "fileserver.fio", Many, PageCache, Bandwidth) },
    Profile { files: Files::Small(16 << 10), ..p("webserver", "webserver.fio", Many, PageCache, Iops) },
    Profile { files: Files::Small(16 << 10), ..p("varmail", "varmail.fio", Many, Device, Iops) },
];

/// Looks a profile up by name.
pub(crate) fn find(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// Sizes and durations shared by all profiles.
#[derive(Clone, Debug)]
pub(crate) struct FioParams {
    /// `SIZE`: bytes per job file (fio syntax, e.g. "256M").
    pub size: String,
    /// `RUNTIME` in seconds.
    pub runtime: u64,
    /// `JOBS` of the multi-job profiles.
    pub many_jobs: u32,
    /// Files of the metadata storms (total over the jobs).
    pub meta_files: u32,
    /// Files of the small-file and personality profiles.
    pub small_files: u32,
}

impl Profile {
    /// Result row names this profile produces.
    pub fn rows(&self) -> Vec<String> {
        if self.per_job.is_empty() {
            vec![self.name.to_owned()]
        } else {
            self.per_job.iter().map(|j| format!("{}:{j}", self.name)).collect()
        }
    }

    /// Unit of the rows.
    pub fn unit(&self) -> &'static str {
        if self.files == Files::Meta {
            "files/s"
        } else {
            self.metric.unit()
        }
    }

    fn env(&self, dir: &Path, params: &FioParams) -> Vec<(&'static str, String)> {
        let jobs = match self.jobs {
            One => 1,
            Many => params.many_jobs.max(1),
        };
        let nrfiles = match self.files {
            Files::None | Files::Small(_) => params.small_files.max(1),
            Files::Meta => (params.meta_files / jobs).max(1),
        };
        let file_size = match self.files {
            Files::Small(bytes) => bytes,
            Files::None | Files::Meta => 4096,
        };
        vec![
            ("FILESET", (u64::from(nrfiles) * file_size).to_string()),
            ("DIR", dir.display().to_string()),
            ("SIZE", params.size.clone()),
            ("RUNTIME", params.runtime.to_string()),
            ("JOBS", jobs.to_string()),
            ("NRFILES", nrfiles.to_string()),
        ]
    }

    fn command(&self, fio_dir: &Path, dir: &Path, params: &FioParams) -> Command {
        let mut cmd = Command::new("fio");
        cmd.current_dir("/").envs(self.env(dir, params));
        cmd.arg(fio_dir.join(self.file));
        cmd
    }

    /// Whether the profile needs its files laid out before the first measurement.
    pub fn needs_layout(&self) -> bool {
        self.files != Files::Meta
    }

    /// Lays out the profile's files in `dir` (fio `--create_only=1`), untimed.
    pub fn layout(&self, fio_dir: &Path, dir: &Path, params: &FioParams) -> Result<()> {
        fs::create_dir_all(dir)?;
        if !self.needs_layout() {
            return Ok(());
        }
        let mut cmd = self.command(fio_dir, dir, params);
        cmd.arg("--create_only=1");
        proc::run(&mut cmd, Duration::from_secs(1800), true)?.check(&format!("fio layout of {}", self.name))?;
        Ok(())
    }

    /// Runs the profile in `dir`, keeps fio's JSON at `json_out`, and returns (row, value) pairs.
    pub fn run(&self, fio_dir: &Path, dir: &Path, params: &FioParams, json_out: &Path) -> Result<Vec<(String, f64)>> {
        fs::create_dir_all(dir)?;
        let mut cmd = self.command(fio_dir, dir, params);
        cmd.arg("--output-format=json").arg(format!("--output={}", json_out.display()));
        let timeout = Duration::from_secs(params.runtime * 6 + 300);
        proc::run(&mut cmd, timeout, true)?.check(&format!("fio {}", self.name))?;
        let text = fs::read_to_string(json_out).with_context(|| format!("reading {}", json_out.display()))?;
        self.extract(&parse_fio_json(&text)?)
    }

    /// Reads this profile's rows out of parsed fio JSON.
    pub fn extract(&self, doc: &Value) -> Result<Vec<(String, f64)>> {
        let jobs = doc.get("jobs").and_then(Value::as_array).context("fio JSON has no jobs array")?;
        let mut sums: Vec<(String, f64)> = self.rows().into_iter().map(|r| (r, 0.0)).collect();
        let mut seen = vec![false; sums.len()];
        for job in jobs {
            let name = job.get("jobname").and_then(Value::as_str).unwrap_or("");
            if let Some(err) = job.get("error").and_then(Value::as_i64).filter(|e| *e != 0) {
                bail!("fio job {name} failed with error {err}");
            }
            let idx = if self.per_job.is_empty() {
                0
            } else {
                match self.per_job.iter().position(|j| *j == name) {
                    Some(i) => i,
                    None => continue,
                }
            };
            let mut v = 0.0;
            for dir in ["read", "write", "trim"] {
                let Some(d) = job.get(dir) else { continue };
                v += match self.metric {
                    Bandwidth => d.get("bw_bytes").and_then(Value::as_f64).unwrap_or(0.0) / (1024.0 * 1024.0),
                    Iops => d.get("iops").and_then(Value::as_f64).unwrap_or(0.0),
                };
            }
            sums[idx].1 += v;
            seen[idx] = true;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            bail!("fio output has no result for {}", sums[i].0);
        }
        Ok(sums)
    }
}

/// Parses fio's JSON output, skipping anything fio printed before the document.
pub(crate) fn parse_fio_json(text: &str) -> Result<Value> {
    let start = text.find('{').context("no JSON object in fio output")?;
    serde_json::from_str(&text[start..]).context("parsing fio JSON")
}

/// Reads every regular file under `dir` once (through whatever path `dir` is), so that page-cache
/// profiles start warm. Returns the number of bytes read.
pub(crate) fn warm(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                let mut f = fs::File::open(entry.path())?;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
            }
        }
    }
    Ok(total)
}

/// `sync` then drop the page cache, dentries and inodes. Fails when not permitted.
pub(crate) fn drop_caches() -> Result<()> {
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3\n").context("writing /proc/sys/vm/drop_caches")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_unique_and_files_exist() {
        let fio_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fio");
        for (i, p) in PROFILES.iter().enumerate() {
            assert!(PROFILES[..i].iter().all(|q| q.name != p.name), "{}", p.name);
            assert!(fio_dir.join(p.file).is_file(), "{}", p.file);
        }
    }

    #[test]
    fn extracts_sums_and_per_job_rows() {
        let doc: Value = serde_json::from_str(
            r#"{"jobs":[
              {"jobname":"create","error":0,"read":{"iops":100.0,"bw_bytes":0},"write":{"iops":0.0,"bw_bytes":0}},
              {"jobname":"stat","error":0,"read":{"iops":300.0,"bw_bytes":0},"write":{"iops":0.0,"bw_bytes":0}},
              {"jobname":"delete","error":0,"read":{"iops":50.0,"bw_bytes":0},"write":{"iops":0.0,"bw_bytes":0}}]}"#,
        )
        .unwrap();
        let rows = find("meta-storm").unwrap().extract(&doc).unwrap();
        assert_eq!(rows[1], ("meta-storm:stat".to_owned(), 300.0));
        let doc: Value = serde_json::from_str(
            r#"junk {"jobs":[{"jobname":"x","error":0,"read":{"iops":1,"bw_bytes":1048576},"write":{"iops":1,"bw_bytes":2097152}}]}"#
                .trim_start_matches("junk "),
        )
        .unwrap();
        let rows = find("mixed-70-30").unwrap().extract(&doc).unwrap();
        assert_eq!(rows[0].1, 2.0);
        let rows = find("seq-read-1m").unwrap().extract(&doc).unwrap();
        assert_eq!(rows[0].1, 3.0);
        assert!(parse_fio_json("fio: warning\n{\"jobs\":[]}").is_ok());
    }
}
