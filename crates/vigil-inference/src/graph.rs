//! Lossless edits of an ONNX file before ONNX Runtime sees it: weights that an old exporter
//! also listed as graph inputs are made constants again, and fixed sizes can be freed.
//!
//! An ONNX graph may name an initializer (a weight) among its inputs too, which says "a caller
//! may override this weight". ONNX Runtime honours that: it neither folds such a weight into its
//! neighbours (batch normalisation into the convolution before it) nor treats it as constant,
//! and warns about each one. SFace (2021, IR 6) lists all 174 of its weights that way, and runs
//! 1.2 to 1.3 times slower for it. No caller here overrides a weight, so
//! [`constant_initializers`] drops those entries from the graph's inputs, and the file on disk
//! stays the pinned, verified one. The outputs are the same up to float rounding (the folded
//! batch normalisation), which `tests/integration/identity.rs` checks on real faces.
//!
//! A second edit, [`free_dims`], declares chosen dimensions of a graph's inputs and outputs by
//! name instead of by size, for a fully convolutional model exported at one size.
//!
//! Both edits work on the protobuf wire format: every byte of the model is copied as it is,
//! except the `GraphProto.input` entries removed (or the `Dimension` entries renamed and the
//! intermediate `value_info` entries dropped) and the key and length prefixes that contain
//! them, written anew. The first leaves alone, handing the bytes on unchanged for ONNX Runtime to
//! judge: a file it cannot read as an ONNX model; a model of IR version 3 or older, where every
//! weight must be an input too and ONNX Runtime treats them as constants anyway; and a model
//! with a weight in an external file, which ONNX Runtime finds only from the model's path.

use std::borrow::Cow;
use std::collections::HashSet;

/// `ModelProto.graph`.
const MODEL_GRAPH: u32 = 7;
/// `GraphProto.initializer`.
const GRAPH_INITIALIZER: u32 = 5;
/// `GraphProto.input`.
const GRAPH_INPUT: u32 = 11;
/// `TensorProto.name`.
const TENSOR_NAME: u32 = 8;
/// `ValueInfoProto.name`.
const VALUE_INFO_NAME: u32 = 1;
/// `ModelProto.ir_version`.
const MODEL_IR_VERSION: u32 = 1;
/// `TensorProto.external_data`.
const TENSOR_EXTERNAL_DATA: u32 = 13;
/// `TensorProto.data_location` (`EXTERNAL` = 1).
const TENSOR_DATA_LOCATION: u32 = 14;
/// The first IR version whose initializers need not be graph inputs.
const IR_INITIALIZERS_APART: u64 = 4;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const FIXED32: u8 = 5;

/// `model` with every graph input that names one of the graph's initializers removed, and how
/// many were; the bytes themselves (borrowed) when there is none, or when `model` does not read
/// as an ONNX model.
pub fn constant_initializers(model: &[u8]) -> (Cow<'_, [u8]>, usize) {
    match edit(model) {
        Some((bytes, removed)) if removed > 0 => (Cow::Owned(bytes), removed),
        _ => (Cow::Borrowed(model), 0),
    }
}

