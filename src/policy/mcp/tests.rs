//! Tests of the MCP parser, scope rules and org rules.

use super::*;
use crate::auth::{Identity, OrgContext, TokenKind};

fn call<'a>(method: &'a str, name: Option<&'a str>) -> RpcCall<'a> {
    RpcCall {
        method: method.into(),
        name: name.map(Into::into),
    }
}

fn parse(body: &str) -> Result<Vec<RpcCall<'_>>, McpError> {
    parse_body(body.as_bytes())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn rule(method: &str, name: Option<&str>, scopes: &[&str]) -> ScopeRuleConfig {
    ScopeRuleConfig {
        method: method.into(),
        name: name.map(Into::into),
        scopes: strings(scopes),
    }
}

// --- parse_body ---------------------------------------------------------------------

#[test]
fn single_request_without_name() {
    let calls = parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#);
    assert_eq!(calls, Ok(vec![call("tools/list", None)]));
}

#[test]
fn tools_call_takes_params_name() {
    let body = r#"{"jsonrpc":"2.0","id":"a","method":"tools/call",
        "params":{"name":"get_contact","arguments":{"id":"1","name":"not this"}}}"#;
    assert_eq!(
        parse(body),
        Ok(vec![call("tools/call", Some("get_contact"))])
    );
}

#[test]
fn prompts_get_takes_params_name() {
    let body = r#"{"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"review"}}"#;
    assert_eq!(parse(body), Ok(vec![call("prompts/get", Some("review"))]));
}

#[test]
fn resources_read_takes_params_uri_not_name() {
    let body = r#"{"jsonrpc":"2.0","id":3,"method":"resources/read",
        "params":{"uri":"twenty://people/1","name":"decoy"}}"#;
    assert_eq!(
        parse(body),
        Ok(vec![call("resources/read", Some("twenty://people/1"))])
    );
}

#[test]
fn other_methods_carry_an_optional_name_like_the_sdk_header() {
    let body =
        r#"{"jsonrpc":"2.0","id":4,"method":"resources/subscribe","params":{"uri":"twenty://x"}}"#;
    assert_eq!(
        parse(body),
        Ok(vec![call("resources/subscribe", Some("twenty://x"))])
    );
}

#[test]
fn notification_is_a_call() {
    let calls = parse(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    assert_eq!(calls, Ok(vec![call("notifications/initialized", None)]));
}

#[test]
fn response_yields_no_call() {
    assert_eq!(parse(r#"{"jsonrpc":"2.0","id":7,"result":{}}"#), Ok(vec![]));
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-1,"message":"x"}}"#),
        Ok(vec![])
    );
}

#[test]
fn batch_keeps_order_and_skips_responses() {
    let body = r#"[
        {"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_company"}},
        {"jsonrpc":"2.0","id":9,"result":{}},
        {"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}},
        {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"create_note"}}
    ]"#;
    assert_eq!(
        parse(body),
        Ok(vec![
            call("tools/call", Some("get_company")),
            call("notifications/cancelled", None),
            call("tools/call", Some("create_note")),
        ])
    );
}

#[test]
fn malformed_json_is_not_json() {
    assert_eq!(parse(r#"{"jsonrpc":"2.0","#), Err(McpError::NotJson));
    assert_eq!(parse(""), Err(McpError::NotJson));
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","method":"ping"} {}"#),
        Err(McpError::NotJson)
    );
}

#[test]
fn scalars_and_nested_batches_are_not_messages() {
    assert_eq!(parse(r#""tools/call""#), Err(McpError::NotAnObject));
    assert_eq!(parse("42"), Err(McpError::NotAnObject));
    assert_eq!(parse("null"), Err(McpError::NotAnObject));
    assert_eq!(
        parse(r#"[[{"jsonrpc":"2.0","method":"ping"}]]"#),
        Err(McpError::NotAnObject)
    );
    assert_eq!(
        parse(r#"[{"jsonrpc":"2.0","method":"ping"}, 1]"#),
        Err(McpError::NotAnObject)
    );
}

#[test]
fn empty_batch_is_refused() {
    assert_eq!(parse("[]"), Err(McpError::EmptyBatch));
}

#[test]
fn jsonrpc_version_must_be_2_0() {
    assert_eq!(
        parse(r#"{"method":"ping","id":1}"#),
        Err(McpError::BadVersion)
    );
    assert_eq!(
        parse(r#"{"jsonrpc":"1.0","method":"ping","id":1}"#),
        Err(McpError::BadVersion)
    );
    assert_eq!(
        parse(r#"{"jsonrpc":2.0,"method":"ping","id":1}"#),
        Err(McpError::BadVersion)
    );
}

#[test]
fn method_must_be_a_non_empty_string() {
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":5}"#),
        Err(McpError::BadMethod)
    );
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":""}"#),
        Err(McpError::BadMethod)
    );
}

#[test]
fn id_must_be_string_number_or_null() {
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#),
        Err(McpError::BadId)
    );
}

#[test]
fn params_must_be_structured() {
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":"x"}"#),
        Err(McpError::BadParams)
    );
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":null}"#),
        Err(McpError::BadParams)
    );
}

#[test]
fn neither_request_nor_response_is_refused() {
    // No method and no result/error.
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1}"#),
        Err(McpError::NotRequestOrResponse)
    );
    // A method and a result: the gateway and the upstream could read it differently.
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","result":{}}"#),
        Err(McpError::NotRequestOrResponse)
    );
    // Both result and error; and a response without an id.
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#),
        Err(McpError::NotRequestOrResponse)
    );
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","result":{}}"#),
        Err(McpError::NotRequestOrResponse)
    );
}

