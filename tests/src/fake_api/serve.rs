//! The HTTP side: routing, discovery, GET, list and watch.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::resources::{self, RESOURCES, ResourceType};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Change, Event, Gone, Key, Objects};
use super::{FailWith, Shared};

type Body = BoxBody<Bytes, std::io::Error>;

/// A watch with no `timeoutSeconds` ends after this long (the real server
/// picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_mins(30);

pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors or a reset before accept: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(shared, request).await) }
                    });
                    // A client hanging up mid-response is not the server's failure.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

fn full(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

fn json_response(value: &Value) -> Response<Body> {
    full(StatusCode::OK, value.to_string().into_bytes())
}

/// A `Status` object, the body of every failure the real server returns.
fn status_object(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, status_object(code, reason, message).to_string().into_bytes())
}

fn bad_request(message: &str) -> Response<Body> {
    failure(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn not_found(what: &str) -> Response<Body> {
    failure(StatusCode::NOT_FOUND, "NotFound", &format!("{what} not found"))
}

fn injected_failure(with: FailWith) -> Response<Body> {
    match with {
        FailWith::InternalError => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: injected by the fake API server",
        ),
        FailWith::TooManyRequests => {
            let mut response =
                failure(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", "too many requests, please try again later");
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            response
        }
    }
}

/// Percent-decodes one query component (`+` is a space, as form encoding has it).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match text.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                Some(Ok(b)) => {
                    out.push(b);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query parameters the fake reads; others are ignored, as the real server
/// ignores what a verb does not use.
#[derive(Debug, Default)]
struct Query {
    watch: bool,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    label_selector: String,
    field_selector: String,
    limit: Option<String>,
    continue_token: Option<String>,
    allow_bookmarks: bool,
    send_initial_events: bool,
    timeout_seconds: Option<String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let mut q = Self::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value);
            let flag = value == "true" || value == "1";
            match decode(key).as_str() {
                "watch" => q.watch = flag,
                "resourceVersion" => q.resource_version = Some(value).filter(|v| !v.is_empty()),
                "resourceVersionMatch" => q.resource_version_match = Some(value).filter(|v| !v.is_empty()),
                "labelSelector" => q.label_selector = value,
                "fieldSelector" => q.field_selector = value,
                "limit" => q.limit = Some(value),
                "continue" => q.continue_token = Some(value).filter(|v| !v.is_empty()),
                "allowWatchBookmarks" => q.allow_bookmarks = flag,
                "sendInitialEvents" => q.send_initial_events = flag,
                "timeoutSeconds" => q.timeout_seconds = Some(value),
                _ => {}
            }
        }
        q
    }
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let (delay, fail) = {
        let mut state = shared.chaos();
        let fail = if state.chaos.fail_next > 0 {
            state.chaos.fail_next -= 1;
            true
        } else {
            let percent = state.chaos.fail_percent;
            state.chance(percent)
        };
        (state.chaos.delay, fail.then_some(state.chaos.fail_with))
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(with) = fail {
        shared.counters.injected_failures.fetch_add(1, Ordering::Relaxed);
        return injected_failure(with);
    }
    if request.method() == Method::POST {
        return create(&shared, request).await;
    }
    if request.method() != Method::GET {
        return failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake API server is read-only to clients (but for creating events); tests change it through FakeApiServer",
        );
    }
    let query = Query::parse(request.uri().query());
    let segments: Vec<&str> = request.uri().path().split('/').filter(|s| !s.is_empty()).collect();
    let found = |document: Option<Value>| {
        document.map_or_else(|| not_found("the server could not find the requested resource"), |d| json_response(&d))
    };
    match segments.as_slice() {
        ["version"] => json_response(&resources::version()),
        ["api"] => json_response(&resources::api_versions(&shared.address.to_string())),
        ["api", version] => found(resources::api_resource_list("", version)),
        ["apis"] => json_response(&resources::api_group_list()),
        ["apis", group] => found(resources::api_group_document(group)),
        ["apis", group, version] => found(resources::api_resource_list(group, version)),
        ["api", version, rest @ ..] => resource_request(&shared, "", version, rest, &query),
        ["apis", group, version, rest @ ..] => resource_request(&shared, group, version, rest, &query),
        _ => not_found("the server could not find the requested resource"),
    }
}

