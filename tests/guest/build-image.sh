#!/usr/bin/env bash
# Builds the test guest into DIR (default target/xvio-guest): an uncompressed Debian kernel
# (vmlinux, PVH-bootable under QEMU TCG) and a busybox initramfs with the virtio-net driver
# and iperf3. Its /init brings eth0 up with the address and runs the command given on the
# kernel command line (e2eip=, e2ecmd=), prints "E2E: rc=N", and powers off.
# Needs: apt-get (to download the kernel package), dpkg-deb, python3, busybox-static, iperf3.
set -euo pipefail
DIR=${1:-target/xvio-guest}
mkdir -p "$DIR"; cd "$DIR"
if [ ! -f vmlinux ]; then
  KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  if [ -z "$KPKG" ] && [ "$(id -u)" = 0 ]; then
    apt-get update >/dev/null
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  fi
  [ -n "$KPKG" ] || { echo "no linux-image package found: run apt-get update" >&2; exit 1; }
  rm -f ./*.deb; apt-get download "$KPKG" >/dev/null
  rm -rf kpkg; dpkg-deb -x ./"${KPKG}"_*.deb kpkg
  python3 - <<'PY'
import glob, lzma
d = open(glob.glob('kpkg/boot/vmlinuz-*')[0], 'rb').read()
i = d.find(b'\xfd7zXZ\x00')
open('vmlinux.tmp', 'wb').write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(d[i:]))
PY
  mv vmlinux.tmp vmlinux
fi
if [ ! -f initrd.gz ]; then
  R=$PWD/root; rm -rf "$R"; mkdir -p "$R"/{bin,proc,sys,dev,tmp,lib/modules}
  cp /bin/busybox "$R"/bin/
  for a in $(busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R"/bin/"$a"; done
  M=$(echo "$PWD"/kpkg/lib/modules/*/kernel)
  for m in net/core/failover drivers/net/net_failover drivers/virtio/virtio_ring drivers/virtio/virtio \
           drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/net/virtio_net; do
    if [ -f "$M/$m.ko" ]; then cp "$M/$m.ko" "$R"/lib/modules/; echo "$(basename $m)" >> "$R"/lib/modules/order
    elif [ -f "$M/$m.ko.xz" ]; then xz -dc "$M/$m.ko.xz" > "$R/lib/modules/$(basename $m).ko"; echo "$(basename $m)" >> "$R"/lib/modules/order; fi
  done
  cp /usr/bin/iperf3 "$R"/bin/
  for l in $(ldd /usr/bin/iperf3 | grep -o '/[^ ]*'); do mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"; done
  cat > "$R"/init <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "E2E: insmod $m failed"; done
for i in $(seq 1 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
IP=$(sed -n 's/.*e2eip=\([^ ]*\).*/\1/p' /proc/cmdline)
ip link set lo up; ip link set eth0 up; ip addr add ${IP:-10.99.0.2/24} dev eth0
echo "E2E: net up at uptime $(cut -d' ' -f1 /proc/uptime)"
CMD=$(sed -n 's/.*e2ecmd=\([^ ]*\).*/\1/p' /proc/cmdline | tr '_' ' ' | tr '~' '_')
echo "E2E: running: $CMD"; sh -c "$CMD"; echo "E2E: rc=$?"
grep eth0 /proc/net/dev
echo o > /proc/sysrq-trigger; poweroff -f
INIT
  chmod +x "$R"/init
  (cd "$R" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > initrd.gz.tmp
  mv initrd.gz.tmp initrd.gz
fi
echo "$PWD"