#[test]
fn repeated_or_case_variant_members_are_refused() {
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","Method":"tools/call"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_a","name":"delete_b"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_a","NAME":"delete_b"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_a"},"params":{"name":"b"}}"#,
    ] {
        assert_eq!(parse(body), Err(McpError::AmbiguousMember), "{body}");
    }
}

#[test]
fn each_named_method_requires_its_name() {
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{}}}"#),
        Err(McpError::MissingName {
            method: "tools/call",
            field: "name"
        })
    );
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get"}"#),
        Err(McpError::MissingName {
            method: "prompts/get",
            field: "name"
        })
    );
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"name":"x"}}"#),
        Err(McpError::MissingName {
            method: "resources/read",
            field: "uri"
        })
    );
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#),
        Err(McpError::MissingName {
            method: "tools/call",
            field: "name"
        })
    );
    assert_eq!(
        parse(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["get_x"]}"#),
        Err(McpError::MissingName {
            method: "tools/call",
            field: "name"
        })
    );
}

#[test]
fn error_codes_follow_json_rpc_and_the_draft() {
    assert_eq!(McpError::NotJson.jsonrpc_code(), -32700);
    assert_eq!(McpError::EmptyBatch.jsonrpc_code(), -32600);
    assert_eq!(
        McpError::MissingName {
            method: "tools/call",
            field: "name"
        }
        .jsonrpc_code(),
        -32602
    );
    assert_eq!(McpError::NameHeaderMismatch.jsonrpc_code(), -32020);
}

// --- check_headers ------------------------------------------------------------------

#[test]
fn no_headers_is_accepted() {
    assert_eq!(
        check_headers(&[call("tools/call", Some("x"))], None, None),
        Ok(())
    );
}

#[test]
fn matching_headers_are_accepted_with_whitespace_trimmed() {
    let calls = [call("tools/call", Some("get_contact"))];
    assert_eq!(
        check_headers(&calls, Some("tools/call"), Some(" get_contact\t")),
        Ok(())
    );
    let calls = [call("tools/list", None)];
    assert_eq!(check_headers(&calls, Some("tools/list"), None), Ok(()));
}

#[test]
fn method_header_mismatch_is_refused() {
    let calls = [call("prompts/get", Some("x"))];
    assert_eq!(
        check_headers(&calls, Some("tools/call"), Some("x")),
        Err(McpError::MethodHeaderMismatch)
    );
    // Values are case-sensitive.
    assert_eq!(
        check_headers(&calls, Some("PROMPTS/GET"), Some("x")),
        Err(McpError::MethodHeaderMismatch)
    );
}

#[test]
fn name_header_mismatch_is_refused() {
    let calls = [call("tools/call", Some("delete_company"))];
    assert_eq!(
        check_headers(&calls, Some("tools/call"), Some("get_company")),
        Err(McpError::NameHeaderMismatch)
    );
}

#[test]
fn name_header_without_name_in_body_is_refused() {
    let calls = [call("tools/list", None)];
    assert_eq!(
        check_headers(&calls, Some("tools/list"), Some("get_company")),
        Err(McpError::NameHeaderMismatch)
    );
}

