#!/bin/sh
# Stands in for ssh in the two-host tests: mpirun's hydra "logs in" to a host address through this script,
# which runs the proxy command in the network namespace that holds that address (FLOCK_NETNS lists
# "ADDRESS=NAMESPACE" pairs, separated by spaces; namespaces as `ip netns` names them).
while [ $# -gt 0 ]; do case "$1" in -*) shift;; *) break;; esac; done
host=$1
shift
for pair in $FLOCK_NETNS; do
    if [ "${pair%%=*}" = "$host" ]; then
        exec nsenter --net="/run/netns/${pair#*=}" sh -c "$*"
    fi
done
echo "netns_ssh.sh: no namespace for host $host (FLOCK_NETNS=$FLOCK_NETNS)" >&2
exit 255
