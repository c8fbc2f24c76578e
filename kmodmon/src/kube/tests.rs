//! The API client and the node labeler against a fake API server on loopback: TLS with a CA
//! made here, the bearer token, the exact merge-patch bodies, rate limiting, failures.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::labels::{self, NodeLabeler, Outcome};
use super::*;
use crate::host::moddb::{LiveState, RootFs};

/// One request as the fake API server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    body: serde_json::Value,
}

/// A CA and a certificate for 127.0.0.1 / localhost signed by it.
struct Pki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubernetes");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert: cert.der().clone(),
        key: key.serialize_der(),
    }
}

/// How the fake server answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Forbidden,
}

struct FakeApi {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    labels: Arc<Mutex<BTreeMap<String, String>>>,
    mode: Arc<Mutex<Mode>>,
}

impl FakeApi {
    /// Serves `/api/v1/nodes/node-1` over TLS on 127.0.0.1: GET gives the node with `labels`,
    /// PATCH applies a JSON merge patch to them.
    async fn start(pki: &Pki, labels: BTreeMap<String, String>) -> FakeApi {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = FakeApi {
            addr,
            seen: Arc::default(),
            labels: Arc::new(Mutex::new(labels)),
            mode: Arc::new(Mutex::new(Mode::Ok)),
        };
        let (seen, labels, mode) = (api.seen.clone(), api.labels.clone(), api.mode.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let (seen, labels, mode) = (seen.clone(), labels.clone(), mode.clone());
                tokio::spawn(async move {
                    // A client that does not trust our CA aborts the handshake: nothing seen.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        answer(req, seen.clone(), labels.clone(), mode.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        api
    }

    fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.labels.lock().unwrap().clone()
    }
}

async fn answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    labels: Arc<Mutex<BTreeMap<String, String>>>,
    mode: Arc<Mutex<Mode>>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let header = |name: hyper::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let (authorization, content_type) = (
        header(hyper::header::AUTHORIZATION),
        header(hyper::header::CONTENT_TYPE),
    );
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        authorization,
        content_type,
        body: body.clone(),
    });
    let reply = |status: StatusCode, v: serde_json::Value| {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        *r.status_mut() = status;
        Ok(r)
    };
    if *mode.lock().unwrap() == Mode::Forbidden {
        return reply(
            StatusCode::FORBIDDEN,
            serde_json::json!({"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                "message": "nodes \"node-1\" is forbidden: User \"system:serviceaccount:kmodmon:kmodmon\" cannot patch resource \"nodes\" in API group \"\" at the cluster scope"}),
        );
    }
    if path != "/api/v1/nodes/node-1" {
        return reply(
            StatusCode::NOT_FOUND,
            serde_json::json!({"kind": "Status", "code": 404, "message": "not found"}),
        );
    }
    let mut l = labels.lock().unwrap();
    if method == "PATCH" {
        for (k, v) in body["metadata"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default()
        {
            match v.as_str() {
                Some(v) => {
                    l.insert(k, v.to_string());
                }
                None => {
                    l.remove(&k);
                }
            }
        }
    }
    reply(
        StatusCode::OK,
        serde_json::json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "node-1", "labels": *l}}),
    )
}

fn files(pki_ca: &str, token: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), pki_ca).unwrap();
    std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
    dir
}