fn edit(model: &[u8]) -> Option<(Vec<u8>, usize)> {
    let fields = fields(model)?;
    let ir_version = fields
        .iter()
        .rev()
        .find(|f| f.number == MODEL_IR_VERSION && f.wire == VARINT)
        .and_then(|f| varint(model, &mut f.value.start.clone()))?;
    if ir_version < IR_INITIALIZERS_APART {
        return None;
    }
    // One graph, as the ONNX schema has it; anything else is left to ONNX Runtime.
    let mut graphs = fields
        .iter()
        .filter(|f| f.number == MODEL_GRAPH && f.wire == LENGTH_DELIMITED);
    let graph = graphs.next()?;
    if graphs.next().is_some() {
        return None;
    }
    let graph_bytes = &model[graph.value.clone()];
    let graph_fields = self::fields(graph_bytes)?;
    let mut weights: HashSet<&[u8]> = HashSet::new();
    for f in &graph_fields {
        if f.number != GRAPH_INITIALIZER || f.wire != LENGTH_DELIMITED {
            continue;
        }
        let tensor = &graph_bytes[f.value.clone()];
        let tensor_fields = self::fields(tensor)?;
        let external = tensor_fields.iter().any(|t| {
            t.number == TENSOR_EXTERNAL_DATA
                || (t.number == TENSOR_DATA_LOCATION
                    && t.wire == VARINT
                    && varint(tensor, &mut t.value.start.clone()) == Some(1))
        });
        if external {
            return None;
        }
        weights.extend(name(tensor, TENSOR_NAME));
    }
    let mut new_graph = Vec::with_capacity(graph_bytes.len());
    let mut removed = 0;
    for f in &graph_fields {
        let is_weight_input = f.number == GRAPH_INPUT
            && f.wire == LENGTH_DELIMITED
            && name(&graph_bytes[f.value.clone()], VALUE_INFO_NAME)
                .is_some_and(|n| weights.contains(n));
        if is_weight_input {
            removed += 1;
        } else {
            new_graph.extend_from_slice(&graph_bytes[f.whole.clone()]);
        }
    }
    if removed == 0 {
        return Some((Vec::new(), 0));
    }
    let mut out = Vec::with_capacity(model.len());
    for f in &fields {
        if f.number == MODEL_GRAPH && f.wire == LENGTH_DELIMITED {
            put_length_delimited(&mut out, MODEL_GRAPH, &new_graph);
        } else {
            out.extend_from_slice(&model[f.whole.clone()]);
        }
    }
    Some((out, removed))
}

/// `GraphProto.output`.
const GRAPH_OUTPUT: u32 = 12;
/// `GraphProto.value_info`.
const GRAPH_VALUE_INFO: u32 = 13;
/// `ValueInfoProto.type`.
const VALUE_INFO_TYPE: u32 = 2;
/// `TypeProto.tensor_type`.
const TYPE_TENSOR: u32 = 1;
/// `TypeProto.Tensor.shape`.
const TENSOR_TYPE_SHAPE: u32 = 2;
/// `TensorShapeProto.dim`.
const SHAPE_DIM: u32 = 1;
/// `TensorShapeProto.Dimension.dim_param`.
const DIM_PARAM: u32 = 2;

/// One dimension of a graph input or output to declare free: the value's name, the
/// dimension's index, and the name it gets (`dim_param`).
#[derive(Debug, Clone, Copy)]
pub struct FreeDim {
    pub value: &'static str,
    pub index: usize,
    pub param: &'static str,
}

/// `model` with each dimension in `free` declared by name instead of by size, so that ONNX
/// Runtime accepts any size there. A fully convolutional model exported with one fixed input
/// size (YuNet: 640x640) then runs on the size a frame has.
///
/// Every byte is copied as it is except the `Dimension` entries named in `free`, the graph's
/// `value_info` entries (the shapes an exporter recorded for intermediate values, at the fixed
/// size: hints that would now be wrong, and that ONNX Runtime infers again), and the length
/// prefixes that contain them. `None` when `model` does not read as an ONNX model, or when a
/// named value or dimension is not there: a file other than the one the caller expects is then
/// not edited half-way. Freeing nothing returns the model as it is.
pub fn free_dims(model: &[u8], free: &[FreeDim]) -> Option<Vec<u8>> {
    if free.is_empty() {
        return Some(model.to_vec());
    }
    let mut done = vec![false; free.len()];
    let out = rewrite(model, |f, graph| {
        (f.number == MODEL_GRAPH && f.wire == LENGTH_DELIMITED).then(|| {
            let graph = without(graph, GRAPH_VALUE_INFO)?;
            rewrite(&graph, |g, value| {
                if !matches!(g.number, GRAPH_INPUT | GRAPH_OUTPUT) || g.wire != LENGTH_DELIMITED {
                    return None;
                }
                let value_name = name(value, VALUE_INFO_NAME)?;
                let wanted: Vec<usize> = (0..free.len())
                    .filter(|&i| free[i].value.as_bytes() == value_name)
                    .collect();
                if wanted.is_empty() {
                    return None;
                }
                let edited = rewrite_path(
                    value,
                    &[VALUE_INFO_TYPE, TYPE_TENSOR, TENSOR_TYPE_SHAPE],
                    &mut |shape| {
                        let mut index = 0;
                        rewrite(shape, |d, _| {
                            if d.number != SHAPE_DIM || d.wire != LENGTH_DELIMITED {
                                return None;
                            }
                            let at = index;
                            index += 1;
                            let i = *wanted.iter().find(|&&i| free[i].index == at)?;
                            done[i] = true;
                            let mut dim = Vec::new();
                            put_length_delimited(&mut dim, DIM_PARAM, free[i].param.as_bytes());
                            Some(Some(dim))
                        })
                    },
                );
                Some(edited)
            })
        })
    })?;
    done.iter().all(|&d| d).then_some(out)
}

