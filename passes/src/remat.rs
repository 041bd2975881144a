//! The rematerialization planner: layer x time checkpointing under a memory budget.
//!
//! # The schedule a plan describes
//!
//! The model is cut into stages ([`crate::stage`]): the embedding, layer groups `groups`, the
//! head. The sequence is cut into segments of `seg_len` tokens (the last may be shorter). A
//! *cell* is one group over one segment. One training step runs:
//!
//! * **forward**, segments in order, groups bottom to top: the embedding, then per group: store
//!   the group's recurrent states (the *sequence checkpoint*), run the group's forward graph,
//!   store its output (the *layer checkpoint*: the next group's or the head's input) and the
//!   values the cell's [`Keep`] saves; the final states carry into the next segment;
//! * **backward**, segments last to first: the head's training graph (loss and its gradients
//!   from the top layer checkpoint), then groups top to bottom: each cell's training graph
//!   recomputes what was not saved from its two checkpoints and back-propagates; the input
//!   gradient goes to the group below, the initial-state gradients to the same group in the
//!   previous segment; the embedding's gradient last (its forward, a gather, is recomputed).
//!
//! # Accounting
//!
//! Every byte comes from the lowered stage graphs: the memory planner's arena peak plus the
//! outputs a run returns, and the types of checkpoints and saved values, with activations
//! priced in `act_dtype` (recurrent states, scan scratch and gradients stay f32). [`simulate`]
//! replays the schedule's allocations and frees and returns the peak; runs of identical
//! segments are collapsed (the live memory changes by the same amount per segment, so a run's
//! peak is at its last segment going forward and its first going back), so pricing a plan is
//! `O(groups)` whatever the sequence length. The CPU executor (`ma2mba::checkpoint`) runs the
//! same schedule and measures the same quantities.
//!
//! # The search
//!
//! Recomputation is what a plan costs: the forward nodes a cell's training graph still runs.
//! [`Keep::Nothing`] recomputes the cell's forward, [`Keep::Gemm`] saves the matrix products'
//! results in the forward pass (most of the FLOPs, a fraction of the bytes), [`Keep::All`]
//! saves everything the backward reads (no recomputation). Cells are given keeps in backward
//! order (the cells processed first hold their saved values for the shortest time): the first
//! `keep_all` cells [`Keep::All`], the next `keep_gemm` [`Keep::Gemm`]. [`plan`] tries every
//! group size and segment length of the candidate sets, fills the budget left by each with
//! keeps (binary search on the simulated peak, the kind with more FLOPs saved per byte first)
//! and returns the plan with the least recomputation (ties: the least memory).

use crate::autodiff::{self, AdError};
use crate::cost;
use crate::lower::{LowerError, LowerOptions, bf16, lower};
use crate::memory::{self, MemoryError};
use crate::stage::{self, Stage, StageError, StageKind};
use ir::schedule::Lowered;
use ir::{DType, Graph, InputKind, NodeId, Op, Value};
use std::collections::HashMap;
use std::ops::Range;

/// What a cell's forward pass saves for its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Keep {
    /// Only the checkpoints: the backward recomputes the cell's forward.
    Nothing,
    /// Matrix-product results too: the backward recomputes norms, convolutions and scans.
    Gemm,
    /// Every value the backward reads: no recomputation.
    All,
}

impl Keep {
    pub fn name(self) -> &'static str {
        match self {
            Keep::Nothing => "nothing",
            Keep::Gemm => "gemm",
            Keep::All => "all",
        }
    }
}

/// What is being planned.
#[derive(Clone, Debug)]
pub struct Request {
    pub batch: u64,
    pub seq: u64,
    /// Bytes available for everything the step holds (see `count_weights`).
    pub budget: Option<u64>,
    /// How activations are stored (checkpoints, saved values, arenas): f32 or bf16. It sets
    /// `lower.bf16_activations`, so the stages are priced as they run.
    pub act_dtype: DType,
    /// Whether weights (f32 master), gradients and AdamW moments count against the budget.
    pub count_weights: bool,
    /// Segment lengths are multiples of this (the SSD chunk), except the last segment.
    pub quantum: u64,
    /// Whether the head also returns the logits (for accuracy during training).
    pub logits: bool,
    /// Whether the runtime copies a run's outputs out of its arena (the CPU executor does,
    /// so both are alive at the end of the run) or hands over buffers of their own (a GPU
    /// runtime).
    pub copy_outputs: bool,
    /// How the stages are lowered (their kernels' scratch depends on it).
    pub lower: LowerOptions,
}

/// Where the bytes of a plan's peak go (at the moment of the peak).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    /// Token ids and targets.
    pub data: u64,
    /// Layer and sequence checkpoints, carried states and state gradients.
    pub checkpoints: u64,
    /// Values kept by [`Keep::Gemm`]/[`Keep::All`] cells.
    pub saved: u64,
    /// The running stage's arena, its outputs and the values passed between stages.
    pub working: u64,
}

