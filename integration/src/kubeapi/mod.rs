//! A test Kubernetes API server: the real list/watch/TokenReview protocol over HTTPS, for
//! the real kube client, with knobs to misbehave the way real API servers do.
//!
//! What it speaks (the subset Moat uses, faithfully):
//! - `GET` collections of Namespaces, Nodes, Pods, NetworkPolicies: lists with
//!   `resourceVersion` and forced pagination (`limit` is capped at [`Options::page_size`],
//!   `continue` tokens name a consistent snapshot), `410 Gone` as an HTTP status for an
//!   expired `continue`;
//! - watches from a resource version (`?watch=true&resourceVersion=…`; without one, the
//!   current state first as ADDED events) with bookmarks, the
//!   streaming list (`sendInitialEvents=true`, ended by the `k8s.io/initial-events-end`
//!   bookmark), `410 Gone` as a watch `ERROR` event for a compacted resource version;
//! - `GET /api/v1/namespaces/{ns}/pods/{name}`;
//! - ConfigMaps, as Moat's server replicas coordinate through them: list (with an
//!   equality `labelSelector`) and watch, and in a namespace `POST` (`409 AlreadyExists`),
//!   `GET`, `PUT` with optimistic concurrency (`409 Conflict` when `metadata.resourceVersion`
//!   is not the stored one) and `DELETE`;
//! - the `ClusterNetworkPolicy` CRD (`policy.networking.k8s.io/v1alpha2`), absent until a
//!   test installs it ([`ApiServer::install_cnp_crd`]): discovery (`/apis`, the group, the
//!   version's resource list; `404` while absent), cluster-scoped list and watch (`404`
//!   while absent; removing the CRD deletes its objects and ends their watches, as the API
//!   server does), `metadata.generation` counting spec changes, and
//!   `PATCH …/clusternetworkpolicies/{name}/status` as server-side apply (`fieldManager`
//!   required) or JSON merge patch;
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` (see [`token`]);
//! - bearer-token authentication of every request.
//!
//! Tests change objects while clients watch ([`ApiServer::apply`], [`ApiServer::delete`]),
//! compact history, drop every connection, or take the server away and bring it back.

mod crd;
pub mod store;
pub mod token;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crd::{CNP_GROUP_PATH, discovery, patch_status};
pub use store::Kind;
use store::{Objects, Refused, Selection, event_line, status};
pub use token::Bound;
use token::Signer;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Clone, Debug)]
pub struct Options {
    /// Largest page a list returns, whatever `limit` the client asks for.
    pub page_size: usize,
    /// Interval of watch bookmarks (when the client allows them).
    pub bookmark_every: Duration,
    /// How long each TokenReview takes to answer (an API server under load).
    pub review_delay: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            page_size: 3,
            bookmark_every: Duration::from_millis(500),
            review_delay: Duration::ZERO,
        }
    }
}

struct Inner {
    objects: Mutex<Objects>,
    signer: Signer,
    opts: Options,
    token: String,
    /// Bumped to cut every open connection.
    epoch: watch::Sender<u64>,
    /// While true, lists (and streaming lists) wait.
    hold_lists: watch::Sender<bool>,
    expire_next_continue: AtomicBool,
    log: Mutex<Vec<String>>,
    /// Whether the ClusterNetworkPolicy CRD is installed.
    cnp_crd: watch::Sender<bool>,
}

pub struct ApiServer {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    pub ca_pem: String,
    tls: Arc<rustls::ServerConfig>,
    rt: Option<tokio::runtime::Runtime>,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ApiServer {
    /// Starts on a free loopback port, on its own runtime (usable from sync tests).
    pub fn start(opts: Options) -> ApiServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-apiserver")
            .enable_all()
            .build()
            .expect("runtime");
        let (ca_pem, tls) = tls_config();
        let inner = Arc::new(Inner {
            objects: Mutex::new(Objects::default()),
            signer: Signer::new(),
            opts,
            token: format!("{:032x}", rand::random::<u128>()),
            epoch: watch::channel(0).0,
            hold_lists: watch::channel(false).0,
            expire_next_continue: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            cnp_crd: watch::channel(false).0,
        });
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let s = ApiServer {
            inner,
            addr,
            ca_pem,
            tls,
            rt: Some(rt),
            accept: Mutex::new(None),
        };
        s.serve(listener);
        s
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime")
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let inner = self.inner.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let task = self.rt().spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let inner = inner.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut epoch = inner.epoch.subscribe();
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(inner, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = epoch.changed() => {}
                    }
                });
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    /// Cuts every open connection (watches included); clients reconnect.
    pub fn drop_connections(&self) {
        self.inner.epoch.send_modify(|e| *e += 1);
    }

    /// Takes the server away: connections cut, new ones refused.
    pub fn stop(&self) {
        if let Some(t) = self.accept.lock().unwrap().take() {
            t.abort();
        }
        self.drop_connections();
    }

    /// Brings a stopped server back on the same address, with the same state.
    pub fn resume(&self) {
        // The old listener closes on the runtime's thread, shortly after `stop`.
        let mut tries = 0;
        let listener = loop {
            match self.rt().block_on(tokio::net::TcpListener::bind(self.addr)) {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// Writes a kubeconfig for this server (bearer token, pinned CA) with one context.
    pub fn kubeconfig(&self, path: &Path, context: &str) {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let y = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {context}\n  cluster:\n    server: https://{}\n    certificate-authority-data: {ca}\nusers:\n- name: {context}\n  user:\n    token: {}\ncontexts:\n- name: {context}\n  context: {{cluster: {context}, user: {context}}}\ncurrent-context: {context}\n",
            self.addr, self.inner.token
        );
        std::fs::write(path, y).expect("write kubeconfig");
    }

    pub fn apply(&self, v: Value) -> Value {
        if Kind::of(&v) == Some(Kind::ClusterNetworkPolicy) {
            assert!(
                *self.inner.cnp_crd.borrow(),
                "no ClusterNetworkPolicy without its CRD: install_cnp_crd first"
            );
        }
        self.inner.objects.lock().unwrap().apply(v).expect("apply")
    }

    /// Installs the ClusterNetworkPolicy CRD: discovery and the collection appear.
    pub fn install_cnp_crd(&self) {
        self.inner.cnp_crd.send_replace(true);
    }

    /// Removes the CRD as the API server does: its objects are deleted (watches see each
    /// `DELETED`), then the resource stops being served and its watches end.
    pub fn remove_cnp_crd(&self) {
        let mut o = self.inner.objects.lock().unwrap();
        let kind = Kind::ClusterNetworkPolicy;
        for v in o.items(kind) {
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            o.delete(kind, "", &name);
        }
        self.inner.cnp_crd.send_replace(false);
    }

    /// Applies a multi-document YAML text.
    pub fn apply_yaml(&self, text: &str) {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v: Value = serde::Deserialize::deserialize(doc).expect("yaml");
            if !v.is_null() {
                self.apply(v);
            }
        }
    }

    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> bool {
        self.inner
            .objects
            .lock()
            .unwrap()
            .delete(kind, ns, name)
            .is_some()
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.inner
            .objects
            .lock()
            .unwrap()
            .get(kind, ns, name)
            .cloned()
    }

    /// Forgets the event history: resuming watches get `410 Gone` and relist.
    pub fn compact(&self) {
        self.inner.objects.lock().unwrap().compact();
    }

    /// The next list page asked for with a `continue` token gets `410 Gone`.
    pub fn expire_next_continue(&self) {
        self.inner
            .expire_next_continue
            .store(true, Ordering::SeqCst);
    }

    /// Holds every list until [`ApiServer::release_lists`].
    pub fn hold_lists(&self) {
        self.inner.hold_lists.send_replace(true);
    }

    pub fn release_lists(&self) {
        self.inner.hold_lists.send_replace(false);
    }

    /// Every request so far, as `METHOD path?query -> status` (and `watch KIND from RV:
    /// ERROR 410` for watches refused as too old).
    pub fn requests(&self) -> Vec<String> {
        self.inner.log.lock().unwrap().clone()
    }

    pub fn token(&self, b: &Bound) -> String {
        let o = self.inner.objects.lock().unwrap();
        self.inner.signer.bound(b, &o)
    }

    pub fn legacy_token(&self, ns: &str, sa: &str) -> String {
        self.inner.signer.legacy(ns, sa)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn tls_config() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    p.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = p.signed_by(&key, &issuer).expect("cert");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("tls config");
    (ca_cert.pem(), Arc::new(cfg))
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).boxed())
        .unwrap()
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code.as_u16(), reason, message))
}

fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = v
                .replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/");
            (k.to_string(), v)
        })
        .collect()
}

/// Serves one request and logs it as `METHOD uri -> status`.
async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let line = format!("{} {}", req.method(), req.uri());
    let resp = route(inner.clone(), req).await;
    inner
        .log
        .lock()
        .unwrap()
        .push(format!("{line} -> {}", resp.status().as_u16()));
    resp
}

async fn route(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let uri = req.uri().clone();
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", inner.token));
    if !authorized {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let q = query(uri.query());
    let path = uri.path();
    let crd = *inner.cnp_crd.borrow();
    if !crd && path.starts_with(CNP_GROUP_PATH) {
        return not_found(path);
    }
    if req.method() == Method::GET
        && let Some(d) = discovery(path, crd)
    {
        return json_response(StatusCode::OK, &d);
    }
    if let Some(rest) = path.strip_prefix(Kind::ClusterNetworkPolicy.collection())
        && let ["", name, "status"] = rest.split('/').collect::<Vec<_>>()[..]
    {
        return patch_status(inner, req, &q, name.to_string()).await;
    }
    if req.method() == Method::GET
        && let Some(kind) = Kind::ALL.into_iter().find(|k| k.collection() == path)
    {
        return if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
            watch_kind(inner, kind, &q).await
        } else {
            list(inner, kind, &q).await
        };
    }
    if req.method() == Method::GET
        && let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let [ns, "pods", name] = rest.split('/').collect::<Vec<_>>()[..]
    {
        return match inner.objects.lock().unwrap().get(Kind::Pod, ns, name) {
            Some(p) => json_response(StatusCode::OK, p),
            None => error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("pods \"{name}\" not found"),
            ),
        };
    }
    if let Some(rest) = path.strip_prefix("/api/v1/namespaces/") {
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() >= 2 && parts[1] == Kind::ConfigMap.plural() {
            let (ns, name) = (parts[0].to_string(), parts.get(2).map(|s| s.to_string()));
            return config_map(inner, req, &q, ns, name).await;
        }
    }
    if req.method() == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        let Ok(body) = req.into_body().collect().await else {
            return error(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
        };
        let Ok(review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return error(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
        };
        if !inner.opts.review_delay.is_zero() {
            tokio::time::sleep(inner.opts.review_delay).await;
        }
        let answer = {
            let o = inner.objects.lock().unwrap();
            inner.signer.review(&review, &o)
        };
        return json_response(StatusCode::CREATED, &answer);
    }
    not_found(path)
}

