#!/bin/sh
# Runs inside the base rootfs (chroot) after the packages are installed: the sandbox user, sudo,
# host name, and the removal of what a guest never needs (apt lists, caches, logs).
set -eu
if ! id user >/dev/null 2>&1; then
  useradd --create-home --home-dir /home/user --uid 1000 --user-group --shell /bin/bash user
fi
usermod -aG sudo user
printf 'user ALL=(ALL:ALL) NOPASSWD: ALL\n' > /etc/sudoers.d/wrenn-user
chmod 0440 /etc/sudoers.d/wrenn-user
echo sandbox > /etc/hostname
printf '127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts
ln -sf /proc/self/mounts /etc/mtab
printf 'LANG=C.UTF-8\n' > /etc/default/locale
# Sandboxes install Python packages freely (as E2B's templates allow), and `user` installs
# globally without sudo (npm install -g, pip into /usr/local), as in E2B's base template.
rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
chmod -R a+rwX /usr/local
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/log/*.log \
  /var/log/apt/* /usr/share/man/* /usr/share/info/* /root/.cache
# Documentation goes; the licence texts stay.
find /usr/share/doc -type f ! -name copyright -delete
