//! Safetensors loading, checking against a graph, conversions, atomic saving and offline hub
//! resolution. Every bad-input class has a golden test of its exact message.

use ir::{DType, Dim, Graph, Init, Op, Span, TensorType};
use proptest::prelude::*;
use runtime::weights::{Checkpoint, WeightsError, parse, resolve, resolve_with, save_f32};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ma2mba-weights-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a safetensors file by hand: 8-byte length, the header text as given, the data.
fn raw(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// A graph holding only f32 parameters with the given names and shapes.
fn graph(params: &[(&str, &[u64])]) -> Graph {
    let mut g = Graph::new("test");
    for (name, shape) in params {
        let ty = TensorType::new(DType::F32, shape.iter().map(|&d| Dim::known(d)).collect());
        let op = Op::Param {
            name: name.to_string(),
            ty,
            init: Init::Zeros,
        };
        g.add(op, &[], Span::default(), None).unwrap();
    }
    g
}

fn messages(errors: &[WeightsError]) -> Vec<String> {
    errors.iter().map(|e| e.to_string()).collect()
}

fn open_err(path: &Path) -> String {
    Checkpoint::open(path).unwrap_err().to_string()
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// ---- success cases ----

#[test]
fn f32_round_trip_through_save_and_load() {
    let t = TempDir::new("f32");
    let p = t.path("m.safetensors");
    let w: Vec<f32> = vec![1.0, -2.0, 0.1, 3.5e-8, f32::MAX, -0.0];
    save_f32(
        &p,
        &[
            ("a.weight".into(), vec![2, 3], w.clone()),
            ("b".into(), vec![], vec![7.0]),
        ],
    )
    .unwrap();
    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(ck.names().collect::<Vec<_>>(), ["a.weight", "b"]);
    assert_eq!(ck.to_f32("a.weight").unwrap(), w);
    let a = ck.to_array("a.weight").unwrap();
    assert_eq!(a.shape, [2, 3]);
    assert_eq!(a.data, w.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let v = ck.lookup("b").unwrap();
    assert_eq!(
        (v.dtype, v.shape, v.float_dtype()),
        ("F32", &[][..], Some(DType::F32))
    );

    let g = graph(&[("a.weight", &[2, 3]), ("b", &[])]);
    ck.check(&g).unwrap();
    let params = ck.load_params(&g).unwrap();
    assert_eq!(params.len(), 2);
    assert_eq!(params["b"].data, [7.0]);
}

#[test]
fn f16_bf16_f64_decode_exactly() {
    let t = TempDir::new("dtypes");
    let p = t.path("m.safetensors");
    let xs = [1.0f64, -2.5, 0.15625, 1024.0, -0.0, 3.0];
    let f16: Vec<u8> = xs
        .iter()
        .flat_map(|&x| half::f16::from_f64(x).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = xs
        .iter()
        .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
        .collect();
    let f64b: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut data = f16.clone();
    data.extend(&bf16);
    data.extend(&f64b);
    let header = format!(
        r#"{{"h":{{"dtype":"F16","shape":[6],"data_offsets":[0,12]}},"b":{{"dtype":"BF16","shape":[2,3],"data_offsets":[12,24]}},"d":{{"dtype":"F64","shape":[3,2],"data_offsets":[24,{}]}},"__metadata__":{{"format":"pt"}}}}"#,
        24 + 48
    );
    raw(&p, &header, &data);
    let ck = Checkpoint::open(&p).unwrap();
    let as_f32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    for name in ["h", "b", "d"] {
        assert_eq!(ck.to_array(name).unwrap().data, xs, "{name}");
        assert_eq!(ck.to_f32(name).unwrap(), as_f32, "{name}");
    }
    assert_eq!(ck.to_array("d").unwrap().shape, [3, 2]);
    assert_eq!(ck.lookup("b").unwrap().float_dtype(), Some(DType::BF16));
    let g = graph(&[("h", &[6]), ("b", &[2, 3]), ("d", &[3, 2])]);
    ck.check(&g).unwrap();
}

#[test]
fn unaligned_data_decodes() {
    let t = TempDir::new("unaligned");
    let p = t.path("m.safetensors");
    // Pad the header so that the data starts at an odd offset.
    let mut header = r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#.to_string();
    while (8 + header.len()) % 4 != 1 {
        header.push(' ');
    }
    raw(&p, &header, &f32_bytes(&[1.5, -2.25, 1e-3]));
    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(ck.to_f32("x").unwrap(), [1.5, -2.25, 1e-3]);
}

#[test]
fn hf_embedding_name_is_accepted() {
    let t = TempDir::new("alias");
    let p = t.path("model.safetensors");
    save_f32(
        &p,
        &[
            (
                "backbone.embeddings.weight".into(),
                vec![4, 2],
                vec![0.5; 8],
            ),
            ("backbone.norm_f.weight".into(), vec![2], vec![1.0; 2]),
        ],
    )
    .unwrap();
    let ck = Checkpoint::open(&t.0).unwrap();
    let g = graph(&[
        ("backbone.embedding.weight", &[4, 2]),
        ("backbone.norm_f.weight", &[2]),
    ]);
    ck.check(&g).unwrap();
    assert_eq!(
        ck.lookup("backbone.embedding.weight").unwrap().name,
        "backbone.embeddings.weight"
    );
    let params = ck.load_params(&g).unwrap();
    assert_eq!(params["backbone.embedding.weight"].data, [0.5; 8]);

    // Both spellings in one file: the reference one is used, the other is unexpected.
    save_f32(
        &p,
        &[
            (
                "backbone.embeddings.weight".into(),
                vec![4, 2],
                vec![0.5; 8],
            ),
            (
                "backbone.embedding.weight".into(),
                vec![4, 2],
                vec![0.25; 8],
            ),
            ("backbone.norm_f.weight".into(), vec![2], vec![1.0; 2]),
        ],
    )
    .unwrap();
    let errs = Checkpoint::open(&p).unwrap().check(&g).unwrap_err();
    assert_eq!(
        messages(&errs),
        [format!(
            "{}: unexpected tensor `backbone.embeddings.weight` (not a parameter of the model)",
            p.display()
        )]
    );
}

#[test]
fn tied_lm_head_in_the_file_is_ignored() {
    let t = TempDir::new("tied");
    let p = t.path("m.safetensors");
    save_f32(
        &p,
        &[
            ("backbone.embedding.weight".into(), vec![4, 2], vec![0.5; 8]),
            ("lm_head.weight".into(), vec![4, 2], vec![0.5; 8]),
        ],
    )
    .unwrap();
    let ck = Checkpoint::open(&p).unwrap();
    ck.check(&graph(&[("backbone.embedding.weight", &[4, 2])]))
        .unwrap();
    // An untied model needs its head.
    let untied = graph(&[
        ("backbone.embedding.weight", &[4, 2]),
        ("lm_head.weight", &[4, 2]),
    ]);
    ck.check(&untied).unwrap();
    let t2 = TempDir::new("untied");
    let p2 = t2.path("m.safetensors");
    save_f32(
        &p2,
        &[("backbone.embedding.weight".into(), vec![4, 2], vec![0.5; 8])],
    )
    .unwrap();
    let errs = Checkpoint::open(&p2).unwrap().check(&untied).unwrap_err();
    assert_eq!(
        messages(&errs),
        [format!(
            "{}: missing tensor `lm_head.weight` of shape [4, 2]",
            p2.display()
        )]
    );
}

#[test]
fn sharded_directory_with_index() {
    let t = TempDir::new("sharded");
    save_f32(
        &t.path("model-00001-of-00002.safetensors"),
        &[
            ("a".into(), vec![2], vec![1.0, 2.0]),
            ("b".into(), vec![1], vec![3.0]),
        ],
    )
    .unwrap();
    save_f32(
        &t.path("model-00002-of-00002.safetensors"),
        &[("c".into(), vec![2, 2], vec![4.0; 4])],
    )
    .unwrap();
    std::fs::write(
        t.path("model.safetensors.index.json"),
        r#"{"metadata":{"total_size":28},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let ck = Checkpoint::open(&t.0).unwrap();
    assert_eq!(ck.files().count(), 2);
    assert_eq!(ck.source(), t.0.as_path());
    ck.check(&graph(&[("a", &[2]), ("b", &[1]), ("c", &[2, 2])]))
        .unwrap();
    assert_eq!(ck.to_f32("c").unwrap(), [4.0; 4]);
    assert_eq!(
        ck.lookup("c").unwrap().file,
        t.path("model-00002-of-00002.safetensors")
    );
}

#[test]
fn sharded_index_mismatches() {
    let t = TempDir::new("badindex");
    let shard = t.path("model-00001-of-00001.safetensors");
    save_f32(&shard, &[("a".into(), vec![1], vec![1.0])]).unwrap();
    let index = t.path("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map":{"a":"model-00001-of-00001.safetensors","z":"model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    assert_eq!(
        open_err(&t.0),
        format!(
            "{}: the index maps tensor `z` to `model-00001-of-00001.safetensors`, which does not contain it",
            index.display()
        )
    );
    std::fs::write(&index, r#"{"weight_map":{}}"#).unwrap();
    assert_eq!(
        open_err(&t.0),
        format!(
            "{}: invalid index (the weight map is empty)",
            index.display()
        )
    );
    save_f32(
        &shard,
        &[
            ("a".into(), vec![1], vec![1.0]),
            ("c".into(), vec![1], vec![1.0]),
        ],
    )
    .unwrap();
    std::fs::write(
        &index,
        r#"{"weight_map":{"a":"model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    assert_eq!(
        open_err(&t.0),
        format!(
            "{}: tensor `c` is not listed in the index {}",
            shard.display(),
            index.display()
        )
    );
    std::fs::write(&index, r#"{"weight_map":{"a":"../x.safetensors"}}"#).unwrap();
    assert_eq!(
        open_err(&t.0),
        format!(
            "{}: invalid index (the file `../x.safetensors` of tensor `a` is not a file name in the directory)",
            index.display()
        )
    );
}

#[test]
fn real_transformers_file_checks_against_reference_names() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny-mamba/model.safetensors");
    let ck = Checkpoint::open(&p).unwrap();
    let names: Vec<(String, Vec<u64>)> = ck
        .names()
        .map(|n| {
            let shape = ck
                .lookup(n)
                .unwrap()
                .shape
                .iter()
                .map(|&d| d as u64)
                .collect();
            (n.replace("embeddings", "embedding"), shape)
        })
        .collect();
    let params: Vec<(&str, &[u64])> = names
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let g = graph(&params);
    let loaded = ck.load_params(&g).unwrap();
    assert_eq!(loaded["backbone.embedding.weight"].shape, [64, 16]);
    assert_eq!(loaded.len(), 22);
}

#[test]
fn atomic_save_leaves_no_temporary_file() {
    let t = TempDir::new("atomic");
    let p = t.path("logits.safetensors");
    std::fs::write(&p, b"old contents").unwrap();
    let data: Vec<f32> = (0..15).map(|i| i as f32 * 0.25).collect();
    save_f32(&p, &[("logits".into(), vec![1, 3, 5], data.clone())]).unwrap();
    let entries: Vec<String> = std::fs::read_dir(&t.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["logits.safetensors"]);
    let bytes = std::fs::read(&p).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!((8 + header_len) % 8, 0, "data is 8-byte aligned");
    // The reference parser accepts it too.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("logits").unwrap().shape(), [1, 3, 5]);
    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(ck.to_f32("logits").unwrap(), data);
}

#[test]
fn save_rejects_bad_input_and_writes_nothing() {
    let t = TempDir::new("savebad");
    let p = t.path("x.safetensors");
    let e = save_f32(&p, &[("w".into(), vec![2, 3], vec![0.0; 5])]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor `w` has 5 values, but shape [2, 3] needs 6",
            p.display()
        )
    );
    let e = save_f32(
        &p,
        &[
            ("w".into(), vec![1], vec![0.0]),
            ("w".into(), vec![1], vec![0.0]),
        ],
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor name `w` is given twice or is reserved",
            p.display()
        )
    );
    let e = save_f32(&t.path("no/such/dir/x.safetensors"), &[]).unwrap_err();
    assert!(
        matches!(
            e,
            WeightsError::Io {
                action: "create",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(&t.0).unwrap().count(), 0);
}

// ---- the checkpoint against the model ----

#[test]
fn missing_tensor_suggests_near_names() {
    let t = TempDir::new("missing");
    let p = t.path("m.safetensors");
    save_f32(
        &p,
        &[
            ("backbone.norm_f.weigth".into(), vec![4], vec![1.0; 4]),
            (
                "backbone.layers.0.norm.weight".into(),
                vec![4],
                vec![1.0; 4],
            ),
        ],
    )
    .unwrap();
    let ck = Checkpoint::open(&p).unwrap();
    let g = graph(&[
        ("backbone.layers.0.norm.weight", &[4]),
        ("backbone.norm_f.weight", &[4]),
        ("backbone.layers.0.mixer.D", &[8]),
    ]);
    let errs = ck.check(&g).unwrap_err();
    let d = p.display();
    assert_eq!(
        messages(&errs),
        [
            format!(
                "{d}: missing tensor `backbone.norm_f.weight` of shape [4] (near names in the file: `backbone.norm_f.weigth`)"
            ),
            format!("{d}: missing tensor `backbone.layers.0.mixer.D` of shape [8]"),
            format!(
                "{d}: unexpected tensor `backbone.norm_f.weigth` (not a parameter of the model)"
            ),
        ]
    );
    // load_params reports the same problems and loads nothing.
    assert_eq!(ck.load_params(&g).unwrap_err().len(), 3);
}

#[test]
fn every_problem_is_reported_at_once() {
    let t = TempDir::new("many");
    let p = t.path("m.safetensors");
    let header = r#"{"w":{"dtype":"F32","shape":[3,2],"data_offsets":[0,24]},"ids":{"dtype":"I32","shape":[2],"data_offsets":[24,32]},"extra":{"dtype":"F16","shape":[1],"data_offsets":[32,34]}}"#;
    raw(&p, header, &[0u8; 34]);
    let ck = Checkpoint::open(&p).unwrap();
    let g = graph(&[("w", &[2, 3]), ("ids", &[2]), ("gone", &[1])]);
    let d = p.display();
    assert_eq!(
        messages(&ck.check(&g).unwrap_err()),
        [
            format!("{d}: tensor `w` has shape [3, 2], the model expects [2, 3]"),
            format!("{d}: tensor `ids` has unsupported dtype I32 (supported: F64, F32, F16, BF16)"),
            format!("{d}: missing tensor `gone` of shape [1]"),
            format!("{d}: unexpected tensor `extra` (not a parameter of the model)"),
        ]
    );
    assert_eq!(
        ck.to_f32("ids").unwrap_err().to_string(),
        format!("{d}: tensor `ids` has unsupported dtype I32 (supported: F64, F32, F16, BF16)")
    );
    assert_eq!(
        ck.to_array("nope").unwrap_err().to_string(),
        format!("{d}: no tensor `nope`")
    );
}

#[test]
fn symbolic_parameter_shapes_are_reported() {
    let t = TempDir::new("sym");
    let p = t.path("m.safetensors");
    save_f32(&p, &[("w".into(), vec![2], vec![0.0; 2])]).unwrap();
    let mut g = Graph::new("sym");
    let ty = TensorType::new(DType::F32, vec![Dim::sym("B")]);
    let op = Op::Param {
        name: "w".into(),
        ty,
        init: Init::Zeros,
    };
    g.add(op, &[], Span::default(), None).unwrap();
    let errs = Checkpoint::open(&p).unwrap().check(&g).unwrap_err();
    assert_eq!(
        messages(&errs)[0],
        "parameter `w` has the symbolic shape [B]; weights need known sizes"
    );
}

// ---- corrupt files ----

#[test]
fn file_shorter_than_8_bytes() {
    let t = TempDir::new("short");
    let p = t.path("m.safetensors");
    std::fs::write(&p, [1u8, 2, 3, 4, 5]).unwrap();
    assert_eq!(
        open_err(&p),
        format!(
            "{}: file is 5 bytes, too short for a safetensors file (at least 8)",
            p.display()
        )
    );
}

#[test]
fn header_length_past_end_of_file() {
    let t = TempDir::new("hlen");
    let p = t.path("m.safetensors");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}            ");
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(
        open_err(&p),
        format!(
            "{}: header length 1000 runs past the end of the file (8 + 1000 > 22 bytes)",
            p.display()
        )
    );
}

#[test]
fn header_not_json_or_not_utf8() {
    let t = TempDir::new("json");
    let p = t.path("m.safetensors");
    raw(&p, "{not json", &[]);
    assert_eq!(
        open_err(&p),
        format!(
            "{}: header is not valid json (key must be a string at line 1 column 2)",
            p.display()
        )
    );
    raw(&p, "[1, 2]", &[]);
    assert_eq!(
        open_err(&p),
        format!(
            "{}: header is not valid json (the header is not a json object)",
            p.display()
        )
    );
    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'{', 0xff, b'}', b' ']);
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(
        open_err(&p),
        format!(
            "{}: header is not valid utf-8 (invalid utf-8 sequence of 1 bytes from index 1)",
            p.display()
        )
    );
}

#[test]
fn truncated_file() {
    let t = TempDir::new("trunc");
    let p = t.path("m.safetensors");
    save_f32(&p, &[("w".into(), vec![2, 3], vec![1.0; 6])]).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
    assert_eq!(
        open_err(&p),
        format!(
            "{}: file is truncated: the header describes 24 bytes of tensor data, the file holds 20",
            p.display()
        )
    );
}

#[test]
fn offsets_out_of_range() {
    let t = TempDir::new("range");
    let p = t.path("m.safetensors");
    raw(
        &p,
        r#"{"w":{"dtype":"F32","shape":[6],"data_offsets":[1000,1024]}}"#,
        &[0; 24],
    );
    assert_eq!(
        open_err(&p),
        format!(
            "{}: tensor `w` data offsets [1000, 1024] are out of range (the data section has 24 bytes)",
            p.display()
        )
    );
}

#[test]
fn overlapping_and_uncovered_offsets() {
    let t = TempDir::new("overlap");
    let p = t.path("m.safetensors");
    raw(
        &p,
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        &[0; 24],
    );
    assert_eq!(
        open_err(&p),
        format!(
            "{}: tensor `b` data offsets [8, 24] overlap tensor `a` [0, 16]",
            p.display()
        )
    );
    raw(
        &p,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#,
        &[0; 24],
    );
    assert_eq!(
        open_err(&p),
        format!("{}: data bytes 8..16 belong to no tensor", p.display())
    );
    raw(
        &p,
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 12],
    );
    assert_eq!(
        open_err(&p),
        format!("{}: data bytes 8..12 belong to no tensor", p.display())
    );
}

#[test]
fn bytes_not_shape_times_dtype() {
    let t = TempDir::new("size");
    let p = t.path("m.safetensors");
    raw(
        &p,
        r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
        &[0; 20],
    );
    assert_eq!(
        open_err(&p),
        format!(
            "{}: tensor `w` has 20 bytes of data, but shape [2, 3] of F32 needs 24",
            p.display()
        )
    );
}

#[test]
fn unknown_dtype_and_malformed_entries() {
    let t = TempDir::new("entries");
    let p = t.path("m.safetensors");
    raw(
        &p,
        r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}"#,
        &[0; 1],
    );
    assert_eq!(
        open_err(&p),
        format!("{}: tensor `w` has unknown dtype `Q4`", p.display())
    );
    raw(&p, r#"{"w":{"dtype":"F32","shape":[2]}}"#, &[0; 8]);
    assert_eq!(
        open_err(&p),
        format!(
            "{}: tensor `w`: `data_offsets` is missing or not two non-negative integers",
            p.display()
        )
    );
    raw(
        &p,
        r#"{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert_eq!(
        open_err(&p),
        format!(
            "{}: tensor `w`: `shape` is missing or not a list of non-negative integers",
            p.display()
        )
    );
    // Known but unsupported dtypes open fine and fail the model check.
    raw(
        &p,
        r#"{"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#,
        &[0; 2],
    );
    let errs = Checkpoint::open(&p)
        .unwrap()
        .check(&graph(&[("w", &[2])]))
        .unwrap_err();
    assert_eq!(
        messages(&errs),
        [format!(
            "{}: tensor `w` has unsupported dtype F8_E4M3 (supported: F64, F32, F16, BF16)",
            p.display()
        )]
    );
}

#[test]
fn directory_without_safetensors() {
    let t = TempDir::new("nodir");
    std::fs::write(t.path("pytorch_model.bin"), b"pickle").unwrap();
    let e = Checkpoint::open(&t.0).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: no safetensors weights (neither `model.safetensors` nor `model.safetensors.index.json`)",
            t.0.display()
        )
    );
    assert!(e.help().unwrap().contains("pytorch_model.bin"));
    let e = Checkpoint::open(&t.path("absent.safetensors")).unwrap_err();
    assert!(matches!(e, WeightsError::Io { action: "open", .. }), "{e}");
}

// ---- hub resolution (no network: offline, or fully cached) ----

/// Lays out a hub cache entry like hf-hub and huggingface_hub do.
fn cache_repo(cache: &Path, repo: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), "0123abcd").unwrap();
    let snap = root.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    for (name, bytes) in files {
        std::fs::write(snap.join(name), bytes).unwrap();
    }
    snap
}

