//! The exception hierarchy: everything the core rejects is a
//! `DecnetAttrError`, a `ValueError` subclass.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;

create_exception!(
    _core,
    DecnetAttrError,
    PyValueError,
    "Bad input to decnet_attr (a ValueError)."
);
create_exception!(
    _core,
    InvalidJSONError,
    DecnetAttrError,
    "A JSON batch that is not valid JSON as a whole."
);
