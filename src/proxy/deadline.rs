//! A whole-header deadline for downstream requests, which Pingora does not have (it times out
//! each read, so a client dribbling a byte at a time could hold a connection for ever).
//!
//! [`HeaderDeadline`] wraps the proxy app: each request must have its headers read within the
//! deadline (plus the keep-alive idle allowance on a reused connection), otherwise the
//! connection is dropped. The proxy marks "headers read" from `early_request_filter` through a
//! task-local flag, which lives exactly as long as the request's task.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

tokio::task_local! {
    static HEADERS_READ: Arc<AtomicBool>;
}

/// The marker the proxy persists on a kept-alive connection, so the next request on it gets
/// the idle allowance as well.
pub struct ReusedConnection;

/// Called by the proxy once a request's headers have been parsed.
pub fn mark_headers_read() {
    let _ = HEADERS_READ.try_with(|flag| flag.store(true, Ordering::Release));
}

/// Wraps an HTTP app with a deadline for receiving request headers.
pub struct HeaderDeadline<A> {
    inner: Arc<A>,
    first_request: Duration,
    keepalive_idle: Duration,
}

impl<A> HeaderDeadline<A> {
    /// `first_request` bounds a new connection; a reused one also gets `keepalive_idle`.
    pub fn new(inner: A, first_request: Duration, keepalive_idle: Duration) -> Self {
        Self {
            inner: Arc::new(inner),
            first_request,
            keepalive_idle,
        }
    }
}

#[async_trait]
impl<A> HttpServerApp for HeaderDeadline<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    // Written as a plain function returning the boxed future (the shape `async_trait` gives
    // the trait method), so the session is handed to the inner app before any future state
    // exists: what this wrapper keeps for the whole request (a long SSE stream included) is
    // only the flag, the timer and the inner future's pointer.
    fn process_new_http<'app, 'watch, 'fut>(
        self: &'app Arc<Self>,
        mut session: ServerSession,
        shutdown: &'watch ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'fut>>
    where
        'app: 'fut,
        'watch: 'fut,
        Self: 'fut,
    {
        // The proxy leaves a marker on connections it keeps alive (see `ReusedConnection`).
        let reused = session.take_connection_user_context().is_some();
        let deadline = if reused {
            self.first_request + self.keepalive_idle
        } else {
            self.first_request
        };
        let flag = Arc::new(AtomicBool::new(false));
        let work = HEADERS_READ.scope(flag.clone(), self.inner.process_new_http(session, shutdown));
        Box::pin(async move {
            tokio::pin!(work);
            tokio::select! {
                out = &mut work => out,
                _ = tokio::time::sleep(deadline) => {
                    if flag.load(Ordering::Acquire) {
                        work.await
                    } else {
                        tracing::debug!(?deadline, "request headers not received in time; closing");
                        None
                    }
                }
            }
        })
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await
    }

    async fn process_custom_session(
        self: Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.inner
            .clone()
            .process_custom_session(stream, shutdown)
            .await
    }
}
