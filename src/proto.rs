//! The gateway's wire contract: generated messages and gRPC stubs of
//! `prefab/v1/gateway.proto`, with the runtime's (`runtime.proto`, the
//! same package `prefab.v1`) and the `Struct`/JSON conversions re-exported
//! from the SDK, so that `proto::X` names any message of the package; the
//! descriptor set of both files for server reflection; a `RunRequest` from
//! its JSON form.

#[allow(missing_docs, clippy::all, rustdoc::all)]
mod generated {
    tonic::include_proto!("prefab.v1");
}

pub use generated::*;
pub use prefab_sdk::proto::*;
use serde_json::{Map, Value as Json};

/// Encoded `FileDescriptorSet` of every proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/prefab_descriptor.bin"));

/// Reads a `RunRequest` written in protobuf's JSON form (what grpcurl
/// takes): `{"calls": [{"prefabId", "version", "functionName", "inputs",
/// "intermediate"}], "onDisconnect"}`, names in lowerCamelCase or
/// snake_case; a call's version defaults to "1.0.0". Unknown fields are
/// refused, so a typo does not silently drop a setting.
pub fn run_request_from_json(json: &Json) -> Result<RunRequest, String> {
    let object = |value: &Json, what: &str| -> Result<Map<String, Json>, String> {
        value
            .as_object()
            .cloned()
            .ok_or_else(|| format!("{what} must be an object"))
    };
    let mut fields = object(json, "the request")?;
    let take = |fields: &mut Map<String, Json>, camel: &str, snake: &str| {
        fields.remove(camel).or_else(|| fields.remove(snake))
    };
    let calls = take(&mut fields, "calls", "calls").unwrap_or_default();
    let Json::Array(calls) = calls else {
        return Err("calls must be a list".into());
    };
    let mut request = RunRequest::default();
    if let Some(mode) = take(&mut fields, "onDisconnect", "on_disconnect") {
        let mode = mode.as_str().and_then(OnDisconnect::from_str_name);
        request.on_disconnect =
            mode.ok_or("onDisconnect must be ON_DISCONNECT_CANCEL or ON_DISCONNECT_DETACH")? as i32;
    }
    if let Some(unknown) = fields.keys().next() {
        return Err(format!("unknown field {unknown:?} in the request"));
    }
    for (index, call) in calls.iter().enumerate() {
        let mut fields = object(call, &format!("calls[{index}]"))?;
        let mut text = |camel: &str, snake: &str| match take(&mut fields, camel, snake) {
            None => Ok(None),
            Some(Json::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("calls[{index}].{camel} must be a string")),
        };
        let prefab_id =
            text("prefabId", "prefab_id")?.ok_or(format!("calls[{index}].prefabId is missing"))?;
        let version = text("version", "version")?.unwrap_or_else(|| "1.0.0".into());
        let function_name = text("functionName", "function_name")?
            .ok_or(format!("calls[{index}].functionName is missing"))?;
        let inputs = match take(&mut fields, "inputs", "inputs") {
            None => Map::new(),
            Some(value) => object(&value, &format!("calls[{index}].inputs"))?,
        };
        let intermediate = match take(&mut fields, "intermediate", "intermediate") {
            None => Vec::new(),
            Some(Json::Array(names)) => names
                .into_iter()
                .map(|n| match n {
                    Json::String(s) => Ok(s),
                    _ => Err(format!("calls[{index}].intermediate must list output names")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(format!("calls[{index}].intermediate must be a list")),
        };
        if let Some(unknown) = fields.keys().next() {
            return Err(format!("unknown field {unknown:?} in calls[{index}]"));
        }
        request.calls.push(Call {
            prefab_id,
            version,
            function_name,
            inputs: Some(json_to_struct(inputs)),
            intermediate,
        });
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_set_names_both_services() {
        let fds = <prost_types::FileDescriptorSet as prost::Message>::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let services: Vec<_> = fds
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name().to_owned()))
            .collect();
        assert!(services.contains(&"Gateway".to_owned()));
        assert!(services.contains(&"PrefabRuntime".to_owned()));
    }
}
