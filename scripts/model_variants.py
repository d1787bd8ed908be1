#!/usr/bin/env python3
"""Model variants for Vigil's ONNX models, measured on real photos with onnxruntime's Python API.

Usage: model_variants.py PHOTOS MODELS [--rounds N] [--runs N] [--json PATH]
(scripts/model-variants.sh sets up the pinned environment and passes both folders.)

"fp32" below always means the shipped fp32 model with its initializer-inputs removed: SFace lists
its weights as graph inputs, which stops ORT from treating them as constants, and the project loads
it without them. The photos are sorted by name; the even-indexed ones calibrate the INT8 models,
the odd-indexed ones are held out for accuracy and timing. Faces come from fp32 YuNet (score >= 0.6,
the best face of each photo).

Part "int8":  SFace (static QDQ, per-channel, QUInt8 activations, MinMax) and COCO-SSD (the same,
              Conv only) are quantised in a temporary folder and compared with fp32.
Part "batch": SFace, fr_liveness, MiniFASNet and YuNet get a symbolic batch dimension "N" and are
              timed per image at batch 1, 4 and 16 with 1 and 2 intra-op threads.
"""
import argparse
import glob
import json
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import PIL
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

MODELS = {
    "yunet": "face_detection_yunet_2023mar.onnx",
    "sface": "face_recognition_sface_2021dec.onnx",
    "liveness": "fr_liveness.onnx",
    "minifasnet": "minifasnet/minifasnet.onnx",
    "cocossd": "cocossd.onnx",
}
MATCH = 0.41  # SFace cosine threshold for "same person"
PHONE = 77  # COCO class id of "cell phone"
WARMUP = 3  # untimed runs per variant before timing
# ArcFace 5-point template for the 112x112 SFace crop (eyes, nose, mouth corners).
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]])

ort.set_default_logger_severity(4)  # failures surface as exceptions, reported below


def fail(msg):
    sys.exit(f"model_variants.py: {msg}")