#[test]
fn missing_name_or_method_header_is_refused_once_headers_are_used() {
    let calls = [call("tools/call", Some("get_company"))];
    assert_eq!(
        check_headers(&calls, Some("tools/call"), None),
        Err(McpError::MissingNameHeader)
    );
    assert_eq!(
        check_headers(&calls, None, Some("get_company")),
        Err(McpError::MissingMethodHeader)
    );
}

#[test]
fn base64_name_header_is_decoded_and_markers_are_exact() {
    // "Hello, 世界" from the draft's encoding table.
    let calls = [call("resources/read", Some("Hello, 世界"))];
    assert_eq!(
        check_headers(
            &calls,
            Some("resources/read"),
            Some("=?base64?SGVsbG8sIOS4lueVjA==?=")
        ),
        Ok(())
    );
    // Uppercase markers are a literal value, not an encoding.
    let calls = [call("tools/call", Some("calc"))];
    assert_eq!(
        check_headers(&calls, Some("tools/call"), Some("=?BASE64?Y2FsYw==?=")),
        Err(McpError::NameHeaderMismatch)
    );
    assert_eq!(
        check_headers(&calls, Some("tools/call"), Some("=?base64?Y2FsYw==?=")),
        Ok(())
    );
}

#[test]
fn malformed_header_values_are_refused() {
    let calls = [call("tools/call", Some("calc"))];
    let bad = Err(McpError::InvalidHeaderValue { header: "Mcp-Name" });
    // Missing padding, bad alphabet, control character, non-ASCII.
    for v in [
        "=?base64?Y2FsYw?=",
        "=?base64?Y2F!!sYw==?=",
        "ca\u{1}lc",
        "cälc",
    ] {
        assert_eq!(
            check_headers(&calls, Some("tools/call"), Some(v)),
            bad,
            "{v}"
        );
    }
    assert_eq!(
        check_headers(&calls, Some("tools/c\u{7f}all"), Some("calc")),
        Err(McpError::InvalidHeaderValue {
            header: "Mcp-Method"
        })
    );
}

#[test]
fn headers_with_a_response_only_body_are_refused() {
    assert_eq!(
        check_headers(&[], Some("tools/call"), Some("x")),
        Err(McpError::MethodHeaderMismatch)
    );
}

#[test]
fn headers_must_describe_every_call_in_a_batch() {
    let same = [
        call("tools/call", Some("get_a")),
        call("tools/call", Some("get_a")),
    ];
    assert_eq!(
        check_headers(&same, Some("tools/call"), Some("get_a")),
        Ok(())
    );
    let mixed = [
        call("tools/call", Some("get_a")),
        call("tools/call", Some("delete_b")),
    ];
    assert_eq!(
        check_headers(&mixed, Some("tools/call"), Some("get_a")),
        Err(McpError::NameHeaderMismatch)
    );
    let methods = [call("tools/list", None), call("tools/call", Some("get_a"))];
    assert_eq!(
        check_headers(&methods, Some("tools/list"), None),
        Err(McpError::MethodHeaderMismatch)
    );
}

// --- scope rules --------------------------------------------------------------------

#[test]
fn first_matching_rule_wins() {
    let rules = ScopeRules::compile(&[
        rule("tools/call", Some("get_*"), &["read"]),
        rule("tools/call", None, &["write"]),
        rule("tools/call", Some("get_secret"), &["admin"]),
    ])
    .unwrap();
    assert_eq!(
        rules.required(&call("tools/call", Some("get_secret"))),
        ["read"]
    );
    assert_eq!(
        rules.required(&call("tools/call", Some("delete_x"))),
        ["write"]
    );
}

#[test]
fn rule_with_name_does_not_match_a_call_without_one() {
    let rules = ScopeRules::compile(&[rule("*", Some("*"), &["named"]), rule("*", None, &["any"])])
        .unwrap();
    assert_eq!(rules.required(&call("tools/list", None)), ["any"]);
    assert_eq!(rules.required(&call("prompts/get", Some("p"))), ["named"]);
}

#[test]
fn no_matching_rule_needs_nothing() {
    let rules = ScopeRules::compile(&[rule("tools/call", None, &["write"])]).unwrap();
    assert!(rules.required(&call("tools/list", None)).is_empty());
    assert_eq!(rules.authorize(&[call("tools/list", None)], &[]), Ok(()));
}

