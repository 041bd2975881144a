//! Passes over the graph IR.
//!
//! - [`autodiff`]: reverse-mode differentiation: the backward graph, the training loss
//! - [`lower`]: fusion by inlining, kernels in the kernel IR, matrix products, the schedule
//! - [`memory`]: the static memory plan (arena offsets from lifetimes) and its checker
//! - [`step`]: the recurrent decode step (the graph specialized to one token)

pub mod autodiff;
pub mod lower;
pub mod memory;
pub mod step;

pub use autodiff::{AdError, Gradients, grad, training_graph};
pub use lower::{BufId, BufInfo, BufKind, LowerError, LowerOptions, Lowered, Step, lower};
pub use memory::{MemoryPlan, check as check_memory, plan as plan_memory};
pub use step::{StepError, specialize, step_graph};
