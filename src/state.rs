//! The recurrent state of a batch of sequences: every layer's conv and ssm state.
//!
//! A [`State`] holds one tensor per state input of the model graph (for the shipped models,
//! `backbone.layers.<i>.mixer.conv_state` and `...ssm_state`), each with the batch as its
//! first axis. It is a plain value: clone it to keep a prefix's state and continue from it
//! several times, [`State::select`] and [`State::concat`] to regroup sequences into batches,
//! [`State::save`] / [`State::load`] to keep it in a safetensors file.

use crate::model::Error;
use std::collections::HashMap;
use std::path::Path;

/// Conv and ssm states of `batch` sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    batch: usize,
    /// Name and shape (batch first) of each tensor, in graph order.
    specs: Vec<(String, Vec<usize>)>,
    data: HashMap<String, Vec<f32>>,
}

impl State {
    /// All-zero states of the given names and shapes (batch first, equal batch sizes).
    pub fn zeros(specs: Vec<(String, Vec<usize>)>) -> State {
        let batch = specs
            .first()
            .and_then(|s| s.1.first().copied())
            .unwrap_or(0);
        let data = specs
            .iter()
            .map(|(n, s)| (n.clone(), vec![0.0; s.iter().product()]))
            .collect();
        State { batch, specs, data }
    }

    /// Builds a state from tensors `(name, shape with the batch first, values)`.
    pub fn from_tensors(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<State, Error> {
        let batch = tensors
            .first()
            .and_then(|t| t.1.first().copied())
            .unwrap_or(0);
        let mut specs = Vec::new();
        let mut data = HashMap::new();
        for (name, shape, v) in tensors {
            if shape.first() != Some(&batch) {
                return Err(Error::Input(format!(
                    "state `{name}` has shape {shape:?}: every state needs the batch ({batch}) as its first axis"
                )));
            }
            if shape.iter().product::<usize>() != v.len() {
                return Err(Error::Input(format!(
                    "state `{name}`: shape {shape:?} holds {} values, the data has {}",
                    shape.iter().product::<usize>(),
                    v.len()
                )));
            }
            if data.insert(name.clone(), v).is_some() {
                return Err(Error::Input(format!("state `{name}` given twice")));
            }
            specs.push((name, shape));
        }
        Ok(State { batch, specs, data })
    }

    /// The number of sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The tensors' names, in graph order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|(n, _)| n.as_str())
    }

    /// The shape (batch first) and values of the tensor `name`.
    pub fn get(&self, name: &str) -> Option<(&[usize], &[f32])> {
        let (_, shape) = self.specs.iter().find(|(n, _)| n == name)?;
        Some((shape, self.data.get(name)?))
    }

    /// The tensors of layer `i` (names containing `layers.<i>.`), in graph order.
    pub fn layer(&self, i: usize) -> Vec<(&str, &[usize], &[f32])> {
        let key = format!("layers.{i}.");
        self.specs
            .iter()
            .filter(|(n, _)| n.contains(&key))
            .map(|(n, s)| (n.as_str(), s.as_slice(), self.data[n].as_slice()))
            .collect()
    }

