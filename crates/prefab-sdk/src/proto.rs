//! The runtime's wire contract: generated messages and gRPC stubs of
//! `prefab/v1/runtime.proto` (package `prefab.v1`, service
//! `PrefabRuntime`), its descriptor set for server reflection, and
//! conversions between
//! `google.protobuf.Struct` and `serde_json` values, and statuses whose
//! message fits in the trailers that carry it.

#[allow(missing_docs, clippy::all, rustdoc::all)]
mod generated {
    tonic::include_proto!("prefab.v1");
}

pub use generated::*;

/// Encoded `FileDescriptorSet` of `runtime.proto` and its imports, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/runtime_descriptor.bin"));

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

/// Converts a protobuf `Struct` to a JSON object.
pub fn struct_to_json(s: Struct) -> Map<String, Json> {
    s.fields.into_iter().map(|(k, v)| (k, value_to_json(v))).collect()
}

/// The largest integer a double holds exactly, 2^53.
const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

/// Converts a protobuf `Value` to JSON. Non-finite numbers become `null`,
/// as JSON cannot carry them.
pub fn value_to_json(v: Value) -> Json {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        // Whole numbers are integers (a count is `3`, not `3.0`), where
        // a double holds them exactly.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() <= MAX_EXACT => Json::from(n as i64),
        Some(Kind::NumberValue(n)) => Number::from_f64(n).map_or(Json::Null, Json::Number),
        Some(Kind::StringValue(s)) => Json::String(s),
        Some(Kind::BoolValue(b)) => Json::Bool(b),
        Some(Kind::StructValue(s)) => Json::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => Json::Array(l.values.into_iter().map(value_to_json).collect()),
    }
}

/// Converts a JSON object to a protobuf `Struct`.
pub fn json_to_struct(m: Map<String, Json>) -> Struct {
    Struct {
        fields: m.into_iter().map(|(k, v)| (k, json_to_value(v))).collect(),
    }
}

/// Converts JSON to a protobuf `Value`. Integers beyond 2^53 lose precision,
/// as they do in every JSON-over-protobuf mapping.
pub fn json_to_value(v: Json) -> Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        Json::Object(m) => Kind::StructValue(json_to_struct(m)),
    };
    Value { kind: Some(kind) }
}

/// Largest result (a call's output values, encoded) a runtime may return:
/// well under the gRPC message limit, which the event carrying it must fit.
pub const MAX_RESULT: usize = 1 << 20;

/// Longest status message sent, in bytes. A status travels in HTTP/2
/// trailers, where `grpc-message` is percent-encoded (up to three bytes for
/// one) and peers refuse header blocks over 16 KiB by default: hyper drops
/// the fields of a larger block, and closes the whole connection past
/// 64 KiB, failing every call on it.
pub const MAX_STATUS_MESSAGE: usize = 4 << 10;
/// What is kept of the start of a longer message; the rest of the budget
/// goes to its end, where a failed program's last words are.
const KEPT_HEAD: usize = 1 << 10;

/// A status with `message`, cut in the middle to [`MAX_STATUS_MESSAGE`]
/// bytes if longer.
pub fn status(code: tonic::Code, message: &str) -> tonic::Status {
    tonic::Status::new(code, clip_middle(message, MAX_STATUS_MESSAGE))
}

/// `message` cut in the middle to at most `max` bytes (at least
/// `KEPT_HEAD` plus 64), saying how much went.
pub fn clip_middle(message: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if message.len() <= max {
        return message.into();
    }
    let head = message.floor_char_boundary(KEPT_HEAD);
    // Room for the marker, whose number has at most 20 digits.
    let kept_tail = max.saturating_sub(KEPT_HEAD + 48);
    let tail = message.ceil_char_boundary((message.len() - kept_tail).max(head));
    let cut = tail - head;
    format!("{}\n[{cut} bytes cut]\n{}", &message[..head], &message[tail..]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_struct() {
        let json = serde_json::json!({"a": 1.5, "b": [true, null, "x"], "c": {"d": "e"}, "n": 3000, "m": -2});
        let Json::Object(map) = json.clone() else {
            unreachable!()
        };
        let back = Json::Object(struct_to_json(json_to_struct(map)));
        assert_eq!(back, json);
        // Whole numbers come back as integers: `3000`, not `3000.0`.
        assert_eq!(back["n"].to_string(), "3000");
    }

    #[test]
    fn long_status_messages_keep_their_start_and_end() {
        let short = status(tonic::Code::Unknown, "exit status: 3");
        assert_eq!(short.message(), "exit status: 3");
        let long = format!("exit status: 3\n{}\nthe last words", "é".repeat(20_000));
        let cut = status(tonic::Code::Unknown, &long);
        assert_eq!(cut.code(), tonic::Code::Unknown);
        assert!(
            cut.message().len() <= MAX_STATUS_MESSAGE,
            "{}",
            cut.message().len()
        );
        assert!(cut.message().starts_with("exit status: 3\n"));
        assert!(cut.message().ends_with("\nthe last words"));
        let marker = cut.message().split('[').nth(1).unwrap();
        let dropped: usize = marker.split(' ').next().unwrap().parse().unwrap();
        let kept = cut.message().len() - format!("\n[{dropped} bytes cut]\n").len();
        assert_eq!(kept + dropped, long.len());
    }

    #[test]
    fn descriptor_set_names_the_runtime_service() {
        let fds = <prost_types::FileDescriptorSet as prost::Message>::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<_> = fds
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name().to_owned()))
            .collect();
        assert_eq!(services, ["PrefabRuntime"]);
    }
}
