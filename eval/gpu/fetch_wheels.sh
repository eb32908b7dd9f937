#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the Python wheels the GPU machine lacks, for eval/gpu/check.sh to install
# there into /tmp/site (that machine has no network). Run it here, in the repo root, before a device run that
# carries `.whl`:
#
#   bash eval/gpu/fetch_wheels.sh
#
# The device (KINDS.md, nvidia-h200) has Python 3.12, torch 2.11.0+cu130 and transformers 5.17.0; vtprune needs
# transformers >= 5.23. So: transformers at the version of this checkout's environment (.venv; override with
# TRANSFORMERS_VERSION), regex (transformers checks its version at import; the device's is not known), and any
# other requirement of that transformers wheel that the device lacks or has too old (checked against the
# versions KINDS.md lists). flash-attn is fetched only if PyPI has a binary wheel for cp312 (it has had none:
# only a source archive, which takes hours to build), so the check's FlashAttention-2 rows say "not run".
# Flags are the device README's: `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DEST=.whl
LIMIT_MIB=${WHEEL_LIMIT_MIB:-50}

# the interpreter whose pip downloads, and the environment whose versions we mirror
PIP_PY=${PYTHON:-python3}
"$PIP_PY" -m pip --version >/dev/null 2>&1 || PIP_PY=.venv/bin/python
ENV_PY=.venv/bin/python
[[ -x $ENV_PY ]] || ENV_PY=$PIP_PY
version_of() { "$ENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null; }

TF=${TRANSFORMERS_VERSION:-$(version_of transformers || true)}
TF=${TF:-5.24.0}
RE=${REGEX_VERSION:-$(version_of regex || true)}
RE=${RE:-2026.11.19}

if ! git check-ignore -q "$DEST/x.whl" 2>/dev/null; then
  echo "WARNING: $DEST/ is not ignored by git here; add '/$DEST/' to .gitignore or .git/info/exclude" >&2
fi
mkdir -p "$DEST"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() { # download NAME==VERSION [more platforms...]: replaces any other version of NAME in .whl/
  local spec=$1
  shift
  local name=${spec%%==*}
  local norm
  norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
  find "$DEST" -maxdepth 1 -iname "${norm}-*.whl" ! -iname "${norm}-${spec##*==}-*" -delete
  "$PIP_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" "$@" -d "$DEST" "$spec"
}

echo "transformers==$TF, regex==$RE -> $DEST/ (pip of $PIP_PY)"
download "transformers==$TF"
download "regex==$RE"

# Other requirements of that transformers wheel: which does the device lack, or have too old?
MISSING=$("$ENV_PY" - "$DEST" "$TF" <<'EOF'
import glob, sys, zipfile
from packaging.requirements import Requirement
from packaging.version import Version

dest, tf = sys.argv[1], sys.argv[2]
# nvidia-h200 (KINDS.md, read 2026-11): versions where known; None = installed, version not listed
device = {"huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "safetensors": "0.8.0", "numpy": "2.5.2",
          "accelerate": "1.15.0", "torch": "2.11.0", "packaging": None, "pyyaml": None, "tqdm": None,
          "typer": None, "filelock": None, "fsspec": None, "hf-xet": None, "requests": None, "jinja2": None,
          "typing-extensions": None}
whl = glob.glob(f"{dest}/transformers-{tf}-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
env = {"python_version": "3.12", "platform_machine": "x86_64", "sys_platform": "linux", "extra": ""}
for line in meta.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate(env):
        continue
    name = req.name.lower().replace("_", "-")
    if name == "regex":
        continue  # carried anyway
    have = device.get(name, "absent") if name in device else "absent"
    if have == "absent":
        print(name)
        verdict = "MISSING on the device: carried"
    elif have is None:
        verdict = "on the device (version not listed; assumed fine)"
    elif req.specifier and not req.specifier.contains(Version(have), prereleases=True):
        print(name)
        verdict = f"device has {have}: too old, carried"
    else:
        verdict = f"device has {have}: ok"
    print(f"  requirement {req}: {verdict}", file=sys.stderr)
EOF
)
for name in $MISSING; do
  v=$(version_of "$name" || true)
  if [[ -z $v ]]; then echo "cannot carry $name: not installed in $ENV_PY's environment" >&2; exit 1; fi
  echo "$name==$v (required by transformers $TF, missing or too old on the device)"
  download "$name==$v"
done

# flash-attn: only if PyPI has a binary wheel for the device (cp312, torch 2.11); it is not preinstalled there
if download "flash-attn" --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 >/dev/null 2>&1; then
  echo "flash-attn: a binary wheel was found and downloaded (check it is built for torch 2.11 / CUDA 13)"
else
  echo "flash-attn: no binary wheel for cp312 on PyPI (source archive only): FlashAttention-2 rows will say 'not run'"
fi

echo
ls -l "$DEST"
TOTAL=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
echo "total: $((TOTAL / 1024)) KiB in $(ls "$DEST"/*.whl | wc -l) wheels (carry limit 64 MiB with the working tree)"
if ((TOTAL > LIMIT_MIB * 1024 * 1024)); then
  echo "ERROR: over ${LIMIT_MIB} MiB" >&2
  exit 1
fi
