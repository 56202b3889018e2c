//! The payments example behind `axum-idempotent` 0.6 (on `ruts` sessions in
//! a moka store, with `tower-cookies`), for `scripts/load.sh`. Same handler,
//! routes and environment as `examples/payments.rs`.
//!
//! It keys on the `Idempotency-Key` header and caches only for a request that
//! carries a session cookie, so the load generator sends
//! `Cookie: session=<id>` with every request.

#[path = "../../../../examples/support/payments_app.rs"]
mod payments_app;

use std::sync::Arc;

use axum_idempotent::{IdempotentLayer, IdempotentOptions};
use ruts::store::moka::MokaStore;
use ruts::{CookieOptions, SessionLayer};
use tower_cookies::CookieManagerLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = Arc::new(MokaStore::builder().build());
    let options = IdempotentOptions::default()
        .use_idempotency_key_header(Some("Idempotency-Key"), false)
        .expire_after(24 * 3600);
    payments_app::serve_with(|routes| {
        routes
            .layer(IdempotentLayer::<MokaStore>::new(options))
            .layer(SessionLayer::new(store).with_cookie_options(CookieOptions::build().name("session")))
            .layer(CookieManagerLayer::new())
    })
    .await
}
