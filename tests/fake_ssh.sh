#!/bin/sh
# Stands in for ssh in the multi-node test: mpirun (hydra, or Open MPI's daemon launcher) "logs in" to each
# host name (127.0.0.2, 127.0.0.3) through this script, which runs the proxy command on this machine. With --own-host-name (for
# Open MPI, which names its shared-memory files after the host name) the command runs in a UTS namespace
# of its own, named after the host (needs root).
own_name=
while [ $# -gt 0 ]; do case "$1" in --own-host-name) own_name=1; shift;; -*) shift;; *) break;; esac; done
host=$1
shift
if [ -n "$own_name" ]; then
    exec unshare --uts sh -c 'hostname "$1" && exec sh -c "$2"' sh "$host" "$*"
fi
exec sh -c "$*"