def session(path, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def fp32_model(src, dst):
    """Save the model without the graph inputs that are initializers (the "fp32" baseline)."""
    m = onnx.load(src)
    inits = {i.name for i in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    removed = len(m.graph.input) - len(keep)
    del m.graph.input[:]
    m.graph.input.extend(keep)
    onnx.save(m, dst)
    return removed


# ---------------------------------------------------------------- preprocessing (numpy + Pillow)
def letterbox(rgb, size=640):
    """YuNet input: scale the longer side to 640, pad right/bottom, BGR, NCHW float."""
    h, w = rgb.shape[:2]
    s = size / max(h, w)
    im = np.asarray(Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:im.shape[0], :im.shape[1]] = im
    return np.ascontiguousarray(canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)), s


def iou(a, b):
    """IoU of box a (x1, y1, x2, y2) against each row of boxes b."""
    w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def nms(boxes, scores, thr):
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        keep.append(order[0])
        order = order[1:][iou(boxes[order[0]], boxes[order[1:]]) <= thr]
    return keep


def yunet_faces(outs, names, scale, thr=0.6, size=640):
    """Decode YuNet's 12 outputs into (score, box, landmarks) in original-image pixels, NMS 0.3."""
    d = dict(zip(names, outs))
    faces = []
    for s in (8, 16, 32):
        n = size // s
        score = np.sqrt(np.clip(d[f"cls_{s}"][0, :, 0], 0, 1) * np.clip(d[f"obj_{s}"][0, :, 0], 0, 1))
        bb, kp = d[f"bbox_{s}"][0], d[f"kps_{s}"][0]
        r, c = np.divmod(np.arange(n * n), n)
        cx, cy = (c + bb[:, 0]) * s, (r + bb[:, 1]) * s
        w, h = np.exp(bb[:, 2]) * s, np.exp(bb[:, 3]) * s
        kx, ky = (c[:, None] + kp[:, 0::2]) * s, (r[:, None] + kp[:, 1::2]) * s
        for i in np.nonzero(score >= thr)[0]:
            box = np.array([cx[i] - w[i] / 2, cy[i] - h[i] / 2, cx[i] + w[i] / 2, cy[i] + h[i] / 2])
            faces.append((score[i], box / scale, np.stack([kx[i], ky[i]], 1) / scale))
    if not faces:
        return []
    keep = nms(np.array([f[1] for f in faces]), np.array([f[0] for f in faces]), 0.3)
    return [faces[i] for i in keep]


def umeyama(src, dst):
    """Least-squares similarity transform (2x3) mapping the points src onto dst."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(dc.T @ sc / len(src))
    D = np.diag([1.0, -1.0 if np.linalg.det(U) * np.linalg.det(Vt) < 0 else 1.0])
    R = U @ D @ Vt
    c = np.trace(np.diag(S) @ D) / ((sc ** 2).sum() / len(src))
    return np.hstack([c * R, (mu_d - c * R @ mu_s)[:, None]])


def sface_input(rgb, lm):
    """Align the face to the ArcFace template (112x112 RGB, NCHW float)."""
    inv = np.linalg.inv(np.vstack([umeyama(lm, TEMPLATE), [0, 0, 1]]))[:2]  # Pillow maps output -> input
    im = Image.fromarray(rgb).transform((112, 112), Image.AFFINE, data=tuple(inv.flatten()), resample=Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)[None].astype(np.float32))


def square_crop(rgb, box, scale, out, bgr=False):
    """Square crop of `scale` x the face height around the box centre, kept inside the image, resized."""
    h, w = rgb.shape[:2]
    side = min((box[3] - box[1]) * scale, w, h)
    x1 = min(max((box[0] + box[2]) / 2 - side / 2, 0), w - side)
    y1 = min(max((box[1] + box[3]) / 2 - side / 2, 0), h - side)
    im = np.asarray(Image.fromarray(rgb).resize((out, out), Image.BILINEAR, box=(x1, y1, x1 + side, y1 + side)))
    im = im[:, :, ::-1] if bgr else im
    return np.ascontiguousarray(im.transpose(2, 0, 1)[None].astype(np.float32))


def build_feeds(files, yunet):
    """Per photo, the feed of every model; the face models only when fp32 YuNet finds a face."""
    names = [o.name for o in yunet.get_outputs()]
    items = []
    for f in files:
        rgb = np.asarray(Image.open(f).convert("RGB"))
        x, scale = letterbox(rgb)
        item = {"file": os.path.basename(f), "yunet": {"input": x}, "cocossd": {"image_tensor:0": rgb[None]}}
        faces = yunet_faces(yunet.run(None, {"input": x}), names, scale)
        if faces:
            _, box, lm = max(faces, key=lambda d: d[0])
            item["sface"] = {"data": sface_input(rgb, lm)}
            item["liveness"] = {"input": square_crop(rgb, box, 2.7, 128)}
            item["minifasnet"] = {"crop_2_7": square_crop(rgb, box, 2.7, 80, bgr=True),
                                  "crop_4_0": square_crop(rgb, box, 4.0, 80, bgr=True)}
        items.append(item)
    return items


# ---------------------------------------------------------------- timing
def interleaved(variants, rounds, runs):
    """variants: name -> (session, feeds, images per run). Each round runs every variant `runs` times,
    the order rotating per round, so changes in machine load hit all variants alike.
    Returns name -> median ms per image."""
    names = list(variants)
    times = {n: [] for n in names}
    for n in names:
        sess, feeds, _ = variants[n]
        for i in range(WARMUP):
            sess.run(None, feeds[i % len(feeds)])
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sess, feeds, per = variants[n]
            for i in range(runs):
                feed = feeds[(r * runs + i) % len(feeds)]
                t0 = time.perf_counter()
                sess.run(None, feed)
                times[n].append((time.perf_counter() - t0) * 1e3 / per)
    return {n: float(np.median(v)) for n, v in times.items()}


# ---------------------------------------------------------------- part "int8"
class Feeds(CalibrationDataReader):
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def quantize(fp32_path, out, calib, op_types=None):
    """Static QDQ INT8: per-channel QInt8 weights, QUInt8 activations, MinMax calibration."""
    m = onnx.load(fp32_path)
    if [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")][0] < 13:
        m = onnx.version_converter.convert_version(m, 13)  # per-channel DequantizeLinear needs opset 13
    pre_in, pre_out = out + ".in.onnx", out + ".pre.onnx"
    onnx.save(m, pre_in)
    # ORT optimisation + ONNX shape inference; symbolic shape inference would need sympy.
    quant_pre_process(pre_in, pre_out, skip_symbolic_shape=True)
    quantize_static(pre_out, out, Feeds(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=op_types,
                    extra_options={"CalibMaxIntermediateOutputs": 8})


def prefix(name):
    """File-name prefix (Female_40, Male_3, ...): groups photos, not a reliable identity label."""
    m = re.match(r"^((?:Fe)?[Mm]ale_\d+)", name)
    return m.group(1) if m else name


def sface_accuracy(out0, out1, names):
    e0 = np.concatenate([o[0] for o in out0])
    e1 = np.concatenate([o[0] for o in out1])
    e0 /= np.linalg.norm(e0, axis=1, keepdims=True)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    self_cos = (e0 * e1).sum(1)
    iu = np.triu_indices(len(e0), 1)
    s0, s1 = (e0 @ e0.T)[iu], (e1 @ e1.T)[iu]
    p = np.array([prefix(n) for n in names])
    impostor = (p[:, None] != p[None, :])[iu]
    shift = np.abs(s0 - s1)
    return {"crops": len(e0), "cos_fp32_int8_min": float(self_cos.min()),
            "cos_fp32_int8_median": float(np.median(self_cos)), "pairs": int(len(s0)),
            "impostor_pairs": int(impostor.sum()),
            "impostor_above_fp32": int((s0[impostor] >= MATCH).sum()),
            "impostor_above_int8": int((s1[impostor] >= MATCH).sum()),
            "dcos_max": float(shift.max()), "dcos_p99": float(np.percentile(shift, 99)),
            "flips": int(((s0 >= MATCH) != (s1 >= MATCH)).sum())}


def coco_classes(outs, thr=0.5):
    """Sorted class ids detected at score >= thr after per-class NMS 0.5.
    Outputs: scores [1, boxes, 90] (class id = column + 1), boxes [1, boxes, 1, 4] as y1, x1, y2, x2."""
    scores, boxes = outs[0][0], outs[1][0, :, 0][:, [1, 0, 3, 2]]
    found = []
    for c in range(scores.shape[1]):
        idx = np.nonzero(scores[:, c] >= thr)[0]
        if idx.size:
            found += [c + 1] * len(nms(boxes[idx], scores[idx, c], 0.5))
    return sorted(found)


def coco_accuracy(out0, out1):
    c0, c1 = [coco_classes(o) for o in out0], [coco_classes(o) for o in out1]
    return {"photos": len(c0), "photos_class_multiset_differs": sum(a != b for a, b in zip(c0, c1)),
            "phone_dets_fp32": sum(a.count(PHONE) for a in c0), "phone_dets_int8": sum(b.count(PHONE) for b in c1)}


def part_int8(fp32, calib, test, work, rounds, runs):
    res = {}
    for name, ops, accuracy in (("sface", None, "sface"), ("cocossd", ["Conv"], "cocossd")):
        cal = [it[name] for it in calib if name in it]
        held = [it for it in test if name in it]
        feeds = [it[name] for it in held]
        q = os.path.join(work, f"{name}_int8.onnx")
        t0 = time.perf_counter()
        quantize(fp32[name], q, cal, ops)
        build_s = time.perf_counter() - t0
        s0, s1 = session(fp32[name]), session(q)
        out0 = [s0.run(None, f) for f in feeds]
        out1 = [s1.run(None, f) for f in feeds]
        acc = (sface_accuracy(out0, out1, [it["file"] for it in held]) if accuracy == "sface"
               else coco_accuracy(out0, out1))
        ms = interleaved({"fp32": (s0, feeds, 1), "int8": (s1, feeds, 1)}, rounds, runs)
        res[name] = {"op_types": ops or "all", "calibration_inputs": len(cal), "build_s": round(build_s, 1),
                     "fp32_ms": ms["fp32"], "int8_ms": ms["int8"], "speedup": ms["fp32"] / ms["int8"],
                     "fp32_bytes": os.path.getsize(fp32[name]), "int8_bytes": os.path.getsize(q), "accuracy": acc}
    return res


# ---------------------------------------------------------------- part "batch"
def stack(feeds):
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def hard_coded_reshapes(m):
    """Reshape nodes whose target shape is a constant starting with 1 (a fixed batch of 1)."""
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    return [n.name or n.output[0] for n in m.graph.node if n.op_type == "Reshape"
            and n.input[1] in consts and consts[n.input[1]].size and consts[n.input[1]].flat[0] == 1]


def symbolic_batch(src, dst):
    """Set dim 0 of every graph input and output to "N"; drop the stored intermediate shapes (they say 1)."""
    m = onnx.load(src)
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    onnx.save(m, dst)
    return hard_coded_reshapes(m)


def batch_check(dyn, ref, feeds, n=4):
    """Run batch n on the dynamic model; every row must match the batch-1 fp32 output of its item.
    Returns the max abs difference, or raises ValueError when the batch does not come through."""
    outs = dyn.run(None, stack(feeds[:n]))
    refs = [ref.run(None, f) for f in feeds[:n]]
    diff = 0.0
    for k, (o, meta) in enumerate(zip(outs, dyn.get_outputs())):
        if o.shape[0] != n or o.shape[1:] != refs[0][k].shape[1:]:
            raise ValueError(f"output {meta.name} has shape {list(o.shape)} at batch {n}")
        diff = max(diff, max(float(np.abs(o[i:i + 1] - refs[i][k]).max()) for i in range(n)))
    return diff


def part_batch(fp32, test, work, rounds, runs, sizes=(1, 4, 16), threads=(1, 2)):
    res = {"cocossd": {"skipped": "not tried: its input's batch axis is fixed at 1 ([1, -1, -1, 3], any image size)"}}
    for name in ("sface", "liveness", "minifasnet", "yunet"):
        feeds = [it[name] for it in test if name in it]
        dyn_path = os.path.join(work, f"{name}_batchN.onnx")
        reshapes = symbolic_batch(fp32[name], dyn_path)
        try:
            dyn = {t: session(dyn_path, t) for t in threads}
            diff = batch_check(dyn[1], session(fp32[name]), feeds)
        except Exception as e:  # noqa: BLE001 - any failure means "no dynamic batch"; report it and go on
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if reshapes:
                why += f"; Reshape nodes with a hard-coded batch of 1: {', '.join(reshapes)}"
            res[name] = {"skipped": why}
            continue
        if diff > 1e-4:
            res[name] = {"skipped": f"batch-4 rows differ from batch-1 outputs by {diff:.3g} (> 1e-4)",
                         "max_abs_diff_b4": diff}
            continue
        variants = {(t, b): (dyn[t], [stack(feeds[j:j + b]) for j in range(0, len(feeds) - b + 1, b)], b)
                    for t in threads for b in sizes}
        ms = interleaved(variants, rounds, runs)
        res[name] = {"max_abs_diff_b4": diff, "inputs": len(feeds),
                     "ms_per_image": {str(t): {f"b{b}": ms[(t, b)] for b in sizes} for t in threads}}
    return res


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("photos", help="folder of .jpg photos (scripts/lib.sh fetch_photos)")
    ap.add_argument("models", help="Vigil's models/ folder")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (default 10)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per variant and round (default 5)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    a = ap.parse_args()
    if a.rounds < 1 or a.runs < 1:
        fail("--rounds and --runs must be at least 1")
    files = sorted(glob.glob(os.path.join(a.photos, "*.jpg")))
    if not files:
        fail(f"no .jpg photos in {a.photos}")
    missing = [p for p in (os.path.join(a.models, f) for f in MODELS.values()) if not os.path.isfile(p)]
    if missing:
        fail(f"missing model file(s): {', '.join(missing)} (run scripts/test.sh or `vigil models fetch`)")

    versions = {"python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                "numpy": np.__version__, "pillow": PIL.__version__}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"timing: median of {a.rounds} interleaved rounds x {a.runs} runs per variant, {WARMUP} warm-up runs")
    with tempfile.TemporaryDirectory(prefix="model-variants-") as work:
        fp32, removed = {}, {}
        for name, f in MODELS.items():
            fp32[name] = os.path.join(work, f"{name}_fp32.onnx")
            removed[name] = fp32_model(os.path.join(a.models, f), fp32[name])
        print("fp32 = shipped model minus initializer-inputs; removed: "
              + ", ".join(f"{n} {k}" for n, k in removed.items()))
        yunet = session(fp32["yunet"])
        calib, test = build_feeds(files[0::2], yunet), build_feeds(files[1::2], yunet)
        faces = (sum("sface" in it for it in calib), sum("sface" in it for it in test))
        if not all(faces):
            fail(f"fp32 YuNet found faces in {faces[0]} calibration and {faces[1]} test photos; need both")
        print(f"photos: {len(files)} ({a.photos}); calibration {len(calib)} (even), held-out {len(test)} (odd); "
              f"with a face (YuNet score >= 0.6): {faces[0]} / {faces[1]}")
        int8 = part_int8(fp32, calib, test, work, a.rounds, a.runs)
        batch = part_batch(fp32, test, work, a.rounds, a.runs)

    print("\n== int8: static QDQ, per-channel QInt8 weights, QUInt8 activations, MinMax; 1 thread ==")
    print(f"{'model':<9} {'ops':<5} {'fp32 ms':>8} {'int8 ms':>8} {'speedup':>8} {'MB fp32->int8':>15}")
    for name, r in int8.items():
        ops = "Conv" if r["op_types"] != "all" else "all"
        print(f"{name:<9} {ops:<5} {r['fp32_ms']:8.2f} {r['int8_ms']:8.2f} {r['speedup']:7.2f}x "
              f"{r['fp32_bytes'] / 1e6:7.1f}->{r['int8_bytes'] / 1e6:.1f}")
    s, c = int8["sface"]["accuracy"], int8["cocossd"]["accuracy"]
    print(f"sface held-out: {s['crops']} crops, cos(fp32,int8) min {s['cos_fp32_int8_min']:.4f} "
          f"median {s['cos_fp32_int8_median']:.4f}")
    print(f"  impostor pairs (different prefix) >= {MATCH}: fp32 {s['impostor_above_fp32']}, "
          f"int8 {s['impostor_above_int8']} of {s['impostor_pairs']}")
    print(f"  all {s['pairs']} pairs: |dcos| max {s['dcos_max']:.4f}, p99 {s['dcos_p99']:.4f}; "
          f"{s['flips']} pairs flip at {MATCH}")
    print(f"cocossd held-out: class multiset at score 0.5 differs in {c['photos_class_multiset_differs']}/"
          f"{c['photos']} photos; phone (class {PHONE}) detections fp32 {c['phone_dets_fp32']}, "
          f"int8 {c['phone_dets_int8']}")

    print("\n== batch: symbolic batch dim 'N', fp32, ms per image (median) ==")
    print(f"{'model':<11} {'threads':>7} {'b1':>8} {'b4':>8} {'b16':>8}  max|b4 row - b1|")
    for name, r in batch.items():
        if "skipped" in r:
            print(f"{name:<11} skipped: {r['skipped']}")
            continue
        for t, row in r["ms_per_image"].items():
            print(f"{name:<11} {t:>7} " + " ".join(f"{v:8.2f}" for v in row.values())
                  + (f"  {r['max_abs_diff_b4']:.2e}" if t == "1" else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"versions": versions, "rounds": a.rounds, "runs": a.runs, "photos": len(files),
                       "faces_calibration": faces[0], "faces_test": faces[1],
                       "initializer_inputs_removed": removed, "int8": int8, "batch": batch}, f, indent=1)
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
