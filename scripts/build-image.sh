#!/usr/bin/env bash
# make image: the secure-ml container image, built on this machine FROM the Containerfile with
# buildah, over a base made from Debian's packages, with no pull from any container registry.
#
#   build/secure-ml-image.tar          OCI archive (skopeo copy oci-archive:… docker://…)
#   build/image.digest                 its manifest digest (sha256:…), what `secure-ml k8s render` pins
#   build/image-base.packages          the Debian package set of the base (name=version), and
#   build/image-base.digest            the base image's manifest digest, which the Containerfile's FROM pins
#   build/image.sbom.cdx.json          CycloneDX SBOM: Debian packages + every package of the lock
#   build/image.attestation.dsse.json  in-toto/SLSA provenance over the digest, DSSE-signed
#
# Stages: (1) mmdebstrap a minimal Debian (python3, venv, git, CA certificates, libatomic1: no
# compiler), packed as one sorted, mtime-0 tar and imported into buildah's own storage (under
# build/image-work, vfs) as localhost/secure-ml-base; its digest computed here;
# (2) `buildah bud` of the Containerfile with BASE=localhost/secure-ml-base@<that digest> and
# --pull=never (any other base is refused), chroot isolation, the project's tracked files only as
# the context; the lock install, the checks and UID 10001 are the Containerfile's; (3) pushed as an
# OCI archive, its base digest checked again, then the SBOM and the signed provenance.
# Needs root (mmdebstrap --mode=root, buildah) and `apt-get install mmdebstrap buildah skopeo`.
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE=${SUITE:-bookworm}                      # Debian 12: python3.11, the lock's interpreter
MIRROR=${MIRROR:-http://deb.debian.org/debian}
OUT=build
WORK=$OUT/image-work
PY=${PYTHON:-python3}
PACKAGES=python3,python3-venv,ca-certificates,git,libatomic1   # the whole base: no compiler (regopy needs libatomic)
PROJECT_FILES=(pyproject.toml requirements.lock workspace.yaml secure_ml assets resources sensors k8s data/sample)
started=$(date +%s)

for tool in mmdebstrap buildah skopeo; do
  command -v "$tool" >/dev/null || { echo "make image: $tool is missing (apt-get install -y mmdebstrap buildah skopeo)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "make image: needs root (mmdebstrap --mode=root, buildah)" >&2; exit 2; }

WORK=$(realpath -m "$WORK")
bh() { buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs "$@"; }
cleanup() { bh rm --all >/dev/null 2>&1 || true; bh rmi --all --force >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
cleanup && mkdir -p "$WORK/context" "$WORK/pip"

echo "image: base from Debian $SUITE packages"
mmdebstrap --quiet --variant=minbase --mode=root --include="$PACKAGES" "$SUITE" "$WORK/rootfs" "$MIRROR"
chroot "$WORK/rootfs" dpkg-query -W -f '${Package}=${Version}\n' | sort > "$OUT/image-base.packages"
rm -rf "$WORK/rootfs/var/cache/apt"/*.bin "$WORK/rootfs/var/lib/apt/lists"/*
: > "$WORK/rootfs/etc/resolv.conf"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$WORK/rootfs" -cf "$WORK/base-rootfs.tar" .
rm -rf "$WORK/rootfs"
base=$(bh from scratch)
bh add --quiet "$base" "$WORK/base-rootfs.tar" / >/dev/null
bh commit --quiet --format oci --timestamp 0 --rm "$base" localhost/secure-ml-base >/dev/null
base_digest=$(bh images --format '{{.Digest}}' localhost/secure-ml-base)
[[ $base_digest =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "make image: no digest for the base: $base_digest" >&2; exit 1; }
echo "$base_digest" > "$OUT/image-base.digest"
rm -f "$WORK/base-rootfs.tar"

echo "image: the Containerfile over localhost/secure-ml-base@$base_digest"
git ls-files -z -- "${PROJECT_FILES[@]}" | xargs -0 cp --parents -t "$WORK/context"
cp Containerfile "$WORK/context/Containerfile"
# pip's configuration for the install: this machine's CA store (its proxy may re-sign TLS; the
# lock's hashes decide what is installed, the image keeps Debian's CA store) and the local package
# sources its pip uses, all mounted read-only for the build stage's RUNs only (the final stage has none).
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$WORK/pip/ca.pem"
volumes=(-v "$WORK/pip:/mnt/build-pip:ro") extra=() links=()
for source in ${LOCAL_INDEXES:-/opt/pypi /opt/pypi-more} ${LOCAL_WHEELS:-/opt/wheels}; do
  [ -d "$source" ] || continue
  volumes+=(-v "$source:/mnt$source:ro")
  if [ -d "$source/simple" ]; then extra+=("file:///mnt$source/simple"); else links+=("/mnt$source"); fi
done
{ echo "[global]"; echo "cert = /mnt/build-pip/ca.pem"; echo "timeout = 180"
  [ ${#extra[@]} -eq 0 ] || echo "extra-index-url = ${extra[*]}"
  [ ${#links[@]} -eq 0 ] || echo "find-links = ${links[*]}"; } > "$WORK/pip/pip.conf"
bh bud --quiet --isolation chroot --pull=never --format oci --timestamp 0 --layers=false \
  --build-arg "BASE=localhost/secure-ml-base@$base_digest" --build-arg PIP_CONFIG_FILE=/mnt/build-pip/pip.conf \
  "${volumes[@]}" --label "org.opencontainers.image.base.digest=$base_digest" \
  -f "$WORK/context/Containerfile" -t localhost/secure-ml "$WORK/context" >/dev/null

echo "image: OCI archive, digest, base checked"
rm -f "$OUT/secure-ml-image.tar"
bh push --quiet localhost/secure-ml "oci-archive:$OUT/secure-ml-image.tar:secure-ml"
skopeo inspect --format '{{.Digest}}' "oci-archive:$OUT/secure-ml-image.tar" > "$OUT/image.digest"
built_on=$(skopeo inspect --raw "oci-archive:$OUT/secure-ml-image.tar" \
  | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["annotations"]["org.opencontainers.image.base.digest"])')
[ "$built_on" = "$base_digest" ] || { echo "make image: built on $built_on, not the base $base_digest" >&2; exit 1; }

echo "image: SBOM and signed provenance"
"$PY" scripts/image_attest.py "$OUT" "$WORK" "$(( $(date +%s) - started ))"
echo "image: $(cat "$OUT/image.digest"), $(du -h "$OUT/secure-ml-image.tar" | cut -f1) archive, $(( $(date +%s) - started )) s"
