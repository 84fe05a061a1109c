//! The pure core: values, mergers, the incremental engine, JSON input.
//! No Python and no I/O here.

pub mod cluster;
pub mod dedupe;
pub mod engine;
pub mod fastjson;
pub mod hashwin;
pub mod intern;
pub mod json;
pub mod merge;
pub mod obs;
pub mod pgcopy;
pub mod registry;
pub mod slots;
pub mod validate;
pub mod value;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod fastjson_tests;
