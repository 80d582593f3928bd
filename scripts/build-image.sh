#!/usr/bin/env bash
# make image: the secure-ml container image, built on this machine from Debian's packages and the
# hashed lock file, with no pull from any container registry.
#
#   build/secure-ml-image.tar          OCI archive (skopeo copy oci-archive:… docker://…)
#   build/image.digest                 its manifest digest (sha256:…), what `secure-ml k8s render` pins
#   build/image-base.packages          the Debian package set of the base (name=version), and
#   build/image-base.digest            the SHA-256 of the base root filesystem (sorted, mtime-0 tar)
#   build/image.sbom.cdx.json          CycloneDX SBOM: Debian packages + every package of the lock
#   build/image.attestation.dsse.json  in-toto/SLSA provenance over the digest, DSSE-signed
#
# Stages: (1) mmdebstrap a minimal Debian (python3, venv, git, CA certificates: no compiler);
# (2) in it, a venv from requirements.lock with --require-hashes and the project (as `make install`);
# (3) a non-root user (UID 10001), the tree packed as one OCI layer with umoci, archived by skopeo.
# Needs root (chroot) and `apt-get install mmdebstrap umoci skopeo`.
#
# The Containerfile at the top of the repository is the same recipe for `docker build` / `buildah`
# elsewhere (a registry base pinned by digest); tests/test_containerfile.py keeps the two in step:
# the Debian packages, the project files, the lock install, the user and the image config below.
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE=${SUITE:-bookworm}                      # Debian 12: python3.11, the lock's interpreter
MIRROR=${MIRROR:-http://deb.debian.org/debian}
OUT=build
WORK=$OUT/image-work
ROOT=$WORK/bundle/rootfs
PY=${PYTHON:-python3}
PACKAGES=python3,python3-venv,ca-certificates,git,libatomic1   # the whole base: no compiler (regopy needs libatomic)
PROJECT_FILES=(pyproject.toml requirements.lock workspace.yaml secure_ml assets resources sensors k8s data/sample)
APP_UID=10001
started=$(date +%s)

for tool in mmdebstrap umoci skopeo chroot; do
  command -v "$tool" >/dev/null || { echo "make image: $tool is missing (apt-get install -y mmdebstrap umoci skopeo)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "make image: needs root (mmdebstrap --mode=root, chroot)" >&2; exit 2; }

mounts=()
cleanup() { for m in "${mounts[@]}" "$ROOT/proc"; do umount "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
rm -rf "$WORK" && mkdir -p "$WORK/bundle"

echo "image: base from Debian $SUITE packages"
mmdebstrap --quiet --variant=minbase --mode=root --include="$PACKAGES" \
  "$SUITE" "$ROOT" "$MIRROR"
chroot "$ROOT" dpkg-query -W -f '${Package}=${Version}\n' | sort > "$OUT/image-base.packages"
echo "sha256:$(tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$ROOT" -cf - . | sha256sum | cut -d' ' -f1)" \
  > "$OUT/image-base.digest"

echo "image: the lock's packages (--require-hashes) and the project"
mkdir -p "$ROOT/opt/secure-ml"
git ls-files -z -- "${PROJECT_FILES[@]}" \
  | xargs -0 cp --parents -t "$ROOT/opt/secure-ml"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"
# The download trusts this machine's CA store (its proxy may re-sign TLS); the lock's hashes decide
# what is installed, and the image keeps Debian's own CA store.
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/tmp/build-ca.pem"
# Local package sources this machine's pip uses (pip.conf: extra-index-url file:///…, find-links)
# are bound in read-only for the install and unmounted before the tree is packed.
extra=() links=()
for source in ${LOCAL_INDEXES:-/opt/pypi /opt/pypi-more} ${LOCAL_WHEELS:-/opt/wheels}; do
  [ -d "$source" ] || continue
  mkdir -p "$ROOT/mnt$source" && mount --bind -o ro "$source" "$ROOT/mnt$source" && mounts+=("$ROOT/mnt$source")
  if [ -d "$source/simple" ]; then extra+=("file:///mnt$source/simple"); else links+=("/mnt$source"); fi
done
in_root() { chroot "$ROOT" env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root PIP_CERT=/tmp/build-ca.pem \
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_EXTRA_INDEX_URL="${extra[*]}" \
  PIP_FIND_LINKS="${links[*]}" "$@"; }
in_root python3 -m venv /opt/venv
in_root pip install -q --no-cache-dir --require-hashes --no-deps -r /opt/secure-ml/requirements.lock
in_root pip install -q --no-cache-dir --no-deps --no-build-isolation --no-index -e /opt/secure-ml >/dev/null
in_root pip check
# Every shared library a compiled module in the venv links must be in the image (regopy needs
# libatomic.so.1); a library a wheel bundles next to it (scipy.libs) counts as present.
missing=$(cd "$ROOT" && find opt/venv -name '*.so*' -type f | while read -r so; do
  { chroot "$ROOT" /usr/bin/ldd "/$so" 2>/dev/null || true; } | awk '/=> not found/ {print $1}' | while read -r lib; do
    [ -n "$(find "$ROOT/opt/venv" -name "$lib" -print -quit)" ] || echo "/$so needs $lib"; done; done | sort -u)
if [ -n "$missing" ]; then echo "make image: shared libraries missing from the image:" >&2; echo "$missing" >&2; exit 1; fi
cleanup
if grep -q " $(realpath "$ROOT")/mnt" /proc/mounts; then echo "make image: a bind mount is still there" >&2; exit 1; fi
find "$ROOT/mnt" -mindepth 1 -depth -type d -empty -delete   # only the empty mount points
rm -f "$ROOT/tmp/build-ca.pem"
: > "$ROOT/etc/resolv.conf"
rm -rf "$ROOT/root/.cache" "$ROOT/var/cache/apt"/*.bin "$ROOT/var/lib/apt/lists"/*

echo "image: non-root user 10001, no compiler"
echo "secure-ml:x:$APP_UID:$APP_UID:secure-ml:/home/secure-ml:/usr/sbin/nologin" >> "$ROOT/etc/passwd"
echo "secure-ml:x:$APP_UID:" >> "$ROOT/etc/group"
mkdir -p "$ROOT/home/secure-ml" "$ROOT/var/lib/secure-ml" "$ROOT/opt/dagster/dagster_home"
chown "$APP_UID:$APP_UID" "$ROOT/home/secure-ml" "$ROOT/var/lib/secure-ml"
for cc in gcc cc c++ g++ clang ld as make; do
  if [ -e "$ROOT/usr/bin/$cc" ]; then echo "make image: $cc is in the image" >&2; exit 1; fi
done

echo "image: OCI layout, archive, digest"
umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:secure-ml"
umoci unpack --image "$WORK/oci:secure-ml" "$WORK/empty" >/dev/null
cp "$WORK/empty/config.json" "$WORK/bundle/config.json"
cp -a "$WORK/empty/umoci.json" "$WORK/bundle/" 2>/dev/null || true
cp -a "$WORK/empty/"sha256_*.mtree "$WORK/bundle/" 2>/dev/null || true
umoci repack --image "$WORK/oci:secure-ml" "$WORK/bundle"
umoci config --image "$WORK/oci:secure-ml" --config.user "$APP_UID:$APP_UID" --config.workingdir /opt/secure-ml \
  --config.env PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin --config.env SECURE_ML_HOME=/var/lib/secure-ml \
  --config.env DAGSTER_DISABLE_TELEMETRY=1 --config.env DVC_NO_ANALYTICS=1 --config.env HOME=/home/secure-ml \
  --config.cmd secure-ml --config.cmd --help \
  --config.label org.opencontainers.image.source=secure-ml \
  --config.label "org.opencontainers.image.base.digest=$(cat "$OUT/image-base.digest")"
umoci gc --layout "$WORK/oci"
rm -f "$OUT/secure-ml-image.tar"
skopeo copy --quiet "oci:$WORK/oci:secure-ml" "oci-archive:$OUT/secure-ml-image.tar:secure-ml"
skopeo inspect --format '{{.Digest}}' "oci-archive:$OUT/secure-ml-image.tar" > "$OUT/image.digest"

echo "image: SBOM and signed provenance"
"$PY" scripts/image_attest.py "$OUT" "$WORK/bundle/rootfs" "$(( $(date +%s) - started ))"
rm -rf "$WORK"
echo "image: $(cat "$OUT/image.digest"), $(du -h "$OUT/secure-ml-image.tar" | cut -f1) archive, $(( $(date +%s) - started )) s"
