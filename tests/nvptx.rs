//! The NVPTX backend on whole models: the forward and training graphs of the tiny presets and
//! of the 130m models lower to kernels that all compile to PTX `.entry` kernels, which ptxas
//! assembles for sm_90 (and one model for the sm_80 fallback).
//!
//! ptxas comes from `PATH` (.ci/run installs it from the CUDA compiler wheel). Without it the
//! assembly step is skipped with a line saying so, except under `CI=true`, where a missing
//! ptxas fails the test.
#![cfg(feature = "nvptx")]

mod common;

use codegen::nvptx::{Ptx, Target, compile_lowered};
use passes::LowerOptions;
use std::path::PathBuf;
use std::process::Command;

fn ptxas() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
}

/// Assembles `ptx` with ptxas for its target; skips (or fails under CI) without ptxas.
fn assemble(what: &str, ptx: &Ptx) {
    let Some(ptxas) = ptxas() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("ptxas is not on PATH: CI must install it (.ci/run) to validate the PTX");
        }
        eprintln!(
            "skipped: ptxas is not on PATH, {what}: PTX generated but not assembled \
             (install it as .ci/run does)"
        );
        return;
    };
    let stem = what.replace([' ', '/'], "_");
    let dir = std::env::temp_dir().join(format!("ma2mba-ptx-{}-{stem}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("{stem}.ptx"));
    std::fs::write(&file, &ptx.text).expect("write ptx");
    let out = Command::new(&ptxas)
        .arg(format!("-arch={}", ptx.target.arch()))
        .arg(&file)
        .arg("-o")
        .arg(dir.join(format!("{stem}.cubin")))
        .output()
        .expect("run ptxas");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{what}: ptxas -arch={} failed:\n{}",
        ptx.target.arch(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Lowers `graph`, compiles every kernel to PTX and checks each is an `.entry`.
fn compile_graph(what: &str, graph: &ir::Graph, target: Target) -> Ptx {
    compile_graph_with(what, graph, target, &LowerOptions::default())
}

/// [`compile_graph`] lowered with `opts`.
fn compile_graph_with(what: &str, graph: &ir::Graph, target: Target, opts: &LowerOptions) -> Ptx {
    let l = passes::lower(graph, opts).unwrap_or_else(|e| panic!("{what}: lowering: {e}"));
    let started = std::time::Instant::now();
    let ptx = compile_lowered(&l, target).unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!(
        "{what}: {} kernels to {} KB of PTX for {} in {:.2?}",
        l.kernels.len(),
        ptx.text.len() / 1024,
        target.arch(),
        started.elapsed()
    );
    if let Some(dir) = std::env::var_os("MA2MBA_DUMP_PTX") {
        let file = PathBuf::from(dir).join(format!("{}.ptx", what.replace([' ', '/'], "_")));
        std::fs::write(&file, &ptx.text).expect("dump ptx");
    }
    assert_eq!(ptx.entries.len(), l.kernels.len());
    for (k, name) in l.kernels.iter().zip(&ptx.entries) {
        assert!(
            ptx.text.contains(&format!(".entry {name}(")),
            "{what}: kernel `{}` is not an .entry `{name}`",
            k.name
        );
        // The tiled kernels and those with lanes per point also have a 32-bit entry.
        let narrow = format!(".entry {}(", ir::kernel::index32_entry(name));
        assert_eq!(
            ptx.text.contains(&narrow),
            codegen::nvptx::index32_pays(k),
            "{what}: kernel `{}` and its 32-bit entry",
            k.name
        );
    }
    assert!(
        !ptx.text.contains(".func"),
        "{what}: a kernel became a .func (calls are not expected)"
    );
    ptx
}

fn forward_and_training(name: &str) {
    let graph = common::compile_name(name).graph;
    let fwd = compile_graph(&format!("{name} forward"), &graph, Target::Sm90);
    assemble(&format!("{name} forward"), &fwd);
    let tg = passes::training_graph(&graph, "logits", -100)
        .unwrap_or_else(|e| panic!("{name}: training graph: {e}"));
    let train = compile_graph(&format!("{name} training"), &tg.graph, Target::Sm90);
    assemble(&format!("{name} training"), &train);
}

#[test]
fn tiny_mamba_compiles_to_ptx() {
    forward_and_training("tiny-mamba");
}

#[test]
fn tiny_mamba2_compiles_to_ptx() {
    forward_and_training("tiny-mamba2");
}

#[test]
fn mamba_130m_compiles_to_ptx() {
    forward_and_training("mamba-130m");
}

#[test]
fn mamba2_130m_compiles_to_ptx() {
    forward_and_training("mamba2-130m");
}

/// With bf16 activations the GPU runs the SSD forward's output as a tiled kernel per layer
/// (`LowerOptions::on_gpu`): tensor-core products from shared memory; its carry across
/// chunks is tiled too (with any activations); ptxas takes them for both targets.
#[test]
fn mamba2_tiled_ssd_forward_assembles() {
    let graph = common::compile_name("mamba2-130m").graph;
    let opts = LowerOptions {
        bf16_activations: true,
        ..LowerOptions::default()
    }
    .on_gpu();
    let l = passes::lower(&graph, &opts).expect("lowers");
    let tiled = |suffix: &str| {
        l.kernels
            .iter()
            .filter(|k| ir::tile::is_tiled(k) && k.name.ends_with(suffix))
            .count()
    };
    let all = l.kernels.iter().filter(|k| ir::tile::is_tiled(k)).count();
    assert_eq!(tiled("_carry"), 24, "one tiled carry per layer");
    assert_eq!(all, 48, "and one tiled output per layer");
    for target in [Target::Sm90, Target::Sm80] {
        let what = format!("mamba2-130m bf16 forward {}", target.arch());
        let ptx = compile_graph_with(&what, &graph, target, &opts);
        assert!(
            ptx.text
                .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")
        );
        // Launch bounds: 256 threads everywhere; the tiled forward's 90 KB of shared memory
        // let two blocks share an H200's SM (one an A100's), and ptxas is asked to keep
        // registers for them.
        let entries = ptx.text.matches(".entry ").count();
        assert_eq!(ptx.text.matches(".maxntid 256, 1, 1").count(), entries);
        let forward = match target {
            Target::Sm90 => ".minnctapersm 2",
            Target::Sm80 => ".minnctapersm 1",
        };
        assert!(ptx.text.contains(forward), "{what}: no `{forward}`");
        assemble(&what, &ptx);
    }
}

/// The training graph with bf16 activations on the GPU: the gradient's tiled kernel per
/// layer (`dM = dY Xᵀ` on the tensor cores, `M'`, the `dCB` terms and the sums of `dM ⊙ M`
/// in an f32 tile) beside the forward's; ptxas takes both for both targets.
#[test]
fn tiled_ssd_gradient_assembles() {
    let graph = common::tiny_mamba2_chunk16().graph;
    let tg = passes::training_graph(&graph, "logits", -100).expect("training graph");
    let opts = LowerOptions {
        bf16_activations: true,
        ..LowerOptions::default()
    }
    .on_gpu();
    let l = passes::lower(&tg.graph, &opts).expect("lowers");
    let tiled: Vec<&str> = l
        .kernels
        .iter()
        .filter(|k| ir::tile::is_tiled(k))
        .map(|k| k.name.as_str())
        .collect();
    let grads = tiled.iter().filter(|n| n.ends_with("_mask_tiled")).count();
    assert!(grads > 0, "no tiled gradient kernel among {tiled:?}");
    for target in [Target::Sm90, Target::Sm80] {
        let what = format!("tiny-mamba2 bf16 training {}", target.arch());
        let ptx = compile_graph_with(&what, &tg.graph, target, &opts);
        assemble(&what, &ptx);
    }
    // The SSD alone at mamba2-2.7b's sizes (80 heads, P = 64, N = 128, chunks of 128): the
    // tiles of the real shapes fit, and ptxas takes them.
    let ssd = common::ssd_graph((80, 1, 64, 128), 128);
    let what = "ssd 2.7b bf16 sm_90";
    let ptx = compile_graph_with(what, &ssd, Target::Sm90, &opts);
    let grad = ptx.text.matches(".entry ssd_scan_grad_").count();
    assert!(grad > 0 && ptx.text.contains("mma.sync"), "{what}");
    assemble(what, &ptx);
}

#[test]
fn sm_80_fallback_assembles() {
    let graph = common::compile_name("tiny-mamba2").graph;
    let tg = passes::training_graph(&graph, "logits", -100).expect("training graph");
    let ptx = compile_graph("tiny-mamba2 training sm_80", &tg.graph, Target::Sm80);
    assert!(ptx.text.contains(".target sm_80"));
    assemble("tiny-mamba2 training sm_80", &ptx);
}

/// Which kernels run a warp per grid point (`ir::lanes`): the row reductions (norms, the
/// loss over the vocabulary, gradient sums) and the Mamba-2 scan's state loop (the SSD
/// lowered as scans, `LowerOptions::ssd_scans`, as the decode step always is); elementwise
/// kernels keep a thread per point. Warp kernels carry the shuffle and the warp barrier.
#[test]
fn row_reductions_and_state_loops_run_a_warp_per_point() {
    let graph = common::compile_name("mamba2-130m").graph;
    let tg = passes::training_graph(&graph, "logits", -100).expect("training graph");
    let step = passes::step_graph(&graph).expect("step graph");
    for (what, g) in [
        ("forward", &graph),
        ("training", &tg.graph),
        ("step", &step),
    ] {
        let l = passes::lower(g, &LowerOptions::ssd_scans()).expect("lowers");
        let (distinct, _) = ma2mba::artifact::dedupe(&l.kernels);
        let warp: Vec<String> = distinct
            .iter()
            .filter(|k| ir::lanes::threads_per_point(k) > 1)
            .map(|k| format!("{} x{}", k.name, ir::lanes::threads_per_point(k)))
            .collect();
        eprintln!(
            "mamba2-130m {what}: {} of {} distinct kernels share points among lanes: {warp:?}",
            warp.len(),
            distinct.len()
        );
        for k in &distinct {
            let w = ir::lanes::threads_per_point(k) > 1;
            let forward_scan = k
                .name
                .strip_prefix("ssd_scan_")
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
            if (k.name.starts_with("reduce_mean") && !k.name.ends_with("_part")) || forward_scan {
                assert!(w, "{what}: `{}` should run a warp per point", k.name);
            }
            // A reduction's first pass keeps its sum in a local array: a thread per point, so
            // neighbouring points read neighbouring words.
            if k.name.starts_with("causal_conv1d_") || k.name.ends_with("_part") {
                assert!(!w, "{what}: `{}` has no loop lanes could share", k.name);
            }
        }
        let ptx = compile_lowered(&l, Target::Sm90).expect("ptx");
        assert!(ptx.text.contains("shfl.sync.bfly") && ptx.text.contains("bar.warp.sync"));
        assemble(&format!("mamba2-130m {what} warp kernels"), &ptx);
    }
}

/// The matrix form of the Mamba-2 SSD (the default options; the GPU's carries are tiled,
/// `on_gpu`): the carries across chunks and the elementwise kernels keep a thread per point; the gradient's dot products over a head's
/// `P` values and the `<dS_out, S_in>` sums over `P·N` share their loops among lanes.
#[test]
fn ssd_matrix_form_kernels_share_only_their_sums() {
    let graph = common::compile_name("mamba2-130m").graph;
    let tg = passes::training_graph(&graph, "logits", -100).expect("training graph");
    let l = passes::lower(&tg.graph, &LowerOptions::default()).expect("lowers");
    let (distinct, _) = ma2mba::artifact::dedupe(&l.kernels);
    let lanes = |suffix: &str| -> Vec<u32> {
        distinct
            .iter()
            .filter(|k| k.name.starts_with("ssd_scan") && k.name.ends_with(suffix))
            .map(ir::lanes::threads_per_point)
            .collect()
    };
    for suffix in [
        "_carry",
        "_carry_back",
        "_x",
        "_bc",
        "_dy",
        "_mask",
        "_dx",
        "_dbc",
    ] {
        let t = lanes(suffix);
        assert!(!t.is_empty(), "no `{suffix}` kernel");
        assert!(
            t.iter().all(|&t| t == 1),
            "`{suffix}`: {t:?} threads per point"
        );
    }
    for suffix in ["_dots", "_dlast"] {
        let t = lanes(suffix);
        assert!(
            !t.is_empty() && t.iter().all(|&t| t > 1),
            "`{suffix}`: {t:?}"
        );
    }
    // The masks over `[B, chunks, H, Q, Q]` are straight-line: four points per thread share
    // the split into coordinates. Kernels with loops keep one.
    for k in &distinct {
        let per = ir::lanes::points_per_thread(k);
        if k.name.starts_with("ssd_scan") && k.name.ends_with("_mask") {
            assert_eq!(per, ir::lanes::POINTS_PER_THREAD, "`{}`", k.name);
        }
        let loops = k
            .body
            .iter()
            .any(|s| matches!(s, ir::kernel::Stmt::For { .. }));
        if loops || ir::lanes::threads_per_point(k) > 1 {
            assert_eq!(per, 1, "`{}` has loops", k.name);
        }
    }
    let ptx = compile_lowered(&l, Target::Sm90).expect("ptx");
    assemble("mamba2-130m training, the SSD's matrix form", &ptx);
}

/// The optimizer's kernel (`Kernel::adamw`, run by checkpointed GPU training) compiles for
/// both targets and ptxas accepts it: one point per thread, no lanes.
#[test]
fn the_adamw_kernel_assembles() {
    let k = ir::kernel::Kernel::adamw("ma2mba_adamw");
    assert_eq!(ir::lanes::threads_per_point(&k), 1);
    assert_eq!(ir::lanes::points_per_thread(&k), 1);
    for target in [Target::Sm90, Target::Sm80] {
        let ptx = codegen::nvptx::compile_ptx(std::slice::from_ref(&k), target).expect("ptx");
        assert_eq!(ptx.entries.len(), 1);
        assemble(&format!("adamw {target:?}"), &ptx);
    }
}

/// The cross-entropy kernels (a row's classes split across a block's lanes) get a 32-bit
/// entry, unless an index constant does not fit one: an ignore index beyond 2^30 keeps
/// them on i64 (the lowering clamps it to 2^40, where `target - ignore` cannot overflow).
#[test]
fn a_large_ignore_index_keeps_cross_entropy_on_i64() {
    let graph = common::compile_name("tiny-mamba2").graph;
    for (ignore, narrow) in [(-100, true), (1 << 35, false), (i64::MIN, false)] {
        let tg = passes::training_graph(&graph, "logits", ignore).expect("training graph");
        let l = passes::lower(&tg.graph, &LowerOptions::default()).expect("lowers");
        let ce: Vec<_> = l
            .kernels
            .iter()
            .filter(|k| k.name.starts_with("cross_entropy"))
            .collect();
        assert_eq!(ce.len(), 2, "the loss and its gradient");
        for k in ce {
            assert_eq!(
                codegen::nvptx::index32_pays(k),
                narrow,
                "ignore {ignore}: `{}`",
                k.name
            );
            let most = k.max_index_const();
            assert!(most <= 1 << 40, "ignore {ignore}: constant {most}");
        }
    }
}
