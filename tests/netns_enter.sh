#!/bin/sh
# Runs a command on one of the tests' namespaced hosts (tests/netns.py): `netns_enter.sh NAMESPACE CMD ...`
# runs CMD in that network namespace (as `ip netns` names it) with a /sys of its own, which lists the host's
# network devices where UCX looks for them; as `ip netns exec` would, but keeping the machine's cgroup mounts
# under /sys, which slurmd needs. The mounts are the command's own (a mount namespace): the machine's stay.
ns=$1
shift
exec nsenter --net="/run/netns/$ns" unshare --mount sh -c '
    keep=$(mktemp -d) && mount --rbind /sys/fs/cgroup "$keep" && mount -t sysfs sysfs /sys &&
        mount --move "$keep" /sys/fs/cgroup && rmdir "$keep" && exec "$@"' sh "$@"