impl Breakdown {
    pub fn total(&self) -> u64 {
        self.weights
            + self.gradients
            + self.optimizer
            + self.data
            + self.checkpoints
            + self.saved
            + self.working
    }
}

/// A point on the layer-group x time-segment grid with its price.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `no checkpointing`, `per-layer`, `sqrt(L) groups`, `Ma2mba (memory only)`, `ma2mba`.
    pub strategy: String,
    pub groups: Vec<Range<u32>>,
    pub seg_len: u64,
    pub seq: u64,
    pub batch: u64,
    /// Whether the head returns the logits ([`Request::logits`]).
    pub logits: bool,
    /// How activations are stored ([`Request::act_dtype`]): the stages run lowered so.
    pub act_dtype: DType,
    /// Cells (in backward order) that keep everything, then cells that keep GEMM results.
    pub keep_all: u64,
    pub keep_gemm: u64,
    pub peak: u64,
    pub breakdown: Breakdown,
    /// Recomputed operations per step and the operations of a step without recomputation.
    pub recompute_flops: f64,
    pub step_flops: f64,
}

impl Plan {
    pub fn segments(&self) -> u64 {
        self.seq.div_ceil(self.seg_len.max(1))
    }

    /// The length of segment `t` (the last one may be shorter).
    pub fn segment_len(&self, t: u64) -> u64 {
        let start = t.saturating_mul(self.seg_len);
        self.seq
            .min(start.saturating_add(self.seg_len))
            .saturating_sub(start)
    }

    /// Time ranges of the segments (one allocation per segment: for running a plan, not for
    /// pricing one).
    pub fn segment_ranges(&self) -> Vec<Range<u64>> {
        (0..self.segments())
            .map(|t| t * self.seg_len..((t + 1) * self.seg_len).min(self.seq))
            .collect()
    }

    /// The keep of cell (segment `t`, group `g`).
    pub fn keep(&self, t: u64, g: usize) -> Keep {
        let ng = self.groups.len() as u64;
        let j = (self.segments() - 1 - t) * ng + (ng - 1 - g as u64);
        if j < self.keep_all {
            Keep::All
        } else if j < self.keep_all + self.keep_gemm {
            Keep::Gemm
        } else {
            Keep::Nothing
        }
    }

    pub fn cells(&self) -> u64 {
        self.segments() * self.groups.len() as u64
    }

