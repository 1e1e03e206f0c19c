//! The admin API: HTTPS with mutual TLS (rustls). A client certificate
//! signed by the configured client CA is required; its subject's common
//! name maps to a role: `viewer` (status, current policy, flows) or
//! `operator` (also push policy). Server certificate, key and client CA are
//! re-read when their files change, without a restart and without dropping
//! open connections. Every change is audit-logged: who, what, when; so is
//! every refusal (a bad certificate, a missing role, a body too large, a
//! client too slow or with too many connections).
//!
//! The API shares the node with the enforcer, so what a client can take is
//! bounded (see [`Limits`]): connections in all and per address, time to
//! finish the TLS handshake, to send the headers and to send a request,
//! header and body sizes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
pub use enforcer::api_types::{
    FlowsQuery, PolicyFile, PolicyFiles, QuarantineList, QuarantineRequest, QuarantineTarget, Role, SignedSet,
};
use enforcer::metrics::Shared;
use enforcer::tls;
use enforcer::watch::Mailbox;
use policy::Source;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The API's files and roles.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Certificate subject common name → role.
    pub roles: HashMap<String, Role>,
}

/// A policy change request from the API, carried out by the daemon's
/// maintenance loop like a file change.
pub struct Push {
    pub sources: Vec<Source>,
    /// Sources to remove, by name (`DELETE /v1/policy/files/NAME`).
    pub removed: Vec<String>,
    /// Whether `sources` replace the whole policy (`POST /v1/policy`) or
    /// only the sources of the same names (`PUT /v1/policy/files/NAME`).
    pub whole: bool,
    /// The pushed set's signed manifest, if it came with one.
    pub signed: Option<SignedSet>,
    pub who: String,
    pub reply: tokio::sync::oneshot::Sender<Result<u32, Vec<String>>>,
}

/// What the API lets clients take, documented in the README (*Admin API*).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once, in all: beyond, new ones are closed at once.
    pub connections: usize,
    /// Connections open at once from one address.
    pub per_address: usize,
    /// From accepting a connection to the end of the TLS handshake.
    pub handshake: Duration,
    /// To send a request's headers (also between requests on a kept-alive
    /// connection).
    pub headers: Duration,
    /// To send a whole request, body included (a streamed answer, `flows
    /// --follow`, runs on after it).
    pub request: Duration,
    /// The most bytes of headers a request may have.
    pub header_bytes: usize,
    /// The largest request body (a whole policy pushed at once).
    pub body_bytes: usize,
}

pub const LIMITS: Limits = Limits {
    connections: 512,
    per_address: 256,
    handshake: Duration::from_secs(10),
    headers: Duration::from_secs(10),
    request: Duration::from_secs(30),
    header_bytes: 64 * 1024,
    body_bytes: 32 * 1024 * 1024,
};

/// Who is calling, from the verified client certificate.
#[derive(Debug, Clone)]
struct Caller {
    name: String,
    role: Option<Role>,
}

struct ApiState {
    shared: Arc<Shared>,
    push: Mailbox<Push>,
}

fn load_server_config(config: &ApiConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = tls::read_certs(&config.cert, "--tls-cert")?;
    if certs.is_empty() {
        bail!("--tls-cert {} holds no certificate", config.cert.display());
    }
    let key = tls::read_key(&config.key, "--tls-key")?;
    let roots = tls::read_roots(&config.client_ca, "--client-ca")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .context("building the client certificate verifier failed")?;
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS versions available")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("the server certificate and key do not match")?;
    Ok(Arc::new(server))
}

fn modified(paths: &[&Path]) -> Vec<Option<SystemTime>> {
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

/// The common name of the first certificate's subject.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    parsed.subject().iter_common_name().next()?.as_str().ok().map(str::to_owned)
}

