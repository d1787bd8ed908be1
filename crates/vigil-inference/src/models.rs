//! The default models, each with its pre- and post-processing, as documented for the files in
//! `models/models.toml`: YuNet (faces and landmarks), SFace (embedding), fr_liveness
//! (anti-spoofing), COCO-SSD (phones) and MiniFASNet (presentation-attack detection, a score
//! only; `docs/liveness-models.md`).

use std::path::Path;

use image::RgbImage;
use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;

use super::InferenceError;
use super::imageops::{self, Similarity};
use super::runtime::{self, Device};

/// A detected face, in the coordinates of the image it was found in.
#[derive(Debug, Clone, PartialEq)]
pub struct Face {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
    pub score: f32,
    /// Right eye, left eye, nose, right and left mouth corners.
    pub landmarks: [(f32, f32); 5],
}

fn model_err(model: &str, e: impl std::fmt::Display) -> InferenceError {
    InferenceError::Model {
        model: model.to_owned(),
        message: e.to_string(),
    }
}

/// Intersection over union of two `(x, y, w, h)` boxes.
pub fn iou(a: (f32, f32, f32, f32), b: (f32, f32, f32, f32)) -> f32 {
    let (ax2, ay2, bx2, by2) = (a.0 + a.2, a.1 + a.3, b.0 + b.2, b.1 + b.3);
    let iw = (ax2.min(bx2) - a.0.max(b.0)).max(0.0);
    let ih = (ay2.min(by2) - a.1.max(b.1)).max(0.0);
    let inter = iw * ih;
    let union = a.2 * a.3 + b.2 * b.3 - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// Greedy non-maximum suppression: keep the best-scoring boxes that overlap no kept box by
/// more than `threshold`. Returns indices into `items`, best first.
pub fn nms<T>(
    items: &[T],
    bbox: impl Fn(&T) -> (f32, f32, f32, f32),
    score: impl Fn(&T) -> f32,
    threshold: f32,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| score(&items[b]).total_cmp(&score(&items[a])));
    let mut keep: Vec<usize> = Vec::new();
    for i in order {
        if keep
            .iter()
            .all(|&k| iou(bbox(&items[k]), bbox(&items[i])) <= threshold)
        {
            keep.push(i);
        }
    }
    keep
}

/// YuNet face detector: BGR input of any size (a multiple of 32 on each side), twelve outputs
/// over strides 8, 16 and 32.
///
/// The file is exported at 640x640, but the network is fully convolutional: its reshapes keep
/// the batch and the channels and infer the rest, and its upsampling goes by scale. So the
/// worker frees the input's height and width and the outputs' anchor counts
/// ([`super::graph::free_dims`]) and runs it on the frame's own size, padded to a multiple of
/// 32: a 640x480 webcam frame costs 480/640 of the square. The faces are those found on the
/// letterboxed square (`identity::yunet_finds_the_same_faces_…`). Sizes are bounded by
/// [`YuNet::INPUT`], so ONNX Runtime plans at most 20 x 20 input shapes.
pub struct YuNet {
    session: Session,
}

/// The dimensions of YuNet's graph that [`YuNet::load`] frees.
const YUNET_FREE: [super::graph::FreeDim; 14] = {
    use super::graph::FreeDim;
    // One name per stride: a name stands for one size throughout the graph.
    const fn anchors(value: &'static str, param: &'static str) -> FreeDim {
        FreeDim {
            value,
            index: 1,
            param,
        }
    }
    [
        FreeDim {
            value: "input",
            index: 2,
            param: "height",
        },
        FreeDim {
            value: "input",
            index: 3,
            param: "width",
        },
        anchors("cls_8", "anchors_8"),
        anchors("cls_16", "anchors_16"),
        anchors("cls_32", "anchors_32"),
        anchors("obj_8", "anchors_8"),
        anchors("obj_16", "anchors_16"),
        anchors("obj_32", "anchors_32"),
        anchors("bbox_8", "anchors_8"),
        anchors("bbox_16", "anchors_16"),
        anchors("bbox_32", "anchors_32"),
        anchors("kps_8", "anchors_8"),
        anchors("kps_16", "anchors_16"),
        anchors("kps_32", "anchors_32"),
    ]
};

