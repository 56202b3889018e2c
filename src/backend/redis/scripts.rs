//! The Lua scripts, how one is called (`EVALSHA`, then `EVAL` after
//! `NOSCRIPT`), and how their replies are read.

use std::time::Duration;

use redis::{Cmd, ToRedisArgs, Value};

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

/// The keys and arguments of one script call.
pub(super) struct Call {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Call {
    pub(super) fn new(keys: &[&str]) -> Self {
        Self {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            args: Vec::new(),
        }
    }

    pub(super) fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// `EVALSHA <sha> …` or `EVAL <source> …`.
    pub(super) fn command(&self, verb: &str, script: &str) -> Cmd {
        // Sized up front: grown argument by argument, the command's buffer
        // was reallocated about five times per call.
        let data: usize = verb.len()
            + script.len()
            + 20
            + self.keys.iter().map(String::len).sum::<usize>()
            + self.args.iter().map(Vec::len).sum::<usize>();
        let mut cmd = Cmd::with_capacity(3 + self.keys.len() + self.args.len(), data);
        cmd.arg(verb)
            .arg(script)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
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
