//! Checks an answer of the REST API against its OpenAPI document: the route, method and status
//! are documented, and the body matches its schema. Stricter than JSON Schema in one way: an
//! object whose schema names properties may carry only those (the document must describe
//! everything served). A route or method the document does not have may only be refused (404
//! or 405) with an [`Error`](crate::Error) body. Used by the API's tests.

use serde_json::Value;

/// The documented path template `path` falls under (literal segments win over `{x}`).
fn template<'a>(document: &'a Value, path: &str) -> Option<&'a str> {
    let wanted: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    document["paths"]
        .as_object()?
        .keys()
        .filter(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == wanted.len()
                && parts.iter().zip(&wanted).all(|(part, segment)| {
                    part == segment || (part.starts_with('{') && !segment.is_empty())
                })
        })
        .min_by_key(|template| template.matches('{').count())
        .map(String::as_str)
}

/// Whether `body`, answered with `status` to `method path` (no query), is what `document`
/// says; the first difference if not.
pub fn check(
    document: &Value,
    method: &str,
    path: &str,
    status: u16,
    body: &Value,
) -> Result<(), String> {
    let refused = |what: String| {
        if status == 404 || status == 405 {
            let error = serde_json::json!({ "$ref": "#/components/schemas/Error" });
            validate(document, &error, body, "body", true)
        } else {
            Err(format!("{what}, and the answer is {status}, not a refusal"))
        }
    };
    let Some(template) = template(document, path) else {
        return refused(format!("{path} is not documented"));
    };
    let operation = &document["paths"][template][method.to_ascii_lowercase()];
    if !operation.is_object() {
        return refused(format!("{method} is not documented on {template}"));
    }
    let mut answer = &operation["responses"][status.to_string()];
    if !answer.is_object() && status >= 400 {
        answer = &operation["responses"]["default"];
    }
    if !answer.is_object() {
        return Err(format!(
            "status {status} is not documented for {method} {template}"
        ));
    }
    let schema = &answer["content"]["application/json"]["schema"];
    match (schema.is_null(), body.is_null()) {
        (true, true) => Ok(()),
        (true, false) => Err("a body where the document says there is none".into()),
        (false, true) => Err("no body where the document says there is one".into()),
        (false, false) => validate(document, schema, body, "body", true),
    }
}

fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            resolve(document, &document["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// Every property `schema` names, through `$ref` and `allOf`.
fn named_properties(document: &Value, schema: &Value, names: &mut Vec<String>) {
    let schema = resolve(document, schema);
    if let Some(properties) = schema["properties"].as_object() {
        names.extend(properties.keys().cloned());
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        named_properties(document, part, names);
    }
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => false,
    }
}

fn validate(
    document: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    strict: bool,
) -> Result<(), String> {
    let schema = resolve(document, schema);
    if let Some(parts) = schema["allOf"].as_array() {
        for part in parts {
            validate(document, part, value, at, false)?;
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(choices) = schema[key].as_array()
            && !choices
                .iter()
                .any(|choice| validate(document, choice, value, at, strict).is_ok())
        {
            return Err(format!("{at}: matches none of {key}"));
        }
    }
    match &schema["type"] {
        Value::String(name) if !type_matches(name, value) => {
            return Err(format!("{at}: not of type {name}"));
        }
        Value::Array(names)
            if !names
                .iter()
                .any(|n| n.as_str().is_some_and(|n| type_matches(n, value))) =>
        {
            return Err(format!("{at}: not of types {names:?}"));
        }
        _ => {}
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let (Some(minimum), Some(number)) = (schema["minimum"].as_f64(), value.as_f64())
        && number < minimum
    {
        return Err(format!("{at}: {number} is below {minimum}"));
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                return Err(format!("{at}: required {name} is missing"));
            }
        }
        let mut named = Vec::new();
        named_properties(document, schema, &mut named);
        // A schema that names no property is a free-form object.
        let strict = strict && !named.is_empty();
        for (name, item) in object {
            let property = &schema["properties"][name];
            let extra = &schema["additionalProperties"];
            if property.is_object() {
                validate(document, property, item, &format!("{at}.{name}"), true)?;
            } else if extra.is_object() {
                validate(document, extra, item, &format!("{at}.{name}"), true)?;
            } else if strict && extra != &Value::Bool(true) && !named.contains(name) {
                return Err(format!("{at}: {name} is served but not documented"));
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            validate(document, items, item, &format!("{at}[{i}]"), true)?;
        }
    }
    Ok(())
}