/// `message` without its length-delimited fields `number`; `None` when it is not a well-formed
/// message.
fn without(message: &[u8], number: u32) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(message.len());
    for f in fields(message)? {
        if f.number != number || f.wire != LENGTH_DELIMITED {
            out.extend_from_slice(&message[f.whole]);
        }
    }
    Some(out)
}

/// `message` with the length-delimited field at `path` (first occurrence at each level)
/// replaced by what `edit` makes of its payload; `None` when the path is not there or `edit`
/// fails.
fn rewrite_path(
    message: &[u8],
    path: &[u32],
    edit: &mut dyn FnMut(&[u8]) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    let Some((&first, rest)) = path.split_first() else {
        return edit(message);
    };
    let mut found = false;
    let out = rewrite(message, |f, payload| {
        if found || f.number != first || f.wire != LENGTH_DELIMITED {
            return None;
        }
        found = true;
        Some(rewrite_path(payload, rest, edit))
    })?;
    found.then_some(out)
}

/// `message` with each length-delimited field for which `edit` returns `Some(Some(payload))`
/// written anew with that payload, and every other field copied as it is. `Some(None)` from
/// `edit` fails the whole rewrite; `None` when `message` is not a well-formed message.
fn rewrite(
    message: &[u8],
    mut edit: impl FnMut(&Field, &[u8]) -> Option<Option<Vec<u8>>>,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(message.len());
    for f in fields(message)? {
        let edited = if f.wire == LENGTH_DELIMITED {
            edit(&f, &message[f.value.clone()])
        } else {
            None
        };
        match edited {
            Some(Some(payload)) => put_length_delimited(&mut out, f.number, &payload),
            Some(None) => return None,
            None => out.extend_from_slice(&message[f.whole.clone()]),
        }
    }
    Some(out)
}

fn put_length_delimited(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    put_varint(out, u64::from(number << 3 | u32::from(LENGTH_DELIMITED)));
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// One field of a message: its number, wire type, the range of its value (the payload of a
/// length-delimited field), and the range of the whole field, key included.
struct Field {
    number: u32,
    wire: u8,
    value: std::ops::Range<usize>,
    whole: std::ops::Range<usize>,
}

/// The fields of one message, in order; `None` when `bytes` is not a well-formed message.
fn fields(bytes: &[u8]) -> Option<Vec<Field>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let start = at;
        let key = varint(bytes, &mut at)?;
        let number = u32::try_from(key >> 3).ok().filter(|&n| n > 0)?;
        let wire = (key & 7) as u8;
        let value_start;
        match wire {
            VARINT => {
                value_start = at;
                varint(bytes, &mut at)?;
            }
            FIXED64 => {
                value_start = at;
                at = at.checked_add(8)?;
            }
            LENGTH_DELIMITED => {
                let len = usize::try_from(varint(bytes, &mut at)?).ok()?;
                value_start = at;
                at = at.checked_add(len)?;
            }
            FIXED32 => {
                value_start = at;
                at = at.checked_add(4)?;
            }
            // Groups (3, 4) are not used by ONNX; any other wire type is not protobuf.
            _ => return None,
        }
        if at > bytes.len() {
            return None;
        }
        out.push(Field {
            number,
            wire,
            value: value_start..at,
            whole: start..at,
        });
    }
    Some(out)
}

