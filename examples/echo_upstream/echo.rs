//! The echo MCP server's routes (shared with the integration tests, which run it in-process).

use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// `POST /mcp` (JSON-RPC, single or batch), `GET /mcp` (405: no server-sent stream here) and
/// `GET /health`.
pub fn router() -> Router {
    Router::new().route("/mcp", post(mcp).get(no_stream)).route(
        "/health",
        get(|| async { Json(json!({"status": "healthy", "service": "echo-upstream"})) }),
    )
}

async fn no_stream() -> StatusCode {
    StatusCode::METHOD_NOT_ALLOWED
}

/// The upstream key this request carried, in words.
pub fn received_key(query: Option<&str>, headers: &HeaderMap) -> String {
    let from_query = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "apiKey")
            .map(|(_, v)| v.into_owned())
    });
    let base_url = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "baseUrl")
            .map(|(_, v)| v.into_owned())
    });
    let from_header = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut said = match (from_query, from_header) {
        (Some(q), Some(h)) => format!("apiKey query parameter {q:?} and Authorization {h:?}"),
        (Some(q), None) => format!("apiKey query parameter {q:?}"),
        (None, Some(h)) => format!("Authorization header {h:?}"),
        (None, None) => "no key".to_string(),
    };
    if let Some(b) = base_url {
        said.push_str(&format!(", baseUrl {b:?}"));
    }
    said
}

async fn mcp(RawQuery(query): RawQuery, headers: HeaderMap, body: String) -> Response {
    let key = received_key(query.as_deref(), &headers);
    let Ok(msg) = serde_json::from_str::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"jsonrpc": "2.0", "id": null,
                        "error": {"code": -32700, "message": "parse error"}})),
        )
            .into_response();
    };
    let answers: Vec<Value> = match &msg {
        Value::Array(batch) => batch.iter().filter_map(|m| answer(m, &key)).collect(),
        single => answer(single, &key).into_iter().collect(),
    };
    match (msg.is_array(), answers.len()) {
        (_, 0) => StatusCode::ACCEPTED.into_response(),
        (false, _) => Json(answers.into_iter().next().unwrap_or(Value::Null)).into_response(),
        (true, _) => Json(Value::Array(answers)).into_response(),
    }
}

/// The response to one JSON-RPC message; `None` for a notification.
fn answer(msg: &Value, key: &str) -> Option<Value> {
    let id = msg.get("id")?.clone();
    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let result = match method {
        "initialize" => json!({
            "protocolVersion": params.get("protocolVersion").and_then(Value::as_str)
                .unwrap_or("2025-06-18"),
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "keygate-echo-upstream", "version": "0.1.0"},
            "instructions": "Development echo server: its tools show the key keygate injected."
        }),
        "ping" => json!({}),
        "tools/list" => json!({"tools": [
            {
                "name": "get_received_key",
                "description": "Say which upstream key this request carried (needs twenty:read).",
                "inputSchema": {"type": "object", "properties": {}}
            },
            {
                "name": "echo",
                "description": "Echo the text back, with the key received (needs twenty:write).",
                "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}},
                                "required": ["text"]}
            }
        ]}),
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str).unwrap_or("");
            let text = match name {
                "get_received_key" => format!("received {key}"),
                "echo" => {
                    let said = params
                        .pointer("/arguments/text")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    format!("{said} (received {key})")
                }
                _ => {
                    return Some(json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": -32602, "message": format!("unknown tool {name:?}")}}))
                }
            };
            json!({"content": [{"type": "text", "text": text}], "isError": false})
        }
        _ => {
            return Some(json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": -32601, "message": format!("method not found: {method}")}}))
        }
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}
