"""Convert MiniFASNet (Silent-Face anti-spoofing, Apache-2.0) to ONE ONNX file.

The two upstream checkpoints are fused into one graph, as upstream fuses them at prediction
time (`test.py`: the two softmaxes added, argmax, class 1 = real):

    inputs   crop_2_7  f32 [1,3,80,80]  the face box scaled 2.7x (MiniFASNetV2)
             crop_4_0  f32 [1,3,80,80]  the face box scaled 4.0x (MiniFASNetV1SE)
             both BGR 0..255, NCHW, no mean/std (upstream's to_tensor skips the /255)
    output   prob      f32 [1,3]        the mean of the two softmaxes: class 0 and 2 are attack
                                        types, class 1 is real; the argmax is upstream's

One file, not two: one session and one run per face, one sha256 in the manifest, and the fusion
lives with the weights it belongs to instead of being re-implemented by every caller.

Usage: python convert_minifasnet.py CANDIDATE_DIR OUT.onnx
CANDIDATE_DIR holds the upstream checkpoints and MiniFASNet.py (../shared/models/candidates/
minifasnet). Run it with scripts/convert_minifasnet.sh, which pins torch and onnx.
"""
import hashlib
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

CHECKPOINTS = {
    # file -> sha256, as ../shared/models/candidates/minifasnet/README.md records them
    "2.7_80x80_MiniFASNetV2.pth": "a5eb02e1843f19b5386b953cc4c9f011c3f985d0ee2bb9819eea9a142099bec0",
    "4_0_0_80x80_MiniFASNetV1SE.pth": "84ee1d37d96894d5e82de5a57df044ef80a58be2b218b5ed7cdfd875ec2f5990",
}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load(cls, path):
    """Upstream `_load_model`: the architecture from the file name (80x80 -> conv6_kernel (5, 5),
    upstream `get_kernel`), the `module.` prefix of nn.DataParallel stripped."""
    model = cls(conv6_kernel=((80 + 15) // 16, (80 + 15) // 16))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model.load_state_dict(state)
    return model.eval()


class Fused(torch.nn.Module):
    def __init__(self, v2, v1se):
        super().__init__()
        self.v2, self.v1se = v2, v1se

    def forward(self, crop_2_7, crop_4_0):
        return (F.softmax(self.v2(crop_2_7), dim=1) + F.softmax(self.v1se(crop_4_0), dim=1)) / 2


def main():
    candidate, out = sys.argv[1:3]
    for name, want in CHECKPOINTS.items():
        got = sha256(os.path.join(candidate, name))
        if got != want:
            sys.exit(f"{name}: sha256 {got}, expected {want}")
    sys.path.insert(0, candidate)
    from MiniFASNet import MiniFASNetV1SE, MiniFASNetV2  # the upstream model code

    torch.manual_seed(0)
    v2 = load(MiniFASNetV2, os.path.join(candidate, "2.7_80x80_MiniFASNetV2.pth"))
    v1se = load(MiniFASNetV1SE, os.path.join(candidate, "4_0_0_80x80_MiniFASNetV1SE.pth"))
    fused = Fused(v2, v1se).eval()
    example = (torch.zeros(1, 3, 80, 80), torch.zeros(1, 3, 80, 80))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.onnx.export(fused, example, out, input_names=["crop_2_7", "crop_4_0"],
                      output_names=["prob"], opset_version=13, do_constant_folding=True)
    model = onnx.load(out)
    onnx.checker.check_model(model)
    model.doc_string = ("MiniFASNetV2 (2.7x crop) and MiniFASNetV1SE (4.0x crop) from "
                        "minivision-ai/Silent-Face-Anti-Spoofing b6d5f04 (Apache-2.0), fused: "
                        "prob = mean of the two softmaxes, class 1 = real. "
                        "Inputs BGR 0..255 NCHW 80x80.")
    onnx.save(model, out)

    # The export must compute what PyTorch computes, on face-like inputs and on noise.
    rng = np.random.default_rng(0)
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    worst = 0.0
    for _ in range(8):
        a = rng.uniform(0, 255, (1, 3, 80, 80)).astype(np.float32)
        b = rng.uniform(0, 255, (1, 3, 80, 80)).astype(np.float32)
        with torch.no_grad():
            want = fused(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        got = session.run(None, {"crop_2_7": a, "crop_4_0": b})[0]
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > 1e-4:
        sys.exit(f"ONNX Runtime and PyTorch differ by {worst}")
    print(f"{out}: {os.path.getsize(out)} bytes, sha256 {sha256(out)}, "
          f"max |onnx - torch| {worst:.2e} (torch {torch.__version__}, onnx {onnx.__version__})")


if __name__ == "__main__":
    main()
