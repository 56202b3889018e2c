//! What the end-to-end benchmarks (`load`, `grpc`) share: an example server
//! started pinned to CPU 0, this process pinned to CPU 1, and the CPU time
//! a server used.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

fn has_taskset() -> bool {
    std::process::Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pins every thread of this process to CPU 1 (`-a`: the runtime's workers
/// exist already) when `taskset` is there, and says whether it is: the
/// servers are then pinned to CPU 0.
pub fn pin_this_process() -> bool {
    let pin = has_taskset();
    if pin {
        let _ = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
    }
    pin
}

/// CPU time (user + system) a process has used, from `/proc`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in USER_HZ, 100 on every common configuration.
    Some(Duration::from_millis(ticks * 10))
}

/// Starts the example `bin` on a free port with `env` (on CPU 0 if `pin`)
/// and returns it with the address it printed.
pub async fn start(
    bin: &Path,
    env: &[(&'static str, String)],
    pin: bool,
) -> (tokio::process::Child, SocketAddr) {
    assert!(
        bin.exists(),
        "{} is missing: build the examples (see the benchmark's documentation)",
        bin.display()
    );
    let mut cmd = if pin {
        let mut c = tokio::process::Command::new("taskset");
        c.arg("-c").arg("0").arg(bin);
        c
    } else {
        tokio::process::Command::new(bin)
    };
    cmd.env("ADDR", "127.0.0.1:0")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start the example");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the example printed no address")
        .expect("read stdout")
        .expect("an address line");
    let addr = line
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    (child, addr)
}