    /// Recomputation as a percentage of a step's operations.
    pub fn recompute_pct(&self) -> f64 {
        if self.step_flops > 0.0 {
            100.0 * self.recompute_flops / self.step_flops
        } else {
            0.0
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the model has no layers to checkpoint")]
    NoLayers,
    #[error(
        "no plan fits in {}: the smallest needs {} ({plan}); {dominant}",
        human_bytes(*budget),
        human_bytes(*min_bytes)
    )]
    Infeasible {
        budget: u64,
        min_bytes: u64,
        plan: String,
        dominant: String,
    },
    #[error("{0}")]
    Stage(#[from] StageError),
    #[error("{0}")]
    Autodiff(Box<AdError>),
    #[error("{0}")]
    Lower(#[from] LowerError),
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("bad request: {0}")]
    Request(String),
}

impl From<AdError> for PlanError {
    fn from(e: AdError) -> PlanError {
        PlanError::Autodiff(Box::new(e))
    }
}

/// One stage compiled for one keep: the forward graph (with `saved.*` outputs) and the
/// training graph (reading them), both lowered.
#[derive(Clone, Debug)]
pub struct Variant {
    pub keep: Keep,
    pub fwd_graph: Graph,
    pub fwd: Lowered,
    pub train_graph: Graph,
    pub train: Lowered,
    /// Saved values, by their names (`saved.%N`), as outputs of `fwd_graph`.
    pub saved: Vec<String>,
    /// Forward operations of the training graph that the forward pass already did.
    recompute_nodes: Vec<NodeId>,
    /// The training graph before substitution (node ids of `recompute_nodes`).
    full_train: Graph,
}

/// Builds the forward and training graphs of `st` for `keep` (the embedding and the head
/// only support [`Keep::Nothing`]), and lowers them. With `logits`, the head's training
/// graph also returns the logits.
pub fn variant(
    st: &Stage,
    keep: Keep,
    ignore_index: i64,
    logits: bool,
    opts: &LowerOptions,
) -> Result<Variant, PlanError> {
    let head = matches!(st.kind, StageKind::Head).then_some("logits");
    let tg = autodiff::stage_training_graph(&st.graph, head, ignore_index, &st.boundary_inputs)?;
    let nfwd = st.graph.len();
    let train_full = tg.graph;
    // Forward values (of non-leaf nodes) the training graph's backward nodes read.
    let saved: Vec<Value> = match keep {
        Keep::Nothing => Vec::new(),
        Keep::Gemm => st
            .graph
            .nodes()
            .filter(|&n| matches!(st.graph.op(n), Op::MatMul { .. }))
            .map(|n| Value::new(n, 0))
            .collect(),
        Keep::All => {
            // What the backward reads, through views: a reshape, permute, broadcast or slice
            // is recomputed (fused into its readers) from its saved operand; values that do
            // not depend on the sequence (functions of parameters) are recomputed too.
            let per_token = depends_on_time(&st.graph);
            let mut v: Vec<Value> = Vec::new();
            for n in train_full.nodes().skip(nfwd) {
                for o in train_full.operands(n) {
                    let mut o = o;
                    while o.node.index() < nfwd
                        && matches!(
                            train_full.op(o.node),
                            Op::Reshape { .. }
                                | Op::Permute { .. }
                                | Op::Broadcast { .. }
                                | Op::Slice { .. }
                        )
                    {
                        match train_full.operands(o.node).first() {
                            Some(x) => o = *x,
                            None => break,
                        }
                    }
                    let leaf = matches!(
                        train_full.op(o.node),
                        Op::Input { .. } | Op::Param { .. } | Op::Const { .. }
                    );
                    if o.node.index() < nfwd
                        && !leaf
                        && per_token[o.node.index()]
                        && !v.contains(&o)
                    {
                        v.push(o);
                    }
                }
            }
            v.sort();
            v
        }
    };
    let keep_out =
        |name: &str| name == "loss" || name.starts_with("grad.") || (logits && name == "logits");
    let (train_graph, kept) =
        stage::substitute(&train_full, &saved, &keep_out).map_err(StageError::from)?;
    let recompute_nodes = kept.into_iter().filter(|n| n.index() < nfwd).collect();
    let mut fwd_graph = st.graph.clone();
    let mut names = Vec::with_capacity(saved.len());
    for v in &saved {
        let name = stage::saved_name(*v);
        fwd_graph.add_output(name.clone(), *v);
        names.push(name);
    }
    Ok(Variant {
        keep,
        fwd: lower(&fwd_graph, opts)?,
        fwd_graph,
        train: lower(&train_graph, opts)?,
        train_graph,
        saved: names,
        recompute_nodes,
        full_train: train_full,
    })
}

/// Per node: does its value depend on a data input (it varies with the sequence)?
fn depends_on_time(g: &Graph) -> Vec<bool> {
    let mut dep = vec![false; g.len()];
    for n in g.nodes() {
        dep[n.index()] = match g.op(n) {
            Op::Input { .. } => true,
            Op::Param { .. } | Op::Const { .. } => false,
            _ => g.operands(n).iter().any(|v| dep[v.node.index()]),
        };
    }
    dep
}

/// Element size of a buffer when activations are stored as `act` (what
/// [`crate::lower::bf16::keeps_f32`] keeps stays f32; a schedule lowered with bf16 activations
/// already has its dtypes).
fn elem_bytes(l: &Lowered, graph: &Graph, buf: usize, act: DType, f32_names: &[String]) -> u64 {
    let b = &l.buffers[buf];
    if !b.dtype.is_float() || b.dtype.size() <= act.size() {
        return b.dtype.size();
    }
    if bf16::keeps_f32(l, graph, buf, f32_names) {
        b.dtype.size()
    } else {
        act.size()
    }
}

/// Buffer bytes of `l` at batch `batch`, sequence `seq`, activations in `act`.
fn sized(
    l: &Lowered,
    graph: &Graph,
    batch: u64,
    seq: u64,
    act: DType,
) -> Result<Vec<u64>, PlanError> {
    let bind = |s: &str| match s {
        "B" => Some(batch),
        "L" => Some(seq),
        _ => None,
    };
    let mut bytes = memory::buffer_bytes(l, &bind)?;
    let names = bf16::f32_names(graph);
    for (i, b) in bytes.iter_mut().enumerate() {
        let f = l.buffers[i].dtype.size();
        *b = *b / f * elem_bytes(l, graph, i, act, &names);
    }
    Ok(bytes)
}

/// Bytes a run of `l` holds at its peak: the arena plus the outputs it returns (copied out
/// of the arena, or allocated on their own when `copy_outputs` is false).
fn run_bytes(l: &Lowered, bytes: &[u64], copy_outputs: bool) -> Result<u64, PlanError> {
    let mut arena = bytes.to_vec();
    if !copy_outputs {
        // Outputs get buffers of their own (handed over, not copied): the arena holds the rest.
        for (_, b) in &l.outputs {
            arena[*b] = 0;
        }
    }
    let plan = memory::plan_sized(l, arena)?;
    let outs: u64 = l.outputs.iter().map(|(_, b)| bytes[*b]).sum();
    Ok(plan.peak + outs)
}

/// Bytes of the outputs of `l` (buffers sized `bytes`) whose names satisfy `pick`.
fn output_bytes(l: &Lowered, bytes: &[u64], pick: &dyn Fn(&str) -> bool) -> u64 {
    l.outputs
        .iter()
        .filter(|(n, _)| pick(n))
        .map(|(_, b)| bytes[*b])
        .sum()
}

/// The price of one stage variant over a segment of `seq` tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CellCost {
    /// Held while the forward graph runs (arena + outputs).
    pub fwd_run: u64,
    /// Held while the training graph runs (arena + outputs).
    pub train_run: u64,
    /// The layer checkpoint the forward run leaves (its boundary outputs).
    pub out_ckpt: u64,
    /// The values it saves.
    pub saved: u64,
    /// The recurrent states of its layers (one sequence checkpoint).
    pub states: u64,
    pub fwd_flops: f64,
    pub train_flops: f64,
    pub recompute_flops: f64,
}

