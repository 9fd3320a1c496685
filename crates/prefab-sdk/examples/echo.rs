//! A prefab with one function, `copy`, served as a Knative service runs
//! it: `PORT=8080 WORKSPACE_ROOT=/mnt/prefab-workspace cargo run -p
//! prefab-sdk --example echo`.

use prefab_sdk::manifest::{FunctionSpec, Manifest, Param, ParamKind};
use prefab_sdk::{Invocation, Outputs, Prefab, PrefabError};

struct Echo;

impl Prefab for Echo {
    fn manifest(&self) -> Manifest {
        Manifest {
            id: "echo".into(),
            version: "1.0.0".into(),
            description: "Copies its input".into(),
            functions: vec![
                FunctionSpec::new("copy", "Copy a file")
                    .param(Param::new("src", ParamKind::InputFile))
                    .param(Param::new("dst", ParamKind::OutputFile).extension("bin")),
            ],
        }
    }

    async fn invoke(&self, call: Invocation) -> Result<Outputs, PrefabError> {
        let mut src = tokio::fs::File::open(call.input("src")?).await?;
        tokio::io::copy(&mut src, &mut call.create_output("dst").await?).await?;
        Ok(Outputs::new())
    }
}

#[tokio::main]
async fn main() -> Result<(), prefab_sdk::server::BoxError> {
    prefab_sdk::run(Echo).await
}
