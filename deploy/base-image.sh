#!/usr/bin/env bash
# Makes the base image of deploy/Containerfile where no container registry can be reached but
# Debian's mirror can (as on this project's machines): Debian bookworm (its python3 is 3.11)
# from debootstrap, imported into podman. Prints the image's name; an existing one is kept.
#   bash deploy/base-image.sh [IMAGE]    (default localhost/pagedserve-base:bookworm)
set -euo pipefail
image=${1:-localhost/pagedserve-base:bookworm}
if ! podman image exists "$image"; then
    command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" \
        http://deb.debian.org/debian >&2
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image" >&2
fi
echo "$image"