/// The string field `number` of a message (its last occurrence, as protobuf reads it).
fn name(message: &[u8], number: u32) -> Option<&[u8]> {
    fields(message)?
        .into_iter()
        .rev()
        .find(|f| f.number == number && f.wire == LENGTH_DELIMITED)
        .map(|f| &message[f.value])
}

fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
        put_length_delimited(out, number, payload);
    }

    /// The graph of `model`.
    fn graph_of(model: &[u8]) -> Vec<u8> {
        fields(model)
            .unwrap()
            .into_iter()
            .find(|f| f.number == MODEL_GRAPH)
            .map(|f| model[f.value].to_vec())
            .unwrap()
    }

    fn named(number: u32, name: &str, rest: &[u8]) -> Vec<u8> {
        let mut m = rest.to_vec();
        field(&mut m, number, name.as_bytes());
        m
    }

    /// A model of IR version `ir` whose graph has initializers `w` and `b` (`tensor` bytes
    /// before each name), inputs `inputs`, a node and an output, with an opset after the graph.
    fn model_with(ir: u8, tensor: &[u8], inputs: &[&str]) -> Vec<u8> {
        let mut graph = Vec::new();
        field(&mut graph, 1, b"node bytes kept as they are");
        for w in ["w", "b"] {
            field(
                &mut graph,
                GRAPH_INITIALIZER,
                &named(TENSOR_NAME, w, tensor),
            );
        }
        for i in inputs {
            field(&mut graph, GRAPH_INPUT, &named(VALUE_INFO_NAME, i, &[]));
        }
        field(&mut graph, 12, &named(VALUE_INFO_NAME, "out", &[]));
        let mut m = vec![0x08, ir]; // ir_version
        field(&mut m, MODEL_GRAPH, &graph);
        field(&mut m, 8, b"\x0a\x00\x10\x0b"); // opset_import
        m
    }

    /// IR 6, each weight with dims (field 1) and 200 bytes of raw_data (field 9), so that the
    /// graph's length prefix takes two bytes.
    fn model(inputs: &[&str]) -> Vec<u8> {
        let mut tensor = vec![0x08, 0x03];
        field(&mut tensor, 9, &[0x5a; 200]);
        model_with(6, &tensor, inputs)
    }

    #[test]
    fn the_graph_length_prefix_is_rewritten() {
        let before = model(&["data", "w", "b"]);
        // ir_version (2 bytes), then the graph's key 0x3a and a two-byte length.
        assert_eq!(before[2], 0x3a);
        assert!(before[3] >= 0x80 && before[4] < 0x80, "{:x?}", &before[..6]);
        let m = before.clone();
        let (edited, removed) = constant_initializers(&m);
        assert_eq!(removed, 2);
        assert_eq!(edited.as_ref(), model(&["data"]).as_slice());
    }

    #[test]
    fn old_ir_versions_and_external_weights_are_left_alone() {
        // IR 3: every weight must be an input as well.
        let old = model_with(3, &[0x08, 0x03], &["data", "w", "b"]);
        assert_eq!(constant_initializers(&old).1, 0);
        // A weight in an external file (external_data, or data_location = EXTERNAL).
        let mut external = vec![0x08, 0x03];
        field(
            &mut external,
            TENSOR_EXTERNAL_DATA,
            &named(1, "location", &[]),
        );
        let m = model_with(6, &external, &["data", "w"]);
        assert_eq!(constant_initializers(&m).1, 0);
        let located = [0x08, 0x03, (TENSOR_DATA_LOCATION << 3) as u8, 0x01];
        let m = model_with(6, &located, &["data", "w"]);
        assert_eq!(constant_initializers(&m).1, 0);
        // data_location = DEFAULT is an ordinary weight.
        let default = [0x08, 0x03, (TENSOR_DATA_LOCATION << 3) as u8, 0x00];
        let m = model_with(6, &default, &["data", "w"]);
        assert_eq!(constant_initializers(&m).1, 1);
    }

    #[test]
    fn weights_listed_as_inputs_are_dropped_and_nothing_else_changes() {
        let m = model(&["data", "w", "b"]);
        let (edited, removed) = constant_initializers(&m);
        assert_eq!(removed, 2);
        assert_eq!(edited.as_ref(), model(&["data"]).as_slice());
    }

    #[test]
    fn a_model_without_such_inputs_is_passed_on_as_it_is() {
        let m = model(&["data"]);
        let (edited, removed) = constant_initializers(&m);
        assert_eq!(removed, 0);
        assert!(matches!(edited, Cow::Borrowed(_)));
    }

    #[test]
    fn bytes_that_are_not_a_model_are_passed_on_as_they_are() {
        let mut truncated = model(&["data", "w"]);
        truncated.truncate(truncated.len() - 3);
        let not_onnx: &[&[u8]] = &[b"", b"\xff\xff\xff", b"hello, world", &truncated];
        for bytes in not_onnx {
            let (edited, removed) = constant_initializers(bytes);
            assert_eq!((edited.as_ref(), removed), (*bytes, 0));
        }
    }

    /// A value info named `name` whose tensor shape has the dimensions `sizes`.
    fn value_info(name: &str, sizes: &[u8]) -> Vec<u8> {
        let mut shape = Vec::new();
        for &s in sizes {
            field(&mut shape, SHAPE_DIM, &[0x08, s]); // dim_value
        }
        let mut tensor = vec![0x08, 0x01]; // elem_type FLOAT
        field(&mut tensor, TENSOR_TYPE_SHAPE, &shape);
        let mut ty = Vec::new();
        field(&mut ty, TYPE_TENSOR, &tensor);
        let mut v = Vec::new();
        field(&mut v, VALUE_INFO_NAME, name.as_bytes());
        field(&mut v, VALUE_INFO_TYPE, &ty);
        v
    }

    /// The dimensions of value `value` in `model`: `Ok(size)` or `Err(name)`.
    fn dims_of(model: &[u8], value: &str) -> Vec<Result<u64, String>> {
        let graph = graph_of(model);
        let info = fields(&graph)
            .unwrap()
            .into_iter()
            .map(|f| graph[f.value].to_vec())
            .find(|v| name(v, VALUE_INFO_NAME) == Some(value.as_bytes()))
            .unwrap();
        let mut msg = info;
        for n in [VALUE_INFO_TYPE, TYPE_TENSOR, TENSOR_TYPE_SHAPE] {
            let f = fields(&msg)
                .unwrap()
                .into_iter()
                .find(|f| f.number == n)
                .unwrap();
            msg = msg[f.value].to_vec();
        }
        fields(&msg)
            .unwrap()
            .into_iter()
            .map(|d| {
                let dim = &msg[d.value];
                let f = &fields(dim).unwrap()[0];
                match f.number {
                    1 => Ok(varint(dim, &mut f.value.start.clone()).unwrap()),
                    _ => Err(String::from_utf8(dim[f.value.clone()].to_vec()).unwrap()),
                }
            })
            .collect()
    }

    fn shaped_model() -> Vec<u8> {
        let mut graph = Vec::new();
        field(&mut graph, 1, b"node bytes kept as they are");
        field(
            &mut graph,
            GRAPH_INPUT,
            &value_info("image", &[1, 3, 64, 64]),
        );
        field(&mut graph, GRAPH_OUTPUT, &value_info("boxes", &[1, 100, 4]));
        field(
            &mut graph,
            GRAPH_VALUE_INFO,
            &value_info("hidden", &[1, 8, 32, 32]),
        );
        let mut m = vec![0x08, 7]; // ir_version
        field(&mut m, MODEL_GRAPH, &graph);
        field(&mut m, 8, b"\x0a\x00\x10\x0b");
        m
    }

    #[test]
    fn named_dimensions_are_freed_and_nothing_else_changes() {
        let before = shaped_model();
        let free = [
            FreeDim {
                value: "image",
                index: 2,
                param: "height",
            },
            FreeDim {
                value: "image",
                index: 3,
                param: "width",
            },
            FreeDim {
                value: "boxes",
                index: 1,
                param: "anchors",
            },
        ];
        let after = free_dims(&before, &free).unwrap();
        assert_eq!(
            dims_of(&after, "image"),
            vec![Ok(1), Ok(3), Err("height".into()), Err("width".into())]
        );
        assert_eq!(
            dims_of(&after, "boxes"),
            vec![Ok(1), Err("anchors".into()), Ok(4)]
        );
        // The intermediate value's recorded shape is dropped.
        let recorded = |m: &[u8]| {
            let graph = graph_of(m);
            fields(&graph)
                .unwrap()
                .into_iter()
                .filter(|f| f.number == GRAPH_VALUE_INFO)
                .count()
        };
        assert_eq!((recorded(&before), recorded(&after)), (1, 0));
        // The rest is byte for byte: the node, and the opset after the graph.
        assert!(
            after
                .windows(27)
                .any(|w| w == b"node bytes kept as they are")
        );
        assert!(after.ends_with(b"\x0a\x00\x10\x0b"));
        // Freeing nothing rewrites nothing.
        assert_eq!(free_dims(&before, &[]).unwrap(), before);
    }

    #[test]
    fn a_dimension_that_is_not_there_leaves_the_model_unedited() {
        let m = shaped_model();
        let missing_value = [FreeDim {
            value: "input",
            index: 2,
            param: "h",
        }];
        let missing_dim = [FreeDim {
            value: "boxes",
            index: 3,
            param: "h",
        }];
        assert!(free_dims(&m, &missing_value).is_none());
        assert!(free_dims(&m, &missing_dim).is_none());
        assert!(free_dims(b"\xff\xff not a model", &missing_value).is_none());
    }

    #[test]
    fn varints_match_known_encodings() {
        for (v, bytes) in [
            (0u64, &[0x00][..]),
            (1, &[0x01]),
            (300, &[0xac, 0x02]),
            (u64::from(MODEL_GRAPH << 3 | 2), &[0x3a]),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn varints_round_trip() {
        for v in [0, 1, 127, 128, 300, 1 << 31, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut at = 0;
            assert_eq!(varint(&out, &mut at), Some(v));
            assert_eq!(at, out.len());
        }
    }

    fn check(bytes: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
        let (edited, removed) = constant_initializers(bytes);
        if removed == 0 {
            proptest::prop_assert_eq!(edited.as_ref(), bytes);
        } else {
            proptest::prop_assert!(edited.len() < bytes.len());
        }
        let free = [FreeDim {
            value: "input",
            index: 2,
            param: "height",
        }];
        let _ = free_dims(bytes, &free);
        Ok(())
    }

    proptest::proptest! {
        /// Whatever the bytes, the edit never panics, and what it does not change it returns
        /// byte for byte.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            check(&bytes)?;
        }

        /// A model cut short or with one byte changed, which gets as far as the graph and the
        /// names: never a panic, and the bytes unchanged when nothing was removed.
        #[test]
        fn damaged_models_never_panic(cut in 1usize..700, at in 0usize..700, byte in proptest::num::u8::ANY) {
            let mut m = model(&["data", "w", "b"]);
            let at = at % m.len();
            m[at] = byte;
            m.truncate(cut.min(m.len()));
            check(&m)?;
        }
    }
}