impl Variant {
    /// The variant's price over `seq` tokens of `batch` sequences.
    pub fn cost(
        &self,
        batch: u64,
        seq: u64,
        act: DType,
        copy_outputs: bool,
    ) -> Result<CellCost, PlanError> {
        let bind = |s: &str| match s {
            "B" => Some(batch),
            "L" => Some(seq),
            _ => None,
        };
        let states: u64 = self
            .fwd_graph
            .nodes()
            .filter_map(|n| match self.fwd_graph.op(n) {
                Op::Input {
                    kind: InputKind::State,
                    ty,
                    ..
                } => ir::types::numel(&ty.shape)
                    .and_then(|d| d.eval(&bind))
                    .map(|e| e * ty.dtype.size()),
                _ => None,
            })
            .sum();
        let fg = &self.fwd_graph;
        let fwd_bytes = sized(&self.fwd, fg, batch, seq, act)?;
        let train_bytes = sized(&self.train, &self.train_graph, batch, seq, act)?;
        Ok(CellCost {
            fwd_run: run_bytes(&self.fwd, &fwd_bytes, copy_outputs)?,
            train_run: run_bytes(&self.train, &train_bytes, copy_outputs)?,
            out_ckpt: output_bytes(&self.fwd, &fwd_bytes, &|n| n.starts_with("value.")),
            saved: output_bytes(&self.fwd, &fwd_bytes, &|n| n.starts_with("saved.")),
            states,
            fwd_flops: cost::total(fg, fg.nodes(), &bind),
            train_flops: cost::total(&self.train_graph, self.train_graph.nodes(), &bind),
            recompute_flops: cost::total(
                &self.full_train,
                self.recompute_nodes.iter().copied(),
                &bind,
            ),
        })
    }
}

/// Everything the planner needs about a model: its stages for every group size tried,
/// lowered once, and their prices by segment length (cached).
pub struct Planner {
    model: Graph,
    layers: u32,
    ignore_index: i64,
    embed: Variant,
    head: Variant,
    /// `(group size, keep)` -> variant of a group of that many layers (the first ones).
    groups: HashMap<(u32, Keep), Variant>,
    costs: HashMap<(u8, u32, Keep, u64), CellCost>,
    pub request: Request,
    params: u64,
    /// Groups of more layers than this are priced by linear extrapolation from groups of
    /// `exact_groups - 1` and `exact_groups` layers (identical layers make every quantity
    /// affine in the group size); [`Planner::plan`] re-prices its choice exactly.
    pub exact_groups: u32,
}

/// Which stage a cost is for (cache key).
const EMBED: u8 = 0;
const HEAD: u8 = 1;
const GROUP: u8 = 2;

impl Planner {
    pub fn new(
        model: &Graph,
        mut request: Request,
        ignore_index: i64,
    ) -> Result<Planner, PlanError> {
        // The stages are lowered as they will run: activations stored in `act_dtype`.
        request.lower.bf16_activations = request.act_dtype == DType::BF16;
        let layers = model.num_layers();
        if layers == 0 {
            return Err(PlanError::NoLayers);
        }
        if request.batch == 0 || request.seq == 0 || request.quantum == 0 {
            return Err(PlanError::Request(
                "batch, sequence length and quantum must be at least 1".into(),
            ));
        }
        let whole: Range<u32> = 0..layers;
        let stages = stage::split(model, std::slice::from_ref(&whole))?;
        let opts = &request.lower;
        let embed = variant(&stages[0], Keep::Nothing, ignore_index, false, opts)?;
        let head = variant(
            &stages[2],
            Keep::Nothing,
            ignore_index,
            request.logits,
            opts,
        )?;
        let params = model
            .params()
            .filter_map(|n| match model.op(n) {
                Op::Param { ty, .. } => ir::types::numel(&ty.shape).and_then(|d| d.as_known()),
                _ => None,
            })
            .sum();
        Ok(Planner {
            model: model.clone(),
            layers,
            ignore_index,
            embed,
            head,
            groups: HashMap::new(),
            costs: HashMap::new(),
            request,
            params,
            exact_groups: 4,
        })
    }

    pub fn layers(&self) -> u32 {
        self.layers
    }

