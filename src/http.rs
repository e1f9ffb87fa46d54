//! The HTTP listener (`[http] listen`): `/metrics` (Prometheus text format), `/healthz` (200
//! while the process runs) and `/readyz` (200 when ready, 503 with the reasons otherwise).
//!
//! Unauthenticated and loopback by default. A port that cannot be bound is logged at ERROR and
//! the hub runs on without the listener: telemetry keeps flowing when only its monitoring is
//! misconfigured. Plain hyper (three fixed paths need no router); half-closed requests are
//! answered (`curl`-style clients that shut their write side after the request).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, Sources};

/// What the listener serves.
struct Served {
    sources: Sources,
    registry: Registry,
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const TEXT: &str = "text/plain; charset=utf-8";

/// Answers one request (pure apart from reading the counters).
fn answer(s: &Served, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "use GET\n".to_string(),
        );
    }
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::render(&s.registry),
        ),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".to_string()),
        "/readyz" => match s.sources.readiness() {
            Ok(()) => reply(StatusCode::OK, TEXT, "ready\n".to_string()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics, /healthz or /readyz\n".to_string(),
        ),
    }
}

/// Binds `addr` and serves until `stop`; `None` (logged at ERROR) when it cannot bind.
pub fn start(
    addr: SocketAddr,
    sources: Sources,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = match std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %addr, error = %e, "cannot start the HTTP listener: /metrics, /healthz and /readyz are unavailable; free the port or change http.listen (\"\" turns it off)");
            return None;
        }
    };
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(listen = %bound, "HTTP listener: /metrics, /healthz, /readyz");
    let served = Arc::new(Served {
        registry: sources.registry(),
        sources,
    });
    Some(tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => match a {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, usually: wait instead of spinning.
                        tracing::warn!(error = %e, "HTTP listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let served = served.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = answer(&served, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let stop = stop.clone();
            conns.spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .half_close(true)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    },
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        // A scraper holding the connection open must not hold up the exit.
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                    }
                }
            });
            // Reap finished connections so the set does not grow.
            while conns.try_join_next().is_some() {}
        }
        while conns.join_next().await.is_some() {}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_methods() {
        let cfg =
            crate::config::Config::from_toml("[[routes]]\ntopics = [\"a/+\"]\n", "t", &[]).unwrap();
        let stats = Arc::new(crate::pipeline::Stats::default());
        let id = crate::did::Identity::generate(crate::did::DidMethod::Key);
        let sources = Sources {
            stats: stats.clone(),
            ship: Default::default(),
            link: Default::default(),
            shared: Arc::new(crate::pipeline::Shared::from_config(&cfg, id, stats)),
            outbox_full: Default::default(),
            stopping: Default::default(),
            store: crate::config::StoreKind::Embedded,
            broker: "mqtt://b:1883".into(),
        };
        let s = Served {
            registry: sources.registry(),
            sources,
        };
        assert_eq!(
            answer(&s, &Method::GET, "/healthz").status(),
            StatusCode::OK
        );
        assert_eq!(
            answer(&s, &Method::GET, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let m = answer(&s, &Method::GET, "/metrics");
        assert_eq!(m.status(), StatusCode::OK);
        assert_eq!(m.headers()[CONTENT_TYPE], metrics::CONTENT_TYPE);
        assert_eq!(
            answer(&s, &Method::GET, "/x").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer(&s, &Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