/// Serves the API until the task is dropped.
pub async fn serve(config: ApiConfig, shared: Arc<Shared>, push: Mailbox<Push>) -> anyhow::Result<()> {
    let current = Arc::new(RwLock::new(load_server_config(&config)?));
    let listener = TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on --api-addr {}; pick a free address", config.addr))?;
    log::info!("admin API (mutual TLS) on https://{}", config.addr);
    {
        // Certificate rotation: new connections get the new files.
        let (current, config) = (Arc::clone(&current), config.clone());
        tokio::spawn(async move {
            let paths = [config.cert.as_path(), config.key.as_path(), config.client_ca.as_path()];
            let mut seen = modified(&paths);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = modified(&paths);
                if now == seen {
                    continue;
                }
                match load_server_config(&config) {
                    Ok(reloaded) => {
                        *current.write().unwrap_or_else(PoisonError::into_inner) = reloaded;
                        seen = now;
                        log::info!("reloaded the admin API's certificate, key and client CA");
                    }
                    // Files caught mid-rotation: keep serving the old ones and retry.
                    Err(error) => log::warn!("not reloading the admin API's TLS files yet: {error:#}"),
                }
            }
        });
    }
    let state = Arc::new(ApiState { shared, push });
    let roles = Arc::new(config.roles);
    let connections = Arc::new(Connections::default());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                log::warn!("admin API accept failed: {error}");
                continue;
            }
        };
        let Some(slot) = connections.take(peer.ip()) else {
            log::warn!(
                target: "audit",
                "who=- peer={peer} action=connect result=refused why=\"too many connections (at most {} in all, {} per address)\"",
                LIMITS.connections,
                LIMITS.per_address
            );
            continue;
        };
        // Responses are small and final: no waiting for delayed acknowledgements.
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(Arc::clone(&current.read().unwrap_or_else(PoisonError::into_inner)));
        let (state, roles) = (Arc::clone(&state), Arc::clone(&roles));
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(LIMITS.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    log::warn!(target: "audit", "who=- peer={peer} action=connect result=refused why=\"TLS: {error}\"");
                    return;
                }
                Err(_) => {
                    log::warn!(
                        target: "audit",
                        "who=- peer={peer} action=connect result=refused why=\"no TLS handshake within {} s\"",
                        LIMITS.handshake.as_secs()
                    );
                    return;
                }
            };
            serve_connection(tls, peer, state, &roles).await;
        });
    }
}

/// Serves one caller's requests, its role fixed by its certificate, within
/// the limits on heads; refusals hyper gives before the router are audited.
async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    state: Arc<ApiState>,
    roles: &HashMap<String, Role>,
) {
    let name =
        tls.get_ref().1.peer_certificates().and_then(|certs| certs.first()).and_then(common_name).unwrap_or_default();
    let caller = Caller { role: roles.get(&name).copied(), name };
    let who = caller.name.clone();
    let app = router(state).layer(Extension(caller));
    let service = hyper_util::service::TowerToHyperService::new(app);
    let io = hyper_util::rt::TokioIo::new(tls);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(LIMITS.headers)
        .max_buf_size(LIMITS.header_bytes)
        .serve_connection(io, service)
        .await;
    match served {
        // Hyper answers these itself, before the router: 431 for a
        // head over the buffer, 400 for one it cannot parse; a head
        // too slow gets no answer. The status is logged as the
        // router's refusals log it, so one search finds both.
        Err(error) if error.is_parse_too_large() || error.is_parse() => {
            let status = if error.is_parse_too_large() { 431 } else { 400 };
            log::warn!(
                target: "audit",
                "who={who} peer={peer} action=request result=refused status={status} why=\"{error}\""
            );
        }
        Err(error) if error.is_timeout() => {
            log::warn!(target: "audit", "who={who} peer={peer} action=request result=refused why=\"{error}\"");
        }
        Err(error) => log::debug!("admin API connection from {peer} ended: {error}"),
        Ok(()) => {}
    }
}

/// Connections open now, in all and per address.
#[derive(Default)]
struct Connections {
    open: std::sync::Mutex<HashMap<std::net::IpAddr, usize>>,
}

