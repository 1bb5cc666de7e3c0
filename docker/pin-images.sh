#!/usr/bin/env bash
# `make pin-images`, on a host with Docker (buildx): resolve every image tag the deployment pulls
# (FROM lines of docker/Dockerfile*, `image:` of compose services that are not built here) to its
# digest, and write it as tag@sha256:... into those files. Every tag is resolved before any file is
# touched: with no docker, a failed lookup or anything but a digest in the answer, it exits non-zero
# and leaves every file as it was. A reference already pinned is resolved again from its tag.
set -euo pipefail
cd "$(dirname "$0")/.."
docker=${DOCKER:-docker}

die() {
    printf 'pin-images: error: %s\n' "$*" >&2
    exit 1
}

files=(docker/Dockerfile* docker/compose.yaml)
# The references: FROM IMAGE[:TAG][@DIGEST] and `image: ...`, less the images compose builds here.
mapfile -t refs < <(
    {
        sed -nE 's/^FROM[[:space:]]+([^[:space:]]+).*/\1/p' docker/Dockerfile*
        sed -nE 's/^[[:space:]]+image:[[:space:]]+([^[:space:]]+)[[:space:]]*$/\1/p' docker/compose.yaml
    } | grep -v '^tune-study-' | sort -u
)
[ "${#refs[@]}" -gt 0 ] || die "no image reference found in ${files[*]}"
command -v "$docker" >/dev/null 2>&1 || die "no '$docker' command here: run this on a host with Docker (buildx)"

declare -A digest=()
for ref in "${refs[@]}"; do
    tag=${ref%@*}
    out=$("$docker" buildx imagetools inspect "$tag" 2>&1) || die "cannot resolve $tag: $out"
    d=$(awk '$1 == "Digest:" { print $2; exit }' <<<"$out")
    [[ $d =~ ^sha256:[0-9a-f]{64}$ ]] || die "no digest for $tag in docker's answer: $out"
    digest[$ref]=$d
done

# All resolved: rewrite each file through a temporary copy, moved into place whole.
for file in "${files[@]}"; do
    tmp=$(mktemp "$file.XXXXXX")
    cp "$file" "$tmp"
    for ref in "${refs[@]}"; do
        tag=${ref%@*}
        # the reference as a whole word: followed by the end of line or white space
        sed -i -E "s#([[:space:]])$(sed 's/[.[\*^$/#]/\\&/g' <<<"$ref")([[:space:]]|\$)#\1$tag@${digest[$ref]}\2#" "$tmp"
    done
    chmod --reference="$file" "$tmp"
    mv "$tmp" "$file"
done
for ref in "${refs[@]}"; do
    printf 'pin-images: %s -> %s@%s\n' "$ref" "${ref%@*}" "${digest[$ref]}" >&2
done