impl YuNet {
    /// The largest side the detector is given (the size it was exported at).
    pub const INPUT: u32 = 640;
    /// Each side of the input is padded to a multiple of this (the largest stride).
    const STRIDE_MAX: u32 = 32;

    pub fn load(
        env: &Environment,
        path: &Path,
        threads: usize,
        device: Device,
    ) -> Result<Self, InferenceError> {
        Ok(Self {
            session: runtime::session_with(env, path, threads, device, &YUNET_FREE)?,
        })
    }

    /// Faces in `img` (at most [`YuNet::INPUT`] on each side; padded with zeros on the right
    /// and bottom to a multiple of 32), score >= `min_score`, after NMS at `nms_iou`.
    pub fn detect(
        &mut self,
        img: &RgbImage,
        min_score: f32,
        nms_iou: f32,
    ) -> Result<Vec<Face>, InferenceError> {
        if img.width() > Self::INPUT || img.height() > Self::INPUT {
            return Err(model_err(
                "yunet",
                format!(
                    "{}x{} is larger than {}",
                    img.width(),
                    img.height(),
                    Self::INPUT
                ),
            ));
        }
        let (input, width, height) = imageops::padded_bgr_nchw(img, Self::STRIDE_MAX);
        let tensor = Tensor::from_array(([1usize, 3, height, width], input))
            .map_err(|e| model_err("yunet", e))?;
        // At most 640 a side (checked above), padded.
        let (width, height) = (width as u32, height as u32);
        let outputs = self
            .session
            .run(ort::inputs!["input" => tensor])
            .map_err(|e| model_err("yunet", e))?;
        let mut faces = Vec::new();
        for stride in [8u32, 16, 32] {
            let get = |name: &str| {
                outputs
                    .get(format!("{name}_{stride}"))
                    .ok_or_else(|| model_err("yunet", format!("missing output {name}_{stride}")))
                    .and_then(|v| {
                        v.try_extract_tensor::<f32>()
                            .map(|(_, d)| d)
                            .map_err(|e| model_err("yunet", e))
                    })
            };
            let (cls, obj, bbox, kps) = (get("cls")?, get("obj")?, get("bbox")?, get("kps")?);
            let cols = width / stride;
            let cells = (cols * (height / stride)) as usize;
            // Exactly the grid: the anchor counts are free in the graph it runs, so nothing else
            // checks them.
            if cls.len() != cells
                || obj.len() != cells
                || bbox.len() != cells * 4
                || kps.len() != cells * 10
            {
                return Err(model_err("yunet", "output does not match its grid"));
            }
            let s = stride as f32;
            for i in 0..cells {
                let score = (cls[i].clamp(0.0, 1.0) * obj[i].clamp(0.0, 1.0)).sqrt();
                if score < min_score {
                    continue;
                }
                let (r, c) = ((i as u32 / cols) as f32, (i as u32 % cols) as f32);
                let b = &bbox[i * 4..i * 4 + 4];
                let (cx, cy) = ((c + b[0]) * s, (r + b[1]) * s);
                let (w, h) = (b[2].exp() * s, b[3].exp() * s);
                let k = &kps[i * 10..i * 10 + 10];
                let mut landmarks = [(0f32, 0f32); 5];
                for (j, lm) in landmarks.iter_mut().enumerate() {
                    *lm = ((c + k[2 * j]) * s, (r + k[2 * j + 1]) * s);
                }
                faces.push(Face {
                    x: cx - w / 2.0,
                    y: cy - h / 2.0,
                    w,
                    h,
                    score,
                    landmarks,
                });
            }
        }
        let keep = nms(&faces, |f| (f.x, f.y, f.w, f.h), |f| f.score, nms_iou);
        Ok(keep.into_iter().map(|i| faces[i].clone()).collect())
    }
}

