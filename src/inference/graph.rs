//! One lossless edit of an ONNX file before ONNX Runtime sees it: weights that an old exporter
//! also listed as graph inputs are made constants again.
//!
//! An ONNX graph may name an initializer (a weight) among its inputs too, which says "a caller
//! may override this weight". ONNX Runtime honours that: it neither folds such a weight into its
//! neighbours (batch normalisation into the convolution before it) nor treats it as constant,
//! and warns about each one. SFace (2021, IR 6) lists all 174 of its weights that way, and runs
//! about 1.5 times slower for it. No caller here overrides a weight, so
//! [`constant_initializers`] drops those entries from the graph's inputs, and the file on disk
//! stays the pinned, verified one. The outputs are the same up to float rounding (the folded
//! batch normalisation), which `tests/integration/identity.rs` checks on real faces.
//!
//! The edit works on the protobuf wire format: every byte of the model is copied as it is,
//! except the `GraphProto.input` entries removed, and the two length prefixes (the graph's, in
//! the model) that change with them. A file it cannot read as an ONNX model is handed on
//! unchanged, for ONNX Runtime to judge.

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
    let weights: HashSet<&[u8]> = graph_fields
        .iter()
        .filter(|f| f.number == GRAPH_INITIALIZER && f.wire == LENGTH_DELIMITED)
        .filter_map(|f| name(&graph_bytes[f.value.clone()], TENSOR_NAME))
        .collect();
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
            put_varint(
                &mut out,
                u64::from(MODEL_GRAPH << 3 | u32::from(LENGTH_DELIMITED)),
            );
            put_varint(&mut out, new_graph.len() as u64);
            out.extend_from_slice(&new_graph);
        } else {
            out.extend_from_slice(&model[f.whole.clone()]);
        }
    }
    Some((out, removed))
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
        put_varint(out, u64::from(number << 3 | u32::from(LENGTH_DELIMITED)));
        put_varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }

    fn named(number: u32, name: &str, rest: &[u8]) -> Vec<u8> {
        let mut m = rest.to_vec();
        field(&mut m, number, name.as_bytes());
        m
    }

    /// A model whose graph has initializers `w` and `b`, inputs `data`, `w` and `b`, a node and
    /// an output, with an ir_version before the graph and an opset after it.
    fn model(inputs: &[&str]) -> Vec<u8> {
        let mut graph = Vec::new();
        field(&mut graph, 1, b"node bytes kept as they are");
        for w in ["w", "b"] {
            // TensorProto: dims (field 1, varint) before the name.
            field(
                &mut graph,
                GRAPH_INITIALIZER,
                &named(TENSOR_NAME, w, &[0x08, 0x03]),
            );
        }
        for i in inputs {
            field(&mut graph, GRAPH_INPUT, &named(VALUE_INFO_NAME, i, &[]));
        }
        field(&mut graph, 12, &named(VALUE_INFO_NAME, "out", &[]));
        let mut m = vec![0x08, 0x06]; // ir_version = 6
        field(&mut m, MODEL_GRAPH, &graph);
        field(&mut m, 8, b"\x0a\x00\x10\x0b"); // opset_import
        m
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

    proptest::proptest! {
        /// Whatever the bytes, the edit never panics, and what it does not change it returns
        /// byte for byte.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let (edited, removed) = constant_initializers(&bytes);
            if removed == 0 {
                proptest::prop_assert_eq!(edited.as_ref(), bytes.as_slice());
            } else {
                proptest::prop_assert!(edited.len() < bytes.len());
            }
        }
    }
}
