//! A webhook's request as templates and filters see it, and how they are evaluated.
//!
//! A path's first name picks the root: `body` (the whole payload), `headers` (lower-case
//! names), `query`, `item` (the element of `for_each`); any other name is a field of the
//! payload itself, so Nautobot's `data.name` and `request_id` read as written.

use serde_json::Value;

use crate::config::listener::{FieldPath, Filter, Part, Template, Test};

/// What templates read.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub body: &'a Value,
    pub headers: &'a Value,
    pub query: &'a Value,
    pub item: Option<&'a Value>,
}

impl<'a> Request<'a> {
    /// The value at `path`, if there is one.
    pub fn lookup(&self, path: &FieldPath) -> Option<&'a Value> {
        let (first, rest) = path.0.split_first()?;
        let (root, rest): (&'a Value, &[String]) = match first.as_str() {
            "body" => (self.body, rest),
            "headers" => (self.headers, rest),
            "query" => (self.query, rest),
            "item" => (self.item?, rest),
            _ => (self.body, path.0.as_slice()),
        };
        rest.iter().try_fold(root, |value, name| match value {
            Value::Object(map) => map
                .get(name)
                .or_else(|| map.get(&name.to_ascii_lowercase())),
            Value::Array(items) => name.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
    }

    /// The template's value: a template that is one field keeps the field's JSON type;
    /// otherwise the text with each field's value in place (strings as they are, anything
    /// else as JSON). A missing field is the error, naming it.
    pub fn render(&self, template: &Template) -> Result<Value, String> {
        if let Some(path) = template.single_field() {
            return self.lookup(path).cloned().ok_or_else(|| path.to_string());
        }
        let mut out = String::new();
        for part in &template.0 {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field(path) => match self.lookup(path) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(other) => out.push_str(&other.to_string()),
                    None => return Err(path.to_string()),
                },
            }
        }
        Ok(Value::String(out))
    }

    /// `value` with every string rendered as a template (configured values were checked when
    /// the configuration loaded).
    pub fn render_value(&self, value: &Value) -> Result<Value, String> {
        Ok(match value {
            Value::String(text) => {
                let template = Template::parse(text).map_err(|e| format!("template {e}"))?;
                self.render(&template)?
            }
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|v| self.render_value(v))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), self.render_value(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Whether the request passes `filter`.
    pub fn passes(&self, filter: &Filter) -> bool {
        match filter {
            Filter::All(items) => items.iter().all(|f| self.passes(f)),
            Filter::Any(items) => items.iter().any(|f| self.passes(f)),
            Filter::Condition { path, test } => {
                let value = self.lookup(path);
                match test {
                    Test::Exists(wanted) => value.is_some_and(|v| !v.is_null()) == *wanted,
                    Test::Equals(expected) => value == Some(expected),
                    Test::In(options) => value.is_some_and(|v| options.contains(v)),
                    Test::Matches(regex) => match value {
                        Some(Value::String(s)) => regex.is_match(s),
                        Some(Value::Null) | None => false,
                        Some(other) => regex.is_match(&other.to_string()),
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(text: &str) -> Template {
        Template::parse(text).unwrap()
    }

    #[test]
    fn fields_keep_their_type_alone_and_become_text_inside_text() {
        let body =
            json!({"data": {"name": "sw1", "id": 7, "tags": ["a", "b"]}, "request_id": "r1"});
        let headers = json!({"x-github-event": "push"});
        let query = json!({"site": "fra"});
        let request = Request {
            body: &body,
            headers: &headers,
            query: &query,
            item: None,
        };
        assert_eq!(
            request.render(&template("{{ data.id }}")).unwrap(),
            json!(7)
        );
        assert_eq!(
            request.render(&template("{{data.tags}}")).unwrap(),
            json!(["a", "b"])
        );
        assert_eq!(
            request
                .render(&template("{{ request_id }}-{{ data.id }}"))
                .unwrap(),
            json!("r1-7")
        );
        assert_eq!(
            request.render(&template("{{ data.tags.1 }}")).unwrap(),
            json!("b")
        );
        assert_eq!(
            request
                .render(&template("{{ headers.X-GitHub-Event }}"))
                .unwrap(),
            json!("push")
        );
        assert_eq!(
            request.render(&template("{{ query.site }}")).unwrap(),
            json!("fra")
        );
        assert_eq!(request.render(&template("{{ body }}")).unwrap(), body);
        assert_eq!(
            request
                .render(&template("device {{ data.nope }}"))
                .unwrap_err(),
            "data.nope"
        );
        assert_eq!(
            request.render(&template("{{ item.name }}")).unwrap_err(),
            "item.name"
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert!(Template::parse("{{ data.name").is_err());
        assert!(Template::parse("{{ }}").is_err());
        assert!(Template::parse("{{ data..name }}").is_err());
        assert_eq!(template("plain").0, vec![Part::Text("plain".into())]);
    }
}
