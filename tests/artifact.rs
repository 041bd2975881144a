//! Artifacts (`.m2pack`): a manifest built from a lowered graph round-trips through the file
//! format, `ma2mba inspect` prints its schedule, memory plan and checkpoint plan, damaged
//! files give clear errors (never a panic), and the GPU commands say how to build them in a
//! build without the features. With `--features nvptx`, `ma2mba compile` writes real PTX.

mod common;

use common::cli;
use ma2mba::artifact::{self, Artifact, ModelInfo, Request};
use std::path::PathBuf;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ma2mba-artifact-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An artifact of `tiny-mamba2` with a stand-in code generator (one fake entry per distinct
/// kernel), so the format is tested without LLVM.
fn fake(train: bool, budget: Option<u64>) -> Artifact {
    let g = common::compile_name("tiny-mamba2").graph;
    let model = ModelInfo {
        name: g.name.clone(),
        source: "tiny-mamba2".into(),
        config_file: None,
        config: artifact::config_values("tiny-mamba2", None),
        params: g.param_count().unwrap(),
    };
    let req = Request {
        target: "sm_90".into(),
        batch: 2,
        seq: 16,
        train,
        budget,
    };
    artifact::build(&g, model, &req, |ks| {
        let entries: Vec<String> = (0..ks.len()).map(|i| format!("k{i}")).collect();
        let text = entries
            .iter()
            .map(|e| format!(".entry {e}() {{ ret; }}\n"))
            .collect();
        Ok((text, entries))
    })
    .unwrap()
}

#[test]
fn round_trip_and_inspect() {
    for (train, budget) in [(false, None), (true, None), (true, Some(1 << 30))] {
        let a = fake(train, budget);
        let m = &a.manifest;
        assert!(!m.kernels.is_empty() && !m.steps.is_empty());
        assert!(m.peak > 0);
        assert_eq!(m.symbols, vec![("B".into(), 2), ("L".into(), 16)]);
        assert!(
            m.model.config.contains_key("n_layer"),
            "{:?}",
            m.model.config
        );
        // Layers repeat kernels: fewer distinct entries than kernels.
        assert!(
            m.ptx.entries.len() < m.kernels.len(),
            "{} entries for {} kernels",
            m.ptx.entries.len(),
            m.kernels.len()
        );
        assert_eq!(m.checkpoint.is_some(), budget.is_some());
        let back = Artifact::from_bytes(&a.to_bytes()).unwrap();
        assert_eq!(back, a);
        // The manifest is plain JSON.
        let text = String::from_utf8(a.to_bytes()).unwrap();
        let json_start = text.find('{').unwrap();
        let v: serde_json::Value = serde_json::Deserializer::from_str(&text[json_start..])
            .into_iter::<serde_json::Value>()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(v["model"]["name"], "tiny-mamba2");

        let path = dir().join(format!("t-{train}-{}.m2pack", budget.is_some()));
        a.write(&path).unwrap();
        let o = cli(&["inspect", path.to_str().unwrap()]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let s = &o.stdout;
        assert!(s.contains("tiny-mamba2"), "{s}");
        assert!(s.contains("memory plan"), "{s}");
        assert!(s.contains(&format!("{} bytes", m.peak)), "{s}");
        assert!(s.contains("largest buffers:"), "{s}");
        assert!(s.contains(&m.kernels[0].name), "{s}");
        assert!(s.contains(" matmul "), "{s}");
        assert!(
            s.contains(&format!("schedule: {} steps", m.steps.len())),
            "{s}"
        );
        if budget.is_some() {
            assert!(s.contains("checkpoint plan for 1.07 GB: "), "{s}");
        } else {
            assert!(s.contains("checkpoint plan: none"), "{s}");
        }
        if train {
            assert!(s.contains("training graph"), "{s}");
            assert!(m.outputs.iter().any(|(n, _)| n == "loss"));
        }
        let o = cli(&["inspect", path.to_str().unwrap(), "--json"]);
        assert_eq!(o.code, 0);
        let parsed: artifact::Manifest = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(&parsed, m);
        let o = cli(&["inspect", path.to_str().unwrap(), "--max-steps", "3"]);
        assert!(o.stdout.contains("more steps"), "{}", o.stdout);
    }
}

#[test]
fn damaged_files_give_clear_errors() {
    let a = fake(false, None);
    let bytes = a.to_bytes();
    let d = dir();
    let check = |name: &str, data: &[u8], want: &str| {
        let p = d.join(name);
        std::fs::write(&p, data).unwrap();
        let o = cli(&["inspect", p.to_str().unwrap()]);
        assert_eq!(o.code, 1, "{name}: {}", o.stdout);
        assert!(o.stderr.contains(want), "{name}: {}", o.stderr);
        assert!(o.stderr.contains(name), "{name}: {}", o.stderr);
    };
    check("empty.m2pack", b"", "not a ma2mba artifact");
    check("text.m2pack", b"hello world\n", "not a ma2mba artifact");
    check("v9.m2pack", b"ma2mba-pack 9\n", "format version 9");
    check("hdr.m2pack", b"ma2mba-pack 2\n", "truncated");
    check(
        "bad-hdr.m2pack",
        b"ma2mba-pack 2\nmanifest x ptx 1 fnv1a64 0\n",
        "header",
    );
    // Cut anywhere past the header: truncated.
    let header_end = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(1)
        .unwrap()
        .0;
    for cut in [header_end + 1, header_end + 100, bytes.len() - 1] {
        check("cut.m2pack", &bytes[..cut], "truncated");
    }
    let mut extra = bytes.clone();
    extra.extend_from_slice(b"junk");
    check("extra.m2pack", &extra, "trailing data");
    // One byte flipped in the manifest: the checksum says so.
    let mut flipped = bytes.clone();
    flipped[header_end + 10] ^= 0x20;
    check("flip.m2pack", &flipped, "checksum");
    // A well-formed file whose manifest points nowhere: a clear error.
    let mut bad = a.clone();
    bad.manifest.steps.push(artifact::StepInfo::Kernel {
        kernel: 10_000,
        bufs: vec![],
        node: "%0".into(),
    });
    check("dangling.m2pack", &bad.to_bytes(), "launches kernel 10000");
    let mut bad = a.clone();
    bad.manifest.kernels[0].entry = "nope".into();
    check("entry.m2pack", &bad.to_bytes(), "entry `nope`");
    // Valid JSON of the wrong shape.
    let ptx = b"";
    let manifest = b"{\"format\": 1}";
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in manifest.iter().chain(ptx.iter()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut f = format!(
        "ma2mba-pack 2\nmanifest {} ptx 0 fnv1a64 {h:016x}\n",
        manifest.len()
    )
    .into_bytes();
    f.extend_from_slice(manifest);
    check("shape.m2pack", &f, "manifest: missing field");
    let o = cli(&["inspect", "/nonexistent/x.m2pack"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("/nonexistent/x.m2pack"), "{}", o.stderr);
}

#[test]
fn compile_checks_its_arguments() {
    let out = dir().join("args.m2pack");
    let o = cli(&[
        "compile",
        "tiny-mamba2",
        "--seq",
        "16",
        "--budget",
        "1GiB",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 2, "--budget needs --train: {}", o.stderr);
    let o = cli(&[
        "compile",
        "tiny-mamba2",
        "--seq",
        "16",
        "--target",
        "sm_70",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("sm_90"), "{}", o.stderr);
}

#[cfg(not(feature = "nvptx"))]
#[test]
fn compile_without_nvptx_says_how_to_build() {
    let out = dir().join("none.m2pack");
    let o = cli(&[
        "compile",
        "tiny-mamba2",
        "--seq",
        "16",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("built without the nvptx feature: rebuild with --features nvptx"),
        "{}",
        o.stderr
    );
    assert!(!out.exists());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn device_cuda_without_the_feature_says_how_to_build() {
    let d = dir();
    let data = d.join("ids.txt");
    std::fs::write(&data, "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18").unwrap();
    for args in [
        vec![
            "run",
            "tiny-mamba2",
            "--tokens",
            "1 2 3",
            "--device",
            "cuda",
        ],
        vec![
            "train",
            "tiny-mamba2",
            "--data",
            data.to_str().unwrap(),
            "--seq-len",
            "4",
            "--batch",
            "1",
            "--steps",
            "1",
            "--device",
            "cuda",
        ],
    ] {
        let o = cli(&args);
        assert_eq!(o.code, 1, "{args:?}");
        assert!(
            o.stderr.contains("built without the cuda feature")
                && o.stderr.contains("--features cuda"),
            "{args:?}: {}",
            o.stderr
        );
    }
}

/// `train --budget --device cuda` runs the checkpointed stages on the GPU: without the
/// feature it says how to build; with it and no GPU, it says there is no device (the
/// GPU run itself is in tests/gpu.rs).
#[test]
fn train_with_a_budget_on_cuda_needs_the_feature_and_a_gpu() {
    let d = dir();
    let data = d.join("ids2.txt");
    std::fs::write(&data, "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18").unwrap();
    let o = cli(&[
        "train",
        "tiny-mamba2",
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "4",
        "--batch",
        "1",
        "--steps",
        "1",
        "--budget",
        "1GiB",
        "--device",
        "cuda",
    ]);
    if cfg!(feature = "cuda") {
        if o.code != 0 {
            assert!(o.stderr.contains("CUDA"), "{}", o.stderr);
        }
    } else {
        assert_eq!(o.code, 1);
        assert!(o.stderr.contains("--features cuda"), "{}", o.stderr);
    }
}

/// The real thing: PTX from the NVPTX backend, validated by ptxas when it is installed.
#[cfg(feature = "nvptx")]
#[test]
fn compile_writes_ptx_and_inspect_reads_it() {
    let out = dir().join("real.m2pack");
    let o = cli(&[
        "compile",
        "tiny-mamba2",
        "--seq",
        "64",
        "--batch",
        "2",
        "--train",
        "--budget",
        "1GiB",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("distinct PTX entries"), "{}", o.stdout);
    let a = Artifact::read(&out).unwrap();
    assert!(a.ptx.contains(".entry"));
    for e in &a.manifest.ptx.entries {
        assert!(a.ptx.contains(&format!(".entry {e}(")), "{e}");
    }
    assert_eq!(a.manifest.target, "sm_90");
    assert!(a.manifest.checkpoint.is_some());
    let o = cli(&["inspect", out.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("checkpoint plan for"), "{}", o.stdout);
    // ptxas, where installed (CI), accepts the module.
    let ptx = dir().join("real.ptx");
    std::fs::write(&ptx, &a.ptx).unwrap();
    if let Ok(st) = std::process::Command::new("ptxas")
        .args(["-arch=sm_90", "-o", "/dev/null"])
        .arg(&ptx)
        .status()
    {
        assert!(st.success(), "ptxas rejected the artifact's PTX");
    }
}

/// The schedule the runtime rebuilds from a manifest alone matches the compiler's: every
/// step's buffers, kernel launch sizes (grid points at the artifact's sizes times the
/// threads that share a point), product shapes, buffer kinds and the memory plan.
#[test]
fn the_schedule_rebuilt_from_the_manifest_matches_the_compilers() {
    for train in [false, true] {
        let a = fake(train, None);
        let (l, plan, sizes) = a.schedule().unwrap();
        assert_eq!(sizes, vec![2, 16]);
        let g = common::compile_name("tiny-mamba2").graph;
        let g = if train {
            passes::training_graph(&g, "logits", -100).unwrap().graph
        } else {
            g
        };
        let opts = passes::LowerOptions::default().on_gpu();
        let want = passes::lower(&g, &opts).unwrap();
        let bind = |s: &str| match s {
            "B" => Some(2),
            "L" => Some(16),
            _ => None,
        };
        let want_plan = passes::plan_memory(&want, &bind).unwrap();
        assert_eq!(plan, want_plan);
        assert_eq!(l.steps.len(), want.steps.len());
        assert_eq!(l.outputs, want.outputs);
        for (b, w) in l.buffers.iter().zip(&want.buffers) {
            assert_eq!((&b.kind, b.dtype), (&w.kind, w.dtype));
        }
        for (i, (s, w)) in l.steps.iter().zip(&want.steps).enumerate() {
            match (s, w) {
                (
                    passes::Step::Kernel { kernel, bufs, node },
                    passes::Step::Kernel {
                        kernel: wk,
                        bufs: wb,
                        node: wn,
                    },
                ) => {
                    assert_eq!((bufs, node), (wb, wn), "step {i}");
                    let k = &want.kernels[*wk];
                    let points: i64 = k
                        .grid
                        .iter()
                        .map(|e| ir::kernel::eval::extent(e, &sizes).unwrap().unwrap())
                        .product();
                    let tpp = i64::from(ir::lanes::threads_per_point(k));
                    let per = i64::from(ir::lanes::points_per_thread(k));
                    // A tiled kernel stays one (a block per point); others are flat grids
                    // of the threads to launch.
                    let tiled = ir::tile::is_tiled(k);
                    assert_eq!(ir::tile::is_tiled(&l.kernels[*kernel]), tiled);
                    let launch = if tiled {
                        points
                    } else {
                        (points + per - 1) / per * tpp
                    };
                    assert_eq!(
                        l.kernels[*kernel].grid,
                        vec![ir::kernel::IExpr::Const(launch)]
                    );
                    assert_eq!(l.kernels[*kernel].name, a.manifest.kernels[*wk].entry);
                    assert_eq!(l.kernels[*kernel].bufs, k.bufs);
                }
                (
                    passes::Step::MatMul {
                        lhs,
                        rhs,
                        out,
                        batch,
                        m,
                        k,
                        n,
                        ..
                    },
                    passes::Step::MatMul {
                        lhs: wl,
                        rhs: wr,
                        out: wo,
                        batch: wb,
                        m: wm,
                        k: wk,
                        n: wn,
                        ..
                    },
                ) => {
                    assert_eq!((lhs, rhs, out), (wl, wr, wo), "step {i}");
                    assert_eq!(batch.eval(&|_| None), wb.eval(&bind), "step {i}");
                    for (d, w) in [(m, wm), (k, wk), (n, wn)] {
                        assert_eq!(d.as_known(), w.eval(&bind), "step {i}");
                    }
                }
                _ => panic!("step {i}: kinds differ"),
            }
        }
    }
}

/// A tiled kernel's stand-in in the rebuilt schedule launches as the compiled kernel does: a
/// block per grid point (the manifest's thread count) with the manifest's shared memory.
#[test]
fn tiled_kernels_keep_their_shared_memory_in_the_rebuilt_schedule() {
    let mut a = fake(false, None);
    let k = &mut a.manifest.kernels[0];
    let block = u64::from(ir::tile::TILE_THREADS);
    k.threads_per_point = ir::tile::TILE_THREADS;
    k.threads = Some(7 * block);
    k.shared_bytes = 90_112;
    let (l, _, _) = a.schedule().unwrap();
    let stub = &l.kernels[0];
    assert_eq!(ir::tile::shared_bytes(stub), 90_112);
    assert_eq!(ir::lanes::threads_per_point(stub), ir::tile::TILE_THREADS);
    assert_eq!(stub.grid, vec![ir::kernel::IExpr::Const(7)]);
    // A damaged size is refused, not launched.
    a.manifest.kernels[0].shared_bytes = 10;
    assert!(a.schedule().unwrap_err().contains("shared memory"));
}
