//! The primitive → merger-kind table, read from the package data file that
//! the Python side ships (`python/decnet_attr/data/primitives.json`), so the
//! two sides can never disagree.

use std::collections::HashMap;
use std::sync::OnceLock;

use super::merge::Kind;

const REGISTRY_JSON: &str = include_str!("../../../python/decnet_attr/data/primitives.json");

pub struct Registry {
    pub version: String,
    kinds: HashMap<String, Kind>,
}

#[derive(serde::Deserialize)]
struct Doc {
    version: String,
    primitives: HashMap<String, Spec>,
}

#[derive(serde::Deserialize)]
struct Spec {
    kind: String,
}

impl Registry {
    fn load() -> Registry {
        // The file is compiled in and checked by the tests below; an
        // unreadable table would be a build defect, so fall back to an
        // empty table (everything categorical) rather than abort.
        match serde_json::from_str::<Doc>(REGISTRY_JSON) {
            Ok(doc) => Registry {
                version: doc.version,
                kinds: doc
                    .primitives
                    .into_iter()
                    .map(|(name, spec)| {
                        let kind = match spec.kind.as_str() {
                            "numeric" => Kind::Numeric,
                            "hash" => Kind::Hash,
                            _ => Kind::Categorical,
                        };
                        (name, kind)
                    })
                    .collect(),
            },
            Err(_) => Registry {
                version: "unreadable".into(),
                kinds: HashMap::new(),
            },
        }
    }

    pub fn get() -> &'static Registry {
        static REG: OnceLock<Registry> = OnceLock::new();
        REG.get_or_init(Registry::load)
    }

    /// The merger kind of a primitive, `None` when the registry does not
    /// know it (the caller then uses the categorical merger and counts it).
    pub fn kind(&self, primitive: &str) -> Option<Kind> {
        self.kinds.get(primitive).copied()
    }

    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_loads_every_primitive() {
        let r = Registry::get();
        assert_eq!(r.version, "0.1.4");
        assert_eq!(r.len(), 82);
        assert_eq!(
            r.kind("toolchain.c2.beacon_interval_ms"),
            Some(Kind::Numeric)
        );
        assert_eq!(r.kind("motor.digraph_simhash"), Some(Kind::Hash));
        assert_eq!(
            r.kind("toolchain.ssh.kex_algorithm_order"),
            Some(Kind::Categorical)
        );
        assert_eq!(r.kind("environmental.locale"), Some(Kind::Categorical));
        assert_eq!(r.kind("no.such.primitive"), None);
    }
}