/// SFace recogniser: a face aligned to 112x112, RGB, gives a 128-d embedding.
pub struct SFace {
    session: Session,
}

/// Where the five landmarks land in the 112x112 aligned face.
const SFACE_TEMPLATE: [(f32, f32); 5] = [
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
];

/// The batch axis (dimension 0) of a model's `input` and `output`, freed for batches of faces.
const fn batch_axis(input: &'static str, output: &'static str) -> [super::graph::FreeDim; 2] {
    use super::graph::FreeDim;
    [
        FreeDim {
            value: input,
            index: 0,
            param: "batch",
        },
        FreeDim {
            value: output,
            index: 0,
            param: "batch",
        },
    ]
}

const SFACE_BATCH: [super::graph::FreeDim; 2] = batch_axis("data", "fc1");
const LIVENESS_BATCH: [super::graph::FreeDim; 2] = batch_axis("input", "output");

/// `v` scaled to unit length (a zero vector stays zero).
pub fn l2_normalised(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter().map(|x| x / norm).collect()
}

impl SFace {
    pub const DIM: usize = 128;

    /// With `batch`, the graph's batch axis is freed so that [`SFace::embed_batch`] takes
    /// more than one face per run; without it, the file's fixed batch of 1.
    pub fn load(
        env: &Environment,
        path: &Path,
        threads: usize,
        device: Device,
        batch: bool,
    ) -> Result<Self, InferenceError> {
        let free: &[super::graph::FreeDim] = if batch { &SFACE_BATCH } else { &[] };
        Ok(Self {
            session: runtime::session_with(env, path, threads, device, free)?,
        })
    }

    /// The similarity that maps `face`'s landmarks onto the 112x112 template.
    pub fn alignment(face: &Face) -> Result<Similarity, InferenceError> {
        Similarity::estimate(&face.landmarks, &SFACE_TEMPLATE)
            .ok_or_else(|| model_err("sface", "degenerate landmarks"))
    }

    /// `face` in `img`, aligned to the 112x112 template: the input the model was made for.
    pub fn align(img: &RgbImage, face: &Face) -> Result<(RgbImage, Similarity), InferenceError> {
        let m = Self::alignment(face)?;
        Ok((imageops::warp(img, &m, 112), m))
    }

    /// The L2-normalised embedding of `face` in `img`.
    pub fn embed(&mut self, img: &RgbImage, face: &Face) -> Result<Vec<f32>, InferenceError> {
        let (aligned, _) = Self::align(img, face)?;
        self.embed_aligned(&aligned)
    }

    /// The L2-normalised embedding of a face already aligned by [`SFace::align`].
    pub fn embed_aligned(&mut self, aligned: &RgbImage) -> Result<Vec<f32>, InferenceError> {
        let mut one = self.embed_batch(&[aligned])?;
        Ok(one.pop().expect("one embedding per face"))
    }

    /// The L2-normalised embeddings of faces aligned by [`SFace::align`], in one run: more
    /// than one needs a session loaded with `batch`.
    pub fn embed_batch(&mut self, aligned: &[&RgbImage]) -> Result<Vec<Vec<f32>>, InferenceError> {
        if aligned.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = Vec::with_capacity(aligned.len() * 3 * 112 * 112);
        for face in aligned {
            input.extend(imageops::rgb_nchw(face));
        }
        let tensor = Tensor::from_array(([aligned.len(), 3, 112, 112], input))
            .map_err(|e| model_err("sface", e))?;
        let outputs = self
            .session
            .run(ort::inputs!["data" => tensor])
            .map_err(|e| model_err("sface", e))?;
        let (_, data) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| model_err("sface", e))?;
        if data.len() != Self::DIM * aligned.len() {
            return Err(model_err(
                "sface",
                format!(
                    "{} values for {} faces, expected {} each",
                    data.len(),
                    aligned.len(),
                    Self::DIM
                ),
            ));
        }
        Ok(data.chunks_exact(Self::DIM).map(l2_normalised).collect())
    }
}

