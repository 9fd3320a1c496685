# syntax=docker/dockerfile:1
# Images of the `prefab` binary: the gateway and Rust prefabs (default
# target), and exec prefabs (`--target exec`: a shell, coreutils, gzip).
#
#   docker build -t prefab .
#   docker build --target exec -t prefab-exec .
#
# The binary is built in the `build` stage, or, with `--build-arg
# BINARY=packed`, taken from `dist/prefab` in the build context: a binary
# built outside the image (by a builder without a Rust image, or by CI).
#
#   cargo build --release --locked --bin prefab
#   mkdir -p dist && strip -o dist/prefab "${CARGO_TARGET_DIR:-target}/release/prefab"
#   docker build --build-arg BINARY=packed -t prefab .
#
# The base images are arguments, for registry mirrors and air-gapped
# builders; e.g. through an Aliyun Container Registry (ACR) mirror:
#
#   docker build \
#     --build-arg RUST_IMAGE=registry.cn-hangzhou.aliyuncs.com/<ns>/rust:1.95-bookworm \
#     --build-arg GATEWAY_BASE=registry.cn-hangzhou.aliyuncs.com/<ns>/distroless-cc-debian12:nonroot \
#     --build-arg EXEC_BASE=registry.cn-hangzhou.aliyuncs.com/<ns>/debian:bookworm-slim .
#
# Both images run as 65532:65532 (the manifests' workspace group) and need
# nothing writable but the workspace volume; programs that exec prefabs
# wrap may want a writable /tmp, which the manifests mount (an emptyDir)
# and point HOME at.

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG GATEWAY_BASE=gcr.io/distroless/cc-debian12:nonroot
ARG EXEC_BASE=docker.io/library/debian:bookworm-slim
ARG BINARY=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY crates crates
COPY examples examples
# `prefab --version` names the revision; the context has no .git.
ARG PREFAB_GIT_REVISION=unknown
ENV PREFAB_GIT_REVISION=${PREFAB_GIT_REVISION}
# The same release build the README documents, without its debug lines.
RUN cargo build --release --locked --bin prefab && strip -o /prefab target/release/prefab

# A binary built outside the image.
FROM scratch AS packed
COPY dist/prefab /prefab

FROM ${BINARY} AS binary

# Exec prefabs wrap command-line tools, so their image has them, and a
# manifest at /app/prefab.toml (gzip's here). Add yours here. tini is process
# 1 so that a program's orphaned children are reaped. A base that already
# has the packages (an air-gapped mirror's) needs no package index.
FROM ${EXEC_BASE} AS exec
ARG EXEC_PACKAGES="ca-certificates gzip tini"
RUN missing=$(for p in $EXEC_PACKAGES; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null \
      | grep -q '^install ok installed' || echo "$p"; done); \
    if [ -n "$missing" ]; then \
      apt-get update && apt-get install -y --no-install-recommends $missing \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=binary /prefab /usr/local/bin/prefab
COPY examples/prefabs/gzip.toml /app/prefab.toml
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/prefab"]
CMD ["runtime", "exec", "--manifest", "/app/prefab.toml"]

# Default: the gateway and Rust prefabs. No shell, no package manager, non-root.
FROM ${GATEWAY_BASE} AS gateway
COPY --from=binary /prefab /usr/local/bin/prefab
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/prefab"]
CMD ["gateway"]
