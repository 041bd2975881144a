//! Writing concrete dimensions back in the user's terms for diagnostics: `3072` becomes
//! `2*E` when `E = 1536` is a binding in scope, so a shape mismatch reads
//! `[B, L, 2*E] vs [B, L, E]`.

use ir::Dim;

pub struct DimNamer<'a> {
    /// Integer bindings in binding order; later bindings are preferred.
    ints: &'a [(String, i64)],
}

impl<'a> DimNamer<'a> {
    pub fn new(ints: &'a [(String, i64)]) -> DimNamer<'a> {
        DimNamer { ints }
    }

    /// The name of `n`, or `k*name` for a small multiple `k`; values below 3 stay numbers
    /// (too many names would match them).
    fn name(&self, n: u64) -> Option<String> {
        if n < 3 {
            return None;
        }
        let exact = self
            .ints
            .iter()
            .rev()
            .find(|(_, v)| *v as u64 == n && *v > 0);
        if let Some((name, _)) = exact {
            return Some(name.clone());
        }
        for k in 2..=8u64 {
            if !n.is_multiple_of(k) {
                continue;
            }
            let base = n / k;
            if base < 3 {
                break;
            }
            if let Some((name, _)) = self
                .ints
                .iter()
                .rev()
                .find(|(_, v)| *v > 0 && *v as u64 == base)
            {
                return Some(format!("{k}*{name}"));
            }
        }
        None
    }

    pub fn dim(&self, d: &Dim) -> String {
        match d.as_known().and_then(|n| self.name(n)) {
            Some(name) => name,
            None => d.to_string(),
        }
    }

    pub fn shape(&self, s: &[Dim]) -> String {
        let dims: Vec<String> = s.iter().map(|d| self.dim(d)).collect();
        format!("[{}]", dims.join(", "))
    }

    /// `where E = 1536, d_model = 768` for the names used in writing `shapes`.
    pub fn note(&self, shapes: &[&[Dim]]) -> Option<String> {
        let mut used: Vec<String> = Vec::new();
        for s in shapes {
            for d in s.iter() {
                let Some(n) = d.as_known() else { continue };
                let Some(name) = self.name(n) else { continue };
                let base = name.rsplit('*').next().unwrap_or(&name).to_string();
                if let Some((_, v)) = self.ints.iter().rev().find(|(k, _)| *k == base) {
                    let item = format!("{base} = {v}");
                    if !used.contains(&item) {
                        used.push(item);
                    }
                }
            }
        }
        (!used.is_empty()).then(|| format!("where {}", used.join(", ")))
    }
}
