//! Property tests of the parsers that face the network: URLs, handles,
//! workspace paths, manifests and token files. Run longer with
//! `PROPTEST_CASES=1000000 cargo test --release --test properties`.

use std::path::{Component, Path};

use prefab::{
    gateway::Tokens,
    runtime::exec::ExecPrefab,
    storage::S3Url,
    workspace::{RelPath, RequestId},
};
use proptest::prelude::*;

/// Strings biased towards the characters that matter to these parsers.
fn hostile() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        Just("s3://".to_owned()),
        Just("/".to_owned()),
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("%2F".to_owned()),
        Just("\\".to_owned()),
        Just("\0".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("\n".to_owned()),
        Just("outputs".to_owned()),
        Just("bucket".to_owned()),
        "[a-z0-9._-]{1,8}",
        any::<String>(),
    ];
    prop::collection::vec(pieces, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn s3_urls_round_trip_and_never_escape(s in hostile()) {
        if let Ok(url) = S3Url::parse(&s) {
            prop_assert_eq!(url.to_string(), s.clone());
            prop_assert_eq!(S3Url::parse(&url.to_string()).unwrap(), url.clone());
            prop_assert!(url.key().split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
            prop_assert!(!url.key().contains(['\\', '%', '?', '#', '\0']));
        }
    }

    #[test]
    fn handles_have_one_spelling(s in hostile()) {
        if let Ok(id) = RequestId::parse(&s) {
            prop_assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn relative_paths_stay_inside(s in hostile()) {
        if let Ok(rel) = RelPath::parse(&s) {
            let joined = Path::new("/ws").join(rel.as_str());
            prop_assert!(joined.starts_with("/ws"));
            prop_assert!(Path::new(rel.as_str()).components().all(|c| matches!(c, Component::Normal(_))));
        }
    }

    #[test]
    fn manifest_and_token_parsers_never_panic(s in hostile()) {
        let _ = ExecPrefab::parse(&s);
        let _ = Tokens::parse(&s);
        let toml = format!("id = \"x\"\nversion = \"1\"\n[[function]]\nname = \"f\"\nparameters = []\nexec = {{ command = [{s:?}] }}\n");
        let _ = ExecPrefab::parse(&toml);
    }
}
