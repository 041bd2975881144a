//! Architecture invariant: the crates' dependencies point one way. `ir` depends on no other
//! ma2mba crate; `frontend`, `passes`, `codegen` and `runtime` depend only on `ir`; only the
//! root package ties them together.

use std::collections::BTreeMap;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The ma2mba crates each crate depends on, read from its Cargo.toml.
fn project_deps(dir: &str) -> Vec<String> {
    let path = format!("{ROOT}/{dir}/Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let doc: toml::Table = text.parse().unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut deps = Vec::new();
    for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
        let Some(table) = doc.get(section).and_then(|t| t.as_table()) else {
            continue;
        };
        for (name, _) in table {
            if ["ir", "frontend", "passes", "codegen", "runtime"].contains(&name.as_str())
                || name.starts_with("ma2mba")
            {
                deps.push(name.clone());
            }
        }
    }
    deps.sort();
    deps
}

#[test]
fn crate_dependencies_point_one_way() {
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("ir", &[][..]),
        ("frontend", &["ir"][..]),
        ("passes", &["ir"][..]),
        ("codegen", &["ir"][..]),
        ("runtime", &["ir"][..]),
    ]);
    for (krate, ok) in &allowed {
        for dep in project_deps(krate) {
            assert!(
                ok.contains(&dep.as_str()),
                "{krate}/Cargo.toml depends on `{dep}`; allowed: {ok:?} (see ARCHITECTURE.md)"
            );
        }
    }
    // The workspace lists exactly these crates, so a new crate gets a rule here.
    let text = std::fs::read_to_string(format!("{ROOT}/Cargo.toml")).expect("root Cargo.toml");
    let doc: toml::Table = text.parse().expect("root Cargo.toml parses");
    let members: Vec<&str> = doc["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let mut expected: Vec<&str> = allowed.keys().copied().collect();
    let mut got = members.clone();
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "workspace members changed: add a dependency rule for each"
    );
}

#[test]
fn ir_has_no_heavy_dependencies() {
    let text = std::fs::read_to_string(format!("{ROOT}/ir/Cargo.toml")).expect("ir/Cargo.toml");
    let doc: toml::Table = text.parse().expect("parses");
    let deps: Vec<&String> = doc["dependencies"]
        .as_table()
        .expect("deps")
        .keys()
        .collect();
    for d in deps {
        assert!(
            ["petgraph", "thiserror"].contains(&d.as_str()),
            "ir depends on `{d}`; the IR stays free of IO, CUDA, LLVM and parsing crates"
        );
    }
}