/// `POST` to a namespaced collection: only `events.k8s.io/v1` `Events`,
/// which daemons create to report on objects they refuse.
async fn create(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let ["apis", "events.k8s.io", "v1", "namespaces", namespace, "events"] = segments.as_slice() else {
        return failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "the fake API server creates only events");
    };
    let namespace = (*namespace).to_owned();
    let Ok(body) = request.into_body().collect().await else {
        return bad_request("the request body could not be read");
    };
    let Ok(mut object) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return bad_request("the request body is not JSON");
    };
    shared.note_access("create", "events.k8s.io", "events");
    if object["metadata"]["namespace"].is_null() {
        object["metadata"]["namespace"] = json!(namespace);
    }
    object["apiVersion"] = json!("events.k8s.io/v1");
    object["kind"] = json!("Event");
    let created = {
        let mut store = shared.store();
        store.create(object).map(|created| (created, store.resource_version()))
    };
    match created {
        Ok((created, version)) => {
            shared.changed.send_replace(version);
            let mut response = json_response(&created);
            *response.status_mut() = StatusCode::CREATED;
            response
        }
        Err(error) => failure(StatusCode::CONFLICT, "AlreadyExists", &error.to_string()),
    }
}

fn resource_request(shared: &Arc<Shared>, group: &str, version: &str, rest: &[&str], query: &Query) -> Response<Body> {
    // A namespaced type is reached cluster-wide (list/watch only) or under
    // `namespaces/{ns}/`; a cluster-scoped one only without a namespace.
    let scoped = |plural: &str, namespaced: bool| {
        resources::by_path(group, version, plural).filter(|&r| RESOURCES[r].namespaced == namespaced)
    };
    let (resource, namespace, name) = match *rest {
        [plural] => (resources::by_path(group, version, plural), None, None),
        [plural, name] => (scoped(plural, false), None, Some(name)),
        ["namespaces", namespace, plural] => (scoped(plural, true), Some(namespace), None),
        ["namespaces", namespace, plural, name] => (scoped(plural, true), Some(namespace), Some(name)),
        _ => (None, None, None),
    };
    let Some(resource) = resource else {
        return not_found("the server could not find the requested resource");
    };
    let verb = match name {
        Some(_) => "get",
        None if query.watch => "watch",
        None => "list",
    };
    shared.note_access(verb, group, RESOURCES[resource].plural);
    match name {
        Some(name) => get(shared, resource, namespace.unwrap_or(""), name),
        None if query.watch => watch(shared, resource, namespace, query),
        None => list(shared, resource, namespace, query),
    }
}

fn get(shared: &Shared, resource: usize, namespace: &str, name: &str) -> Response<Body> {
    match shared.store().get(resource, namespace, name) {
        Some(object) => json_response(&object),
        None => not_found(&format!("{} {name:?}", RESOURCES[resource].plural)),
    }
}

/// What a list or watch keeps of the objects it is asked about.
struct Filter {
    resource: usize,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn new(resource: usize, namespace: Option<&str>, query: &Query) -> Result<Self, String> {
        Ok(Self {
            resource,
            namespace: namespace.map(str::to_owned),
            labels: LabelSelector::parse(&query.label_selector)?,
            fields: FieldSelector::parse(&query.field_selector, RESOURCES[resource].fields)?,
        })
    }

    fn unfiltered(&self) -> bool {
        self.labels == LabelSelector::default() && self.fields == FieldSelector::default()
    }

    fn matches(&self, object: &Value) -> bool {
        let namespace = object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// The objects of this type that match, in key order.
    fn select<'a>(&'a self, objects: &'a Objects) -> impl Iterator<Item = (&'a Key, &'a Arc<Value>)> {
        objects.iter().filter(move |((r, _, _), o)| *r == self.resource && self.matches(o))
    }

