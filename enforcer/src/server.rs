//! Plain-HTTP observability endpoints: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::{Shared, render};

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared);
    axum::serve(listener, app).await
}

/// Ready once the policy is enforced on every selected interface.
async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if !shared.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: policy not yet enforced\n".to_owned());
    }
    let unenforced = shared.interfaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner).unenforced.clone();
    let source_down = shared.source_down.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let kubernetes_down = shared.kubernetes_down.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut why: Vec<String> = Vec::new();
    if !unenforced.is_empty() {
        let each: Vec<String> = unenforced.iter().map(|(name, why)| format!("{name}: {why}")).collect();
        why.push(format!("not enforcing on {}", each.join("; ")));
    }
    for down in source_down.into_iter().chain(kubernetes_down) {
        why.push(format!("{down} (the last policy it gave stays enforced)"));
    }
    if why.is_empty() {
        return (StatusCode::OK, "ready\n".to_owned());
    }
    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", why.join("; ")))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let mut stats = *shared.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    stats.files_up = shared.source_down.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none();
    if stats.kubernetes_up.is_some() {
        stats.kubernetes_up =
            Some(shared.kubernetes_down.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none());
    }
    stats.quarantined = shared.quarantine.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
    {
        let detector = shared.lateral.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        stats.lateral_suspects = detector.suspects;
        stats.lateral_tracked = detector.tracked();
    }
    let snapshot = {
        let datapath = shared.datapath.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match datapath.as_ref().map(crate::datapath::Datapath::counters) {
            Some(Ok(snapshot)) => snapshot,
            Some(Err(error)) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain")],
                    format!("{error}\n"),
                );
            }
            None => crate::datapath::CounterSnapshot::default(),
        }
    };
    let usage = shared.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let interfaces = shared.interfaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let versions = shared.kubernetes_versions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    match render(&snapshot, stats, &usage, &interfaces, &versions, &[&shared.apply_duration, &shared.slot_wait]) {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], format!("{error}\n")),
    }
}