#[test]
fn resolve_offline_and_cached() {
    let t = TempDir::new("hub");
    let cache = hf_hub::Cache::new(t.0.clone());

    // An existing path is returned as is.
    let local = t.path("local.safetensors");
    std::fs::write(&local, b"x").unwrap();
    assert_eq!(resolve(local.to_str().unwrap()).unwrap(), local);
    assert_eq!(
        resolve_with(local.to_str().unwrap(), true, &cache).unwrap(),
        local
    );

    let e = resolve_with("state-spaces/mamba-130m-hf", true, &cache).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`state-spaces/mamba-130m-hf` is not in the Hugging Face cache (HF_HUB_OFFLINE=1)"
    );
    assert_eq!(
        e.help().unwrap(),
        format!(
            "looked for `config.json` in the cache at {}; run once without HF_HUB_OFFLINE to download it, or point HF_HUB_CACHE or HF_HOME at another cache",
            t.0.display()
        )
    );

    let e = resolve_with("./absent.safetensors", false, &cache).unwrap_err();
    assert_eq!(
        e.to_string(),
        "./absent.safetensors: cannot open: entity not found"
    );

    let e = resolve_with("not/a/repo", true, &cache).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`not/a/repo` is not a file, a directory or a Hugging Face repo id (owner/name)"
    );

    // Single file, cached.
    let snap = cache_repo(
        &t.0,
        "org/tiny-hf",
        &[("config.json", b"{}"), ("model.safetensors", b"")],
    );
    assert_eq!(resolve_with("org/tiny-hf", true, &cache).unwrap(), snap);
    // Online, a fully cached repo needs no network.
    assert_eq!(resolve_with("org/tiny-hf", false, &cache).unwrap(), snap);

    // Sharded, one shard missing.
    let index = br#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
    let snap = cache_repo(
        &t.0,
        "org/sharded",
        &[
            ("config.json", b"{}"),
            ("model.safetensors.index.json", index),
            ("model-00001-of-00002.safetensors", b""),
        ],
    );
    let e = resolve_with("org/sharded", true, &cache).unwrap_err();
    assert!(
        e.help()
            .unwrap()
            .starts_with("looked for `model-00002-of-00002.safetensors`"),
        "{:?}",
        e.help()
    );
    std::fs::write(snap.join("model-00002-of-00002.safetensors"), b"").unwrap();
    assert_eq!(resolve_with("org/sharded", true, &cache).unwrap(), snap);

    // Pickle only (the state-spaces/* repos).
    cache_repo(
        &t.0,
        "state-spaces/mamba-130m",
        &[("config.json", b"{}"), ("pytorch_model.bin", b"")],
    );
    let e = resolve_with("state-spaces/mamba-130m", true, &cache).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`state-spaces/mamba-130m` has no safetensors weights (it has `pytorch_model.bin`)"
    );
    assert_eq!(
        e.help().unwrap(),
        "ma2mba reads only safetensors; try `state-spaces/mamba-130m-hf`, the same weights in the Hugging Face transformers format"
    );
}

// ---- robustness ----

fn valid_file() -> &'static [u8] {
    static FILE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let t = TempDir::new("fuzzseed");
        let p = t.path("m.safetensors");
        save_f32(
            &p,
            &[
                ("a".into(), vec![2, 2], vec![1.0; 4]),
                ("b".into(), vec![3], vec![2.0; 3]),
            ],
        )
        .unwrap();
        std::fs::read(p).unwrap()
    })
}

proptest! {
    #[test]
    fn parse_never_panics_on_mutations(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = valid_file().to_vec();
        for (i, b) in edits {
            let i = i % bytes.len();
            bytes[i] = b;
        }
        let cut = cut % (bytes.len() + 1);
        let _ = parse(Path::new("m.safetensors"), &bytes[..cut]);
        let _ = parse(Path::new("m.safetensors"), &bytes);
    }

    #[test]
    fn parse_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse(Path::new("m.safetensors"), &bytes);
    }
}
