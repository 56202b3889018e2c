//! [`PostgresMode`]: how a key is held while the handler runs.

use std::fmt;
use std::str::FromStr;

/// How a [`PostgresBackend`](super::PostgresBackend) holds a key while the handler runs. See the
/// [module documentation](super#which-mode) for when to pick which.
///
/// ```
/// use tower_idempotency::PostgresMode;
///
/// assert_eq!(PostgresMode::default(), PostgresMode::Lease);
/// assert_eq!("transaction".parse::<PostgresMode>(), Ok(PostgresMode::Transaction));
/// assert!("session".parse::<PostgresMode>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum PostgresMode {
    /// A lease row (token and expiry), extended by the heartbeat; no
    /// connection is held while the handler runs. The default.
    #[default]
    Lease,
    /// A session advisory lock on a connection held for the request: the
    /// fewest writes, but a lost session frees the key while the handler
    /// still runs.
    Advisory,
    /// A transaction that the handler writes through and that commits with
    /// the record ([`RequestTransaction`](super::RequestTransaction)).
    Transaction,
}

impl PostgresMode {
    /// The mode's name, as [`FromStr`] reads it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Lease => "lease",
            Self::Advisory => "advisory",
            Self::Transaction => "transaction",
        }
    }
}

impl fmt::Display for PostgresMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`PostgresMode`]: not one of `lease`, `advisory`,
/// `transaction`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a PostgreSQL mode (lease, advisory, transaction)")]
pub struct UnknownPostgresMode(String);

impl FromStr for PostgresMode {
    type Err = UnknownPostgresMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lease" => Ok(Self::Lease),
            "advisory" => Ok(Self::Advisory),
            "transaction" => Ok(Self::Transaction),
            _ => Err(UnknownPostgresMode(s.to_owned())),
        }
    }
}
