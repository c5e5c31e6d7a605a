//! The framework floor: the smallest Pingora reverse proxy that forwards every request to one
//! upstream (pooled keep-alive connections, one worker thread, no logging, the same allocator
//! as keygate). keygate's cost is measured against this.
//!
//! Usage: `load-passthrough <listen addr> <upstream addr> [--h2c] [--tls <cert.pem> <key.pem>]`:
//! `--h2c` also accepts HTTP/2 with prior knowledge on the cleartext listener, `--tls`
//! terminates TLS (rustls, as keygate) instead; the deployment rows use both.

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// The same allocator as keygate: with the `mimalloc` feature, mimalloc.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Passthrough {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() -> anyhow::Result<()> {
    // The same process-wide memory settings as keygate's binary: its idle-stream memory and
    // this one's are then comparable.
    keygate::memory::keep_small_pages().map_err(anyhow::Error::msg)?;
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let upstream = args.next().unwrap_or_else(|| "127.0.0.1:3000".into());
    let (mut h2c, mut tls) = (false, None);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--h2c" => h2c = true,
            "--tls" => match (args.next(), args.next()) {
                (Some(cert), Some(key)) => tls = Some((cert, key)),
                _ => anyhow::bail!("--tls needs a certificate file and a key file"),
            },
            other => anyhow::bail!("unknown option {other:?}"),
        }
    }
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Passthrough { upstream });
    if h2c {
        if let Some(app) = proxy.app_logic_mut() {
            let mut options = HttpServerOptions::default();
            options.h2c = true;
            app.server_options = Some(options);
        }
    }
    match tls {
        Some((cert, key)) => proxy.add_tls(&listen, &cert, &key)?,
        None => proxy.add_tcp(&listen),
    }
    server.add_service(proxy);
    server.run_forever()
}
