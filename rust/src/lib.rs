//! decnet-attr's Rust core and its Python binding (`decnet_attr._core`).

pub mod core;

#[cfg(feature = "python")]
mod py;