    /// Every tensor as `(name, shape, values)`, in graph order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        self.specs
            .iter()
            .map(|(n, s)| (n.clone(), s.clone(), self.data[n].clone()))
            .collect()
    }

    /// Sets every value to zero (a fresh start for every sequence).
    pub fn reset(&mut self) {
        for v in self.data.values_mut() {
            v.fill(0.0);
        }
    }

    /// The states of sequences `rows` (in that order; repeats allowed), as a new batch.
    pub fn select(&self, rows: &[usize]) -> Result<State, Error> {
        if let Some(&r) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(Error::Input(format!(
                "sequence {r} is outside the state's batch of {}",
                self.batch
            )));
        }
        let mut specs = Vec::with_capacity(self.specs.len());
        let mut data = HashMap::new();
        for (name, shape) in &self.specs {
            let per: usize = shape[1..].iter().product();
            let src = &self.data[name];
            let mut v = Vec::with_capacity(per * rows.len());
            for &r in rows {
                v.extend_from_slice(&src[r * per..(r + 1) * per]);
            }
            let mut s = shape.clone();
            s[0] = rows.len();
            specs.push((name.clone(), s));
            data.insert(name.clone(), v);
        }
        Ok(State {
            batch: rows.len(),
            specs,
            data,
        })
    }

    /// The state of sequence `b` alone (batch 1).
    pub fn sequence(&self, b: usize) -> Result<State, Error> {
        self.select(&[b])
    }

    /// The states of several batches joined into one, in order.
    pub fn concat(parts: &[State]) -> Result<State, Error> {
        let Some(first) = parts.first() else {
            return Err(Error::Input("no states to join".into()));
        };
        let mut specs = first.specs.clone();
        let mut data: HashMap<String, Vec<f32>> = HashMap::new();
        for p in parts {
            let same = p.specs.len() == first.specs.len()
                && p.specs
                    .iter()
                    .zip(&first.specs)
                    .all(|(a, b)| a.0 == b.0 && a.1[1..] == b.1[1..]);
            if !same {
                return Err(Error::Input(
                    "states of different models (names or shapes differ) cannot be joined".into(),
                ));
            }
        }
        for (name, shape) in specs.iter_mut() {
            let mut v = Vec::new();
            for p in parts {
                v.extend_from_slice(&p.data[name.as_str()]);
            }
            shape[0] = parts.iter().map(|p| p.batch).sum();
            data.insert(name.clone(), v);
        }
        Ok(State {
            batch: parts.iter().map(|p| p.batch).sum(),
            specs,
            data,
        })
    }

    /// Writes every tensor to a safetensors file (f32, atomically).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        runtime::weights::save_f32(path, &self.tensors()).map_err(|e| Error::Weights(vec![e]))
    }

    /// Reads a state written by [`State::save`] (any float dtype is accepted).
    pub fn load(path: &Path) -> Result<State, Error> {
        if !path.is_file() {
            return Err(Error::Input(format!(
                "{}: not a state file (a .safetensors file written by State::save)",
                path.display()
            )));
        }
        let ck = runtime::weights::Checkpoint::open(path).map_err(|e| Error::Weights(vec![e]))?;
        let mut tensors = Vec::new();
        for name in ck.names() {
            let view = ck.get(name).ok_or_else(|| {
                Error::Input(format!("{}: tensor `{name}` vanished", path.display()))
            })?;
            let v = view.to_f32().map_err(|e| Error::Weights(vec![e]))?;
            tensors.push((name.to_string(), view.shape.to_vec(), v));
        }
        if tensors.is_empty() {
            return Err(Error::Input(format!("{}: holds no states", path.display())));
        }
        State::from_tensors(tensors)
    }

    /// Checks that the state has exactly the tensors `specs` (names and shapes).
    pub(crate) fn check(&self, specs: &[(String, Vec<usize>)]) -> Result<(), Error> {
        for (name, shape) in specs {
            match self.specs.iter().find(|(n, _)| n == name) {
                None => {
                    return Err(Error::Input(format!(
                        "the state has no tensor `{name}`: it belongs to another model"
                    )));
                }
                Some((_, s)) if s != shape => {
                    return Err(Error::Input(format!(
                        "state `{name}` has shape {s:?}, the model needs {shape:?}{}",
                        if s[1..] == shape[1..] {
                            " (a different batch size: one token per sequence of the state)"
                        } else {
                            ""
                        }
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some((n, _)) = self
            .specs
            .iter()
            .find(|(n, _)| !specs.iter().any(|(m, _)| m == n))
        {
            return Err(Error::Input(format!(
                "the state has a tensor `{n}` the model does not have"
            )));
        }
        Ok(())
    }

    /// The values by name, for the executor.
    pub(crate) fn map(&self) -> &HashMap<String, Vec<f32>> {
        &self.data
    }

    /// Replaces the values with the final states of a run (same names and shapes); returns
    /// the replaced vectors, for reuse.
    pub(crate) fn update(
        &mut self,
        mut finals: HashMap<String, Vec<f32>>,
    ) -> Result<Vec<(String, Vec<f32>)>, Error> {
        for (name, shape) in &self.specs {
            let v = finals
                .get(name)
                .ok_or_else(|| Error::Input(format!("the run returned no final state `{name}`")))?;
            if v.len() != shape.iter().product::<usize>() {
                return Err(Error::Input(format!(
                    "final state `{name}` has {} values, expected {}",
                    v.len(),
                    shape.iter().product::<usize>()
                )));
            }
        }
        let mut old = Vec::with_capacity(self.specs.len());
        for (name, _) in &self.specs {
            if let Some(v) = finals.remove(name) {
                old.extend(self.data.insert(name.clone(), v).map(|o| (name.clone(), o)));
            }
        }
        Ok(old)
    }
}