    fn group_variant(&mut self, size: u32, keep: Keep) -> Result<&Variant, PlanError> {
        if !self.groups.contains_key(&(size, keep)) {
            let first: Range<u32> = 0..size;
            let mut ranges = vec![first];
            if size < self.layers {
                ranges.push(size..self.layers);
            }
            let stages = stage::split(&self.model, &ranges)?;
            let v = variant(
                &stages[1],
                keep,
                self.ignore_index,
                false,
                &self.request.lower,
            )?;
            self.groups.insert((size, keep), v);
        }
        Ok(&self.groups[&(size, keep)])
    }

    fn cost(&mut self, which: u8, size: u32, keep: Keep, seq: u64) -> Result<CellCost, PlanError> {
        let key = (which, size, keep, seq);
        if let Some(c) = self.costs.get(&key) {
            return Ok(*c);
        }
        let (b, act, copy) = (
            self.request.batch,
            self.request.act_dtype,
            self.request.copy_outputs,
        );
        let hi = self.exact_groups.max(2);
        let c = match which {
            EMBED => self.embed.cost(b, seq, act, copy)?,
            HEAD => self.head.cost(b, seq, act, copy)?,
            _ if size > hi => {
                let c1 = self.cost(which, hi - 1, keep, seq)?;
                let c2 = self.cost(which, hi, keep, seq)?;
                extrapolate(c1, c2, (size - hi) as u64)
            }
            _ => self.group_variant(size, keep)?.cost(b, seq, act, copy)?,
        };
        self.costs.insert(key, c);
        Ok(c)
    }

    /// Prices a plan shape: fills in `peak`, `breakdown` and the FLOPs.
    pub fn price(&mut self, mut plan: Plan) -> Result<Plan, PlanError> {
        let sim = simulate(self, &plan)?;
        plan.peak = sim.peak;
        plan.breakdown = sim.breakdown;
        plan.recompute_flops = sim.recompute_flops;
        plan.step_flops = sim.step_flops;
        Ok(plan)
    }

    /// The plan with groups of `l` layers, segments of `s` tokens and the given keeps, priced.
    pub fn grid_plan(
        &mut self,
        l: u32,
        s: u64,
        keep_all: u64,
        keep_gemm: u64,
    ) -> Result<Plan, PlanError> {
        let mut p = self.shape("grid", l, s);
        let cells = p.cells();
        p.keep_all = keep_all.min(cells);
        p.keep_gemm = keep_gemm.min(cells - p.keep_all);
        self.price(p)
    }

    fn shape(&self, strategy: &str, l: u32, s: u64) -> Plan {
        Plan {
            strategy: strategy.to_string(),
            groups: uniform_groups(self.layers, l),
            seg_len: s.min(self.request.seq).max(1),
            seq: self.request.seq,
            batch: self.request.batch,
            logits: self.request.logits,
            act_dtype: self.request.act_dtype,
            keep_all: 0,
            keep_gemm: 0,
            peak: 0,
            breakdown: Breakdown::default(),
            recompute_flops: 0.0,
            step_flops: 0.0,
        }
    }

    /// The classic strategies, priced: no checkpointing, per-layer, sqrt(L) groups, and
    /// Ma2mba's memory-only choice (the (l, s) of least peak, s a multiple of the quantum,
    /// nothing saved).
    pub fn classics(&mut self) -> Result<Vec<Plan>, PlanError> {
        let (layers, seq) = (self.layers, self.request.seq);
        let mut none = self.shape("no checkpointing", layers, seq);
        none.keep_all = 1;
        let mut out = vec![
            self.price(none)?,
            self.price(self.shape("per-layer", 1, seq))?,
            self.price(self.shape(
                "sqrt(L) groups",
                (layers as f64).sqrt().round().max(1.0) as u32,
                seq,
            ))?,
        ];
        let mut best: Option<Plan> = None;
        for l in 1..=layers {
            for &s in &self.seg_candidates() {
                let p = self.price(self.shape("Ma2mba (memory only)", l, s))?;
                if best.as_ref().is_none_or(|b| p.peak < b.peak) {
                    best = Some(p);
                }
            }
        }
        out.extend(best);
        Ok(out)
    }

    /// Segment lengths tried: the quantum times powers of two, and the whole sequence.
    pub fn seg_candidates(&self) -> Vec<u64> {
        let (q, seq) = (self.request.quantum, self.request.seq);
        let mut v = Vec::new();
        let mut s = q;
        while s < seq {
            v.push(s);
            s = s.saturating_mul(2);
        }
        v.push(seq);
        v
    }