/// One open connection, given back when dropped.
struct ConnectionSlot {
    connections: Arc<Connections>,
    addr: std::net::IpAddr,
}

impl Connections {
    fn take(self: &Arc<Self>, addr: std::net::IpAddr) -> Option<ConnectionSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let total: usize = open.values().sum();
        let mine = open.entry(addr).or_default();
        if total >= LIMITS.connections || *mine >= LIMITS.per_address {
            return None;
        }
        *mine += 1;
        Some(ConnectionSlot { connections: Arc::clone(self), addr })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

/// Bounds the time to send a request and audit-logs every refusal the
/// handlers and extractors give (a missing role, a body too large or
/// malformed, a request too slow).
async fn audited(
    Extension(caller): Extension<Caller>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let header_bytes: usize = request.uri().to_string().len()
        + request.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
    let response = if header_bytes > LIMITS.header_bytes {
        let why = format!("the request's headers exceed {} KiB\n", LIMITS.header_bytes / 1024);
        (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why).into_response()
    } else if let Ok(response) = tokio::time::timeout(LIMITS.request, next.run(request)).await {
        response
    } else {
        let why = format!("the request took over {} s\n", LIMITS.request.as_secs());
        (StatusCode::REQUEST_TIMEOUT, why).into_response()
    };
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        log::warn!(
            target: "audit",
            "who={} action=request method={method} path={path} result=refused status={}",
            caller.name,
            status.as_u16()
        );
    }
    response
}

fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/policy", get(current_policy).post(push_policy))
        .route("/v1/policy/files/{name}", axum::routing::put(put_policy_file).delete(delete_policy_file))
        .route("/v1/flows", get(flows))
        .route("/v1/observed", get(observed))
        .route("/v1/rules/usage", get(rule_usage))
        .route("/v1/quarantine", get(quarantine_list).post(quarantine_add).delete(quarantine_remove))
        .layer(axum::middleware::from_fn(audited))
        .layer(axum::extract::DefaultBodyLimit::max(LIMITS.body_bytes))
        .with_state(state)
}

fn refuse(caller: &Caller, needed: Role) -> Option<Response> {
    match (caller.role, needed) {
        (Some(Role::Operator), _) | (Some(Role::Viewer), Role::Viewer) => None,
        (Some(Role::Viewer), Role::Operator) => Some(
            (StatusCode::FORBIDDEN, format!("{} is a viewer; changes need the operator role\n", caller.name))
                .into_response(),
        ),
        (None, _) => Some(
            (
                StatusCode::FORBIDDEN,
                format!("certificate subject `{}` has no role in the daemon's config\n", caller.name),
            )
                .into_response(),
        ),
    }
}

#[derive(Serialize)]
struct Status {
    ready: bool,
    generation: u32,
    identities: usize,
    rules: usize,
    load_errors: u64,
    last_error: Option<String>,
    interfaces: Vec<String>,
}

async fn status(State(state): State<Arc<ApiState>>, Extension(caller): Extension<Caller>) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Viewer) {
        return refusal;
    }
    let shared = &state.shared;
    let figures = *shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
    let interfaces = shared
        .datapath
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|d| d.attached().map(str::to_owned).collect())
        .unwrap_or_default();
    Json(Status {
        ready: shared.ready.load(std::sync::atomic::Ordering::Acquire),
        generation: figures.generation,
        identities: figures.identities,
        rules: figures.rules,
        load_errors: figures.load_errors.total(),
        last_error: shared.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        interfaces,
    })
    .into_response()
}

async fn current_policy(State(state): State<Arc<ApiState>>, Extension(caller): Extension<Caller>) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Viewer) {
        return refusal;
    }
    let sources = state.shared.sources.lock().unwrap_or_else(PoisonError::into_inner).clone();
    Json(PolicyFiles {
        files: sources.iter().map(|s| PolicyFile { name: s.name.clone(), text: s.text() }).collect(),
        keep_others: false,
        signed: None,
    })
    .into_response()
}