/// Cosine similarity of two L2-normalised embeddings.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// fr_liveness anti-spoofing: a 128x128 RGB crop around the face gives P(live).
pub struct Liveness {
    session: Session,
}

impl Liveness {
    pub const INPUT: u32 = 128;
    /// How far the vendor's crop reaches around the face box.
    pub const CROP_SCALE: f32 = 2.7;

    /// With `batch`, the graph's batch axis is freed so that [`Liveness::p_live_batch`] takes
    /// more than one face per run.
    pub fn load(
        env: &Environment,
        path: &Path,
        threads: usize,
        device: Device,
        batch: bool,
    ) -> Result<Self, InferenceError> {
        let free: &[super::graph::FreeDim] = if batch { &LIVENESS_BATCH } else { &[] };
        Ok(Self {
            session: runtime::session_with(env, path, threads, device, free)?,
        })
    }

    /// The vendor's crop (faceplugin's `alignLivenessImage`): the box scaled by
    /// `min(2.7, (H-1)/h, (W-1)/w)` around its centre, keeping its aspect ratio, shifted back
    /// inside the image. Returns `(x, y, w, h)`; the crop is then stretched to 128x128.
    pub fn crop(img: &RgbImage, face: &Face) -> (u32, u32, u32, u32) {
        let (w, h) = img.dimensions();
        let (src_w, src_h) = (w as f32, h as f32);
        let (bw, bh) = (face.w.max(1.0), face.h.max(1.0));
        let scale = ((src_h - 1.0) / bh)
            .min((src_w - 1.0) / bw)
            .min(Self::CROP_SCALE);
        let (nw, nh) = (bw * scale, bh * scale);
        let (cx, cy) = (face.x + bw / 2.0, face.y + bh / 2.0);
        let (mut x0, mut y0, mut x1, mut y1) =
            (cx - nw / 2.0, cy - nh / 2.0, cx + nw / 2.0, cy + nh / 2.0);
        if x0 < 0.0 {
            x1 -= x0;
            x0 = 0.0;
        }
        if y0 < 0.0 {
            y1 -= y0;
            y0 = 0.0;
        }
        if x1 > src_w - 1.0 {
            x0 -= x1 - src_w + 1.0;
            x1 = src_w - 1.0;
        }
        if y1 > src_h - 1.0 {
            y0 -= y1 - src_h + 1.0;
            y1 = src_h - 1.0;
        }
        let (x, y) = (x0.max(0.0) as u32, y0.max(0.0) as u32);
        let cw = ((x1 - x0) as u32).clamp(1, w - x);
        let ch = ((y1 - y0) as u32).clamp(1, h - y);
        (x, y, cw, ch)
    }

    /// P(live) for `face`.
    pub fn p_live(&mut self, img: &RgbImage, face: &Face) -> Result<f32, InferenceError> {
        let mut one = self.p_live_batch(&[(img, face)])?;
        Ok(one.pop().expect("one score per face"))
    }

