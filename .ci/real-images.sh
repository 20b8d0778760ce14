#!/usr/bin/env bash
# Fetch a real Debian kernel (bzImage) and a Debian-built initrd for the loader tests.
#
# Usage: .ci/real-images.sh [DIR]   (DIR defaults to $HCLSIM_REAL_IMAGES or /var/cache/hclsim-real-images)
# Needs root and Debian's apt (no other network). Idempotent: a second run only prints the paths.
#
# The initrd is produced the way a Debian machine produces it: installing the cloud kernel package
# runs initramfs-tools' postinst hook (update-initramfs -> mkinitramfs), which needs the kernel's
# /lib/modules and /boot/config in place, so the package is really installed on this machine.
# DIR then holds copies: vmlinuz (bzImage), initrd.img, config, and VERSION.
set -euo pipefail
DIR="${1:-${HCLSIM_REAL_IMAGES:-/var/cache/hclsim-real-images}}"
export DEBIAN_FRONTEND=noninteractive

if [ ! -s "$DIR/vmlinuz" ] || [ ! -s "$DIR/initrd.img" ] || [ ! -s "$DIR/VERSION" ]; then
    [ "$(id -u)" = 0 ] || { echo "real-images.sh: needs root (apt-get install)" >&2; exit 1; }
    # The exact package behind the cloud metapackage, e.g. linux-image-6.1.0-56-cloud-amd64.
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || { echo "real-images.sh: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
    ver=${pkg#linux-image-}
    if [ ! -s "/boot/vmlinuz-$ver" ] || [ ! -s "/boot/initrd.img-$ver" ]; then
        apt-get install -y -qq --no-install-recommends initramfs-tools zstd "$pkg" >/dev/null
        # The postinst hook normally makes the initrd; make sure it exists either way.
        [ -s "/boot/initrd.img-$ver" ] || update-initramfs -c -k "$ver" >/dev/null
    fi
    mkdir -p "$DIR"
    tmp=$(mktemp -d "$DIR/.tmp.XXXXXX")
    cp "/boot/vmlinuz-$ver" "$tmp/vmlinuz"
    cp "/boot/initrd.img-$ver" "$tmp/initrd.img"
    cp "/boot/config-$ver" "$tmp/config"
    echo "$ver" > "$tmp/VERSION"
    chmod 0644 "$tmp"/*
    for f in vmlinuz initrd.img config VERSION; do mv -f "$tmp/$f" "$DIR/$f"; done  # VERSION last
    rmdir "$tmp"
fi
echo "kernel=$DIR/vmlinuz"
echo "initrd=$DIR/initrd.img"
echo "version=$(cat "$DIR/VERSION")"