/// A short, stable fingerprint of a policy's text, for the audit log.
#[must_use]
pub fn digest(sources: &[Source]) -> String {
    let mut hasher = Sha256::new();
    for source in sources {
        hasher.update(source.name.as_bytes());
        hasher.update([0]);
        hasher.update(source.text.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize().iter().fold(String::with_capacity(64), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

/// `POST /v1/policy`. Like every handler that takes a body, it asks the
/// caller's role before the body is read: a viewer is answered 403 whatever
/// it sent, not told what is wrong with the body.
async fn push_policy(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<PolicyFiles>, JsonRejection>,
) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Operator) {
        return refusal;
    }
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return rejection.into_response(),
    };
    let whole = !body.keep_others;
    let sources: Vec<Source> = body.files.into_iter().map(|f| Source { name: f.name, text: f.text }).collect();
    let (reply, answer) = tokio::sync::oneshot::channel();
    let push = Push { sources, removed: Vec::new(), whole, signed: body.signed, who: caller.name.clone(), reply };
    send_push(&state, push, answer).await
}

/// `PUT /v1/policy/files/NAME` (body: the file's YAML) changes one source
/// of the enforced policy and leaves the others: a controller's way to
/// change a little of a large policy without sending all of it.
async fn put_policy_file(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(name): axum::extract::Path<String>,
    text: Result<String, axum::extract::rejection::StringRejection>,
) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Operator) {
        return refusal;
    }
    let text = match text {
        Ok(text) => text,
        Err(rejection) => return rejection.into_response(),
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let push = Push {
        sources: vec![Source { name, text }],
        removed: Vec::new(),
        whole: false,
        signed: None,
        who: caller.name.clone(),
        reply,
    };
    send_push(&state, push, answer).await
}

/// `DELETE /v1/policy/files/NAME` removes one source of the enforced policy.
async fn delete_policy_file(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Operator) {
        return refusal;
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let push =
        Push { sources: Vec::new(), removed: vec![name], whole: false, signed: None, who: caller.name.clone(), reply };
    send_push(&state, push, answer).await
}

/// Hands a push to the daemon's maintenance loop and answers with what it did.
async fn send_push(
    state: &ApiState,
    push: Push,
    answer: tokio::sync::oneshot::Receiver<Result<u32, Vec<String>>>,
) -> Response {
    if state.push.send(push).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the daemon is shutting down\n").into_response();
    }
    match answer.await {
        Ok(Ok(generation)) => Json(serde_json::json!({ "generation": generation })).into_response(),
        Ok(Err(problems)) => {
            (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({ "errors": problems }))).into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the daemon is shutting down\n").into_response(),
    }
}

/// `GET /v1/rules/usage`: every rule in force, since when this node
/// enforces it and when it last decided a packet (read now).
async fn rule_usage(State(state): State<Arc<ApiState>>, Extension(caller): Extension<Caller>) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Viewer) {
        return refusal;
    }
    let shared = Arc::clone(&state.shared);
    let report = tokio::task::spawn_blocking(move || {
        enforcer::usage::refresh(&shared);
        shared.rule_usage.lock().unwrap_or_else(PoisonError::into_inner).report()
    })
    .await
    .unwrap_or_default();
    Json(report).into_response()
}

/// `GET /v1/observed`: the flows audit mode passed, each pod end with
/// its namespace and labels (for `bulkhead policy suggest`).
async fn observed(State(state): State<Arc<ApiState>>, Extension(caller): Extension<Caller>) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Viewer) {
        return refusal;
    }
    let mut report = state.shared.observed.lock().unwrap_or_else(PoisonError::into_inner).report();
    let engine = state.shared.engine.read().unwrap_or_else(PoisonError::into_inner);
    let pod = |name: &str| {
        engine.pod_identity(name).map(|(namespace, labels)| enforcer::observed::PodEnd { namespace, labels })
    };
    for flow in &mut report.flows {
        flow.src = pod(&flow.flow.src_identity);
        flow.dst = pod(&flow.flow.dst_identity);
    }
    Json(report).into_response()
}

