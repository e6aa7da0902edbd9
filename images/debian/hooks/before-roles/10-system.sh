#!/bin/sh
# Base system settings that are not a role's concern. An mmdebstrap customize hook, run
# before the build-time roles: $1 is the rootfs; SOVEREIGN_HOSTNAME comes from the builder.
set -eu
root="$1"
echo "$SOVEREIGN_HOSTNAME" > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
  "$SOVEREIGN_HOSTNAME" > "$root/etc/hosts"
chroot "$root" systemctl enable systemd-networkd.service ssh.service
chroot "$root" systemctl mask systemd-networkd-wait-online.service
