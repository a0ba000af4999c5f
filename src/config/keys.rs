//! How a configuration error comes to name its key.
//!
//! Sources are read table by table (see [`super::source`]), so the `config` crate
//! only knows the key below the table it was given. [`located`] puts the table's own
//! key in front; [`keys_of`] tells which keys a section accepts, straight from its
//! `Deserialize` derive, so no list of key names is kept by hand.

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

use super::ConfigError;

/// A problem with the key `key`.
pub(super) fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// Turns an error the `config` crate found below the key `prefix` into one that
/// names the whole key (`sources.shop.max_branches`, `sources.shop.persistent[1]`).
pub(super) fn located(prefix: &str, e: config::ConfigError) -> ConfigError {
    let at = |key: Option<String>| match key.map(|k| dotted(&k)) {
        Some(k) if k.starts_with('[') => format!("{prefix}{k}"),
        Some(k) if !k.is_empty() => format!("{prefix}.{k}"),
        _ => prefix.to_owned(),
    };
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => invalid(
            at(key),
            format!("invalid type: {unexpected}, expected {expected}"),
        ),
        config::ConfigError::At { error, key, .. } => invalid(at(key), error.to_string()),
        config::ConfigError::NotFound(key) => invalid(at(Some(key)), "missing"),
        other => invalid(prefix, other.to_string()),
    }
}

/// The `config` crate writes a key below a list element without its dot
/// (`policies[0]match`); this puts it back (`policies[0].match`).
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '[' && c != '.' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

/// The keys a section struct accepts, as its `Deserialize` derive lists them
/// (renamed keys under their new names; `#[serde(skip)]` fields left out).
pub(super) fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut keys: &'static [&'static str] = &[];
    // The lister always fails once it has seen the struct's key list.
    let _ = T::deserialize(KeyLister(&mut keys));
    keys
}

/// A deserializer that only records the field list a struct asks for.
struct KeyLister<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for KeyLister<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only structs have keys"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("keys listed"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Two {
        a: u8,
        #[serde(rename = "b-b")]
        b: u8,
        #[serde(skip)]
        c: u8,
    }

    #[test]
    fn keys_come_from_the_derive() {
        assert_eq!(keys_of::<Two>(), ["a", "b-b"]);
        assert!(keys_of::<u8>().is_empty());
    }

    #[test]
    fn located_errors_name_the_whole_key() {
        let table = config::Value::from(config::Map::from_iter([(
            "n".to_owned(),
            config::Value::from("x"),
        )]));
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct N {
            n: u8,
        }
        let e = table.try_deserialize::<N>().unwrap_err();
        let e = located("sources.shop", e).to_string();
        assert!(e.contains("`sources.shop.n`"), "{e}");
        assert_eq!(dotted("policies[0]match"), "policies[0].match");
        assert_eq!(dotted("a[0][1].b"), "a[0][1].b");
    }
}