fn client(server: String, dir: &Path) -> ApiClient {
    ApiClient::new(ApiConfig {
        server,
        token_file: dir.join("token"),
        ca_file: dir.join("ca.crt"),
    })
    .unwrap()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn labels_follow_the_declared_modules_with_one_rate_limited_patch_each_change() {
    let pki = pki();
    let api = FakeApi::start(
        &pki,
        map(&[
            ("kubernetes.io/hostname", "node-1"),
            // Left by an earlier kmodmon: no container declares it any more.
            ("kmodmon.io/module.nf_nat", "loaded"),
        ]),
    )
    .await;
    let dir = files(&pki.ca_pem, "token-1");
    let min = Duration::from_secs(30);
    let mut labeler = NodeLabeler::new(client(api.server(), dir.path()), "node-1".into(), min);
    let t0 = Instant::now();
    let want = map(&[
        ("kmodmon.io/module.ip_vs", "loaded"),
        ("kmodmon.io/module.overlay", "builtin"),
    ]);
    let out = labeler.sync(&want, t0).await.unwrap();
    assert_eq!(out, Outcome::Patched { set: 2, removed: 1 });
    let seen = api.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/api/v1/nodes/node-1")
    );
    assert_eq!(
        (seen[1].method.as_str(), seen[1].path.as_str()),
        ("PATCH", "/api/v1/nodes/node-1")
    );
    for s in &seen {
        assert_eq!(s.authorization.as_deref(), Some("Bearer token-1"), "{s:?}");
    }
    assert_eq!(
        seen[1].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        seen[1].body,
        serde_json::json!({"metadata": {"labels": {
            "kmodmon.io/module.ip_vs": "loaded",
            "kmodmon.io/module.overlay": "builtin",
            "kmodmon.io/module.nf_nat": null
        }}})
    );
    assert_eq!(
        api.labels(),
        map(&[
            ("kmodmon.io/module.ip_vs", "loaded"),
            ("kmodmon.io/module.overlay", "builtin"),
            ("kubernetes.io/hostname", "node-1"),
        ]),
        "other labels are untouched"
    );

    // No change: no request at all.
    assert_eq!(
        labeler
            .sync(&want, t0 + Duration::from_secs(1))
            .await
            .unwrap(),
        Outcome::Unchanged
    );
    assert_eq!(api.seen().len(), 2);

    // A change within min_interval waits; after it, one PATCH with the new token (rotated).
    let want2 = map(&[("kmodmon.io/module.overlay", "builtin")]);
    assert_eq!(
        labeler
            .sync(&want2, t0 + Duration::from_secs(5))
            .await
            .unwrap(),
        Outcome::Deferred
    );
    assert_eq!(api.seen().len(), 2);
    std::fs::write(dir.path().join("token"), "token-2").unwrap();
    let out = labeler.sync(&want2, t0 + min).await.unwrap();
    assert_eq!(out, Outcome::Patched { set: 0, removed: 1 });
    let seen = api.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].authorization.as_deref(), Some("Bearer token-2"));
    assert_eq!(
        seen[2].body,
        serde_json::json!({"metadata": {"labels": {"kmodmon.io/module.ip_vs": null}}})
    );
    assert_eq!(labeler.known(), Some(&want2));
}