    /// Group sizes tried: every size up to 8, then sizes that split the layers evenly-ish.
    pub fn group_candidates(&self) -> Vec<u32> {
        let n = self.layers;
        let mut v: Vec<u32> = (1..=n.min(8)).collect();
        for groups in 1..=n {
            v.push(n.div_ceil(groups));
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The plan of least recomputation within the budget (least memory when there is none).
    pub fn plan(&mut self) -> Result<Plan, PlanError> {
        let budget = self.request.budget;
        let mut best: Option<Plan> = None;
        let mut smallest: Option<Plan> = None;
        for l in self.group_candidates() {
            for s in self.seg_candidates() {
                let base = self.price(self.shape("ma2mba", l, s))?;
                if smallest.as_ref().is_none_or(|b| base.peak < b.peak) {
                    smallest = Some(base.clone());
                }
                let Some(budget) = budget else {
                    if best.as_ref().is_none_or(|b| base.peak < b.peak) {
                        best = Some(base);
                    }
                    continue;
                };
                if base.peak > budget {
                    continue;
                }
                let filled = self.fill(base, budget)?;
                let better = match &best {
                    None => true,
                    Some(b) => {
                        filled.recompute_flops < b.recompute_flops
                            || (filled.recompute_flops == b.recompute_flops && filled.peak < b.peak)
                    }
                };
                if better {
                    best = Some(filled);
                }
            }
        }
        match (best, budget) {
            (Some(p), _) => self.exact(p),
            (None, Some(budget)) => {
                let p = smallest.ok_or(PlanError::NoLayers)?;
                Err(PlanError::Infeasible {
                    budget,
                    min_bytes: p.peak,
                    plan: describe(&p),
                    dominant: dominant(&p.breakdown),
                })
            }
            (None, None) => Err(PlanError::NoLayers),
        }
    }

    /// Re-prices `p` with its groups lowered exactly (not extrapolated); when that no longer
    /// fits the budget, refills its keeps with the exact prices.
    fn exact(&mut self, p: Plan) -> Result<Plan, PlanError> {
        let l = p.groups.iter().map(|r| r.end - r.start).max().unwrap_or(1);
        let old = self.exact_groups;
        if l <= old {
            return Ok(p);
        }
        self.exact_groups = l;
        self.costs.retain(|k, _| k.0 != GROUP || k.1 <= old);
        let mut exact = self.price(p.clone());
        if let (Ok(e), Some(budget)) = (&exact, self.request.budget)
            && e.peak > budget
        {
            let mut base = e.clone();
            base.keep_all = 0;
            base.keep_gemm = 0;
            let base = self.price(base)?;
            exact = if base.peak <= budget {
                self.fill(base, budget)
            } else {
                Err(PlanError::Infeasible {
                    budget,
                    min_bytes: base.peak,
                    plan: describe(&base),
                    dominant: dominant(&base.breakdown),
                })
            };
        }
        self.exact_groups = old;
        self.costs.retain(|k, _| k.0 != GROUP || k.1 <= old);
        exact
    }

    /// Spends the budget left by `base` on saved values: the keep with more operations
    /// saved per byte first, as many cells as fit (binary search on the simulated peak).
    fn fill(&mut self, base: Plan, budget: u64) -> Result<Plan, PlanError> {
        let mut best: Option<Plan> = None;
        // Greedy in either order (GEMM results first, or whole cells first); the better wins.
        for gemm_first in [true, false] {
            let p = self.fill_in_order(&base, budget, gemm_first)?;
            let better = best.as_ref().is_none_or(|b| {
                p.recompute_flops < b.recompute_flops
                    || (p.recompute_flops == b.recompute_flops && p.peak < b.peak)
            });
            if better {
                best = Some(p);
            }
        }
        let mut plan = best.ok_or_else(|| PlanError::Request("base plan does not fit".into()))?;
        plan.strategy = "ma2mba".into();
        Ok(plan)
    }

    /// As many cells of the first kind as fit, then as many of the other.
    fn fill_in_order(
        &mut self,
        base: &Plan,
        budget: u64,
        gemm_first: bool,
    ) -> Result<Plan, PlanError> {
        let cells = base.cells();
        let fits = |me: &mut Planner, first: u64, second: u64| -> Result<Option<Plan>, PlanError> {
            let mut p = base.clone();
            (p.keep_gemm, p.keep_all) = if gemm_first {
                (first, second)
            } else {
                (second, first)
            };
            let p = me.price(p)?;
            Ok((p.peak <= budget).then_some(p))
        };
        let mut best =
            fits(self, 0, 0)?.ok_or_else(|| PlanError::Request("base plan does not fit".into()))?;
        let (mut lo, mut hi) = (0u64, cells);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            match fits(self, mid, 0)? {
                Some(p) => {
                    lo = mid;
                    best = p;
                }
                None => hi = mid - 1,
            }
        }
        let first = lo;
        let (mut lo, mut hi) = (0u64, cells - first);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            match fits(self, first, mid)? {
                Some(p) => {
                    lo = mid;
                    best = p;
                }
                None => hi = mid - 1,
            }
        }
        Ok(best)
    }
}

