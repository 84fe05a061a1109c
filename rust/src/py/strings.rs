//! Python strings made once per distinct text within one call. A batch
//! names a few dozen identities and primitives thousands of times; each
//! `PyString::new` is an allocation and a UTF-8 decode, and a fresh string
//! also hashes again wherever it is looked up.

use std::collections::HashMap;

use ahash::RandomState;
use pyo3::prelude::*;
use pyo3::types::PyString;

pub(crate) struct Strings<'a, 'py> {
    py: Python<'py>,
    made: HashMap<&'a str, &'py PyString, RandomState>,
}

impl<'a, 'py> Strings<'a, 'py> {
    pub(crate) fn new(py: Python<'py>) -> Self {
        Strings {
            py,
            made: HashMap::default(),
        }
    }

    /// The Python string of `text` (the same object for the same text).
    pub(crate) fn get(&mut self, text: &'a str) -> &'py PyString {
        let py = self.py;
        self.made
            .entry(text)
            .or_insert_with(|| PyString::new(py, text))
    }
}
