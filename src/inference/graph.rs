//! One lossless edit of an ONNX file before ONNX Runtime sees it: weights that an old exporter
//! also listed as graph inputs are made constants again.
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
//! The edit works on the protobuf wire format: every byte of the model is copied as it is,
//! except the `GraphProto.input` entries removed and the graph field's key and length prefix in
//! the model, written anew. It leaves alone, handing the bytes on unchanged for ONNX Runtime to
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
