# syntax=docker/dockerfile:1
# Multi-stage build of the `prefab` binary.
#   docker build -t prefab .                      # gateway / Rust prefabs (distroless, non-root)
#   docker build --target exec -t prefab-exec .   # exec prefabs: Debian slim with a shell and coreutils

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY examples examples
# The same release build the README documents.
RUN cargo build --release --locked --bin prefab && cp target/release/prefab /prefab

# Exec prefabs wrap command-line tools, so their image has them, and a
# manifest at /app/prefab.toml (gzip's here). Add yours here. tini is process
# 1 so that a program's orphaned children are reaped.
FROM debian:bookworm-slim AS exec
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gzip tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --user-group --no-create-home prefab
COPY --from=build /prefab /usr/local/bin/prefab
COPY examples/prefabs/gzip.toml /app/prefab.toml
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/prefab"]
CMD ["runtime", "exec", "--manifest", "/app/prefab.toml"]

# Default: the gateway and Rust prefabs. No shell, no package manager, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot AS gateway
COPY --from=build /prefab /usr/local/bin/prefab
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/prefab"]
CMD ["gateway"]
