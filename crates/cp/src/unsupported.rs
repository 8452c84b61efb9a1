//! Request settings wrenn does not enforce (yet): egress transforms, TLS to an egress proxy,
//! HTTPS ports, MCP gateways, workload identity (IAM), and volume mounts. A request that sets one of them is refused
//! with a 400 naming the field; a setting that says "nothing" (absent, `null`, `false`, `""`,
//! `[]`, `{}`; `true` for the memory flags) is accepted, because the SDKs send those. A security
//! setting is never accepted and then ignored.
//!
//! This module only reads request bodies (as JSON values, so that every spelling and shape is
//! seen, not just the ones a typed struct would keep); the handlers in [`crate::api`] turn its
//! error into the HTTP answer.

use serde_json::Value;

/// A setting the request makes that wrenn does not enforce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is not supported by wrenn: {why}")]
pub struct Unsupported {
    /// The field as the REST API spells it (`network.allowOut`).
    pub field: String,
    pub why: &'static str,
}

/// Whether a value says "nothing": what the SDKs send for a setting the caller did not make.
fn is_unset(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(set) => !set,
        Value::String(text) => text.is_empty(),
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => fields.is_empty(),
        Value::Number(_) => false,
    }
}

/// The value of a field under its REST spelling (camelCase) or its snake_case one.
fn get<'a>(object: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    object.get(camel).or_else(|| object.get(snake))
}

/// `network.*` settings of a create, `(camelCase, snake_case, why)`.
const NETWORK_FIELDS: &[(&str, &str, &str)] = &[(
    "httpsPorts",
    "https_ports",
    "the edge proxy does not reach sandbox ports over HTTPS",
)];

/// Top-level settings of a create, `(camelCase, snake_case, why)`.
const CREATE_FIELDS: &[(&str, &str, &str)] = &[
    ("mcp", "mcp", "MCP gateways are not provided"),
    (
        "volumeMounts",
        "volume_mounts",
        "volumes cannot be mounted into sandboxes",
    ),
    (
        "iam",
        "iam",
        "workload identity tokens are not issued to sandboxes",
    ),
];

/// Checks a create body (`POST /sandboxes`, `POST /v2/sandboxes`).
pub fn check_create(body: &Value) -> Result<(), Unsupported> {
    for (camel, snake, why) in CREATE_FIELDS {
        if get(body, camel, snake).is_some_and(|value| !is_unset(value)) {
            return Err(Unsupported {
                field: (*camel).to_string(),
                why,
            });
        }
    }
    if let Some(network) = body.get("network").filter(|n| n.is_object()) {
        check_network_fields(network).map_err(|unsupported| Unsupported {
            field: format!("network.{}", unsupported.field),
            why: unsupported.why,
        })?;
    }
    Ok(())
}

/// The `network` fields wrenn does not enforce, named as the REST API spells them.
fn check_network_fields(network: &Value) -> Result<(), Unsupported> {
    for (camel, snake, why) in NETWORK_FIELDS {
        if get(network, camel, snake).is_some_and(|value| !is_unset(value)) {
            return Err(Unsupported {
                field: (*camel).to_string(),
                why,
            });
        }
    }
    Ok(())
}

/// Checks a network update body (`PUT /sandboxes/{id}/network`).
pub fn check_network_update(body: &Value) -> Result<(), Unsupported> {
    check_network_fields(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_the_sdks_send_by_default_is_accepted() {
        for body in [
            json!({}),
            json!({"templateID": "base", "timeout": 60, "autoPause": false, "autoPauseMemory": true,
                "metadata": {}, "envVars": {}, "secure": true, "allow_internet_access": true}),
            json!({"templateID": "base", "network": {}, "mcp": null, "volumeMounts": [], "iam": {}}),
            json!({"network": {"allowPublicTraffic": false, "allowOut": [], "denyOut": [],
                "rules": {}, "egressProxy": null, "maskRequestHost": "", "dnsServers": [],
                "httpsPorts": []}}),
            json!({"network": null, "mcp": {}}),
            json!({"autoPause": true, "autoPauseMemory": false}),
        ] {
            assert_eq!(check_create(&body), Ok(()), "{body}");
        }
    }

    #[test]
    fn each_unenforced_setting_is_refused_by_name() {
        // Enforced now: address and domain lists, header transforms, and host masks.
        for body in [
            json!({"network": {"allowOut": ["1.1.1.1", "*.example.com"], "denyOut": ["0.0.0.0/0"]}}),
            json!({"network": {"maskRequestHost": "${PORT}-x.example.com"}}),
            json!({"network": {"rules": {"example.com": [{"transform": {"headers": {"A": "b"}}}]}}}),
            json!({"network": {"egressProxy": {"address": "p:1080", "tls": {"enabled": true}}}}),
        ] {
            assert_eq!(check_create(&body), Ok(()), "{body}");
        }
        let cases = [
            (
                json!({"network": {"httpsPorts": [3000]}}),
                "network.httpsPorts",
            ),
            (json!({"mcp": {"github": {}}}), "mcp"),
            (
                json!({"volumeMounts": [{"name": "v", "path": "/data"}]}),
                "volumeMounts",
            ),
            (json!({"iam": {"tokens": {"aws": {}}}}), "iam"),
        ];
        for (body, field) in cases {
            let refused = check_create(&body).expect_err(&body.to_string());
            assert_eq!(refused.field, field, "{body}");
            assert!(refused.to_string().starts_with(field), "{refused}");
        }
        assert_eq!(
            check_network_update(&json!({"allowOut": ["1.1.1.1"], "allow_internet_access": false})),
            Ok(())
        );
        assert_eq!(
            check_network_update(
                &json!({"egressProxy": {"address": "p:1080", "tls": {"enabled": true}}})
            ),
            Ok(())
        );
        assert_eq!(
            check_network_update(&json!({"httpsPorts": [443]}))
                .unwrap_err()
                .field,
            "httpsPorts"
        );
    }
}
