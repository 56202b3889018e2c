//! The payments example behind `idempotent` 2's middleware and in-memory
//! store, for `scripts/load.sh`. Same handler, routes and environment as
//! `examples/payments.rs`.

#[path = "../../../../examples/support/payments_app.rs"]
mod payments_app;

use std::time::Duration;

use idempotent::memory::MemoryStore;
use idempotent::middleware::IdempotencyLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = MemoryStore::builder().try_build()?;
    let layer = IdempotencyLayer::new(store).completed_ttl(Duration::from_secs(24 * 3600));
    payments_app::serve_with(|routes| routes.layer(layer)).await
}
