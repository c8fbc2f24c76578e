//! The Kubernetes API, for the one thing kmodmon writes there: the opt-in node labels
//! ([`labels`]). A small client — hyper over rustls, trusting only the cluster CA, a bearer
//! token re-read for every request (projected service-account tokens rotate) — that can GET a
//! node and PATCH its labels (JSON merge patch). Nothing else: kmodmon never watches or lists.
//!
//! In a pod the API server, token and CA come from the service account
//! ([`ApiConfig::in_cluster`]); `[node_labels]` in the config can name them instead.
pub mod labels;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};

/// Where a pod's service-account credentials are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Longest wait for one API request (connect, TLS, request, answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (a Node object is tens of KiB).
const BODY_MAX: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no API server: KUBERNETES_SERVICE_HOST is not set (not in a pod?); set [node_labels] api_server"
    )]
    NotInCluster,
    #[error("bad API server address {0:?}: give https://HOST[:PORT]")]
    BadServer(String),
    #[error(
        "cannot read {path}: {source} (the service account's token and CA; is automountServiceAccountToken on?)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCa { path: PathBuf },
    #[error("{path}: {message}")]
    BadCa { path: PathBuf, message: String },
    #[error("cannot connect to {server}: {source}")]
    Connect {
        server: String,
        source: std::io::Error,
    },
    #[error("TLS with {server} failed: {source} (is the CA file the cluster's?)")]
    Tls {
        server: String,
        source: std::io::Error,
    },
    #[error("HTTP with {server} failed: {source}")]
    Http {
        server: String,
        source: hyper::Error,
    },
    #[error("{method} {path}: {status}: {message}")]
    Status {
        method: String,
        path: String,
        status: StatusCode,
        message: String,
    },
    #[error("{method} {path}: the answer is not the JSON expected: {source}")]
    Json {
        method: String,
        path: String,
        source: serde_json::Error,
    },
    #[error("{method} {path}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout { method: String, path: String },
}

/// Where the API server is and how to authenticate to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// `https://host:port`.
    pub server: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

impl ApiConfig {
    /// The in-cluster configuration: `KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT`
    /// and the service account's token and CA.
    pub fn in_cluster() -> Result<ApiConfig, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]") // IPv6
        } else {
            host
        };
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        Ok(ApiConfig {
            server: format!("https://{host}:{port}"),
            token_file: dir.join("token"),
            ca_file: dir.join("ca.crt"),
        })
    }
}

/// A client for one API server.
pub struct ApiClient {
    cfg: ApiConfig,
    authority: String,
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl ApiClient {
    /// Reads the CA file and checks the server address (the token is read per request).
    pub fn new(cfg: ApiConfig) -> Result<ApiClient, KubeError> {
        let bad = || KubeError::BadServer(cfg.server.clone());
        let uri: Uri = cfg.server.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") || !uri.path().trim_matches('/').is_empty() {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?.clone();
        let port = authority.port_u16().unwrap_or(443);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
        let pem = std::fs::read(&cfg.ca_file).map_err(|source| KubeError::Read {
            path: cfg.ca_file.clone(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| KubeError::BadCa {
                path: cfg.ca_file.clone(),
                message: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| KubeError::BadCa {
                path: cfg.ca_file.clone(),
                message: e.to_string(),
            })?;
            n += 1;
        }
        if n == 0 {
            return Err(KubeError::NoCa {
                path: cfg.ca_file.clone(),
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeError::BadCa {
                path: cfg.ca_file.clone(),
                message: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(ApiClient {
            authority: authority.to_string(),
            host,
            port,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            server_name,
            cfg,
        })
    }

    pub fn server(&self) -> &str {
        &self.cfg.server
    }

    /// The labels of node `name`.
    pub async fn node_labels(&self, name: &str) -> Result<BTreeMap<String, String>, KubeError> {
        let path = node_path(name);
        let v = self.request(Method::GET, &path, None).await?;
        let labels = &v["metadata"]["labels"];
        if labels.is_null() {
            return Ok(BTreeMap::new());
        }
        serde_json::from_value(labels.clone()).map_err(|source| KubeError::Json {
            method: "GET".into(),
            path,
            source,
        })
    }

    /// Sets (`Some`) and removes (`None`) labels of node `name` with one JSON merge patch.
    pub async fn patch_node_labels(
        &self,
        name: &str,
        changes: &BTreeMap<String, Option<String>>,
    ) -> Result<(), KubeError> {
        let body = serde_json::json!({ "metadata": { "labels": changes } });
        self.request(Method::PATCH, &node_path(name), Some(body.to_string()))
            .await
            .map(|_| ())
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<serde_json::Value, KubeError> {
        let timeout = || KubeError::Timeout {
            method: method.to_string(),
            path: path.to_string(),
        };
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_once(&method, path, body))
            .await
            .map_err(|_| timeout())?
    }

    async fn request_once(
        &self,
        method: &Method,
        path: &str,
        body: Option<String>,
    ) -> Result<serde_json::Value, KubeError> {
        // Re-read every time: a projected token is rotated by the kubelet.
        let token =
            std::fs::read_to_string(&self.cfg.token_file).map_err(|source| KubeError::Read {
                path: self.cfg.token_file.clone(),
                source,
            })?;
        let server = self.cfg.server.clone();
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| KubeError::Connect {
                server: server.clone(),
                source,
            })?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| KubeError::Tls {
                server: server.clone(),
                source,
            })?;
        let http_err = |source| KubeError::Http {
            server: server.clone(),
            source,
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(http_err)?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("kmodmon/", env!("CARGO_PKG_VERSION")),
            )
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/merge-patch+json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| KubeError::BadServer(format!("{server}: {e}")))?;
        let resp = sender.send_request(req).await.map_err(http_err)?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), BODY_MAX)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        conn.abort();
        if !status.is_success() {
            // The API server's Status object says why (forbidden: which verb on what).
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(300).collect());
            return Err(KubeError::Status {
                method: method.to_string(),
                path: path.to_string(),
                status,
                message: crate::escape::escape_bytes(message.as_bytes()),
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| KubeError::Json {
            method: method.to_string(),
            path: path.to_string(),
            source,
        })
    }
}

/// `/api/v1/nodes/NAME`; a node name is a DNS subdomain, anything else is escaped.
fn node_path(name: &str) -> String {
    let enc: String = name
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("/api/v1/nodes/{enc}")
}

#[cfg(test)]
mod tests;