#[test]
fn globs_match_prefixes_alternations_and_cross_slashes() {
    let rules = ScopeRules::compile(&[
        rule("tools/call", Some("get_*"), &["a"]),
        rule(
            "resources/read",
            Some("twenty://{people,companies}/*"),
            &["b"],
        ),
        rule("notifications/*", None, &["c"]),
        rule("*", None, &["d"]),
    ])
    .unwrap();
    assert_eq!(
        rules.required(&call("tools/call", Some("get_company"))),
        ["a"]
    );
    // Case-sensitive, anchored.
    assert_eq!(
        rules.required(&call("tools/call", Some("Get_company"))),
        ["d"]
    );
    assert_eq!(
        rules.required(&call("tools/call", Some("xget_company"))),
        ["d"]
    );
    assert_eq!(
        rules.required(&call("resources/read", Some("twenty://people/1/notes"))),
        ["b"]
    );
    assert_eq!(
        rules.required(&call("resources/read", Some("twenty://tasks/1"))),
        ["d"]
    );
    assert_eq!(
        rules.required(&call("notifications/roots/list_changed", None)),
        ["c"]
    );
    assert_eq!(rules.required(&call("anything/else", None)), ["d"]);
}

#[test]
fn compile_errors_name_the_rule_and_the_glob() {
    let err = ScopeRules::compile(&[
        rule("ping", None, &[]),
        rule("tools/call", Some("get_[a-"), &["x"]),
    ])
    .unwrap_err();
    assert!(err.contains("scope_rules[1].name"), "{err}");
    assert!(err.contains("get_[a-"), "{err}");

    let err = ScopeRules::compile(&[rule("tools/{call", None, &["x"])]).unwrap_err();
    assert!(err.contains("scope_rules[0].method"), "{err}");

    let err = ScopeRules::compile(&[rule("", None, &["x"])]).unwrap_err();
    assert!(err.contains("scope_rules[0].method"), "{err}");

    let err = ScopeRules::compile(&[rule("ping", None, &["a b"])]).unwrap_err();
    assert!(err.contains("scope_rules[0].scopes"), "{err}");
    let err = ScopeRules::compile(&[rule("ping", None, &["a\"b"])]).unwrap_err();
    assert!(err.contains("scope_rules[0].scopes"), "{err}");
}

#[test]
fn all_scopes_of_a_rule_are_required() {
    let rules = ScopeRules::compile(&[rule("*", None, &["a", "b"])]).unwrap();
    let calls = [call("ping", None)];
    assert_eq!(rules.authorize(&calls, &strings(&["a", "b", "c"])), Ok(()));
    assert_eq!(
        rules.authorize(&calls, &strings(&["a"])),
        Err(strings(&["a", "b"]))
    );
}

#[test]
fn batch_with_one_unauthorized_call_is_denied_with_the_union() {
    let rules = ScopeRules::compile(&[
        rule("tools/call", Some("get_*"), &["read"]),
        rule("tools/call", None, &["write", "read"]),
        rule("prompts/get", None, &["prompts"]),
    ])
    .unwrap();
    let calls = [
        call("tools/call", Some("get_a")),
        call("prompts/get", Some("p")),
        call("tools/call", Some("delete_b")),
        call("tools/call", Some("get_c")),
    ];
    assert_eq!(
        rules.authorize(&calls, &strings(&["read", "prompts"])),
        Err(strings(&["prompts", "read", "write"]))
    );
    assert_eq!(
        rules.authorize(&calls, &strings(&["read", "prompts", "write"])),
        Ok(())
    );
    // A body of responses only needs nothing.
    assert_eq!(rules.authorize(&[], &[]), Ok(()));
}

#[test]
fn twenty_default_config_compiles() {
    assert!(ScopeRules::compile(&ScopeRules::twenty_default_config()).is_ok());
}

#[test]
fn twenty_default_read_tool_vs_write_tool() {
    let rules = ScopeRules::twenty_default();
    let read = strings(&["twenty:read"]);
    for name in [
        "get_contact",
        "list_all_objects",
        "search_companies",
        "find_orphaned_records",
        "filter_activities",
    ] {
        let c = [call("tools/call", Some(name))];
        assert_eq!(rules.authorize(&c, &read), Ok(()), "{name}");
    }
    for name in ["create_contact", "update_company", "delete_note", "getaway"] {
        let c = [call("tools/call", Some(name))];
        assert_eq!(
            rules.authorize(&c, &read),
            Err(strings(&["twenty:write"])),
            "{name}"
        );
    }
    let write = strings(&["twenty:write"]);
    let c = [call("tools/call", Some("create_contact"))];
    assert_eq!(rules.authorize(&c, &write), Ok(()));
}

