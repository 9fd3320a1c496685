# Sourced by the benchmarks that compare this checkout with an earlier
# revision. `build_revisions EXAMPLE [BASE_EXAMPLE]` builds this checkout's
# `prefab` and the example client, and `prefab` (and BASE_EXAMPLE, if
# named) of $BASE in a worktree of its own, built
# into a target folder of its own (cargo hashes a package by its path in the
# workspace, so the two would share, and overwrite, generated code); leaves
# them as $cache/bench-bin/prefab-head, prefab-base, EXAMPLE and
# BASE_EXAMPLE-base.
build_revisions() { # EXAMPLE [BASE_EXAMPLE]
  cargo build --release --locked --example "$1" --bin prefab
  mkdir -p "$cache/bench-bin"
  cp "$CARGO_TARGET_DIR/release/prefab" "$cache/bench-bin/prefab-head"
  cp "$CARGO_TARGET_DIR/release/examples/$1" "$cache/bench-bin/$1"
  local base_tree="$cache/bench-base"
  git worktree remove --force "$base_tree" 2>/dev/null || true
  git worktree add --force --detach "$base_tree" "$BASE" >/dev/null
  (cd "$base_tree" && CARGO_TARGET_DIR="$CARGO_TARGET_DIR/bench-base" cargo build --release --locked --bin prefab ${2:+--example "$2"})
  cp "$CARGO_TARGET_DIR/bench-base/release/prefab" "$cache/bench-bin/prefab-base"
  if [ -n "${2:-}" ]; then cp "$CARGO_TARGET_DIR/bench-base/release/examples/$2" "$cache/bench-bin/$2-base"; fi
  git worktree remove --force "$base_tree"
}
