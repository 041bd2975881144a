//! `ma2mba train` on a token file: the loss falls, checkpoints are written atomically and
//! resume the run, and `--carry-state` trains on contiguous streams.

mod common;

fn dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ma2mba-train-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
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
    // A periodic stream: next-token prediction is learnable.
    let pattern = [5u16, 17, 3, 42, 9, 28, 11];
    let toks: Vec<u8> = pattern
        .iter()
        .cycle()
        .take(5000)
        .flat_map(|t| t.to_le_bytes())
        .collect();
    let data = d.join("data.u16");
    std::fs::write(&data, toks).unwrap();
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
