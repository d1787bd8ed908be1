"""Time onnxruntime's own InferenceSession.run on Vigil's models (the bare model runs).

Called by `vigil bench models`, which passes the models folder, the thread count, the number of
runs, and the frame sizes it used (COCO-SSD takes frames at their size). Prints one JSON object:
mean milliseconds per run for each model.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort

models_dir, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sizes = json.loads(sys.argv[4])  # [[h, w], ...]

opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
rng = np.random.default_rng(7)


def session(file):
    return ort.InferenceSession(f"{models_dir}/{file}", sess_options=opts, providers=["CPUExecutionProvider"])


def timed(sess, make_feeds):
    feeds = [make_feeds(i) for i in range(runs)]
    sess.run(None, feeds[0])  # warm-up
    start = time.perf_counter()
    for f in feeds:
        sess.run(None, f)
    return (time.perf_counter() - start) * 1e3 / runs


def pixels(shape):
    return rng.uniform(0, 255, size=shape).astype(np.float32)


out = {
    "yunet": timed(session("face_detection_yunet_2023mar.onnx"), lambda i: {"input": pixels((1, 3, 640, 640))}),
    "sface": timed(session("face_recognition_sface_2021dec.onnx"), lambda i: {"data": pixels((1, 3, 112, 112))}),
    "fr_liveness": timed(session("fr_liveness.onnx"), lambda i: {"input": pixels((1, 3, 128, 128))}),
    "cocossd": timed(
        session("cocossd.onnx"),
        lambda i: {"image_tensor:0": rng.integers(0, 256, size=(1, *sizes[i % len(sizes)], 3), dtype=np.uint8)},
    ),
}
print(json.dumps(out))
