//! Logging and the Prometheus endpoint, the same for every Moat binary.

#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use tracing_subscriber::EnvFilter;

/// Logs to stderr with the given `EnvFilter` directive.
pub fn init_logging(filter: &str) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(filter)?)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| anyhow::anyhow!("logging: {e}"))
}

/// A registry in the Prometheus text format.
pub fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut s = String::new();
    prometheus_client::encoding::text::encode(&mut s, registry).expect("writing to a String");
    s
}

/// Serves `GET /metrics` (Prometheus text format) on `addr` until the process ends.
/// Returns the bound address (useful with port 0).
pub async fn serve_metrics(
    addr: SocketAddr,
    encode: Arc<dyn Fn() -> String + Send + Sync>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let encode = encode.clone();
            async move {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    encode(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}