async fn quarantine_list(State(state): State<Arc<ApiState>>, Extension(caller): Extension<Caller>) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Viewer) {
        return refusal;
    }
    let quarantined = state.shared.quarantine.lock().unwrap_or_else(PoisonError::into_inner).list();
    Json(QuarantineList { quarantined }).into_response()
}

fn quarantine_refused(caller: &Caller, action: &str, target: &str, why: &str) {
    log::warn!(target: "audit", "who={} action=quarantine-{action} target={target:?} result=refused why={why:?}", caller.name);
}

async fn quarantine_add(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    request: Result<Json<QuarantineRequest>, JsonRejection>,
) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Operator) {
        let target = request.as_ref().map_or("?", |Json(request)| request.target.as_str());
        quarantine_refused(&caller, "add", target, "not an operator");
        return refusal;
    }
    let Json(request) = match request {
        Ok(request) => request,
        Err(rejection) => return rejection.into_response(),
    };
    let expires = match request.expires.as_deref().map(|text| enforcer::signing::parse_time(text, SystemTime::now())) {
        None => None,
        Some(Ok(at)) => Some(at),
        Some(Err(why)) => {
            quarantine_refused(&caller, "add", &request.target, &why);
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({ "errors": [why] }))).into_response();
        }
    };
    let (shared, who, target) = (Arc::clone(&state.shared), caller.name.clone(), request.target.clone());
    quarantine_change(&caller, "add", &target, move || {
        enforcer::quarantine::add(&shared, &request.target, &request.reason, expires, &who)
    })
    .await
}

async fn quarantine_remove(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<QuarantineTarget>,
) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Operator) {
        quarantine_refused(&caller, "end", &query.target, "not an operator");
        return refusal;
    }
    let (shared, who, target) = (Arc::clone(&state.shared), caller.name.clone(), query.target.clone());
    quarantine_change(&caller, "end", &target, move || enforcer::quarantine::remove(&shared, &query.target, &who)).await
}

/// Runs a quarantine change off the async threads (it writes kernel maps
/// and the state dir) and answers with what it did, or why it could not.
async fn quarantine_change<T: Serialize + Send + 'static>(
    caller: &Caller,
    action: &str,
    target: &str,
    change: impl FnOnce() -> Result<T, enforcer::quarantine::QuarantineError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(change).await {
        Ok(Ok(done)) => Json(done).into_response(),
        Ok(Err(error)) => quarantine_error(caller, action, target, &error),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the daemon is shutting down\n").into_response(),
    }
}

fn quarantine_error(
    caller: &Caller,
    action: &str,
    target: &str,
    error: &enforcer::quarantine::QuarantineError,
) -> Response {
    use enforcer::quarantine::QuarantineError;
    quarantine_refused(caller, action, target, &error.to_string());
    let status = match error {
        QuarantineError::NotQuarantined(_) => StatusCode::NOT_FOUND,
        QuarantineError::NotRunning => StatusCode::SERVICE_UNAVAILABLE,
        QuarantineError::Datapath(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    (status, Json(serde_json::json!({ "errors": [error.to_string()] }))).into_response()
}

async fn flows(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<FlowsQuery>,
) -> Response {
    if let Some(refusal) = refuse(&caller, Role::Viewer) {
        return refusal;
    }
    let recent: Vec<String> =
        state.shared.recent_events.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect();
    if !query.follow {
        let mut body = recent.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        return (StatusCode::OK, [("content-type", "application/x-ndjson")], body).into_response();
    }
    let receiver = state.shared.events.subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(line) => return Some((Ok::<_, std::io::Error>(format!("{line}\n")), receiver)),
                // A slow reader skips what it missed rather than stalling the daemon.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (StatusCode::OK, [("content-type", "application/x-ndjson")], axum::body::Body::from_stream(stream)).into_response()
}