    /// What a watch with this filter sees of one change: a change that moves
    /// an object into or out of the selection is an ADDED or a DELETED.
    fn project(&self, event: &Event) -> Option<&'static str> {
        if event.resource != self.resource {
            return None;
        }
        let now = self.matches(&event.object);
        match event.change {
            Change::Added => now.then_some("ADDED"),
            Change::Deleted => now.then_some("DELETED"),
            Change::Modified => match (event.previous.as_deref().is_some_and(|p| self.matches(p)), now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
        }
    }
}

fn too_old(message: &str) -> Response<Body> {
    failure(StatusCode::GONE, "Expired", message)
}

fn list(shared: &Shared, resource: usize, namespace: Option<&str>, query: &Query) -> Response<Body> {
    shared.counters.lists.fetch_add(1, Ordering::Relaxed);
    let kind: &ResourceType = &RESOURCES[resource];
    let filter = match Filter::new(resource, namespace, query) {
        Ok(filter) => filter,
        Err(message) => return bad_request(&message),
    };
    let limit = match query.limit.as_deref().map(str::parse::<usize>).transpose() {
        Ok(limit) => limit.filter(|&l| l > 0),
        Err(_) => return bad_request("limit must be a non-negative integer"),
    };
    // A continue token is "RV/NAMESPACE/NAME" of the page's last item.
    let (rv, objects, after) = if let Some(token) = &query.continue_token {
        let parts: Vec<&str> = token.splitn(3, '/').collect();
        let [rv, ns, name] = parts.as_slice() else {
            return bad_request(&format!("invalid continue token {token:?}"));
        };
        let Ok(rv) = rv.parse::<u64>() else {
            return bad_request(&format!("invalid continue token {token:?}"));
        };
        let Some(objects) = shared.store().snapshot_at(rv) else {
            return too_old(
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            );
        };
        (rv, objects, Some((resource, (*ns).to_owned(), (*name).to_owned())))
    } else {
        let mut store = shared.store();
        let current = store.resource_version();
        let asked = query.resource_version.as_deref();
        match (asked, query.resource_version_match.as_deref()) {
            (None, Some(_)) => {
                return bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided");
            }
            (None | Some("0"), _) => {}
            (Some(asked), None | Some("NotOlderThan" | "Exact")) => {
                let Ok(asked) = asked.parse::<u64>() else {
                    return bad_request(&format!("invalid resourceVersion {asked:?}"));
                };
                if asked > current {
                    return failure(
                        StatusCode::GATEWAY_TIMEOUT,
                        "Timeout",
                        &format!("Too large resource version: {asked}, current: {current}"),
                    );
                }
                if query.resource_version_match.as_deref() == Some("Exact") {
                    let Some(objects) = store.snapshot_at(asked) else {
                        return too_old(&format!("too old resource version: {asked} ({current})"));
                    };
                    drop(store);
                    return page(shared, kind, &filter, asked, &objects, None, limit);
                }
            }
            (Some(_), Some(other)) => return bad_request(&format!("unknown resourceVersionMatch {other:?}")),
        }
        let (rv, objects) = store.snapshot(limit.is_some());
        (rv, objects, None)
    };
    page(shared, kind, &filter, rv, &objects, after.as_ref(), limit)
}