#[test]
fn twenty_default_listing_and_reading_need_read() {
    let rules = ScopeRules::twenty_default();
    for c in [
        call("tools/list", None),
        call("resources/list", None),
        call("resources/read", Some("twenty://people/1")),
        call("prompts/list", None),
        call("prompts/get", Some("summary")),
        call("completion/complete", None),
    ] {
        assert_eq!(rules.required(&c), ["twenty:read"], "{c:?}");
    }
}

#[test]
fn twenty_default_housekeeping_needs_no_scope() {
    let rules = ScopeRules::twenty_default();
    // A write-only token can still connect, ping and cancel.
    let write_only = strings(&["twenty:write"]);
    let calls = [
        call("initialize", None),
        call("notifications/initialized", None),
        call("ping", None),
        call("notifications/cancelled", None),
        call("server/discover", None),
    ];
    assert_eq!(rules.authorize(&calls, &write_only), Ok(()));
    assert_eq!(rules.authorize(&calls, &[]), Ok(()));
}

// --- org rules ----------------------------------------------------------------------

fn identity(org: Option<(&str, Option<&str>)>) -> Identity {
    Identity {
        subject: "user_1".into(),
        issuer: "https://clerk.example.com".into(),
        kind: TokenKind::OAuthJwt,
        scopes: vec![],
        client_id: None,
        org: org.map(|(id, role)| OrgContext {
            id: id.into(),
            slug: None,
            role: role.map(Into::into),
            permissions: vec![],
        }),
        expires_at: None,
        roles: vec![],
        email: None,
        email_verified: None,
        second_factor_at: None,
    }
}

#[test]
fn no_org_rules_allow_everyone() {
    let rules = OrgRulesConfig::default();
    assert!(!rules.is_active());
    assert_eq!(check_org(&rules, &identity(None)), Ok(()));
}

#[test]
fn org_allowlist() {
    let rules = OrgRulesConfig {
        allowed_org_ids: strings(&["org_a", "org_b"]),
        required_role: None,
    };
    assert_eq!(check_org(&rules, &identity(Some(("org_b", None)))), Ok(()));
    assert_eq!(
        check_org(&rules, &identity(Some(("org_c", Some("org:admin"))))),
        Err(OrgDenial::OrgNotAllowed)
    );
}

#[test]
fn org_role_must_equal_exactly() {
    let rules = OrgRulesConfig {
        allowed_org_ids: vec![],
        required_role: Some("org:admin".into()),
    };
    assert_eq!(
        check_org(&rules, &identity(Some(("org_x", Some("org:admin"))))),
        Ok(())
    );
    for role in [Some("org:member"), Some("admin"), None] {
        assert_eq!(
            check_org(&rules, &identity(Some(("org_x", role)))),
            Err(OrgDenial::RoleNotAllowed),
            "{role:?}"
        );
    }
}

#[test]
fn org_allowlist_and_role_both_apply() {
    let rules = OrgRulesConfig {
        allowed_org_ids: strings(&["org_a"]),
        required_role: Some("org:admin".into()),
    };
    assert_eq!(
        check_org(&rules, &identity(Some(("org_a", Some("org:member"))))),
        Err(OrgDenial::RoleNotAllowed)
    );
    assert_eq!(
        check_org(&rules, &identity(Some(("org_b", Some("org:admin"))))),
        Err(OrgDenial::OrgNotAllowed)
    );
}

#[test]
fn token_without_org_is_refused_when_any_org_rule_is_set() {
    for rules in [
        OrgRulesConfig {
            allowed_org_ids: strings(&["org_a"]),
            required_role: None,
        },
        OrgRulesConfig {
            allowed_org_ids: vec![],
            required_role: Some("org:admin".into()),
        },
    ] {
        assert_eq!(check_org(&rules, &identity(None)), Err(OrgDenial::NoOrg));
    }
}

#[test]
fn org_rules_config_rejects_unknown_fields() {
    let ok: Result<OrgRulesConfig, _> = serde_json::from_str(r#"{"allowed_org_ids":["org_a"]}"#);
    assert!(ok.is_ok_and(|r| r.required_role.is_none() && r.allowed_org_ids == ["org_a"]));
    let bad: Result<OrgRulesConfig, _> = serde_json::from_str(r#"{"allowed_orgs":[]}"#);
    assert!(bad.is_err());
    let bad: Result<ScopeRuleConfig, _> =
        serde_json::from_str(r#"{"method":"*","scopes":[],"scope":"x"}"#);
    assert!(bad.is_err());
}
