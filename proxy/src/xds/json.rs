// SPDX-License-Identifier: Apache-2.0
//! Proto3-JSON (and YAML) → prost messages, with errors that name the field path.

use super::pool::pool;
use prost::Message;
use prost_reflect::{DeserializeOptions, DynamicMessage, SerializeOptions};

/// A document that is not a valid instance of the expected message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The text is not YAML/JSON.
    #[error("not valid YAML or JSON: {0}")]
    Syntax(String),
    /// A field has the wrong type, an unknown name, or an unknown `@type`.
    #[error("{path}: {msg}")]
    Field {
        /// dotted path such as `static_resources.listeners[0].address`
        path: String,
        /// what is wrong
        msg: String,
    },
    /// The message type is not in the pool (a bug in the caller).
    #[error("unknown message type {0}")]
    UnknownType(String),
}

/// Parses YAML or JSON text (JSON is YAML) into a JSON value.
pub fn parse_text(text: &str) -> Result<serde_json::Value, DecodeError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{')
        && let Ok(v) = serde_json::from_str(text)
    {
        return Ok(v);
    }
    serde_yaml::from_str::<serde_json::Value>(text).map_err(|e| DecodeError::Syntax(e.to_string()))
}

/// Decodes a JSON value as message `M` through the descriptor pool.
pub fn from_json<M: Message + Default + prost::Name>(
    value: &serde_json::Value,
) -> Result<M, DecodeError> {
    let dynamic = dynamic_from_json(&M::full_name(), value)?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| DecodeError::Field {
        path: String::new(),
        msg: e.to_string(),
    })
}

/// Decodes a JSON value as the named message, keeping the path of the first error.
pub fn dynamic_from_json(
    full_name: &str,
    value: &serde_json::Value,
) -> Result<DynamicMessage, DecodeError> {
    let desc = pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| DecodeError::UnknownType(full_name.into()))?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    DynamicMessage::deserialize_with_options(
        desc,
        de,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| {
        let path = track.path().to_string();
        DecodeError::Field {
            path: if path == "?" { String::new() } else { path },
            msg: e.to_string(),
        }
    })
}

/// Renders a prost message as proto3-JSON with original (snake_case) field names, as Envoy's admin does.
pub fn to_json<M: Message + prost::Name>(msg: &M) -> serde_json::Value {
    let Some(desc) = pool().get_message_by_name(&M::full_name()) else {
        return serde_json::Value::Null;
    };
    match DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()) {
        Ok(d) => dynamic_to_json(&d),
        Err(_) => serde_json::Value::Null,
    }
}

/// Renders a dynamic message as proto3-JSON with original field names.
pub fn dynamic_to_json(d: &DynamicMessage) -> serde_json::Value {
    let opts = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(true);
    d.serialize_with_options(serde_json::value::Serializer, &opts)
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;

    #[test]
    fn yaml_with_any_and_path_errors() {
        let ok = r#"
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 1}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: x
          cluster: c
"#;
        let b: Bootstrap = from_json(&parse_text(ok).unwrap()).unwrap();
        assert_eq!(b.static_resources.unwrap().listeners[0].name, "l");

        let bad = ok.replace("port_value: 1", "port_value: nope");
        let e = from_json::<Bootstrap>(&parse_text(&bad).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("static_resources.listeners[0].address.socket_address.port_value"),
            "{e}"
        );

        let bad = ok.replace("stat_prefix: x", "stat_prefx: x");
        let e = from_json::<Bootstrap>(&parse_text(&bad).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("stat_prefx"), "{e}");

        let bad = ok.replace("tcp_proxy.v3.TcpProxy", "tcp_proxy.v3.Nope");
        let e = from_json::<Bootstrap>(&parse_text(&bad).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("Nope"), "{e}");
    }
}