#[tokio::test]
async fn a_server_outside_the_ca_is_refused_and_retried_later() {
    let pki = pki();
    let api = FakeApi::start(&pki, BTreeMap::new()).await;
    let other = pki_other_ca();
    let dir = files(&other, "token-1");
    let mut labeler = NodeLabeler::new(
        client(api.server(), dir.path()),
        "node-1".into(),
        Duration::from_secs(30),
    );
    let t0 = Instant::now();
    let want = map(&[("kmodmon.io/module.ip_vs", "loaded")]);
    let err = labeler.sync(&want, t0).await.unwrap_err();
    assert!(matches!(err, KubeError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("CA"), "{err}");
    assert!(
        api.seen().is_empty(),
        "no request crossed an untrusted TLS session"
    );
    // Backing off: not even a connection for a while.
    assert_eq!(
        labeler
            .sync(&want, t0 + Duration::from_secs(10))
            .await
            .unwrap(),
        Outcome::Deferred
    );
    // A name the certificate does not carry is refused as well.
    let dir = files(&pki.ca_pem, "t");
    let c = client(format!("https://127.0.0.2:{}", api.addr.port()), dir.path());
    let err = c.node_labels("node-1").await.unwrap_err();
    assert!(
        matches!(err, KubeError::Connect { .. } | KubeError::Tls { .. }),
        "{err}"
    );
}

fn pki_other_ca() -> String {
    pki().ca_pem
}

#[tokio::test]
async fn a_forbidden_patch_says_what_rbac_is_missing() {
    let pki = pki();
    let api = FakeApi::start(&pki, BTreeMap::new()).await;
    *api.mode.lock().unwrap() = Mode::Forbidden;
    let dir = files(&pki.ca_pem, "token-1");
    let mut labeler = NodeLabeler::new(
        client(api.server(), dir.path()),
        "node-1".into(),
        Duration::from_secs(30),
    );
    let err = labeler
        .sync(
            &map(&[("kmodmon.io/module.ip_vs", "loaded")]),
            Instant::now(),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            KubeError::Status {
                status: StatusCode::FORBIDDEN,
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains("cannot patch resource \\\"nodes\\\"")
            || text.contains("cannot patch resource"),
        "{text}"
    );
    assert_eq!(api.seen().len(), 1);
}

#[test]
fn client_configuration_errors_are_clear() {
    let pki = pki();
    let dir = files(&pki.ca_pem, "t");
    let cfg = |server: &str, ca: &Path| ApiConfig {
        server: server.into(),
        token_file: dir.path().join("token"),
        ca_file: ca.to_path_buf(),
    };
    let ca = dir.path().join("ca.crt");
    assert!(matches!(
        ApiClient::new(cfg("http://10.96.0.1:443", &ca)),
        Err(KubeError::BadServer(_))
    ));
    assert!(matches!(
        ApiClient::new(cfg("https://10.96.0.1/api", &ca)),
        Err(KubeError::BadServer(_))
    ));
    assert!(ApiClient::new(cfg("https://[fd00::1]:6443", &ca)).is_ok());
    assert!(matches!(
        ApiClient::new(cfg("https://10.96.0.1", &dir.path().join("absent"))),
        Err(KubeError::Read { .. })
    ));
    let empty = dir.path().join("empty.crt");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    assert!(matches!(
        ApiClient::new(cfg("https://10.96.0.1", &empty)),
        Err(KubeError::NoCa { .. })
    ));
    assert_eq!(node_path("node-1.example"), "/api/v1/nodes/node-1.example");
    assert_eq!(node_path("a/b?c"), "/api/v1/nodes/a%2Fb%3Fc");
}

#[test]
fn label_keys_desired_labels_and_changes() {
    assert_eq!(
        labels::label_key("ip_vs").as_deref(),
        Some("kmodmon.io/module.ip_vs")
    );
    assert_eq!(labels::label_key(&"x".repeat(57)), None, "longer than 63");
    assert!(
        labels::label_key(&"x".repeat(56)).is_some(),
        "module. + 56 = 63"
    );
    assert_eq!(labels::label_key("a+b"), None);
    assert_eq!(labels::label_key("ab_"), None, "must end alphanumeric");

    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("proc")).unwrap();
    std::fs::write(
        root.path().join("proc/modules"),
        "ip_vs 172032 0 - Live 0x0000000000000000\nnf_nat 49152 1 ip_vs, Live 0x0000000000000000\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.path().join("sys/module/overlay/parameters")).unwrap();
    let live = LiveState::read(&RootFs::new(root.path().to_path_buf())).unwrap();
    let declared: Vec<String> = ["ip_vs", "overlay", "wireguard", "ip_vs"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (want, bad) = labels::desired(&declared, &live);
    assert!(bad.is_empty());
    assert_eq!(
        want,
        map(&[
            ("kmodmon.io/module.ip_vs", "loaded"),
            ("kmodmon.io/module.overlay", "builtin"),
        ]),
        "wireguard is declared but not loaded: no label"
    );
    let current = map(&[
        ("kmodmon.io/module.ip_vs", "builtin"),
        ("kmodmon.io/module.x", "loaded"),
    ]);
    let c = labels::changes(&current, &want);
    assert_eq!(
        c.get("kmodmon.io/module.ip_vs"),
        Some(&Some("loaded".to_string()))
    );
    assert_eq!(c.get("kmodmon.io/module.x"), Some(&None));
    assert!(labels::changes(&want, &want).is_empty());
}
