//! A tiny MCP server to try keygate with, offline: it answers JSON-RPC `initialize`, `ping`,
//! `tools/list` and `tools/call` on `POST /mcp`, and its tools show which upstream key keygate
//! injected (the `apiKey` query parameter, or the `Authorization` header). For development
//! only: it echoes the key it received back to the caller.
//!
//! ```sh
//! cargo run --example echo_upstream            # listens on 127.0.0.1:3000
//! cargo run --example echo_upstream -- 127.0.0.1:3001
//! ```

mod echo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("echo upstream: MCP on http://{addr}/mcp (development only: it echoes keys back)");
    axum::serve(listener, echo::router()).await
}
