//! Passes over the graph IR.
//!
//! - [`autodiff`]: reverse-mode differentiation: the backward graph, the training loss
//! - [`lower`]: fusion by inlining, kernels in the kernel IR, matrix products, the schedule
//! - [`memory`]: the static memory plan (arena offsets from lifetimes) and its checker
//! - [`remat`]: the layer x time rematerialization planner (checkpoint grid under a budget)
//! - [`cost`]: operation counts of nodes, for pricing recomputation
//! - [`stage`]: cutting a graph into the stages of a checkpoint grid; saved-value rewriting
//! - [`step`]: the recurrent decode step (the graph specialized to one token)

pub mod autodiff;
pub mod cost;
pub mod lower;
pub mod memory;
pub mod remat;
pub mod stage;
pub mod step;

pub use autodiff::{AdError, Gradients, grad, stage_training_graph, training_graph};
pub use lower::{BufId, BufInfo, BufKind, LowerError, LowerOptions, Lowered, Step, lower};
pub use memory::{MemoryPlan, check as check_memory, plan as plan_memory};
pub use step::{StepError, specialize, step_graph};
