//! The Python binding, `decnet_attr._core`. Thin: conversions at the edge,
//! then the pure core.

mod cluster;
mod convert;
mod dedupe;
mod engine;
mod errors;
mod sqlite;
mod states;
mod strings;
mod types;
mod validate;
mod writer;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::core::merge::State;
use crate::core::registry::Registry;

#[pymodule]
fn _core(py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_class::<types::PyThresholds>()?;
    m.add_class::<types::PyState>()?;
    m.add_class::<types::PyChange>()?;
    m.add_class::<types::PyRejected>()?;
    m.add_class::<types::PyIngestResult>()?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<sqlite::PySqlite>()?;
    m.add_class::<writer::PyWriter>()?;
    m.add_class::<states::PyStateTable>()?;
    m.add_class::<states::PyStateWrite>()?;
    m.add(
        "STATE_VALUE_COLUMNS",
        PyTuple::new(py, states::VALUE_COLUMNS),
    )?;
    m.add_function(wrap_pyfunction!(engine::aggregate_observations, m)?)?;
    m.add_class::<validate::PyValidated>()?;
    m.add_class::<dedupe::PyDedupe>()?;
    m.add_class::<cluster::PyClusterer>()?;
    m.add_function(wrap_pyfunction!(cluster::all_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(validate::validate_observations, m)?)?;
    m.add_function(wrap_pyfunction!(validate::ndjson_lines, m)?)?;
    m.add_function(wrap_pyfunction!(validate::rejection_codes, m)?)?;
    m.add_function(wrap_pyfunction!(validate::normalise_ip, m)?)?;
    m.add_function(wrap_pyfunction!(validate::is_attacker_uuid, m)?)?;
    m.add_function(wrap_pyfunction!(validate::partition_of, m)?)?;
    m.add(
        "ATTACKER_UUID_MAX",
        crate::core::validate::MAX_ATTACKER_UUID,
    )?;
    m.add_function(wrap_pyfunction!(validate::observation_lines, m)?)?;
    m.add(
        "TooManyItemsError",
        py.get_type::<validate::TooManyItemsError>(),
    )?;
    m.add("DecnetAttrError", py.get_type::<errors::DecnetAttrError>())?;
    m.add(
        "InvalidJSONError",
        py.get_type::<errors::InvalidJSONError>(),
    )?;
    m.add("STATES", PyTuple::new(py, State::ALL.map(State::as_str)))?;
    m.add("REGISTRY_VERSION", Registry::get().version.as_str())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "SQLITE_MEMORY_STATISTICS_OFF",
        sqlite::quiet_memory_statistics(),
    )?;
    Ok(())
}