fn not_found(path: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("the server could not find the requested resource ({path})"),
    )
}

/// The ConfigMap verbs in one namespace (`name`: the object's, for all but list and create).
async fn config_map(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    q: &HashMap<String, String>,
    ns: String,
    name: Option<String>,
) -> Response<Body> {
    let kind = Kind::ConfigMap;
    let not_found = |name: &str| {
        error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("configmaps \"{name}\" not found"),
        )
    };
    let method = req.method().clone();
    match (method, name) {
        (Method::GET, None) => {
            if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                let Some(sel) =
                    Selection::parse(Some(&ns), q.get("labelSelector").map(String::as_str))
                else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "only equality label selectors are served here",
                    );
                };
                watch_selected(inner, kind, q, sel).await
            } else {
                list_selected(inner, kind, q, Some(&ns)).await
            }
        }
        (Method::GET, Some(name)) => match inner.objects.lock().unwrap().get(kind, &ns, &name) {
            Some(v) => json_response(StatusCode::OK, v),
            None => not_found(&name),
        },
        (Method::DELETE, Some(name)) => {
            match inner.objects.lock().unwrap().delete(kind, &ns, &name) {
                Some(v) => json_response(StatusCode::OK, &v),
                None => not_found(&name),
            }
        }
        (m @ (Method::POST | Method::PUT), name) => {
            let Ok(body) = req.into_body().collect().await else {
                return error(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            };
            let Ok(mut v) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return error(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
            };
            if Kind::of(&v) != Some(kind) {
                return error(StatusCode::BAD_REQUEST, "BadRequest", "not a ConfigMap");
            }
            let given = v["metadata"]["name"].as_str().map(str::to_string);
            if name.is_some() && given != name {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                );
            }
            let shown = given.unwrap_or_default();
            v["metadata"]["namespace"] = json!(ns);
            let mut o = inner.objects.lock().unwrap();
            let (r, ok) = if m == Method::POST {
                (o.create(v), StatusCode::CREATED)
            } else {
                (o.update(v), StatusCode::OK)
            };
            match r {
                Ok(v) => json_response(ok, &v),
                Err(Refused::Exists) => error(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("configmaps \"{shown}\" already exists"),
                ),
                Err(Refused::Conflict { .. }) => error(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on configmaps \"{shown}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                ),
                Err(Refused::Missing) => not_found(&shown),
            }
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ),
    }
}

async fn held(inner: &Inner) {
    let mut h = inner.hold_lists.subscribe();
    let _ = h.wait_for(|held| !held).await;
}

async fn list(inner: Arc<Inner>, kind: Kind, q: &HashMap<String, String>) -> Response<Body> {
    list_selected(inner, kind, q, None).await
}