/// `c2 + k (c2 - c1)`: the cost `k` layers past `c2` when every layer adds `c2 - c1`.
fn extrapolate(c1: CellCost, c2: CellCost, k: u64) -> CellCost {
    let u = |a: u64, b: u64| (b as i128 + k as i128 * (b as i128 - a as i128)).max(0) as u64;
    let f = |a: f64, b: f64| b + k as f64 * (b - a);
    CellCost {
        fwd_run: u(c1.fwd_run, c2.fwd_run),
        train_run: u(c1.train_run, c2.train_run),
        out_ckpt: c2.out_ckpt,
        saved: u(c1.saved, c2.saved),
        states: u(c1.states, c2.states),
        fwd_flops: f(c1.fwd_flops, c2.fwd_flops),
        train_flops: f(c1.train_flops, c2.train_flops),
        recompute_flops: f(c1.recompute_flops, c2.recompute_flops),
    }
}

/// `layers` cut into groups of `l` (the last one shorter when `l` does not divide).
pub fn uniform_groups(layers: u32, l: u32) -> Vec<Range<u32>> {
    let l = l.clamp(1, layers.max(1));
    (0..layers.div_ceil(l))
        .map(|i| i * l..((i + 1) * l).min(layers))
        .collect()
}

/// `1.23 GB`, `870.7 kB` (decimal units, as the Ma2mba paper reports).
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// A one-line description of a plan's grid.
pub fn describe(p: &Plan) -> String {
    let l = p.groups.first().map_or(0, |r| r.end - r.start);
    let mut s = format!(
        "{} group{} of {} layer{}, {} segment{} of {} tokens",
        p.groups.len(),
        if p.groups.len() == 1 { "" } else { "s" },
        l,
        if l == 1 { "" } else { "s" },
        p.segments(),
        if p.segments() == 1 { "" } else { "s" },
        p.seg_len
    );
    if p.keep_all > 0 || p.keep_gemm > 0 {
        s.push_str(&format!(
            ", {} cell{} keep all, {} keep GEMM results",
            p.keep_all,
            if p.keep_all == 1 { "" } else { "s" },
            p.keep_gemm
        ));
    }
    s
}

/// What dominates a breakdown, in words.
fn dominant(b: &Breakdown) -> String {
    let parts = [
        ("weights", b.weights),
        ("gradients", b.gradients),
        ("optimizer state", b.optimizer),
        ("token data", b.data),
        ("checkpoints", b.checkpoints),
        ("saved values", b.saved),
        ("the working set of one cell", b.working),
    ];
    let (name, bytes) = parts.iter().max_by_key(|p| p.1).copied().unwrap_or(("", 0));
    let bytes = human_bytes(bytes);
    format!(
        "{name} dominate{} with {bytes}",
        if name.ends_with('s') && !name.ends_with("ss") {
            ""
        } else {
            "s"
        }
    )
}

/// The result of replaying a plan's schedule.
#[derive(Clone, Debug, Default)]
pub struct Simulation {
    pub peak: u64,
    pub breakdown: Breakdown,
    pub recompute_flops: f64,
    pub step_flops: f64,
    /// `(event label, live bytes)` at every simulated event (runs of identical segments are
    /// collapsed to one representative).
    pub timeline: Vec<(String, u64)>,
}

/// Live memory by category while replaying.
#[derive(Clone, Copy, Default)]
struct Live {
    ckpt: u64,
    saved: u64,
    working: u64,
}

