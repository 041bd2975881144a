//! The ma2mba graph IR.
//!
//! A model is a [`Graph`] of primitive [`Op`]s over [`TensorType`]s with symbolic batch and
//! sequence dimensions. Every node keeps the source [`Span`] it came from and, inside
//! `repeat`, the layer it belongs to. The IR never does IO.
//!
//! - [`op`]: the closed set of primitive ops (the one place ops are declared)
//! - [`types`]: dtypes, symbolic dims, tensor types
//! - [`infer`](mod@infer): shape and dtype inference
//! - [`graph`]: the petgraph-backed graph with side tables
//! - [`text`]: the exact, human-readable text form (print and parse)
//! - [`dot`]: Graphviz output for looking at graphs
//! - [`kernel`]: the loop-level kernel IR both backends lower from, and its evaluator
//! - [`lanes`]: which kernel loops a GPU warp's lanes share
//! - [`tile`]: tiled kernels (shared tiles, tensor-core products) and their memory layout
//! - [`schedule`]: kernels + matrix products in launch order, buffers, the memory plan
//! - [`verify`](mod@verify): the structural and typing invariants of a graph

pub mod dot;
pub mod graph;
pub mod infer;
pub mod kernel;
pub mod lanes;
pub mod op;
pub mod schedule;
pub mod text;
pub mod tile;
pub mod types;
pub mod verify;

pub use graph::{BuildError, Graph, NodeId, Operand, Span, Value};
pub use infer::{TypeError, infer};
pub use op::{BinaryOp, Init, InputKind, Op, ReduceOp, UnaryOp};
pub use text::{ParseError, parse, print};
pub use types::{DType, Dim, Shape, TensorType, shape_to_string};
pub use verify::{VerifyError, verify};