    /// P(live) for each face in its image, in one run: more than one needs a session loaded
    /// with `batch`.
    pub fn p_live_batch(
        &mut self,
        faces: &[(&RgbImage, &Face)],
    ) -> Result<Vec<f32>, InferenceError> {
        if faces.is_empty() {
            return Ok(Vec::new());
        }
        let n = Self::INPUT as usize;
        let mut input = Vec::with_capacity(faces.len() * 3 * n * n);
        for (img, face) in faces {
            let (x, y, w, h) = Self::crop(img, face);
            input.extend(imageops::rgb_nchw(&imageops::crop_resize(
                img,
                x,
                y,
                w,
                h,
                Self::INPUT,
            )));
        }
        let tensor = Tensor::from_array(([faces.len(), 3, n, n], input))
            .map_err(|e| model_err("fr_liveness", e))?;
        let outputs = self
            .session
            .run(ort::inputs!["input" => tensor])
            .map_err(|e| model_err("fr_liveness", e))?;
        let (_, logits) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| model_err("fr_liveness", e))?;
        if logits.len() < 2 * faces.len() || logits.len() % faces.len() != 0 {
            return Err(model_err(
                "fr_liveness",
                format!("{} logits for {} faces", logits.len(), faces.len()),
            ));
        }
        Ok(logits
            .chunks_exact(logits.len() / faces.len())
            .map(|row| {
                let max = row.iter().copied().fold(f32::MIN, f32::max);
                let exp: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
                exp[0] / exp.iter().sum::<f32>()
            })
            .collect())
    }
}

/// MiniFASNet (Silent-Face anti-spoofing, Apache-2.0), its two checkpoints fused in one graph
/// by `scripts/convert_minifasnet.py`: a passive presentation-attack score, P(real).
///
/// Preprocessing is upstream's (`generate_patches.py`, `anti_spoof_predict.py`): the face box
/// scaled 2.7x (MiniFASNetV2) and 4.0x (MiniFASNetV1SE) around its centre, the scale capped so
/// the box fits, shifted back inside the image, cut out with inclusive integer corners and
/// resized to 80x80 as OpenCV's `INTER_LINEAR` does; BGR 0..255, NCHW, no normalisation. The
/// graph averages the two softmaxes (upstream adds them and takes the argmax); class 1 is real.
pub struct Pad {
    session: Session,
}