/// One page of a list: the matching objects after `after`, at most `limit`.
fn page(
    shared: &Shared,
    kind: &ResourceType,
    filter: &Filter,
    rv: u64,
    objects: &Objects,
    after: Option<&Key>,
    limit: Option<usize>,
) -> Response<Body> {
    let mut rest = filter.select(objects).filter(|(key, _)| after.is_none_or(|a| *key > a));
    let mut items: Vec<(&Key, &Arc<Value>)> = rest.by_ref().take(limit.unwrap_or(usize::MAX)).collect();
    let remaining = rest.count();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if remaining > 0
        && let Some((last, _)) = items.last()
    {
        metadata["continue"] = json!(format!("{rv}/{}/{}", last.1, last.2));
        if filter.unfiltered() {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    shared.chaos().shuffle(&mut items);
    let items: Vec<&Value> = items.into_iter().map(|(_, o)| o.as_ref()).collect();
    json_response(&json!({
        "kind": kind.list_kind(),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

/// Where a watch starts.
enum Start {
    /// After this resourceVersion.
    After(u64),
    /// With an ADDED event for every current object (no or "0" resourceVersion).
    Synthetic,
    /// A streaming list: the current objects, then a BOOKMARK marking their end.
    InitialEvents,
}

fn watch(shared: &Arc<Shared>, resource: usize, namespace: Option<&str>, query: &Query) -> Response<Body> {
    shared.counters.watches.fetch_add(1, Ordering::Relaxed);
    let filter = match Filter::new(resource, namespace, query) {
        Ok(filter) => filter,
        Err(message) => return bad_request(&message),
    };
    let start = if query.send_initial_events {
        if !query.allow_bookmarks || query.resource_version_match.as_deref() != Some("NotOlderThan") {
            return bad_request(
                "sendInitialEvents needs allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan",
            );
        }
        Start::InitialEvents
    } else if query.resource_version_match.is_some() {
        return bad_request("resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided");
    } else {
        match query.resource_version.as_deref() {
            None | Some("0") => Start::Synthetic,
            Some(rv) => match rv.parse::<u64>() {
                Ok(rv) => Start::After(rv),
                Err(_) => return bad_request(&format!("invalid resourceVersion {rv:?}")),
            },
        }
    };
    let timeout = match query.timeout_seconds.as_deref().map(str::parse::<u64>).transpose() {
        // 0, like no value, leaves the timeout to the server.
        Ok(seconds) => seconds.filter(|&s| s > 0).map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs),
        Err(_) => return bad_request("timeoutSeconds must be a non-negative integer"),
    };
    let (sender, receiver) = mpsc::channel(64);
    let stream = Stream { shared: Arc::clone(shared), sender, sent: 0, last_rv: 0, resource };
    tokio::spawn(run_watch(stream, filter, start, query.allow_bookmarks, timeout));
    let frames = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|frame| (frame, receiver))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

/// Why a watch stream ended.
enum Ended {
    /// `timeoutSeconds` passed: the end the real server gives.
    Timeout,
    /// Chaos or `disconnect_watches` cut it.
    Cut,
    /// The client went away.
    Gone,
    /// The resourceVersion was too old; the ERROR event has been sent.
    Expired,
}

#[derive(Serialize)]
struct WireEvent<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: &'a Value,
}

/// The sending side of one watch stream.
struct Stream {
    shared: Arc<Shared>,
    sender: mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    sent: u32,
    /// The highest resourceVersion sent in order (not initial events).
    last_rv: u64,
    resource: usize,
}

impl Stream {
    async fn emit(&mut self, line: Bytes) -> Result<(), Ended> {
        self.sender.send(Ok(Frame::data(line))).await.map_err(|_| Ended::Gone)?;
        self.sent += 1;
        // Read live, so that switching chaos on also cuts watches already open.
        let limit = self.shared.chaos().chaos.watch_event_limit.filter(|&l| l > 0);
        if limit.is_some_and(|limit| self.sent >= limit) {
            return Err(Ended::Cut);
        }
        Ok(())
    }

    /// Sends one event, after chaos's delay, perhaps twice.
    async fn send(&mut self, kind: &str, object: &Value) -> Result<(), Ended> {
        let (delay, duplicate) = {
            let mut state = self.shared.chaos();
            let percent = state.chaos.duplicate_percent;
            (state.chaos.delay + state.jitter(), state.chance(percent))
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut line = serde_json::to_vec(&WireEvent { kind, object }).map_err(|_| Ended::Gone)?;
        line.push(b'\n');
        let line = Bytes::from(line);
        self.emit(line.clone()).await?;
        if duplicate {
            self.shared.counters.duplicated_events.fetch_add(1, Ordering::Relaxed);
            self.emit(line).await?;
        }
        Ok(())
    }

    async fn bookmark(&mut self, rv: u64, initial_events_end: bool) -> Result<(), Ended> {
        let kind = &RESOURCES[self.resource];
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({"kind": kind.kind, "apiVersion": kind.api_version(), "metadata": metadata});
        self.send("BOOKMARK", &object).await?;
        self.last_rv = rv;
        Ok(())
    }

    async fn expired(&mut self, asked: u64, oldest: u64) -> Ended {
        self.shared.counters.expired.fetch_add(1, Ordering::Relaxed);
        let status =
            status_object(StatusCode::GONE, "Expired", &format!("too old resource version: {asked} ({oldest})"));
        match self.send("ERROR", &status).await {
            Ok(()) | Err(Ended::Expired) => Ended::Expired,
            Err(other) => other,
        }
    }
}

async fn run_watch(mut stream: Stream, filter: Filter, start: Start, bookmarks: bool, timeout: Duration) {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut changed = stream.shared.changed.subscribe();
    let mut cut = stream.shared.cut.subscribe();
    let interval = stream.shared.bookmark_interval;
    let client = stream.sender.clone();
    let shared = Arc::clone(&stream.shared);
    let events = async {
        let mut cursor = match start {
            Start::After(rv) => {
                // Bookmarks only once the resourceVersion moves past the start.
                stream.last_rv = rv;
                rv
            }
            Start::Synthetic | Start::InitialEvents => {
                let (rv, objects) = stream.shared.store().snapshot(false);
                let mut current: Vec<&Arc<Value>> = filter.select(&objects).map(|(_, o)| o).collect();
                stream.shared.chaos().shuffle(&mut current);
                for object in current {
                    stream.send("ADDED", object).await?;
                }
                if matches!(start, Start::InitialEvents) {
                    stream.bookmark(rv, true).await?;
                }
                rv
            }
        };
        let mut next_bookmark = Instant::now() + interval;
        loop {
            let batch = stream.shared.store().events_after(cursor);
            match batch {
                Err(Gone(oldest)) => return Err(stream.expired(cursor, oldest).await),
                Ok((events, now)) => {
                    for event in events {
                        if let Some(kind) = filter.project(&event) {
                            stream.send(kind, &event.object).await?;
                            stream.last_rv = event.rv;
                        }
                    }
                    cursor = now;
                }
            }
            tokio::select! {
                _ = changed.changed() => {}
                () = tokio::time::sleep_until(next_bookmark) => {
                    if bookmarks && cursor > stream.last_rv {
                        stream.bookmark(cursor, false).await?;
                    }
                    next_bookmark = Instant::now() + interval;
                }
            }
        }
    };
    // Ends and cuts preempt the stream even while it waits out a chaos delay.
    let ended: Result<Infallible, Ended> = tokio::select! {
        ended = events => ended,
        _ = cut.changed() => Err(Ended::Cut),
        // Noticed even while the watch is idle, so a gone client's task ends.
        () = client.closed() => Err(Ended::Gone),
        () = tokio::time::sleep_until(deadline) => Err(Ended::Timeout),
        () = lifetime_over(&shared, started) => Err(Ended::Cut),
    };
    if let Err(Ended::Cut) = ended {
        stream.shared.counters.cut_watches.fetch_add(1, Ordering::Relaxed);
        if stream.shared.chaos().chaos.abort_cut_watches {
            // An error frame makes hyper drop the connection mid-body.
            let _ = stream.sender.send(Err(std::io::Error::other("watch cut by the fake API server"))).await;
        }
    }
}

/// Returns once the watch started at `started` has outlived
/// `Chaos::watch_lifetime`, which is read live so it can be switched on and off.
async fn lifetime_over(shared: &Shared, started: Instant) {
    const RECHECK: Duration = Duration::from_millis(50);
    loop {
        let lifetime = shared.chaos().chaos.watch_lifetime;
        match lifetime.map(|l| (started + l).saturating_duration_since(Instant::now())) {
            Some(Duration::ZERO) => return,
            Some(left) => tokio::time::sleep(left.min(RECHECK)).await,
            None => tokio::time::sleep(RECHECK).await,
        }
    }
}
