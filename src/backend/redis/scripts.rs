//! The Lua scripts, how one is called (`EVALSHA`, then `EVAL` after
//! `NOSCRIPT`), and how their replies are read.

use std::time::Duration;

use redis::{Cmd, ToRedisArgs, Value};

use super::{BackendError, BackendErrorKind};
use crate::FencingToken;

pub(super) const BEGIN: &str = r"
-- KEYS[1] record, KEYS[2] lock, KEYS[3] fence; ARGV[1] token,
-- ARGV[2] lock TTL (ms), ARGV[3] how long the fence outlives it (ms)
local record = redis.call('GET', KEYS[1])
if record then
  return {1, record}
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, redis.call('PTTL', KEYS[2])}
end
-- The fencing token: the server clock in microseconds, and past the key's
-- last token should the clock have stepped back.
local now = redis.call('TIME')
local fence = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[3]))
if last and last >= fence then
  fence = last + 1
end
fence = string.format('%.0f', fence)
redis.call('SET', KEYS[3], fence, 'PX', ARGV[2] + ARGV[3])
return {0, fence}
";

pub(super) const COMPLETE: &str = r"
-- KEYS[1] record, KEYS[2] lock; ARGV[1] token, ARGV[2] record, ARGV[3] TTL (ms)
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
";

pub(super) const RELEASE: &str = r"
-- KEYS[1] lock; ARGV[1] token
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub(super) const EXTEND: &str = r"
-- KEYS[1] lock; ARGV[1] token, ARGV[2] lock TTL (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

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
        let mut cmd = redis::cmd(verb);
        cmd.arg(script)
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