impl Pad {
    pub const INPUT: u32 = 80;
    /// The two crops, in the order of the graph's inputs.
    pub const CROPS: [(&'static str, f32); 2] = [("crop_2_7", 2.7), ("crop_4_0", 4.0)];
    /// Class 1 of the three is "real"; 0 and 2 are attack types.
    pub const REAL: usize = 1;

    pub fn load(
        env: &Environment,
        path: &Path,
        threads: usize,
        device: Device,
    ) -> Result<Self, InferenceError> {
        Ok(Self {
            session: runtime::session(env, path, threads, device)?,
        })
    }

    /// Upstream's `CropImage._get_new_box` for an image of `width` x `height`: the inclusive
    /// corners `(x0, y0, x1, y1)` of the box scaled by `min(scale, (H-1)/h, (W-1)/w)`.
    pub fn crop(width: u32, height: u32, face: &Face, scale: f32) -> (u32, u32, u32, u32) {
        let (src_w, src_h) = (width as f32, height as f32);
        let (bw, bh) = (face.w.max(1.0), face.h.max(1.0));
        let scale = ((src_h - 1.0) / bh).min((src_w - 1.0) / bw).min(scale);
        let (nw, nh) = (bw * scale, bh * scale);
        let (cx, cy) = (face.x + bw / 2.0, face.y + bh / 2.0);
        let (mut x0, mut y0, mut x1, mut y1) =
            (cx - nw / 2.0, cy - nh / 2.0, cx + nw / 2.0, cy + nh / 2.0);
        if x0 < 0.0 {
            x1 -= x0;
            x0 = 0.0;
        }
        if y0 < 0.0 {
            y1 -= y0;
            y0 = 0.0;
        }
        if x1 > src_w - 1.0 {
            x0 -= x1 - src_w + 1.0;
            x1 = src_w - 1.0;
        }
        if y1 > src_h - 1.0 {
            y0 -= y1 - src_h + 1.0;
            y1 = src_h - 1.0;
        }
        // Python's int() truncates; the clamps only guard against a degenerate image.
        let px = |v: f32, max: u32| (v.max(0.0) as u32).min(max.saturating_sub(1));
        let (x0, x1) = (px(x0, width), px(x1, width));
        let (y0, y1) = (px(y0, height), px(y1, height));
        (x0, y0, x1.max(x0), y1.max(y0))
    }

    /// One crop of `face` as the model's input: 80x80, BGR 0..255, NCHW.
    pub fn input(img: &RgbImage, face: &Face, scale: f32) -> Vec<f32> {
        let (x0, y0, x1, y1) = Self::crop(img.width(), img.height(), face, scale);
        let crop = resize_linear(img, (x0, y0, x1 - x0 + 1, y1 - y0 + 1), Self::INPUT);
        let n = (Self::INPUT * Self::INPUT) as usize;
        let mut out = vec![0f32; 3 * n];
        for (i, p) in crop.pixels().enumerate() {
            out[i] = p.0[2] as f32;
            out[n + i] = p.0[1] as f32;
            out[2 * n + i] = p.0[0] as f32;
        }
        out
    }

    /// The fused class probabilities for `face`: attack, real, attack. Checked to be a
    /// distribution, so a wrong file fails loudly instead of scoring nonsense.
    pub fn classes(&mut self, img: &RgbImage, face: &Face) -> Result<[f32; 3], InferenceError> {
        let n = Self::INPUT as usize;
        let mut inputs = Vec::with_capacity(Self::CROPS.len());
        for (name, scale) in Self::CROPS {
            let t = Tensor::from_array(([1usize, 3, n, n], Self::input(img, face, scale)))
                .map_err(|e| model_err("minifasnet", e))?;
            inputs.push((name, t));
        }
        let outputs = self
            .session
            .run(inputs)
            .map_err(|e| model_err("minifasnet", e))?;
        let (_, prob) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| model_err("minifasnet", e))?;
        let sum: f32 = prob.iter().sum();
        if prob.len() != 3 || prob.iter().any(|p| !p.is_finite()) || (sum - 1.0).abs() > 1e-3 {
            return Err(model_err(
                "minifasnet",
                format!("output {prob:?} is not a distribution over 3 classes"),
            ));
        }
        Ok([prob[0], prob[1], prob[2]])
    }

    /// P(real) for `face`.
    pub fn p_real(&mut self, img: &RgbImage, face: &Face) -> Result<f32, InferenceError> {
        Ok(self.classes(img, face)?[Self::REAL])
    }
}

/// The `(x, y, w, h)` region of `img` resized to `out` x `out` as OpenCV's `cv2.resize` with
/// `INTER_LINEAR` does (half-pixel centres, edge pixels repeated, no low-pass filter when
/// shrinking), which the models cropped this way were trained on. Rounds to the nearest level;
/// OpenCV's fixed-point arithmetic can differ by one.
fn resize_linear(img: &RgbImage, (x, y, w, h): (u32, u32, u32, u32), out: u32) -> RgbImage {
    let taps = |src: u32, origin: u32| -> Vec<(u32, u32, f32)> {
        let k = src as f32 / out as f32;
        (0..out)
            .map(|d| {
                let f = (d as f32 + 0.5) * k - 0.5;
                let mut i = f.floor() as i64;
                let mut t = f - i as f32;
                if i < 0 {
                    i = 0;
                    t = 0.0;
                }
                if i >= src as i64 - 1 {
                    i = src as i64 - 1;
                    t = 0.0;
                }
                let i = i as u32;
                (origin + i, origin + (i + 1).min(src - 1), t)
            })
            .collect()
    };
    let (xs, ys) = (taps(w.max(1), x), taps(h.max(1), y));
    RgbImage::from_fn(out, out, |dx, dy| {
        let (x0, x1, tx) = xs[dx as usize];
        let (y0, y1, ty) = ys[dy as usize];
        let (a, b, c, d) = (
            img.get_pixel(x0, y0).0,
            img.get_pixel(x1, y0).0,
            img.get_pixel(x0, y1).0,
            img.get_pixel(x1, y1).0,
        );
        image::Rgb(std::array::from_fn(|ch| {
            let top = a[ch] as f32 * (1.0 - tx) + b[ch] as f32 * tx;
            let bottom = c[ch] as f32 * (1.0 - tx) + d[ch] as f32 * tx;
            (top * (1.0 - ty) + bottom * ty).round().clamp(0.0, 255.0) as u8
        }))
    })
}

/// A phone found by COCO-SSD, in the coordinates of the image it was found in.
#[derive(Debug, Clone, PartialEq)]
pub struct Phone {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
    pub score: f32,
}

/// COCO-SSD object detector, of which Vigil keeps class 77, "cell phone".
pub struct CocoSsd {
    session: Session,
}

impl CocoSsd {
    /// Column of "cell phone" (COCO id 77) in the score output.
    pub const PHONE_COLUMN: usize = 76;
    pub const CLASSES: usize = 90;

