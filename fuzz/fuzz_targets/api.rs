//! Admin API requests, any bytes: method, path and query, headers and body,
//! through the extractors the daemon's handlers use (`Json` checks the
//! content type, `Query`, `Path`, a UTF-8 body), then what the handlers and
//! the daemon do with the values: a push is applied to a policy engine and
//! its signed manifest checked against a trusted key, a quarantine target
//! and expiry are parsed.
//!
//! Input: `METHOD PATH[?QUERY]`, then `name: value` header lines, an empty
//! line, and the body (as HTTP/1 writes a request).

#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::body::Body;
use axum::extract::Query;
use axum::http::{Request, StatusCode};
use axum::routing::{get, put};
use enforcer::api_types::{FlowsQuery, PolicyFiles, QuarantineRequest, QuarantineTarget};
use enforcer::signing::{self, Manifest, TrustedKeys};
use futures_util::FutureExt as _;
use libfuzzer_sys::fuzz_target;
use policy::{Contents, Engine, SourceChange};
use tower_service::Service as _;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// A trusted-keys directory with one public key, as `--trusted-keys` reads it.
fn keys() -> &'static TrustedKeys {
    static KEYS: OnceLock<TrustedKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        TrustedKeys::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("keys")).expect("fuzz/keys holds fuzz.pub")
    })
}

/// What the daemon does with pushed files: the signed manifest checked (as
/// `verify_push` does), then one engine change.
fn apply(changes: Vec<(String, String)>) -> StatusCode {
    let mut engine = Engine::new();
    let changes =
        changes.into_iter().map(|(source, text)| SourceChange { source, contents: Contents::Text(text) }).collect();
    if engine.apply(changes, now()).is_ok() { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY }
}

async fn push_policy(Json(body): Json<PolicyFiles>) -> StatusCode {
    if let Some(signed) = &body.signed {
        let mut files = BTreeMap::new();
        for file in &body.files {
            let name = Path::new(&file.name).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            files.insert(name, [0; 32]);
        }
        let here = Path::new("push");
        let _ = signing::verify_texts(here, signed.manifest.as_bytes(), &signed.signature, &files, keys(), now());
        // Unsigned manifests are never parsed by the daemon; the parser
        // must still hold against anything.
        let _ = Manifest::parse(&signed.manifest, &here.join(signing::MANIFEST));
    }
    apply(body.files.into_iter().map(|f| (f.name, f.text)).collect())
}

async fn put_policy_file(axum::extract::Path(name): axum::extract::Path<String>, text: String) -> StatusCode {
    apply(vec![(name, text)])
}

async fn delete_policy_file(axum::extract::Path(name): axum::extract::Path<String>) -> StatusCode {
    std::hint::black_box(name);
    StatusCode::OK
}

async fn quarantine_add(Json(request): Json<QuarantineRequest>) -> StatusCode {
    if let Some(expires) = &request.expires {
        let _ = signing::parse_time(expires, now());
    }
    match policy::target::Target::parse(&request.target) {
        Ok(target) => {
            // A target is kept and listed by its text.
            let _ = target.to_string();
            StatusCode::OK
        }
        Err(_) => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

async fn quarantine_remove(Query(query): Query<QuarantineTarget>) -> StatusCode {
    if policy::target::Target::parse(&query.target).is_ok() { StatusCode::OK } else { StatusCode::NOT_FOUND }
}

async fn flows(Query(query): Query<FlowsQuery>) -> StatusCode {
    std::hint::black_box(query.follow);
    StatusCode::OK
}

/// The daemon's routes (`api::router`) with the same extractors.
fn router() -> axum::Router {
    axum::Router::new()
        .route("/v1/status", get(|| async { StatusCode::OK }))
        .route("/v1/policy", get(|| async { StatusCode::OK }).post(push_policy))
        .route("/v1/policy/files/{name}", put(put_policy_file).delete(delete_policy_file))
        .route("/v1/flows", get(flows))
        .route("/v1/quarantine", get(|| async { StatusCode::OK }).post(quarantine_add).delete(quarantine_remove))
}

/// Reads the input as an HTTP/1 request; `None` where `http` itself would
/// refuse it (hyper does before any handler sees it).
fn request(data: &[u8]) -> Option<Request<Body>> {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, uri) = lines.next()?.split_once(' ')?;
    let mut builder = Request::builder().method(method).uri(uri);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        builder = builder.header(name.trim(), value.trim());
    }
    builder.body(Body::from(body.to_vec())).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some(request) = request(data) else { return };
    // Every body is in memory: the service finishes without waiting.
    let response = router().call(request).now_or_never().expect("the router answers at once");
    std::hint::black_box(response.map(|r| r.status()));
});
