//! The Lua scripts, how one is called (`EVALSHA`, then `EVAL` after
//! `NOSCRIPT`), and how their replies are read.

use std::time::Duration;

use redis::{Cmd, RedisWrite, ToRedisArgs, Value};

use super::{BackendError, BackendErrorKind};
use crate::FencingToken;

// The scripts live in files of their own, which the load harness
// (`benches/load.rs`) runs too when it measures what Redis allows.

/// Look up, lock, draw the fencing token.
pub(super) const BEGIN: &str = include_str!("lua/begin.lua");
/// Store while holding the lock, then unlock.
pub(super) const COMPLETE: &str = include_str!("lua/complete.lua");
/// Unlock while holding the lock.
pub(super) const RELEASE: &str = include_str!("lua/release.lua");
/// Push the lock's expiry out while holding it.
pub(super) const EXTEND: &str = include_str!("lua/extend.lua");

/// A Lua script and its SHA-1, for `EVALSHA`.
pub(super) struct Lua {
    pub(super) source: &'static str,
    pub(super) sha: String,
}

impl Lua {
    pub(super) fn new(source: &'static str) -> Self {
        let sha = redis::Script::new(source).get_hash().to_owned();
        Self { source, sha }
    }
}

/// The keys and arguments of one script call, kept for the `EVAL` after a
/// `NOSCRIPT`: back to back in one buffer (two allocations per call, where
/// a `Vec` per key and per argument took about a dozen).
pub(super) struct Call {
    bytes: Vec<u8>,
    /// Where each key, then each argument, ends in `bytes`.
    ends: Vec<usize>,
    keys: usize,
}

impl Call {
    pub(super) fn new(keys: &[&str]) -> Self {
        let mut call = Self {
            bytes: Vec::with_capacity(keys.iter().map(|k| k.len()).sum::<usize>() + 64),
            ends: Vec::with_capacity(keys.len() + 4),
            keys: keys.len(),
        };
        for key in keys {
            call.write_arg(key.as_bytes());
        }
        call
    }

    pub(super) fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        arg.write_redis_args(&mut self);
        self
    }

    /// `EVALSHA <sha> …` or `EVAL <source> …`.
    pub(super) fn command(&self, verb: &str, script: &str) -> Cmd {
        // Sized up front: grown argument by argument, the command's buffer
        // was reallocated about five times per call.
        let mut cmd = Cmd::with_capacity(
            3 + self.ends.len(),
            verb.len() + script.len() + 20 + self.bytes.len(),
        );
        cmd.arg(verb).arg(script).arg(self.keys);
        let mut start = 0;
        for &end in &self.ends {
            cmd.arg(&self.bytes[start..end]);
            start = end;
        }
        cmd
    }
}

impl RedisWrite for Call {
    fn write_arg(&mut self, arg: &[u8]) {
        self.bytes.extend_from_slice(arg);
        self.ends.push(self.bytes.len());
    }

    fn writer_for_next_arg(&mut self) -> impl std::io::Write + '_ {
        NextArg(self)
    }
}

/// One argument written in pieces; it ends when this is dropped.
struct NextArg<'a>(&'a mut Call);

impl std::io::Write for NextArg<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for NextArg<'_> {
    fn drop(&mut self) {
        self.0.ends.push(self.0.bytes.len());
    }
}

/// How long a key's last fencing token is kept after its lock's TTL (ms):
/// long enough to outlast a server clock that stepped back.
pub(super) const FENCE_OUTLIVES_LOCK_MS: u64 = 10 * 60 * 1000;

/// The fencing token the begin script answered, as text.
pub(super) fn parse_fence(value: &Value) -> Result<FencingToken, BackendError> {
    let fence = match value {
        Value::BulkString(text) => std::str::from_utf8(text)
            .ok()
            .and_then(|text| text.parse::<u64>().ok()),
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    fence
        .filter(|fence| *fence > 0)
        .map(FencingToken::new)
        .ok_or_else(|| unexpected("begin (fencing token)"))
}

/// Milliseconds for `PX` / `PEXPIRE`, within [`MAX_TTL`](crate::MAX_TTL)
/// (Redis refuses expiries past its clock's range).
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(crate::config::clamp_ttl(d).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

pub(super) fn unexpected(what: &str) -> BackendError {
    BackendError::new(
        BackendErrorKind::Corrupt,
        format!("unexpected reply from the {what} script"),
    )
}

pub(super) fn as_flag(value: &Value, what: &str) -> Result<bool, BackendError> {
    match value {
        Value::Int(n) => Ok(*n != 0),
        _ => Err(unexpected(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command holds the keys and arguments as `Cmd` would have them.
    #[test]
    fn a_call_packs_like_the_command_it_stands_for() {
        let call = Call::new(&["p{k}:rec", "p{k}:lock"])
            .arg("token")
            .arg(&b"\x00blob"[..])
            .arg(86_400_000_u64)
            .arg(vec![b"a".to_vec(), b"bc".to_vec()]);
        let mut expected = redis::cmd("EVALSHA");
        expected
            .arg("sha")
            .arg(2)
            .arg("p{k}:rec")
            .arg("p{k}:lock")
            .arg("token")
            .arg(&b"\x00blob"[..])
            .arg(86_400_000_u64)
            .arg("a")
            .arg("bc");
        assert_eq!(
            call.command("EVALSHA", "sha").get_packed_command(),
            expected.get_packed_command()
        );
    }
}
