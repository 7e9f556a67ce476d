#!/usr/bin/env bash
# Install a real Slurm (controller + node daemon) and munge from Debian's packages, for
# tests/test_slurm.py. The daemons are NOT started here: the test fixture starts them in a
# temporary directory with a generated slurm.conf and stops them by PID afterwards.
# Needs root (CI runs as root). Prints the time it took.
set -euo pipefail
start=$(date +%s)
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
   && command -v sbatch >/dev/null; then
    echo "setup_slurm: slurm-wlm and munge already installed"
else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian's packages start no daemon without systemd/init (policy-rc.d denies it in containers);
    # a daemon started by a postinst would be stopped here anyway: the fixture owns the daemons.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
# munge needs a key readable only by the munge user; create one if the package did not.
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --force
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
echo "setup_slurm: $(slurmctld -V) ready in $(( $(date +%s) - start )) s"