/// Replays the schedule of `p` (module doc) and returns its peak and costs.
pub fn simulate(pl: &mut Planner, p: &Plan) -> Result<Simulation, PlanError> {
    let req = pl.request.clone();
    let b = req.batch;
    let ng = p.groups.len();
    let nseg = p.segments();
    // Persistent bytes.
    let params = pl.params;
    let (weights, gradients, optimizer) = if req.count_weights {
        (params * 4, params * 4, params * 8)
    } else {
        (0, 0, 0)
    };
    let data = 2 * b * p.seq * 4;
    let mut sim = Simulation::default();
    let persistent = weights + gradients + optimizer + data;
    let sizes: Vec<u32> = p.groups.iter().map(|r| r.end - r.start).collect();
    // Running states and state gradients: one copy each for every layer.
    let mut state_bytes = 0u64;
    for &sz in &sizes {
        state_bytes += pl.cost(GROUP, sz, Keep::Nothing, p.seg_len)?.states;
    }
    let carried = 2 * state_bytes;
    let mut live = Live {
        ckpt: carried,
        ..Live::default()
    };
    let record = |sim: &mut Simulation, label: &dyn Fn() -> String, live: Live, extra: u64| {
        let total = persistent + live.ckpt + live.saved + live.working + extra;
        if total > sim.peak {
            sim.peak = total;
            sim.breakdown = Breakdown {
                weights,
                gradients,
                optimizer,
                data,
                checkpoints: live.ckpt,
                saved: live.saved,
                working: live.working + extra,
            };
        }
        sim.timeline.push((label(), total));
    };
    // Segments grouped into runs of identical ones: (first t, count).
    let runs = segment_runs(p);
    // Forward.
    let mut fwd_end = Live::default();
    for &(t0, count) in &runs {
        let len = p.segment_len(t0);
        // Per segment of the run: what it stores, and its flops.
        let mut seg_store = (0u64, 0u64);
        let mut cells = Vec::with_capacity(ng);
        for (g, &sz) in sizes.iter().enumerate() {
            let k = p.keep(t0, g);
            let c = pl.cost(GROUP, sz, k, len)?;
            seg_store.0 += c.states + c.out_ckpt;
            seg_store.1 += c.saved;
            cells.push((k, c));
        }
        let embed = pl.cost(EMBED, 0, Keep::Nothing, len)?;
        let head = pl.cost(HEAD, 0, Keep::Nothing, len)?;
        // The run's last segment, after `count - 1` identical ones.
        live.ckpt += (count - 1) * seg_store.0;
        live.saved += (count - 1) * seg_store.1;
        let t = t0 + count - 1;
        let h0 = cells.first().map_or(0, |_| embed.out_ckpt);
        record(&mut sim, &|| format!("fwd t{t} embed"), live, embed.fwd_run);
        for (g, (k, c)) in cells.iter().enumerate() {
            live.ckpt += c.states;
            let extra = if g == 0 { h0 } else { 0 };
            record(
                &mut sim,
                &|| format!("fwd t{t} g{g} {}", k.name()),
                live,
                c.fwd_run + extra,
            );
            live.ckpt += c.out_ckpt;
            live.saved += c.saved;
        }
        for (_, c) in &cells {
            sim.step_flops += count as f64 * (c.fwd_flops + c.train_flops - c.recompute_flops);
            sim.recompute_flops += count as f64 * c.recompute_flops;
        }
        sim.step_flops += count as f64 * (head.train_flops + embed.fwd_flops + embed.train_flops);
        sim.recompute_flops += count as f64 * embed.fwd_flops;
        fwd_end = live;
    }
    // Backward: runs from the last; each run's first processed segment is its last one.
    live = fwd_end;
    for &(t0, count) in runs.iter().rev() {
        let len = p.segment_len(t0);
        let t = t0 + count - 1;
        let embed = pl.cost(EMBED, 0, Keep::Nothing, len)?;
        let head = pl.cost(HEAD, 0, Keep::Nothing, len)?;
        let mut seg_store = (0u64, 0u64);
        let mut cells = Vec::with_capacity(ng);
        for (g, &sz) in sizes.iter().enumerate() {
            let k = p.keep(t0, g);
            let c = pl.cost(GROUP, sz, k, len)?;
            seg_store.0 += c.states + c.out_ckpt;
            seg_store.1 += c.saved;
            cells.push((k, c));
        }
        let before = live;
        record(&mut sim, &|| format!("bwd t{t} head"), live, head.train_run);
        let top = cells.last().map_or(0, |c| c.1.out_ckpt);
        live.ckpt = live.ckpt.saturating_sub(top);
        let cot = top;
        for g in (0..ng).rev() {
            let (k, c) = cells[g];
            let mut extra = cot;
            if g == 0 {
                record(
                    &mut sim,
                    &|| format!("bwd t{t} embed fwd"),
                    live,
                    cot + embed.fwd_run,
                );
                extra += embed.out_ckpt;
            }
            record(
                &mut sim,
                &|| format!("bwd t{t} g{g} {}", k.name()),
                live,
                extra + c.train_run,
            );
            live.ckpt = live.ckpt.saturating_sub(c.states);
            if g > 0 {
                live.ckpt = live.ckpt.saturating_sub(cells[g - 1].1.out_ckpt);
            }
            live.saved = live.saved.saturating_sub(c.saved);
        }
        record(
            &mut sim,
            &|| format!("bwd t{t} embed"),
            live,
            cot + embed.train_run,
        );
        // The rest of the run.
        live = Live {
            ckpt: before.ckpt.saturating_sub(count * seg_store.0),
            saved: before.saved.saturating_sub(count * seg_store.1),
            working: 0,
        };
    }
    let _ = nseg;
    Ok(sim)
}

/// Consecutive segments with the same length and the same keep in every group: `(first
/// segment, count)`, in time order.
fn segment_runs(p: &Plan) -> Vec<(u64, u64)> {
    let nseg = p.segments();
    let ng = p.groups.len() as u64;
    // Segments where the pattern can change: around the keep band edges and the last one.
    let mut breaks: Vec<u64> = vec![0, nseg.saturating_sub(1), nseg];
    for edge in [p.keep_all, p.keep_all + p.keep_gemm] {
        // Backward cell index `edge` lies in segment nseg - 1 - edge / ng.
        let back = edge / ng;
        for d in [0u64, 1] {
            if let Some(t) = nseg.checked_sub(1 + back) {
                breaks.push(t + d);
            }
        }
    }
    breaks.retain(|&t| t <= nseg);
    breaks.sort_unstable();
    breaks.dedup();
    let mut runs = Vec::new();
    for w in breaks.windows(2) {
        if w[1] > w[0] {
            runs.push((w[0], w[1] - w[0]));
        }
    }
    runs
}