    pub fn load(
        env: &Environment,
        path: &Path,
        threads: usize,
        device: Device,
    ) -> Result<Self, InferenceError> {
        Ok(Self {
            session: runtime::session(env, path, threads, device)?,
        })
    }

    /// Phones in `img` scoring at least `min_score`, after NMS at `nms_iou`, best first.
    pub fn phones(
        &mut self,
        img: &RgbImage,
        min_score: f32,
        nms_iou: f32,
    ) -> Result<Vec<Phone>, InferenceError> {
        let (w, h) = img.dimensions();
        let tensor =
            Tensor::from_array(([1usize, h as usize, w as usize, 3], img.as_raw().clone()))
                .map_err(|e| model_err("cocossd", e))?;
        let outputs = self
            .session
            .run(ort::inputs!["image_tensor:0" => tensor])
            .map_err(|e| model_err("cocossd", e))?;
        let scores = outputs
            .get("Postprocessor/Slice:0")
            .ok_or_else(|| model_err("cocossd", "missing output Postprocessor/Slice:0"))?
            .try_extract_tensor::<f32>()
            .map_err(|e| model_err("cocossd", e))?
            .1;
        let boxes = outputs
            .get("Postprocessor/ExpandDims_1:0")
            .ok_or_else(|| model_err("cocossd", "missing output Postprocessor/ExpandDims_1:0"))?
            .try_extract_tensor::<f32>()
            .map_err(|e| model_err("cocossd", e))?
            .1;
        let anchors = scores.len() / Self::CLASSES;
        if boxes.len() < anchors * 4 {
            return Err(model_err("cocossd", "fewer boxes than anchors"));
        }
        let (fw, fh) = (w as f32, h as f32);
        let found: Vec<Phone> = (0..anchors)
            .filter_map(|i| {
                let score = scores[i * Self::CLASSES + Self::PHONE_COLUMN];
                (score >= min_score).then(|| {
                    let b = &boxes[i * 4..i * 4 + 4];
                    let (y0, x0, y1, x1) = (
                        b[0].clamp(0.0, 1.0),
                        b[1].clamp(0.0, 1.0),
                        b[2].clamp(0.0, 1.0),
                        b[3].clamp(0.0, 1.0),
                    );
                    Phone {
                        x: x0 * fw,
                        y: y0 * fh,
                        w: (x1 - x0) * fw,
                        h: (y1 - y0) * fh,
                        score,
                    }
                })
            })
            .collect();
        let keep = nms(&found, |p| (p.x, p.y, p.w, p.h), |p| p.score, nms_iou);
        Ok(keep.into_iter().map(|i| found[i].clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let boxes = [
            (0.0, 0.0, 10.0, 10.0, 0.9),
            (1.0, 1.0, 10.0, 10.0, 0.8),
            (50.0, 50.0, 5.0, 5.0, 0.7),
        ];
        let keep = nms(&boxes, |b| (b.0, b.1, b.2, b.3), |b| b.4, 0.3);
        assert_eq!(keep, vec![0, 2]);
        assert!((iou((0.0, 0.0, 2.0, 2.0), (1.0, 0.0, 2.0, 2.0)) - 1.0 / 3.0).abs() < 1e-6);
    }

    /// The boxes, sums and pixels below come from upstream's `CropImage` with `cv2.resize`
    /// (opencv-python-headless 5.1.0.95) on the same synthetic image, in BGR NCHW.
    #[test]
    fn pad_crops_match_upstream_and_opencv() {
        let img = RgbImage::from_fn(200, 150, |x, y| {
            image::Rgb([
                ((x * 7 + y * 3) % 256) as u8,
                ((x * x + y) % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        });
        let cases = [
            (
                (80.0, 50.0, 30.0, 40.0),
                2.7,
                (54, 16, 135, 124),
                2_081_189.0,
                [38.0, 198.0, 36.0, 86.0],
            ),
            (
                (80.0, 50.0, 30.0, 40.0),
                4.0,
                (39, 0, 150, 149),
                2_258_635.0,
                [39.0, 204.0, 214.0, 100.0],
            ),
            (
                (170.0, 10.0, 20.0, 30.0),
                2.7,
                (145, 0, 199, 81),
                2_774_263.0,
                [145.0, 87.0, 100.0, 181.0],
            ),
            (
                (170.0, 10.0, 20.0, 30.0),
                4.0,
                (119, 0, 199, 120),
                2_712_368.0,
                [119.0, 128.0, 216.0, 161.0],
            ),
            (
                (5.0, 100.0, 25.0, 30.0),
                2.7,
                (0, 68, 67, 149),
                2_352_386.0,
                [68.0, 60.0, 148.0, 100.0],
            ),
            (
                (5.0, 100.0, 25.0, 30.0),
                4.0,
                (0, 29, 100, 149),
                2_189_591.0,
                [29.0, 44.0, 121.0, 124.0],
            ),
        ];
        let n = 80 * 80;
        for ((x, y, w, h), scale, corners, sum, pixels) in cases {
            let face = Face {
                x,
                y,
                w,
                h,
                score: 1.0,
                landmarks: [(0.0, 0.0); 5],
            };
            assert_eq!(
                Pad::crop(200, 150, &face, scale),
                corners,
                "{face:?} x{scale}"
            );
            let input = Pad::input(&img, &face, scale);
            assert_eq!(input.len(), 3 * n);
            let got: f32 = input.iter().sum();
            // OpenCV's fixed-point interpolation differs by one level on some values (14% of
            // them here, never by more).
            assert!(
                (got - sum).abs() < 0.25 * (3 * n) as f32,
                "{face:?} x{scale}: sum {got} vs {sum}"
            );
            let at = [
                input[0],
                input[n + 40 * 80 + 17],
                input[2 * n + 79 * 80 + 79],
                input[13 * 80 + 61],
            ];
            for (g, want) in at.iter().zip(pixels) {
                assert!(
                    (g - want).abs() <= 1.0,
                    "{face:?} x{scale}: {at:?} vs {pixels:?}"
                );
            }
        }
    }

    #[test]
    fn liveness_crop_follows_the_vendor() {
        let img = RgbImage::new(200, 100);
        // Scaled by (100-1)/30 = 3.3 capped at 2.7: 54 x 81, shifted left to fit.
        let face = Face {
            x: 170.0,
            y: 10.0,
            w: 20.0,
            h: 30.0,
            score: 1.0,
            landmarks: [(0.0, 0.0); 5],
        };
        let (x, y, w, h) = Liveness::crop(&img, &face);
        assert_eq!((w, h), (54, 81));
        assert!(x + w <= 200 && y + h <= 100, "{x} {y} {w} {h}");
        assert_eq!(x, 199 - 54);
        // A box taller than the image: the scale drops to fit.
        let huge = Face { h: 500.0, ..face };
        let (x, y, w, h) = Liveness::crop(&img, &huge);
        assert_eq!((y, h), (0, 99));
        assert!(x + w <= 200);
    }
}
