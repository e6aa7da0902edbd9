#!/bin/sh
# What must differ between nodes is made at first boot, not baked into every copy of the
# image: the machine-id (systemd) and the ssh host keys (base_hardening's
# sovereign-ssh-hostkeys.service). Runs after the build-time roles; $1 is the rootfs.
set -eu
root="$1"
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
