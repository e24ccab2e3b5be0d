#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages v2p needs, if any are missing.
# As root it runs apt-get itself; otherwise it prints the command to run.
set -euo pipefail

declare -A need=(
  [qemu-img]=qemu-utils
  [qemu-system-x86_64]=qemu-system-x86
  [nasm]=nasm
  [losetup]=mount
  [blkid]=util-linux
  [fallocate]=util-linux
  [setpriv]=util-linux
  [mkfs.ext4]=e2fsprogs
  [pvcreate]=lvm2
  [xorriso]=xorriso
  [sfdisk]=fdisk
  [groff]=groff-base  # the man page's check renders it (make install writes it)
)
missing=()
export PATH="$PATH:/usr/sbin:/sbin"
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
if ! ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1'; then
  missing+=(libmagic1)
fi
# UEFI firmware (bios: ovmf VMs): a package of files, no command to look for.
if [ ! -e /usr/share/OVMF/OVMF_CODE_4M.fd ]; then
  missing+=(ovmf)
fi
# qemu's curl block driver (http/https), a module Debian ships apart: the example source kind's tests read through it.
if ! compgen -G '/usr/lib/*/qemu/block-curl.so' >/dev/null; then
  missing+=(qemu-block-extra)
fi
# Real BIOS boot code (syslinux's MBRs) the firmware-choice tests write onto GPT disks.
if [ ! -e /usr/lib/syslinux/mbr/gptmbr.bin ]; then
  missing+=(syslinux-common)
fi
# VMware's vCenter simulator for the vSphere source's tests: govmomi's Go source, built by tests/vcsim/.
if ! command -v go >/dev/null 2>&1; then
  missing+=(golang-go)
fi
if [ ! -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]; then
  missing+=(golang-github-vmware-govmomi-dev)
fi
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv python3-pip)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: missing Debian packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root, or install them first: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" ipxe-qemu seabios >/dev/null
echo "setup: installed ${missing[*]}"
