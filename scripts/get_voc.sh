#!/usr/bin/env bash
# Download PASCAL VOC2007 trainval + test and VOC2012 trainval, check them, unpack into DIR/VOCdevkit.
#
#   bash scripts/get_voc.sh [DIR]          (default DIR: datasets/ in the repository root)
#
# VOC_MIRROR=<base URL> fetches every tar from <base URL>/<tar name> instead of the Oxford host
# (e.g. VOC_MIRROR=https://pjreddie.com/media/files). Tars already in DIR with the right md5 are
# reused; KEEP_TARS=1 keeps them after unpacking. data/voc.yaml expects root datasets/VOCdevkit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/../datasets}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

# tar name | md5 (as published with torchvision's VOC loader) | Oxford URL folder
tars=(
  "VOCtrainval_06-Nov-2007.tar|c52e279531787c972589f7e41ab4ae64|voc2007"
  "VOCtest_06-Nov-2007.tar|b6e924de25625d8de591ea690078ad9f|voc2007"
  "VOCtrainval_11-May-2012.tar|6cd6e144f989b92b3379bac3b3de84fd|voc2012"
)
# list file | images it must name
expected=(
  "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt|5011"
  "VOCdevkit/VOC2007/ImageSets/Main/test.txt|4952"
  "VOCdevkit/VOC2012/ImageSets/Main/trainval.txt|11540"
)

die() { echo "get_voc.sh: error: $*" >&2; exit 1; }

md5_of() {
  if command -v md5sum >/dev/null; then md5sum "$1" | cut -d' ' -f1
  elif command -v md5 >/dev/null; then md5 -q "$1"
  else die "neither md5sum nor md5 is installed"; fi
}

fetch() {  # url, output file
  if command -v curl >/dev/null; then curl -fL --retry 3 -C - -o "$2" "$1"
  elif command -v wget >/dev/null; then wget -c -O "$2" "$1"
  else die "neither curl nor wget is installed"; fi
}

verify() {  # all three lists present with their counts and every listed image + annotation on disk
  local entry list count got year_dir missing id
  for entry in "${expected[@]}"; do
    IFS='|' read -r list count <<<"$entry"
    [[ -f "$dest/$list" ]] || { echo "$dest/$list missing"; return 1; }
    got="$(grep -c . "$dest/$list")"
    [[ "$got" == "$count" ]] || { echo "$dest/$list lists $got images, expected $count"; return 1; }
    year_dir="$dest/${list%/ImageSets/Main/*}"
    missing=0
    while read -r id; do
      [[ -f "$year_dir/JPEGImages/$id.jpg" && -f "$year_dir/Annotations/$id.xml" ]] || missing=$((missing + 1))
    done <"$dest/$list"
    [[ "$missing" == 0 ]] || { echo "$list: $missing images or annotations missing"; return 1; }
    echo "ok: $list ($count images)"
  done
}

if verify >/dev/null 2>&1; then
  echo "PASCAL VOC already complete in $dest/VOCdevkit"
  exit 0
fi

for entry in "${tars[@]}"; do
  IFS='|' read -r name md5 folder <<<"$entry"
  tar_path="$dest/$name"
  if [[ -f "$tar_path" && "$(md5_of "$tar_path")" == "$md5" ]]; then
    echo "have $name (md5 ok)"
  else
    url="${VOC_MIRROR:-http://host.robots.ox.ac.uk/pascal/VOC/$folder}"
    url="${url%/}/$name"
    echo "downloading $url"
    fetch "$url" "$tar_path.part" || die "download of $url failed (set VOC_MIRROR to use another host)"
    got="$(md5_of "$tar_path.part")"
    [[ "$got" == "$md5" ]] || die "$name: md5 $got, expected $md5 (corrupt or different file; delete $tar_path.part and retry)"
    mv "$tar_path.part" "$tar_path"
  fi
  echo "unpacking $name"
  tar -xf "$tar_path" -C "$dest"
  [[ "${KEEP_TARS:-0}" == 1 ]] || rm -f "$tar_path"
done

verify || die "unpacked data is incomplete (see above)"
echo "PASCAL VOC is in $dest/VOCdevkit"