async fn list_selected(
    inner: Arc<Inner>,
    kind: Kind,
    q: &HashMap<String, String>,
    namespace: Option<&str>,
) -> Response<Body> {
    let Some(sel) = Selection::parse(namespace, q.get("labelSelector").map(String::as_str)) else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "only equality label selectors are served here",
        );
    };
    held(&inner).await;
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .map_or(inner.opts.page_size, |l| l.min(inner.opts.page_size));
    let token = q.get("continue").filter(|t| !t.is_empty());
    if token.is_some() && inner.expire_next_continue.swap(false, Ordering::SeqCst) {
        inner.objects.lock().unwrap().compact();
    }
    let page =
        inner
            .objects
            .lock()
            .unwrap()
            .list_in(kind, &sel, Some(limit), token.map(String::as_str));
    match page {
        Ok((items, rv, next)) => {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if let Some(n) = next {
                meta["continue"] = json!(n);
            }
            json_response(
                StatusCode::OK,
                &json!({
                    "kind": format!("{}List", kind.name()),
                    "apiVersion": kind.api_version(),
                    "metadata": meta,
                    "items": items,
                }),
            )
        }
        Err(store::Expired) => error(
            StatusCode::GONE,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results.",
        ),
    }
}

fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Vec<u8> {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": meta}),
    )
}

async fn watch_kind(inner: Arc<Inner>, kind: Kind, q: &HashMap<String, String>) -> Response<Body> {
    watch_selected(inner, kind, q, Selection::default()).await
}

/// A watch of what `sel` selects (its namespace and labels; events of other objects are
/// not sent, as the API server filters them).
async fn watch_selected(
    inner: Arc<Inner>,
    kind: Kind,
    q: &HashMap<String, String>,
    sel: Selection,
) -> Response<Body> {
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let mut first: Vec<Vec<u8>> = Vec::new();
    let from = q
        .get("resourceVersion")
        .and_then(|r| r.parse::<u64>().ok())
        .filter(|r| *r > 0);
    // Without a resource version ("" or "0"), a watch starts with the current state as
    // synthetic ADDED events, as the API server does; a streaming list ends those with the
    // initial-events-end bookmark.
    let (mut last, mut live) = match from {
        Some(from) if !initial => {
            let o = inner.objects.lock().unwrap();
            match o.since(kind, from) {
                Ok((past, live)) => {
                    let last = past.last().map_or(from, |c| c.rv);
                    first.extend(
                        past.iter()
                            .filter(|c| sel.selects(&c.object))
                            .map(|c| c.line()),
                    );
                    (last, live)
                }
                Err(oldest) => {
                    inner
                        .log
                        .lock()
                        .unwrap()
                        .push(format!("watch {} from {from}: ERROR 410", kind.name()));
                    let why = format!("too old resource version: {from} ({oldest})");
                    first.push(event_line("ERROR", &status(410, "Expired", &why)));
                    let (_, r) = broadcast::channel(1);
                    (u64::MAX, r)
                }
            }
        }
        _ => {
            held(&inner).await;
            let o = inner.objects.lock().unwrap();
            first.extend(
                o.items(kind)
                    .iter()
                    .filter(|v| sel.selects(v))
                    .map(|v| event_line("ADDED", v)),
            );
            if initial {
                first.push(bookmark(kind, o.rv(), true));
            }
            (o.rv(), o.events.subscribe())
        }
    };
    let mut crd = inner.cnp_crd.subscribe();
    let ends_with_crd = kind == Kind::ClusterNetworkPolicy;
    tokio::spawn(async move {
        for b in first {
            if tx.send(Ok(Frame::data(Bytes::from(b)))).await.is_err() {
                return;
            }
        }
        if last == u64::MAX {
            return;
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let mut tick = tokio::time::interval(inner.opts.bookmark_every);
        loop {
            let line = tokio::select! {
                c = live.recv() => match c {
                    Ok(c) if c.kind == kind && c.rv > last => {
                        last = c.rv;
                        if !sel.selects(&c.object) {
                            continue;
                        }
                        c.line()
                    }
                    Ok(_) => continue,
                    // Too slow a reader: end the watch; the client resumes from `last`.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let o = inner.objects.lock().unwrap();
                    if !live.is_empty() {
                        continue;
                    }
                    last = last.max(o.rv());
                    bookmark(kind, last, false)
                }
                _ = &mut end => return,
                _ = crd.wait_for(|on| !on), if ends_with_crd => return,
                _ = tx.closed() => return,
            };
            if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
        .unwrap()
}
