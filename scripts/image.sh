#!/usr/bin/env bash
# Builds the container image the Helm chart runs (see Dockerfile), with Debian's buildah.
#
#   ./scripts/image.sh [--full] [--tag REF] [--profile release|debug]
#
# Default: the release binaries are built on this machine (as the tests ran them), stripped
# and copied into the runtime image. --full builds them inside the image's build stage
# instead, with the toolchain of scripts/toolchain.sh (slower: a toolchain and a whole
# release build). --profile debug takes the debug binaries the tests built (CI's image).
# The base is Debian (versions.env's suite) from a registry when one answers, else a root
# filesystem made with mmdebstrap from Debian's archive, cached under .tools/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/versions.env

say() { printf '\033[1mimage:\033[0m %s\n' "$*"; }
die() { printf '\033[1;31mimage: %s\033[0m\n' "$*" >&2; exit 1; }

tag=localhost/moat:dev
binaries=context
profile=release
while [ $# -gt 0 ]; do
    case "$1" in
        --full) binaries=build ;;
        --tag) tag=${2:?--tag needs a reference}; shift ;;
        --profile) profile=${2:?--profile needs release or debug}; shift ;;
        *) die "unknown argument $1 (usage: image.sh [--full] [--tag REF] [--profile release|debug])" ;;
    esac
    shift
done
case "$profile" in release|debug) ;; *) die "--profile is release or debug, not $profile" ;; esac
command -v buildah >/dev/null || die "buildah not found: run ./scripts/setup.sh"

base="docker.io/library/debian:${DEBIAN_SUITE}-slim"
if ! buildah inspect --type image "$base" >/dev/null 2>&1 \
    && ! timeout 60 buildah pull -q "$base" >/dev/null 2>&1; then
    base="localhost/moat-base:${DEBIAN_SUITE}"
    if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
        tar=".tools/base-${DEBIAN_SUITE}.tar"
        if [ ! -f "$tar" ]; then
            say "no registry answers: making a ${DEBIAN_SUITE} base with mmdebstrap"
            mkdir -p .tools
            # The apt variant: Essential packages and apt, what the Dockerfile's RUN lines need.
            trap 'rm -f "$tar.part"' EXIT
            mmdebstrap --quiet --variant=apt --format=tar "$DEBIAN_SUITE" "$tar.part"
            mv "$tar.part" "$tar"
        fi
        say "importing $tar as $base"
        command -v podman >/dev/null || die "podman not found (it imports the base): run ./scripts/setup.sh"
        podman import --quiet "$tar" "$base" >/dev/null
    fi
fi

if [ "$binaries" = context ]; then
    say "building the $profile binaries"
    if [ "$profile" = release ]; then
        cargo build --release --locked -q -p moat-server -p moat-enforcer -p moat-cli
    else
        # What the tests build (nextest's build-binaries): a subset of packages would unify
        # features differently and rebuild half the dependency tree.
        cargo build --locked -q --workspace --bins
    fi
    # The Dockerfile takes them, stripped (debug information is most of their size), from
    # target/image/ in the build context.
    built="${CARGO_TARGET_DIR:-target}/$profile"
    rm -rf target/image && mkdir -p target/image
    for b in moat-server moat-enforcer moatctl; do
        strip --strip-debug -o "target/image/$b" "$built/$b"
    done
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# A build from uncommitted changes says so.
if [ "$revision" != unknown ] && ! git diff --quiet HEAD 2>/dev/null; then revision="$revision-dirty"; fi
secret=()
# The build stage downloads toolchains and crates over TLS: give it this machine's trust
# store, which holds any CA this network's egress presents.
if [ "$binaries" = build ] && [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    secret=(--secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt)
fi
old=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
# buildah 1.28 leaves a working container behind for a stage another copies from; remove
# what this build leaves, whichever way it ends.
before=$(buildah containers -q | sort)
trap 'comm -13 <(echo "$before") <(buildah containers -q | sort) | xargs -r buildah rm >/dev/null 2>&1 || true' EXIT
say "building $tag from $base (binaries: $binaries)"
buildah build --quiet --layers "${secret[@]}" \
    --build-arg "BASE=$base" --build-arg "BINARIES=$binaries" \
    --build-arg "VERSION=${version:-dev}" --build-arg "REVISION=$revision" \
    --tag "$tag" .
# The binaries must run on the image's glibc, and find nft.
podman run --rm --entrypoint /bin/sh "$tag" -c 'moat-enforcer --version && moat-server --version && nft --version' >/dev/null \
    || die "the image's binaries do not run in it"
# The image this tag named before, if nothing else uses it (each CI run retags).
new=$(podman image inspect --format '{{.Id}}' "$tag")
if [ -n "$old" ] && [ "$old" != "$new" ]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
say "built $tag"
