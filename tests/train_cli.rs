//! `ma2mba train` on a token file: the loss falls, checkpoints are written atomically and
//! resume the run, and `--carry-state` trains on contiguous streams.

mod common;

fn dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ma2mba-train-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A periodic stream of 5000 u16 tokens in `d/name` (next-token prediction is learnable).
fn periodic(d: &std::path::Path, name: &str) -> std::path::PathBuf {
    let pattern = [5u16, 17, 3, 42, 9, 28, 11];
    let toks: Vec<u8> = pattern
        .iter()
        .cycle()
        .take(5000)
        .flat_map(|t| t.to_le_bytes())
        .collect();
    let data = d.join(name);
    std::fs::write(&data, toks).unwrap();
    data
}

fn loss_lines(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|l| {
            l.split("loss ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn train_learns_saves_and_resumes() {
    let d = dir();
    let data = periodic(&d, "data.u16");
    let ck = d.join("ck.safetensors");
    let bin = env!("CARGO_BIN_EXE_ma2mba");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let data_s = data.to_str().unwrap();
    let ck_s = ck.to_str().unwrap();
    let first = run(&[
        "train",
        "tiny-mamba",
        "--data",
        data_s,
        "--seq-len",
        "24",
        "--batch",
        "4",
        "--steps",
        "80",
        "--lr",
        "5e-3",
        "--log-every",
        "10",
        "--save",
        ck_s,
    ]);
    let losses = loss_lines(&first);
    assert_eq!(losses.len(), 8, "{first}");
    // The summary gives the rate without the first step (which compiles).
    let steady = first
        .lines()
        .find_map(|l| l.split("after the first step ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<f64>().ok());
    assert!(steady.is_some_and(|r| r > 0.0), "{first}");
    assert!(losses[7] < 0.5 * losses[0], "loss did not fall: {losses:?}");
    assert!(ck.exists() && d.join("ck.safetensors.adam.safetensors").exists());
    assert!(
        !std::fs::read_dir(&d).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp"))
    );
    // Resume: the step count continues and the loss starts where it ended.
    let second = run(&[
        "train",
        "tiny-mamba",
        "--data",
        data_s,
        "--seq-len",
        "24",
        "--batch",
        "4",
        "--steps",
        "10",
        "--lr",
        "1e-3",
        "--log-every",
        "10",
        "--resume",
        ck_s,
        "--carry-state",
    ]);
    assert!(second.contains("step     90"), "{second}");
    let resumed = loss_lines(&second);
    assert!(
        resumed[0] < losses[0],
        "resumed loss {resumed:?} vs first {losses:?}"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn train_rejects_bad_input() {
    let out = common::cli(&["train", "tiny-mamba", "--data", "/nonexistent/x.u16"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cannot read"), "{}", out.stderr);
    let d = dir();
    let data = d.join("big.txt");
    std::fs::write(&data, "1 2 3 999 4").unwrap();
    let out = common::cli(&[
        "train",
        "tiny-mamba",
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "2",
    ]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("outside the vocabulary"),
        "{}",
        out.stderr
    );
}

#[test]
fn train_with_a_budget_follows_the_same_losses() {
    // Not under dir(): another test removes that when it ends.
    let d = std::env::temp_dir().join(format!("ma2mba-train-budget-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let pattern = [5u16, 17, 3, 42, 9, 28, 11, 2];
    let toks: Vec<u8> = pattern
        .iter()
        .cycle()
        .take(3000)
        .flat_map(|t| t.to_le_bytes())
        .collect();
    let data = d.join("data.u16");
    std::fs::write(&data, toks).unwrap();
    let bin = env!("CARGO_BIN_EXE_ma2mba");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "tiny-mamba2",
            "--data",
            data.to_str().unwrap(),
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--steps",
            "12",
            "--log-every",
            "4",
        ];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, whole, err) = run(&[]);
    assert_eq!(code, Some(0), "{err}");
    let (code, planned, err) = run(&["--budget", "1.5MB"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        planned.contains("checkpoint plan for 1500000 bytes"),
        "{planned}"
    );
    let (a, b) = (loss_lines(&whole), loss_lines(&planned));
    assert_eq!(a.len(), 3);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-3 * x.abs(), "{a:?} vs {b:?}");
    }
    let (code, _, err) = run(&["--budget", "20kB"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no plan fits in 20.0 kB"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn grad_with_a_budget_matches_the_interpreter() {
    let plain = common::cli(&[
        "grad",
        "tiny-mamba2",
        "--tokens",
        "3 9 27 4 1 8 15 22 6 7 30 2",
    ]);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    let planned = common::cli(&[
        "grad",
        "tiny-mamba2",
        "--tokens",
        "3 9 27 4 1 8 15 22 6 7 30 2",
        "--budget",
        "450kB",
    ]);
    assert_eq!(planned.code, 0, "{}", planned.stderr);
    assert!(
        planned.stdout.contains("checkpoint plan:"),
        "{}",
        planned.stdout
    );
    let loss = |s: &str| -> f64 {
        s.lines()
            .find_map(|l| l.strip_prefix("loss "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let (a, b) = (loss(&plain.stdout), loss(&planned.stdout));
    assert!((a - b).abs() < 1e-5 * a, "{a} vs {b}");
    // Gradient norms agree to the printed digits (f32 vs f64: 5 significant digits).
    let norms = |s: &str| -> Vec<f64> {
        s.lines()
            .filter_map(|l| l.split("|grad| ").nth(1)?.trim().parse().ok())
            .collect()
    };
    let (na, nb) = (norms(&plain.stdout), norms(&planned.stdout));
    assert_eq!(na.len(), nb.len());
    for (x, y) in na.iter().zip(&nb) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1e-6),
            "{na:?} vs {nb:?}"
        );
    }
}

/// `train --activations bf16` learns the periodic stream on the CPU too (bf16 activations,
/// f32 parameters and update), checkpointed under a budget; `bench` refuses the flag where it
/// does not apply.
#[test]
fn bf16_activations_train_and_bench_refuses_them_on_the_cpu() {
    let d = dir();
    let data = periodic(&d, "bf16.u16");
    let bin = env!("CARGO_BIN_EXE_ma2mba");
    let out = std::process::Command::new(bin)
        .args([
            "train",
            "tiny-mamba2",
            "--data",
            data.to_str().unwrap(),
            "--seq-len",
            "24",
            "--batch",
            "4",
            "--steps",
            "60",
            "--lr",
            "1e-2",
            "--log-every",
            "20",
            "--activations",
            "bf16",
            "--budget",
            "50MB",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("bf16 activations"), "{stdout}");
    let losses = loss_lines(&stdout);
    assert!(losses.len() >= 3, "{stdout}");
    assert!(
        losses.iter().all(|l| l.is_finite()) && losses[losses.len() - 1] < 0.5 * losses[0],
        "the loss did not fall: {losses:?}"
    );
    let o = common::cli(&["bench", "--activations", "bf16", "--models", "tiny-mamba"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("--activations is for"), "{}", o.stderr);
}
